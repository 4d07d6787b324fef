"""Budgets people actually have: several budgets in one plan, tie groups and type bounds.

Turns the planner's constraints into what the optimizer takes, with no scores needed:

- every tensor in one budget group: the first ``--budget`` whose regex matches its name, else the
  target's (``--target-bpw`` over those tensors' own elements, or ``--target-size``: the rest of the
  file, metadata and padding included);
- the types each free tensor may take (``--min-type`` / ``--max-type``, compared by the bytes the type
  has on that tensor; pins win over bounds);
- the optimizer's items: a tensor, or a tie group (tensors of one layer matching one ``--tie``
  pattern) whose curve is the sum of its members' over the types valid for every member.

``resolve`` checks that every budget can be met, so a bad command fails before scoring, naming the
budget and the range it can have. Groups share nothing once tensors are assigned, so the optimizer
runs one Lagrangian per group (``optimizer.allocate`` with group ids).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from fractions import Fraction

from .errors import LlqxError
from .llama_rules import fallback_type, needs_imatrix, tensor_nbytes
from .model import ModelInfo, TensorInfo
from .plan import BudgetUse, Plan, layer_of, padded
from .request import BudgetSpec, budget_spec, parse_budget, parse_tie, parse_type_bound
from .types import ggml_type

# bytes a budget may leave unspent rather than buy with a worse error: a fraction of the tolerance it is
# met within (0.002 bpw, 0.1 % of its bytes)
BPW_SLACK = 0.0005
SIZE_SLACK = 0.0002
# items too big for the optimizer's price of a byte (big_items): a tensor with at least this share of its
# group's free elements, at most BIG_ITEMS of them
BIG_SHARE = 0.05
BIG_ITEMS = 2


@dataclass(frozen=True)
class Constraints:
    """The budgets, ties and bounds of one plan, parsed (first match wins in each list)."""

    budgets: tuple[BudgetSpec, ...] = ()
    ties: tuple[str, ...] = ()
    min_types: tuple[tuple[str, int], ...] = ()
    max_types: tuple[tuple[str, int], ...] = ()

    @classmethod
    def of(
        cls,
        budgets: Mapping[str, int | str] | Iterable[BudgetSpec | str] = (),
        ties: Iterable[str] = (),
        min_types: Iterable[tuple[str, str | int] | str] = (),
        max_types: Iterable[tuple[str, str | int] | str] = (),
    ) -> Constraints:
        """From the API's forms: budgets as {regex: bytes | 'SIZE' | 'Xbpw'} (in order), BudgetSpecs or
        'REGEX=SIZE' strings; ties as regexes or preset names ('moe-fused'); bounds as (regex, type) or
        'regex=type'."""
        specs = (
            [budget_spec(p, v) for p, v in budgets.items()] if isinstance(budgets, Mapping)
            else [parse_budget(b) if isinstance(b, str) else b for b in budgets]
        )

        def bounds(pairs: Iterable[tuple[str, str | int] | str], option: str) -> tuple[tuple[str, int], ...]:
            return tuple(parse_type_bound(x if isinstance(x, str) else f"{x[0]}={ggml_type(x[1]).name}", option)
                         for x in pairs)

        return cls(tuple(specs), tuple(parse_tie(t) for t in ties), bounds(min_types, "--min-type"),
                   bounds(max_types, "--max-type"))


@dataclass(frozen=True)
class Item:
    """One optimizer item: a tensor, or the members of a tie group; ``types`` valid for every member."""

    names: tuple[str, ...]
    types: tuple[int, ...]
    group: int


@dataclass
class Group:
    """One budget: its tensors (kept and pinned ones are fixed costs) and the cost they may have."""

    spec: BudgetSpec | None  # None: the tensors no --budget matches, under the target
    names: list[str]
    n_elements: int
    whole_file: bool  # the target size: costs are bytes padded to the alignment, the budget the file's
    budget: int  # what the group's tensors may cost in all (fixed ones included)
    fixed: int
    slack: float  # bytes that may stay unspent rather than bought with a worse error
    lo: int  # cost of the cheapest mix
    hi: int  # cost of the largest mix
    pad: int  # the most padding its tensors can add to the file

    def cost(self, nbytes: int) -> int:
        return padded(nbytes) if self.whole_file else nbytes


@dataclass
class Budgets:
    """A plan's constraints resolved against a model: pins, groups and optimizer items."""

    pins: dict[str, int]  # the user's pins, spread over the tie groups of pinned tensors
    groups: list[Group]
    items: list[Item]
    raw_range: tuple[int, int]  # tensor bytes of the cheapest and the largest mix (every tensor)
    target_bpw: float | None
    target_size: int | None

    def allowed(self) -> dict[str, list[int]]:
        """Each free tensor's types (bounds and ties applied), cheapest first."""
        return {name: list(it.types) for it in self.items for name in it.names}

    def report(self, plan: Plan) -> list[BudgetUse]:
        """What the plan spends on every budget; LlqxError (internal) when one is exceeded."""
        by_name = {t.name: t for t in plan.tensors}
        out: list[BudgetUse] = []
        for g in self.groups:
            tensor_bytes = sum(by_name[n].nbytes for n in g.names)
            spec = g.spec
            if g.whole_file:
                use = BudgetUse(None, None, self.target_size, tensor_bytes, g.n_elements, len(g.names),
                                plan.file_size)
            elif spec is not None:
                use = BudgetUse(spec.pattern, spec.bpw, spec.size, tensor_bytes, g.n_elements, len(g.names))
            else:
                use = BudgetUse(None, self.target_bpw, None, tensor_bytes, g.n_elements, len(g.names))
            limit = use.target_bytes if use.target_bytes is not None else g.budget
            if use.got > limit:
                raise LlqxError(f"internal error: plan exceeds its budget ({use.got:,} > {limit:,} bytes)")
            out.append(use)
        return out


