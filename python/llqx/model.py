"""Model inspection: a GGUF's tensors and metadata, without loading tensor data."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from . import _core
from . import log as _log
from .errors import LlqxError
from .types import ggml_types


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file; shape in ggml order (ne[0] = row length)."""

    name: str
    type: int
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def type_name(self) -> str:
        t = ggml_types().get(self.type)
        return t.name if t else str(self.type)

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def n_per_row(self) -> int:
        return self.shape[0]

    @property
    def n_rows(self) -> int:
        return self.n_elements // self.shape[0]


class TensorTotals:
    """Totals over a `tensors` list whose items have n_elements and nbytes (a model, a plan)."""

    tensors: Sequence[Any]

    @property
    def n_elements(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def bpw(self) -> float:
        """Bits per weight over all tensors, the figure llama.cpp prints as 'quant size ... BPW'."""
        return 8.0 * self.tensor_bytes / max(self.n_elements, 1)


@dataclass(frozen=True)
class ModelInfo(TensorTotals):
    """A GGUF file's layout: tensors in file order and metadata in file order."""

    path: str
    version: int
    alignment: int
    data_offset: int
    file_size: int
    tensors: list[TensorInfo]
    metadata: dict[str, Any] = field(default_factory=dict)
    metadata_types: dict[str, tuple[int, int]] = field(default_factory=dict)

    def tensor(self, name: str) -> TensorInfo:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))



def inspect(path: str | os.PathLike[str]) -> ModelInfo:
    """Read a GGUF's tensor table and metadata; LlqxError for a missing, foreign or damaged file."""
    try:
        with _log.muted():  # the exception names the problem; gguf's own log line would repeat it
            raw = _core.model_inspect(os.fspath(path))
    except _core.LoadError as exc:
        raise LlqxError(str(exc)) from None
    tensors = [
        TensorInfo(t["name"], t["type"], tuple(t["shape"][: t["n_dims"]]), t["offset"], t["size"])
        for t in raw["tensors"]
    ]
    metadata = {key: value for key, _, _, value in raw["metadata"]}
    types = {key: (vtype, atype) for key, vtype, atype, _ in raw["metadata"]}
    return ModelInfo(raw["path"], raw["version"], raw["alignment"], raw["data_offset"], raw["file_size"],
                     tensors, metadata, types)
