"""Type stubs for llqx._core, the C++ core on llama.cpp's public API."""

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

# ---- errors (bind_errors.cpp): every core function raises these -------------------------------

class Error(Exception): ...  # any failure the core reports
class LoadError(Error): ...  # a model or file that cannot be read or loaded
class InputError(Error, ValueError): ...  # bad arguments
class CoreError(Error, RuntimeError): ...  # llama.cpp or ggml failed while running

# ---- eval (bind_eval.cpp) --------------------------------------------------------------------

def eval_row_size(n_vocab: int) -> int: ...
def eval_n_scored(n_ctx: int) -> int: ...
def eval_tokenize(model_path: str, text: str) -> tuple[npt.NDArray[np.int32], int]: ...
def eval_base(
    model_path: str, tokens: npt.NDArray[np.int32], n_chunk: int, rows: npt.NDArray[np.uint16],
    nll: npt.NDArray[np.float32], n_vocab: int, n_ctx: int, n_threads: int = 1, n_gpu_layers: int = 0,
    repack: bool = False, progress: Callable[[int, int], bool | None] | None = None,
) -> None: ...
def eval_compare(
    model_path: str, tokens: npt.NDArray[np.int32], n_chunk: int, rows: npt.NDArray[np.uint16], n_vocab: int,
    n_ctx: int, n_threads: int = 1, n_gpu_layers: int = 0, repack: bool = False,
    progress: Callable[[int, int], bool | None] | None = None,
) -> dict[str, npt.NDArray[Any]]: ...

# ---- log (bind_log.cpp) ----------------------------------------------------------------------

def log_set(callback: Callable[[int, str], None] | None) -> None: ...

# ---- model (bind_model.cpp) ------------------------------------------------------------------

def model_inspect(path: str) -> dict[str, Any]: ...

# ---- probe (bind_probe.cpp) ------------------------------------------------------------------

def probe_mixes(
    model_path: str, tokens: npt.NDArray[np.int32], n_ctx: int,
    mixes: Sequence[Sequence[tuple[str, int] | tuple[str, int, npt.ArrayLike | None]]],
    n_threads: int = 0, n_gpu_layers: int = 0, progress: Callable[[int, int], bool | None] | None = None,
) -> dict[str, Any]: ...  # kld, nll: float64 array per mix; nll_base: float; n_tokens: int

# ---- quantize (bind_quantize.cpp) ------------------------------------------------------------

class KvOverride:
    key: str
    tag: int  # 0 int, 1 float, 2 bool, 3 str
    val_i64: int
    val_f64: float
    val_bool: bool
    val_str: str | bytes
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
    @property
    def tensor_overrides(self) -> list[tuple[str, int]]: ...
    def add_imatrix(self, name: str, values: npt.ArrayLike) -> None: ...
    @property
    def imatrix_names(self) -> list[str]: ...

def model_quantize(request: QuantizeRequest) -> None: ...

# ---- types (bind_types.cpp) ------------------------------------------------------------------

def type_count() -> int: ...
def type_info(type: int) -> dict[str, Any] | None: ...
def tensor_requires_imatrix(name: str, type_id: int) -> bool: ...
def type_from_name(name: str) -> int: ...
def row_size(type: int, n_per_row: int) -> int: ...
def quantize_init(type: int) -> None: ...
def quantize_free() -> None: ...
def quantize_rows(
    type: int, src: npt.ArrayLike, imatrix: npt.ArrayLike | None = None
) -> npt.NDArray[np.uint8]: ...
def dequantize_rows(type: int, src: npt.ArrayLike, n_per_row: int) -> npt.NDArray[np.float32]: ...

# ---- imatrix ---------------------------------------------------------------------------------

class ImatrixParams:
    model_path: str
    n_ctx: int
    n_batch: int
    n_ubatch: int
    n_threads: int
    n_gpu_layers: int
    repack: bool
    process_output: bool
    compute_ppl: bool
    sketch_rank: int
    def __init__(self) -> None: ...

class ImatrixCollector:
    def __init__(self, params: ImatrixParams) -> None: ...
    def tokenize(self, text: str | bytes, parse_special: bool = False) -> npt.NDArray[np.int32]: ...
    @property
    def n_vocab(self) -> int: ...
    @property
    def chunk_size(self) -> int: ...
    @property
    def n_seq(self) -> int: ...
    def run(self, tokens: npt.ArrayLike, n_chunk: int,
            progress: Callable[[dict[str, float]], bool | None] | None = None) -> dict[str, Any]: ...
    def cancel(self) -> None: ...
    def entries(self) -> dict[str, tuple[npt.NDArray[np.float32], npt.NDArray[np.float64],
                                         npt.NDArray[np.int64], npt.NDArray[np.float32] | None,
                                         dict[int, npt.NDArray[np.float32]],
                                         tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], int,
                                               dict[int, npt.NDArray[np.float64]]] | None]]: ...

# ---- layout (bind_layout.cpp) ----
def layout_meta_size(path: str, kv_overrides: Sequence[KvOverride], ftype: int = 7) -> int: ...

# ---- score (bind_score.cpp) ----
class ScoreCancel:
    def __init__(self) -> None: ...
    def set(self) -> None: ...
    def is_set(self) -> bool: ...

def score_sample_rows(
    name: str, expert: int, energy: Sequence[float] | npt.NDArray[np.float64], n_sample: int
) -> tuple[list[int], list[float]]: ...
def score_run(
    path: str,
    jobs: list[dict[str, Any]],
    nthread: int = 1,
    sample_elements: int = 1048576,
    min_rows: int = 16,
    callback: Callable[[int, npt.NDArray[np.float64], int], bool | None] | None = None,
    cancel: ScoreCancel | None = None,
) -> tuple[bool, list[npt.NDArray[np.float64] | None]]: ...

# ---- sketch (bind_sketch.cpp) ----
def sketch_rows(rows: npt.NDArray[np.float32], p: int) -> npt.NDArray[np.float32]: ...
def sketch_test_matrix(n: int, p: int) -> npt.NDArray[np.float32]: ...