def resolve(
    model: ModelInfo,
    candidates: dict[str, list[int]],
    pins: dict[str, int],
    cons: Constraints,
    target_bpw: float | None,
    target_size: int | None,
    meta_size: int,
    has_imatrix: bool,
) -> Budgets:
    """Groups, allowed types and items of a plan; LlqxError for a budget that cannot be met."""
    if target_bpw is not None and target_size is not None:
        raise LlqxError("give at most one of target_bpw and target_size")
    if target_bpw is None and target_size is None and not cons.budgets:
        raise LlqxError("give target_bpw, target_size or budgets")
    target_size = None if target_size is None else int(target_size)
    group_of = _assign(model, cons.budgets, target_bpw, target_size)
    tensor = {t.name: t for t in model.tensors}.__getitem__  # model.tensor() scans: asked for here per type
    ties = _ties(candidates, cons.ties)
    pins = _spread_pins(tensor, pins, ties, has_imatrix)
    allowed = _bounded(tensor, candidates, pins, cons)
    items = _items(candidates, pins, allowed, ties, group_of)
    # the target's group: the tensors no --budget matches (_assign: a target exactly when there are some),
    # or with --target-size the file's metadata and padding at least
    n_groups = len(cons.budgets) + (target_bpw is not None or target_size is not None)
    groups: list[Group] = []
    raw_lo = raw_hi = 0
    for g in range(n_groups):
        spec = cons.budgets[g] if g < len(cons.budgets) else None
        names = [t.name for t in model.tensors if group_of.get(t.name) == g]
        whole_file = spec is None and target_size is not None
        grp = Group(spec, names, sum(tensor(n).n_elements for n in names), whole_file, 0, 0, 0.0, 0, 0, 0)
        for name in names:
            if name not in candidates or name in pins:
                t = tensor(name)
                nb = t.nbytes if name not in candidates else tensor_nbytes(pins[name], t)
                grp.fixed += grp.cost(nb)
                grp.pad += padded(nb) - nb
                raw_lo, raw_hi = raw_lo + nb, raw_hi + nb
        grp.lo = grp.hi = grp.fixed
        for it in items:
            if it.group != g:
                continue
            nbs = [[tensor_nbytes(x, tensor(n)) for n in it.names] for x in it.types]
            raw = [sum(bs) for bs in nbs]
            cost = [sum(grp.cost(b) for b in bs) for bs in nbs]
            grp.lo, grp.hi = grp.lo + min(cost), grp.hi + max(cost)
            grp.pad += max(sum(padded(b) - b for b in bs) for bs in nbs)
            raw_lo, raw_hi = raw_lo + min(raw), raw_hi + max(raw)
        groups.append(grp)
    for g, grp in enumerate(groups):  # the budget groups first: a target size takes what they leave
        _check(grp, groups[:g], any(n in pins for n in grp.names), target_bpw, target_size, meta_size)
    return Budgets(pins, groups, items, (raw_lo, raw_hi), target_bpw, target_size)


