"""Type stubs of the C++ extension (llqx._core)."""

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

# ---- types (bind_types.cpp) ----
def type_count() -> int: ...
def type_info(type: int) -> dict[str, Any] | None: ...
def type_from_name(name: str) -> int: ...
def row_size(type: int, n_per_row: int) -> int: ...
def quantize_init(type: int) -> None: ...
def quantize_rows(
    type: int, src: npt.ArrayLike, imatrix: npt.ArrayLike | None = None
) -> npt.NDArray[np.uint8]: ...
def dequantize_rows(type: int, src: npt.NDArray[np.uint8], n_per_row: int) -> npt.NDArray[np.float32]: ...

# ---- model (bind_model.cpp) ----
def model_inspect(path: str) -> dict[str, Any]: ...

# ---- log (bind_log.cpp) ----
def log_set(callback: Callable[[int, str], None] | None) -> None: ...

# ---- quantize (bind_quantize.cpp) ----
class KvOverride:
    key: str
    tag: int
    val_i64: int
    val_f64: float
    val_bool: bool
    val_str: str
    def __init__(self) -> None: ...

class QuantizeRequest:
    input: str
    output: str
    nthread: int
    ftype: int
    output_tensor_type: int
    token_embedding_type: int
    allow_requantize: bool
    quantize_output_tensor: bool
    only_copy: bool
    pure: bool
    keep_split: bool
    dry_run: bool
    max_buf_size: int
    kv_overrides: list[KvOverride]
    prune_layers: list[int]
    def __init__(self) -> None: ...
    def add_tensor_override(self, pattern: str, type: int) -> None: ...
    def add_imatrix(self, name: str, values: npt.ArrayLike) -> None: ...
    @property
    def tensor_overrides(self) -> list[tuple[str, int]]: ...
    @property
    def imatrix_names(self) -> list[str]: ...

def model_quantize(request: QuantizeRequest) -> None: ...

# ---- layout (bind_layout.cpp) ----
def layout_meta_size(path: str, kv_overrides: Sequence[KvOverride], ftype: int = 7) -> int: ...

# ---- score (bind_score.cpp) ----
class ScoreCancel:
    def __init__(self) -> None: ...
    def set(self) -> None: ...
    def is_set(self) -> bool: ...

def score_sample_rows(name: str, expert: int, n_rows: int, n_sample: int) -> list[int]: ...
def score_run(
    path: str,
    jobs: list[dict[str, Any]],
    nthread: int = 1,
    sample_elements: int = 1048576,
    min_rows: int = 16,
    trim: float = 0.02,
    callback: Callable[[int, npt.NDArray[np.float64], int], bool | None] | None = None,
    cancel: ScoreCancel | None = None,
) -> tuple[bool, list[npt.NDArray[np.float64] | None]]: ...
