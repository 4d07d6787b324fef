"""`llqx plot STATE|PLAN`: bpw heat map of a plan, or error-vs-bytes curves from a state file."""

from __future__ import annotations

import argparse

from rich.console import Console

from ..plot import plot_file


def run(args: argparse.Namespace) -> int:
    out = plot_file(args.file, args.output, args.tensor or None, args.kind, args.model)
    if not args.quiet:
        Console(stderr=True).print(f"wrote {out}", highlight=False)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "plot",
        help="plot a plan (bpw heat map) or a state file (error vs bytes)",
        description="Draw bits per weight per layer and tensor kind from a plan JSON, or error-vs-bytes "
        "curves of chosen tensors from a state file (formats: see llqx.plot). Needs matplotlib "
        "(pip install 'llqx[plot]').",
    )
    p.add_argument("file", help="plan or state JSON")
    p.add_argument("-o", "--output", default=None, help="PNG/SVG/PDF to write (default: beside the input)")
    p.add_argument(
        "--tensor",
        action="append",
        default=[],
        metavar="REGEX",
        help="tensors to draw from a state file (repeatable; default: a telling few)",
    )
    p.add_argument(
        "-m",
        "--model",
        default=None,
        help="the GGUF model of a state file without byte counts (for the bytes axis)",
    )
    p.add_argument("--kind", choices=("auto", "heatmap", "curves"), default="auto", help="what to draw")
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=run)