def big_items(b: Budgets, model: ModelInfo) -> list[Item]:
    """The optimizer items too big for its price of a byte: single tensors holding at least BIG_SHARE of
    the elements their group's free tensors hold (a small model's token embedding and head), at most
    BIG_ITEMS, largest first. The planner also tries each at its other types (docs/method.md, §6)."""
    n_elements = {t.name: t.n_elements for t in model.tensors}  # model.tensor() scans
    size = {it: sum(n_elements[n] for n in it.names) for it in b.items}
    free = [sum(size[it] for it in b.items if it.group == g) for g in range(len(b.groups))]
    big = [it for it in b.items if len(it.names) == 1 and size[it] >= BIG_SHARE * free[it.group]]
    return sorted(big, key=lambda it: (-size[it], it.names[0]))[:BIG_ITEMS]


def _assign(
    model: ModelInfo, specs: tuple[BudgetSpec, ...], target_bpw: float | None, target_size: int | None
) -> dict[str, int]:
    """Every tensor's group: the first --budget matching its name, else the target's (index len(specs))."""
    rx = [re.compile(s.pattern) for s in specs]
    group_of = {t.name: next((i for i, r in enumerate(rx) if r.search(t.name)), len(specs)) for t in model.tensors}
    for i, s in enumerate(specs):
        if i not in group_of.values():
            taken = any(rx[i].search(t.name) for t in model.tensors)
            why = " an earlier --budget does not take" if taken else ""
            raise LlqxError(f"--budget '{s.pattern}' matches no tensor{why}")
    rest = [n for n, g in group_of.items() if g == len(specs)]
    if rest and target_bpw is None and target_size is None:
        raise LlqxError(f"{len(rest)} tensors match no --budget (e.g. {rest[0]}): give --target-bpw or "
                        "--target-size for them")
    if not rest and target_bpw is not None:
        raise LlqxError("--target-bpw has no tensors left (every tensor matches a --budget): drop it, or give "
                        "--target-size for the whole file")
    return group_of


def _ties(candidates: dict[str, list[int]], patterns: tuple[str, ...]) -> list[tuple[str, list[str]]]:
    """Tie groups (pattern, members in file order): quantizable tensors of one layer matching one pattern
    (a tensor joins the first pattern it matches); groups of one tensor are no ties."""
    rx = [re.compile(p) for p in patterns]
    found: dict[tuple[int, str], list[str]] = {}
    for name in candidates:
        i = next((i for i, r in enumerate(rx) if r.search(name)), None)
        if i is not None:
            found.setdefault((i, layer_of(name)), []).append(name)
    return [(patterns[i], members) for (i, _), members in found.items() if len(members) > 1]


def _spread_pins(
    tensor: Callable[[str], TensorInfo], pins: dict[str, int], ties: list[tuple[str, list[str]]], has_imatrix: bool
) -> dict[str, int]:
    """A pin on one member of a tie group pins the whole group to its type (a tie promises one type)."""
    out = dict(pins)
    for pattern, members in ties:
        pinned = {m: pins[m] for m in members if m in pins}
        if not pinned:
            continue
        first, tid = next(iter(pinned.items()))
        for m, other in pinned.items():
            if other != tid:
                raise LlqxError(f"--tie '{pattern}': {first} and {m} are pinned to different types "
                                f"({ggml_type(tid).name}, {ggml_type(other).name})")
        for m in members:
            if m in pinned:
                continue
            t = tensor(m)
            if fallback_type(tid, t.n_per_row) != tid or (needs_imatrix(m, tid) and not has_imatrix):
                raise LlqxError(f"--tie '{pattern}': {m} cannot take {ggml_type(tid).name}, the type {first} "
                                "is pinned to")
            out[m] = tid
    return out


def _bounded(
    tensor: Callable[[str], TensorInfo], candidates: dict[str, list[int]], pins: dict[str, int], cons: Constraints
) -> dict[str, list[int]]:
    """Each free tensor's candidates within its first matching --min-type and --max-type, compared by the
    bytes each type has on that tensor (as llama.cpp writes it there: width fallback included)."""
    lows = [(re.compile(p), tid) for p, tid in cons.min_types]
    highs = [(re.compile(p), tid) for p, tid in cons.max_types]
    out: dict[str, list[int]] = {}
    for name, cands in candidates.items():
        if name in pins:
            continue
        t = tensor(name)
        lo = next((tid for r, tid in lows if r.search(name)), None)
        hi = next((tid for r, tid in highs if r.search(name)), None)
        lo_nb = None if lo is None else _nbytes_as(lo, t)
        hi_nb = None if hi is None else _nbytes_as(hi, t)
        keep = [
            x for x in cands
            if (lo_nb is None or _nbytes_as(x, t) >= lo_nb) and (hi_nb is None or _nbytes_as(x, t) <= hi_nb)
        ]
        if not keep:
            bounds = " and ".join(
                f"{opt} {ggml_type(tid).name}" for opt, tid in (("--min-type", lo), ("--max-type", hi))
                if tid is not None
            )
            raise LlqxError(f"{name}: no candidate type within {bounds}")
        out[name] = keep
    return out


