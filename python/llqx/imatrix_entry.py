"""What an importance-matrix file holds: per weight tensor its raw sums, and the run that made them
(``Imatrix`` adds the arithmetic; imatrix_gguf and imatrix_dat the bytes)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def add_block_maxima(a: dict[int, np.ndarray], b: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Block maxima of two runs added per width; a width only one run has (or of another shape) is dropped."""
    return {w: a[w].astype(np.float64) + m for w, m in b.items() if w in a and a[w].shape == m.shape}


@dataclass
class StreamSums:
    """A residual writer's (attn_output, ffn_down) input weighted per token by its stream: the token's
    activations over rms(s), s the residual stream right after the writer adds to it. An error the writer
    adds to a token reaches the next RMSNorm divided by rms(s), so these sums price it where it lands.
    Raw sums over ``count`` tokens: ``in_sum2`` = Σ x²/ms(s), ``in_sum`` = Σ x/rms(s), both (n_per_row,), and
    per block width ``in_max2`` = Σ (max |x| over the block)²/ms(s), (n_per_row // width,) (none in files of
    llqx before scoring version 6)."""

    in_sum2: np.ndarray
    in_sum: np.ndarray
    count: float
    in_max2: dict[int, np.ndarray] = field(default_factory=dict)

    def __add__(self, other: StreamSums) -> StreamSums:
        return StreamSums(self.in_sum2.astype(np.float64) + other.in_sum2,
                          self.in_sum.astype(np.float64) + other.in_sum, self.count + other.count,
                          add_block_maxima(self.in_max2, other.in_max2))

    def copy(self) -> StreamSums:
        return StreamSums(self.in_sum2.copy(), self.in_sum.copy(), self.count,
                          {b: m.copy() for b, m in self.in_max2.items()})


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
    # dense residual writers collected by llqx: the stream-relative sums
    stream: StreamSums | None = None

    @property
    def n_expert(self) -> int:
        return int(self.in_sum2.shape[0])

    @property
    def n_per_row(self) -> int:
        return int(self.in_sum2.shape[1])

    def copy(self) -> ImatrixEntry:
        return ImatrixEntry(self.in_sum2.copy(), self.counts.copy(),
                            None if self.in_sum is None else self.in_sum.copy(),
                            None if self.in_sketch is None else self.in_sketch.copy(),
                            {b: m.copy() for b, m in self.in_max2.items()},
                            None if self.stream is None else self.stream.copy())


@dataclass
class ImatrixFile:
    """An importance matrix's records: per-tensor raw sums plus the datasets and chunking that made them."""

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
