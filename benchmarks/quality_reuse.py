"""What a quality benchmark run may reuse from an earlier one: a sidecar JSON beside each file it made, with the
settings it was made with and its seconds (or its evaluation), trusted only for the same settings and size."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from llqx.evaluate import Estimate, QuantResult
from quality_report import write_text


def _sidecar(out: Path, suffix: str, settings: dict[str, object]) -> dict[str, object] | None:
    """What an earlier run recorded next to `out` (`<out><suffix>`), if it made `out` with the same
    settings and `out` is unchanged in size; else None."""
    try:
        doc = json.loads(out.with_name(out.name + suffix).read_text(encoding="utf-8"))
        if out.is_file() and doc["settings"] == settings and doc["size"] == out.stat().st_size:
            return dict(doc)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _write_sidecar(out: Path, suffix: str, settings: dict[str, object], **fields: object) -> None:
    doc = {"settings": settings, "size": out.stat().st_size, **fields}
    write_text(out.with_name(out.name + suffix), json.dumps(doc))


def reused(out: Path, settings: dict[str, object]) -> float | None:
    """Seconds an earlier run took to make `out` with the same settings (its sidecar), else None."""
    doc = _sidecar(out, ".json", settings)
    return None if doc is None else float(doc["seconds"])  # type: ignore[arg-type]


def record(out: Path, settings: dict[str, object], seconds: float) -> None:
    _write_sidecar(out, ".json", settings, seconds=seconds)


def reused_eval(out: Path, settings: dict[str, object]) -> QuantResult | None:
    """An earlier run's evaluation of `out` (a recipe quant) on the same text and settings, else None."""
    doc = _sidecar(out, ".eval.json", settings)
    if doc is None:
        return None
    try:
        q = {k: Estimate(**v) if isinstance(v, dict) else v for k, v in doc["result"].items()}  # type: ignore[attr-defined]
        return QuantResult(**{**q, "path": str(out)})
    except (KeyError, TypeError, AttributeError):
        return None


def record_eval(out: Path, settings: dict[str, object], q: QuantResult) -> None:
    _write_sidecar(out, ".eval.json", settings, result=dataclasses.asdict(q))


