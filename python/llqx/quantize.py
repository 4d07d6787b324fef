"""llama_model_quantize from Python: the same capabilities as llama-quantize, writing atomically."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from . import _core
from . import log as _log
from .errors import LlqxError
from .imatrix import Imatrix
from .imatrix_select import check_imatrix_fits, select_imatrix
from .metadata import imatrix_kv_overrides, parse_kv_override
from .model import ModelInfo, inspect
from .runner import run_in_worker
from .types import FileType, c_stoi, file_type, ggml_type, parse_tensor_type

if TYPE_CHECKING:
    from .plan import Plan

# a plan is written as pure Q8_0 with one override per tensor: general.file_type says 7 unless a type is given
PLAN_BASE_FTYPE = 7
def _resolve_ftype(ftype: str | int | FileType) -> FileType:
    if isinstance(ftype, FileType):
        return ftype
    ft = file_type(str(ftype))
    if ft is None:
        raise LlqxError(f"invalid ftype '{ftype}'")
    return ft


def _type_id(value: str | int | None) -> int:
    return -1 if value is None else ggml_type(value).id


def default_output_path(input: str | os.PathLike[str], ftype: FileType, keep_split: bool = False) -> str:
    """llama-quantize's default output ``[input dir]/ggml-model-<FTYPE>.gguf`` (no suffix with keep_split)."""
    inp = os.fspath(input)
    pos = max(inp.rfind("/"), inp.rfind("\\"))
    name = inp[: pos + 1] + "ggml-model-" + ftype.name
    return name if keep_split else name + ".gguf"


