"""Importance-matrix files: upstream GGUF (with or without llqx's extensions) and legacy ``.dat``.

Per weight tensor and per MoE expert the record holds raw sums over routed token rows:
``in_sum2`` = Σx², ``in_sum`` = Σx and ``counts``; for a dense tensor also ``in_sketch``, a sketch of
Σ x xᵀ beyond its diagonal (Σ x·(Ωᵀx) for a fixed ±1 test matrix Ω, cpp/llqx_sketch.h). ``in_sum`` and
``in_sketch`` are llqx's extensions (None in upstream files, which llama.cpp reads as its own), as are
``in_max2`` (per block of 32 or 256 columns, Σ over rows of the block's largest |x|², what prices the 8-bit
rounding of activations in ggml's CPU dot products) and the ``llqx.sensitivity.*`` keys: each tensor
group's KL divergence measured after collecting (llqx.sensitivity).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .atomic import atomic_path
from .errors import LlqxError
from .imatrix_dat import DatFile, read_dat, write_dat
from .imatrix_sketch import SKETCH_DIRECTIONS, merge_sketches, sketch_second_moments

KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
KEY_SENS_METHOD = "llqx.sensitivity.method"
KEY_SENS_SOURCE = "llqx.sensitivity.source"
KEY_SENS_GROUPS = "llqx.sensitivity.groups"
KEY_SENS_KLD = "llqx.sensitivity.kld"


@dataclass
class ImatrixEntry:
    """Raw sums of one weight tensor: arrays shaped (n_expert, n_per_row) and (n_expert,)."""

    in_sum2: np.ndarray
    counts: np.ndarray
    in_sum: np.ndarray | None = None
    # dense tensors: (p, n_per_row), row i = Σ x·(ω_iᵀx), a raw sum like the others (cpp/llqx_sketch.h)
    in_sketch: np.ndarray | None = None
    # block width (32, 256) -> (n_expert, n_per_row // width): Σ over rows of (max |x| over the block)²
    in_max2: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def n_expert(self) -> int:
        return int(self.in_sum2.shape[0])

    @property
    def n_per_row(self) -> int:
        return int(self.in_sum2.shape[1])


@dataclass
class Imatrix:
    """An importance matrix: per-tensor raw sums plus the datasets and chunking that made them."""

    entries: dict[str, ImatrixEntry] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False  # read from a .dat file: in_sum2 holds mean·ncall, counts the ncall
    has_metadata: bool = True  # a GGUF file had datasets, chunk_count and chunk_size (upstream requires them)
    # measured with exactly these sums (a merge drops them): {group: KLD of its probe}, how, and on what text
    sensitivities: dict[str, float] = field(default_factory=dict)
    sensitivity_method: str = ""
    sensitivity_source: str = ""

    @property
    def has_sketch(self) -> bool:
        return any(e.in_sketch is not None for e in self.entries.values())

    @property
    def has_activations(self) -> bool:
        return bool(self.entries) and all(e.in_sum is not None for e in self.entries.values())

    def values(self, name: str) -> np.ndarray:
        """E[x²] per expert and column, float32 (n_expert, n_per_row); 1 where an expert saw no token.

        Computed in float32 exactly as llama-quantize normalizes the file, so the weights we pass
        to llama.cpp are bit-identical to upstream's.
        """
        e = self.entries[name]
        # upstream reads counts with std::lround (half away from zero), then divides in float32
        c = np.asarray(e.counts, dtype=np.float64)
        counts = (np.sign(c) * np.floor(np.abs(c) + 0.5)).astype(np.int64).astype(np.float32)
        out = np.ones_like(e.in_sum2, dtype=np.float32)
        seen = counts > 0
        out[seen] = e.in_sum2[seen].astype(np.float32) / counts[seen, None]
        if self.legacy and not seen.any():
            out = e.in_sum2.astype(np.float32).copy()
        return out

    def activations(self, name: str) -> np.ndarray | None:
        """E[x] per expert and column, float32 (n_expert, n_per_row); 0 where no token.

        None when the record has no ``in_sum`` (upstream files).
        """
        e = self.entries[name]
        if e.in_sum is None:
            return None
        counts = np.rint(e.counts).astype(np.float32)
        out = np.zeros_like(e.in_sum, dtype=np.float32)
        seen = counts > 0
        out[seen] = e.in_sum[seen].astype(np.float32) / counts[seen, None]
        return out

    def second_moments(self, name: str, n_dir: int = SKETCH_DIRECTIONS) -> tuple[np.ndarray, np.ndarray] | None:
        """E[x xᵀ] of a dense tensor's input as diag(d) + Σ_i a_i a_iᵀ: (d (1, n), a (1, n_dir, n)), float32.

        The a_i are the leading directions of the sketch's Nyström approximation (scaled per token), which
        lies below E[x xᵀ]; d is what E[x²] leaves on the diagonal beside them, so the diagonal of the whole
        is exactly E[x²]. None without a sketch, or where no token was counted.
        """
        e = self.entries[name]
        count = float(np.rint(e.counts.reshape(-1)[0])) if e.counts.size == 1 else 0.0
        if e.in_sketch is None or count <= 0:
            return None
        return sketch_second_moments(e.in_sketch, count, self.values(name), n_dir)

    def rounding_noise(self, name: str, block: int) -> np.ndarray | None:
        """Per expert and column, float32 (n_expert, n_per_row): the variance of the error an 8-bit rounding
        of the input in blocks of ``block`` values adds. The step is max |x| / 127, so a value spanning steps
        errs by step² / 12; one under half a step (beside a block's massive activation) rounds to 0 and errs
        by itself, hence the smaller of E[step²] / 12 and E[x²]. None without the block maxima (upstream files)."""
        e = self.entries[name]
        m = e.in_max2.get(block)
        if m is None:
            return None
        counts = np.rint(e.counts).astype(np.float64).reshape(-1, 1)
        mean = np.divide(m, counts, out=np.zeros(m.shape), where=counts > 0)
        step = np.repeat(mean / (12.0 * 127.0**2), block, axis=1)
        return np.minimum(step, self.values(name)).astype(np.float32)

    def quantize_weights(self) -> dict[str, np.ndarray]:
        """The flat per-tensor weights llama_model_quantize takes (experts concatenated)."""
        return {name: self.values(name).reshape(-1) for name in self.entries}

    # ---- files -------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Imatrix:
        p = Path(path)
        if not p.is_file():
            raise LlqxError(f"imatrix file not found: {p}")
        with p.open("rb") as f:
            magic = f.read(4)
        return _load_gguf(p) if magic == b"GGUF" else _load_dat(p)

    def save(self, path: str | os.PathLike[str], fmt: str = "gguf") -> None:
        """Write atomically (temporary file + rename) in 'gguf' or legacy 'dat' form."""
        p = Path(path)
        if p.is_dir():
            raise LlqxError(f"imatrix output is a directory: {p}")
        if fmt not in ("gguf", "dat"):
            raise LlqxError(f"unknown imatrix format '{fmt}' (gguf or dat)")
        with atomic_path(p) as tmp:
            _save_gguf(self, tmp) if fmt == "gguf" else _save_dat(self, tmp)

    def copy(self) -> Imatrix:
        out = Imatrix({}, list(self.datasets), self.chunk_count, self.chunk_size, self.legacy,
                      sensitivities=dict(self.sensitivities), sensitivity_method=self.sensitivity_method,
                      sensitivity_source=self.sensitivity_source)
        for name, e in self.entries.items():
            out.entries[name] = ImatrixEntry(e.in_sum2.copy(), e.counts.copy(),
                                             None if e.in_sum is None else e.in_sum.copy(),
                                             None if e.in_sketch is None else e.in_sketch.copy(),
                                             {b: m.copy() for b, m in e.in_max2.items()})
        return out

    def to_raw(self, chunk_size: int) -> Imatrix:
        """Raw sums of a legacy .dat record, as llama-imatrix rebuilds them: mean·ncall·chunk_size.

        A record that is not legacy is returned as a copy.
        """
        out = self.copy()
        if not self.legacy:
            return out
        if chunk_size <= 0:
            raise LlqxError("a chunk size is needed to turn a legacy .dat imatrix into raw sums")
        for e in out.entries.values():
            e.in_sum2 = e.in_sum2.astype(np.float64) * chunk_size
            e.counts = np.full(e.n_expert, float(e.counts[0]) * chunk_size)
            e.in_sum = None
            e.in_sketch = None
            e.in_max2 = {}
        out.legacy = False
        out.chunk_size = chunk_size
        return out

    def merge(self, *others: Imatrix) -> Imatrix:
        """Sum the raw statistics of several runs over the same model (weighted by their counts).

        Legacy .dat records are turned into raw sums with this record's chunk size (llama-imatrix's rule).
        ``in_sum``, ``in_sketch`` and ``in_max2`` survive only where every part has them (sketches of the same
        size add up: their test matrix is fixed).
        """
        chunk = self.chunk_size or next((o.chunk_size for o in others if o.chunk_size), 0)
        out = self.to_raw(chunk) if self.legacy else self.copy()
        if others:
            out.sensitivities, out.sensitivity_method, out.sensitivity_source = {}, "", ""
        for other in others:
            if other.legacy:
                other = other.to_raw(out.chunk_size or chunk)
            for ds in other.datasets:
                out.datasets.append(ds)
            # counts are tokens, so runs with other chunk sizes add up; the first chunk size is kept
            out.chunk_size = out.chunk_size or other.chunk_size
            for name, e in other.entries.items():
                mine = out.entries.get(name)
                if mine is None:
                    in_sum = None if e.in_sum is None else e.in_sum.astype(np.float64)
                    out.entries[name] = ImatrixEntry(e.in_sum2.astype(np.float64),
                                                     e.counts.astype(np.float64), in_sum, e.in_sketch,
                                                     {b: m.astype(np.float64) for b, m in e.in_max2.items()})
                    continue
                if mine.n_expert == 1 and e.n_expert > 1 and mine.n_per_row == e.n_per_row:
                    # an old file with one count for all experts: broadcast it (llama-imatrix does the same)
                    mine.in_sum2 = np.repeat(mine.in_sum2, e.n_expert, axis=0)
                    mine.counts = np.repeat(mine.counts, e.n_expert)
                    mine.in_sum = None if mine.in_sum is None else np.repeat(mine.in_sum, e.n_expert, axis=0)
                    mine.in_sketch = None
                    mine.in_max2 = {}
                if mine.in_sum2.shape != e.in_sum2.shape:
                    raise LlqxError(f"imatrix shapes differ for {name}: "
                                    f"{mine.in_sum2.shape} vs {e.in_sum2.shape}")
                mine.in_sum2 = mine.in_sum2.astype(np.float64) + e.in_sum2
                mine.counts = mine.counts.astype(np.float64) + e.counts
                if mine.in_sum is not None and e.in_sum is not None:
                    mine.in_sum = mine.in_sum.astype(np.float64) + e.in_sum
                else:
                    mine.in_sum = None
                mine.in_sketch = merge_sketches(mine.in_sketch, e.in_sketch)
                mine.in_max2 = {b: mine.in_max2[b].astype(np.float64) + m for b, m in e.in_max2.items()
                                if b in mine.in_max2 and mine.in_max2[b].shape == m.shape}
            # names only in `out` keep their sums: their in_sum stays valid (the other run did not see them)
        out.chunk_count = out.chunks_from_counts()
        return out

    def chunks_from_counts(self) -> int:
        """Chunks the counts amount to, as llama-imatrix records it: max count // chunk size."""
        if self.legacy or self.chunk_size <= 0 or not self.entries:
            return self.chunk_count
        top = max(float(np.max(e.counts)) if e.counts.size else 0.0 for e in self.entries.values())
        return round(top) // self.chunk_size



