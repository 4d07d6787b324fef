"""Shared fixtures: the pinned test models and texts (fetched once, cached) and upstream tools."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from llqx import data

REPO = Path(__file__).resolve().parent.parent


def upstream_tool(name: str) -> Path:
    """An upstream llama.cpp tool built from the same tree as llqx._core.

    Looked for in $LLQX_UPSTREAM_BIN, the installed package (built with
    -C cmake.define.LLQX_BUILD_UPSTREAM_TOOLS=ON), then the dev build in build/dev/bin.
    """
    import llqx

    candidates = []
    if os.environ.get("LLQX_UPSTREAM_BIN"):
        candidates.append(Path(os.environ["LLQX_UPSTREAM_BIN"]) / name)
    candidates.append(Path(llqx.__file__).parent / "upstream_bin" / name)
    candidates.append(REPO / "build" / "dev" / "bin" / name)
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    found = shutil.which(name)
    if found:
        return Path(found)
    raise RuntimeError(
        f"upstream {name} not found: build with -C cmake.define.LLQX_BUILD_UPSTREAM_TOOLS=ON "
        "or set LLQX_UPSTREAM_BIN"
    )


def subprocess_env() -> dict[str, str]:
    """Environment for a child Python that imports the same llqx as this test process.

    That is the installed package in CI and python/ in a dev build; never the bare source tree,
    which has no compiled _core in a fresh clone.
    """
    import llqx

    env = dict(os.environ)
    pkg_root = str(Path(llqx.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = pkg_root + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="session")
def llama_quantize() -> Path:
    return upstream_tool("llama-quantize")


@pytest.fixture(scope="session")
def llama_imatrix() -> Path:
    return upstream_tool("llama-imatrix")


@pytest.fixture(scope="session")
def llama_perplexity() -> Path:
    return upstream_tool("llama-perplexity")


@pytest.fixture(scope="session")
def smollm2_f16() -> Path:
    return data.smollm2_f16()


@pytest.fixture(scope="session")
def moe_f16() -> Path:
    return data.smollm2_moe_f16()


@pytest.fixture(scope="session")
def calib_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A slice of c4 (calibration): big enough for a few 256-token chunks, small to tokenize."""
    path = tmp_path_factory.mktemp("text") / "c4-slice.txt"
    path.write_text(data.text("c4").read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def eval_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A slice of wiki (held-out evaluation text, never used for calibration)."""
    path = tmp_path_factory.mktemp("text") / "wiki-slice.txt"
    path.write_text(data.text("wiki").read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    return path
