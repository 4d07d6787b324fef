"""Measured sensitivity (docs/method.md, §5b): how much KL divergence each group of tensors really causes
per unit of local error, measured on the model itself.

The estimator's propagation model puts every tensor's error into one unit with fixed assumptions. Here
the model answers instead: for each group (one kind of tensor in one third of the layers, and the
token embedding and the head alone) the group's weights are replaced by their round trip through a
probe type, a few calibration chunks run, and the KL divergence to the unchanged model is measured.
For small errors KL divergence is a quadratic form of the output error, so it is linear in error
energy, and independent errors of different groups add: one factor per group,
``s_g = KLD_g / Σ_{t∈g} l_t(probe)``, turns every curve of the group into KL divergence.

Inside a group the unit is each tensor's local error ``l_t`` (estimator.local_error_divisors: the
absolute error a writer adds to the residual stream, the relative output error of a tensor that feeds a
block), not the estimator's propagated unit: the propagation model's layer weights swing by 100× inside
one band (the layers before and at the massive activations), and a band factor fitted to such a sum
prices every other layer of the band far too low. Probed alone, those layers cost about as much KL
divergence per unit of local error as their neighbours (docs/method.md, §5b). Nothing is chosen by hand
per model; the factors come from one forward pass per group.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import LlqxError
from .imatrix import Imatrix
from .llama_rules import fallback_type
from .planner import Scores
from .probe import Calibration, measure_mixes
from .types import ggml_type

log = logging.getLogger("llqx")

# groups: each kind of layer tensor in this many bands of consecutive layers (early / middle / late)
BANDS = 3
# the probe type (width fallback applied per tensor): mid-range, where the plans spend most bytes, and
# off the grids of the low-bit types a dequantized source may lie on
PROBE_TYPE = "Q3_K"
SENSITIVITY_VERSION = 1

_LAYER = re.compile(r"^blk\.(\d+)\.(\w+)\.weight$")


def tensor_group(name: str, n_layer: int) -> str:
    """'ffn_down@0' for blk.N.ffn_down.weight in the first band of layers; the name stem otherwise."""
    m = _LAYER.match(name)
    if m is None or n_layer <= 0:
        return name.removesuffix(".weight")
    return f"{m.group(2)}@{min(BANDS - 1, int(m.group(1)) * BANDS // n_layer)}"


@dataclass(frozen=True)
class GroupSensitivity:
    """One group's measurement: its tensors, the KL divergence of their probe, the summed local error
    of the same probe and the factor between them."""

    group: str
    tensors: list[str]
    kld: float
    local_error: float
    factor: float

    def to_dict(self) -> dict[str, object]:
        return {"group": self.group, "tensors": len(self.tensors), "kld": self.kld,
                "local_error": self.local_error, "factor": self.factor}


def probe_types(scores: Scores) -> dict[str, int]:
    """The probe type each tensor gets (PROBE_TYPE after llama.cpp's width fallback)."""
    want = ggml_type(PROBE_TYPE).id
    return {n: fallback_type(want, scores.model.tensor(n).n_per_row) for n in scores.candidates}


def _groups(scores: Scores) -> dict[str, list[str]]:
    n_layer = scores.model.metadata.get(f"{scores.model.architecture}.block_count")
    n = n_layer if isinstance(n_layer, int) else 0
    out: dict[str, list[str]] = {}
    for name in scores.candidates:
        out.setdefault(tensor_group(name, n), []).append(name)
    return dict(sorted(out.items()))


def probe_key(cal: Calibration) -> str:
    """What the stored measurements depend on besides the state's own key (model, imatrix, scoring)."""
    src = f"v{SENSITIVITY_VERSION}:{PROBE_TYPE}:{BANDS}:{cal.key}"
    return hashlib.sha256(src.encode()).hexdigest()[:24]


def measure(
    scores: Scores,
    model: str | Path,
    imatrix: Imatrix | None,
    cal: Calibration,
    stored: dict[str, float] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[GroupSensitivity]:
    """Probe every group (those in ``stored``, {group: kld}, are not run again) and fit its factor.

    The probe types must be scored (their local error is the denominator). A group whose probe moves
    nothing measurable (KLD or local error 0) takes the median factor of the others.
    """
    types = probe_types(scores)
    groups = _groups(scores)
    scores.ensure_scored({n: [types[n]] for n in types})
    todo = [g for g in groups if stored is None or g not in stored]
    klds = dict(stored or {})
    if todo:
        mixes = [[(n, types[n]) for n in groups[g]] for g in todo]
        for g, kld in zip(todo, measure_mixes(model, mixes, imatrix, cal, on_progress), strict=True):
            klds[g] = kld
    out: list[GroupSensitivity] = []
    for g, names in groups.items():
        local = sum(scores.error_of(n, types[n]) * scores.local_scale(n) for n in names)
        kld = klds[g]
        out.append(GroupSensitivity(g, names, kld, local, kld / local if kld > 0 and local > 0 else 0.0))
    valid = sorted(s.factor for s in out if s.factor > 0)
    if not valid:
        raise LlqxError("the calibration probes measured no KL divergence: is the calibration text empty?")
    median = valid[len(valid) // 2]
    return [s if s.factor > 0 else replace(s, factor=median) for s in out]


def multipliers(scores: Scores, sens: list[GroupSensitivity]) -> dict[str, float]:
    """Per tensor, from the estimator's unit to KL divergence (applied by Scores.calibrate): its group's
    factor times the tensor's own conversion to local error."""
    return {n: s.factor * scores.local_scale(n) for s in sens for n in s.tensors}


def calibrate(
    scores: Scores,
    imatrix: Imatrix | None,
    cal: Calibration,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[GroupSensitivity]:
    """Measure (or take from the state file) every group's sensitivity and plan with it from now on."""
    if scores.imatrix_label is None:
        raise LlqxError("measured sensitivities need an imatrix (the probes quantize as the writer will)")
    key = probe_key(cal)
    stored = scores.state.probes.get(key) if scores.state is not None else None
    sens = measure(scores, scores.model.path, imatrix, cal, stored, on_progress)
    if scores.state is not None:
        scores.state.probes[key] = {s.group: s.kld for s in sens}
        scores.state.save()
    scores.calibrate(multipliers(scores, sens))
    return sens