def _nbytes_as(type_id: int, t: TensorInfo) -> int:
    """The bytes of a type on a tensor as llama.cpp writes it there (width fallback included)."""
    return tensor_nbytes(fallback_type(type_id, t.n_per_row), t)


def _items(
    candidates: dict[str, list[int]],
    pins: dict[str, int],
    allowed: dict[str, list[int]],
    ties: list[tuple[str, list[str]]],
    group_of: dict[str, int],
) -> list[Item]:
    """The optimizer's items in file order: free tensors, tie groups as one item of their common types."""
    tie_of = {m: (pattern, members) for pattern, members in ties for m in members}
    items: list[Item] = []
    for name in candidates:
        if name in pins:
            continue
        pattern, members = tie_of.get(name, ("", [name]))
        if name != members[0]:
            continue
        for m in members[1:]:
            if group_of[m] != group_of[name]:
                raise LlqxError(f"--tie '{pattern}' ties {name} to {m}, which fall under different budgets: "
                                "tied tensors must share one")
        types = [x for x in allowed[name] if all(x in allowed[m] for m in members)]
        if not types:
            raise LlqxError(f"--tie '{pattern}': {', '.join(members)} have no candidate type in common"
                            " (within their --min-type/--max-type)")
        items.append(Item(tuple(members), tuple(types), group_of[name]))
    return items


def _check(
    grp: Group,
    before: list[Group],
    pinned: bool,
    target_bpw: float | None,
    target_size: int | None,
    meta_size: int,
) -> None:
    """Set the group's budget and slack; LlqxError, naming the budget and its achievable range, when no
    mix reaches it. ``pinned``: the group holds pinned tensors."""
    spec = grp.spec
    if grp.whole_file:
        assert target_size is not None
        # the budget groups count tensor bytes; their padding (under alignment bytes a tensor, none for
        # usual shapes) is the file's: reserved at its largest, so that the groups stay independent
        overhead = meta_size + sum(b.budget + b.pad for b in before)
        grp.budget = target_size - overhead
        grp.slack = target_size * SIZE_SLACK

        def show(x: int) -> str:
            return f"{x + overhead:,} bytes ({(x + overhead) / 2**30:.4f} GiB)"

        subject = f"target {target_size:,} bytes"
        scope = " with the --budget groups' bytes" if before else ""
    elif spec is not None and spec.size is not None:
        grp.budget = spec.size
        grp.slack = spec.size * SIZE_SLACK

        def show(x: int) -> str:
            return f"{x:,} bytes ({x / 2**20:.2f} MiB)"

        subject = f"budget '{spec.pattern}' ({spec.value})"
        scope = f" of its {len(grp.names)} tensors"
    else:
        bpw = spec.bpw if spec is not None else target_bpw
        assert bpw is not None
        n = grp.n_elements
        grp.budget = int(Fraction(str(bpw)) * n / 8)
        grp.slack = n * BPW_SLACK / 8

        def show(x: int) -> str:
            return f"{8.0 * x / n:.4f} bpw"

        subject = f"budget '{spec.pattern}' ({spec.value})" if spec is not None else f"target {bpw} bpw"
        scope = f" of its {len(grp.names)} tensors" if spec is not None else (
            f" of the {len(grp.names)} tensors no --budget matches" if before else "")
    rng = f"achievable: {show(grp.lo)} to {show(grp.hi)}"
    if pinned and grp.fixed > grp.budget:
        raise LlqxError(
            f"the pinned tensors and the tensors llama.cpp keeps take {show(grp.fixed)} alone, more than "
            f"the {subject}{scope} ({rng})"
        )
    if grp.budget < grp.lo:
        raise LlqxError(f"{subject} is below the smallest achievable mix{scope} ({rng})")
    if grp.budget > grp.hi:
        raise LlqxError(f"{subject} is above the largest achievable mix{scope} ({rng})")
