"""llqx: GGUF quantization at exactly the size you ask for."""

from __future__ import annotations

from . import log as _log
from .errors import LlqxError
from .evaluate import EvalResult, evaluate
from .imatrix import Imatrix, ImatrixEntry
from .imatrix_collect import collect_imatrix
from .model import ModelInfo, TensorInfo, inspect
from .plan import Plan, PlanTensor
from .quantize import quantize
from .scoring import Scores, score
from .types import FILE_TYPES, FileType, GGMLType, file_type, ggml_type, ggml_types

_log.install()

__version__ = "0.1.0"

__all__ = [
    "FILE_TYPES",
    "EvalResult",
    "FileType",
    "GGMLType",
    "Imatrix",
    "ImatrixEntry",
    "LlqxError",
    "ModelInfo",
    "Plan",
    "PlanTensor",
    "Scores",
    "TensorInfo",
    "__version__",
    "collect_imatrix",
    "evaluate",
    "file_type",
    "ggml_type",
    "ggml_types",
    "inspect",
    "quantize",
    "score",
]
