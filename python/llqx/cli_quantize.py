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
:func:`llqx.target_cli.run_target`.
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

from . import _core
from . import log as _log
from .errors import LlqxError
from .imatrix import Imatrix
from .model import inspect
from .quantize import (
    default_output_path,
    parse_kv_override,
    parse_prune_layers,
    parse_tensor_type,
    quantize,
    read_tensor_type_file,
    select_imatrix,
)
from .request import (
    CANDIDATE_MODES,
    QuantizeRequest,
    parse_bpw,
    parse_candidates,
    parse_score_elements,
    parse_size,
)
from .signals import sigterm_as_interrupt
from .types import FILE_TYPES, FileType, c_stoi, file_type, ggml_type

PROG = "llqx-quantize"


def usage_text(prog: str = PROG) -> str:
    """llama-quantize's usage text (same options, same type table), then llqx's additions."""
    pad = " " * 38  # upstream's description column
    opts: list[tuple[str, list[str]]] = [
        ("--allow-requantize", ["allow requantizing tensors that have already been quantized",
                                "WARNING: this can severely reduce quality compared to quantizing",
                                "         from 16bit or 32bit!"]),
        ("--leave-output-tensor", ["leave output.weight un(re)quantized",
                                   "increases model size but may also increase quality, "
                                   "especially when requantizing"]),
        ("--pure", ["disable k-quant mixtures and quantize all tensors to the same type"]),
        ("--imatrix file_name", ["use data in file_name as importance matrix for quant optimizations"]),
        ("--include-weights tensor_name", ["use importance matrix for this/these tensor(s)"]),
        ("--exclude-weights tensor_name", ["do not use importance matrix for this/these tensor(s)"]),
        ("--output-tensor-type ggml_type", ["use this ggml_type for the output.weight tensor"]),
        ("--token-embedding-type ggml_type", ["use this ggml_type for the token embeddings tensor"]),
        ("--tensor-type tensor_name=ggml_type", [
            "quantize this tensor to this ggml_type",
            "this is an advanced option to selectively quantize tensors. may be specified multiple times.",
            "example: --tensor-type attn_q=q8_0"]),
        ("--tensor-type-file tensor_types.txt", [
            "list of tensors to quantize to a specific ggml_type",
            "this is an advanced option to selectively quantize a long list of tensors.",
            "the file should use the same format as above, separated by spaces or newlines."]),
        ("--prune-layers L0,L1,L2...", ["comma-separated list of layer numbers to prune from the model",
                                        "WARNING: this is an advanced option, use with care."]),
        ("--keep-split", ["generate quantized model in the same shards as input"]),
        ("--override-kv KEY=TYPE:VALUE", [
            "override model metadata by key in the quantized model. may be specified multiple times.",
            "WARNING: this is an advanced option, use with care."]),
        ("--dry-run", ["calculate and show the final quantization size without performing quantization",
                       f"example: {prog} --dry-run model-f32.gguf Q4_K"]),
        ("--max-buffer-size MiB", [
            "max amount of tensor rows kept in memory while quantizing one tensor (default: 8192)",
            "lower it to quantize models with very large tensors on a machine with little RAM"]),
        ("--target-bpw X", ["(llqx) per-tensor types with the lowest error for X bits per weight"]),
        ("--target-size N[B|K|M|G|T]", ["(llqx) the same for an output file of N bytes"]),
        ("--state-file PATH", ["(llqx) keep the measured per-tensor errors in PATH for later runs",
                               "(an llqx state file; any other file there is refused)"]),
        ("--candidates all|window", ["(llqx) window: score the IQ1-IQ3 grid types only near the target"]),
        ("--score-elements N", ["(llqx) elements sampled per tensor when scoring"]),
        ("--quiet / --verbose", ["(llqx) show only errors / also llama.cpp's debug log"]),
        ("--json", ["(llqx) print a JSON summary (output, bytes, bpw, seconds) on stdout"]),
    ]
    lines = [
        f"usage: {prog} [--help] [--allow-requantize] [--leave-output-tensor] [--pure] [--imatrix] "
        "[--include-weights]",
        "       [--exclude-weights] [--output-tensor-type] [--token-embedding-type] [--tensor-type] "
        "[--tensor-type-file]",
        "       [--prune-layers] [--keep-split] [--override-kv] [--dry-run] [--max-buffer-size]",
        "       [--target-bpw] [--target-size] [--state-file] [--candidates] [--score-elements] [--quiet]",
        "       [--verbose] [--json]",
        "       model-f32.gguf [model-quant.gguf] type [nthreads]",
        "",
    ]
    for opt, desc in opts:
        lines.append("  " + opt)
        lines += [pad + d for d in desc]
    lines += [
        "",
        "note: --include-weights and --exclude-weights cannot be used together",
        "",
        "-" * 77,
        " allowed quantization types",
        "-" * 77,
        "",
    ]
    for ft in FILE_TYPES:
        head = f"  {ft.ftype:2d}  or  " if ft.name != "COPY" else "          "
        lines.append(f"{head}{ft.name:<7s} : {ft.desc}")
    return "\n".join(lines) + "\n"