def _load_gguf(path: Path) -> Imatrix:
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # gguf-py raises plain ValueError/struct errors on damage
        raise LlqxError(f"corrupt imatrix file {path}: {exc}") from exc
    im = Imatrix()
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
        if suffix not in ("in_sum2", "in_sum", "counts", "in_sketch") and not suffix.startswith(_MAX2):
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
        sketch = p.get("in_sketch")
        if sketch is not None and (p["in_sum2"].shape[0] != 1 or sketch.shape[1] != p["in_sum2"].shape[1]):
            raise LlqxError(f"imatrix {path}: the sketch of {name} does not match its sums")
        in_max2 = {}
        for suffix, m in p.items():
            width = suffix[len(_MAX2):]
            if suffix.startswith(_MAX2):
                if not width.isdigit() or int(width) <= 0 or m.shape[0] != p["in_sum2"].shape[0] \
                        or m.shape[1] * int(width) != p["in_sum2"].shape[1]:
                    raise LlqxError(f"imatrix {path}: the block maxima {name}.{suffix} do not match its sums")
                in_max2[int(width)] = m
        im.entries[name] = ImatrixEntry(p["in_sum2"], p["counts"].reshape(-1), p.get("in_sum"), sketch, in_max2)
    return im


_MAX2 = "in_max2_"  # NAME.in_max2_32: the block maxima of blocks of 32 columns


