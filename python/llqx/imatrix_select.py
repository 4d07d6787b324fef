"""The imatrix a model is quantized with: the one check that it fits the model, and llama-quantize's selection."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import LlqxError
from .imatrix import Imatrix
from .model import ModelInfo


@dataclass
class ImatrixSelection:
    """The per-tensor weights handed to llama.cpp, after --include/--exclude-weights."""

    weights: dict[str, object] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0


def select_imatrix(imatrix: Imatrix, include: Sequence[str] = (),
                   exclude: Sequence[str] = ()) -> ImatrixSelection:
    """Normalize and filter as llama-quantize does (substring matches; exclude, then include)."""
    if include and exclude:
        raise LlqxError("--include-weights and --exclude-weights cannot be used together")
    weights = imatrix.quantize_weights()
    if exclude:
        weights = {k: v for k, v in weights.items() if not any(x in k for x in exclude)}
    if include:
        weights = {k: v for k, v in weights.items() if any(x in k for x in include)}
    return ImatrixSelection(dict(weights), list(imatrix.datasets), imatrix.chunk_count)


def check_imatrix_fits(im: Imatrix, info: ModelInfo, source: str, every_entry: bool = False) -> None:
    """Refuse an imatrix made for another model or holding NaN/inf: the one check the writer, the scorer
    and ``llqx imatrix --in-file`` share.

    No tensor name in common, or a width that differs (ne[0]·ne[2], token embeddings exempt, as in
    llama.cpp, which quantizes silently without weights when no name matches); with ``every_entry`` also
    any entry for a tensor the model lacks (merging into another model's file).
    """
    tensors = {t.name: t for t in info.tensors}
    if every_entry:
        lacking = next((name for name in im.entries if name not in tensors), None)
        if lacking is not None:
            raise LlqxError(f"{source} does not belong to this model: it has data for {lacking}, which the model lacks")
    matched = [name for name in im.entries if name in tensors]
    if not matched:
        raise LlqxError(f"imatrix {source} does not belong to this model: none of its "
                        f"{len(im.entries)} tensor names is in {info.path}")
    for name in matched:
        t = tensors[name]
        e = im.entries[name]
        n_mat = t.shape[2] if len(t.shape) > 2 else 1
        want = t.shape[0] * n_mat
        have = int(e.in_sum2.size)
        if (have != want or (e.n_expert > 1 and e.n_expert != n_mat)) and "token_embd" not in name:
            raise LlqxError(f"imatrix {source} does not belong to this model: {name} has {e.n_expert} x "
                            f"{e.n_per_row} values, the model's weight is {n_mat} x {t.shape[0]}")
        parts = [e.in_sum2, e.counts] + [x for x in (e.in_sum, e.in_sketch) if x is not None]
        if not all(np.isfinite(np.asarray(x, dtype=np.float64)).all() for x in parts):
            raise LlqxError(f"imatrix {source} holds NaN or infinite values for {name}")
