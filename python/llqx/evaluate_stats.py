"""KLD/PPL statistics over per-token values, as llama-perplexity --kl-divergence aggregates them.

Pure functions over numpy arrays: ``evaluate.py`` runs the models and hands the per-token values here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .errors import LlqxError


@dataclass(frozen=True)
class Estimate:
    """A value and its standard error (None where no error estimate exists, e.g. a maximum)."""

    value: float
    err: float | None = None


def mean_and_err(values: np.ndarray) -> Estimate:
    """llama-perplexity's mean_and_uncertainty: the mean and sqrt(var/(n-1)) (0 for n <= 10)."""
    n = values.size
    if n < 1:
        return Estimate(0.0, 0.0)
    f = float(values.sum() / n)
    df = float((values * values).sum() / n) - f * f
    return Estimate(f, math.sqrt(df / (n - 1)) if df > 0 and n > 10 else 0.0)


def _percentile(sorted_values: np.ndarray, fraction: float) -> float:
    """llama-perplexity's percentile: linear interpolation on the sorted values."""
    if fraction <= 0:
        return float(sorted_values[0])
    if fraction >= 1:
        return float(sorted_values[-1])
    p = fraction * (sorted_values.size - 1)
    ip = int(p)
    p -= ip
    return float((1 - p) * sorted_values[ip] + p * sorted_values[min(ip + 1, sorted_values.size - 1)])


def _median(sorted_values: np.ndarray) -> float:
    n = sorted_values.size
    return float(
        0.5 * (sorted_values[n // 2] + sorted_values[n // 2 - 1]) if n % 2 == 0 else sorted_values[n // 2]
    )


def _bootstrap_err(values: np.ndarray, stat: Callable[[np.ndarray], float], n_boot: int = 200) -> float:
    """Standard error of a quantile by a seeded bootstrap over tokens (deterministic)."""
    rng = np.random.default_rng(20240917)
    n = values.size
    if n < 10:
        return 0.0
    out = np.empty(n_boot)
    for b in range(n_boot):
        out[b] = stat(np.sort(values[rng.integers(0, n, n)]))
    return float(out.std(ddof=1))


def token_statistics(
    nll: np.ndarray, nll_base: np.ndarray, kld: np.ndarray, p_diff: np.ndarray, same_top: np.ndarray
) -> dict[str, object]:
    """Aggregate per-token values into llama-perplexity's --kl-divergence statistics."""
    nll = nll.astype(np.float64)
    nll_base = nll_base.astype(np.float64)
    kld64 = kld.astype(np.float64)
    p_diff64 = p_diff.astype(np.float64)
    n = nll.size
    if n < 2:
        raise LlqxError("too few scored tokens for statistics")
    log_ppl = mean_and_err(nll)
    log_ppl_base = mean_and_err(nll_base)
    cov = (
        float((nll * nll_base).sum() / n - (nll.sum() / n) * (nll_base.sum() / n)) / (n - 1)
        if n >= 10
        else 0.0
    )
    denom = (log_ppl.err or 0.0) * (log_ppl_base.err or 0.0)
    rho = cov / denom if denom > 0 else 1.0
    ppl = math.exp(log_ppl.value)
    ppl_base = math.exp(log_ppl_base.value)
    ln_ratio = log_ppl.value - log_ppl_base.value
    ln_ratio_err = math.sqrt(max(0.0, (log_ppl.err or 0) ** 2 + (log_ppl_base.err or 0) ** 2 - 2.0 * cov))
    ratio = math.exp(ln_ratio)
    kld_sorted = np.sort(kld)
    p_diff_mse = mean_and_err(p_diff64 * p_diff64)
    rms = math.sqrt(p_diff_mse.value)
    top = float(same_top.astype(np.float64).mean())
    return {
        "ppl": Estimate(ppl, ppl * (log_ppl.err or 0.0)),
        "ppl_base": Estimate(ppl_base, ppl_base * (log_ppl_base.err or 0.0)),
        "ln_ppl_ratio": Estimate(ln_ratio, ln_ratio_err),
        "ppl_ratio": Estimate(ratio, ratio * ln_ratio_err),
        "rho_ppl": rho,
        "kld_mean": mean_and_err(kld64),
        "kld_median": Estimate(_median(kld_sorted), _bootstrap_err(kld, _median)),
        "kld_p99": Estimate(
            _percentile(kld_sorted, 0.99), _bootstrap_err(kld, lambda s: _percentile(s, 0.99))
        ),
        "kld_max": float(kld_sorted[-1]),
        "same_top": Estimate(top, math.sqrt(top * (1 - top) / (n - 1))),
        "dp_rms": Estimate(rms, 0.5 / rms * (p_diff_mse.err or 0.0) if rms > 0 else 0.0),
        "dp_mean": mean_and_err(p_diff64),
    }
