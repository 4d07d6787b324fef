"""The GGUF imatrix layout: llama-imatrix's tensors and keys, plus llqx's extensions, which upstream ignores
(it reads only NAME.in_sum2 and NAME.counts). Written directly: gguf-py cannot write the empty dataset
list upstream allows."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from .errors import LlqxError
from .imatrix_entry import ImatrixEntry, ImatrixFile, StreamSums

KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
KEY_SENS_METHOD = "llqx.sensitivity.method"
KEY_SENS_SOURCE = "llqx.sensitivity.source"
KEY_SENS_GROUPS = "llqx.sensitivity.groups"
KEY_SENS_KLD = "llqx.sensitivity.kld"

_MAX2 = "in_max2_"  # NAME.in_max2_32: the block maxima of blocks of 32 columns
_STREAM = ("in_sum2_stream", "in_sum_stream", "counts_stream")
_STREAM_MAX2 = "stream_max2_"  # NAME.stream_max2_32: a writer's block maxima weighted by its stream
_SUFFIXES = ("in_sum2", "in_sum", "counts", "in_sketch", *_STREAM)


def read_gguf(path: Path) -> ImatrixFile:
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # gguf-py raises plain ValueError/struct errors on damage
        raise LlqxError(f"corrupt imatrix file {path}: {exc}") from exc
    im = ImatrixFile()
    im.has_metadata = all(k in reader.fields for k in (KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE))
    if KEY_DATASETS in reader.fields:
        im.datasets = [str(s) for s in reader.fields[KEY_DATASETS].contents()]
    if KEY_CHUNK_COUNT in reader.fields:
        im.chunk_count = int(reader.fields[KEY_CHUNK_COUNT].contents())
    if KEY_CHUNK_SIZE in reader.fields:
        im.chunk_size = int(reader.fields[KEY_CHUNK_SIZE].contents())
    if all(k in reader.fields for k in (KEY_SENS_METHOD, KEY_SENS_GROUPS, KEY_SENS_KLD)):
        groups = [str(g) for g in reader.fields[KEY_SENS_GROUPS].contents()]
        klds = [float(x) for x in reader.fields[KEY_SENS_KLD].contents()]
        if len(groups) != len(klds):
            raise LlqxError(f"imatrix {path}: {KEY_SENS_GROUPS} and {KEY_SENS_KLD} differ in length")
        im.sensitivities = dict(zip(groups, klds, strict=True))
        im.sensitivity_method = str(reader.fields[KEY_SENS_METHOD].contents())
        if KEY_SENS_SOURCE in reader.fields:
            im.sensitivity_source = str(reader.fields[KEY_SENS_SOURCE].contents())
    parts: dict[str, dict[str, np.ndarray]] = {}
    for t in reader.tensors:
        base, _, suffix = t.name.rpartition(".")
        if suffix not in _SUFFIXES and not suffix.startswith((_MAX2, _STREAM_MAX2)):
            continue
        if t.tensor_type != gguf.GGMLQuantizationType.F32:
            raise LlqxError(f"imatrix tensor {t.name} must be F32 in {path}")
        n_rows = int(t.shape[1]) if len(t.shape) > 1 else 1  # experts; for in_sketch its rank
        parts.setdefault(base, {})[suffix] = np.array(t.data, dtype=np.float32).reshape(n_rows, -1)
    if not parts:
        raise LlqxError(f"no imatrix data in {path}")
    for name, p in sorted(parts.items()):
        if "in_sum2" not in p or "counts" not in p:
            raise LlqxError(f"imatrix {path}: mismatched sums and counts for {name}")
        im.entries[name] = _entry(path, name, p)
    return im


def _entry(path: Path, name: str, p: dict[str, np.ndarray]) -> ImatrixEntry:
    sums = p["in_sum2"]
    sketch = p.get("in_sketch")
    if sketch is not None and (sums.shape[0] != 1 or sketch.shape[1] != sums.shape[1]):
        raise LlqxError(f"imatrix {path}: the sketch of {name} does not match its sums")
    in_max2 = _block_maxima(path, name, p, _MAX2, sums.shape[0])
    stream = None
    if any(s in p for s in _STREAM):
        s2, s1, count = (p.get(s) for s in _STREAM)
        if s2 is None or s1 is None or count is None or sums.shape[0] != 1 or count.size != 1 \
                or s2.shape != sums.shape or s1.shape != sums.shape:
            raise LlqxError(f"imatrix {path}: the stream sums of {name} do not match its sums")
        stream_max2 = {b: m.reshape(-1) for b, m in _block_maxima(path, name, p, _STREAM_MAX2, 1).items()}
        stream = StreamSums(s2.reshape(-1), s1.reshape(-1), float(count.reshape(-1)[0]), stream_max2)
    return ImatrixEntry(sums, p["counts"].reshape(-1), p.get("in_sum"), sketch, in_max2, stream)


def _block_maxima(path: Path, name: str, p: dict[str, np.ndarray], prefix: str,
                  n_rows: int) -> dict[int, np.ndarray]:
    """The entry's tensors PREFIX<width> by width, each checked to have n_rows rows of whole blocks."""
    n_per_row = p["in_sum2"].shape[1]
    out = {}
    for suffix, m in p.items():
        width = suffix[len(prefix):]
        if suffix.startswith(prefix):
            if not width.isdigit() or int(width) <= 0 or m.shape[0] != n_rows or m.shape[1] * int(width) != n_per_row:
                raise LlqxError(f"imatrix {path}: the block maxima {name}.{suffix} do not match its sums")
            out[int(width)] = m
    return out


