"""Shared fixtures: the pinned test models and texts (fetched once, cached) and upstream tools."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

from llqx import data
from llqx.imatrix import Imatrix
from llqx.upstream import upstream_tool

REPO = Path(__file__).resolve().parent.parent


def default_sigint() -> None:
    """preexec_fn for children that the tests interrupt: a runner started in the background (`cmd &`
    in a script) ignores SIGINT, children inherit that, and Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


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


def upstream_imatrix(llama_imatrix: Path, model: Path, text: Path, out: Path) -> Path:
    """llama-imatrix's file for a model (3 chunks of 128 tokens of the calibration slice): no in_sum."""
    cmd = [llama_imatrix, "-m", model, "-f", text, "-c", "128", "--chunks", "3", "-t", "2", "-o", out]
    subprocess.run([str(c) for c in cmd], check=True, capture_output=True)
    return out


@pytest.fixture(scope="session")
def smol_imatrix(
    tmp_path_factory: pytest.TempPathFactory, llama_imatrix: Path, smollm2_f16: Path, calib_text: Path
) -> Path:
    return upstream_imatrix(llama_imatrix, smollm2_f16, calib_text, tmp_path_factory.mktemp("im") / "smol.imatrix.gguf")


@pytest.fixture(scope="session")
def moe_imatrix(
    tmp_path_factory: pytest.TempPathFactory, llama_imatrix: Path, moe_f16: Path, calib_text: Path
) -> Path:
    """Upstream imatrix of the MoE fixture with synthesized activation sums (in_sum) added."""
    d = tmp_path_factory.mktemp("im")
    raw = upstream_imatrix(llama_imatrix, moe_f16, calib_text, d / "moe.upstream.gguf")
    im = Imatrix.load(raw)
    rng = np.random.default_rng(7)
    for e in im.entries.values():
        # |E[x]| <= sqrt(E[x²]): a mean direction of plausible size with random signs
        rms = np.sqrt(np.maximum(e.in_sum2, 0) * np.maximum(e.counts[:, None], 0))
        e.in_sum = (0.3 * rms * rng.choice([-1.0, 1.0], size=rms.shape)).astype(np.float32)
    out = d / "moe.act.gguf"
    im.save(out)
    return out
