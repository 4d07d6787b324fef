"""Populate third_party/llama.cpp from the pinned llama-cpp-python sdist on PyPI.

Run by CMake at configure time when the llama.cpp directory is empty. The sdist is
downloaded with pip by package name and version (so the user's index settings, PIP_INDEX_URL
and pip.conf, apply as they do to pip itself), sha256-checked, cached, and only its
vendor/llama.cpp tree is extracted (without models/ and docs/, which the build never uses).
pip is a build requirement of llqx (pyproject.toml), so it is importable inside pip's isolated
build environment too.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "llama-cpp-python"
VERSION = "0.3.36"
SDIST = "llama_cpp_python-0.3.36.tar.gz"
SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
PREFIX = "llama_cpp_python-0.3.36/vendor/llama.cpp/"
SKIPPED = ("models/", "docs/")
# the sdist keeps the submodule's .git pointer file, which points nowhere once extracted
SKIPPED_FILES = (".git",)
MARKER = ".llqx-pinned-release"


def cache_dir() -> Path:
    """Where the sdist is cached: $LLQX_SOURCES_DIR, else $LLQX_CACHE_DIR/sources (~/.cache/llqx)."""
    if os.environ.get("LLQX_SOURCES_DIR"):
        return Path(os.environ["LLQX_SOURCES_DIR"])
    root = os.environ.get("LLQX_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "llqx")
    return Path(root) / "sources"


def offline_hint(target: Path) -> str:
    return (f"to build without the index, set LLQX_LLAMA_CPP_DIR to a llama.cpp checkout (b11312), "
            f"or put {SDIST} (sha256 {SHA256}) at {target}")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_sdist() -> Path:
    target = cache_dir() / SDIST
    if target.exists() and sha256_of(target) == SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        # --no-build-isolation: pip would otherwise build the sdist's metadata in yet another
        # environment, fetching llama-cpp-python's build requirements for nothing
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--no-build-isolation", "-q", "-d", tmp, f"{PACKAGE}=={VERSION}"]
        try:
            done = subprocess.run(cmd, check=False)
        except OSError as e:
            done = None
            print(f"fetch_llama_cpp: cannot run pip: {e}", file=sys.stderr)
        got = Path(tmp) / SDIST
        if done is None or done.returncode != 0 or not got.exists():
            sys.exit(f"fetch_llama_cpp: could not download {PACKAGE}=={VERSION} (sdist {SDIST}) "
                     f"with pip from your package index; {offline_hint(target)}")
        digest = sha256_of(got)
        if digest != SHA256:
            sys.exit(f"fetch_llama_cpp: sha256 mismatch for {SDIST}: got {digest}, want {SHA256}; "
                     f"{offline_hint(target)}")
        os.replace(got, target)
    return target


def extract(sdist: Path, dest: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=".llama.cpp-", dir=dest.parent))
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            for member in tar:
                if not member.name.startswith(PREFIX):
                    continue
                rel = member.name[len(PREFIX):]
                if not rel or rel.startswith(SKIPPED) or rel in SKIPPED_FILES or not (member.isfile() or member.isdir()):
                    continue
                member.name = rel
                tar.extract(member, tmp, filter="data")
        # tells the build this is the pinned release tree (it has no git metadata of its own)
        (tmp / MARKER).write_text(f"{PACKAGE}=={VERSION}\n", encoding="utf-8")
        if dest.exists():
            dest.rmdir()  # only ever replaces an empty directory
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dest", type=Path)
    args = parser.parse_args()
    dest: Path = args.dest.resolve()
    if (dest / "CMakeLists.txt").exists():
        return
    if dest.exists() and any(dest.iterdir()):
        sys.exit(f"fetch_llama_cpp: {dest} is not empty and holds no llama.cpp checkout")
    dest.parent.mkdir(parents=True, exist_ok=True)
    extract(fetch_sdist(), dest)
    print(f"fetch_llama_cpp: llama.cpp b11312 extracted to {dest}")


if __name__ == "__main__":
    main()
