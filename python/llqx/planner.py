"""The planner: a target (bpw or bytes) and the user's pins turned into one type per tensor.

``Scores`` holds each tensor's error curve (from the scorer, in the estimator's unit) and plans over it
with the optimizer. It asks for curves it lacks through ``CurveSource`` (window mode scores the low-bit
grid types only near a target) and never reaches into the scoring run itself.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Protocol

import numpy as np

from . import _core
from .errors import LlqxError
from .llama_rules import CANDIDATES, TOKEN_EMBD, fallback_type, grid_type_ids, needs_imatrix, tensor_nbytes
from .metadata import meta_size, parse_kv_override
from .model import ModelInfo
from .optimizer import allocate
from .plan import Plan, PlanTensor, padded
from .types import ggml_type, parse_tensor_type

log = logging.getLogger("llqx")

# window mode: plan over every type but the grid types more than this many bpw below the mean bpw the
# free tensors can spend; then, per tensor, add the next grid type down while the pick is the cheapest
# type above the grid types left out (plans equal the full candidate set's on the test models and on
# Qwen2.5-Coder-1.5B over their whole bpw range)
WINDOW_BPW = 2.0

@dataclass
class TensorCurve:
    """Candidate types of one tensor with the bytes the writer will produce and their scored error."""

    name: str
    n_elements: int
    types: list[int]
    nbytes: list[int]
    errors: list[float]


class CurveSource(Protocol):
    """Scores (tensor, type) pairs on demand (the scorer): what the planner may ask for."""

    def ensure(self, need: dict[str, list[int]]) -> None:
        """Score whatever of ``need`` (tensor name -> candidate type ids) is not scored yet."""

    def curves(self) -> dict[str, TensorCurve]:
        """Every tensor's scored candidates, cheapest first, errors in the estimator's unit."""


@dataclass
class _Budget:
    """A target turned into bytes: what the free (optimized) tensors may spend, and the achievable range."""

    pins: dict[str, int]
    by_size: bool
    fixed: int  # cost of kept and pinned tensors
    budget: int  # cost the whole plan may have (tensor bytes, or file bytes less metadata)
    raw_range: tuple[int, int]  # tensor bytes of the cheapest and the largest mix
    slack: float

    def cost(self, nbytes: int) -> int:
        return padded(nbytes) if self.by_size else nbytes


@dataclass
class Scores:
    """Error curves of every quantizable tensor of a model; plan() turns them into a plan.

    ``candidates`` holds every candidate type of each tensor (cheapest first) and ``curves`` the ones
    scored so far. With ``candidates="all"`` (see score()) every candidate is scored up front; with
    ``"window"`` plan() scores, per target, the types near it (and more while any tensor's pick sits at
    the edge of what was scored), so a target far from the low-bit types never pays for their grids.
    """

    model: ModelInfo
    curves: dict[str, TensorCurve]
    imatrix_label: str | None
    meta_size: int
    has_activations: bool
    candidates: dict[str, list[int]] = field(default_factory=dict)
    scorer: CurveSource | None = field(default=None, repr=False)  # set until score_all(): scores on demand
    _imatrix_kvs: list[_core.KvOverride] = field(default_factory=list, repr=False)
    _warned: bool = field(default=False, init=False, repr=False)
    _bpw: dict[str, list[float]] = field(default_factory=dict, init=False, repr=False)

    def pins(
        self,
        tensor_types: Iterable[tuple[str, str | int] | str] = (),
        output_tensor_type: str | int | None = None,
        token_embedding_type: str | int | None = None,
        leave_output_tensor: bool = False,
    ) -> dict[str, int]:
        """Types fixed by the user, resolved per tensor as llama.cpp would (first matching pattern wins).

        ``tensor_types`` holds ``(pattern, type)`` pairs or ``"pattern=type"`` strings; with
        ``leave_output_tensor`` output.weight keeps the type it has.
        """
        pairs = [parse_tensor_type(x) if isinstance(x, str) else x for x in tensor_types]
        patterns = [(re.compile(p.lower()), ggml_type(tt).id) for p, tt in pairs]
        tied = all(t.name != "output.weight" for t in self.model.tensors)
        out: dict[str, int] = {}
        for name in self.candidates:
            t = self.model.tensor(name)
            chosen: int | None = None
            named = next((tt for rx, tt in patterns if rx.search(name)), None)
            if (
                token_embedding_type is not None
                and name in TOKEN_EMBD
                and not (name == "per_layer_token_embd.weight" and named is not None)
            ):
                chosen = ggml_type(token_embedding_type).id
            elif leave_output_tensor and name == "output.weight":
                out[name] = t.type
                continue
            elif output_tensor_type is not None and name == "output.weight":
                chosen = ggml_type(output_tensor_type).id
            elif named is not None:
                chosen = named
            elif output_tensor_type is not None and name == "token_embd.weight" and tied:
                chosen = ggml_type(output_tensor_type).id  # llama.cpp: a tied head's type is the output's
            if chosen is None:
                continue
            gt = ggml_type(chosen)
            if not gt.can_quantize:
                raise LlqxError(f"cannot pin {name} to {gt.name}: llama.cpp cannot write that type")
            chosen = fallback_type(chosen, t.n_per_row)
            if needs_imatrix(name, chosen) and self.imatrix_label is None:
                raise LlqxError(f"pinning {name} to {ggml_type(chosen).name} needs an imatrix")
            out[name] = chosen
        return out

    def mix_error(self, types: dict[str, int]) -> float | None:
        """The estimator's summed error of a type per tensor (any mix, e.g. a recipe's file); tensors
        without a curve (kept by llama.cpp) add nothing; None when a type was not scored for a tensor."""
        total = 0.0
        for name, tid in types.items():
            c = self.curves.get(name)
            if c is None:
                continue
            if tid not in c.types:
                return None
            total += c.errors[c.types.index(tid)]
        return total

    def check_target(self, target_bpw: float | None = None, target_size: int | None = None, **pins: Any) -> None:
        """LlqxError for a target no mix can reach with these pins (pins() takes them, as plan() does);
        needs no scores, so it runs before scoring."""
        if (target_bpw is None) == (target_size is None):
            raise LlqxError("give exactly one of target_bpw and target_size")
        self._budget(target_bpw, target_size, self.pins(**pins))

    def score_all(self) -> None:
        """Score every candidate of every tensor now (a no-op once done): plan() then scores nothing."""
        if self.scorer is None:
            return
        self.scorer.ensure(self.candidates)
        self.curves = self.scorer.curves()
        self.scorer = None

    def set_metadata(self, override_kv: Iterable[str] = (), ftype: int = 7) -> None:
        """Count these metadata overrides and this general.file_type in the file size (target_size)."""
        self.meta_size = meta_size(self.model.path, [*self._imatrix_kvs, *map(parse_kv_override, override_kv)], ftype)

    def _budget(self, target_bpw: float | None, target_size: int | None, pins: dict[str, int]) -> _Budget:
        """The byte budget of a target; LlqxError when no mix of the candidates reaches it."""
        info = self.model
        n_elements = info.n_elements
        by_size = target_size is not None

        def cost(nbytes: int) -> int:
            return padded(nbytes) if by_size else nbytes

        fixed = 0
        raw_fixed = 0
        for t in info.tensors:
            if t.name not in self.candidates or t.name in pins:
                nb = t.nbytes if t.name not in self.candidates else tensor_nbytes(pins[t.name], t)
                fixed += cost(nb)
                raw_fixed += nb
        free = [
            [tensor_nbytes(x, info.tensor(name)) for x in c]
            for name, c in self.candidates.items()
            if name not in pins
        ]
        raw_lo = raw_fixed + sum(min(nb) for nb in free)
        raw_hi = raw_fixed + sum(max(nb) for nb in free)
        lo = fixed + sum(min(cost(b) for b in nb) for nb in free)
        hi = fixed + sum(max(cost(b) for b in nb) for nb in free)
        if by_size:
            assert target_size is not None
            overhead = self.meta_size
            budget_total = int(target_size) - overhead

            def show(x: int) -> str:
                return f"{x + overhead:,} bytes ({(x + overhead) / 2**30:.4f} GiB)"

            target_text = f"{int(target_size):,} bytes"
        else:
            assert target_bpw is not None
            budget_total = int(Fraction(str(target_bpw)) * n_elements / 8)

            def show(x: int) -> str:
                return f"{8.0 * x / n_elements:.4f} bpw"

            target_text = f"{target_bpw} bpw"
        rng = f"achievable: {show(lo)} to {show(hi)}"
        if pins and fixed > budget_total:
            raise LlqxError(
                f"the pinned tensors and the tensors llama.cpp keeps take {show(fixed)} alone, more than "
                f"the target {target_text} ({rng})"
            )
        if budget_total < lo:
            raise LlqxError(f"target {target_text} is below the smallest achievable mix ({rng})")
        if budget_total > hi:
            raise LlqxError(f"target {target_text} is above the largest achievable mix ({rng})")
        # bytes that may stay unspent rather than bought with a worse error: a fraction of the tolerance
        slack = n_elements * 0.0005 / 8 if not by_size else int(target_size or 0) * 0.0002
        return _Budget(pins, by_size, fixed, budget_total, (raw_lo, raw_hi), slack)

    def plan(
        self,
        target_bpw: float | None = None,
        target_size: int | None = None,
        *,
        tensor_types: Iterable[tuple[str, str | int] | str] = (),
        output_tensor_type: str | int | None = None,
        token_embedding_type: str | int | None = None,
        leave_output_tensor: bool = False,
    ) -> Plan:
        """The lowest-error mix at or below target_bpw (llama.cpp's BPW) or target_size (whole file).

        Pins as in pins(); their bytes count in the budget."""
        if (target_bpw is None) == (target_size is None):
            raise LlqxError("give exactly one of target_bpw and target_size")
        pins = self.pins(tensor_types, output_tensor_type, token_embedding_type, leave_output_tensor)
        b = self._budget(target_bpw, target_size, pins)
        if self.imatrix_label is not None and not self.has_activations and not self._warned:
            self._warned = True  # said once, when the estimate is first used (after every check passed)
            log.warning("the imatrix has no activation sums (in_sum): scoring without the mean-activation term")
        if self.scorer is None:
            sets = {name: c for name, c in self.candidates.items() if name not in pins}
            return self._plan_over(b, sets, target_bpw, target_size)
        floors = self._window(b)
        for _ in range(len(CANDIDATES) + 2):
            sets = {name: self._set(name, f) for name, f in floors.items()}
            self._score_sets(sets, pins)
            plan = self._plan_over(b, sets, target_bpw, target_size)
            if not self._widen(plan, floors):
                return plan
        raise LlqxError("internal error: the candidate window did not settle")

    # ---- window mode ---------------------------------------------------------------------------

    def _bpw_of(self, name: str) -> list[float]:
        bpw = self._bpw.get(name)
        if bpw is None:  # asked for every tensor in each step of the window search
            t = self.model.tensor(name)
            bpw = self._bpw[name] = [8.0 * tensor_nbytes(x, t) / t.n_elements for x in self.candidates[name]]
        return bpw

    def _window(self, b: _Budget) -> dict[str, float]:
        """Per free tensor, the bpw floor of the grid types (_lazy_ids) to plan over first: WINDOW_BPW
        below the mean bpw the free tensors can spend, lowered until the cheapest mix fits the budget.
        Every other type is planned over whatever its bpw."""
        free = [name for name in self.candidates if name not in b.pins]
        n_free = sum(self.model.tensor(name).n_elements for name in free)
        floor = 8.0 * (b.budget - b.fixed) / max(n_free, 1) - WINDOW_BPW
        while True:
            floors = dict.fromkeys(free, floor)
            cheapest = b.fixed + sum(
                b.cost(tensor_nbytes(self._set(name, floor)[0], self.model.tensor(name))) for name in free
            )
            if cheapest <= b.budget or all(self._set(n, floor) == self.candidates[n] for n in free):
                return floors
            floor -= 1.0

    def _set(self, name: str, floor: float) -> list[int]:
        """The candidates planned over for a grid-type floor: every type but the grid types under it."""
        lazy = grid_type_ids()
        return [
            x
            for x, bpw in zip(self.candidates[name], self._bpw_of(name), strict=True)
            if bpw >= floor or x not in lazy
        ]

    def _score_sets(self, sets: dict[str, list[int]], pins: dict[str, int]) -> None:
        assert self.scorer is not None
        need = {name: list(types) for name, types in sets.items()}
        for name, tid in pins.items():
            if tid in self.candidates[name]:
                need[name] = [tid]  # for the error shown next to a pinned tensor
        self.scorer.ensure(need)
        self.curves = self.scorer.curves()

    def _widen(self, plan: Plan, floors: dict[str, float]) -> bool:
        """Lower a tensor's floor to its next grid type when its pick is the cheapest of the types above
        the highest grid type left out (all of them are planned over), or under it: a pick above the
        cheapest of them is bracketed by scored types, but at the bottom an unscored grid type could be
        the better pick."""
        grew = False
        lazy = grid_type_ids()
        for pt in plan.tensors:
            if pt.name not in floors:
                continue
            bpw = dict(zip(self.candidates[pt.name], self._bpw_of(pt.name), strict=True))
            excluded = [v for x, v in bpw.items() if x in lazy and v < floors[pt.name]]
            if not excluded:
                continue
            top = max(excluded)
            covered = [v for v in bpw.values() if v > top]
            if not covered or bpw[pt.type] <= min(covered):
                floors[pt.name] = top
                grew = True
        return grew

    # ---- the optimizer over chosen candidates ----------------------------------------------------

    def _plan_over(
        self,
        b: _Budget,
        sets: dict[str, list[int]],
        target_bpw: float | None,
        target_size: int | None,
    ) -> Plan:
        """The optimizer's plan when each free tensor may take the candidates of its set."""
        info = self.model
        free = [name for name in self.candidates if name not in b.pins]
        points: list[tuple[list[int], list[int], list[float]]] = []
        for name in free:
            c = self.curves[name]
            types = sets[name]
            idx = [c.types.index(x) for x in types]
            points.append((types, [c.nbytes[i] for i in idx], [c.errors[i] for i in idx]))
        curves = [
            (np.array([b.cost(x) for x in nb], dtype=np.float64), np.array(err, dtype=np.float64))
            for _, nb, err in points
        ]
        chosen = allocate(curves, b.budget - b.fixed, b.slack)
        pick = {name: (p[0][i], p[1][i], p[2][i]) for name, p, i in zip(free, points, chosen, strict=True)}

        tensors: list[PlanTensor] = []
        for t in info.tensors:
            c = self.curves.get(t.name)
            if t.name not in self.candidates:
                tensors.append(PlanTensor(t.name, t.type, t.nbytes, t.n_elements, None, "kept"))
            elif t.name in b.pins:
                tid = b.pins[t.name]
                err = c.errors[c.types.index(tid)] if c is not None and tid in c.types else None
                tensors.append(PlanTensor(t.name, tid, tensor_nbytes(tid, t), t.n_elements, err, "pinned"))
            else:
                tid, nb, err = pick[t.name]
                tensors.append(PlanTensor(t.name, tid, nb, t.n_elements, err, "optimized"))
        requantize = any(ggml_type(t.type).is_quantized for t in info.tensors if t.name in self.candidates)
        n_elements = info.n_elements
        raw_lo, raw_hi = b.raw_range
        plan = Plan(
            info.path,
            tensors,
            self.meta_size,
            self.imatrix_label,
            target_bpw,
            None if target_size is None else int(target_size),
            requantize,
            (8.0 * raw_lo / n_elements, 8.0 * raw_hi / n_elements),
        )
        if not b.by_size:
            if plan.tensor_bytes > b.budget:
                raise LlqxError("internal error: plan exceeds its budget")
        elif plan.file_size > int(target_size or 0):
            raise LlqxError("internal error: plan exceeds its file size budget")
        return plan
