"""Plots of plans and state files (matplotlib, the optional extra ``llqx[plot]``).

Accepted inputs (JSON), read tolerantly so that the target-bpw engine's files and hand-made ones work:

Plan (what type each tensor gets) -> heat map of bits per weight per layer and tensor kind:
  * a list of entries, or an object holding one under ``"tensors"``, ``"plan"`` or ``"entries"``;
    each entry ``{"name": str, "type": str|int, "bpw": float?, "error": float?, "n_elements": int?}``
    (``"elements"`` is read as ``"n_elements"``; the llqx plan's ``to_dict()`` is such an object)
    (``bpw`` defaults to the type's nominal bits per weight; ``"tensor"`` is accepted for ``"name"``);
  * or an object mapping tensor name -> ggml type name, or tensor name -> entry as above.

State (per-tensor candidate curves) -> error vs bytes of chosen tensors:
  * an object mapping tensor name -> ``{"candidates": [{"type": ..., "bytes": int, "error": float}, ...]}``
    (a bare list of candidates is accepted too), possibly wrapped in ``"tensors"`` or ``"curves"``;
  * or tensor name -> ``{"types": [type, ...], "errors": [float, ...]}`` (parallel lists, the llqx
    state file's layout); bytes then come from the model (``--model``: the tensor's shape and
    llama.cpp's row size of each type) or, without it, the x axis is the type's nominal bits per weight.
  Other top-level keys (format, key, metadata) are ignored.

``kind of file`` is detected: a file with candidate curves is a state, one with tensor types a plan.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .atomic import atomic_path
from .errors import LlqxError
from .types import ggml_type

_BLK = re.compile(r"^blk\.(\d+)\.(.+?)(?:\.weight)?$")


@dataclass
class PlanEntry:
    name: str
    type: str
    bpw: float
    error: float | None = None
    n_elements: int | None = None


@dataclass
class Candidate:
    type: str
    bytes: int | None
    error: float


def _type_name(t: Any) -> str:
    if isinstance(t, int):
        return ggml_type(t).name
    return str(t)


def _nominal_bpw(t: str) -> float:
    try:
        return ggml_type(t).bpw
    except LlqxError:
        return float("nan")


def load_json(path: str | os.PathLike[str]) -> Any:
    p = Path(path)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise LlqxError(f"cannot read {p}: {exc.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LlqxError(f"{p} is not a JSON plan or state file: {exc}") from None


def _unwrap(doc: Any, keys: tuple[str, ...]) -> Any:
    if isinstance(doc, dict):
        for k in keys:
            if k in doc and isinstance(doc[k], (list, dict)):
                return doc[k]
    return doc


def parse_plan(doc: Any) -> list[PlanEntry]:
    """Plan entries from any accepted plan layout; [] when the document holds none."""
    doc = _unwrap(doc, ("tensors", "plan", "entries"))
    items: list[tuple[str, Any]] = []
    if isinstance(doc, list):
        for e in doc:
            if isinstance(e, dict) and ("name" in e or "tensor" in e):
                items.append((str(e.get("name", e.get("tensor"))), e))
    elif isinstance(doc, dict):
        items = [(str(k), v) for k, v in doc.items()]
    out: list[PlanEntry] = []
    for name, e in items:
        if isinstance(e, str):
            if not math.isnan(_nominal_bpw(e)):  # name -> type name; other string fields are not tensors
                out.append(PlanEntry(name, e, _nominal_bpw(e)))
        elif isinstance(e, dict) and "type" in e:
            t = _type_name(e["type"])
            bpw = e.get("bpw")
            n = e.get("n_elements", e.get("elements"))
            out.append(
                PlanEntry(
                    name,
                    t,
                    float(bpw) if bpw is not None else _nominal_bpw(t),
                    float(e["error"]) if e.get("error") is not None else None,
                    int(n) if n is not None else None,
                )
            )
    return out


def parse_state(doc: Any) -> dict[str, list[Candidate]]:
    """Candidate curves per tensor from any accepted state layout; {} when the document holds none."""
    doc = _unwrap(doc, ("tensors", "curves"))
    out: dict[str, list[Candidate]] = {}
    if not isinstance(doc, dict):
        return out
    for name, v in doc.items():
        cs = []
        if isinstance(v, dict) and isinstance(v.get("types"), list) and isinstance(v.get("errors"), list):
            nbytes = v.get("bytes") if isinstance(v.get("bytes"), list) else [None] * len(v["types"])
            for t, e, b in zip(v["types"], v["errors"], nbytes, strict=False):
                if isinstance(e, (int, float)):
                    cs.append(Candidate(_type_name(t), int(b) if b is not None else None, float(e)))
        else:
            cands = v.get("candidates") if isinstance(v, dict) else v
            for c in cands if isinstance(cands, list) else []:
                if isinstance(c, dict) and {"type", "error"} <= c.keys():
                    b = c.get("bytes")
                    cs.append(
                        Candidate(_type_name(c["type"]), int(b) if b is not None else None, float(c["error"]))
                    )
        if cs:
            out[str(name)] = sorted(
                cs, key=lambda c: (c.bytes if c.bytes is not None else -1, _nominal_bpw(c.type))
            )
    return out


def fill_bytes(curves: dict[str, list[Candidate]], model: str | os.PathLike[str]) -> None:
    """Bytes of every candidate from the model's tensor shapes (llama.cpp's row size of the type)."""
    from .model import inspect

    info = inspect(model)
    shapes = {t.name: t for t in info.tensors}
    for name, cs in curves.items():
        t = shapes.get(name)
        if t is None:
            continue
        for c in cs:
            if c.bytes is None:
                with contextlib.suppress(LlqxError, ValueError):
                    c.bytes = ggml_type(c.type).row_size(t.n_per_row) * t.n_rows
        cs.sort(key=lambda c: (c.bytes if c.bytes is not None else -1, _nominal_bpw(c.type)))


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise LlqxError("plots need matplotlib: pip install 'llqx[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, out: Path) -> None:
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format=out.suffix.lstrip(".").lower() or "png")


def plot_plan(entries: list[PlanEntry], out: str | os.PathLike[str], title: str = "") -> Path:
    """Heat map of bits per weight: layers down, tensor kinds across, the type written in each cell;
    tensors outside the blocks (token_embd, output) listed under the map."""
    import numpy as np

    plt = _pyplot()
    blocks: dict[tuple[int, str], PlanEntry] = {}
    other: list[PlanEntry] = []
    for e in entries:
        m = _BLK.match(e.name)
        if m:
            blocks[(int(m.group(1)), m.group(2))] = e
        else:
            other.append(e)
    if not blocks and not other:
        raise LlqxError("the plan holds no tensors")
    layers = sorted({k[0] for k in blocks})
    kinds = sorted({k[1] for k in blocks})
    grid = np.full((max(len(layers), 1), max(len(kinds), 1)), np.nan)
    for (layer, kind), e in blocks.items():
        grid[layers.index(layer), kinds.index(kind)] = e.bpw
    fig, ax = plt.subplots(
        figsize=(1.2 + 1.1 * max(len(kinds), 1), 1.6 + 0.28 * max(len(layers), 1)), dpi=110
    )
    im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(layers)), [str(x) for x in layers], fontsize=7)
    ax.set_ylabel("layer")
    if len(layers) * len(kinds) <= 600:
        finite = grid[np.isfinite(grid)]
        mid = float(finite.mean()) if finite.size else 0.0
        for (layer, kind), e in blocks.items():
            y, x = layers.index(layer), kinds.index(kind)
            ax.text(
                x, y, e.type, ha="center", va="center", fontsize=6, color="white" if e.bpw < mid else "black"
            )
    fig.colorbar(im, ax=ax, label="bits per weight")
    total = [e for e in entries if e.n_elements]
    subtitle = ""
    if total:
        n = sum(e.n_elements or 0 for e in total)
        mean_bpw = sum(e.bpw * (e.n_elements or 0) for e in total) / n
        subtitle = f"  (weighted {mean_bpw:.3f} bpw over {len(total)} tensors)"
    extra = ", ".join(f"{e.name}: {e.type} ({e.bpw:.2f})" for e in other[:6])
    ax.set_title(
        (title or "bits per weight per layer and tensor") + subtitle + ("\n" + extra if extra else ""),
        fontsize=8,
    )
    fig.tight_layout()
    path = Path(out)
    _save(fig, path)
    plt.close(fig)
    return path


def default_tensors(curves: dict[str, list[Candidate]], limit: int = 6) -> list[str]:
    """A few telling tensors: token_embd/output and the first, middle and last layers' ffn_down/attn_v."""
    names = list(curves)
    picks = [n for n in names if not _BLK.match(n)][:2]
    layers = sorted({int(m.group(1)) for n in names if (m := _BLK.match(n))})
    if layers:
        for layer in (layers[0], layers[len(layers) // 2], layers[-1]):
            for kind in ("ffn_down", "attn_v"):
                n = f"blk.{layer}.{kind}.weight"
                if n in curves and n not in picks:
                    picks.append(n)
    for n in names:
        if len(picks) >= limit:
            break
        if n not in picks:
            picks.append(n)
    return picks[:limit]


def plot_state(
    curves: dict[str, list[Candidate]],
    out: str | os.PathLike[str],
    tensors: list[str] | None = None,
    title: str = "",
) -> Path:
    """Error vs bytes (log-log) of the chosen tensors' candidate types, each point labelled by its type."""
    plt = _pyplot()
    if not curves:
        raise LlqxError("the state file holds no candidate curves")
    chosen = tensors or default_tensors(curves)
    missing = [t for t in chosen if t not in curves]
    if missing:
        raise LlqxError(f"not in the state file: {', '.join(missing[:5])}")
    by_bytes = all(c.bytes is not None for name in chosen for c in curves[name])

    def x_of(c: Candidate) -> float:
        return float(c.bytes) if by_bytes and c.bytes is not None else _nominal_bpw(c.type)

    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=110)
    for name in chosen:
        pos = sorted((c for c in curves[name] if c.error > 0 and x_of(c) > 0), key=x_of)
        line = ax.plot([x_of(c) for c in pos], [c.error for c in pos], "o-", ms=3, label=name)[0]
        for c in pos:
            ax.annotate(
                c.type,
                (x_of(c), c.error),
                textcoords="offset points",
                xytext=(3, 2),
                fontsize=5,
                color=line.get_color(),
            )
    if by_bytes:
        ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("bytes" if by_bytes else "bits per weight (nominal, of the type)")
    ax.set_ylabel("estimated error")
    ax.set_title(title or "candidate error vs bytes", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(out)
    _save(fig, path)
    plt.close(fig)
    return path


def plot_file(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    tensors: list[str] | None = None,
    kind: str = "auto",
    model: str | os.PathLike[str] | None = None,
) -> Path:
    """Plot a plan (heat map) or a state file (curves); the kind is detected unless given. ``model`` gives
    the tensor shapes for state files that hold no byte counts."""
    src = Path(path)
    doc = load_json(src)
    curves = parse_state(doc) if kind in ("auto", "curves") else {}
    if curves:
        if model is not None:
            fill_bytes(curves, model)
        if tensors:
            pattern = [re.compile(t) for t in tensors]
            chosen = [n for n in curves if any(p.search(n) for p in pattern)]
            if not chosen:
                raise LlqxError(f"no tensor in {src} matches {', '.join(tensors)}")
            tensors = chosen[:12]
        return plot_state(
            curves, out or src.with_suffix(".curves.png"), tensors, f"{src.name}: error vs bytes"
        )
    entries = parse_plan(doc) if kind in ("auto", "heatmap") else []
    if entries:
        return plot_plan(entries, out or src.with_suffix(".png"), f"{src.name}")
    raise LlqxError(f"{src} holds neither a plan (tensor types) nor candidate curves")