_GGUF_ALIGN = 32
_GGUF_U32, _GGUF_STRING, _GGUF_ARRAY, _GGUF_F64, _GGML_F32 = 4, 8, 9, 12, 0


def _gguf_str(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def write_gguf(im: ImatrixFile, path: Path) -> None:
    """GGUF v3 laid out like llama-imatrix's: general.type, imatrix.* keys, then per tensor (by name)
    NAME.in_sum2 (ne [n_per_row, n_expert]), NAME.counts (ne [1, n_expert]) and, with activations,
    NAME.in_sum, with a sketch NAME.in_sketch (ne [n_per_row, p]), with block maxima NAME.in_max2_W (ne
    [n_per_row / W, n_expert]), with stream sums NAME.in_sum2_stream, NAME.in_sum_stream (ne [n_per_row])
    and NAME.counts_stream (ne [1]), with their block maxima NAME.stream_max2_W (ne [n_per_row / W])."""
    tensors: list[tuple[str, np.ndarray]] = []
    for name in sorted(im.entries):
        e = im.entries[name]
        tensors.append((name + ".in_sum2", np.ascontiguousarray(e.in_sum2, dtype="<f4")))
        tensors.append((name + ".counts", np.ascontiguousarray(e.counts, dtype="<f4").reshape(e.n_expert, 1)))
        if e.in_sum is not None:
            tensors.append((name + ".in_sum", np.ascontiguousarray(e.in_sum, dtype="<f4")))
        if e.in_sketch is not None:
            tensors.append((name + ".in_sketch", np.ascontiguousarray(e.in_sketch, dtype="<f4")))
        for width, m in sorted(e.in_max2.items()):
            tensors.append((f"{name}.{_MAX2}{width}", np.ascontiguousarray(m, dtype="<f4")))
        if e.stream is not None:
            values = (e.stream.in_sum2.reshape(1, -1), e.stream.in_sum.reshape(1, -1), np.array([[e.stream.count]]))
            for suffix, v in zip(_STREAM, values, strict=True):
                tensors.append((f"{name}.{suffix}", np.ascontiguousarray(v, dtype="<f4")))
            for width, m in sorted(e.stream.in_max2.items()):
                tensors.append((f"{name}.{_STREAM_MAX2}{width}", np.ascontiguousarray(m.reshape(1, -1), dtype="<f4")))

    kv = bytearray()
    kv += _gguf_str("general.type") + struct.pack("<I", _GGUF_STRING) + _gguf_str("imatrix")
    kv += _gguf_str(KEY_DATASETS) + struct.pack("<IIQ", _GGUF_ARRAY, _GGUF_STRING, len(im.datasets))
    for ds in im.datasets:
        kv += _gguf_str(ds)
    kv += _gguf_str(KEY_CHUNK_COUNT) + struct.pack("<II", _GGUF_U32, int(im.chunk_count))
    kv += _gguf_str(KEY_CHUNK_SIZE) + struct.pack("<II", _GGUF_U32, int(im.chunk_size))
    n_kv = 4
    if im.sensitivities:
        groups = sorted(im.sensitivities)
        kv += _gguf_str(KEY_SENS_METHOD) + struct.pack("<I", _GGUF_STRING) + _gguf_str(im.sensitivity_method)
        kv += _gguf_str(KEY_SENS_SOURCE) + struct.pack("<I", _GGUF_STRING) + _gguf_str(im.sensitivity_source)
        kv += _gguf_str(KEY_SENS_GROUPS) + struct.pack("<IIQ", _GGUF_ARRAY, _GGUF_STRING, len(groups))
        for g in groups:
            kv += _gguf_str(g)
        kv += _gguf_str(KEY_SENS_KLD) + struct.pack("<IIQ", _GGUF_ARRAY, _GGUF_F64, len(groups))
        kv += struct.pack(f"<{len(groups)}d", *(im.sensitivities[g] for g in groups))
        n_kv += 4

    info = bytearray()
    offset = 0
    for name, arr in tensors:
        ne = list(reversed(arr.shape))
        while len(ne) > 1 and ne[-1] == 1:  # ggml_n_dims: trailing 1s are not stored
            ne.pop()
        info += _gguf_str(name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne)
        info += struct.pack("<IQ", _GGML_F32, offset)
        offset += -(-arr.nbytes // _GGUF_ALIGN) * _GGUF_ALIGN

    with path.open("wb") as f:
        f.write(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), n_kv))
        f.write(kv)
        f.write(info)
        f.write(b"\0" * (-f.tell() % _GGUF_ALIGN))
        for _, arr in tensors:
            f.write(arr.tobytes())
            f.write(b"\0" * (-arr.nbytes % _GGUF_ALIGN))