def read_tensor_type_file(path: str | os.PathLike[str]) -> list[tuple[str, int]]:
    """--tensor-type-file: NAME=TYPE entries separated by whitespace."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as exc:
        raise LlqxError(f"failed to open tensor type file '{os.fspath(path)}': {exc.strerror}") from None
    return [parse_tensor_type(tok) for tok in text.split()]


def parse_prune_layers(text: str) -> list[int]:
    """--prune-layers L0,L1,…: std::stoi per item, negative or malformed ids refused; sorted, unique."""
    out: set[int] = set()
    for item in text.split(","):
        value = c_stoi(item)
        if value is None or value < 0:
            raise LlqxError(f"invalid layer id '{item}' in --prune-layers '{text}'")
        out.add(value)
    return sorted(out)


def check_paths(inp: Path, out: Path | None) -> ModelInfo:
    if not inp.exists():
        raise LlqxError(f"input model not found: {inp}")
    if not inp.is_file():
        raise LlqxError(f"input model is not a file: {inp}")
    if not os.access(inp, os.R_OK):
        raise LlqxError(f"input model is not readable: {inp}")
    info = inspect(inp)  # LlqxError for a foreign, damaged or truncated file
    if out is None:
        return info
    if out.exists() and os.path.samefile(inp, out):
        raise LlqxError(f"input and output files are the same: '{inp}'")
    if out.is_dir():
        raise LlqxError(f"output path is a directory: {out}")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise LlqxError(f"output directory does not exist: {parent}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise LlqxError(f"output directory is not writable: {parent}")
    return info


def release_memory() -> None:
    """Hand freed memory back to the system before llama.cpp allocates its buffers (peak RSS)."""
    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # not glibc
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def run_model_quantize(request: _core.QuantizeRequest) -> None:
    """Run llama_model_quantize in a worker thread, so Ctrl+C reaches Python while it works.

    On KeyboardInterrupt the worker cannot be stopped (llama.cpp has no cancel): it runs on in the
    background; callers remove its output directory so whatever it still writes goes nowhere.
    """
    _log.recent_errors.clear()
    try:
        run_in_worker(lambda: _core.model_quantize(request), name="llqx-quantize")
    except _core.Error as exc:
        raise LlqxError(_log.last_error(str(exc) or "llama.cpp failed to quantize")) from None


def _nearly_full(directory: Path) -> bool:
    """Less room left than one more tensor could need (llama.cpp writes in pieces of up to 64 MiB)."""
    try:
        return shutil.disk_usage(directory).free < (64 << 20)
    except OSError:
        return False


def _remove_tree(path: Path) -> None:
    # a still-running worker may create a file between unlink and rmdir: retry a few times
    for _ in range(5):
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            return
        time.sleep(0.05)


def quantize(
    input: str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    ftype: str | int | FileType = "Q8_0",
    *,
    nthread: int = 0,
    imatrix: str | os.PathLike[str] | Imatrix | None = None,
    imatrix_label: str | None = None,
    include_weights: Sequence[str] = (),
    exclude_weights: Sequence[str] = (),
    output_tensor_type: str | int | None = None,
    token_embedding_type: str | int | None = None,
    tensor_types: Iterable[tuple[str, str | int]] | Iterable[str] = (),
    tensor_type_file: str | os.PathLike[str] | None = None,
    prune_layers: Iterable[int] | str = (),
    override_kv: Iterable[str] = (),
    allow_requantize: bool = False,
    leave_output_tensor: bool = False,
    pure: bool = False,
    keep_split: bool = False,
    dry_run: bool = False,
    max_buffer_size_mib: int = 0,
    check_imatrix: bool = True,
    on_start: Callable[[], None] | None = None,
    plan: Plan | None = None,
) -> Path | None:
    """Quantize a GGUF model with llama.cpp, as llama-quantize would with the same options.

    ``ftype`` is a llama-quantize type name (any case) or its number. ``output`` None means
    llama-quantize's default ``[input dir]/ggml-model-<FTYPE>.gguf``; with ``keep_split`` it is
    the prefix of the split files (a ``.gguf`` in it is dropped, as upstream does).
    ``tensor_types`` holds ``(pattern, type)`` pairs or ``"pattern=type"`` strings, applied after
    those of ``tensor_type_file``. ``override_kv`` holds ``KEY=TYPE:VALUE`` strings.
    The output is written to a temporary directory beside it and renamed when complete, so an
    error or Ctrl+C never leaves a partial file. Returns the output path (None for a dry run;
    the first split with ``keep_split``). The llama.cpp log goes to the ``llqx.llama`` logger.
    ``on_start`` is called once every check has passed, right before llama.cpp starts.
    With ``plan`` (from ``llqx.score(...).plan(...)``) every tensor gets its planned type (ftype is
    ignored) and the written file is checked against the plan before it is renamed into place.
    """
    ft = _resolve_ftype(ftype)
    if include_weights and exclude_weights:
        raise LlqxError("--include-weights and --exclude-weights cannot be used together")
    inp = Path(input)
    out: Path | None = None
    if not dry_run:
        out_name = os.fspath(output) if output is not None else default_output_path(inp, ft, keep_split)
        if keep_split and ".gguf" in out_name:  # upstream: the prefix loses its suffix
            out_name = out_name[: -len(".gguf")]
        out = Path(out_name)
    info = check_paths(inp, out)

    overrides: list[tuple[str, int]] = []
    if tensor_type_file is not None:
        overrides += read_tensor_type_file(tensor_type_file)
    for item in tensor_types:
        if isinstance(item, str):
            overrides.append(parse_tensor_type(item))
        else:
            pattern, tt = item
            overrides.append((pattern.lower(), ggml_type(tt).id))
    layers = parse_prune_layers(prune_layers) if isinstance(prune_layers, str) else sorted(
        {int(x) for x in prune_layers})
    if any(x < 0 for x in layers):
        raise LlqxError(f"invalid layer id in prune_layers {layers}")
    if max_buffer_size_mib < 0:
        raise LlqxError(f"invalid max buffer size {max_buffer_size_mib} MiB")

    req = _core.QuantizeRequest()
    req.input = os.fspath(inp)
    req.nthread = int(nthread)
    req.ftype = ft.ftype
    req.only_copy = ft.name == "COPY"
    req.output_tensor_type = _type_id(output_tensor_type)
    req.token_embedding_type = _type_id(token_embedding_type)
    req.allow_requantize = allow_requantize
    req.quantize_output_tensor = not leave_output_tensor
    req.pure = pure
    req.keep_split = keep_split
    req.dry_run = dry_run
    req.max_buf_size = int(max_buffer_size_mib) * 1024 * 1024
    req.prune_layers = layers
    for pattern, tid in overrides:
        req.add_tensor_override(pattern, tid)

    kv_overrides = [parse_kv_override(s) for s in override_kv]
    if plan is not None:
        # one anchored override per tensor on a pure Q8_0 base: llama.cpp writes exactly the plan
        if plan.requantize and not allow_requantize:
            raise LlqxError(f"{inp} is already quantized: requantizing loses quality; pass "
                            "allow_requantize=True to do it anyway")
        req.ftype = PLAN_BASE_FTYPE
        req.pure = True
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
        if not im.legacy and not im.has_metadata:
            raise LlqxError(f"missing imatrix metadata (datasets, chunk_count, chunk_size) in {label}")
        sel = select_imatrix(im, include_weights, exclude_weights)
        if check_imatrix:
            if not im.entries:
                raise LlqxError(f"imatrix {label} holds no entries")
            check_imatrix_fits(im, info, label)
        for name, values in sel.weights.items():
            req.add_imatrix(name, values)
        kv_overrides.extend(imatrix_kv_overrides(sel, label))
        del im, sel  # llama.cpp holds its own copy of the weights now
    req.kv_overrides = kv_overrides
    del info

    if plan is not None:
        # the plan's one override per tensor is intended: keep llama.cpp from warning about each
        _log.logger.addFilter(_drop_override_notes)
    try:
        return _run_to(req, out, plan, on_start, keep_split)
    finally:
        _log.logger.removeFilter(_drop_override_notes)


def _drop_override_notes(record: logging.LogRecord) -> bool:
    return "applying manual override" not in record.getMessage()


def _run_to(req: _core.QuantizeRequest, out: Path | None, plan: Plan | None,
            on_start: Callable[[], None] | None, keep_split: bool) -> Path | None:
    if out is None:
        req.output = ""
        if on_start is not None:
            on_start()
        run_model_quantize(req)
        return None

    # llama.cpp writes straight to its output path: give it a private one and rename when done
    try:
        tmpdir = Path(tempfile.mkdtemp(prefix="." + out.name + ".llqx-", dir=out.parent))
    except OSError as exc:
        raise LlqxError(f"cannot write to the output directory {out.parent}: {exc.strerror}") from None
    try:
        req.output = os.fspath(tmpdir / out.name)
        if on_start is not None:
            on_start()
        release_memory()
        try:
            run_model_quantize(req)
        except LlqxError:
            # llama.cpp reports a full disk as a bare stream error: name it by what the disk says
            if _nearly_full(out.parent):
                raise LlqxError(f"no space left on device: {out}") from None
            raise
        produced = sorted(tmpdir.iterdir())
        if not produced:
            raise LlqxError(f"llama.cpp wrote no output for {out}")
        if plan is not None:
            plan.verify(tmpdir / out.name)
        for f in produced:
            os.replace(f, out.parent / f.name)
    finally:
        _remove_tree(tmpdir)
    return out.parent / produced[0].name if keep_split else out
