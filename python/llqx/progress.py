"""The one progress bar of every long operation: label, bar, done/total, rate, elapsed and ETA (rich)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class RateColumn(ProgressColumn):
    """Units per second over the whole run (steadier than rich's moving estimate for chunked work)."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Any) -> Text:
        elapsed = task.finished_time or task.elapsed
        if not elapsed or not task.completed:
            return Text(f"- {self.unit}/s", style="progress.data.speed")
        return Text(f"{task.completed / elapsed:,.1f} {self.unit}/s", style="progress.data.speed")


def progress_bar(label: str, unit: str, *, console: Console | None = None, counts: str = "of",
                 extra: tuple[ProgressColumn, ...] = (), transient: bool = False, disable: bool = False) -> Progress:
    """A rich Progress with llqx's columns. ``counts``: "of" shows done/total, "thousands" shows
    "1,234/5,678 unit" for large totals (tokens). ``extra`` columns go at the end."""
    done: ProgressColumn = (MofNCompleteColumn() if counts == "of"
                            else TextColumn("{task.completed:,.0f}/{task.total:,.0f}"))
    return Progress(
        TextColumn(label),
        BarColumn(),
        done,
        TextColumn(unit),
        RateColumn(unit),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        *extra,
        console=console,
        transient=transient,
        disable=disable,
    )
