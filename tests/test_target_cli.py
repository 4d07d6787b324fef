"""Target mode through the installed `llqx-quantize`: every option honoured or refused in one line,
nothing overwritten that llqx did not write, every check before scoring. Files checked with gguf-py."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest

import llqx
from conftest import REPO, default_sigint, subprocess_env
from llqx.imatrix import Imatrix
from llqx.request import parse_size

SAMPLE = "8192"  # sampled elements per tensor: fast, and one state file serves every run below
LLQX_QUANTIZE = Path(sys.executable).parent / "llqx-quantize"
LLQX = Path(sys.executable).parent / "llqx"


def _run(args: list[object], cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, env=subprocess_env(), cwd=cwd,
                          timeout=timeout)


def _lq(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return _run([LLQX_QUANTIZE, *args], cwd=cwd)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _one_line_error(r: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert r.returncode == 1, r.stdout[-500:] + r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _types(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def _kv(path: Path, key: str) -> object:
    field = gguf.GGUFReader(path).fields[key]
    return field.contents()


@pytest.fixture(scope="session")
def model(smollm2_f16: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the model (never the cache's file: these tests try to clobber it)."""
    path = tmp_path_factory.mktemp("model") / "model-f16.gguf"
    shutil.copyfile(smollm2_f16, path)
    return path


@pytest.fixture(scope="session")
def state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("state") / "model.llqx-state"


def _target(model: Path, im: Path, state: Path, *args: object) -> list[object]:
    return ["--imatrix", im, "--state-file", state, "--score-elements", SAMPLE, *args]


# ---- the README's commands, as written ----------------------------------------------------------

def _readme_target_commands() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("**2. Quantize at exactly the budget.**", 1)[1].split("```", 2)[1]
    return [ln.split("#", 1)[0].strip() for ln in section.splitlines() if ln.startswith("llqx-quantize ")]


@pytest.mark.slow
def test_readme_examples_as_written(tmp_path: Path, smollm2_f16: Path, smol_imatrix: Path) -> None:
    shutil.copyfile(smollm2_f16, tmp_path / "model-f16.gguf")
    shutil.copyfile(smol_imatrix, tmp_path / "imatrix.gguf")
    commands = _readme_target_commands()
    assert len(commands) >= 3
    for command in commands:
        words = command.split()
        r = _run([LLQX_QUANTIZE, *words[1:]], cwd=tmp_path)
        assert r.returncode == 0, f"{command}\n{r.stderr[-2000:]}"
        target = words[words.index("--target-bpw") + 1] if "--target-bpw" in words else None
        if "--dry-run" in words:
            doc = json.loads(r.stdout)
            assert float(target or 99) - 0.002 <= doc["bpw"] <= float(target or 99)
            continue
        out = tmp_path / words[-1]
        info = llqx.inspect(out)
        if target is not None:
            assert float(target) - 0.002 <= info.bpw <= float(target)
        else:
            size = parse_size(words[words.index("--target-size") + 1])
            assert size * 0.999 <= info.file_size <= size
    assert json.loads((tmp_path / "model.llqx-state").read_text(encoding="utf-8"))["format"] == "llqx-state"


# ---- nothing is overwritten that llqx did not write ---------------------------------------------

def test_state_file_never_replaces_the_users_files(tmp_path: Path, model: Path, smol_imatrix: Path) -> None:
    im = tmp_path / "imatrix.gguf"
    shutil.copyfile(smol_imatrix, im)
    out = tmp_path / "model-4.57.gguf"
    out.write_bytes(b"an earlier quant")
    before = {p: _digest(p) for p in (model, im, out)}
    # round 1's data-loss command: the README's form with a thread count, the output already there
    r = _lq("--imatrix", im, "--target-bpw", "6", "--state-file", model, out, "1", cwd=tmp_path)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    # the state path names the model, the imatrix or the output, or a file llqx did not write
    _one_line_error(_lq("--imatrix", im, "--target-bpw", "6", "--state-file", im, model, out), "imatrix")
    _one_line_error(_lq("--imatrix", im, "--target-bpw", "6", "--state-file", model, model, out), "model")
    _one_line_error(_lq("--imatrix", im, "--target-bpw", "6", "--state-file", out, model, out), "output")
    notes = tmp_path / "notes.txt"
    notes.write_text("mine", encoding="utf-8")
    _one_line_error(_lq("--imatrix", im, "--target-bpw", "6", "--state-file", notes, model, tmp_path / "o.gguf"),
                    "not an llqx state file")
    assert notes.read_text(encoding="utf-8") == "mine"
    assert {p: _digest(p) for p in (model, im, out)} == before
    assert not (tmp_path / "ggml-model-F16.gguf").exists()
    assert not (tmp_path / "o.gguf").exists()


