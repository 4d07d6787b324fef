"""--verify: the planned mix against llama.cpp's nearest recipe, measured on calibration text.

The recipe is the largest llama-quantize file type whose mix (with the same pins, as llama-quantize
would apply them) meets the plan's target: a recipe's file at --target-size, its bpw at --target-bpw.
(Not the plan's own bytes: a plan lands a little under its target, so asking for exactly a recipe's size
must compare with that recipe, not the next smaller one.) Both mixes run on the same calibration
chunks (llqx.probe); the one with the lower KL divergence is kept, so a target never ends worse than
the recipe the user could have had at that size, on that text.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from . import log as _log
from .errors import LlqxError
from .imatrix import Imatrix
from .llama_rules import tensor_nbytes
from .plan import Plan, anchored_pattern, padded
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


@dataclass(frozen=True)
class Recipe:
    """A llama.cpp recipe on this model: its type for every planned tensor, and the sizes it comes to."""

    name: str
    mix: dict[str, int]
    tensor_bytes: int
    file_size: int
    bpw: float


def nearest_recipe(scores: Scores, plan: Plan, imatrix: Imatrix | None, pins: dict[str, Any]) -> Recipe:
    """The largest recipe whose mix meets the plan's target (verify runs on --target-size or --target-bpw
    plans only: budgets are refused before)."""
    best: Recipe | None = None
    for name in RECIPES:
        try:
            mix = recipe_mix(plan.model, name, imatrix, **pins)
        except LlqxError:
            continue  # e.g. a recipe this model's widths or data cannot take
        sizes = [
            t.nbytes if t.name not in scores.candidates else tensor_nbytes(mix[t.name], t)
            for t in scores.model.tensors
        ]
        r = Recipe(name, {n: mix[n] for n in scores.candidates}, sum(sizes),
                   plan.meta_size + sum(padded(b) for b in sizes), 8.0 * sum(sizes) / scores.model.n_elements)
        if plan.target_size is not None:
            fits = r.file_size <= plan.target_size
        else:
            fits = plan.target_bpw is not None and r.bpw <= plan.target_bpw
        if fits and (best is None or r.tensor_bytes > best.tensor_bytes):
            best = r
    if best is None:
        raise LlqxError("--verify: no llama.cpp recipe fits the target to compare with")
    return best


def recipe_plan(scores: Scores, plan: Plan, recipe: Recipe, pins: dict[str, Any]) -> Plan:
    """The recipe's mix as a plan (every tensor pinned), reporting the plan's target. An all-pinned plan
    can only meet its own size, so it is planned at the recipe's file size, which fits the target."""
    kept = scores.plan(target_size=recipe.file_size,
                       **{**pins, "tensor_types": [(anchored_pattern(n), t) for n, t in recipe.mix.items()]})
    return replace(kept, target_bpw=plan.target_bpw, target_size=plan.target_size)


def verify(
    scores: Scores,
    plan: Plan,
    imatrix: Imatrix | None,
    cal: Calibration,
    pins: dict[str, Any],
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[Plan, Verdict]:
    """Measure the plan and the nearest recipe on the calibration chunks; return the better as a plan and
    the verdict. ``pins``: the writer's pins (as quantize() takes them), for the recipe's dry run."""
    recipe = nearest_recipe(scores, plan, imatrix, pins)
    planned = [(t.name, t.type) for t in plan.tensors if t.status != "kept"]
    kld_plan, kld_recipe = measure_mixes(plan.model, [planned, list(recipe.mix.items())], imatrix, cal, on_progress)
    if kld_recipe < kld_plan:
        return recipe_plan(scores, plan, recipe, pins), Verdict(
            recipe.name, recipe.bpw, kld_recipe, plan.bpw, kld_plan, recipe.name)
    return plan, Verdict(recipe.name, recipe.bpw, kld_recipe, plan.bpw, kld_plan, "llqx")
