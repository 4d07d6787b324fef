"""Measuring mixes on the model itself: the KL divergence a mix of types causes on calibration text,
without writing a file (the core quantizes the listed tensors in memory, runs the chunks and restores
them). Used by llqx.sensitivity (one group of tensors per mix) and llqx.verify (whole plans).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import _core
from .errors import LlqxError, core_call
from .imatrix import Imatrix
from .model import ModelInfo, inspect
from .runner import run_in_worker
from .score_metric import importance
from .types import ggml_type

# a mix: (tensor name, ggml type id) for each tensor it changes; the others keep the model's weights
Mix = Sequence[tuple[str, int]]


@dataclass(frozen=True)
class Calibration:
    """Calibration text for measured steps: ``chunks`` chunks of ``ctx`` tokens, cut as llama-perplexity
    cuts them (the second half of each chunk is scored)."""

    text: Path
    chunks: int = 4
    ctx: int = 512
    threads: int = 0
    n_gpu_layers: int = 0

    def check(self) -> None:
        if not self.text.is_file():
            raise LlqxError(f"calibration text not found: {self.text}")
        if self.chunks <= 0:
            raise LlqxError(f"--calibration-chunks must be a positive number of chunks, got {self.chunks}")
        if self.ctx < 8:
            raise LlqxError("the calibration context must be at least 8 tokens")

    @property
    def content(self) -> str:
        try:
            return self.text.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise LlqxError(f"cannot read calibration text {self.text}: {exc.strerror}") from None

    @property
    def key(self) -> str:
        """Identifies the tokens measured on: the text's bytes, the chunking (not threads or devices)."""
        sha = hashlib.sha256(self.content.encode("utf-8")).hexdigest()
        return f"{sha}:{self.ctx}:{self.chunks}"


def check_full_precision(info: ModelInfo, names: Sequence[str]) -> None:
    """Probes replace weights in memory with their round trip through a type: the model must hold them
    in full precision (F32, F16 or BF16)."""
    for name in names:
        t = info.tensor(name)
        if ggml_type(t.type).name.upper() not in ("F32", "F16", "BF16"):
            raise LlqxError(f"measuring on the model needs a full-precision model ({name} is {t.type_name}): "
                            "leave out --calibration-file and --verify for a quantized source")


def calibration_tokens(model: str | os.PathLike[str], cal: Calibration) -> np.ndarray:
    """The first ``cal.chunks`` chunks of the text's tokens (fewer when the text is shorter)."""
    tokens, _ = core_call(_core.eval_tokenize, os.fspath(model), cal.content)
    n_chunk = min(cal.chunks, tokens.size // cal.ctx)
    if n_chunk < 1:
        raise LlqxError(f"the calibration text {cal.text} tokenizes to only {tokens.size} tokens; "
                        f"a chunk needs {cal.ctx}")
    return np.ascontiguousarray(tokens[: n_chunk * cal.ctx], dtype=np.int32)


def measure_mixes(
    model: str | os.PathLike[str],
    mixes: Sequence[Mix],
    imatrix: Imatrix | None,
    cal: Calibration,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[float]:
    """Mean KL divergence (base || mix) on the calibration chunks, one per mix; tensors are quantized
    with the imatrix's weights as llama-quantize would."""
    info = inspect(model)
    tokens = calibration_tokens(model, cal)
    weights: dict[str, np.ndarray | None] = {}
    spec = []
    for mix in mixes:
        items = []
        for name, tid in mix:
            if name not in weights:
                weights[name] = importance(imatrix, info.tensor(name))
            items.append((name, int(tid), weights[name]))
        spec.append(items)
    threads = cal.threads if cal.threads > 0 else (os.cpu_count() or 1)
    stop = threading.Event()

    def progress(done: int, total: int) -> bool:
        if on_progress is not None:
            on_progress(done, total)
        return not stop.is_set()

    def work() -> object:
        return core_call(_core.probe_mixes, os.fspath(model), tokens, cal.ctx, spec, threads, cal.n_gpu_layers,
                         progress)

    try:
        result, interrupted = run_in_worker(work, name="llqx-probe", cancel=stop.set)
    except LlqxError:
        if stop.is_set():
            raise KeyboardInterrupt from None
        raise
    if interrupted:
        raise KeyboardInterrupt
    assert isinstance(result, dict)
    return [float(x) for x in np.asarray(result["kld"], dtype=np.float64)]