def test_numeric_word_after_output_is_ambiguous(tmp_path: Path, model: Path, smol_imatrix: Path) -> None:
    _one_line_error(_lq("--imatrix", smol_imatrix, "--target-bpw", "6", model, tmp_path / "o.gguf", "1"),
                    "ambiguous")
    assert not (tmp_path / "o.gguf").exists()


# ---- every option honoured in the plan and in the file -------------------------------------------

@pytest.mark.slow
def test_options_reach_the_written_file(tmp_path: Path, model: Path, smol_imatrix: Path, state: Path) -> None:
    tt_file = tmp_path / "types.txt"
    tt_file.write_text("attn_v=q5_1\n", encoding="utf-8")
    out = tmp_path / "out.gguf"
    r = _lq(*_target(model, smol_imatrix, state, "--target-bpw", "7", "--tensor-type", "ffn_down=q8_0",
                     "--tensor-type-file", tt_file, "--output-tensor-type", "q4_1",
                     "--override-kv", "llqx.test=str:hello", "--max-buffer-size", "1", "--json"),
            model, out, "Q5_1", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads(r.stdout)
    types = _types(out)
    downs = [n for n in types if "ffn_down" in n]
    assert len(downs) == 30
    assert {types[n] for n in downs} == {"Q8_0"}
    assert {types[n] for n in types if "attn_v" in n} == {"Q5_1"}
    assert types["token_embd.weight"] == "Q4_1"  # a tied head: --output-tensor-type types the embeddings
    assert _kv(out, "general.file_type") == llqx.file_type("Q5_1").ftype
    assert _kv(out, "llqx.test") == "hello"
    info = llqx.inspect(out)
    assert 6.998 <= info.bpw <= 7.0
    assert (info.file_size, info.bpw) == (doc["file_size"], pytest.approx(doc["bpw"]))
    pinned = {t["name"] for t in doc["tensors"] if t["status"] == "pinned"}
    assert set(downs) <= pinned
    # --token-embedding-type wins over the tied head's output type, as in llama.cpp
    r = _lq(*_target(model, smol_imatrix, state, "--target-bpw", "7", "--output-tensor-type", "q4_1",
                     "--token-embedding-type", "q8_0", "--dry-run", "--json"), model)
    assert r.returncode == 0, r.stderr[-2000:]
    plan = {t["name"]: t["type"].upper() for t in json.loads(r.stdout)["tensors"]}
    assert plan["token_embd.weight"] == "Q8_0"


@pytest.mark.parametrize(("option", "why"), [
    (["--pure"], "--pure"),
    (["--prune-layers", "1"], "--prune-layers"),
    (["--keep-split"], "--keep-split"),
    (["--include-weights", "attn"], "--include-weights"),
    (["--exclude-weights", "attn"], "--exclude-weights"),
])
def test_options_target_mode_cannot_honour_are_refused(tmp_path: Path, model: Path, smol_imatrix: Path,
                                                      option: list[str], why: str) -> None:
    _one_line_error(_lq("--imatrix", smol_imatrix, "--target-bpw", "6", *option, model, tmp_path / "o.gguf"), why)
    assert not list(tmp_path.iterdir())


def test_requantize_needs_allow_requantize(tmp_path: Path, model: Path, smol_imatrix: Path) -> None:
    q8 = tmp_path / "q8.gguf"
    assert _lq(model, q8, "Q8_0").returncode == 0
    _one_line_error(_lq("--imatrix", smol_imatrix, "--target-bpw", "6", q8, tmp_path / "o.gguf"),
                    "already quantized", "--allow-requantize")
    r = _lq("--imatrix", smol_imatrix, "--target-bpw", "6", "--score-elements", "2048", "--allow-requantize",
            "--dry-run", "--json", q8)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["bpw"] <= 6.0


# ---- every check before scoring: one line, exit 1, no state file written -------------------------

@pytest.mark.parametrize("value", ["inf", "1e400", "nan", "-1", "0", "abc"])
def test_bad_bpw(tmp_path: Path, model: Path, smol_imatrix: Path, value: str) -> None:
    _one_line_error(_lq("--imatrix", smol_imatrix, "--target-bpw", value, model, tmp_path / "o.gguf"),
                    "--target-bpw")


def test_checks_run_before_scoring(tmp_path: Path, model: Path, smol_imatrix: Path) -> None:
    fresh = tmp_path / "fresh.llqx-state"
    base = ["--imatrix", smol_imatrix, "--state-file", fresh]
    _one_line_error(_lq(*base, "--target-bpw", "2", model, tmp_path / "o.gguf"), "achievable")
    _one_line_error(_lq(*base, "--target-size", "1K", model, tmp_path / "o.gguf"), "achievable")
    _one_line_error(_lq(*base, "--target-bpw", "5", "--tensor-type", "blk=f16", model, tmp_path / "o.gguf"),
                    "pinned tensors")
    _one_line_error(_lq(*base, "--target-bpw", "6", model, tmp_path / "missing" / "o.gguf"),
                    "output directory does not exist")
    im = Imatrix.load(smol_imatrix)
    entry = next(iter(im.entries.values()))
    entry.in_sum2 = entry.in_sum2.copy()
    entry.in_sum2.flat[0] = np.nan
    bad = tmp_path / "nan.imatrix.gguf"
    im.save(bad)
    _one_line_error(_lq("--imatrix", bad, "--state-file", fresh, "--target-bpw", "6", model, tmp_path / "o.gguf"),
                    "NaN")
    assert not fresh.exists()
    assert not (tmp_path / "o.gguf").exists()


def test_llqx_warnings_are_shown(tmp_path: Path, model: Path, smol_imatrix: Path, state: Path) -> None:
    """An upstream imatrix has no activation sums: both front ends say so (it used to be swallowed)."""
    for argv in ([LLQX_QUANTIZE, *_target(model, smol_imatrix, state, "--target-bpw", "7", "--dry-run"), model],
                 [LLQX, "quantize", *_target(model, smol_imatrix, state, "--target-bpw", "7", "--dry-run"), model]):
        r = _run(argv)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "no activation sums" in r.stderr


# ---- interrupted: SIGTERM cleans up like Ctrl+C ---------------------------------------------------

@pytest.mark.slow
def test_sigterm_while_writing_leaves_nothing(tmp_path: Path, model: Path, smol_imatrix: Path, state: Path) -> None:
    out = tmp_path / "out.gguf"
    args = [LLQX_QUANTIZE, *_target(model, smol_imatrix, state, "--target-bpw", "8", "--quiet"), model, out]
    assert _run([LLQX_QUANTIZE, *_target(model, smol_imatrix, state, "--target-bpw", "8", "--dry-run",
                                         "--quiet"), model]).returncode == 0  # the state is complete now
    proc = subprocess.Popen([str(a) for a in args], env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, preexec_fn=default_sigint)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not list(tmp_path.glob(".out.gguf.llqx-*")):
        time.sleep(0.01)
    assert proc.poll() is None, "the write finished before it could be stopped"
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0, err.decode()
    assert "Traceback" not in err.decode()
    assert not out.exists()
    assert not list(tmp_path.iterdir())


# ---- eval checks its counts and context -----------------------------------------------------------

@pytest.mark.parametrize(("args", "needle"), [
    (["-c", "100000"], "trained on"),
    (["--chunks", "-3"], "--chunks"),
    (["-t", "-1"], "--threads"),
])
def test_eval_refuses_senseless_counts(tmp_path: Path, model: Path, eval_text: Path, args: list[str],
                                       needle: str) -> None:
    r = _run([LLQX, "eval", model, model, "-f", eval_text, "--no-cache", *args])
    assert r.returncode == 1
    assert needle in r.stderr
    assert "Traceback" not in r.stderr
    assert not re.search(r"\.rows", " ".join(p.name for p in tmp_path.iterdir()))
