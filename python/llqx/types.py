"""The ggml type table and llama-quantize's file types (ftypes)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

from . import _core
from .errors import LlqxError


@dataclass(frozen=True)
class GGMLType:
    """One ggml tensor type as llama.cpp defines it."""

    id: int
    name: str
    block_size: int
    type_size: int
    bpw: float
    is_quantized: bool
    can_quantize: bool  # ggml_quantize_chunk can write it
    requires_imatrix: bool  # llama.cpp's writer refuses it without an imatrix
    has_grid: bool  # quantizing it first builds a lookup grid (IQ1/IQ2/IQ3: megabytes, seconds)
    # ggml's CPU dot product with it rounds the activations to 8 bits in blocks of this many values
    # (Q8_0/Q8_1: 32, Q8_K: 256); 0: they stay in floating point
    act_block: int

    def row_size(self, n_per_row: int) -> int:
        return _core.row_size(self.id, n_per_row)


@cache
def ggml_types() -> dict[int, GGMLType]:
    out: dict[int, GGMLType] = {}
    for i in range(_core.type_count()):
        info = _core.type_info(i)
        if info is not None:
            out[i] = GGMLType(**info)
    return out


def ggml_type(key: int | str) -> GGMLType:
    """A ggml type by id or (case-insensitive) name; LlqxError when unknown."""
    if isinstance(key, int):
        t = ggml_types().get(key)
    else:
        tid = _core.type_from_name(key)
        t = ggml_types().get(tid) if tid >= 0 else None
    if t is None:
        raise LlqxError(f"unknown ggml type '{key}'")
    return t


@dataclass(frozen=True)
class FileType:
    """A llama-quantize file type (LLAMA_FTYPE_*): a recipe name, its number and description."""

    name: str
    ftype: int
    desc: str


# llama-quantize's QUANT_OPTIONS, in its order (b11312); COPY comes after F32 so ftype 0 finds F32
FILE_TYPES: tuple[FileType, ...] = (
    FileType("Q1_0", 40, " 1.125 bpw quantization"),
    FileType("Q2_0", 41, " 2.25 bpw quantization (group 64)"),
    FileType("Q4_0", 2, " 4.34G, +0.4685 ppl @ Llama-3-8B"),
    FileType("Q4_1", 3, " 4.78G, +0.4511 ppl @ Llama-3-8B"),
    FileType("MXFP4_MOE", 38, " MXFP4 MoE"),
    FileType("Q5_0", 8, " 5.21G, +0.1316 ppl @ Llama-3-8B"),
    FileType("Q5_1", 9, " 5.65G, +0.1062 ppl @ Llama-3-8B"),
    FileType("IQ2_XXS", 19, " 2.06 bpw quantization"),
    FileType("IQ2_XS", 20, " 2.31 bpw quantization"),
    FileType("IQ2_S", 28, " 2.5  bpw quantization"),
    FileType("IQ2_M", 29, " 2.7  bpw quantization"),
    FileType("IQ1_S", 24, " 1.56 bpw quantization"),
    FileType("IQ1_M", 31, " 1.75 bpw quantization"),
    FileType("TQ1_0", 36, " 1.69 bpw ternarization"),
    FileType("TQ2_0", 37, " 2.06 bpw ternarization"),
    FileType("Q2_K", 10, " 2.96G, +3.5199 ppl @ Llama-3-8B"),
    FileType("Q2_K_S", 21, " 2.96G, +3.1836 ppl @ Llama-3-8B"),
    FileType("IQ3_XXS", 23, " 3.06 bpw quantization"),
    FileType("IQ3_S", 26, " 3.44 bpw quantization"),
    FileType("IQ3_M", 27, " 3.66 bpw quantization mix"),
    FileType("Q3_K", 12, "alias for Q3_K_M"),
    FileType("IQ3_XS", 22, " 3.3 bpw quantization"),
    FileType("Q3_K_S", 11, " 3.41G, +1.6321 ppl @ Llama-3-8B"),
    FileType("Q3_K_M", 12, " 3.74G, +0.6569 ppl @ Llama-3-8B"),
    FileType("Q3_K_L", 13, " 4.03G, +0.5562 ppl @ Llama-3-8B"),
    FileType("IQ4_NL", 25, " 4.50 bpw non-linear quantization"),
    FileType("IQ4_XS", 30, " 4.25 bpw non-linear quantization"),
    FileType("Q4_K", 15, "alias for Q4_K_M"),
    FileType("Q4_K_S", 14, " 4.37G, +0.2689 ppl @ Llama-3-8B"),
    FileType("Q4_K_M", 15, " 4.58G, +0.1754 ppl @ Llama-3-8B"),
    FileType("Q5_K", 17, "alias for Q5_K_M"),
    FileType("Q5_K_S", 16, " 5.21G, +0.1049 ppl @ Llama-3-8B"),
    FileType("Q5_K_M", 17, " 5.33G, +0.0569 ppl @ Llama-3-8B"),
    FileType("Q6_K", 18, " 6.14G, +0.0217 ppl @ Llama-3-8B"),
    FileType("Q8_0", 7, " 7.96G, +0.0026 ppl @ Llama-3-8B"),
    FileType("F16", 1, "14.00G, +0.0020 ppl @ Mistral-7B"),
    FileType("BF16", 32, "14.00G, -0.0050 ppl @ Mistral-7B"),
    FileType("F32", 0, "26.00G              @ 7B"),
    FileType("COPY", 0, "only copy tensors, no quantizing"),
)


def c_stoi(text: str) -> int | None:
    """std::stoi: optional leading whitespace and sign, then digits; the rest is ignored. None on failure."""
    m = re.match(r"[ \t\n\v\f\r]*([+-]?\d+)", text)
    if m is None:
        return None
    value = int(m.group(1))
    return value if -(2**31) <= value < 2**31 else None


def file_type(text: str | int) -> FileType | None:
    """Parse a file type as llama-quantize does: a name (any case) first, then a number (std::stoi)."""
    text = str(text)
    upper = text.upper()
    for ft in FILE_TYPES:
        if ft.name == upper:
            return ft
    number = c_stoi(text)
    if number is None:
        return None
    return next((ft for ft in FILE_TYPES if ft.ftype == number), None)


def parse_tensor_type(text: str) -> tuple[str, int]:
    """NAME=TYPE as llama-quantize's --tensor-type: name lower-cased, type a ggml type name."""
    name, sep, tname = text.partition("=")
    if not sep:
        raise LlqxError(f"malformed tensor type '{text}'")
    if not name:
        raise LlqxError(f"missing tensor name in '{text}'")
    if not tname:
        raise LlqxError(f"missing quantization type in '{text}'")
    tid = _core.type_from_name(tname)
    if tid < 0:
        raise LlqxError(f"invalid quantization type '{tname}' in '{text}'")
    return name.lower(), tid
