"""The scoring run (docs/method.md, scoring): per quantizable tensor, the error of every candidate type.

``score(model, imatrix)`` streams the model through the C++ scorer (sampled rows, quantized with each
expert's importance values, error weighted with the input's second moments: the imatrix's sketch of
Σ x xᵀ, or E[x²] and the mean activation), keeps the results in the
state file and returns the planner's ``Scores``, whose ``plan(target_bpw=... | target_size=...)`` runs
the optimizer. With ``candidates="window"`` nothing is scored up front: each plan() asks for what its
target needs, and the IQ1/IQ2/IQ3 types (whose lattice grids take seconds to build) only where they could win.
This module is the thin run on top: threads, progress, Ctrl+C, periodic state saves.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import _core
from .curves import TensorCurve
from .errors import LlqxError
from .estimator import combine_experts, expert_weights, local_error_divisors, output_weights
from .imatrix import Imatrix
from .imatrix_select import check_imatrix_fits, select_imatrix
from .llama_rules import quantizable_tensors, shape3, tensor_candidates, tensor_nbytes
from .metadata import imatrix_kv_overrides, meta_size
from .model import ModelInfo, TensorInfo, inspect
from .planner import Scores
from .progress import progress_bar
from .request import CANDIDATE_MODES
from .runner import run_in_worker
from .state import ScoreState, TensorScore, check_state_path, load_state
from .types import ggml_type

log = logging.getLogger("llqx")

SCORING_VERSION = 4  # 4: the rounding of activations (TensorScore.rounding)
# sampled elements per tensor (split over its experts): a 1/32 slice, at least 32 K, at most 256 K elements;
# every row's energy is read; the largest rows are always in the sample and the rest are evenly spaced
# (cpp/llqx_score_sample.cpp)
SAMPLE_FRACTION = 1 / 32
SAMPLE_FLOOR = 1 << 15
SAMPLE_CAP = 1 << 18
MIN_ROWS = 16  # per expert slice (all rows when it has fewer)

def _model_hash(info: ModelInfo) -> str:
    """Header bytes plus a few sampled blocks of every tensor's data: cheap, and changes with the data."""
    h = hashlib.sha256()
    h.update(str(info.file_size).encode())
    with open(info.path, "rb") as f:
        h.update(f.read(info.data_offset))
        for t in info.tensors:
            for pos in sorted({0, t.nbytes // 2, max(0, t.nbytes - 4096)}):
                f.seek(t.offset + pos)
                h.update(f.read(min(4096, t.nbytes - pos)))
    return h.hexdigest()


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


def importance(im: Imatrix | None, t: TensorInfo) -> np.ndarray | None:
    """llama.cpp's importance weights of a tensor (E[x²]), flat float32; None without data."""
    metric = error_metric(im, t)
    return None if metric is None else metric.weights


def _imatrix_hash(im: Imatrix | None, tensors: Sequence[TensorInfo], sketch: bool) -> str:
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
        for tag, x in parts:
            h.update(tag if x is not None else b"-")
            if x is not None:
                h.update(x.tobytes())
    return h.hexdigest()


def score(
    model: str | os.PathLike[str],
    imatrix: str | os.PathLike[str] | Imatrix | None = None,
    *,
    state: str | os.PathLike[str] | None = None,
    nthread: int = 0,
    sample_elements: int | None = None,
    progress: bool = True,
    candidates: str = "all",
    imatrix_label: str | None = None,
    defer: bool = False,
    sketch: bool = False,
) -> Scores:
    """Score every quantizable tensor of a GGUF model under its candidate types.

    ``imatrix``: a path or Imatrix; without one the error is plain relative MSE and the IQ types that
    need importance data are left out. ``sample_elements`` fixes the sampled elements per tensor
    (default: a 1/32 slice of each tensor, 32 K to 256 K elements). ``state``: a state file to resume
    from and save to (scoring is saved there on Ctrl+C, and a later call with the same model and
    imatrix skips what it holds). ``candidates``: ``"all"`` scores every candidate type now;
    ``"window"`` scores nothing yet: each ``plan()`` scores the types near its target (and a lower grid
    type wherever one could win at the plan's price of a byte), adding them to the state file. ``imatrix_label``: the
    name recorded in the output for an Imatrix object (a path names itself). ``defer``: with
    ``"all"``, score nothing yet (check_target() first, then score_all()). ``sketch``: weigh errors with the
    imatrix's sketch of Σ x xᵀ (docs/method.md; measured worse than E[x²] and the mean so far).
    """
    if candidates not in CANDIDATE_MODES:
        raise LlqxError(f"unknown candidates mode '{candidates}' (use {' or '.join(CANDIDATE_MODES)})")
    info = inspect(model)
    im: Imatrix | None
    label: str | None
    if imatrix is None:
        im, label = None, None
    elif isinstance(imatrix, Imatrix):
        im, label = imatrix, imatrix_label or ""
    else:
        im, label = Imatrix.load(imatrix), imatrix_label or os.fspath(imatrix)
    if im is not None:
        check_imatrix_fits(im, info, label or "")
    quantizable = quantizable_tensors(info)
    for t in quantizable:
        if t.n_per_row % ggml_type(t.type).block_size != 0:
            raise LlqxError(f"cannot read {t.name}")

    cands = {t.name: tensor_candidates(t, im is not None and t.name in im.entries) for t in quantizable}
    key = {
        "model": _model_hash(info),
        "imatrix": _imatrix_hash(im, quantizable, sketch),
        "scoring": SCORING_VERSION,
        "sampling": {
            "elements": sample_elements,
            "fraction": SAMPLE_FRACTION,
            "floor": SAMPLE_FLOOR,
            "cap": SAMPLE_CAP,
            "min_rows": MIN_ROWS,
        },
    }
    if state is not None:
        check_state_path(Path(state), {"model": model, "imatrix": None if isinstance(imatrix, Imatrix) else imatrix})
    st = load_state(None if state is None else Path(state), key)
    scorer = _Scorer(info, im, quantizable, cands, st, nthread, sample_elements, progress, sketch)
    kvs = [] if im is None else imatrix_kv_overrides(select_imatrix(im), label or "")
    meta = meta_size(info.path, kvs, 7)
    has_act = im is not None and im.has_activations
    scores = Scores(info, scorer.curves(), label, meta, has_act, cands, scorer, kvs, state=st)
    if candidates == "all" and not defer:
        scores.score_all()
    return scores


class _Scorer:
    """Scores (tensor, candidate type) pairs on demand; the state file holds what is done."""

    def __init__(
        self,
        info: ModelInfo,
        im: Imatrix | None,
        quantizable: list[TensorInfo],
        cands: dict[str, list[int]],
        st: ScoreState,
        nthread: int,
        sample_elements: int | None,
        progress: bool,
        sketch: bool,
    ) -> None:
        self.info = info
        self.im = im
        self.tensors = quantizable
        self.cands = cands
        self.names = {name: [ggml_type(x).name for x in c] for name, c in cands.items()}
        self.st = st
        self.nthread = nthread
        self.sample_elements = sample_elements
        self.progress = progress
        self.sketch = sketch

    def missing(self, need: dict[str, list[int]]) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for t in self.tensors:
            s = self.st.tensors.get(t.name)
            todo = [x for x in need.get(t.name, []) if s is None or ggml_type(x).name not in s.types]
            if todo:
                out[t.name] = todo
        return out

    def ensure(self, need: dict[str, list[int]]) -> None:
        todo = self.missing(need)
        if todo:
            _run_scoring(self.info, self.im, [t for t in self.tensors if t.name in todo], todo, self)

    def record(self, name: str, types: list[int], errors: list[float], rows: int, energy: float,
               rounding: dict[str, float]) -> None:
        names = [ggml_type(x).name for x in types]
        s = self.st.tensors.get(name)
        if s is None:
            s = self.st.tensors[name] = TensorScore([], [], rows, energy)
        s.merge(names, errors, rows, energy, self.names[name], rounding)

    def curves(self) -> dict[str, TensorCurve]:
        """The scored candidates of every tensor, cheapest first, errors in one unit (output_weights)."""
        scored = {t.name: self.st.tensors[t.name] for t in self.tensors if t.name in self.st.tensors}
        weights = output_weights(self.info, scored, self.im is not None)
        divisors = local_error_divisors(scored)
        out: dict[str, TensorCurve] = {}
        for t in self.tensors:
            s = self.st.tensors.get(t.name)
            types: list[int] = []
            errors: list[float] = []
            rounding: list[float] = []
            for tid, n in zip(self.cands[t.name], self.names[t.name], strict=True):
                e = None if s is None else s.error_of(n)
                if e is not None:
                    types.append(tid)
                    errors.append(e * weights[t.name])
                    block = str(ggml_type(tid).act_block)
                    rounding.append(s.rounding.get(block, 0.0) * weights[t.name] if s is not None else 0.0)
            nbytes = [tensor_nbytes(x, t) for x in types]
            w, d = weights.get(t.name, 0.0), divisors.get(t.name, 0.0)
            local = 1.0 / (w * d) if w > 0 and d > 0 else 0.0
            out[t.name] = TensorCurve(t.name, t.n_elements, types, nbytes, errors, local, rounding)
        return out


def _run_scoring(
    info: ModelInfo,
    im: Imatrix | None,
    todo: list[TensorInfo],
    types: dict[str, list[int]],
    scorer: _Scorer,
) -> None:
    st = scorer.st
    sample_elements = scorer.sample_elements
    jobs = []
    weights_of = []
    noise_of: list[list[int]] = []  # per job: the block widths of its input noises, in job order
    for t in todo:
        ne0, ne1, ne2 = shape3(t)
        weights_of.append(expert_weights(im, t.name, ne2))
        metric = error_metric(im, t, scorer.sketch)
        noise = rounding_noise(im, t, types[t.name]) if metric is not None else {}
        noise_of.append(sorted(noise))
        job: dict[str, object] = {
            "name": t.name,
            "src_type": t.type,
            "ne": [ne0, ne1, ne2],
            "offset": t.offset,
            "candidates": types[t.name],
        }
        if metric is not None:
            job["weights"] = metric.weights
            if metric.diagonal is not None:
                job["diagonal"] = metric.diagonal
            if metric.directions is not None:
                job["directions"] = metric.directions
                job["n_dir"] = metric.n_dir
            if noise:
                job["noise"] = np.concatenate([noise[b] for b in sorted(noise)])
                job["n_noise"] = len(noise)
        n_sample = (
            sample_elements
            if sample_elements is not None
            else int(max(SAMPLE_FLOOR, min(SAMPLE_CAP, t.n_elements * SAMPLE_FRACTION)))
        )
        job["sample_elements"] = max(1, min(n_sample, t.n_elements))
        jobs.append(job)
    nthread = scorer.nthread if scorer.nthread > 0 else (os.cpu_count() or 1)
    cancel = _core.ScoreCancel()
    last_save = [time.monotonic()]
    bar = None
    task = None
    if scorer.progress:
        from rich.console import Console
        from rich.progress import TextColumn

        bar = progress_bar("scoring", "tensors", console=Console(stderr=True), transient=True,
                           extra=(TextColumn("{task.fields[name]}"),))
        task = bar.add_task("scoring", total=len(jobs), name="")
        bar.start()

    def on_done(j: int, values: np.ndarray, rows: int) -> bool:
        t = todo[j]
        errors, energy, noise = combine_experts(values, len(types[t.name]), weights_of[j])
        rounding = {str(b): x for b, x in zip(noise_of[j], noise, strict=True)}
        scorer.record(t.name, types[t.name], errors, int(rows), energy, rounding)
        if bar is not None and task is not None:
            bar.update(task, advance=1, name=t.name)
        now = time.monotonic()
        if now - last_save[0] > 2.0:
            st.save()
            last_save[0] = now
        return True

    def run() -> None:
        _core.score_run(info.path, jobs, nthread=nthread, sample_elements=SAMPLE_CAP, min_rows=MIN_ROWS,
                        callback=on_done, cancel=cancel)

    try:
        _, interrupted = run_in_worker(run, name="llqx-score", cancel=cancel.set)
    except _core.Error as exc:
        raise LlqxError(f"scoring failed: {exc}") from exc
    finally:
        if bar is not None:
            bar.stop()
        st.save()
    if interrupted:
        if st.path is not None:
            log.warning("scoring interrupted: %d tensors saved to %s", len(st.tensors), st.path)
        raise KeyboardInterrupt
