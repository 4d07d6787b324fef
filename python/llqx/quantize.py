"""llama_model_quantize from Python: the same capabilities as llama-quantize, writing atomically."""

from __future__ import annotations

import logging
import os
import re
import tempfile
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from . import _core
from . import log as _log
from .errors import LlqxError
from .imatrix import Imatrix
from .types import FileType, file_type, ggml_type

if TYPE_CHECKING:
    from .plan import Plan

KEY_IMATRIX_FILE = "quantize.imatrix.file"
KEY_IMATRIX_DATASET = "quantize.imatrix.dataset"
KEY_IMATRIX_N_ENTRIES = "quantize.imatrix.entries_count"
KEY_IMATRIX_N_CHUNKS = "quantize.imatrix.chunks_count"

_TAG_INT, _TAG_FLOAT, _TAG_BOOL, _TAG_STR = 0, 1, 2, 3


def _c_atol(text: str) -> int:
    m = re.match(r"\s*[+-]?\d+", text)
    return int(m.group(0)) if m else 0


def _c_atof(text: str) -> float:
    m = re.match(r"\s*[+-]?(\d+\.?\d*([eE][+-]?\d+)?|\.\d+([eE][+-]?\d+)?|inf(inity)?|nan)", text, re.IGNORECASE)
    return float(m.group(0)) if m else 0.0


def parse_kv_override(text: str) -> _core.KvOverride:
    """KEY=TYPE:VALUE with TYPE int, float, bool or str, parsed as llama.cpp's common does."""
    key, sep, rest = text.partition("=")
    if not sep or len(key) >= 128:
        raise LlqxError(f"malformed KV override '{text}'")
    kv = _core.KvOverride()
    kv.key = key
    if rest.startswith("int:"):
        kv.tag, kv.val_i64 = _TAG_INT, _c_atol(rest[4:])
    elif rest.startswith("float:"):
        kv.tag, kv.val_f64 = _TAG_FLOAT, _c_atof(rest[6:])
    elif rest.startswith("bool:"):
        if rest[5:] not in ("true", "false"):
            raise LlqxError(f"invalid boolean value for KV override '{text}'")
        kv.tag, kv.val_bool = _TAG_BOOL, rest[5:] == "true"
    elif rest.startswith("str:"):
        if len(rest[4:].encode()) > 127:
            raise LlqxError(f"malformed KV override '{text}', value cannot exceed 127 chars")
        kv.tag, kv.val_str = _TAG_STR, rest[4:]
    else:
        raise LlqxError(f"invalid type for KV override '{text}'")
    return kv


def _kv(key: str, value: int | str) -> _core.KvOverride:
    kv = _core.KvOverride()
    kv.key = key
    if isinstance(value, str):
        kv.tag, kv.val_str = _TAG_STR, value.encode()[:127].decode(errors="ignore")
    else:
        kv.tag, kv.val_i64 = _TAG_INT, int(value)
    return kv


@dataclass
class ImatrixSelection:
    """The per-tensor weights handed to llama.cpp, after --include/--exclude-weights."""

    weights: dict[str, object] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0


