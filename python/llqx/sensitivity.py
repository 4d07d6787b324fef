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
error a writer adds to the residual stream, per token relative to the stream where the imatrix has stream
sums, the relative output error of a tensor that feeds a block), not the estimator's propagated unit:
the propagation model's layer weights swing by 100× inside one band (the layers before and at the
massive activations), and a band factor fitted to such a sum prices every other layer of the band far
too low. Probed alone, those layers cost about as much KL
divergence per unit of local error as their neighbours (docs/method.md, §5b). Nothing is chosen by hand
per model; the factors come from one forward pass per group.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace

from .errors import LlqxError
from .imatrix import Imatrix
from .llama_rules import fallback_type
from .model import ModelInfo
from .planner import Scores
from .probe import Calibration, check_full_precision, measure_mixes
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


def method_key() -> str:
    """What a stored probe's KL divergence means (the probe type, the grouping); measurements of another
    method are not used."""
    return f"v{SENSITIVITY_VERSION}:{PROBE_TYPE}:{BANDS}"


def probe_types(info: ModelInfo, names: list[str]) -> dict[str, int]:
    """The probe type each tensor gets (PROBE_TYPE after llama.cpp's width fallback)."""
    want = ggml_type(PROBE_TYPE).id
    return {n: fallback_type(want, info.tensor(n).n_per_row) for n in names}


def probe_groups(info: ModelInfo, names: list[str]) -> dict[str, list[str]]:
    n_layer = info.metadata.get(f"{info.architecture}.block_count")
    n = n_layer if isinstance(n_layer, int) else 0
    out: dict[str, list[str]] = {}
    for name in names:
        out.setdefault(tensor_group(name, n), []).append(name)
    return dict(sorted(out.items()))


def probe_key(cal: Calibration) -> str:
    """What the stored measurements depend on besides the state's own key (model, imatrix, scoring)."""
    src = f"{method_key()}:{cal.key}"
    return hashlib.sha256(src.encode()).hexdigest()[:24]


def measure_groups(
    info: ModelInfo,
    names: list[str],
    imatrix: Imatrix | None,
    cal: Calibration,
    skip: Collection[str] = (),
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, float]:
    """The KL divergence of each group's probe (all of ``names``' groups but those in ``skip``): one forward
    pass over the calibration chunks per group. Needs no scores, so the imatrix pass can run it."""
    check_full_precision(info, names)
    types = probe_types(info, names)
    groups = {g: ns for g, ns in probe_groups(info, names).items() if g not in skip}
    if not groups:
        return {}
    mixes = [[(n, types[n]) for n in ns] for ns in groups.values()]
    return dict(zip(groups, measure_mixes(info.path, mixes, imatrix, cal, on_progress), strict=True))


def stored_in(imatrix: Imatrix | None) -> dict[str, float] | None:
    """The sensitivities the imatrix pass measured (llqx imatrix --sensitivity-chunks), if usable."""
    if imatrix is None or not imatrix.sensitivities:
        return None
    if imatrix.sensitivity_method != method_key():
        log.warning("the imatrix's sensitivities were measured another way (%s, this llqx uses %s): not used",
                    imatrix.sensitivity_method, method_key())
        return None
    return imatrix.sensitivities


def measure(
    scores: Scores,
    imatrix: Imatrix | None,
    cal: Calibration | None,
    stored: dict[str, float] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[GroupSensitivity]:
    """Probe every group (those in ``stored``, {group: kld}, are not run again; without calibration text
    nothing runs) and fit its factor.

    The probe types must be scored (their local error is the denominator). A group whose probe moves
    nothing measurable (KLD or local error 0), or that was not measured, takes the median factor of the
    others.
    """
    names = list(scores.candidates)
    types = probe_types(scores.model, names)
    groups = probe_groups(scores.model, names)
    scores.ensure_scored({n: [types[n]] for n in types})
    klds = dict(stored or {})
    if cal is not None:
        klds.update(measure_groups(scores.model, names, imatrix, cal, klds, on_progress))
    out: list[GroupSensitivity] = []
    for g, ns in groups.items():
        local = sum(scores.local_error_of(n, types[n]) for n in ns)
        kld = klds.get(g, 0.0)
        out.append(GroupSensitivity(g, ns, kld, local, kld / local if kld > 0 and local > 0 else 0.0))
    valid = sorted(s.factor for s in out if s.factor > 0)
    if not valid:
        raise LlqxError("the calibration probes measured no KL divergence: is the calibration text empty?")
    median = valid[len(valid) // 2]
    return [s if s.factor > 0 else replace(s, factor=median) for s in out]


def multipliers(sens: list[GroupSensitivity]) -> dict[str, float]:
    """Per tensor, from its local error to KL divergence (applied by Scores.calibrate): its group's factor."""
    return {n: s.factor for s in sens for n in s.tensors}


def calibrate(
    scores: Scores,
    imatrix: Imatrix | None,
    cal: Calibration | None,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[GroupSensitivity]:
    """Plan with measured sensitivities from now on: measured on ``cal`` (or taken from the state file),
    else those the imatrix file carries; with neither, nothing changes (an empty list)."""
    if cal is None:
        stored = stored_in(imatrix)
        if stored is None:
            return []
        sens = measure(scores, imatrix, None, stored)
    else:
        if scores.imatrix_label is None:
            raise LlqxError("measured sensitivities need an imatrix (the probes quantize as the writer will)")
        key = probe_key(cal)
        stored = scores.state.probes.get(key) if scores.state is not None else None
        sens = measure(scores, imatrix, cal, stored, on_progress)
        if scores.state is not None:
            scores.state.probes[key] = {s.group: s.kld for s in sens}
            scores.state.save()
    scores.calibrate(multipliers(sens))
    return sens
