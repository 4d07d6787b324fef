"""`llqx quantize --target-bpw X | --target-size N`: score, plan and write a model of exactly that size."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

from . import _core
from .errors import LlqxError
from .plan import Plan
from .types import file_type, ggml_type

log = logging.getLogger("llqx")

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """'1.5G' = 1.5 GiB, '800M', '123456' (bytes); K/M/G/T are powers of 1024 (KiB/KB/K all alike)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(?:I?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise LlqxError(
            f"invalid size '{text}': use a number with an optional unit B, K, M, G or T (e.g. 1.5G)"
        )
    from fractions import Fraction

    size = int(Fraction(m.group(1)) * _UNITS[m.group(2).upper()])
    if size <= 0:
        raise LlqxError(f"invalid size '{text}': must be positive")
    return size


def add_target_arguments(parser: argparse.ArgumentParser) -> None:
    """The target-mode options (the drop-in CLI adds the llama-quantize ones)."""
    from .scoring import CANDIDATE_MODES

    g = parser.add_argument_group("target size (llqx)")
    g.add_argument(
        "--target-bpw",
        type=float,
        default=None,
        metavar="X",
        help="lowest-error mix at or below X bits per weight (llama.cpp's BPW over all tensors)",
    )
    g.add_argument(
        "--target-size",
        default=None,
        metavar="N",
        help="lowest-error mix whose whole file is at most N bytes (units B, K, M, G, T: powers of 1024)",
    )
    g.add_argument(
        "--state-file",
        nargs="?",
        const=True,
        default=None,
        metavar="PATH",
        help="keep the scoring here (default <model>.llqx-state): resumes after Ctrl+C, serves other targets",
    )
    g.add_argument("--json", action="store_true", help="print the plan (and result) as JSON")
    g.add_argument(
        "--score-elements",
        type=int,
        default=None,
        metavar="N",
        help="elements sampled per tensor when scoring (default: 1/32 of it, 32K to 256K)",
    )
    g.add_argument(
        "--candidates",
        choices=CANDIDATE_MODES,
        default="all",
        help="all (default): score every candidate type; window: score the low-bit grid types "
        "(IQ1/IQ2/IQ3) only when the target is near them or a tensor's pick reaches them (a faster cold "
        "run, but the mix can be worse: the estimator also picks low grid types at high targets)",
    )


def _pins(args: Any) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    specs = list(getattr(args, "tensor_type", None) or [])
    tt_file = getattr(args, "tensor_type_file", None)
    if tt_file:
        try:
            specs += Path(tt_file).read_text(encoding="utf-8").split()
        except OSError as exc:
            raise LlqxError(f"cannot read tensor type file {tt_file}: {exc.strerror}") from None
    for spec in specs:
        name, sep, tt = str(spec).partition("=")
        if not sep or not name or not tt:
            raise LlqxError(f"malformed tensor type '{spec}' (want NAME=TYPE)")
        ggml_type(tt)
        out.append((name, tt))
    return out


def _state_path(args: Any) -> Path | None:
    sf = getattr(args, "state_file", None)
    if sf is None or sf is False:
        return None
    if sf is True or sf == "":
        return Path.cwd() / (Path(args.input).stem + ".llqx-state")
    return Path(sf)


def _default_output(args: Any, plan: Plan) -> Path:
    inp = Path(args.input)
    tag = f"{plan.bpw:.2f}bpw"
    return inp.with_name(f"{inp.stem}-{tag}.gguf")


def print_plan(plan: Plan, console: Any) -> None:
    from rich.table import Table

    t = Table(title=f"plan: {plan.bpw:.4f} bpw, {plan.file_size:,} bytes", show_lines=False)
    t.add_column("tensor")
    t.add_column("type")
    t.add_column("bpw", justify="right")
    t.add_column("error", justify="right")
    t.add_column("", style="dim")
    for x in plan.tensors:
        t.add_row(
            x.name,
            x.type_name.upper(),
            f"{x.bpw:.3f}",
            "" if x.error is None else f"{x.error:.4g}",
            "" if x.status == "optimized" else x.status,
        )
    console.print(t)
    lt = Table(title="per layer")
    lt.add_column("layer")
    lt.add_column("bpw", justify="right")
    lt.add_column("MiB", justify="right")
    for k, (b, n) in plan.layers().items():
        lt.add_row(k, f"{8.0 * b / max(n, 1):.3f}", f"{b / 2**20:.2f}")
    console.print(lt)
    lo, hi = plan.achievable
    console.print(
        f"total: {plan.bpw:.4f} bpw ({plan.tensor_bytes:,} tensor bytes, {plan.n_elements:,} weights), "
        f"file {plan.file_size:,} bytes; achievable {lo:.4f} to {hi:.4f} bpw; summed error {plan.error:.4g}"
    )


def run_target(args: Any) -> int:
    """Score (or reuse the state file), plan to the target, then write and verify the model."""
    from . import quantize
    from .imatrix import Imatrix
    from .scoring import score

    if args.target_bpw is not None and args.target_size is not None:
        raise LlqxError("--target-bpw and --target-size cannot be used together")
    if args.target_bpw is None and args.target_size is None:
        raise LlqxError("give --target-bpw or --target-size")
    if args.target_bpw is not None and not args.target_bpw > 0:
        raise LlqxError(f"invalid --target-bpw {args.target_bpw}")
    target_size = parse_size(str(args.target_size)) if args.target_size is not None else None
    if not getattr(args, "imatrix", None):
        raise LlqxError(
            "--target-bpw/--target-size need an importance matrix (--imatrix FILE, e.g. from "
            "`llqx imatrix`): the error of each candidate type is weighted by how much each input "
            "channel matters, and the low-bit IQ types cannot be written without one"
        )
    inp = Path(args.input)
    if not inp.is_file():
        raise LlqxError(f"input model not found: {inp}")
    ftype_name = getattr(args, "type", None)
    override_kv: list[str] = []
    if ftype_name:
        ft = file_type(str(ftype_name))
        if ft is None:
            raise LlqxError(f"invalid ftype '{ftype_name}'")
        override_kv.append(f"general.file_type=int:{ft.ftype}")
    pins = _pins(args)
    as_json = bool(getattr(args, "json", False))
    quiet = bool(getattr(args, "quiet", False))
    nthread = int(getattr(args, "nthreads", None) or getattr(args, "nthread", None) or 0)
    console: Any = None
    if not (quiet or as_json):  # rich only where it prints (start-up time and memory)
        from rich.console import Console

        console = Console()

    imatrix = Imatrix.load(args.imatrix)
    scores = score(
        inp,
        imatrix,
        imatrix_label=os.fspath(args.imatrix),
        state=_state_path(args),
        nthread=nthread,
        sample_elements=getattr(args, "score_elements", None),
        progress=not (quiet or as_json),
        candidates=getattr(args, "candidates", None) or "all",
    )
    plan = scores.plan(
        target_bpw=args.target_bpw,
        target_size=target_size,
        tensor_types=pins,
        output_tensor_type=getattr(args, "output_tensor_type", None),
        token_embedding_type=getattr(args, "token_embedding_type", None),
    )
    del scores  # the model's metadata and the curves: not needed by the writer (its peak memory)
    if not any(ggml_type(t).has_grid for _, t in plan.overrides()):
        # scoring built the IQ lookup grids (~6 MB); this mix needs none, so the writer's peak need not carry them
        _core.quantize_free()
    doc: dict[str, Any] = plan.to_dict()
    if getattr(args, "dry_run", False):
        if as_json:
            json.dump(doc, sys.stdout)
            sys.stdout.write("\n")
        elif not quiet:
            print_plan(plan, console)
        return 0

    out = Path(args.output) if getattr(args, "output", None) else _default_output(args, plan)
    if not quiet and not as_json:
        console.print(f"writing {out}: {plan.bpw:.4f} bpw, {plan.file_size:,} bytes")
    quantize(inp, out, nthread=nthread, imatrix=imatrix, plan=plan, override_kv=override_kv)
    doc["output"] = os.fspath(out)
    if as_json:
        json.dump(doc, sys.stdout)
        sys.stdout.write("\n")
    elif not quiet:
        console.print(f"wrote {out}: {plan.bpw:.4f} bpw, {plan.file_size:,} bytes (every tensor checked)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (tests, benchmarks): llqx-target MODEL [OUTPUT] --imatrix F --target-bpw X."""
    from .cli import run_command, setup_logging

    p = argparse.ArgumentParser(prog="llqx-target")
    p.add_argument("input")
    p.add_argument("output", nargs="?")
    p.add_argument("--imatrix")
    p.add_argument("--nthreads", type=int, default=0)
    p.add_argument("--type", default=None)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--tensor-type", action="append", default=[])
    p.add_argument("--tensor-type-file")
    p.add_argument("--output-tensor-type")
    p.add_argument("--token-embedding-type")
    p.add_argument("--quiet", action="store_true")
    add_target_arguments(p)
    args = p.parse_args(argv)
    setup_logging(False, args.quiet)
    return run_command(run_target, args)

if __name__ == "__main__":
    sys.exit(main())
