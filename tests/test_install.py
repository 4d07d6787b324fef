"""A new machine installs: the README's commands are what CI runs, the llama.cpp source download
fails with a message that says how to go on offline, and a cached sdist needs no index at all."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from types import ModuleType

import pytest

from conftest import REPO

FETCH = REPO / "cmake" / "fetch_llama_cpp.py"


def _fetch_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fetch_llama_cpp", FETCH)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _readme_commands() -> list[str]:
    """The commands of the README's 'On a fresh machine' section (its fenced blocks)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## On a fresh machine", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```\n(.*?)```", section, re.DOTALL)
    return [line for block in blocks for line in block.splitlines() if line.strip()]


def _offline_env(sources: Path) -> dict[str, str]:
    """pip with no configuration and an index that does not exist: every download fails."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_INDEX_URL=(sources / "no-index").as_uri(),
               PIP_DISABLE_PIP_VERSION_CHECK="1", LLQX_SOURCES_DIR=str(sources))
    return env


def test_readme_commands_are_what_ci_runs() -> None:
    commands = _readme_commands()
    assert len(commands) == 2, commands
    assert commands[0].startswith("pip install .")
    assert "pytest" in commands[1]
    ci_lines = (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    for command in commands:
        assert command in ci_lines, f"README command not run verbatim by .ci/run: {command}"


def test_build_requires_pip() -> None:
    """The fetch runs `python -m pip` inside pip's isolated build environment: pip must be a build requirement."""
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    requires = re.search(r"^requires\s*=\s*\[(.*?)\]", text, re.MULTILINE | re.DOTALL)
    assert requires is not None
    names = [re.split(r"[<>=!~ ]", item.strip().strip('"'))[0] for item in requires.group(1).split(",")]
    assert "pip" in names


def test_failed_download_says_what_and_how_to_go_offline(tmp_path: Path) -> None:
    sources = tmp_path / "sources"
    dest = tmp_path / "llama.cpp"
    done = subprocess.run([sys.executable, str(FETCH), str(dest)], env=_offline_env(sources),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert "llama-cpp-python==0.3.36" in last
    assert "LLQX_LLAMA_CPP_DIR" in last
    assert str(sources / "llama_cpp_python-0.3.36.tar.gz") in last
    assert not dest.exists()
    assert not any(sources.rglob("*.tar.gz"))


def test_cached_sdist_needs_no_index(tmp_path: Path) -> None:
    """The offline way the message names: the sdist in the cache, the index unreachable."""
    fetch = _fetch_module()
    cached = fetch.fetch_sdist()  # the cache that built this install (downloads only if it is gone)
    sources = tmp_path / "sources"
    sources.mkdir()
    shutil.copy(cached, sources / cached.name)
    dest = tmp_path / "llama.cpp"
    done = subprocess.run([sys.executable, str(FETCH), str(dest)], env=_offline_env(sources),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (dest / "CMakeLists.txt").is_file()
    assert (dest / "ggml" / "src" / "ggml-quants.c").is_file()
    assert (dest / fetch.MARKER).is_file()
    assert not (dest / "models").exists()


def test_damaged_cached_sdist_is_refused(tmp_path: Path) -> None:
    sources = tmp_path / "sources"
    sources.mkdir()
    (sources / "llama_cpp_python-0.3.36.tar.gz").write_bytes(b"not the sdist")
    dest = tmp_path / "llama.cpp"
    done = subprocess.run([sys.executable, str(FETCH), str(dest)], env=_offline_env(sources),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "llama-cpp-python==0.3.36" in done.stderr
    assert not dest.exists()


@pytest.mark.slow
def test_sdist_holds_what_the_build_needs(tmp_path: Path) -> None:
    """`python -m build --sdist`: the files a build from the sdist needs, and no llama.cpp tree or build output."""
    done = subprocess.run([sys.executable, "-m", "build", "--sdist", "-o", str(tmp_path), str(REPO)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    (sdist,) = tmp_path.glob("llqx-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True)
    needed = [f for f in tracked.stdout.split() if f.startswith(("cpp/", "python/", "cmake/"))]
    needed += ["CMakeLists.txt", "pyproject.toml", "README.md"]
    missing = [f for f in needed if f not in names]
    assert not missing, missing
    assert not any(n.startswith(("third_party/", "build/", ".venv")) for n in names)