class UsageError(Exception):
    """Bad command line: print the (optional) reason, then the usage text, and exit 1."""


# ---- value parsers shared by both entry points (raise LlqxError) ------------------------------

def _ggml_type_name(text: str) -> str:
    return ggml_type(text).name  # LlqxError "unknown ggml type"


def _max_buffer_mib(text: str) -> int:
    mib = c_stoi(text) or 0  # atoi: 0 on garbage
    if mib <= 0:
        raise LlqxError(f"invalid --max-buffer-size '{text}'")
    return mib


def _kv_checked(text: str) -> str:
    parse_kv_override(text)  # raises LlqxError on a malformed override
    return text


# ---- llama-quantize's own argument loop -------------------------------------------------------

_VALUE_OPTIONS = {
    "--output-tensor-type", "--token-embedding-type", "--tensor-type", "--tensor-type-file", "--prune-layers",
    "--override-kv", "--imatrix", "--include-weights", "--exclude-weights", "--max-buffer-size",
}
# llqx's own options: a bad value is one line (LlqxError), not upstream's usage text
_LLQX_VALUE_OPTIONS = {"--target-bpw", "--target-size", "--state-file", "--candidates", "--score-elements"}
_FLAG_OPTIONS = {
    "--leave-output-tensor": "leave_output_tensor", "--dry-run": "dry_run",
    "--allow-requantize": "allow_requantize", "--pure": "pure", "--keep-split": "keep_split",
    "--quiet": "quiet", "--verbose": "verbose", "--json": "json",
}


def _apply_value(ns: QuantizeRequest, opt: str, value: str) -> None:
    """One option with its value, as upstream's loop handles it (LlqxError → usage, except max-buffer)."""
    if opt == "--output-tensor-type":
        ns.output_tensor_type = _ggml_type_name(value)
    elif opt == "--token-embedding-type":
        ns.token_embedding_type = _ggml_type_name(value)
    elif opt == "--tensor-type":
        ns.tensor_types.append(parse_tensor_type(value))
    elif opt == "--tensor-type-file":
        ns.tensor_types.extend(read_tensor_type_file(value))
    elif opt == "--prune-layers":
        ns.prune_layers = sorted(set(ns.prune_layers) | set(parse_prune_layers(value)))
    elif opt == "--override-kv":
        ns.override_kv.append(_kv_checked(value))
    elif opt == "--imatrix":
        ns.imatrix = value
    elif opt == "--include-weights":
        ns.include_weights.append(value)
    elif opt == "--exclude-weights":
        ns.exclude_weights.append(value)
    elif opt == "--target-bpw":
        ns.target_bpw = parse_bpw(value)
    elif opt == "--target-size":
        ns.target_size = parse_size(value)
    elif opt == "--state-file":
        ns.state_file = _state_path(value)
    elif opt == "--candidates":
        ns.candidates = parse_candidates(value)
    elif opt == "--score-elements":
        ns.score_elements = parse_score_elements(value)


def _state_path(value: str) -> str:
    if not value or value.startswith("--"):
        raise LlqxError(f"--state-file needs a path (got '{value}')")
    return value


