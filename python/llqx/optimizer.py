"""Byte allocation over per-tensor error curves: Pareto set, lower convex hull, Lagrangian bisection
and greedy fill (docs/method.md, optimizer). Pure numpy, deterministic."""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import numpy as np

PAIR_MOVES = 800  # the moves with the smallest byte change that the pair search combines


def pareto_front(cost: np.ndarray, error: np.ndarray) -> np.ndarray:
    """Indices of the points that have strictly lower error than every cheaper point, by cost."""
    order = np.lexsort((error, cost))
    keep: list[int] = []
    best = np.inf
    for i in order:
        if error[i] < best:
            if keep and cost[keep[-1]] == cost[i]:
                continue  # same cost, higher error than the one already kept
            keep.append(int(i))
            best = float(error[i])
    return np.array(keep, dtype=np.int64)


def lower_hull(cost: np.ndarray, error: np.ndarray, front: np.ndarray) -> np.ndarray:
    """The lower convex hull of a Pareto front (indices, by cost): slopes grow less steep along it."""
    hull: list[int] = []
    for i in front:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b when it lies on or above the segment a -> i
            cross = (cost[b] - cost[a]) * (error[i] - error[a]) - (error[b] - error[a]) * (cost[i] - cost[a])
            if cross <= 0:
                hull.pop()
            else:
                break
        hull.append(int(i))
    return np.array(hull, dtype=np.int64)


def allocate(
    curves: Sequence[tuple[np.ndarray, np.ndarray]],
    budget: float | Sequence[float],
    slack: float | Sequence[float] = 0.0,
    groups: Sequence[int] | None = None,
) -> list[int]:
    """Pick one point per curve (cost, error arrays) with total cost ≤ budget and low total error.

    ``slack``: bytes that may stay unspent rather than spent on moves that do not lower the error.
    With ``groups`` (a group id per curve, 0 to len(budget) - 1), ``budget`` and ``slack`` hold one value
    per group and the curves of each group share its budget: the groups share nothing else, so one
    Lagrangian per group, and the rest of the search, find the whole allocation.
    Returns the chosen index into each curve's arrays. The caller checks feasibility first
    (the sum of each curve's minimum cost must fit).
    """
    return allocate_priced(curves, budget, slack, groups)[0]


def allocate_priced(
    curves: Sequence[tuple[np.ndarray, np.ndarray]],
    budget: float | Sequence[float],
    slack: float | Sequence[float] = 0.0,
    groups: Sequence[int] | None = None,
) -> tuple[list[int], list[float]]:
    """allocate(), and per group the price of a byte its Lagrangian settled on (the smallest multiplier
    whose picks fit; 0 when every curve's best point fits): a point not on the curves would join the
    plan only if its error plus price times cost is below the chosen point's."""
    if groups is None:
        groups = [0] * len(curves)
    budgets = [float(x) for x in budget] if isinstance(budget, Sequence) else [float(budget)]
    slacks = [float(x) for x in slack] if isinstance(slack, Sequence) else [float(slack)] * len(budgets)
    if len(groups) != len(curves) or len(slacks) != len(budgets) or any(not 0 <= g < len(budgets) for g in groups):
        raise ValueError("allocate: one group id per curve, one budget and slack per group")
    chosen = [0] * len(curves)
    prices: list[float] = []
    for g, (b, s) in enumerate(zip(budgets, slacks, strict=True)):
        members = [i for i, x in enumerate(groups) if x == g]
        picks, price = _allocate_group([curves[i] for i in members], b, s)
        for i, k in zip(members, picks, strict=True):
            chosen[i] = k
        prices.append(price)
    return chosen, prices


