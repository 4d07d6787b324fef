"""`llqx imatrix`: llama-imatrix's flags and meaning, plus Σx (mean activations) in the output.

    llqx imatrix -m model.gguf -f text.txt [-o imatrix.gguf] [-c 512] [--chunks N] [--in-file prev.gguf ...]
    llqx imatrix --show-statistics --in-file imatrix.gguf [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import TextColumn

from ..errors import LlqxError
from ..imatrix import Imatrix
from ..imatrix_collect import (
    DEFAULT_SKETCH_RANK,
    SKETCH_RANK,
    ImatrixCollector,
    ImatrixProgress,
    default_threads,
    plan_chunks,
)
from ..imatrix_select import check_imatrix_fits
from ..imatrix_stats import layer_stats, stats_json, stats_tables, tensor_stats
from ..llama_rules import quantizable_tensors
from ..model import ModelInfo
from ..probe import Calibration, check_full_precision
from ..progress import progress_bar
from ..sensitivity import measure_groups, method_key

logger = logging.getLogger("llqx.imatrix")


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "imatrix", help="compute an importance matrix with activations (like llama-imatrix)",
        description="Run a model over calibration text in chunks like llama-imatrix and write per weight "
                    "tensor and expert Σx², Σx, token counts and a sketch of Σ x xᵀ (GGUF; upstream tools read it).")
    p.add_argument("-m", "--model", help="model GGUF (F16/BF16/F32 or quantized)")
    p.add_argument("-f", "--file", help="calibration text file")
    p.add_argument("-o", "--output-file", "--output", dest="output", default="imatrix.gguf",
                   help="output file (default: imatrix.gguf)")
    p.add_argument("-c", "--ctx-size", dest="ctx", type=int, default=512,
                   help="chunk size in tokens (default 512)")
    p.add_argument("-b", "--batch-size", dest="batch", type=int, default=2048,
                   help="logical batch (default 2048); k·c tokens run k chunks at once, like llama-imatrix")
    p.add_argument("-ub", "--ubatch-size", dest="ubatch", type=int, default=512,
                   help="physical batch (default 512)")
    p.add_argument("-t", "--threads", type=int, default=None, help=f"threads (default {default_threads()})")
    p.add_argument("-ngl", "--gpu-layers", "--n-gpu-layers", dest="ngl", type=int, default=-1,
                   help="layers to offload to a GPU (-1: llama.cpp's default)")
    p.add_argument("-nr", "--no-repack", dest="repack", action="store_false",
                   help="disable ggml's CPU weight repacking (llama.cpp's AMX path crashes on some quantized "
                        "models: use this if llqx imatrix dies on a Q8_0/Q4_0 input)")
    p.add_argument("--chunks", type=int, default=-1, help="maximum number of chunks (-1: all)")
    p.add_argument("--chunk", "--from-chunk", dest="skip", type=int, default=0,
                   help="skip this many chunks at the start of the text")
    p.add_argument("-ofreq", "--output-frequency", dest="out_freq", type=int, default=10,
                   help="write the output every N chunks (default 10)")
    p.add_argument("--save-frequency", dest="save_freq", type=int, default=0,
                   help="also write OUTPUT.at_N every N chunks (default 0: never)")
    p.add_argument("--in-file", dest="in_files", action="append", default=[],
                   help="imatrix to merge with / continue from (repeatable); weighted by their counts")
    p.add_argument("--process-output", action="store_true", help="also collect output.weight")
    p.add_argument("--sketch-rank", type=int, default=DEFAULT_SKETCH_RANK,
                   help=f"also store a sketch of each dense tensor's input second moments with N columns (e.g. "
                        f"{SKETCH_RANK}), for llqx-quantize --score-sketch (default {DEFAULT_SKETCH_RANK}: none)")
    p.add_argument("--sensitivity-chunks", type=int, default=0, metavar="N",
                   help="(llqx) after collecting, measure each tensor group's KL divergence when quantized, on "
                        "the text's first N chunks, and store it in the file: llqx-quantize --target-bpw then "
                        "plans with measured sensitivities and no calibration text (one forward pass of N "
                        "chunks per group; full-precision models; default 0: off)")
    p.add_argument("--parse-special", action="store_true", help="parse special tokens in the text")
    p.add_argument("--no-ppl", action="store_true", help="do not compute perplexity")
    p.add_argument("--show-statistics", action="store_true",
                   help="show per-tensor and per-layer statistics of the --in-file (or of the result)")
    p.add_argument("--output-format", choices=("gguf", "dat"), default=None,
                   help="gguf (default) or llama.cpp's legacy dat")
    p.add_argument("--json", action="store_true",
                   help="print a JSON summary (the statistics with --show-statistics)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar, only errors")
    p.add_argument("-v", "--verbose", action="store_true", help="show llama.cpp's log")
    p.set_defaults(func=run)


def _check_output(path: Path, args: argparse.Namespace) -> None:
    if path.is_dir():
        raise LlqxError(f"output is a directory: {path}")
    if str(path) == "" or path.name == "":
        raise LlqxError("empty output path")
    # an --in-file may be the output (it is read before anything is written): continuing in place
    for other in (args.model, args.file):
        if other and Path(other).exists() and path.exists() and path.resolve() == Path(other).resolve():
            raise LlqxError(f"output {path} would overwrite an input")


def _show_statistics(im: Imatrix, title: str, as_json: bool, console: Console) -> None:
    ts = tensor_stats(im)
    if not ts:
        raise LlqxError(f"no statistics: {title} has no data")
    ls = layer_stats(ts)
    if as_json:
        print(json.dumps(stats_json(ts, ls), indent=1))
        return
    if not console.is_terminal:
        console.width = max(console.width, 150)  # a pipe or file gets the whole table, not a squeezed one
    for table in stats_tables(ts, ls, title):
        console.print(table)


def _save(im: Imatrix, path: Path, fmt: str) -> None:
    im.save(path, fmt)


def run(args: argparse.Namespace) -> int:
    out = Path(args.output)
    fmt = args.output_format or "gguf"
    console = Console(stderr=True, quiet=args.quiet)

    if args.file is None:
        # no text: statistics of, or a merge of, the --in-file(s)
        if not args.in_files:
            raise LlqxError("nothing to do: give a text with -f, or --in-file files to merge or inspect")
        base = _merge_inputs(args)
        assert base is not None
        if args.show_statistics:
            _show_statistics(base, ", ".join(args.in_files), args.json, Console())
            return 0
        _check_output(out, args)
        _save(base, out, fmt)
        if not args.quiet:
            console.print(f"merged {len(args.in_files)} file(s) into {out}")
        return 0

    if args.model is None:
        raise LlqxError("a model is needed (-m) to collect an imatrix")
    _check_output(out, args)
    if args.save_freq > 0:
        _check_output(Path(f"{out}.at_{args.save_freq}"), args)
    text_path = Path(args.file)
    if not text_path.is_file():
        raise LlqxError(f"text file not found: {text_path}")
    if fmt == "gguf" and args.output_format is None and not str(out).endswith(".gguf"):
        logger.warning("saving imatrix in GGUF format with a suffix other than .gguf; "
                       "use --output-format dat for the legacy format")

    model_path = Path(args.model)
    if not model_path.is_file():
        raise LlqxError(f"model not found: {model_path}")
    from ..model import inspect

    try:
        info = inspect(model_path)
    except LlqxError as exc:
        raise LlqxError(f"cannot load model {model_path}: {exc}") from None

    base = _merge_inputs(args)
    if base is not None:
        check_imatrix_fits(base, info, f"--in-file {', '.join(args.in_files)}", every_entry=True)

    threads = args.threads if args.threads and args.threads > 0 else default_threads()
    cal = _sensitivity_calibration(args, info, text_path, fmt, threads)
    col = ImatrixCollector(model_path, n_ctx=args.ctx, n_batch=args.batch, n_ubatch=args.ubatch,
                           threads=threads, n_gpu_layers=args.ngl, repack=args.repack,
                           process_output=args.process_output, compute_ppl=not args.no_ppl,
                           sketch_rank=args.sketch_rank)
    text = text_path.read_bytes()
    if text.endswith(b"\n"):
        text = text[:-1]  # llama.cpp's -f drops one trailing newline
    tokens = col.tokenize(text, args.parse_special)
    n_chunk = plan_chunks(int(tokens.size), args.ctx, args.chunks, args.skip)
    tokens = tokens[args.skip * args.ctx:]
    dataset = args.file
    base_chunks = base.chunks_from_counts() if base is not None else 0

    def combined() -> Imatrix:
        snap = col.snapshot(dataset)
        if base is None:
            return snap
        im = base.merge(snap)
        im.chunk_size = args.ctx
        im.chunk_count = im.chunks_from_counts()
        return im

    last_saved = {"chunks": base_chunks}

    def periodic(chunks_total: int) -> None:
        prev = last_saved["chunks"]
        last_saved["chunks"] = chunks_total
        save_out = args.out_freq > 0 and chunks_total // args.out_freq > prev // args.out_freq
        save_at = args.save_freq > 0 and chunks_total // args.save_freq > prev // args.save_freq
        if not (save_out or save_at):
            return
        im = combined()
        if save_out:
            _save(im, out, fmt)
        if save_at:
            _save(im, Path(f"{out}.at_{im.chunk_count}"), fmt)

    show = not args.quiet and not args.json
    progress = progress_bar("[bold]imatrix", "tok", console=console, counts="thousands", disable=not show,
                            extra=(TextColumn("{task.fields[ppl]}"),))
    task = progress.add_task("imatrix", total=n_chunk * args.ctx, ppl="")

    def on_progress(p: ImatrixProgress) -> bool:
        ppl = "" if math.isnan(p.ppl) else f"PPL {p.ppl:.4f}"
        progress.update(task, completed=p.tokens_done, ppl=ppl)
        periodic(base_chunks + p.chunks_done)
        return True

    if not args.quiet:
        console.print(f"computing over {n_chunk} chunks of {args.ctx} tokens ({col.n_seq} at a time), "
                      f"{threads} threads")
    with progress:
        result = col.run(tokens, n_chunk, dataset=dataset, progress=on_progress, stop_on_interrupt=True)

    final = base.merge(result.imatrix) if base is not None else result.imatrix
    final.chunk_size = args.ctx  # like llama-imatrix: this run's chunk size, chunks counted in it
    final.chunk_count = final.chunks_from_counts()
    if not final.entries:
        raise LlqxError("nothing was collected (interrupted before the first chunk finished)")
    _save(final, out, fmt)
    rate = result.tokens / result.eval_s if result.eval_s > 0 else 0.0
    summary = {"output": str(out), "chunks": result.chunks_done, "chunks_planned": n_chunk,
               "chunk_count": final.chunk_count, "tokens": result.tokens, "eval_s": result.eval_s,
               "collect_s": result.collect_s,
               "tokens_per_s": rate, "ppl": None if math.isnan(result.ppl) else result.ppl,
               "ppl_err": None if math.isnan(result.ppl) else result.ppl_err, "cancelled": result.cancelled,
               "entries": len(final.entries)}
    if result.cancelled and args.json and not args.show_statistics:
        print(json.dumps(summary, indent=1))
    if not math.isnan(result.ppl) and not args.quiet and not args.json:
        console.print(f"Final estimate: PPL = {result.ppl:.4f} +/- {result.ppl_err:.5f}")
    if result.cancelled:
        done = args.skip + result.chunks_done
        rest = f" --chunks {n_chunk - result.chunks_done}" if args.chunks >= 0 else ""
        console.quiet = False  # shown even with --quiet: the file holds only part of the job
        console.print(f"[yellow]interrupted[/] after {result.chunks_done} of {n_chunk} chunks: saved {out}; "
                      f"continue with --in-file {out} --chunk {done}{rest}", highlight=False)
        return 130
    if not args.quiet:
        console.print(f"saved {len(final.entries)} entries ({final.chunk_count} chunks) to {out} "
                      f"[{rate:,.1f} tokens/s]", highlight=False)
    if cal is not None:
        del col  # frees the collector's model and context before the probes load their writable copy
        seconds = _measure_sensitivities(final, info, cal, out, console, show)
        if seconds is None:
            return 130
        summary["sensitivity_groups"], summary["sensitivity_s"] = len(final.sensitivities), seconds
    if args.json and not args.show_statistics:
        print(json.dumps(summary, indent=1))
    if args.show_statistics:
        _show_statistics(final, str(out), args.json, Console())
    return 0


def _sensitivity_calibration(
    args: argparse.Namespace, info: ModelInfo, text: Path, fmt: str, threads: int
) -> Calibration | None:
    """What --sensitivity-chunks measures on (checked before the long collection starts)."""
    if args.sensitivity_chunks == 0:
        return None
    if args.sensitivity_chunks < 0:
        raise LlqxError(f"--sensitivity-chunks must be a number of chunks, got {args.sensitivity_chunks}")
    if fmt != "gguf":
        raise LlqxError("--sensitivity-chunks stores its measurements in GGUF keys: not with --output-format dat")
    check_full_precision(info, [t.name for t in quantizable_tensors(info)])
    cal = Calibration(text, chunks=args.sensitivity_chunks, ctx=args.ctx, threads=threads, n_gpu_layers=args.ngl)
    cal.check()
    return cal


def _measure_sensitivities(
    im: Imatrix, info: ModelInfo, cal: Calibration, out: Path, console: Console, show: bool
) -> float | None:
    """Probe every tensor group with the finished imatrix and save the file again with the results; the
    imatrix is already saved, so Ctrl+C here loses no collected data. Returns the seconds taken, None
    when interrupted."""
    t0 = time.perf_counter()
    names = [t.name for t in quantizable_tensors(info)]
    progress = progress_bar("[bold]sensitivity", "groups", console=console, disable=not show)
    task = progress.add_task("sensitivity", total=None)
    try:
        with progress:
            # the weights as saved (float32), exactly what the writer will read from the file
            klds = measure_groups(info, names, Imatrix.load(out), cal,
                                  on_progress=lambda done, total: progress.update(task, completed=done, total=total))
    except KeyboardInterrupt:
        console.quiet = False
        console.print(f"[yellow]interrupted[/] while measuring sensitivities: {out} holds the imatrix without them",
                      highlight=False)
        return None
    im.sensitivities, im.sensitivity_method = klds, method_key()
    im.sensitivity_source = f"{cal.text.name} ({cal.chunks}x{cal.ctx} tokens, sha256 {cal.key[:12]})"
    _save(im, out, "gguf")
    seconds = time.perf_counter() - t0
    if show:
        console.print(f"measured {len(klds)} tensor groups in {seconds:.0f} s; saved to {out}", highlight=False)
    return seconds


def _merge_inputs(args: argparse.Namespace) -> Imatrix | None:
    if not args.in_files:
        return None
    loaded = [Imatrix.load(p) for p in args.in_files]
    chunk = args.ctx
    if args.file is None:
        chunk = next((x.chunk_size for x in loaded if x.chunk_size), args.ctx)
    first = loaded[0].to_raw(chunk) if loaded[0].legacy else loaded[0]
    if first.chunk_size == 0:
        first.chunk_size = chunk
    return first.merge(*loaded[1:]) if len(loaded) > 1 else first


def main(argv: list[str] | None = None) -> int:
    from . import main as cli_main

    return cli_main(["imatrix", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
