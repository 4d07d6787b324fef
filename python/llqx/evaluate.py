"""Quality of quantized models against their base model, as llama-perplexity measures it.

The text is tokenized with the base model's vocabulary (BOS added as llama-perplexity does), cut
into chunks of ``ctx`` tokens and, in each chunk, the second half is scored (positions
``ctx/2 .. ctx-2`` predict the next token). The base model runs once per (model, text, settings):
its log-probabilities are cached on disk and every quant is compared against them.

Base cache format (``$LLQX_CACHE_DIR/eval/<key>.rows`` + ``<key>.npz``): one row of uint16 per
scored token, exactly llama-perplexity's ``--kl-divergence-base`` row: two float32 (scale, minimum
log-prob) then the log-softmax over the full vocabulary quantized linearly to 16 bits over
[max-16, max] (entries below max-16 are dropped from the KLD sum, as upstream does). This keeps the
full distribution (KLD needs it; top-k would bias it) at 2 bytes per vocabulary entry with a
quantization step of ≤ 2.5e-4 nats, and gives exactly the numbers llama-perplexity gives. The
``.npz`` holds the tokens, the exact per-token NLL of the base and the settings. The key hashes the
format version, the base model's identity (size and sampled content), the text's sha256, ``ctx`` and
the chunk count; both files are written to temporary names and renamed. The statistics over the
per-token values are in ``evaluate_stats.py``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import _core
from .atomic import atomic_path
from .data import cache_dir
from .errors import LlqxError, core_call
from .evaluate_stats import Estimate, mean_and_err, token_statistics
from .model import inspect

CACHE_VERSION = 1

# on_progress(stage, done_chunks, total_chunks): stage is "base" or the quant's path
ProgressFn = Callable[[str, int, int], None]


@dataclass
class BaseResult:
    path: str
    bpw: float
    size: int
    ppl: Estimate  # from the exact log-probabilities
    n_tokens: int
    seconds: float
    cached: bool


@dataclass
class QuantResult:
    path: str
    bpw: float
    size: int
    n_tokens: int
    ppl: Estimate
    ppl_base: Estimate  # from the stored (16-bit) base log-probabilities, as llama-perplexity reports it
    ln_ppl_ratio: Estimate
    ppl_ratio: Estimate
    # Pearson correlation of per-token log-probabilities: llama-perplexity's Cor(ln PPL(Q), ln PPL(base))
    rho_ppl: float
    kld_mean: Estimate
    kld_median: Estimate  # error from a seeded bootstrap over tokens
    kld_p99: Estimate  # error from a seeded bootstrap over tokens
    kld_max: float
    same_top: Estimate  # fraction of tokens whose most likely next token agrees
    dp_rms: Estimate  # RMS of p_q(token) - p_base(token)
    dp_mean: Estimate
    seconds: float


@dataclass
class EvalResult:
    base: BaseResult
    quants: list[QuantResult]
    text: str
    text_sha256: str
    ctx: int
    n_chunk: int
    n_tokens: int  # scored tokens
    settings: dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def model_identity(path: Path) -> str:
    """sha256 of the file size and sampled content (the GGUF header and 64 spread 64 KiB blocks).

    Cheap on multi-GB files, yet any re-quantization changes the header or the sampled data.
    """
    size = path.stat().st_size
    digest = hashlib.sha256(f"{size}\n".encode())
    block = 1 << 16
    with path.open("rb") as f:
        digest.update(f.read(1 << 20))
        for i in range(64):
            f.seek(max(0, (size - block) * i // 63))
            digest.update(f.read(block))
    return digest.hexdigest()


@dataclass
class _Base:
    tokens: np.ndarray
    rows: np.ndarray
    nll: np.ndarray
    n_vocab: int
    n_chunk: int
    seconds: float
    cached: bool


def _read_text(text: str | os.PathLike[str]) -> tuple[str, str]:
    """(name, content): a Path is read as UTF-8; a str is the text itself."""
    if isinstance(text, os.PathLike):
        path = Path(text)
        try:
            return str(path), path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise LlqxError(f"cannot read text file {path}: {exc.strerror}") from None
    return "<text>", text


def _base_pass(
    base: Path,
    content: str,
    ctx: int,
    chunks: int | None,
    threads: int,
    n_gpu_layers: int,
    repack: bool,
    cache: bool,
    on_progress: ProgressFn | None,
) -> _Base:
    text_sha = hashlib.sha256(content.encode("utf-8")).hexdigest()
    key_src = json.dumps(
        {"v": CACHE_VERSION, "model": model_identity(base), "text": text_sha, "ctx": ctx, "chunks": chunks},
        sort_keys=True,
    )
    key = hashlib.sha256(key_src.encode()).hexdigest()[:32]
    cdir = cache_dir() / "eval"
    meta_path, rows_path = cdir / f"{key}.npz", cdir / f"{key}.rows"
    n_scored = _core.eval_n_scored(ctx)
    if cache and meta_path.exists() and rows_path.exists():
        try:
            with np.load(meta_path) as z:
                tokens, nll = z["tokens"], z["nll"]
                n_vocab, n_chunk = int(z["n_vocab"]), int(z["n_chunk"])
            row_size = _core.eval_row_size(n_vocab)
            if (
                rows_path.stat().st_size == n_chunk * n_scored * row_size * 2
                and nll.size == n_chunk * n_scored
            ):
                rows = np.memmap(rows_path, dtype=np.uint16, mode="r", shape=(n_chunk * n_scored, row_size))
                if on_progress:
                    on_progress("base", n_chunk, n_chunk)
                return _Base(tokens, rows, nll, n_vocab, n_chunk, 0.0, True)
        except (OSError, ValueError, KeyError):
            pass  # a corrupt cache entry is recomputed

    t0 = time.perf_counter()
    all_tokens, n_vocab = core_call(_core.eval_tokenize, str(base), content)  # type: ignore[misc]
    if all_tokens.size < 2 * ctx:
        raise LlqxError(
            f"the text tokenizes to only {all_tokens.size} tokens; a context of {ctx} needs at "
            f"least {2 * ctx}"
        )
    n_chunk = all_tokens.size // ctx
    if chunks is not None and chunks > 0:
        n_chunk = min(n_chunk, chunks)
    tokens = np.ascontiguousarray(all_tokens[: n_chunk * ctx], dtype=np.int32)
    row_size = _core.eval_row_size(n_vocab)
    n_rows = n_chunk * n_scored
    nll = np.zeros(n_rows, dtype=np.float32)
    progress = (lambda d, t: on_progress("base", d, t)) if on_progress else None
    if not cache:
        rows: np.ndarray = np.zeros((n_rows, row_size), dtype=np.uint16)
        core_call(_core.eval_base, str(base), tokens, n_chunk, rows, nll, n_vocab, ctx, threads, n_gpu_layers,
                   repack, progress)
        return _Base(tokens, rows, nll, n_vocab, n_chunk, time.perf_counter() - t0, False)
    # rows straight into the cache file (it can be GBs); both files appear only once complete
    with atomic_path(rows_path) as rows_tmp, atomic_path(meta_path) as meta_tmp:
        rows = np.memmap(rows_tmp, dtype=np.uint16, mode="w+", shape=(n_rows, row_size))
        core_call(_core.eval_base, str(base), tokens, n_chunk, rows, nll, n_vocab, ctx, threads, n_gpu_layers,
                   repack, progress)
        rows.flush()
        del rows
        with meta_tmp.open("wb") as f:
            np.savez(f, tokens=tokens, nll=nll, n_vocab=np.int64(n_vocab), n_chunk=np.int64(n_chunk),
                     ctx=np.int64(ctx), key=np.str_(key_src))
    rows = np.memmap(rows_path, dtype=np.uint16, mode="r", shape=(n_rows, row_size))
    return _Base(tokens, rows, nll, n_vocab, n_chunk, time.perf_counter() - t0, False)


def evaluate(
    base: str | os.PathLike[str],
    quants: Sequence[str | os.PathLike[str]],
    text: str | os.PathLike[str],
    *,
    ctx: int = 512,
    chunks: int | None = None,
    threads: int | None = None,
    n_gpu_layers: int = 0,
    repack: bool = False,
    cache: bool = True,
    on_progress: ProgressFn | None = None,
    text_name: str | None = None,
) -> EvalResult:
    """PPL, KLD, ρPPL, same-top and Δp of each quant against ``base`` on ``text``.

    ``text`` is a path (``Path``/``os.PathLike``, read as UTF-8) or the text itself (``str``;
    ``text_name`` then names it in the result).
    ``ctx`` tokens per chunk, at most ``chunks`` chunks (all by default), ``threads`` for decoding and
    the per-token math (all cores by default). ``repack`` enables ggml's CPU weight repacking (off:
    its AMX path crashes on Q4_0 at this llama.cpp version). The base pass is cached unless
    ``cache=False``. Numbers match ``llama-perplexity --kl-divergence`` on the same tokens.
    """
    if ctx < 8:
        raise LlqxError("context size (-c) must be at least 8 tokens")
    if chunks is not None and chunks <= 0:
        raise LlqxError(f"--chunks must be a positive number of chunks, got {chunks}")
    if threads is not None and threads < 0:
        raise LlqxError(f"--threads must be positive (or 0 for all cores), got {threads}")
    if n_gpu_layers < -1:
        raise LlqxError(f"--n-gpu-layers must be -1 (all) or a count, got {n_gpu_layers}")
    base_path = Path(base)
    quant_paths = [Path(q) for q in quants]
    for p in [base_path, *quant_paths]:
        if not p.is_file():
            raise LlqxError(f"model not found: {p}")
    # read every header first: a bad file fails in one clear line before any model runs
    infos = {p: inspect(p) for p in [base_path, *quant_paths]}
    for p, info in infos.items():
        trained = info.metadata.get(f"{info.architecture}.context_length")
        if isinstance(trained, int) and 0 < trained < ctx:
            raise LlqxError(f"context size {ctx} is larger than the {trained} tokens {p} was trained on "
                            f"(its logits past {trained} are meaningless): use -c {trained} or less")
    threads = threads if threads and threads > 0 else (os.cpu_count() or 1)
    name, content = _read_text(text)
    name = text_name or name
    text_sha = hashlib.sha256(content.encode("utf-8")).hexdigest()
    b = _base_pass(base_path, content, ctx, chunks, threads, n_gpu_layers, repack, cache, on_progress)
    base_info = infos[base_path]
    nll_b = b.nll.astype(np.float64)
    lp = mean_and_err(nll_b)
    base_result = BaseResult(
        str(base_path),
        base_info.bpw,
        base_path.stat().st_size,
        Estimate(math.exp(lp.value), math.exp(lp.value) * (lp.err or 0.0)),
        int(b.nll.size),
        b.seconds,
        b.cached,
    )
    results: list[QuantResult] = []
    for q in quant_paths:
        t0 = time.perf_counter()
        progress = (lambda d, t, q=q: on_progress(str(q), d, t)) if on_progress else None
        per_token = core_call(
            _core.eval_compare,
            str(q),
            b.tokens,
            b.n_chunk,
            b.rows,
            b.n_vocab,
            ctx,
            threads,
            n_gpu_layers,
            repack,
            progress,
        )
        assert isinstance(per_token, dict)
        stats = token_statistics(
            per_token["nll"],
            per_token["nll_base"],
            per_token["kld"],
            per_token["p_diff"],
            per_token["same_top"],
        )
        info = infos[q]
        results.append(
            QuantResult(
                path=str(q),
                bpw=info.bpw,
                size=q.stat().st_size,
                n_tokens=int(b.nll.size),
                seconds=time.perf_counter() - t0,
                **stats,
            )
        )  # type: ignore[arg-type]
    return EvalResult(
        base=base_result,
        quants=results,
        text=name,
        text_sha256=text_sha,
        ctx=ctx,
        n_chunk=b.n_chunk,
        n_tokens=int(b.nll.size),
        settings={"threads": threads, "n_gpu_layers": n_gpu_layers, "repack": repack},
    )
