"""`llqx eval BASE QUANT [QUANT...] -f TEXT`: PPL, KLD, ρPPL and same-top of quants against their base."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..evaluate import Estimate, EvalResult, ProgressFn, evaluate
from ..progress import progress_bar


@contextlib.contextmanager
def eval_progress(
    ctx: int, console: Console | None = None, enabled: bool = True
) -> Iterator[ProgressFn | None]:
    """A rich progress bar per model (tokens/s, ETA) for evaluate(on_progress=...)."""
    if not enabled:
        yield None
        return
    progress = progress_bar("{task.description}", "tok", console=console or Console(stderr=True), counts="thousands")
    tasks: dict[str, int] = {}

    def update(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            label = "base model" if stage == "base" else Path(stage).name
            tasks[stage] = progress.add_task(label, total=total * ctx)
        progress.update(tasks[stage], completed=done * ctx)

    with progress:
        yield update


def _name(path: str) -> str:
    return Path(path).name.removesuffix(".gguf")


def _pm(e: Estimate, fmt: str = "{:.6f}", scale: float = 1.0) -> str:
    if e.err is None:
        return fmt.format(e.value * scale)
    return f"{fmt.format(e.value * scale)} ±{fmt.format(e.err * scale)}"


def _size_gb(size: int) -> str:
    gb = size / 1e9
    return f"{gb:.1f}" if gb >= 10 else f"{gb:.2f}" if gb >= 1 else f"{gb:.3f}"


def markdown_table(result: EvalResult) -> str:
    """The model-card table: Model | BPW | Size (GB) | μPPL | 𝜌PPL | μKLD | Same Top-P."""
    lines = [
        "| Model | BPW | Size (GB) | μPPL | 𝜌PPL | μKLD | Same Top-P |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    b = result.base
    lines.append(f"| {_name(b.path)} | {b.bpw:.4f} | {_size_gb(b.size)} | {_pm(b.ppl)} | 100% | N/A | N/A |")
    for q in result.quants:
        lines.append(
            f"| {_name(q.path)} | {q.bpw:.4f} | {_size_gb(q.size)} | {_pm(q.ppl)} | {100 * q.rho_ppl:.2f}% | "
            f"{_pm(q.kld_mean)} | {_pm(q.same_top, '{:.3f}', 100)} |"
        )
    return "\n".join(lines)


def rich_table(result: EvalResult) -> Table:
    table = Table(
        title=f"{result.n_tokens:,} tokens of {Path(result.text).name} ({result.n_chunk} chunks of "
        f"{result.ctx}); PPL(base) = {_pm(result.base.ppl, '{:.4f}')}"
    )
    for col in (
        "model",
        "BPW",
        "size GB",
        "PPL",
        "PPL ratio",
        "ρPPL",
        "KLD mean",
        "KLD median",
        "KLD 99%",
        "KLD max",
        "same top",
        "Δp RMS",
    ):
        table.add_column(col, justify="left" if col == "model" else "right")
    for q in result.quants:
        table.add_row(
            _name(q.path),
            f"{q.bpw:.4f}",
            _size_gb(q.size),
            _pm(q.ppl, "{:.4f}"),
            _pm(q.ppl_ratio, "{:.4f}"),
            f"{100 * q.rho_ppl:.2f}%",
            _pm(q.kld_mean, "{:.5f}"),
            _pm(q.kld_median, "{:.5f}"),
            _pm(q.kld_p99, "{:.4f}"),
            f"{q.kld_max:.4f}",
            _pm(q.same_top, "{:.2f}", 100) + "%",
            _pm(q.dp_rms, "{:.3f}", 100) + "%",
        )
    return table


def run(args: argparse.Namespace) -> int:
    out = Console()
    if not out.is_terminal:
        out = Console(width=200)  # a pipe gets the whole table, not columns folded to 80
    with eval_progress(args.ctx, enabled=not (args.quiet or args.json)) as on_progress:
        result = evaluate(
            args.base,
            args.quants,
            Path(args.file),
            ctx=args.ctx,
            chunks=args.chunks,
            threads=args.threads,
            n_gpu_layers=args.n_gpu_layers,
            repack=args.repack,
            cache=not args.no_cache,
            on_progress=on_progress,
        )
    if args.json:
        sys.stdout.write(json.dumps(result.to_dict(), indent=2) + "\n")
    elif args.markdown:
        sys.stdout.write(markdown_table(result) + "\n")
    else:
        out.print(rich_table(result))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "eval",
        help="PPL/KLD/same-top of quantized models against their base model",
        description="Evaluate quantized models against their base model on a text, as llama-perplexity "
        "--kl-divergence does (second half of each chunk scored). The base model runs once; its "
        "log-probabilities are cached under $LLQX_CACHE_DIR/eval (2 bytes per vocabulary entry per scored "
        "token: about 2.5 GB for 8k tokens of a 152k vocabulary; delete the folder to reclaim it).",
    )
    p.add_argument("base", help="full-precision (or reference) GGUF model")
    p.add_argument("quants", nargs="+", help="quantized GGUF models to compare against the base")
    p.add_argument("-f", "--file", required=True, help="evaluation text (UTF-8); never the calibration text")
    p.add_argument("-c", "--ctx", type=int, default=512, help="tokens per chunk (default 512)")
    p.add_argument("--chunks", type=int, default=None, help="at most this many chunks (default: all)")
    p.add_argument(
        "-t", "--threads", type=int, default=os.cpu_count() or 1, help="threads (default: all cores)"
    )
    p.add_argument("-ngl", "--n-gpu-layers", type=int, default=0, help="layers to offload (llama.cpp's -ngl)")
    p.add_argument(
        "--repack",
        action="store_true",
        help="enable ggml's CPU weight repacking (off by default: its AMX path crashes on Q4_0)",
    )
    p.add_argument("--no-cache", action="store_true", help="do not read or write the base model cache")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--markdown", action="store_true", help="print the model-card table (markdown)")
    fmt.add_argument("--json", action="store_true", help="print all statistics as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress, only errors and the result")
    p.add_argument("-v", "--verbose", action="store_true", help="show llama.cpp's log")
    p.set_defaults(func=run)