def parse_argv(argv: Sequence[str]) -> QuantizeRequest:
    """Parse llama-quantize's command line (without the program name) into the typed request.

    UsageError where upstream prints its usage (exit 1); LlqxError where upstream prints one line
    and returns 1 (missing or invalid type, invalid nthread, invalid --max-buffer-size).
    """
    argv = list(argv)
    if len(argv) < 2:
        raise UsageError("")
    ns = QuantizeRequest(input="")
    i = 0
    while i < len(argv) and argv[i].startswith("--"):
        opt = argv[i]
        if opt in _FLAG_OPTIONS:
            setattr(ns, _FLAG_OPTIONS[opt], True)
        elif opt in _VALUE_OPTIONS:
            if i == len(argv) - 1:
                raise UsageError(f"option {opt} needs a value")
            i += 1
            try:
                _apply_value(ns, opt, argv[i])
            except LlqxError as exc:
                if opt == "--max-buffer-size":
                    raise
                raise UsageError(str(exc)) from None
            if opt == "--max-buffer-size":
                ns.max_buffer_size = _max_buffer_mib(argv[i])
        elif opt in _LLQX_VALUE_OPTIONS or opt.split("=", 1)[0] in _LLQX_VALUE_OPTIONS:
            name, eq, value = opt.partition("=")
            if not eq:
                if i == len(argv) - 1:
                    raise LlqxError(f"option {opt} needs a value")
                i += 1
                value = argv[i]
            _apply_value(ns, name, value)
        else:
            raise UsageError("" if opt == "--help" else f"unknown option '{opt}'")
        i += 1
    resolve_positionals(ns, argv[i:])
    return ns


def resolve_positionals(ns: QuantizeRequest, rest: Sequence[str]) -> None:
    """input [output] type [nthreads], resolved as upstream: the second word is a type if it parses as one.

    With a target the type is optional (it only labels general.file_type), so ``input`` alone is
    enough, and a number right after the output is refused as ambiguous (type or thread count?).
    """
    target_mode = ns.target_mode
    if target_mode and len(rest) == 1:
        ns.input = rest[0]
        return
    if len(rest) < 2:
        raise UsageError("bad arguments")
    if ns.include_weights and ns.exclude_weights:
        raise UsageError("--include-weights and --exclude-weights cannot be used together")
    ns.input = rest[0]
    ft = file_type(rest[1])
    if ft is not None:
        ns.ftype = ft
        ns.output = None if ns.dry_run else default_output_path(ns.input, ft, ns.keep_split)
        k = 2
    else:
        ns.output = rest[1]
        k = 3
        if len(rest) < 3:
            if not target_mode:
                raise LlqxError(f"missing ftype ('{rest[1]}' is no quantization type, so it was taken "
                                "as the output file)")
            k = 2
        else:
            if target_mode and len(rest) == 3 and c_stoi(rest[2]) is not None:
                raise LlqxError(f"'{rest[2]}' after the output is ambiguous with a target (type {rest[2]} or "
                                f"{rest[2]} threads?): name the type, e.g. '{rest[1]} Q8_0 {rest[2]}'")
            ns.ftype = file_type(rest[2])
            if ns.ftype is None:
                raise LlqxError(f"invalid ftype '{rest[2]}'")
        if ns.dry_run:
            ns.output = None
    if len(rest) > k:  # upstream ignores anything after nthreads
        n = c_stoi(rest[k])
        if n is None:
            raise LlqxError(f"invalid nthread '{rest[k]}' (stoi)")
        ns.nthread = n


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
        from .target_cli import run_target  # scoring and planning load only for a target

        return run_target(args)
    for given, option in ((args.state_file, "--state-file"), (args.candidates != "all", "--candidates"),
                          (args.score_elements, "--score-elements")):
        if given:
            raise LlqxError(f"{option} is only used with --target-bpw or --target-size")
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


# ---- `llqx quantize`: the same options through argparse ---------------------------------------

class _Checked(argparse.Action):
    """Store/append a value after a value parser (LlqxError becomes an argparse error)."""

    def __init__(self, *a: Any, convert: Any = None, append: bool = False, extend: bool = False,
                 **k: Any) -> None:
        self.convert, self.append, self.extend = convert, append, extend
        super().__init__(*a, **k)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        try:
            value = self.convert(values) if self.convert else values
        except LlqxError as exc:
            raise argparse.ArgumentError(self, str(exc)) from None
        if self.append or self.extend:
            items = list(getattr(namespace, self.dest, None) or [])
            items.extend(value) if self.extend else items.append(value)
            setattr(namespace, self.dest, items)
        else:
            setattr(namespace, self.dest, value)


