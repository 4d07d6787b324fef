"""Importance-matrix files: upstream GGUF (with or without llqx's extensions) and legacy ``.dat``.

Per weight tensor and per MoE expert the record holds raw sums over routed token rows:
``in_sum2`` = Σx², ``in_sum`` = Σx and ``counts``; for a dense tensor also ``in_sketch``, a sketch of
Σ x xᵀ beyond its diagonal (Σ x·(Ωᵀx) for a fixed ±1 test matrix Ω, cpp/llqx_sketch.h). ``in_sum`` and
``in_sketch`` are llqx's extensions (None in upstream files, which llama.cpp reads as its own), as are
``in_max2`` (per block of 32 or 256 columns, Σ over rows of the block's largest |x|², what prices the 8-bit
rounding of activations in ggml's CPU dot products), the residual writers' stream sums (imatrix_entry.StreamSums)
and the ``llqx.sensitivity.*`` keys: each tensor
group's KL divergence measured after collecting (llqx.sensitivity).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from .atomic import atomic_path
from .errors import LlqxError
from .imatrix_dat import DatFile, read_dat, write_dat
from .imatrix_entry import ImatrixEntry, ImatrixFile, StreamSums, add_block_maxima
from .imatrix_gguf import read_gguf, write_gguf
from .imatrix_sketch import SKETCH_DIRECTIONS, merge_sketches, sketch_second_moments

__all__ = ["Imatrix", "ImatrixEntry", "StreamSums"]


def _rounding_variance(max2: np.ndarray, counts: np.ndarray, block: int, second: np.ndarray) -> np.ndarray:
    """Per column, float32: min(E[max²] / (12·127²), E[x²]) from the block maxima summed over ``counts`` rows,
    max2 (rows, n_per_row // block), and the columns' second moments ``second`` (rows, n_per_row)."""
    mean = np.divide(max2, counts, out=np.zeros(max2.shape), where=counts > 0)
    step = np.repeat(mean / (12.0 * 127.0**2), block, axis=1)
    return np.minimum(step, second).astype(np.float32)


@dataclass
class Imatrix(ImatrixFile):
    """An importance matrix: per-tensor raw sums plus the datasets and chunking that made them."""

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
        return _rounding_variance(m, counts, block, self.values(name))

    def stream_rounding_noise(self, name: str, block: int) -> np.ndarray | None:
        """``rounding_noise`` as a residual writer's stream weighs it, float32 (1, n_per_row): each token's
        rounding error relative to its stream, E[step²/ms(s)] / 12, at most E[x²/ms(s)]. None without the
        writer's stream block maxima."""
        st = self.entries[name].stream
        moments = self.stream_moments(name)
        if st is None or moments is None or block not in st.in_max2:
            return None
        return _rounding_variance(st.in_max2[block].reshape(1, -1), np.array([[st.count]]), block, moments[0])

    def stream_moments(self, name: str) -> tuple[np.ndarray, np.ndarray] | None:
        """A residual writer's input second moments and mean, each token weighted by 1/ms(s) of the stream s it
        is added to: (E[x²/ms(s)], E[x/rms(s)]), float32 (1, n_per_row). None without stream sums."""
        st = self.entries[name].stream
        if st is None or st.count <= 0:
            return None
        return ((st.in_sum2 / st.count).astype(np.float32).reshape(1, -1),
                (st.in_sum / st.count).astype(np.float32).reshape(1, -1))

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
            write_gguf(self, tmp) if fmt == "gguf" else _save_dat(self, tmp)

    def copy(self) -> Imatrix:
        out = Imatrix({}, list(self.datasets), self.chunk_count, self.chunk_size, self.legacy,
                      sensitivities=dict(self.sensitivities), sensitivity_method=self.sensitivity_method,
                      sensitivity_source=self.sensitivity_source)
        for name, e in self.entries.items():
            out.entries[name] = e.copy()
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
            e.stream = None
        out.legacy = False
        out.chunk_size = chunk_size
        return out

    def merge(self, *others: Imatrix) -> Imatrix:
        """Sum the raw statistics of several runs over the same model (weighted by their counts).

        Legacy .dat records are turned into raw sums with this record's chunk size (llama-imatrix's rule).
        ``in_sum``, ``in_sketch``, ``in_max2`` and the stream sums survive only where every part has them
        (sketches of the same size add up: their test matrix is fixed).
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
                                                     {b: m.astype(np.float64) for b, m in e.in_max2.items()},
                                                     e.stream)
                    continue
                if mine.n_expert == 1 and e.n_expert > 1 and mine.n_per_row == e.n_per_row:
                    # an old file with one count for all experts: broadcast it (llama-imatrix does the same)
                    mine.in_sum2 = np.repeat(mine.in_sum2, e.n_expert, axis=0)
                    mine.counts = np.repeat(mine.counts, e.n_expert)
                    mine.in_sum = None if mine.in_sum is None else np.repeat(mine.in_sum, e.n_expert, axis=0)
                    mine.in_sketch = None
                    mine.in_max2 = {}
                    mine.stream = None
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
                mine.in_max2 = add_block_maxima(mine.in_max2, e.in_max2)
                mine.stream = None if mine.stream is None or e.stream is None else mine.stream + e.stream
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
    g = read_gguf(path)
    return Imatrix(**{f.name: getattr(g, f.name) for f in fields(g)})


def _load_dat(path: Path) -> Imatrix:
    dat = read_dat(path)
    im = Imatrix(legacy=True, chunk_count=dat.chunk_count, datasets=dat.datasets)
    for name, (values, ncall) in dat.entries.items():
        im.entries[name] = ImatrixEntry(values.reshape(1, -1), np.array([ncall], dtype=np.float32))
    return im


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
