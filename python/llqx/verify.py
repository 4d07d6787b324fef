"""--verify: the planned mix against llama.cpp's nearest recipe, measured on calibration text.

The recipe is the largest llama-quantize file type whose mix (with the same pins, as llama-quantize
would apply them) takes no more tensor bytes than the plan. Both mixes run on the same calibration
chunks (llqx.probe); the one with the lower KL divergence is kept, so a target never ends worse than
the recipe the user could have had at that size, on that text.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import log as _log
from .errors import LlqxError
from .imatrix import Imatrix
from .llama_rules import tensor_nbytes
from .plan import Plan
from .planner import Scores
from .probe import Calibration, measure_mixes
from .quantize import quantize
from .types import FILE_TYPES, ggml_type

log = logging.getLogger("llqx")

# llama-quantize's recipes a plan is compared with (mixes and single types; not ternary, MXFP4 or F16)
RECIPES = tuple(
    ft.name for ft in FILE_TYPES
    if ft.name not in {"Q1_0", "Q2_0", "TQ1_0", "TQ2_0", "MXFP4_MOE", "F16", "BF16", "Q3_K", "Q4_K", "Q5_K"}
)

# one line of llama_model_quantize's dry run: the tensor, its type, and the new type when it changes
_DRY_LINE = re.compile(r"^\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[.*\], type =\s*(\w+), size =.*?(?:\((\w+)\))?\s*$")


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def recipe_mix(model: str | os.PathLike[str], ftype: str, imatrix: Imatrix | None, **pins: Any) -> dict[str, int]:
    """The type llama-quantize's recipe ``ftype`` gives every tensor (read from its dry run's log)."""
    lines = _Lines()
    level = _log.logger.level
    _log.logger.addHandler(lines)
    _log.logger.setLevel(logging.INFO)
    try:
        quantize(model, None, ftype, imatrix=imatrix, dry_run=True, **pins)
    finally:
        _log.logger.removeHandler(lines)
        _log.logger.setLevel(level)
    out: dict[str, int] = {}
    for line in lines.lines:
        m = _DRY_LINE.match(line)
        if m:
            out[m.group(1)] = ggml_type(m.group(3) or m.group(2)).id
    if not out:
        raise LlqxError(f"could not read the {ftype} recipe's types from llama.cpp's dry run")
    return out


@dataclass(frozen=True)
class Verdict:
    """What --verify measured: both mixes' KL divergence on the calibration chunks and the one kept."""

    recipe: str
    recipe_bpw: float
    recipe_kld: float
    plan_bpw: float
    plan_kld: float
    kept: str  # "llqx" or the recipe's name

    def to_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def nearest_recipe(
    scores: Scores, plan: Plan, imatrix: Imatrix | None, pins: dict[str, Any]
) -> tuple[str, dict[str, int]]:
    """The largest recipe whose mix (quantizable tensors) takes no more bytes than the plan's."""
    spent = sum(t.nbytes for t in plan.tensors)
    best: tuple[int, str, dict[str, int]] | None = None
    for name in RECIPES:
        try:
            mix = recipe_mix(plan.model, name, imatrix, **pins)
        except LlqxError:
            continue  # e.g. a recipe this model's widths or data cannot take
        nbytes = sum(
            t.nbytes if t.name not in scores.candidates else _nbytes(scores, t.name, mix[t.name])
            for t in scores.model.tensors
        )
        if nbytes <= spent and (best is None or nbytes > best[0]):
            best = (nbytes, name, {n: mix[n] for n in scores.candidates})
    if best is None:
        raise LlqxError("--verify: no llama.cpp recipe fits in the plan's bytes to compare with")
    return best[1], best[2]


def _nbytes(scores: Scores, name: str, tid: int) -> int:
    return tensor_nbytes(tid, scores.model.tensor(name))


def verify(
    scores: Scores,
    plan: Plan,
    imatrix: Imatrix | None,
    cal: Calibration,
    pins: dict[str, Any],
    replan: Callable[[list[tuple[str, int]]], Plan],
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[Plan, Verdict]:
    """Measure the plan and the nearest recipe on the calibration chunks; return the better as a plan
    (``replan(tensor_types)`` plans with every tensor pinned to the recipe's type) and the verdict."""
    recipe, mix = nearest_recipe(scores, plan, imatrix, pins)
    planned = [(t.name, t.type) for t in plan.tensors if t.status != "kept"]
    kld_plan, kld_recipe = measure_mixes(plan.model, [planned, list(mix.items())], imatrix, cal, on_progress)
    n = scores.model.n_elements
    recipe_bpw = 8.0 * sum(
        t.nbytes if t.name not in mix else _nbytes(scores, t.name, mix[t.name]) for t in scores.model.tensors
    ) / n
    if kld_recipe < kld_plan:
        kept = replan([(f"^{re.escape(name)}$", tid) for name, tid in mix.items()])
        return kept, Verdict(recipe, recipe_bpw, kld_recipe, plan.bpw, kld_plan, recipe)
    return plan, Verdict(recipe, recipe_bpw, kld_recipe, plan.bpw, kld_plan, "llqx")