def _allocate_group(
    curves: Sequence[tuple[np.ndarray, np.ndarray]], budget: float, slack: float
) -> tuple[list[int], float]:
    """allocate_priced() for curves that share one budget."""
    n = len(curves)
    if n == 0:
        return [], 0.0
    fronts = [pareto_front(c, e) for c, e in curves]
    hulls = [lower_hull(c, e, f) for (c, e), f in zip(curves, fronts, strict=True)]
    width = max(len(h) for h in hulls)
    hc = np.full((n, width), np.inf)
    he = np.full((n, width), np.inf)
    for t, ((c, e), h) in enumerate(zip(curves, hulls, strict=True)):
        hc[t, : len(h)] = c[h]
        he[t, : len(h)] = e[h]
    rows = np.arange(n)

    def choose(mu: float) -> np.ndarray:
        obj = np.where(
            np.isfinite(hc),
            np.where(np.isfinite(he), he, 0.0) + mu * np.where(np.isfinite(hc), hc, 0.0),
            np.inf,
        )
        return np.argmin(obj, axis=1)

    def total(pos: np.ndarray) -> float:
        return float(hc[rows, pos].sum())

    # 1. Lagrangian relaxation: the smallest multiplier whose solution fits
    pos = choose(0.0)
    price = 0.0
    if total(pos) > budget:
        slopes = [0.0]
        for t in range(n):
            k = len(hulls[t])
            if k > 1:
                dc = np.diff(hc[t, :k])
                de = -np.diff(he[t, :k])
                slopes.append(float(np.max(de / dc)))
        hi = max(slopes) * 2.0 + 1e-300  # above every slope: each tensor takes its cheapest point
        lo = 0.0
        for _ in range(200):
            mid = hi / 1024.0 if lo == 0.0 else float(np.sqrt(lo * hi))
            if total(choose(mid)) <= budget:
                hi = mid
            else:
                lo = mid
            if lo > 0.0 and hi <= lo * (1.0 + 1e-12):
                break
        pos = choose(hi)
        price = hi

    # 2. greedy fill along the hulls: best error drop per byte first, while it fits
    left = budget - total(pos)
    heap: list[tuple[float, int, int]] = []

    def push(t: int) -> None:
        k = int(pos[t])
        if k + 1 < len(hulls[t]):
            dc = hc[t, k + 1] - hc[t, k]
            de = he[t, k] - he[t, k + 1]
            heapq.heappush(heap, (-de / dc, t, k + 1))

    for t in range(n):
        push(t)
    while heap:
        _, t, k = heapq.heappop(heap)
        dc = hc[t, k] - hc[t, k - 1]
        if dc <= left:
            pos[t] = k
            left -= dc
            push(t)

    chosen = [int(hulls[t][pos[t]]) for t in range(n)]

    # 3. local search: single moves and pairs of moves (one tensor down, another up) that lower the
    #    error and fit; 4. then, only while more than `slack` bytes are left, the least harmful moves
    #    that spend bytes, so the plan lands on the target (a source already on a quantization grid can
    #    make bigger types no better, leaving no improving move to spend them on)
    width = max(len(c) for c, _ in curves)
    ac = np.full((n, width), np.inf)
    ae = np.full((n, width), np.inf)
    for t, (c, e) in enumerate(curves):
        ac[t, : len(c)] = c
        ae[t, : len(e)] = e
    cur = np.array(chosen)
    valid_all = np.isfinite(ac)
    # the phases stay apart: a padding move undone by an "improving" one would cycle
    for padding in (False, True):
        if padding and left > slack:
            spent, changes = _land_on_budget(ac, ae, cur, rows, left, slack)
            left -= spent
            for t, k in changes:
                cur[t] = k
        for _ in range(20 * n):
            if padding and left <= slack:
                break
            move = _best_move(ac, ae, valid_all, cur, rows, left, padding)
            if move is None:
                break
            spent, changes = move
            left -= spent
            for t, k in changes:
                cur[t] = k
    return [int(x) for x in cur], price


