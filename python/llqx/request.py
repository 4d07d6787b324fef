"""The typed seam between the quantize command lines and the library: one request per command.

Both front ends (`llqx-quantize`, llama-quantize's own argument loop, and `llqx quantize`, argparse)
build a :class:`QuantizeRequest`; the plain writer and the target path take nothing else.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from fractions import Fraction

from .errors import LlqxError
from .types import FileType

# how the scorer treats the low-bit grid types: score all up front, or only near a target (window)
CANDIDATE_MODES = ("all", "window")

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """'1.5G' = 1.5 GiB, '800M', '123456' (bytes); K/M/G/T are powers of 1024 (KiB/KB/K all alike)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(?:I?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise LlqxError(f"invalid size '{text}': use a number with an optional unit B, K, M, G or T (e.g. 1.5G)")
    size = int(Fraction(m.group(1)) * _UNITS[m.group(2).upper()])
    if size <= 0:
        raise LlqxError(f"invalid size '{text}': must be positive")
    return size


def parse_bpw(text: str) -> float:
    """A target in bits per weight: a finite positive number."""
    try:
        value = float(text)
    except ValueError:
        raise LlqxError(f"invalid --target-bpw '{text}' (a number of bits per weight)") from None
    if not (math.isfinite(value) and value > 0):
        raise LlqxError(f"invalid --target-bpw '{text}' (must be a finite positive number)")
    return value


def parse_candidates(text: str) -> str:
    if text not in CANDIDATE_MODES:
        raise LlqxError(f"invalid --candidates '{text}' (use {' or '.join(CANDIDATE_MODES)})")
    return text


def parse_score_elements(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise LlqxError(f"invalid --score-elements '{text}' (a positive number of elements)")
    return value


@dataclass
class QuantizeRequest:
    """One quantize command: llama-quantize's options (same meaning) and llqx's target options.

    ``tensor_types`` are ``(lower-cased pattern, ggml type id)`` in command-line order
    (``--tensor-type`` and ``--tensor-type-file`` interleaved, as upstream). ``output`` is None for a
    dry run, and in target mode when no output was named (the plan's bpw then names it).
    ``ftype`` is None only in target mode without a type. ``target_size`` is in bytes.
    """

    input: str
    output: str | None = None
    ftype: FileType | None = None
    nthread: int = 0
    imatrix: str | None = None
    include_weights: list[str] = field(default_factory=list)
    exclude_weights: list[str] = field(default_factory=list)
    output_tensor_type: str | None = None
    token_embedding_type: str | None = None
    tensor_types: list[tuple[str, int]] = field(default_factory=list)
    prune_layers: list[int] = field(default_factory=list)
    override_kv: list[str] = field(default_factory=list)
    allow_requantize: bool = False
    leave_output_tensor: bool = False
    pure: bool = False
    keep_split: bool = False
    dry_run: bool = False
    max_buffer_size: int = 0  # MiB; 0: llama.cpp's default
    quiet: bool = False
    verbose: bool = False
    json: bool = False
    target_bpw: float | None = None
    target_size: int | None = None
    state_file: str | None = None
    candidates: str = "all"
    score_elements: int | None = None

    @property
    def target_mode(self) -> bool:
        return self.target_bpw is not None or self.target_size is not None
