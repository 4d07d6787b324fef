"""Upstream llama.cpp tools built from the same tree as llqx._core (for tests and benchmarks)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .errors import LlqxError

_REPO = Path(__file__).resolve().parent.parent.parent


def upstream_tool(name: str) -> Path:
    """llama-quantize, llama-imatrix or llama-perplexity of the same build.

    Looked for in $LLQX_UPSTREAM_BIN, the installed package (built with
    -C cmake.define.LLQX_BUILD_UPSTREAM_TOOLS=ON), a dev build's build/dev/bin, then PATH.
    """
    candidates = []
    if os.environ.get("LLQX_UPSTREAM_BIN"):
        candidates.append(Path(os.environ["LLQX_UPSTREAM_BIN"]) / name)
    candidates.append(Path(__file__).resolve().parent / "upstream_bin" / name)
    candidates.append(_REPO / "build" / "dev" / "bin" / name)
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    found = shutil.which(name)
    if found:
        return Path(found)
    raise LlqxError(
        f"upstream {name} not found: build with -C cmake.define.LLQX_BUILD_UPSTREAM_TOOLS=ON or set LLQX_UPSTREAM_BIN"
    )
