"""`llqx-quantize --target-bpw X | --target-size N`: the target path of both quantize front ends (prints)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..imatrix import Imatrix
from ..plan import Plan
from ..request import QuantizeRequest
from ..sensitivity import GroupSensitivity
from ..target import check_request, default_output, plan_target, prepare, write_target
from ..verify import Verdict


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
    if len(plan.budgets) > 1:
        for b in plan.budgets:
            who = f"budget '{b.pattern}'" if b.pattern is not None else "the rest"
            want = f"{b.target_bpw} bpw" if b.target_bpw is not None else f"{b.target_bytes:,} bytes"
            got = f"file {b.file_size:,} bytes" if b.file_size is not None else f"{b.tensor_bytes:,} bytes"
            console.print(f"{who} ({b.n_tensors} tensors): {b.bpw:.4f} bpw, {got}; target {want}", markup=False)
    lo, hi = plan.achievable
    console.print(
        f"total: {plan.bpw:.4f} bpw ({plan.tensor_bytes:,} tensor bytes, {plan.n_elements:,} weights), "
        f"file {plan.file_size:,} bytes; achievable {lo:.4f} to {hi:.4f} bpw; summed error {plan.error:.4g}"
    )


@contextmanager
def measuring_progress(console: Any) -> Iterator[Callable[[str, int, int], None] | None]:
    """A progress bar for the measured steps (chunks run), or None when nothing prints."""
    if console is None:
        yield None
        return
    from ..progress import progress_bar

    bar = progress_bar("{task.description}", "chunks", transient=True)
    tasks: dict[str, Any] = {}

    def update(what: str, done: int, total: int) -> None:
        if what not in tasks:
            tasks[what] = bar.add_task(what, total=total)
        bar.update(tasks[what], completed=done, total=total)

    with bar:
        yield update


def print_sensitivities(sens: list[GroupSensitivity], source: str, console: Any) -> None:
    """One line per group: what its probe cost in KL divergence against its summed local error."""
    from rich.table import Table

    t = Table(title=f"measured sensitivity (probe: KLD of the group at the probe type; {source})")
    for col in ("group", "tensors", "KLD", "local error", "factor"):
        t.add_column(col, justify="left" if col == "group" else "right")
    for s in sens:
        t.add_row(s.group, str(len(s.tensors)), f"{s.kld:.4g}", f"{s.local_error:.4g}", f"{s.factor:.4g}")
    console.print(t)


def print_verdict(v: Verdict, console: Any) -> None:
    console.print(
        f"verify: llqx {v.plan_bpw:.4f} bpw KLD {v.plan_kld:.5f}; {v.recipe} {v.recipe_bpw:.4f} bpw KLD "
        f"{v.recipe_kld:.5f} (calibration text); keeping {'llqx' if v.kept == 'llqx' else v.recipe + ' mix'}",
        markup=False,
    )


def run_target(req: QuantizeRequest) -> int:
    """Check everything, score (or reuse the state file), plan to the target, then write and verify."""
    check_request(req)
    console: Any = None
    if not (req.quiet or req.json):  # rich only where it prints (start-up time and memory)
        from rich.console import Console

        console = Console()
    assert req.imatrix is not None
    imatrix = Imatrix.load(req.imatrix)
    scores = prepare(req, imatrix)
    with measuring_progress(console) as on_progress:
        result = plan_target(req, scores, imatrix, on_progress)
    del scores  # the model's metadata and the curves: not needed by the writer (its peak memory)
    plan = result.plan
    doc: dict[str, Any] = plan.to_dict()
    if result.sensitivities:
        doc["sensitivity"] = [s.to_dict() for s in result.sensitivities]
        doc["sensitivity_source"] = source = (
            f"measured on {req.calibration_file}" if req.calibration_file is not None
            else f"from the imatrix file, measured on {imatrix.sensitivity_source}")
        if console is not None:
            print_sensitivities(result.sensitivities, source, console)
    if result.verdict is not None:
        doc["verify"] = result.verdict.to_dict()
        if console is not None:
            print_verdict(result.verdict, console)
    if req.dry_run:
        if req.json:
            json.dump(doc, sys.stdout)
            sys.stdout.write("\n")
        elif not req.quiet:
            print_plan(plan, console)
        return 0
    if console is not None:
        out = Path(req.output) if req.output else default_output(Path(req.input), plan)
        console.print(f"writing {out}: {plan.bpw:.4f} bpw, {plan.file_size:,} bytes")
    out = write_target(req, plan, imatrix)
    doc["output"] = os.fspath(out)
    if req.json:
        json.dump(doc, sys.stdout)
        sys.stdout.write("\n")
    elif console is not None:
        console.print(f"wrote {out}: {plan.bpw:.4f} bpw, {plan.file_size:,} bytes (every tensor checked)")
    return 0