def add_target_arguments(parser: argparse.ArgumentParser) -> None:
    """The target options (handled by llqx.target_cli.run_target)."""
    g = parser.add_argument_group("target size (llqx)")
    g.add_argument("--target-bpw", metavar="X", action=_Checked, convert=parse_bpw, default=None,
                   help="the lowest-error mix at or below X bits per weight (llama.cpp's BPW over all tensors)")
    g.add_argument("--target-size", metavar="N[B|K|M|G|T]", action=_Checked, convert=parse_size, default=None,
                   help="the same for a whole file of at most N bytes (K, M, G, T: powers of 1024)")
    g.add_argument("--state-file", metavar="PATH", action=_Checked, convert=_state_path, default=None,
                   help="keep the scoring in PATH (an llqx state file; any other file is refused): "
                   "resumes after Ctrl+C and serves later targets at once")
    g.add_argument("--candidates", choices=CANDIDATE_MODES, default="all",
                   help="all (default): score every candidate type; window: score the IQ1/IQ2/IQ3 grid types "
                   "only near the target (a faster first run; the mix can be a little worse)")
    g.add_argument("--score-elements", metavar="N", action=_Checked, convert=parse_score_elements, default=None,
                   help="elements sampled per tensor when scoring (default: 1/32 of it, 32K to 256K)")


def add_quantize_arguments(parser: argparse.ArgumentParser) -> None:
    """llama-quantize's options, same names and meaning."""
    a = parser.add_argument
    a("--allow-requantize", action="store_true", help="allow requantizing tensors already quantized")
    a("--leave-output-tensor", action="store_true", help="leave output.weight un(re)quantized")
    a("--pure", action="store_true", help="disable k-quant mixtures, quantize all tensors to the same type")
    a("--imatrix", metavar="FILE", help="importance matrix (GGUF or legacy .dat)")
    a("--include-weights", metavar="NAME", action="append", default=[],
      help="use the importance matrix only for tensors whose name contains NAME")
    a("--exclude-weights", metavar="NAME", action="append", default=[],
      help="do not use the importance matrix for tensors whose name contains NAME")
    a("--output-tensor-type", metavar="TYPE", action=_Checked, convert=_ggml_type_name,
      help="ggml type of output.weight")
    a("--token-embedding-type", metavar="TYPE", action=_Checked, convert=_ggml_type_name,
      help="ggml type of the token embeddings")
    a("--tensor-type", metavar="NAME=TYPE", dest="tensor_types", action=_Checked, convert=parse_tensor_type,
      append=True, default=[], help="quantize tensors matching NAME (regex) to TYPE; repeatable")
    a("--tensor-type-file", metavar="FILE", dest="tensor_types", action=_Checked,
      convert=read_tensor_type_file, extend=True, default=[], help="NAME=TYPE entries, whitespace-separated")
    a("--prune-layers", metavar="L0,L1,...", action=_Checked, convert=parse_prune_layers, default=[],
      help="layers to prune from the model")
    a("--keep-split", action="store_true", help="write the same shards as the input")
    a("--override-kv", metavar="KEY=TYPE:VALUE", action=_Checked, convert=_kv_checked, append=True,
      default=[], help="override model metadata; repeatable")
    a("--dry-run", action="store_true", help="show the final size without quantizing")
    a("--max-buffer-size", metavar="MiB", action=_Checked, convert=_max_buffer_mib, default=0,
      help="max tensor rows kept in memory while quantizing one tensor (default 8192)")
    a("--quiet", "-q", action="store_true", help="show only errors")
    a("--verbose", "-v", action="store_true", help="also show llama.cpp's debug log")
    a("--json", action="store_true", help="print a JSON summary (output, bytes, bpw, seconds) on stdout")
    a("words", nargs="+", metavar="input [output] type [nthreads]",
      help="as llama-quantize: the type by name (Q4_K_M, any case) or number")


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
