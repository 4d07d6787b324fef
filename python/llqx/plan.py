"""A quantization plan: one ggml type per tensor, its bytes and error, and the file it will make."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import LlqxError
from .model import TensorTotals
from .types import ggml_type

GGUF_ALIGNMENT = 32  # llama_model_quantize pads every tensor to GGUF_DEFAULT_ALIGNMENT

_REGEX_SPECIAL = set(".^$|?*+()[]{}\\/")


def anchored_pattern(name: str) -> str:
    """An ECMAScript regex matching exactly this tensor name (llama.cpp matches overrides as substrings)."""
    return "^" + "".join("\\" + c if c in _REGEX_SPECIAL else c for c in name) + "$"


def padded(nbytes: int, alignment: int = GGUF_ALIGNMENT) -> int:
    return (nbytes + alignment - 1) // alignment * alignment


def layer_of(name: str) -> str:
    m = re.match(r"blk\.(\d+)\.", name)
    return f"blk.{m.group(1)}" if m else name.rsplit(".", 1)[0]


@dataclass(frozen=True)
class PlanTensor:
    """One tensor of the plan. status: 'optimized' (chosen by the optimizer), 'pinned' (fixed by the
    user) or 'kept' (llama.cpp does not quantize it: it keeps its type)."""

    name: str
    type: int
    nbytes: int
    n_elements: int
    error: float | None
    status: str

    @property
    def type_name(self) -> str:
        return ggml_type(self.type).name

    @property
    def bpw(self) -> float:
        return 8.0 * self.nbytes / max(self.n_elements, 1)


@dataclass(frozen=True)
class BudgetUse:
    """One budget of a plan and what the plan spends on it. ``pattern`` None: the target, over the tensors
    no --budget matches; with ``file_size`` set (--target-size) its bytes are the whole file's."""

    pattern: str | None
    target_bpw: float | None
    target_bytes: int | None
    tensor_bytes: int
    n_elements: int
    n_tensors: int
    file_size: int | None = None

    @property
    def bpw(self) -> float:
        return 8.0 * self.tensor_bytes / max(self.n_elements, 1)

    @property
    def got(self) -> int:
        """The bytes its target counts: the file's for a target size, else its tensors'."""
        return self.file_size if self.file_size is not None else self.tensor_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "pattern": self.pattern,
            "target_bpw": self.target_bpw,
            "target_bytes": self.target_bytes,
            "tensor_bytes": self.tensor_bytes,
            "bpw": self.bpw,
            "file_size": self.file_size,
            "elements": self.n_elements,
            "tensors": self.n_tensors,
        }


@dataclass
class Plan(TensorTotals):
    """Tensor types for llama_model_quantize, with the sizes llama.cpp will report and write."""

    model: str
    tensors: list[PlanTensor]
    meta_size: int
    imatrix_label: str | None = None
    target_bpw: float | None = None
    target_size: int | None = None
    requantize: bool = False
    achievable: tuple[float, float] = (0.0, 0.0)  # bpw range of the free tensors' extremes (pins included)
    notes: list[str] = field(default_factory=list)
    budgets: list[BudgetUse] = field(default_factory=list)  # every budget's target and what it got

    @property
    def file_size(self) -> int:
        return self.meta_size + sum(padded(t.nbytes) for t in self.tensors)

    @property
    def error(self) -> float:
        return float(sum(t.error for t in self.tensors if t.error is not None))

    def type_of(self, name: str) -> int:
        for t in self.tensors:
            if t.name == name:
                return t.type
        raise KeyError(name)

    def overrides(self) -> list[tuple[str, int]]:
        """One anchored pattern per quantizable tensor, for a pure Q8_0 llama_model_quantize run."""
        return [(anchored_pattern(t.name), t.type) for t in self.tensors if t.status != "kept"]

    def layers(self) -> dict[str, tuple[int, int]]:
        """Bytes and elements per layer (blk.N) and per non-layer tensor group, in file order."""
        out: dict[str, tuple[int, int]] = {}
        for t in self.tensors:
            key = layer_of(t.name)
            b, n = out.get(key, (0, 0))
            out[key] = (b + t.nbytes, n + t.n_elements)
        return out

    def verify(self, path: str | os.PathLike[str]) -> None:
        """Check a written file against the plan: every tensor's type and the file's size."""
        from .model import inspect

        info = inspect(path)
        written = {t.name: t for t in info.tensors}
        for t in self.tensors:
            w = written.get(t.name)
            if w is None:
                raise LlqxError(f"written model lacks tensor {t.name}")
            if w.type != t.type or w.nbytes != t.nbytes:
                raise LlqxError(
                    f"{t.name} was written as {w.type_name} ({w.nbytes} bytes), "
                    f"planned {t.type_name} ({t.nbytes} bytes)"
                )
        if info.file_size != self.file_size:
            raise LlqxError(f"written file has {info.file_size} bytes, planned {self.file_size}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "target_bpw": self.target_bpw,
            "target_size": self.target_size,
            "bpw": self.bpw,
            "tensor_bytes": self.tensor_bytes,
            "n_elements": self.n_elements,
            "file_size": self.file_size,
            "meta_size": self.meta_size,
            "error": self.error,
            "achievable_bpw": list(self.achievable),
            "budgets": [b.to_dict() for b in self.budgets],
            "tensors": [
                {
                    "name": t.name,
                    "type": t.type_name,
                    "bytes": t.nbytes,
                    "elements": t.n_elements,
                    "bpw": t.bpw,
                    "error": t.error,
                    "status": t.status,
                }
                for t in self.tensors
            ],
            "layers": {
                k: {"bytes": b, "elements": n, "bpw": 8.0 * b / max(n, 1)}
                for k, (b, n) in self.layers().items()
            },
        }