def _best_move(
    ac: np.ndarray,
    ae: np.ndarray,
    valid: np.ndarray,
    cur: np.ndarray,
    rows: np.ndarray,
    left: float,
    padding: bool,
) -> tuple[float, list[tuple[int, int]]] | None:
    """The best single move or pair of moves that fits in `left` bytes: lowest error change, which must be
    negative unless padding (then it must spend bytes). Ties: the larger byte change, then the lower index."""
    cc = ac[rows, cur]
    ce = ae[rows, cur]
    dc = np.where(valid, ac - cc[:, None], 0.0)
    de = np.where(valid, ae - ce[:, None], np.inf)
    ok1 = valid & (dc != 0) & (dc <= left) & ((dc > 0) if padding else (de < 0))
    best: tuple[float, float, list[tuple[int, int]]] | None = None
    if ok1.any():
        key = np.where(ok1, de, np.inf)
        t, k = np.unravel_index(int(np.argmin(key)), key.shape)
        best = (float(key[t, k]), float(dc[t, k]), [(int(t), int(k))])
    ts, ks = np.nonzero(valid & (dc != 0))
    if len(ts) >= 2:
        mdc, mde = dc[ts, ks], de[ts, ks]
        order = np.argsort(np.abs(mdc), kind="stable")[:PAIR_MOVES]
        if padding:
            # landing on the budget may take undoing a big downgrade while making a small one: add the
            # smallest upgrades and downgrades of every size class
            up = np.nonzero(mdc > 0)[0]
            down = np.nonzero(mdc < 0)[0]
            up = up[np.argsort(mdc[up], kind="stable")[:PAIR_MOVES]]
            down = down[np.argsort(-mdc[down], kind="stable")[:PAIR_MOVES]]
            order = np.unique(np.concatenate([order, up, down]))
        ts, ks, mdc, mde = ts[order], ks[order], mdc[order], mde[order]
        net = mdc[:, None] + mdc[None, :]
        err = mde[:, None] + mde[None, :]
        ok = (ts[:, None] != ts[None, :]) & (net <= left) & ((net > 0) if padding else (err < -1e-15))
        if ok.any():
            key = np.where(ok, err, np.inf)
            i, j = np.unravel_index(int(np.argmin(key)), key.shape)
            if best is None or key[i, j] < best[0] - 1e-15:
                best = (
                    float(key[i, j]),
                    float(net[i, j]),
                    [(int(ts[i]), int(ks[i])), (int(ts[j]), int(ks[j]))],
                )
    if best is None:
        return None
    return best[1], best[2]


def _land_on_budget(
    ac: np.ndarray, ae: np.ndarray, cur: np.ndarray, rows: np.ndarray, left: float, slack: float
) -> tuple[float, list[tuple[int, int]]]:
    """Several moves at once (at most one per tensor) whose bytes add up to within `slack` of `left`, with
    the least error added: a multiple-choice knapsack over bytes in units of slack/4 (each move's bytes
    rounded up, so the real total never exceeds the rounded one). Downgrades may pay for an upgrade."""
    g = max(1.0, slack / 4.0)
    n_left = int(left // g)
    n_down = 4 * n_left  # downgrades may free up to this much, to pay for upgrades of up to left + it
    size = n_down + n_left + n_down + 1
    if n_left <= 0 or size > 200_000:
        return 0.0, []
    cc = ac[rows, cur]
    ce = ae[rows, cur]
    best = np.full(size, np.inf)
    best[n_down] = 0.0
    picks: list[tuple[int, np.ndarray, np.ndarray]] = []
    for t in range(len(cur)):
        ks = [k for k in range(ac.shape[1]) if k != cur[t] and np.isfinite(ac[t, k])]
        w = np.array([int(np.ceil((ac[t, k] - cc[t]) / g)) for k in ks], dtype=np.int64)
        keep = [i for i in range(len(ks)) if -n_down <= w[i] <= n_left + n_down]
        if not keep:
            continue
        new = best.copy()
        choice = np.full(size, -1, dtype=np.int32)
        for i in keep:
            de = ae[t, ks[i]] - ce[t]
            shifted = np.full(size, np.inf)
            if w[i] >= 0:
                shifted[w[i] :] = best[: size - w[i]] + de
            else:
                shifted[: size + w[i]] = best[-w[i] :] + de
            better = shifted < new
            new[better] = shifted[better]
            choice[better] = ks[i]
        picks.append((t, choice, w))
        best = new
    lo_u = max(0, n_down + int(np.ceil((left - slack) / g)))
    window = best[lo_u : n_down + n_left + 1]
    if len(window) == 0 or not np.isfinite(window).any():
        return 0.0, []
    u = lo_u + int(np.argmin(window))
    # walk back through the choices
    changes: list[tuple[int, int]] = []
    for t, choice, _ in reversed(picks):
        k = int(choice[u])
        if k >= 0:
            changes.append((t, k))
            u -= int(np.ceil((ac[t, k] - cc[t]) / g))
    spent = float(sum(ac[t, k] - cc[t] for t, k in changes))
    if spent > left or spent <= 0:
        return 0.0, []
    return spent, changes
