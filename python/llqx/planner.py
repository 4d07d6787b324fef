"""The planner: a target (bpw or bytes) and the user's pins turned into one type per tensor.

``Scores`` holds each tensor's error curve (from the scorer, in the estimator's unit) and plans over it
with the optimizer. It asks for curves it lacks through ``CurveSource`` (window mode scores the low-bit
grid types only near a target) and never reaches into the scoring run itself.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from . import _core
from .budgets import Budgets, Constraints, Item, big_items, resolve
from .curves import CurveSource, TensorCurve
from .errors import LlqxError
from .llama_rules import CANDIDATES, grid_type_ids, resolve_pins, tensor_nbytes
from .metadata import meta_size, parse_kv_override
from .model import ModelInfo
from .optimizer import allocate_priced
from .plan import Plan, PlanTensor
from .request import BudgetSpec
from .state import ScoreState
from .types import ggml_type

log = logging.getLogger("llqx")

# window mode: plan over every type but the grid types more than this many bpw below the mean bpw the
# free tensors can spend; then add, per tensor, the grid types left out that could still win at the
# plan's price of a byte (see _widen). The width only sets how much is scored up front: a narrower first
# window scores less when the plan stays away from the bottom types and takes more rounds when it does not
WINDOW_BPW = 1.0


@dataclass
class Scores:
    """Error curves of every quantizable tensor of a model; plan() turns them into a plan.

    ``candidates`` holds every candidate type of each tensor (cheapest first) and ``curves`` the ones
    scored so far. With ``candidates="all"`` (see score()) every candidate is scored up front; with
    ``"window"`` plan() scores, per target, the types near it (and a lower grid type wherever one could
    win at the plan's price of a byte), so a target far from the low-bit types never pays for their grids.
    """

    model: ModelInfo
    curves: dict[str, TensorCurve]
    imatrix_label: str | None
    meta_size: int
    has_activations: bool
    candidates: dict[str, list[int]] = field(default_factory=dict)
    scorer: CurveSource | None = field(default=None, repr=False)  # set until score_all(): scores on demand
    _imatrix_kvs: list[_core.KvOverride] = field(default_factory=list, repr=False)
    # measured sensitivity (llqx.sensitivity): per tensor, the factor from the estimator's unit to KL
    # divergence; empty: the estimator's unit as it is
    factors: dict[str, float] = field(default_factory=dict)
    state: ScoreState | None = field(default=None, repr=False)  # the scorer's state (measurements kept there)
    _warned: bool = field(default=False, init=False, repr=False)
    _bpw: dict[str, list[float]] = field(default_factory=dict, init=False, repr=False)

    def pins(
        self,
        tensor_types: Iterable[tuple[str, str | int] | str] = (),
        output_tensor_type: str | int | None = None,
        token_embedding_type: str | int | None = None,
        leave_output_tensor: bool = False,
    ) -> dict[str, int]:
        """Types fixed by the user, resolved per tensor as llama.cpp would (llama_rules.resolve_pins)."""
        return resolve_pins(self.model, list(self.candidates), self.imatrix_label is not None, tensor_types,
                            output_tensor_type, token_embedding_type, leave_output_tensor)

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
            total += self._error(c, c.types.index(tid))
        return total

    def _error(self, c: TensorCurve, i: int) -> float:
        """A curve's error for its i-th type in a written file, in KL divergence once calibrate() set factors."""
        f = self.factors.get(c.name)
        return c.total(i) if f is None else c.local_total(i) * f

    def calibrate(self, factors: dict[str, float]) -> None:
        """Plan with measured sensitivities: every local error of a tensor times its group's factor, in KL
        divergence per unit of local error (see llqx.sensitivity)."""
        self.factors = dict(factors)

    def local_error_of(self, name: str, tid: int) -> float:
        """One scored (tensor, type)'s weight error in the tensor's local unit (estimator.local_error_divisors),
        before calibration and without the rounding of activations (what an in-memory probe measures);
        0: unknown."""
        c = self.curves[name]
        return c.local[c.types.index(tid)] if c.local else 0.0

    def ensure_scored(self, need: dict[str, list[int]]) -> None:
        """Score these (tensor, types) now if they are not yet (window mode or a deferred run)."""
        if self.scorer is not None:
            self.scorer.ensure(need)
            self.curves = self.scorer.curves()

    def check_target(self, target_bpw: float | None = None, target_size: int | None = None, **options: Any) -> None:
        """LlqxError for a target or budget no mix can reach under these pins, bounds and ties (plan()'s
        keyword options); needs no scores, so it runs before scoring."""
        self._resolve(target_bpw, target_size, **options)

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

    def _resolve(
        self,
        target_bpw: float | None,
        target_size: int | None,
        *,
        budgets: Mapping[str, int | str] | Iterable[BudgetSpec | str] = (),
        ties: Iterable[str] = (),
        min_types: Iterable[tuple[str, str | int] | str] = (),
        max_types: Iterable[tuple[str, str | int] | str] = (),
        **pins: Any,
    ) -> Budgets:
        """Pins, budget groups and optimizer items; LlqxError when a budget cannot be met."""
        cons = Constraints.of(budgets, ties, min_types, max_types)
        return resolve(
            self.model, self.candidates, self.pins(**pins), cons, target_bpw, target_size, self.meta_size,
            self.imatrix_label is not None,
        )

    def plan(
        self,
        target_bpw: float | None = None,
        target_size: int | None = None,
        *,
        tensor_types: Iterable[tuple[str, str | int] | str] = (),
        output_tensor_type: str | int | None = None,
        token_embedding_type: str | int | None = None,
        leave_output_tensor: bool = False,
        budgets: Mapping[str, int | str] | Iterable[BudgetSpec | str] = (),
        ties: Iterable[str] = (),
        min_types: Iterable[tuple[str, str | int] | str] = (),
        max_types: Iterable[tuple[str, str | int] | str] = (),
    ) -> Plan:
        """The lowest-error mix at or below target_bpw (llama.cpp's BPW) or target_size (whole file).

        Pins as in pins(); their bytes count in the budget. ``budgets`` ({regex: bytes, 'SIZE' or
        'Xbpw'}, in order): the tensors a regex matches first take their own budget of tensor bytes, and
        the target covers the rest (target_size: the rest of the file). ``ties``: regexes (or
        'moe-fused') whose matches within one layer get one type. ``min_types`` / ``max_types``:
        (regex, type) bounds, by the type's bytes on each tensor; pins win over them. See llqx.budgets.
        """
        b = self._resolve(
            target_bpw, target_size, tensor_types=tensor_types, output_tensor_type=output_tensor_type,
            token_embedding_type=token_embedding_type, leave_output_tensor=leave_output_tensor, budgets=budgets,
            ties=ties, min_types=min_types, max_types=max_types,
        )
        if self.imatrix_label is not None and not self.has_activations and not self._warned:
            self._warned = True  # said once, when the estimate is first used (after every check passed)
            log.warning("the imatrix has no activation sums (in_sum): scoring without the mean-activation term")
        plan, prices, sets = self._settle(b)
        for it in big_items(b, self.model):
            plan, prices, sets, b = self._try_big_item(it, b, plan, prices, sets)
        return plan

    def _settle(self, b: Budgets) -> tuple[Plan, list[float], dict[str, list[int]]]:
        """The optimizer's plan over every allowed type, or in window mode over the window once it settled;
        with each group's price of a byte and the types planned over."""
        allowed = b.allowed()
        if self.scorer is None:
            return (*self._plan_over(b, allowed), allowed)
        floors = self._window(b, allowed)
        for _ in range(len(CANDIDATES) + 2):
            sets = self._sets(b, allowed, floors)
            self._score_sets(sets, b.pins)
            plan, prices = self._plan_over(b, sets)
            if not self._widen(plan, prices, b, allowed, sets, floors):
                return plan, prices, sets
        raise LlqxError("internal error: the candidate window did not settle")

    def _try_big_item(
        self, it: Item, b: Budgets, plan: Plan, prices: list[float], sets: dict[str, list[int]]
    ) -> tuple[Plan, list[float], dict[str, list[int]], Budgets]:
        """Plan again with a big item fixed at each of its other types that the Lagrangian dual bound
        leaves a chance (docs/method.md, §6), and keep the lowest error. A type the window left out is
        bounded by the error of the cheapest i-quant planned (_floor_error) and scored only if that
        bound passes, so window mode searches what planning over every type would."""
        grp, g, name = b.groups[it.group], it.group, it.names[0]
        mu = prices[g]
        members = [i for i in b.items if i.group == g and i is not it]
        rest = sum(min(self._item_error(i, x) + mu * self._item_cost(b, i, x) for x in sets[i.names[0]])
                   for i in members)
        cheapest = grp.fixed + sum(min(self._item_cost(b, i, x) for x in i.types) for i in members)
        picked = plan.type_of(name)
        best = self._group_error(plan, [*members, it])

        def hopeless(err: float, cost: float) -> bool:  # no mix with this error and cost can beat the plan
            return err + rest - mu * (grp.budget - grp.fixed - cost) >= best

        for x in it.types:
            cost = self._item_cost(b, it, x)
            if x == picked or cheapest + cost > grp.budget:
                continue
            if x not in self.curves[name].types:
                floor = self._floor_error(it, sets[name], x)
                if floor is not None and hopeless(floor, cost):
                    continue
                self.ensure_scored({name: [x]})
            if hopeless(self._item_error(it, x), cost):
                continue
            fixed = replace(b, items=[replace(i, types=(x,)) if i is it else i for i in b.items])
            other, other_prices, other_sets = self._settle(fixed)
            if other.error < plan.error - 1e-12 * abs(plan.error):
                plan, prices, sets, b = other, other_prices, other_sets, fixed
                best = self._group_error(plan, [*members, it])
        return plan, prices, sets, b

    def _group_error(self, plan: Plan, items: list[Item]) -> float:
        picked = {t.name: t.type for t in plan.tensors}
        return sum(self._item_error(i, picked[i.names[0]]) for i in items)

    # ---- window mode ---------------------------------------------------------------------------

    def score_window(self, target_bpw: float | None = None, target_size: int | None = None, **options: Any) -> None:
        """Window mode: score now what plan() with these arguments scores first. Scoring reads each
        tensor whole, so a step that needs other types too (the sensitivities' probe types, which the
        window holds) finds them scored instead of reading every tensor again."""
        if self.scorer is None:
            return
        b = self._resolve(target_bpw, target_size, **options)
        allowed = b.allowed()
        self._score_sets(self._sets(b, allowed, self._window(b, allowed)), b.pins)

    def _bpw_of(self, name: str) -> dict[int, float]:
        bpw = self._bpw.get(name)
        if bpw is None:  # asked for every tensor in each step of the window search
            t = self.model.tensor(name)
            bpw = self._bpw[name] = {x: 8.0 * tensor_nbytes(x, t) / t.n_elements for x in self.candidates[name]}
        return bpw

    def _window(self, b: Budgets, allowed: dict[str, list[int]]) -> dict[str, float]:
        """Per free tensor, the bpw floor of the grid types to plan over first: per budget group,
        WINDOW_BPW below the mean bpw its free tensors can spend, lowered until its cheapest mix fits.
        Every other type is planned over whatever its bpw."""
        floors: dict[str, float] = {}
        for g, grp in enumerate(b.groups):
            items = [it for it in b.items if it.group == g]
            n_free = sum(self.model.tensor(n).n_elements for it in items for n in it.names)
            floor = 8.0 * (grp.budget - grp.fixed) / max(n_free, 1) - WINDOW_BPW
            while True:
                mine = {n: floor for it in items for n in it.names}
                sets = self._sets(b, allowed, mine, items)
                cheapest = grp.fixed + sum(self._item_cost(b, it, sets[it.names[0]][0]) for it in items)
                if cheapest <= grp.budget or all(sets[n] == allowed[n] for n in mine):
                    break
                floor -= 1.0
            floors.update(mine)
        return floors

    def _sets(
        self, b: Budgets, allowed: dict[str, list[int]], floors: dict[str, float], items: list[Item] | None = None
    ) -> dict[str, list[int]]:
        """The types planned over for grid-type floors: each item's allowed types but the grid types under
        the floor of any member (its top type when that leaves none; _widen then lowers the floor)."""
        lazy = grid_type_ids()
        out: dict[str, list[int]] = {}
        for it in b.items if items is None else items:
            types = allowed[it.names[0]]
            keep = [
                x for x in types if x not in lazy or all(self._bpw_of(n)[x] >= floors[n] for n in it.names)
            ] or types[-1:]
            out.update(dict.fromkeys(it.names, keep))
        return out

    def _score_sets(self, sets: dict[str, list[int]], pins: dict[str, int]) -> None:
        assert self.scorer is not None
        need = {name: list(types) for name, types in sets.items()}
        for name, tid in pins.items():
            if tid in self.candidates[name]:
                need[name] = [tid]  # for the error shown next to a pinned tensor
        self.scorer.ensure(need)
        self.curves = self.scorer.curves()

    def _widen(
        self,
        plan: Plan,
        prices: list[float],
        b: Budgets,
        allowed: dict[str, list[int]],
        sets: dict[str, list[int]],
        floors: dict[str, float],
    ) -> bool:
        """Lower an item's floor to its next grid type down while a grid type left out could beat its pick
        at its group's price of a byte (the optimizer's multiplier): the i-quants (grid types and IQ4_XS)
        lose accuracy with every bit they drop, so a type left out has at least the error of the cheapest
        i-quant planned over, and it could win only if that error at its own bytes priced below the pick.
        Without an i-quant to bound it by, lower the floor while the pick is the cheapest type planned."""
        grew = False
        lazy = grid_type_ids()
        picked = {t.name: t.type for t in plan.tensors}
        for it in b.items:
            first = it.names[0]
            if first not in floors:
                continue
            planned = sets[first]
            out = [x for x in allowed[first] if x in lazy and x not in planned]
            if not out:
                continue
            bpw = self._bpw_of(first)
            bound = self._cheapest_iquant(it, planned)
            if bound is not None:
                price = prices[it.group]
                now = self._item_error(it, picked[first]) + price * self._item_cost(b, it, picked[first])
                least = self._item_error(it, bound)  # the floor of every grid type below it (_floor_error)
                could = [x for x in out if bpw[x] < bpw[bound] and least + price * self._item_cost(b, it, x) < now]
            else:
                could = [max(out, key=lambda x: bpw[x])] if picked[first] == min(planned, key=lambda x: bpw[x]) else []
            if could:  # one type down: its measured error bounds the ones below it better
                step = max(out, key=lambda x: bpw[x])
                for n in it.names:
                    floors[n] = min(floors[n], self._bpw_of(n)[step])
                grew = True
        return grew

    def _floor_error(self, it: Item, planned: list[int], x: int) -> float | None:
        """A floor for the error of grid type x, which the window left out: the i-quants (the grid types and
        IQ4_XS) lose accuracy with every bit they drop, so x errs at least as much as the cheapest i-quant
        planned, if that one is above it; None otherwise."""
        bound = self._cheapest_iquant(it, planned)
        if x not in grid_type_ids() or bound is None:
            return None
        bpw = self._bpw_of(it.names[0])
        return self._item_error(it, bound) if bpw[x] < bpw[bound] else None

    def _cheapest_iquant(self, it: Item, planned: list[int]) -> int | None:
        bpw = self._bpw_of(it.names[0])
        ladder = [y for y in planned if y in grid_type_ids() or y == ggml_type("iq4_xs").id]
        return min(ladder, key=lambda y: bpw[y]) if ladder else None

    # an item's error and cost under one type, as _plan_over sums them for the optimizer (each member's
    # bytes padded on its own); the cost needs no score, so it also prices types not scored yet
    def _item_error(self, it: Item, x: int) -> float:
        return sum(self._error(self.curves[n], self.curves[n].types.index(x)) for n in it.names)

    def _item_cost(self, b: Budgets, it: Item, x: int) -> float:
        grp = b.groups[it.group]
        return float(sum(grp.cost(tensor_nbytes(x, self.model.tensor(n))) for n in it.names))

    # ---- the optimizer over chosen candidates ----------------------------------------------------

    def _plan_over(self, b: Budgets, sets: dict[str, list[int]]) -> tuple[Plan, list[float]]:
        """The optimizer's plan when each free tensor may take the candidates of its set: one item per
        tensor or tie group (its members' bytes and errors summed), one budget per group; and each group's
        price of a byte."""
        info = self.model
        curves: list[tuple[np.ndarray, np.ndarray]] = []
        options: list[list[dict[str, tuple[int, int, float]]]] = []  # per item and type: member -> pick
        for it in b.items:
            grp = b.groups[it.group]
            per_type: list[dict[str, tuple[int, int, float]]] = []
            for x in sets[it.names[0]]:
                picks = {}
                for n in it.names:
                    c = self.curves[n]
                    i = c.types.index(x)
                    picks[n] = (x, c.nbytes[i], self._error(c, i))
                per_type.append(picks)
            options.append(per_type)
            curves.append((
                np.array([sum(grp.cost(nb) for _, nb, _ in p.values()) for p in per_type], dtype=np.float64),
                np.array([sum(err for _, _, err in p.values()) for p in per_type], dtype=np.float64),
            ))
        chosen, prices = allocate_priced(
            curves, [g.budget - g.fixed for g in b.groups], [g.slack for g in b.groups], [it.group for it in b.items]
        )
        pick = {n: v for per_type, k in zip(options, chosen, strict=True) for n, v in per_type[k].items()}

        tensors: list[PlanTensor] = []
        for t in info.tensors:
            c = self.curves.get(t.name)
            if t.name not in self.candidates:
                tensors.append(PlanTensor(t.name, t.type, t.nbytes, t.n_elements, None, "kept"))
            elif t.name in b.pins:
                tid = b.pins[t.name]
                err = self._error(c, c.types.index(tid)) if c is not None and tid in c.types else None
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
            b.target_bpw,
            b.target_size,
            requantize,
            (8.0 * raw_lo / n_elements, 8.0 * raw_hi / n_elements),
        )
        plan.budgets = b.report(plan)  # checks every budget
        return plan, prices
