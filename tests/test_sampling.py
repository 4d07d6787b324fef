"""The scorer's row sampling (cpp/llqx_score_sample.cpp) against probabilities worked out here in numpy:
the largest rows always taken, the rest evenly spaced, each row standing for 1 / its probability."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llqx import _core


def _inclusion(energy: np.ndarray, n_sample: int) -> np.ndarray:
    """Each row's probability of being sampled. Largest first, a row is taken for certain while it holds at
    least the energy one sampled row of the rest stands for (the rest's energy over the samples left for
    it); every other row has the same probability: the samples left over the rows left."""
    order = np.argsort(-energy, kind="stable")
    rest, taken = energy.sum(), 0
    while taken < n_sample and rest > 0 and energy[order[taken]] * (n_sample - taken) >= rest:
        rest -= energy[order[taken]]
        taken += 1
    pi = np.full(len(energy), (n_sample - taken) / (len(energy) - taken))
    pi[order[:taken]] = 1.0
    return pi


def _heavy_tailed(n: int) -> np.ndarray:
    rng = np.random.default_rng(7)
    energy = rng.lognormal(0.0, 1.5, n)
    energy[11] = energy.sum()  # a massive-activation row: half of all the energy
    energy[[40, 41, 300]] = 0.0
    return energy


def test_largest_rows_always_and_the_rest_evenly() -> None:
    energy = _heavy_tailed(600)
    n_sample, trials = 40, 3000
    pi = _inclusion(energy, n_sample)
    hits = np.zeros(len(energy))
    for k in range(trials):
        rows, scales = _core.score_sample_rows(f"blk.{k}.ffn_down.weight", 0, energy, n_sample)
        assert len(rows) == n_sample
        assert np.all(np.diff(rows) > 0)  # sorted and distinct
        assert np.asarray(scales) == pytest.approx(1.0 / pi[rows], rel=1e-9)
        hits[rows] += 1
    assert pi[11] == 1.0
    assert hits[11] == trials
    # every row's hit rate against its probability, within 5 binomial standard deviations (and 3 hits)
    tolerance = 5 * np.sqrt(trials * pi * (1 - pi)) + 3
    assert np.all(np.abs(hits - trials * pi) <= tolerance)


def test_sampled_sums_are_unbiased_and_catch_the_massive_row() -> None:
    energy = _heavy_tailed(600)
    rng = np.random.default_rng(3)
    error = energy * rng.uniform(0.5, 1.5, len(energy))  # quantization error roughly follows energy
    n_sample, trials = 40, 2000
    estimates = []
    for k in range(trials):
        rows, scales = _core.score_sample_rows(f"t{k}", 0, energy, n_sample)
        estimates.append(float(error[rows] @ np.asarray(scales)))
    estimates_arr = np.asarray(estimates) / error.sum()
    assert abs(estimates_arr.mean() - 1.0) < 5 * estimates_arr.std() / np.sqrt(trials)
    # evenly spaced rows over all of them (the sampling before energies were read) miss the massive row
    # or count it 15 times over
    stride = len(energy) / n_sample
    even = [error[np.floor((p + np.arange(n_sample)) * stride).astype(int)].sum() * stride
            for p in rng.uniform(size=trials)]
    assert estimates_arr.std() * 10 < np.std(even) / error.sum()


def test_edge_cases() -> None:
    rows, scales = _core.score_sample_rows("w", 0, np.ones(5), 8)
    assert rows == [0, 1, 2, 3, 4]
    assert scales == [1.0] * 5
    rows, scales = _core.score_sample_rows("w", 0, np.zeros(100), 10)  # no energy: all evenly spaced
    assert len(set(rows)) == 10
    assert scales == pytest.approx([10.0] * 10)
    first = _core.score_sample_rows("w", 3, _heavy_tailed(600), 40)
    assert first == _core.score_sample_rows("w", 3, _heavy_tailed(600), 40)  # deterministic by name, expert
    assert first != _core.score_sample_rows("w", 4, _heavy_tailed(600), 40)


def test_input_noise_costs_the_weights_column_energy(smollm2_f16: Path) -> None:
    """The scorer's cost of noise of variance σ_k on input column k (the rounding of activations): exactly
    Σ_rows Σ_k w_k² σ_k over all rows, against numpy on the tensor's F16 data read by gguf-py."""
    import gguf

    from llqx.model import inspect

    t = inspect(smollm2_f16).tensor("blk.3.ffn_down.weight")
    ne0, ne1 = t.shape[0], t.shape[1]
    noise = np.random.default_rng(0).random((2, ne0), dtype=np.float32)
    got: list[np.ndarray] = []

    def done(job: int, values: np.ndarray, rows: int) -> bool:
        got.append(np.asarray(values))
        return True

    job = {"name": t.name, "src_type": t.type, "ne": [ne0, ne1, 1], "offset": t.offset, "candidates": [8],
           "noise": noise.reshape(-1), "n_noise": 2}
    _core.score_run(str(smollm2_f16), [job], nthread=2, sample_elements=1 << 16, min_rows=16, callback=done,
                    cancel=_core.ScoreCancel())
    w = next(x for x in gguf.GGUFReader(smollm2_f16).tensors if x.name == t.name).data
    expected = noise.astype(np.float64) @ (w.astype(np.float64).reshape(ne1, ne0) ** 2).sum(axis=0)
    assert got[0].shape == (1 + 1 + 2,)  # one candidate, the energy, two noises
    np.testing.assert_allclose(got[0][2:], expected, rtol=1e-12)


