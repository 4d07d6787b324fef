"""Collecting an importance matrix with activations (Σx², Σx, counts, the sketch of Σ x xᵀ) by running the
model over text.

The C++ collector runs chunks exactly like llama-imatrix (same chunking, BOS, batching, perplexity);
this module wraps it: the run happens in a worker thread with the GIL released, so Ctrl+C in the
main thread stops it cleanly after the current group of chunks, keeping whole chunks only.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import _core
from . import log as _log
from .errors import LlqxError
from .imatrix import Imatrix, ImatrixEntry, StreamSums
from .runner import run_in_worker


@dataclass(frozen=True)
class ImatrixProgress:
    """State after a group of chunks: what a progress bar shows."""

    chunks_done: int
    chunks: int
    tokens_done: int
    tokens: int
    ppl: float  # running perplexity; nan without it
    elapsed_s: float


@dataclass
class ImatrixRun:
    """What a collection run produced: the statistics of this run alone plus its perplexity."""

    imatrix: Imatrix
    chunks_done: int = 0
    chunks: int = 0
    tokens: int = 0
    ppl: float = float("nan")
    ppl_err: float = float("nan")
    eval_s: float = 0.0
    collect_s: float = 0.0  # of eval_s: summing activations in the eval callback
    cancelled: bool = False
    n_tokens_text: int = 0
    warnings: list[str] = field(default_factory=list)


# columns of each dense tensor's sketch of Σ x xᵀ (cpp/llqx_sketch.h) when one is asked for: twice the
# directions the scorer reads from it (imatrix_sketch.SKETCH_DIRECTIONS), which Nyström's approximation then finds
# well. Off by default: it slows the imatrix pass (SmolLM2: 1.3×) and made no plan better (docs/method.md)
SKETCH_RANK = 16
DEFAULT_SKETCH_RANK = 0
MAX_SKETCH_RANK = 64


def default_threads() -> int:
    return max(1, os.cpu_count() or 1)


def plan_chunks(n_tokens: int, n_ctx: int, chunks: int = -1, skip_chunks: int = 0) -> int:
    """Chunks llama-imatrix would run over n_tokens tokens; LlqxError where it would refuse."""
    if n_ctx <= 0:
        raise LlqxError("the context size (-c) must be > 0")
    if skip_chunks < 0:
        raise LlqxError("--chunk must be >= 0")
    if skip_chunks > 0:
        if (skip_chunks + 2) * n_ctx >= n_tokens:
            raise LlqxError(f"not enough tokens left after skipping {skip_chunks} chunks: the text has "
                            f"{n_tokens} tokens, chunks are {n_ctx} tokens")
        n_tokens -= skip_chunks * n_ctx
    if n_tokens < 2 * n_ctx:
        raise LlqxError(f"the text is too short: it tokenizes to {n_tokens} tokens, a context of {n_ctx} "
                        f"needs at least {2 * n_ctx}")
    n_max = n_tokens // n_ctx
    return n_max if chunks < 0 else min(chunks, n_max)


class ImatrixCollector:
    """A loaded model ready to collect statistics; runs accumulate into it."""

    def __init__(self, model: str | os.PathLike[str], *, n_ctx: int = 512, n_batch: int = 2048,
                 n_ubatch: int = 512, threads: int | None = None, n_gpu_layers: int = -1,
                 process_output: bool = False, compute_ppl: bool = True, repack: bool = True,
                 sketch_rank: int = DEFAULT_SKETCH_RANK) -> None:
        path = Path(model)
        if not path.is_file():
            raise LlqxError(f"model not found: {path}")
        if n_ctx <= 0:
            raise LlqxError("the context size (-c) must be > 0")
        if n_batch <= 0 or n_ubatch <= 0:
            raise LlqxError("batch sizes (-b, -ub) must be > 0")
        if not 0 <= sketch_rank <= MAX_SKETCH_RANK:
            raise LlqxError(f"the sketch rank must be between 0 and {MAX_SKETCH_RANK}, not {sketch_rank}")
        p = _core.ImatrixParams()
        p.model_path = os.fspath(path)
        p.n_ctx = n_ctx
        p.n_batch = n_batch
        p.n_ubatch = n_ubatch
        p.n_threads = threads if threads and threads > 0 else default_threads()
        p.n_gpu_layers = n_gpu_layers
        p.repack = repack
        p.process_output = process_output
        p.compute_ppl = compute_ppl
        p.sketch_rank = sketch_rank
        _log.recent_errors.clear()
        try:
            self._core = _core.ImatrixCollector(p)
        except _core.Error as exc:
            cause = _log.last_error("")
            raise LlqxError(f"{exc}{': ' + cause if cause else ''}") from None
        self.n_ctx = n_ctx
        self.model = os.fspath(path)

    @property
    def n_seq(self) -> int:
        return int(self._core.n_seq)

    def tokenize(self, text: str | bytes, parse_special: bool = False) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return self._core.tokenize(data, parse_special)

    def entries(self) -> dict[str, ImatrixEntry]:
        out: dict[str, ImatrixEntry] = {}
        for name, (in_sum2, in_sum, counts, in_sketch, in_max2, stream) in self._core.entries().items():
            sums = None if stream is None else StreamSums(stream[0], stream[1], float(stream[2]), dict(stream[3]))
            out[name] = ImatrixEntry(in_sum2, counts.astype(np.float64), in_sum, in_sketch, dict(in_max2), sums)
        return out

    def snapshot(self, dataset: str | None) -> Imatrix:
        """The statistics collected so far as an Imatrix record (chunk count from the counts)."""
        im = Imatrix(self.entries(), [dataset] if dataset is not None else [], 0, self.n_ctx)
        im.chunk_count = im.chunks_from_counts()
        return im

    def cancel(self) -> None:
        self._core.cancel()

    def run(self, tokens: np.ndarray, n_chunk: int, *, dataset: str | None = None,
            progress: Callable[[ImatrixProgress], bool | None] | None = None,
            stop_on_interrupt: bool = True) -> ImatrixRun:
        """Evaluate the first n_chunk chunks of tokens.

        progress is called after every group of chunks (from the worker thread, with the GIL held);
        returning False stops the run. On Ctrl+C the run stops after the current group of chunks:
        with stop_on_interrupt the partial run is returned (cancelled=True), otherwise
        KeyboardInterrupt is raised once the worker has stopped.
        """
        tokens = np.ascontiguousarray(tokens, dtype=np.int32)

        def on_progress(d: dict[str, float]) -> bool:
            if progress is None:
                return True
            p = ImatrixProgress(int(d["chunks_done"]), int(d["chunks"]), int(d["tokens_done"]),
                                int(d["tokens"]), float(d["ppl"]), float(d["elapsed_s"]))
            return progress(p) is not False

        try:
            r, interrupted = run_in_worker(lambda: self._core.run(tokens, n_chunk, on_progress), name="llqx-imatrix",
                                           cancel=self._core.cancel)
        except _core.Error as exc:
            raise LlqxError(str(exc)) from None
        if interrupted and not stop_on_interrupt:
            raise KeyboardInterrupt
        assert isinstance(r, dict)
        return ImatrixRun(imatrix=self.snapshot(dataset), chunks_done=int(r["chunks_done"]), chunks=n_chunk,
                          tokens=int(r["tokens"]), ppl=float(r["ppl"]), ppl_err=float(r["ppl_err"]),
                          eval_s=float(r["eval_s"]), collect_s=float(r.get("collect_s", 0.0)),
                          cancelled=bool(r["cancelled"]) or interrupted,
                          n_tokens_text=int(tokens.size))


def collect_imatrix(model: str | os.PathLike[str], text: str | bytes | None = None, *,
                    tokens: np.ndarray | list[int] | None = None, n_ctx: int = 512, n_batch: int = 2048,
                    n_ubatch: int = 512, threads: int | None = None, n_gpu_layers: int = -1,
                    chunks: int = -1, skip_chunks: int = 0, process_output: bool = False,
                    parse_special: bool = False, compute_ppl: bool = True, dataset: str | None = None,
                    repack: bool = True, sketch_rank: int = DEFAULT_SKETCH_RANK,
                    progress: Callable[[ImatrixProgress], bool | None] | None = None) -> Imatrix:
    """Run model over text (or token ids) like llama-imatrix and return Σx², Σx, counts and the sketch of
    Σ x xᵀ (``sketch_rank`` directions per dense weight; 0: none) per weight.

    Chunks of n_ctx tokens, BOS in front of each chunk where the vocabulary adds one; ``chunks``
    limits how many (-1: all), ``skip_chunks`` drops that many from the start. Ctrl+C raises
    KeyboardInterrupt after the worker stops.
    """
    if (text is None) == (tokens is None):
        raise LlqxError("give either text or tokens")
    col = ImatrixCollector(model, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_ubatch, threads=threads,
                           n_gpu_layers=n_gpu_layers, process_output=process_output, compute_ppl=compute_ppl,
                           repack=repack, sketch_rank=sketch_rank)
    ids = col.tokenize(text, parse_special) if text is not None else np.asarray(tokens, dtype=np.int32)
    n_chunk = plan_chunks(int(ids.size), n_ctx, chunks, skip_chunks)
    ids = ids[skip_chunks * n_ctx:]
    run = col.run(ids, n_chunk, dataset=dataset, progress=progress, stop_on_interrupt=False)
    return run.imatrix
