"""Statistics of an importance matrix, per tensor and per layer (what `llqx imatrix --show-statistics` shows).

Per tensor (experts concatenated, experts without tokens left out, like llama-imatrix):
Σ E[x²]; mean and std of E[x] (the mean activation, when the file has ``in_sum``); entropy of the
energy distribution p_j = E[x²]_j / Σ E[x²] in bits, and as % of its maximum log2(n); the share of
active columns (E[x²] > 1e-5); cosine similarity of E[x²] with the same tensor in the previous layer.
Per layer: element-weighted means of Σ E[x²], normalized entropy and cosine similarity.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

import numpy as np

from .imatrix import Imatrix

ACTIVE_THRESHOLD = 1e-5
_BLK = re.compile(r"blk\.(\d+)\.")


@dataclass(frozen=True)
class TensorStats:
    name: str
    layer: int  # -1 outside the blocks
    kind: str  # e.g. "ffn_down"
    elements: int
    sum_energy: float  # Σ E[x²]
    min_energy: float
    max_energy: float
    mean_act: float | None  # mean of E[x] over columns
    std_act: float | None
    entropy: float  # bits
    entropy_norm: float  # entropy / log2(elements), 0..1
    active: float  # share of columns with E[x²] > 1e-5
    cossim: float | None  # with the same tensor one layer up; None where there is none


@dataclass(frozen=True)
class LayerStats:
    layer: int
    tensors: int
    elements: int
    sum_energy: float  # element-weighted mean of the tensors' Σ E[x²]
    entropy_norm: float
    cossim: float | None


def _kind(name: str) -> str:
    parts = name.split(".")
    if "weight" in parts and parts.index("weight") > 0:
        return parts[parts.index("weight") - 1]
    return name


def _flat(im: Imatrix, name: str, what: str) -> np.ndarray | None:
    """E[x²] or E[x] of the experts that saw tokens, concatenated (float64)."""
    e = im.entries[name]
    counts = np.rint(e.counts).astype(np.float64)
    seen = counts > 0
    if not seen.any():
        return None
    src = e.in_sum2 if what == "energy" else e.in_sum
    if src is None:
        return None
    # a legacy record holds mean·ncall with counts = ncall: the same division gives the mean
    return (src[seen].astype(np.float64) / counts[seen, None]).reshape(-1)


def tensor_stats(im: Imatrix) -> list[TensorStats]:
    energy: dict[str, np.ndarray] = {}
    for name in im.entries:
        v = _flat(im, name, "energy")
        if v is not None and v.size:
            energy[name] = v
    out: list[TensorStats] = []
    for name in sorted(energy):
        v = energy[name]
        total = float(v.sum())
        p = v / total if total > 0 else np.zeros_like(v)
        nz = p[p > 0]
        entropy = float(-(nz * np.log2(nz)).sum()) if total > 0 else 0.0
        act = _flat(im, name, "act")
        m = _BLK.search(name)
        layer = int(m.group(1)) if m else -1
        cossim = None
        if m:
            prev = name[:m.start(1)] + str(layer - 1) + name[m.end(1):]
            w = energy.get(prev)
            if w is not None and w.shape == v.shape:
                denom = float(np.linalg.norm(v) * np.linalg.norm(w))
                cossim = float(np.dot(v, w) / denom) if denom > 0 else 0.0
        out.append(TensorStats(
            name=name, layer=layer, kind=_kind(name), elements=int(v.size), sum_energy=total,
            min_energy=float(v.min()), max_energy=float(v.max()),
            mean_act=None if act is None else float(act.mean()),
            std_act=None if act is None else float(act.std()),
            entropy=entropy, entropy_norm=entropy / math.log2(v.size) if v.size > 1 else 0.0,
            active=float(np.mean(np.abs(v) > ACTIVE_THRESHOLD)), cossim=cossim))
    return out


def layer_stats(tensors: list[TensorStats]) -> list[LayerStats]:
    by_layer: dict[int, list[TensorStats]] = {}
    for t in tensors:
        if t.layer >= 0:
            by_layer.setdefault(t.layer, []).append(t)
    out = []
    for layer in sorted(by_layer):
        ts = by_layer[layer]
        n = sum(t.elements for t in ts)
        with_cos = [t for t in ts if t.cossim is not None]
        n_cos = sum(t.elements for t in with_cos)
        out.append(LayerStats(
            layer=layer, tensors=len(ts), elements=n,
            sum_energy=sum(t.sum_energy * t.elements for t in ts) / n,
            entropy_norm=sum(t.entropy_norm * t.elements for t in ts) / n,
            cossim=sum(t.cossim * t.elements for t in with_cos) / n_cos if n_cos else None))  # type: ignore[operator]
    return out


def stats_json(tensors: list[TensorStats], layers: list[LayerStats]) -> dict[str, object]:
    return {"tensors": [asdict(t) for t in tensors], "layers": [asdict(lay) for lay in layers]}


def stats_tables(tensors: list[TensorStats], layers: list[LayerStats], title: str) -> list[object]:
    """rich tables: one row per tensor (grouped by kind, like llama-imatrix) and one per layer."""
    from rich.markup import escape
    from rich.table import Table

    def f(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    t1 = Table(title=f"{title}: {len(tensors)} tensors", show_lines=False)
    for col in ("layer", "tensor", "Σ E[x²]", "min", "max", "μ E[x]", "σ E[x]", "% active", "N",
                "entropy", "E (norm)", "cos sim"):
        t1.add_column(escape(col), justify="left" if col == "tensor" else "right")
    for t in sorted(tensors, key=lambda t: (t.kind, t.layer)):
        t1.add_row("-" if t.layer < 0 else str(t.layer), t.kind, f(t.sum_energy, ".2f"),
                   f(t.min_energy, ".4g"), f(t.max_energy, ".4g"), f(t.mean_act, ".4g"), f(t.std_act, ".4g"),
                   f(100 * t.active, ".2f"), str(t.elements), f(t.entropy, ".4f"),
                   f(100 * t.entropy_norm, ".2f") + "%", f(t.cossim, ".4f"))
    t2 = Table(title=f"per layer ({len(layers)} layers, element-weighted)")
    for col in ("layer", "tensors", "μ Σ E[x²]", "μ E (norm)", "μ cos sim"):
        t2.add_column(escape(col), justify="right")
    for lay in layers:
        t2.add_row(str(lay.layer), str(lay.tensors), f(lay.sum_energy, ".2f"),
                   f(100 * lay.entropy_norm, ".2f") + "%", f(lay.cossim, ".4f"))
    return [t1, t2]
