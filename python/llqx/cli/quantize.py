"""`llqx-quantize`: a drop-in for llama.cpp's `llama-quantize` (b11312), plus `llqx quantize`.

`llqx-quantize [options] input.gguf [output.gguf] type [nthreads]` parses exactly as upstream's
tools/quantize/quantize.cpp: options (each starting with ``--``) only before the positionals,
the type by name (any case) or number, the output defaulting to ``[input dir]/ggml-model-<TYPE>.gguf``,
usage on stdout and exit 1 for bad arguments (``--help`` included, as upstream). Its output file is
byte-identical to upstream's for the same inputs. Unlike upstream it refuses bad input up front
with one line on stderr (missing/foreign/truncated model, output equal to input, unwritable
output directory, an imatrix made for another model) and never leaves a partial output file.

Both entry points build the same typed :class:`~llqx.request.QuantizeRequest` and call :func:`run`,
which writes with llama.cpp as upstream does, or, when a target is set, hands the request to
:func:`llqx.cli.target.run_target`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import fields
from typing import Any

from .. import _core
from .. import log as _log
from ..errors import LlqxError
from ..imatrix import Imatrix
from ..imatrix_select import select_imatrix
from ..model import inspect
from ..quantize import quantize
from ..request import DEFAULT_CANDIDATES, QuantizeRequest
from ..types import FILE_TYPES, FileType
from .quantize_args import (
    PROG,
    UsageError,
    add_quantize_arguments,
    add_target_arguments,
    parse_argv,
    resolve_positionals,
    usage_text,
)
from .signals import sigterm_as_interrupt

# ---- running ----------------------------------------------------------------------------------

def _interrupted() -> None:
    """Ctrl+C: the partial output is already gone; llama.cpp's worker cannot be stopped, so leave now."""
    _core.log_set(None)  # the worker's log stops here, so this message is the last line
    print(f"{PROG}: interrupted, no output written", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)


class _LlamaLog:
    """Show llama.cpp's log on stderr, plain, as upstream does (INFO; DEBUG with verbose; ERROR if quiet)."""

    def __init__(self, quiet: bool, verbose: bool) -> None:
        self.level = logging.ERROR if quiet else logging.DEBUG if verbose else logging.INFO
        self.logger = _log.logger
        self.handler = logging.StreamHandler(sys.stderr)
        self.handler.setFormatter(logging.Formatter("%(message)s"))

    def __enter__(self) -> _LlamaLog:
        self.saved = (self.logger.level, self.logger.propagate)
        self.logger.setLevel(self.level)
        self.logger.propagate = False
        self.logger.addHandler(self.handler)
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self.saved[0])
        self.logger.propagate = self.saved[1]


