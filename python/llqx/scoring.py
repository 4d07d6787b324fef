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
from .score_metric import imatrix_hash, score_job
from .state import ScoreState, StreamScore, TensorScore, check_state_path, load_state
from .types import ggml_type

log = logging.getLogger("llqx")

SCORING_VERSION = 6  # 4: the rounding of activations (TensorScore.rounding); 5: writers' stream errors; 6: their
# rounding from stream-weighted block maxima
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
        "imatrix": imatrix_hash(im, quantizable, sketch),
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
               rounding: dict[str, float], stream: StreamScore | None) -> None:
        names = [ggml_type(x).name for x in types]
        s = self.st.tensors.get(name)
        if s is None:
            s = self.st.tensors[name] = TensorScore([], [], rows, energy)
        s.merge(names, errors, rows, energy, self.names[name], rounding, stream)

    def curves(self) -> dict[str, TensorCurve]:
        """The scored candidates of every tensor, cheapest first, errors in one unit (output_weights) and in
        the tensor's local unit (local_error_divisors; a writer's stream errors where it has them)."""
        scored = {t.name: self.st.tensors[t.name] for t in self.tensors if t.name in self.st.tensors}
        weights = output_weights(self.info, scored, self.im is not None)
        divisors = local_error_divisors(scored)
        out: dict[str, TensorCurve] = {}
        for t in self.tensors:
            s = self.st.tensors.get(t.name)
            w, d = weights.get(t.name, 0.0), divisors.get(t.name, 0.0)
            to_local = 1.0 / d if d > 0 else 0.0
            c = TensorCurve(t.name, t.n_elements, [], [], [])
            for tid, n in zip(self.cands[t.name], self.names[t.name], strict=True):
                e = None if s is None else s.error_of(n)
                if s is None or e is None:
                    continue
                block = str(ggml_type(tid).act_block)
                a = s.rounding.get(block, 0.0)
                c.types.append(tid)
                c.errors.append(e * w)
                c.rounding.append(a * w)
                se = s.stream_error_of(n)
                if se is not None:
                    c.local.append(se)
                    c.local_rounding.append(s.stream_rounding.get(block, 0.0))
                else:
                    c.local.append(e * to_local)
                    c.local_rounding.append(a * to_local)
            c.nbytes = [tensor_nbytes(x, t) for x in c.types]
            out[t.name] = c
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
    streamed: list[bool] = []  # per job: with the stream metric (its errors and noises follow the plain ones)
    for t in todo:
        weights_of.append(expert_weights(im, t.name, shape3(t)[2]))
        job, widths, has_stream = score_job(im, t, types[t.name], scorer.sketch)
        noise_of.append(widths)
        streamed.append(has_stream)
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
        nc, nn = len(types[t.name]), len(noise_of[j])
        errors, energy, rest = combine_experts(values, nc, weights_of[j])
        rounding = {str(b): x for b, x in zip(noise_of[j], rest[:nn], strict=True)}
        stream = None
        if streamed[j]:
            stream = StreamScore(rest[2 * nn:2 * nn + nc],
                                 {str(b): x for b, x in zip(noise_of[j], rest[nn:2 * nn], strict=True)})
        scorer.record(t.name, types[t.name], errors, int(rows), energy, rounding, stream)
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
