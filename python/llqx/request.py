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
from .types import FileType, ggml_type

# how the scorer treats the low-bit grid types: score all up front, or only near a target (window)
CANDIDATE_MODES = ("all", "window")
DEFAULT_CANDIDATES = "window"

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


def parse_bpw(text: str, option: str = "--target-bpw") -> float:
    """A target in bits per weight: a finite positive number."""
    try:
        value = float(text)
    except ValueError:
        raise LlqxError(f"invalid {option} '{text}' (a number of bits per weight)") from None
    if not (math.isfinite(value) and value > 0):
        raise LlqxError(f"invalid {option} '{text}' (must be a finite positive number)")
    return value


# named tie patterns: fused MoE kernels run the gate and up experts of a layer as one matrix, so they
# want one type for both
TIE_PRESETS = {"moe-fused": r"ffn_(gate|up)_exps"}


@dataclass(frozen=True)
class BudgetSpec:
    """One --budget: the tensors whose names match ``pattern`` (regex search; the first matching budget
    wins) may take ``size`` bytes of tensor data, or ``bpw`` bits per weight over their own elements."""

    pattern: str
    size: int | None = None
    bpw: float | None = None

    @property
    def value(self) -> str:
        return f"{self.bpw}bpw" if self.bpw is not None else f"{self.size:,} bytes"


def _regex(pattern: str, option: str) -> str:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise LlqxError(f"invalid regex '{pattern}' in {option}: {exc}") from None
    return pattern


def budget_spec(pattern: str, value: int | str) -> BudgetSpec:
    """A budget from its regex and its value: bytes (an int, or a size as --target-size reads it) or a
    bpw ('4.5bpw')."""
    _regex(pattern, "--budget")
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise LlqxError(
            f"invalid budget {value!r} for '{pattern}': bytes as an int, or a string like '800M' or '4.5bpw'"
        )
    if isinstance(value, int):
        if value <= 0:
            raise LlqxError(f"invalid budget {value} for '{pattern}': must be positive")
        return BudgetSpec(pattern, size=value)
    if value.strip().lower().endswith("bpw"):
        return BudgetSpec(pattern, bpw=parse_bpw(value.strip()[:-3], "--budget"))
    return BudgetSpec(pattern, size=parse_size(value))


def parse_budget(text: str) -> BudgetSpec:
    """--budget REGEX=SIZE or REGEX=Xbpw (the last '=' splits, so the regex may hold one)."""
    pattern, sep, value = text.rpartition("=")
    if not sep or not pattern or not value:
        raise LlqxError(f"invalid --budget '{text}' (use REGEX=SIZE or REGEX=Xbpw, e.g. '_exps\\.=4.5bpw')")
    return budget_spec(pattern, value)


def parse_tie(text: str) -> str:
    """--tie REGEX, or a named pattern (TIE_PRESETS): the regex."""
    if not text:
        raise LlqxError(f"invalid --tie '' (a regex, or one of {', '.join(TIE_PRESETS)})")
    return TIE_PRESETS.get(text) or _regex(text, "--tie")


def parse_type_bound(text: str, option: str) -> tuple[str, int]:
    """--min-type / --max-type REGEX=TYPE: the regex and the ggml type id."""
    pattern, sep, tname = text.rpartition("=")
    if not sep or not pattern or not tname:
        raise LlqxError(f"invalid {option} '{text}' (use REGEX=TYPE, e.g. attn_v=q8_0)")
    try:
        tid = ggml_type(tname).id
    except LlqxError as exc:
        raise LlqxError(f"invalid {option} '{text}': {exc}") from None
    return _regex(pattern, option), tid


def parse_candidates(text: str) -> str:
    if text not in CANDIDATE_MODES:
        raise LlqxError(f"invalid --candidates '{text}' (use {' or '.join(CANDIDATE_MODES)})")
    return text


def _positive_count(text: str, option: str, unit: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise LlqxError(f"invalid {option} '{text}' (a positive number of {unit})")
    return value


def parse_calibration_chunks(text: str) -> int:
    return _positive_count(text, "--calibration-chunks", "chunks")


def parse_score_elements(text: str) -> int:
    return _positive_count(text, "--score-elements", "elements")


@dataclass
class QuantizeRequest:
    """One quantize command: llama-quantize's options (same meaning) and llqx's target options.

    ``tensor_types`` are ``(lower-cased pattern, ggml type id)`` in command-line order
    (``--tensor-type`` and ``--tensor-type-file`` interleaved, as upstream). ``output`` is None for a
    dry run, and in target mode when no output was named (the plan's bpw then names it).
    ``ftype`` is None only in target mode without a type. ``target_size`` is in bytes. ``budgets``,
    ``ties`` (regexes, presets resolved), ``min_types`` / ``max_types`` ((regex, ggml type id)): in
    command-line order, first match wins.
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
    candidates: str = DEFAULT_CANDIDATES
    score_elements: int | None = None
    score_sketch: bool = False  # weigh errors with the imatrix's sketch of Σ x xᵀ (measured worse so far)
    budgets: list[BudgetSpec] = field(default_factory=list)
    ties: list[str] = field(default_factory=list)
    min_types: list[tuple[str, int]] = field(default_factory=list)
    max_types: list[tuple[str, int]] = field(default_factory=list)
    calibration_file: str | None = None  # text for the measured steps: sensitivities, --verify
    calibration_chunks: int = 4
    verify: bool = False

    @property
    def target_mode(self) -> bool:
        return self.target_bpw is not None or self.target_size is not None or bool(self.budgets)
