"""What the scorer weighs a tensor's errors with (docs/method.md, scoring): llama.cpp's importance weights for
the quantizer, the input's second moments for the error, the rounding noise of its activations, and for a
residual writer with stream sums the same error measured where it lands (relative to the stream)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .imatrix import Imatrix
from .llama_rules import shape3
from .model import TensorInfo
from .types import ggml_type


@dataclass(frozen=True)
class ErrorMetric:
    """What a tensor's errors are weighed with, flat float32 per expert: llama.cpp's importance weights
    (which the quantizer gets too) and the input's second moments E[x xᵀ] ≈ diag(diagonal) + Σ_d a_d a_dᵀ,
    the a_d being ``n_dir`` rows of ``directions`` per expert."""

    weights: np.ndarray
    diagonal: np.ndarray | None  # None: the weights (E[x²])
    directions: np.ndarray | None  # n_expert × n_dir × n_per_row
    n_dir: int


def _flat(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.reshape(-1), dtype=np.float32)


def error_metric(im: Imatrix | None, t: TensorInfo, sketch: bool = False) -> ErrorMetric | None:
    """The tensor's metric; None without importance data. E[x²] plus the mean activation's direction (none
    in an upstream imatrix); with ``sketch`` and a sketch of Σ x xᵀ in the imatrix, its directions and the
    diagonal E[x²] leaves beside them instead."""
    if im is None or t.name not in im.entries or im.entries[t.name].in_sum2.size != t.shape[0] * shape3(t)[2]:
        return None  # no entry, or a token-embedding entry of another width (llama.cpp ignores it too)
    w = _flat(im.values(t.name))
    moments = im.second_moments(t.name) if sketch else None
    if moments is not None:
        diagonal, directions = moments
        return ErrorMetric(w, _flat(diagonal), _flat(directions), directions.shape[1])
    a = im.activations(t.name)
    return ErrorMetric(w, None, None if a is None else _flat(a), 0 if a is None else 1)


def stream_metric(im: Imatrix | None, t: TensorInfo) -> tuple[np.ndarray, np.ndarray] | None:
    """A residual writer's second metric: E[x²/ms(s)] and the direction E[x/rms(s)], flat float32, s the
    stream the writer adds to; None without stream sums (upstream files, other tensors)."""
    if error_metric(im, t) is None or im is None:
        return None
    moments = im.stream_moments(t.name)
    if moments is None or moments[0].size != t.shape[0]:
        return None
    return _flat(moments[0]), _flat(moments[1])


def rounding_noise(im: Imatrix | None, t: TensorInfo, candidates: Sequence[int]) -> dict[int, np.ndarray]:
    """Per block width of 8-bit activations some candidate's dot product rounds the input to
    (GGMLType.act_block), the variance that rounding adds to each input column, flat float32 per expert;
    only widths the imatrix has block maxima for."""
    out: dict[int, np.ndarray] = {}
    if im is None or t.name not in im.entries:
        return out
    for block in sorted({ggml_type(c).act_block for c in candidates} - {0}):
        v = im.rounding_noise(t.name, block)
        if v is not None and v.size == t.shape[0] * shape3(t)[2]:
            out[block] = _flat(v)
    return out


def stream_noise(im: Imatrix, t: TensorInfo, noise: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """The rounding noise as the stream metric weighs it, per block width of ``noise``: from the writer's
    block maxima weighted by its stream (each token's step relative to its own stream). Files without them
    (llqx before scoring version 6) scale the plain noise per column by E[x²/ms(s)] / E[x²], which overprices
    columns whose block maxima come from the tokens a large stream divides away."""
    moments = im.stream_moments(t.name)
    if moments is None or not noise:
        return {}
    out = {}
    keep: np.ndarray | None = None  # the v5 scaling, computed once and only for a file without the maxima
    for b, v in noise.items():
        measured = im.stream_rounding_noise(t.name, b)
        if measured is None:
            if keep is None:
                s2 = im.values(t.name).reshape(-1).astype(np.float64)
                keep = np.divide(moments[0].reshape(-1), s2, out=np.zeros_like(s2), where=s2 > 0)
            measured = v * keep
        out[b] = _flat(measured)
    return out


def importance(im: Imatrix | None, t: TensorInfo) -> np.ndarray | None:
    """llama.cpp's importance weights of a tensor (E[x²]), flat float32; None without data."""
    metric = error_metric(im, t)
    return None if metric is None else metric.weights


def imatrix_hash(im: Imatrix | None, tensors: Sequence[TensorInfo], sketch: bool) -> str:
    """What the scores depend on in the imatrix: every metric's bytes."""
    h = hashlib.sha256()
    if im is None:
        return "none"
    for t in tensors:
        metric = error_metric(im, t, sketch)
        h.update(t.name.encode() + b"\0")
        # without a sketch the bytes hashed are those of earlier versions, so their measured probes stay valid
        parts = [(b"w", None), (b"a", None)] if metric is None else [(b"w", metric.weights), (b"a", metric.directions)]
        if metric is not None and metric.diagonal is not None:
            parts.append((b"d", metric.diagonal))
        if t.name in im.entries:  # the block maxima price the rounding of activations (upstream files: none)
            parts += [(b"m%d" % b, m) for b, m in sorted(im.entries[t.name].in_max2.items())]
        stream = stream_metric(im, t)
        if stream is not None:
            parts += [(b"s2", stream[0]), (b"s1", stream[1])]
            st = im.entries[t.name].stream
            parts += [] if st is None else [(b"sm%d" % b, m) for b, m in sorted(st.in_max2.items())]
        for tag, x in parts:
            h.update(tag if x is not None else b"-")
            if x is not None:
                h.update(x.tobytes())
    return h.hexdigest()


def score_job(im: Imatrix | None, t: TensorInfo, candidates: list[int], sketch: bool) -> tuple[dict[str, object],
                                                                                          list[int], bool]:
    """The C++ scorer's job for one tensor (cpp/llqx_score.h), the block widths of its rounding noises in
    job order, and whether it has the stream metric (its noises then come twice: plain, then stream)."""
    ne0, ne1, ne2 = shape3(t)
    metric = error_metric(im, t, sketch)
    job: dict[str, object] = {"name": t.name, "src_type": t.type, "ne": [ne0, ne1, ne2], "offset": t.offset,
                              "candidates": candidates}
    if metric is None or im is None:
        return job, [], False
    noise = rounding_noise(im, t, candidates)
    job["weights"] = metric.weights
    if metric.diagonal is not None:
        job["diagonal"] = metric.diagonal
    if metric.directions is not None:
        job["directions"] = metric.directions
        job["n_dir"] = metric.n_dir
    stream = stream_metric(im, t)
    noises = [noise[b] for b in sorted(noise)]
    if stream is not None:
        job["alt_diagonal"], job["alt_directions"], job["alt_n_dir"] = stream[0], stream[1], 1
        snoise = stream_noise(im, t, noise)
        noises += [snoise[b] for b in sorted(snoise)]
    if noises:
        job["noise"] = np.concatenate(noises)
        job["n_noise"] = len(noises)
    return job, sorted(noise), stream is not None