def test_second_metric_is_the_error_under_its_moments(smollm2_f16: Path) -> None:
    """A job's second error metric (a writer's stream metric): with every row read, each candidate's error
    under it is Σ_rows Σ_k d_k e_k² + (a·e)² of the round trip's error e, against numpy on the tensor's F16
    data; the first metric's errors, the energy and the noise stay where they were."""
    import gguf

    from llqx.model import inspect

    t = inspect(smollm2_f16).tensor("blk.3.ffn_down.weight")
    ne0, ne1 = t.shape[0], t.shape[1]
    rng = np.random.default_rng(1)
    weights, diag, alt_diag = (rng.random(ne0, dtype=np.float32) + 0.1 for _ in range(3))
    alt_dir = rng.standard_normal(ne0).astype(np.float32) * 0.1
    cands = [_core.type_from_name("Q4_0"), _core.type_from_name("Q3_K")]
    base = {"name": t.name, "src_type": t.type, "ne": [ne0, ne1, 1], "offset": t.offset, "candidates": cands,
            "weights": weights, "diagonal": diag, "noise": weights, "n_noise": 1}
    with_alt = {**base, "alt_diagonal": alt_diag, "alt_directions": alt_dir, "alt_n_dir": 1}
    _, (plain, both) = _core.score_run(str(smollm2_f16), [base, with_alt], nthread=2, sample_elements=ne0 * ne1,
                                       min_rows=ne1)
    assert plain is not None
    assert both is not None
    assert both.shape == (2 * len(cands) + 1 + 1,)  # candidates, energy, one noise, then the second metric
    np.testing.assert_array_equal(both[:4], plain)
    w = next(x for x in gguf.GGUFReader(smollm2_f16).tensors if x.name == t.name).data
    w = np.asarray(w, dtype=np.float32).reshape(ne1, ne0)
    for i, c in enumerate(cands):
        _core.quantize_init(c)
        e = _core.dequantize_rows(c, _core.quantize_rows(c, w, weights), ne0).reshape(ne1, ne0).astype(np.float64)
        e -= w
        want = float(((e * e) @ alt_diag.astype(np.float64)).sum() + ((e @ alt_dir.astype(np.float64)) ** 2).sum())
        assert both[4 + i] == pytest.approx(want, rel=1e-9), c
        assert both[4 + i] != pytest.approx(both[i], rel=1e-3)
    with pytest.raises(_core.Error, match="second error metric"):
        _core.score_run(str(smollm2_f16), [{**base, "alt_diagonal": alt_diag[:-1]}])
