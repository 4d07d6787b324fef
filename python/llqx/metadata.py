"""The metadata llama_model_quantize writes: `--override-kv` values, the keys that record the imatrix, and
the size of the metadata block, which the planner needs for a whole-file budget and the writer produces."""

from __future__ import annotations

import re
from collections.abc import Sequence

from . import _core
from .errors import LlqxError
from .imatrix_select import ImatrixSelection

KEY_IMATRIX_FILE = "quantize.imatrix.file"
KEY_IMATRIX_DATASET = "quantize.imatrix.dataset"
KEY_IMATRIX_N_ENTRIES = "quantize.imatrix.entries_count"
KEY_IMATRIX_N_CHUNKS = "quantize.imatrix.chunks_count"

_TAG_INT, _TAG_FLOAT, _TAG_BOOL, _TAG_STR = 0, 1, 2, 3


def _c_atol(text: str) -> int:
    m = re.match(r"\s*[+-]?\d+", text)
    return int(m.group(0)) if m else 0


def _c_atof(text: str) -> float:
    m = re.match(r"\s*[+-]?(\d+\.?\d*([eE][+-]?\d+)?|\.\d+([eE][+-]?\d+)?|inf(inity)?|nan)", text,
                 re.IGNORECASE)
    return float(m.group(0)) if m else 0.0


def parse_kv_override(text: str) -> _core.KvOverride:
    """KEY=TYPE:VALUE with TYPE int, float, bool or str, parsed as llama.cpp's common does."""
    key, sep, rest = text.partition("=")
    if not sep or len(key.encode()) >= 128:
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
        kv.tag, kv.val_str = _TAG_STR, value.encode()[:127]  # strncpy(…, 127) as upstream, bytes kept
    else:
        kv.tag, kv.val_i64 = _TAG_INT, int(value)
    return kv


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


def meta_size(model_path: str, kv_overrides: Sequence[_core.KvOverride], ftype: int) -> int:
    """Bytes of the metadata (header, key/values, tensor infos, padding) of the file llama_model_quantize
    writes from this model with these overrides; tensor types do not change it."""
    return int(_core.layout_meta_size(model_path, list(kv_overrides), ftype))