def run(args: QuantizeRequest) -> int:
    """Quantize as the request says; LlqxError for bad input (the caller prints it)."""
    if args.target_mode:
        from .target import run_target  # scoring and planning load only for a target

        return run_target(args)
    for given, option in ((args.state_file, "--state-file"), (args.candidates != DEFAULT_CANDIDATES, "--candidates"),
                          (args.score_elements, "--score-elements"), (args.ties, "--tie"),
                          (args.min_types, "--min-type"), (args.max_types, "--max-type"),
                          (args.calibration_file, "--calibration-file"), (args.verify, "--verify")):
        if given:
            raise LlqxError(f"{option} is only used with --target-bpw, --target-size or --budget")
    ft: FileType | None = args.ftype
    if ft is None:
        raise LlqxError("missing ftype")
    say = (lambda *a, **k: None) if args.quiet or args.json else print
    imatrix = Imatrix.load(args.imatrix) if args.imatrix is not None else None
    stack = ExitStack()
    t0 = time.perf_counter()

    def start() -> None:
        """Every check passed: say what upstream says, then show llama.cpp's log."""
        nonlocal t0
        if imatrix is not None:
            if imatrix.datasets:
                say("load_imatrix: imatrix datasets=[" + ", ".join(f"'{d}'" for d in imatrix.datasets) + "]")
            say(f"load_imatrix: loaded {len(imatrix.entries)} importance matrix entries from {args.imatrix} "
                f"computed on {imatrix.chunk_count} chunks")
            n = len(select_imatrix(imatrix, args.include_weights, args.exclude_weights).weights)
            if n:
                say(f"prepare_imatrix: have {n} importance matrix entries")
        what = (f"calculating quantization size for '{args.input}' as {ft.name}" if args.dry_run
                else f"quantizing '{args.input}' to '{args.output}' as {ft.name}")
        if args.nthread > 0:
            what += f" using {args.nthread} threads"
        if not args.quiet:
            sys.stdout.flush()
            print(f"{PROG}: {what}", file=sys.stderr, flush=True)
        stack.enter_context(_LlamaLog(args.quiet, args.verbose))
        t0 = time.perf_counter()

    with stack:
        try:
            result = quantize(
                args.input, args.output, ft,
                nthread=args.nthread,
                imatrix=imatrix, imatrix_label=args.imatrix,
                include_weights=args.include_weights, exclude_weights=args.exclude_weights,
                output_tensor_type=args.output_tensor_type, token_embedding_type=args.token_embedding_type,
                tensor_types=args.tensor_types, prune_layers=args.prune_layers, override_kv=args.override_kv,
                allow_requantize=args.allow_requantize, leave_output_tensor=args.leave_output_tensor,
                pure=args.pure, keep_split=args.keep_split, dry_run=args.dry_run,
                max_buffer_size_mib=args.max_buffer_size, on_start=start,
            )
        except KeyboardInterrupt:
            _interrupted()
    ms = (time.perf_counter() - t0) * 1000.0
    say("")
    say(f"{PROG}: quantize time = {ms:8.2f} ms")
    if args.json:
        summary: dict[str, Any] = {"input": args.input, "output": None if result is None else str(result),
                                   "ftype": ft.name, "dry_run": bool(args.dry_run), "seconds": ms / 1000.0}
        if result is not None:
            info = inspect(result)
            summary.update(bytes=info.file_size, bpw=info.bpw, tensors=len(info.tensors))
        print(json.dumps(summary))
    return 0


class _WarningLine(logging.Handler):
    """llqx's own warnings (state rebuilt, scoring interrupted, ...) as plain lines on stderr;
    llama.cpp's log has its own handler (_LlamaLog)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.addFilter(lambda record: not record.name.startswith(_log.logger.name))

    def emit(self, record: logging.LogRecord) -> None:
        print(f"{PROG}: warning: {record.getMessage()}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Console script `llqx-quantize`: llama-quantize's command line and exit codes."""
    argv = sys.argv[1:] if argv is None else list(argv)
    sigterm_as_interrupt()
    warnings = _WarningLine()
    llqx_logger = logging.getLogger("llqx")
    llqx_logger.addHandler(warnings)
    try:
        return _main(argv)
    finally:
        llqx_logger.removeHandler(warnings)


def _main(argv: list[str]) -> int:
    try:
        args = parse_argv(argv)
    except UsageError as exc:
        if str(exc):
            print(f"{PROG}: {exc}", file=sys.stderr)
        sys.stdout.write(usage_text())
        sys.stdout.flush()
        return 1
    except LlqxError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    try:
        return run(args)
    except LlqxError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        _interrupted()
        return 130


def _run_subcommand(parsed: argparse.Namespace) -> int:
    """`llqx quantize`: the same typed request as llqx-quantize's, from argparse's result."""
    names = {f.name for f in fields(QuantizeRequest)}
    request = QuantizeRequest(**{k: v for k, v in vars(parsed).items() if k in names and k != "input"}, input="")
    try:
        resolve_positionals(request, parsed.words)
    except UsageError as exc:
        raise LlqxError(str(exc)) from None
    return run(request)


def register(subparsers: Any) -> None:
    """`llqx quantize`: llama-quantize's options and positionals (options may also follow them)."""
    types = ", ".join(ft.name for ft in FILE_TYPES)
    parser = subparsers.add_parser(
        "quantize", help="quantize a GGUF exactly as llama-quantize does (drop-in, byte-identical)",
        usage="llqx quantize [options] input.gguf [output.gguf] type [nthreads]",
        description=f"Quantize a GGUF as llama-quantize does. Types: {types}.",
    )
    add_quantize_arguments(parser)
    add_target_arguments(parser)
    parser.set_defaults(func=_run_subcommand)


if __name__ == "__main__":
    sys.exit(main())
