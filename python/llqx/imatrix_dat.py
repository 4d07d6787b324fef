"""llama-imatrix's legacy ``.dat`` layout, bytes only: per entry its name, ncall and the values
(mean·ncall, float32), then the chunk count and the last dataset. imatrix.py turns records into
raw sums and back."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import LlqxError


@dataclass
class DatFile:
    """The contents of a .dat file: per entry (values, ncall), in file order."""

    entries: dict[str, tuple[np.ndarray, int]] = field(default_factory=dict)
    chunk_count: int = 0
    datasets: list[str] = field(default_factory=list)


def read_dat(path: Path) -> DatFile:
    data = path.read_bytes()
    pos = 0

    def take(fmt: str) -> tuple[int, ...]:
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise LlqxError(f"not an imatrix file (truncated or unknown format): {path}")
        out = struct.unpack_from(fmt, data, pos)
        pos += size
        return out

    (n_entries,) = take("<i")
    if n_entries < 1:
        raise LlqxError(f"not an imatrix file (no entries): {path}")
    out = DatFile()
    for _ in range(n_entries):
        (length,) = take("<i")
        if length <= 0 or pos + length > len(data):
            raise LlqxError(f"not an imatrix file (bad entry name): {path}")
        name = data[pos:pos + length].decode("utf-8", errors="replace")
        pos += length
        ncall, nval = take("<ii")
        if nval < 1 or pos + 4 * nval > len(data):
            raise LlqxError(f"not an imatrix file (bad entry size for {name}): {path}")
        out.entries[name] = (np.frombuffer(data, dtype="<f4", count=nval, offset=pos).astype(np.float32), ncall)
        pos += 4 * nval
    if pos + 4 <= len(data):
        (out.chunk_count,) = take("<i")
        if pos + 4 <= len(data):
            (length,) = take("<i")
            if length > 0 and pos + length <= len(data):
                out.datasets.append(data[pos:pos + length].decode("utf-8", errors="replace"))
    return out


def write_dat(path: Path, dat: DatFile) -> None:
    """Entries in the order given; the last dataset (or none) after the chunk count."""
    with path.open("wb") as f:
        f.write(struct.pack("<i", len(dat.entries)))
        for name, (values, ncall) in dat.entries.items():
            raw = name.encode("utf-8")
            f.write(struct.pack("<i", len(raw)))
            f.write(raw)
            f.write(struct.pack("<ii", ncall, values.size))
            f.write(values.astype("<f4").tobytes())
        f.write(struct.pack("<i", int(dat.chunk_count)))
        ds = (dat.datasets[-1] if dat.datasets else "").encode("utf-8")
        f.write(struct.pack("<i", len(ds)))
        f.write(ds)