def select_imatrix(imatrix: Imatrix, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> ImatrixSelection:
    """Normalize and filter as llama-quantize does (substring matches; exclude, then include)."""
    if include and exclude:
        raise LlqxError("--include-weights and --exclude-weights cannot be used together")
    weights = imatrix.quantize_weights()
    if exclude:
        weights = {k: v for k, v in weights.items() if not any(x in k for x in exclude)}
    if include:
        weights = {k: v for k, v in weights.items() if any(x in k for x in include)}
    return ImatrixSelection(dict(weights), list(imatrix.datasets), imatrix.chunk_count)


def imatrix_kv_overrides(sel: ImatrixSelection, label: str) -> list[_core.KvOverride]:
    """The metadata llama-quantize records about the imatrix it used (none when no weights are left)."""
    if not sel.weights:
        return []
    out = [_kv(KEY_IMATRIX_FILE, label)]
    if sel.datasets:
        out.append(_kv(KEY_IMATRIX_DATASET, sel.datasets[0]))
    out.append(_kv(KEY_IMATRIX_N_ENTRIES, len(sel.weights)))
    if sel.chunk_count > 0:
        out.append(_kv(KEY_IMATRIX_N_CHUNKS, sel.chunk_count))
    return out


def _resolve_ftype(ftype: str | int | FileType) -> FileType:
    if isinstance(ftype, FileType):
        return ftype
    ft = file_type(str(ftype))
    if ft is None:
        raise LlqxError(f"invalid ftype '{ftype}'")
    return ft


def _type_id(value: str | int | None) -> int:
    return -1 if value is None else ggml_type(value).id


def _check_paths(inp: Path, out: Path | None) -> None:
    if not inp.exists():
        raise LlqxError(f"input model not found: {inp}")
    if not inp.is_file():
        raise LlqxError(f"input model is not a file: {inp}")
    if out is None:
        return
    if out.exists() and os.path.samefile(inp, out):
        raise LlqxError(f"input and output files are the same: '{inp}'")
    if out.is_dir():
        raise LlqxError(f"output path is a directory: {out}")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise LlqxError(f"output directory does not exist: {parent}")
    if not os.access(parent, os.W_OK):
        raise LlqxError(f"output directory is not writable: {parent}")


def run_model_quantize(request: _core.QuantizeRequest) -> None:
    """Run llama_model_quantize in a worker thread, so Ctrl+C reaches Python while it works."""
    _log.recent_errors.clear()
    failure: list[BaseException] = []

    def work() -> None:
        try:
            _core.model_quantize(request)
        except BaseException as exc:  # re-raised in the caller's thread
            failure.append(exc)

    worker = threading.Thread(target=work, name="llqx-quantize", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.1)
    if failure:
        raise LlqxError(_log.last_error(str(failure[0]) or "llama.cpp failed to quantize"))


def quantize(
    input: str | os.PathLike[str],
    output: str | os.PathLike[str] | None,
    ftype: str | int | FileType = "Q8_0",
    *,
    nthread: int = 0,
    imatrix: str | os.PathLike[str] | Imatrix | None = None,
    imatrix_label: str | None = None,
    include_weights: Sequence[str] = (),
    exclude_weights: Sequence[str] = (),
    output_tensor_type: str | int | None = None,
    token_embedding_type: str | int | None = None,
    tensor_types: Iterable[tuple[str, str | int]] = (),
    prune_layers: Iterable[int] = (),
    override_kv: Iterable[str] = (),
    allow_requantize: bool = False,
    leave_output_tensor: bool = False,
    pure: bool = False,
    keep_split: bool = False,
    dry_run: bool = False,
    max_buffer_size_mib: int = 0,
    plan: Plan | None = None,
) -> Path | None:
    """Quantize a GGUF model with llama.cpp, as llama-quantize would with the same options.

    The output is written to a temporary file beside it and renamed when complete, so an error
    or Ctrl+C never leaves a partial file. Returns the output path (None for a dry run).
    With ``plan`` (from ``llqx.score(...).plan(...)``) every tensor gets its planned type (ftype is
    ignored) and the written file is checked against the plan before it is renamed into place.
    """
    ft = _resolve_ftype(ftype)
    inp = Path(input)
    out = None if dry_run or output is None else Path(output)
    if out is None and not dry_run:
        raise LlqxError("an output path is required unless dry_run is set")
    _check_paths(inp, out)

    req = _core.QuantizeRequest()
    req.input = os.fspath(inp)
    req.nthread = nthread
    req.ftype = ft.ftype
    req.only_copy = ft.name == "COPY"
    req.output_tensor_type = _type_id(output_tensor_type)
    req.token_embedding_type = _type_id(token_embedding_type)
    req.allow_requantize = allow_requantize
    req.quantize_output_tensor = not leave_output_tensor
    req.pure = pure
    req.keep_split = keep_split
    req.dry_run = dry_run
    req.max_buf_size = max(0, max_buffer_size_mib) * 1024 * 1024
    req.prune_layers = sorted({int(x) for x in prune_layers})
    for pattern, tt in tensor_types:
        req.add_tensor_override(pattern.lower(), ggml_type(tt).id)

    kv_overrides = [parse_kv_override(s) for s in override_kv]
    if plan is not None:
        # one anchored override per tensor on a pure Q8_0 base: llama.cpp writes exactly the plan
        req.ftype = file_type("Q8_0").ftype  # type: ignore[union-attr]
        req.pure = True
        req.allow_requantize = req.allow_requantize or plan.requantize
        for pattern, tt in plan.overrides():
            req.add_tensor_override(pattern, tt)
        if imatrix_label is None:
            imatrix_label = plan.imatrix_label
        if imatrix is None and plan.imatrix_label is not None:
            raise LlqxError("this plan was made with an imatrix: pass the same imatrix to quantize()")
    if imatrix is not None:
        im = imatrix if isinstance(imatrix, Imatrix) else Imatrix.load(imatrix)
        label = imatrix_label if imatrix_label is not None else (
            "" if isinstance(imatrix, Imatrix) else os.fspath(imatrix))
        sel = select_imatrix(im, include_weights, exclude_weights)
        for name, values in sel.weights.items():
            req.add_imatrix(name, values)
        kv_overrides.extend(imatrix_kv_overrides(sel, label))
    req.kv_overrides = kv_overrides

    if plan is not None:
        # the plan's one override per tensor is intended: keep llama.cpp from warning about each
        _log.logger.addFilter(_drop_override_notes)
    try:
        return _run_to(req, out, plan)
    finally:
        _log.logger.removeFilter(_drop_override_notes)


def _drop_override_notes(record: logging.LogRecord) -> bool:
    return "applying manual override" not in record.getMessage()


def _run_to(req: _core.QuantizeRequest, out: Path | None, plan: Plan | None) -> Path | None:
    if out is None:
        req.output = ""
        run_model_quantize(req)
        return None

    # llama.cpp writes straight to its output path: give it a private one and rename when done
    tmpdir = Path(tempfile.mkdtemp(prefix="." + out.name + ".llqx-", dir=out.parent))
    try:
        req.output = os.fspath(tmpdir / out.name)
        run_model_quantize(req)
        produced = sorted(tmpdir.iterdir())
        if not produced:
            raise LlqxError(f"llama.cpp wrote no output for {out}")
        if plan is not None:
            plan.verify(tmpdir / out.name)
        for f in produced:
            os.replace(f, out.parent / f.name)
    finally:
        for f in tmpdir.glob("*"):
            f.unlink(missing_ok=True)
        tmpdir.rmdir()
    return out
