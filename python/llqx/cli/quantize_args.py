"""The command lines of `llqx-quantize` (llama-quantize's own argument loop, b11312) and of `llqx quantize`
(argparse): both build one typed :class:`~llqx.request.QuantizeRequest`.

`llqx-quantize [options] input.gguf [output.gguf] type [nthreads]` parses exactly as upstream's
tools/quantize/quantize.cpp: options (each starting with ``--``) only before the positionals, the type by
name (any case) or number, the output defaulting to ``[input dir]/ggml-model-<TYPE>.gguf``. llqx's own
options (``--target-bpw`` ...) take their values the same way; a bad one is one line, not the usage text.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from ..errors import LlqxError
from ..metadata import parse_kv_override
from ..quantize import default_output_path, parse_prune_layers, read_tensor_type_file
from ..request import (
    CANDIDATE_MODES,
    DEFAULT_CANDIDATES,
    TIE_PRESETS,
    QuantizeRequest,
    parse_bpw,
    parse_budget,
    parse_calibration_chunks,
    parse_candidates,
    parse_score_elements,
    parse_size,
    parse_tie,
    parse_type_bound,
)
from ..types import FILE_TYPES, c_stoi, file_type, ggml_type, parse_tensor_type

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
        ("--budget REGEX=SIZE|Xbpw", [
            "(llqx) tensors matching REGEX get their own budget of tensor bytes (SIZE as --target-size)",
            "or bits per weight; the target covers the rest (repeatable; the first match wins)",
            "example: --budget '_exps\\.=4.5bpw' --budget 'attn_=12M' --target-size 2G"]),
        ("--tie REGEX|moe-fused", [
            "(llqx) tensors of one layer matching REGEX get one type (repeatable)",
            f"example: --tie moe-fused (= --tie '{TIE_PRESETS['moe-fused']}')"]),
        ("--min-type REGEX=TYPE", ["(llqx) tensors matching REGEX take no type smaller than TYPE on them",
                                   "example: --min-type attn_v=q8_0"]),
        ("--max-type REGEX=TYPE", ["(llqx) tensors matching REGEX take no type larger than TYPE on them",
                                   "example: --max-type 'ffn_.*_exps=q6_k'"]),
        ("--state-file PATH", ["(llqx) keep the measured per-tensor errors in PATH for later runs",
                               "(an llqx state file; any other file there is refused)"]),
        ("--candidates window|all", ["(llqx) window (default): score the IQ1-IQ3 grid types only where the plan",
                                     "could take them; all: score every candidate type up front"]),
        ("--score-elements N", ["(llqx) elements sampled per tensor when scoring"]),
        ("--score-sketch", ["(llqx) weigh errors with the imatrix's sketch of the input's second moments",
                            "(measured worse than E[x²] and the mean so far: see docs/method.md)"]),
        ("--calibration-file FILE", ["(llqx) text to measure each tensor group's real effect on (KL divergence)",
                                     "and plan with it; e.g. the imatrix's text"]),
        ("--calibration-chunks N", ["(llqx) chunks of 512 tokens measured (default 4)"]),
        ("--verify", ["(llqx) measure the plan against llama.cpp's nearest recipe on the calibration text",
                      "and keep the better (needs --calibration-file)"]),
        ("--quiet / --verbose", ["(llqx) show only errors / also llama.cpp's debug log"]),
        ("--json", ["(llqx) print a JSON summary (output, bytes, bpw, seconds) on stdout"]),
    ]
    lines = [
        f"usage: {prog} [--help] [--allow-requantize] [--leave-output-tensor] [--pure] [--imatrix] "
        "[--include-weights]",
        "       [--exclude-weights] [--output-tensor-type] [--token-embedding-type] [--tensor-type] "
        "[--tensor-type-file]",
        "       [--prune-layers] [--keep-split] [--override-kv] [--dry-run] [--max-buffer-size]",
        "       [--target-bpw] [--target-size] [--budget] [--tie] [--min-type] [--max-type] [--state-file]",
        "       [--candidates] [--score-elements] [--score-sketch] [--calibration-file] [--calibration-chunks] "
        "[--verify] [--quiet] [--verbose] [--json]",
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
_LLQX_VALUE_OPTIONS = {
    "--target-bpw", "--target-size", "--state-file", "--candidates", "--score-elements", "--budget", "--tie",
    "--min-type", "--max-type", "--calibration-file", "--calibration-chunks",
}
_FLAG_OPTIONS = {
    "--leave-output-tensor": "leave_output_tensor", "--dry-run": "dry_run",
    "--allow-requantize": "allow_requantize", "--pure": "pure", "--keep-split": "keep_split",
    "--quiet": "quiet", "--verbose": "verbose", "--json": "json", "--verify": "verify",
    "--score-sketch": "score_sketch",
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
    elif opt == "--budget":
        ns.budgets.append(parse_budget(value))
    elif opt == "--tie":
        ns.ties.append(parse_tie(value))
    elif opt == "--min-type":
        ns.min_types.append(parse_type_bound(value, opt))
    elif opt == "--max-type":
        ns.max_types.append(parse_type_bound(value, opt))
    elif opt == "--calibration-file":
        ns.calibration_file = value
    elif opt == "--calibration-chunks":
        ns.calibration_chunks = parse_calibration_chunks(value)


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
    """The target options (handled by llqx.cli.target.run_target)."""
    g = parser.add_argument_group("target size (llqx)")
    g.add_argument("--target-bpw", metavar="X", action=_Checked, convert=parse_bpw, default=None,
                   help="the lowest-error mix at or below X bits per weight (llama.cpp's BPW over all tensors; "
                   "with --budget, over those no --budget matches)")
    g.add_argument("--target-size", metavar="N[B|K|M|G|T]", action=_Checked, convert=parse_size, default=None,
                   help="the same for a whole file of at most N bytes (K, M, G, T: powers of 1024)")
    g.add_argument("--budget", metavar="REGEX=SIZE|Xbpw", dest="budgets", action=_Checked, convert=parse_budget,
                   append=True, default=[],
                   help="tensors matching REGEX get their own budget of tensor bytes (SIZE as --target-size) or "
                   "bits per weight; the target covers the rest; repeatable, the first match wins "
                   "(e.g. --budget '_exps\\.=4.5bpw' --target-size 2G)")
    g.add_argument("--tie", metavar="REGEX", dest="ties", action=_Checked, convert=parse_tie, append=True,
                   default=[], help="tensors of one layer matching REGEX get one type; repeatable "
                   f"(e.g. --tie moe-fused, which is --tie '{TIE_PRESETS['moe-fused']}')")
    g.add_argument("--min-type", metavar="REGEX=TYPE", dest="min_types", action=_Checked,
                   convert=lambda v: parse_type_bound(v, "--min-type"), append=True, default=[],
                   help="tensors matching REGEX take no type smaller than TYPE on them (e.g. attn_v=q8_0)")
    g.add_argument("--max-type", metavar="REGEX=TYPE", dest="max_types", action=_Checked,
                   convert=lambda v: parse_type_bound(v, "--max-type"), append=True, default=[],
                   help="tensors matching REGEX take no type larger than TYPE on them (e.g. 'ffn_.*_exps=q6_k')")
    g.add_argument("--state-file", metavar="PATH", action=_Checked, convert=_state_path, default=None,
                   help="keep the scoring in PATH (an llqx state file; any other file is refused): "
                   "resumes after Ctrl+C and serves later targets at once")
    g.add_argument("--candidates", choices=CANDIDATE_MODES, default=DEFAULT_CANDIDATES,
                   help="window (default): score the IQ1/IQ2/IQ3 grid types only where the plan could take them; "
                   "all: score every candidate type up front")
    g.add_argument("--score-elements", metavar="N", action=_Checked, convert=parse_score_elements, default=None,
                   help="elements sampled per tensor when scoring (default: 1/32 of it, 32K to 256K)")
    g.add_argument("--score-sketch", action="store_true",
                   help="weigh errors with the imatrix's sketch of the input's second moments instead of E[x²] "
                   "and the mean (measured worse so far: docs/method.md)")
    g.add_argument("--calibration-file", metavar="FILE", default=None,
                   help="text to measure each tensor group's real effect on (KL divergence), planned with; "
                   "e.g. the imatrix's text")
    g.add_argument("--calibration-chunks", metavar="N", action=_Checked, convert=parse_calibration_chunks, default=4,
                   help="chunks of 512 tokens of the calibration text measured (default 4)")
    g.add_argument("--verify", action="store_true",
                   help="measure the plan against llama.cpp's nearest recipe on the calibration text and keep the "
                   "better (needs --calibration-file)")


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