def _load_dat(path: Path) -> Imatrix:
    dat = read_dat(path)
    im = Imatrix(legacy=True, chunk_count=dat.chunk_count, datasets=dat.datasets)
    for name, (values, ncall) in dat.entries.items():
        im.entries[name] = ImatrixEntry(values.reshape(1, -1), np.array([ncall], dtype=np.float32))
    return im


_GGUF_ALIGN = 32
_GGUF_U32, _GGUF_STRING, _GGUF_ARRAY, _GGUF_F64, _GGML_F32 = 4, 8, 9, 12, 0


def _gguf_str(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _save_gguf(im: Imatrix, path: Path) -> None:
    """GGUF v3 laid out like llama-imatrix's: general.type, imatrix.* keys, then per tensor (by name)
    NAME.in_sum2 (ne [n_per_row, n_expert]), NAME.counts (ne [1, n_expert]) and, with activations,
    NAME.in_sum, with a sketch NAME.in_sketch (ne [n_per_row, p]), with block maxima NAME.in_max2_W (ne
    [n_per_row / W, n_expert]). Written directly (gguf-py cannot write
    the empty dataset list upstream allows)."""
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


def _save_dat(im: Imatrix, path: Path) -> None:
    """llama-imatrix's legacy layout: entries with data, sorted; values (sum/count)·ncall in float32."""
    names = [n for n in sorted(im.entries) if im.legacy or bool(np.any(im.entries[n].counts > 0))]
    if not names:
        raise LlqxError("no imatrix entry has data: nothing to write")
    dat = DatFile(chunk_count=im.chunk_count, datasets=im.datasets)
    for name in names:
        e = im.entries[name]
        if im.legacy:
            ncall = int(e.counts[0])
            values = e.in_sum2.reshape(-1).astype(np.float32)
        else:
            chunk = max(im.chunk_size, 1)
            counts = np.rint(e.counts).astype(np.int64)
            ncall = int((int(counts.max()) + chunk - 1) // chunk)
            sums = e.in_sum2.astype(np.float32)
            cnt = counts.astype(np.float32)[:, None] * np.ones_like(sums)
            zero = cnt == 0
            sums = np.where(zero, np.float32(1), sums)
            cnt = np.where(zero, np.float32(1), cnt)
            values = ((sums / cnt) * np.float32(ncall)).astype(np.float32).reshape(-1)
        dat.entries[name] = (values, ncall)
    write_dat(path, dat)
