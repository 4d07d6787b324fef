"""`llqx` command line: one subcommand per module of this package (each exposes `register(subparsers)`);
`llqx-quantize`, llama-quantize's drop-in, is `llqx.cli.quantize:main`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from ..errors import LlqxError
from . import demo, eval, imatrix, plot, quantize
from .signals import sigterm_as_interrupt

# each module adds its parser with a `func` default, in the order `llqx --help` lists them
SUBCOMMANDS = (imatrix, quantize, eval, plot, demo)

err_console = Console(stderr=True)


def setup_logging(verbose: bool, quiet: bool) -> None:
    """Show llama.cpp's log at WARNING (INFO with --verbose, nothing but errors with --quiet)."""
    level = logging.ERROR if quiet else logging.INFO if verbose else logging.WARNING
    handler = RichHandler(console=err_console, show_time=False, show_path=False, markup=False)
    logging.basicConfig(level=level, handlers=[handler], format="%(message)s", force=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llqx", description="GGUF quantization at exactly the size you ask for")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    sigterm_as_interrupt()
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "verbose", False), getattr(args, "quiet", False))
    return run_command(args.func, args)


def run_command(func: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """Run a subcommand: LlqxError -> one line and exit 1; Ctrl+C -> exit 130 at once."""
    try:
        return int(func(args) or 0)
    except LlqxError as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return 1
    except KeyboardInterrupt:
        # whatever was interrupted has saved or removed its files; leave at once, since the
        # interpreter's teardown after an interrupted native worker can abort and lose the exit code
        err_console.print("[bold red]interrupted[/]")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)


if __name__ == "__main__":
    sys.exit(main())
