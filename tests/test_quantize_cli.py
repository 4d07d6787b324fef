"""llqx-quantize against upstream llama-quantize built from the same source: byte-identical files,
the same exit codes for bad command lines, and one clear line for bad input."""

from __future__ import annotations

import filecmp
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import llqx
from conftest import default_sigint, subprocess_env
from llqx import cli
from llqx.cli import quantize as cli_quantize
from llqx.imatrix import Imatrix, ImatrixEntry
from llqx.request import QuantizeRequest

REPO = Path(__file__).resolve().parent.parent
THREADS = "2"


def _env() -> dict[str, str]:
    return subprocess_env()


def _run(cmd: list[object], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)  # type: ignore[call-overload]


# ---- session fixtures: upstream-made imatrix files and inputs, each made once ------------------

@pytest.fixture(scope="session")
def imatrix_files(llama_imatrix: Path, smollm2_f16: Path, calib_text: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same imatrix from upstream llama-imatrix, as GGUF and as legacy .dat (4 chunks of 128)."""
    d = tmp_path_factory.mktemp("imatrix")
    out = {"gguf": d / "imatrix.gguf", "dat": d / "imatrix.dat"}
    for fmt, path in out.items():
        r = _run([llama_imatrix, "-m", smollm2_f16, "-f", calib_text, "-c", "128", "--chunks", "4",
                  "-t", THREADS, "--no-ppl", "--output-format", fmt, "-o", path])
        assert r.returncode == 0, r.stderr[-2000:]
        assert path.is_file()
    return out


@pytest.fixture(scope="session")
def tensor_type_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tt") / "tensor_types.txt"
    path.write_text("ffn_up=q5_0\n  blk\\.1[0-9]\\.ffn_down=Q4_1 attn_k=q5_1\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def smollm2_q8(llama_quantize: Path, smollm2_f16: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("q8") / "smollm2-q8_0.gguf"
    r = _run([llama_quantize, smollm2_f16, path, "Q8_0", THREADS])
    assert r.returncode == 0, r.stderr[-2000:]
    return path


@pytest.fixture(scope="session")
def model_copy(smollm2_f16: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the model, for tests that try to clobber their input."""
    path = tmp_path_factory.mktemp("copy") / "model-f16.gguf"
    shutil.copyfile(smollm2_f16, path)
    return path


def _placeholders(opts: list[str], files: dict[str, Path]) -> list[str]:
    return [str(files[o[1:-1]]) if o.startswith("{") and o.endswith("}") else o for o in opts]


def _both(tmp_path: Path, llama_quantize: Path, opts: list[str], model: Path, ftype: str) -> Path:
    """Quantize with upstream and with llqx-quantize; assert byte-identical outputs."""
    up, me = tmp_path / "upstream.gguf", tmp_path / "llqx.gguf"
    r = _run([llama_quantize, *opts, model, up, ftype, THREADS])
    assert r.returncode == 0, r.stdout[-1000:] + r.stderr[-2000:]
    assert cli_quantize.main([*opts, str(model), str(me), ftype, THREADS]) == 0
    assert up.stat().st_size == me.stat().st_size
    assert filecmp.cmp(up, me, shallow=False), f"{opts} {ftype}: output differs from llama-quantize"
    up.unlink()
    return me


# ---- byte identity ----------------------------------------------------------------------------

CASES = {
    "q4_k_m-imatrix-gguf": (["--imatrix", "{gguf}"], "Q4_K_M"),
    "q4_k_m-imatrix-dat": (["--imatrix", "{dat}"], "q4_k_m"),
    "q8_0": ([], "Q8_0"),
    "pure-q4_0-small-buffer": (["--pure", "--max-buffer-size", "1"], "Q4_0"),
    "tensor-types": (["--tensor-type", "attn_q=q4_0", "--tensor-type-file", "{ttfile}", "--tensor-type",
                      "ATTN_V=Q6_K", "--output-tensor-type", "q5_0", "--token-embedding-type", "q4_1"],
                     "Q8_0"),
    "prune-layers": (["--prune-layers", "3,1,28,3"], "Q8_0"),
    "prune-layers-imatrix": (["--imatrix", "{gguf}", "--prune-layers", "0,2"], "Q4_0"),
    "include-weights": (["--imatrix", "{gguf}", "--include-weights", "attn_",
                         "--include-weights", "ffn_down"], "Q4_0"),
    "exclude-weights": (["--imatrix", "{dat}", "--exclude-weights", "ffn_"], "Q4_0"),
    "override-kv": (["--override-kv", "general.name=str:llqx test", "--override-kv",
                     "tokenizer.ggml.add_bos_token=bool:true", "--override-kv", "llqx.answer=int:42",
                     "--override-kv", "llqx.ratio=float:1.25"], "Q8_0"),
    "numeric-type": ([], "7"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_byte_identical(case: str, tmp_path: Path, llama_quantize: Path, smollm2_f16: Path,
                        imatrix_files: dict[str, Path], tensor_type_file: Path) -> None:
    opts, ftype = CASES[case]
    files = {**imatrix_files, "ttfile": tensor_type_file}
    me = _both(tmp_path, llama_quantize, _placeholders(opts, files), smollm2_f16, ftype)
    info = llqx.inspect(me)
    if "--imatrix" in opts:  # upstream's quantize.imatrix.* metadata (identical bytes say the rest)
        assert info.metadata["quantize.imatrix.entries_count"] > 0
        assert info.metadata["quantize.imatrix.chunks_count"] == 4
    if case == "override-kv":
        assert info.metadata["general.name"] == "llqx test"
        assert info.metadata["llqx.answer"] == 42
    if case == "prune-layers":
        assert info.metadata["llama.block_count"] == 27
    me.unlink()


@pytest.mark.slow
def test_moe_q4_k_s(tmp_path: Path, llama_quantize: Path, moe_f16: Path) -> None:
    _both(tmp_path, llama_quantize, [], moe_f16, "Q4_K_S").unlink()


@pytest.mark.slow
def test_requantize_leave_output(tmp_path: Path, llama_quantize: Path, smollm2_q8: Path) -> None:
    opts = ["--allow-requantize", "--leave-output-tensor"]
    _both(tmp_path, llama_quantize, opts, smollm2_q8, "Q4_0").unlink()


@pytest.mark.slow
def test_keep_split(tmp_path: Path, llama_quantize: Path, smollm2_f16: Path) -> None:
    (tmp_path / "up").mkdir()
    (tmp_path / "me").mkdir()
    r = _run([llama_quantize, "--keep-split", smollm2_f16, tmp_path / "up" / "out.gguf", "Q8_0", THREADS])
    assert r.returncode == 0, r.stderr[-2000:]
    assert cli_quantize.main(["--keep-split", str(smollm2_f16), str(tmp_path / "me" / "out.gguf"),
                              "Q8_0"]) == 0
    ups, mine = sorted(os.listdir(tmp_path / "up")), sorted(os.listdir(tmp_path / "me"))
    assert ups == mine == ["out-00001-of-00001.gguf"]
    assert filecmp.cmp(tmp_path / "up" / ups[0], tmp_path / "me" / mine[0], shallow=False)


@pytest.mark.slow
def test_numeric_type_default_output_name(tmp_path: Path, llama_quantize: Path, smollm2_f16: Path,
                                          imatrix_files: dict[str, Path]) -> None:
    """`input 15` is Q4_K_M, written to [input dir]/ggml-model-Q4_K.gguf (the first name for 15)."""
    for side in ("up", "me"):
        (tmp_path / side).mkdir()
        os.symlink(smollm2_f16, tmp_path / side / "model.gguf")
    im = str(imatrix_files["gguf"])
    r = _run([llama_quantize, "--imatrix", im, tmp_path / "up" / "model.gguf", "15", THREADS])
    assert r.returncode == 0, r.stderr[-2000:]
    assert cli_quantize.main(["--imatrix", im, str(tmp_path / "me" / "model.gguf"), "15", THREADS]) == 0
    up, me = tmp_path / "up" / "ggml-model-Q4_K.gguf", tmp_path / "me" / "ggml-model-Q4_K.gguf"
    assert sorted(os.listdir(tmp_path / "me")) == ["ggml-model-Q4_K.gguf", "model.gguf"]
    assert filecmp.cmp(up, me, shallow=False)
    assert llqx.inspect(me).metadata["general.file_type"] == 15


@pytest.mark.slow
def test_llqx_subcommand_and_api(tmp_path: Path, llama_quantize: Path, smollm2_f16: Path,
                                 imatrix_files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """`llqx quantize` (options after the positionals allowed) and llqx.quantize() match upstream."""
    up = tmp_path / "up.gguf"
    im = str(imatrix_files["dat"])
    opts = ["--imatrix", im, "--tensor-type", "ffn_down=q8_0", "--pure"]
    r = _run([llama_quantize, *opts, smollm2_f16, up, "Q5_0", THREADS])
    assert r.returncode == 0, r.stderr[-2000:]
    sub = tmp_path / "sub.gguf"
    assert cli.main(["quantize", str(smollm2_f16), str(sub), "q5_0", THREADS, *opts]) == 0
    assert filecmp.cmp(up, sub, shallow=False)
    assert cli.main(["quantize", "--dry-run", str(smollm2_f16), "q4_0"]) == 0  # no nthreads, no output
    capsys.readouterr()
    assert cli.main(["quantize", "--json", "--quiet", str(smollm2_f16), str(sub), "q5_0", *opts]) == 0
    summary = json.loads(capsys.readouterr().out)
    info = llqx.inspect(sub)
    assert summary["output"] == str(sub)
    assert (summary["bytes"], summary["bpw"], summary["ftype"]) == (sub.stat().st_size, info.bpw, "Q5_0")
    assert filecmp.cmp(up, sub, shallow=False)
    assert cli.main(["quantize", str(smollm2_f16), str(sub), "q9_9"]) == 1
    api = tmp_path / "api.gguf"
    assert llqx.quantize(smollm2_f16, api, 8, imatrix=Imatrix.load(im), imatrix_label=im, pure=True,
                         tensor_types=[("ffn_down", "q8_0")], nthread=2) == api
    assert filecmp.cmp(up, api, shallow=False)


def test_api_is_silent(tmp_path: Path, smollm2_f16: Path) -> None:
    """The API logs nothing unless the application configures logging; the CLI shows llama.cpp's log."""
    out = tmp_path / "q.gguf"
    code = (f"import llqx; llqx.quantize({str(smollm2_f16)!r}, {str(out)!r}, 'Q8_0', "
            "prune_layers=range(2, 30))")
    r = _run([sys.executable, "-c", code], env=_env())
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    assert r.stderr == ""
    out.unlink()
    layers = ",".join(str(i) for i in range(2, 30))
    r = _run([str(Path(sys.executable).parent / "llqx-quantize"), "--prune-layers", layers, smollm2_f16, out, "Q8_0"],
             env=_env())
    assert r.returncode == 0, r.stderr
    assert "llama_model_quantize_impl: quant size" in r.stderr


def test_dry_run_writes_nothing(tmp_path: Path, llama_quantize: Path, smollm2_f16: Path,
                                capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "up").mkdir()
    (tmp_path / "me").mkdir()
    r = _run([llama_quantize, "--dry-run", smollm2_f16, "Q4_K_M"], cwd=tmp_path / "up")
    assert r.returncode == 0, r.stderr[-2000:]
    size_re = re.compile(r"quant size\s*=\s*([\d.]+) MiB \(([\d.]+) BPW\)")
    want = size_re.search(r.stderr)
    assert want
    monkeypatch.chdir(tmp_path / "me")
    capfd.readouterr()
    assert cli_quantize.main(["--dry-run", str(smollm2_f16), "Q4_K_M"]) == 0
    assert cli_quantize.main(["--dry-run", str(smollm2_f16), "out.gguf", "Q4_K_M"]) == 0
    got = size_re.findall(capfd.readouterr().err)
    assert got == [want.groups()] * 2
    assert os.listdir(tmp_path / "me") == []
    assert os.listdir(tmp_path / "up") == []


# ---- command lines: the same exit codes as upstream --------------------------------------------

BAD_ARGV = {
    "nothing": [],
    "help": ["--help"],
    "one-word": ["{m}"],
    "unknown-option": ["--bogus", "{m}", "Q8_0"],
    "option-missing-value": ["--imatrix"],
    "bad-tensor-type": ["--tensor-type", "attn_q", "{m}", "{o}", "Q8_0"],
    "bad-ggml-type": ["--output-tensor-type", "q9_9", "{m}", "{o}", "Q8_0"],
    "bad-kv-override": ["--override-kv", "a=blob:1", "{m}", "{o}", "Q8_0"],
    "bad-prune": ["--prune-layers", "1,x", "{m}", "{o}", "Q8_0"],
    "include-and-exclude": ["--include-weights", "a", "--exclude-weights", "b", "{m}", "{o}", "Q8_0"],
    "max-buffer-zero": ["--max-buffer-size", "0", "{m}", "{o}", "Q8_0"],
    "bad-nthread": ["{m}", "{o}", "Q8_0", "many"],
    "option-after-positionals": ["{m}", "{o}", "Q8_0", "--pure"],
    "unknown-type": ["{m}", "{o}", "Q9_9"],
    "missing-type": ["{m}", "Q9_9"],
}


@pytest.mark.parametrize("case", list(BAD_ARGV))
def test_bad_command_line_exit_codes(case: str, tmp_path: Path, llama_quantize: Path, smollm2_f16: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    argv = [str(smollm2_f16) if a == "{m}" else str(tmp_path / "o.gguf") if a == "{o}" else a
            for a in BAD_ARGV[case]]
    r = _run([llama_quantize, *argv])
    mine = cli_quantize.main(argv)
    out, _ = capsys.readouterr()
    assert mine == r.returncode == 1
    assert ("usage:" in out) == ("usage:" in r.stdout)
    assert not (tmp_path / "o.gguf").exists()


def test_usage_text_matches_upstream(llama_quantize: Path, capsys: pytest.CaptureFixture[str]) -> None:
    r = _run([llama_quantize])
    assert cli_quantize.main([]) == 1
    mine = capsys.readouterr().out
    up_lines = [ln.replace(str(llama_quantize), "llama-quantize") for ln in r.stdout.splitlines()]
    my_lines = [ln.replace("llqx-quantize", "llama-quantize") for ln in mine.splitlines()]
    # llqx's additions: two lines of the synopsis, and the block of its options after upstream's
    start = next(i for i, ln in enumerate(my_lines) if ln.startswith("  --target-bpw"))
    end = my_lines.index("", start)
    upstream_part = [ln for ln in my_lines[:start] + my_lines[end:]
                     if "[--target-bpw]" not in ln and "[--candidates]" not in ln]
    assert upstream_part == up_lines


# ---- the typed request both front ends build ----------------------------------------------------

def test_both_front_ends_build_the_same_request(smollm2_f16: Path, tmp_path: Path) -> None:
    out = str(tmp_path / "t.gguf")
    words = ["--target-size", "1.5G", "--state-file", "s.llqx-state", "--imatrix", "x.dat", "--tensor-type",
             "ffn_down=q8_0", "--override-kv", "a.b=int:1", "--leave-output-tensor", "--candidates", "all",
             "--score-elements", "4096", "--score-sketch", str(smollm2_f16), out, "Q4_K_M", "1"]
    req = cli_quantize.parse_argv(words)
    assert isinstance(req, QuantizeRequest)
    assert (req.target_size, req.state_file, req.imatrix, req.output) == (3 << 29, "s.llqx-state", "x.dat", out)
    assert (req.ftype.name if req.ftype else None, req.nthread) == ("Q4_K_M", 1)
    assert req.tensor_types == [("ffn_down", llqx.ggml_type("q8_0").id)]
    assert (req.override_kv, req.leave_output_tensor, req.candidates, req.score_elements, req.score_sketch) == (
        ["a.b=int:1"], True, "all", 4096, True)
    seen: list[QuantizeRequest] = []
    parser = cli.build_parser()
    parsed = parser.parse_args(["quantize", *words[:-4], str(smollm2_f16), out, "Q4_K_M", "1"])
    parsed.func = None
    original = cli_quantize.run
    try:
        cli_quantize.run = lambda r: seen.append(r) or 0  # type: ignore[assignment]
        assert cli_quantize._run_subcommand(parsed) == 0
    finally:
        cli_quantize.run = original  # type: ignore[assignment]
    assert seen == [req]
    # a target needs only the input; --state-file always takes a path
    assert cli_quantize.parse_argv(["--target-bpw", "4.5", "--dry-run", str(smollm2_f16)]).input == str(smollm2_f16)
    with pytest.raises(llqx.LlqxError, match="state-file"):
        cli_quantize.parse_argv(["--target-bpw", "4.5", "--state-file", "--dry-run", str(smollm2_f16)])


# ---- bad input: one clear line, non-zero exit, nothing written, input unchanged ---------------

def _fingerprint(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str], *needles: str) -> str:
    capsys.readouterr()
    rc = cli_quantize.main(argv)
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 1
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_bad_input_files(tmp_path: Path, capsys: pytest.CaptureFixture[str], smollm2_f16: Path) -> None:
    out = tmp_path / "out.gguf"
    _one_line_error(capsys, [str(tmp_path / "missing.gguf"), str(out), "Q8_0"], "not found")
    text = tmp_path / "notes.txt"
    text.write_text("not a model\n", encoding="utf-8")
    _one_line_error(capsys, [str(text), str(out), "Q8_0"], "not a GGUF")
    trunc = tmp_path / "trunc.gguf"
    with smollm2_f16.open("rb") as f:
        trunc.write_bytes(f.read(3_000_000))
    _one_line_error(capsys, [str(trunc), str(out), "Q8_0"], "truncated")
    trunc.write_bytes(trunc.read_bytes()[:200])  # cut inside the metadata
    _one_line_error(capsys, [str(trunc), str(out), "Q8_0"], "truncated")
    _one_line_error(capsys, [str(smollm2_f16), str(out), "Q9_9"], "invalid ftype 'Q9_9'")
    _one_line_error(capsys, [str(smollm2_f16), "Q9_9"], "missing ftype", "Q9_9")
    _one_line_error(capsys, [str(smollm2_f16), str(tmp_path / "nodir" / "x.gguf"), "Q8_0"], "does not exist")
    _one_line_error(capsys, [str(smollm2_f16), str(text / "x.gguf"), "Q8_0"], "does not exist")
    assert sorted(os.listdir(tmp_path)) == ["notes.txt", "trunc.gguf"]


def test_unwritable_output_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     smollm2_f16: Path) -> None:
    if os.geteuid() == 0:  # root writes anywhere a mode allows: use a directory no one can write
        target = Path("/proc") / "llqx-test-out.gguf"
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = locked / "out.gguf"
    _one_line_error(capsys, [str(smollm2_f16), str(target), "Q8_0"], "output directory")
    assert not target.exists()


def test_output_same_as_input(tmp_path: Path, capsys: pytest.CaptureFixture[str], model_copy: Path) -> None:
    before = _fingerprint(model_copy)
    link = tmp_path / "link.gguf"
    link.symlink_to(model_copy)
    hard = model_copy.parent / "hard.gguf"
    if not hard.exists():
        os.link(model_copy, hard)
    dotted = model_copy.parent / ".." / model_copy.parent.name / model_copy.name
    for out in (model_copy, link, hard, dotted):
        _one_line_error(capsys, [str(model_copy), str(out), "Q8_0"], "input and output files are the same")
    _one_line_error(capsys, [str(link), str(model_copy), "Q8_0"], "the same")
    assert _fingerprint(model_copy) == before
    assert sorted(os.listdir(model_copy.parent)) == ["hard.gguf", "model-f16.gguf"]


def test_foreign_imatrix(tmp_path: Path, capsys: pytest.CaptureFixture[str], smollm2_f16: Path,
                         imatrix_files: dict[str, Path]) -> None:
    out = tmp_path / "out.gguf"
    foreign = Imatrix({"blk.0.mlp.c_fc.weight": ImatrixEntry(np_ones(1, 576), np_ones(1) * 10)},
                      ["other.txt"], 1, 128)
    foreign.save(tmp_path / "foreign.gguf")
    _one_line_error(capsys, ["--imatrix", str(tmp_path / "foreign.gguf"), str(smollm2_f16), str(out), "Q4_0"],
                    "does not belong to this model")
    wrong = Imatrix.load(imatrix_files["gguf"])
    name = "blk.3.ffn_down.weight"
    wrong.entries[name] = ImatrixEntry(np_ones(1, 576), np_ones(1) * 10)  # ffn_down rows are 1536 wide
    wrong.save(tmp_path / "wrong.gguf")
    _one_line_error(capsys, ["--imatrix", str(tmp_path / "wrong.gguf"), str(smollm2_f16), str(out), "Q4_0"],
                    "does not belong to this model", name)
    garbage = tmp_path / "garbage.dat"
    garbage.write_bytes(b"\x01\x00\x00\x00\xff\xff")
    _one_line_error(capsys, ["--imatrix", str(garbage), str(smollm2_f16), str(out), "Q4_0"], "imatrix")
    assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def np_ones(*shape: int) -> object:
    import numpy as np

    return np.ones(shape, dtype=np.float32)


@pytest.mark.slow
def test_ctrl_c_removes_partial_output(tmp_path: Path, model_copy: Path, imatrix_files: dict[str, Path]) -> None:
    """SIGINT while llama.cpp writes: exit 130, no output or temporary left, input unchanged."""
    before = hashlib.sha256(model_copy.read_bytes()).hexdigest()
    out = tmp_path / "out.gguf"
    # IQ3_XXS with an imatrix on one thread: tens of seconds, so the signal lands mid-write even on a
    # loaded machine
    cmd = [str(Path(sys.executable).parent / "llqx-quantize"), "--imatrix", str(imatrix_files["gguf"]), str(model_copy),
           str(out), "IQ3_XXS", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env(), text=True,
                            preexec_fn=default_sigint)
    deadline = time.monotonic() + 60
    partial = None
    while time.monotonic() < deadline and partial is None:  # wait until the partial file has data
        for d in tmp_path.glob(".out.gguf.llqx-*"):
            f = d / "out.gguf"
            if f.exists() and f.stat().st_size > 1_000_000:
                partial = f
        time.sleep(0.05)
    assert partial is not None, "quantization never started writing"
    assert proc.poll() is None, "quantization finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err.strip().splitlines()[-1]
    assert os.listdir(tmp_path) == []
    assert hashlib.sha256(model_copy.read_bytes()).hexdigest() == before


# ---- a full disk: named as such, nothing left behind --------------------------------------------

@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 40 MiB tmpfs (too small for any SmolLM2 quant); needs root, as CI and the dev machines have."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40M", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_full_disk_is_named(tiny_disk: Path, smollm2_f16: Path) -> None:
    out = tiny_disk / "out.gguf"
    r = _run([Path(sys.executable).parent / "llqx-quantize", smollm2_f16, out, "Q4_0", THREADS])
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == f"llqx-quantize: error: no space left on device: {out}"
    assert os.listdir(tiny_disk) == []
