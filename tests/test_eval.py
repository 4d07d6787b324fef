"""`llqx eval` / llqx.evaluate against upstream llama-perplexity --kl-divergence on the same tokens."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

import llqx
from llqx import cli
from llqx.evaluate_stats import token_statistics

CTX = 256
CHUNKS = 4
THREADS = 2


def _run(cmd: list[str]) -> str:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout + proc.stderr


def _value(log: str, label: str) -> float:
    m = re.search(re.escape(label) + r"\s*:\s*([-0-9.]+)", log)
    assert m, f"{label} not in llama-perplexity output"
    return float(m.group(1))


@pytest.fixture(scope="module")
def q4_0(tmp_path_factory: pytest.TempPathFactory, llama_quantize: Path, smollm2_f16: Path) -> Path:
    out = tmp_path_factory.mktemp("quant") / "smollm2-Q4_0.gguf"
    _run([llama_quantize, smollm2_f16, out, "Q4_0", "2"])
    return out


@pytest.fixture(scope="module")
def upstream(
    tmp_path_factory: pytest.TempPathFactory,
    llama_perplexity: Path,
    smollm2_f16: Path,
    q4_0: Path,
    eval_text: Path,
) -> dict[str, object]:
    """llama-perplexity's base pass and KL-divergence pass (-b = -c: one sequence per batch, as llqx; -nr as
    llqx's default, since ggml's AMX path crashes on Q4_0)."""
    d = tmp_path_factory.mktemp("upstream")
    logits = d / "base.kld"
    common = ["-c", CTX, "-b", CTX, "-t", THREADS, "-nr", "--kl-divergence-base", logits]
    base_log = _run([llama_perplexity, "-m", smollm2_f16, "-f", eval_text, "--chunks", CHUNKS, *common])
    kld_log = _run([llama_perplexity, "-m", q4_0, *common, "--kl-divergence"])
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", base_log)
    assert m
    return {"base_ppl": float(m.group(1)), "kld_log": kld_log, "logits": logits}


@pytest.fixture(scope="module")
def eval_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def ours(smollm2_f16: Path, q4_0: Path, eval_text: Path, eval_cache: Path) -> llqx.EvalResult:
    mp = pytest.MonkeyPatch()
    mp.setenv("LLQX_CACHE_DIR", str(eval_cache))
    try:
        return llqx.evaluate(smollm2_f16, [q4_0], eval_text, ctx=CTX, chunks=CHUNKS, threads=THREADS)
    finally:
        mp.undo()


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def test_agrees_with_llama_perplexity(ours: llqx.EvalResult, upstream: dict[str, object]) -> None:
    log = str(upstream["kld_log"])
    q = ours.quants[0]
    assert ours.n_chunk == CHUNKS
    assert q.n_tokens == CHUNKS * (CTX - 1 - CTX // 2)
    assert _rel(ours.base.ppl.value, float(upstream["base_ppl"])) < 1e-3
    assert _rel(q.ppl.value, _value(log, "Mean PPL(Q)")) < 1e-3
    assert _rel(q.ppl_base.value, _value(log, "Mean PPL(base)")) < 1e-3
    assert _rel(q.ppl_ratio.value, _value(log, "Mean PPL(Q)/PPL(base)")) < 1e-3
    assert _rel(q.kld_mean.value, _value(log, "Mean    KLD")) < 1e-3
    assert _rel(q.kld_median.value, _value(log, "Median  KLD")) < 1e-3
    assert _rel(q.kld_p99.value, _value(log, "99.0%   KLD")) < 1e-3
    assert _rel(q.kld_max, _value(log, "Maximum KLD")) < 1e-3
    assert abs(100 * q.rho_ppl - _value(log, "Cor(ln(PPL(Q)), ln(PPL(base)))")) < 0.01
    assert abs(100 * q.same_top.value - _value(log, "Same top p")) < 1e-3
    assert abs(100 * q.dp_rms.value - _value(log, "RMS Δp")) < 2e-3
    # a real quantization loss, not a degenerate comparison
    assert q.kld_mean.value > 0.01
    assert q.ppl.value > ours.base.ppl.value
    assert q.kld_mean.err is not None
    assert 0 < q.kld_mean.err < q.kld_mean.value


def test_base_cache_is_llama_perplexity_format(
    ours: llqx.EvalResult,
    upstream: dict[str, object],
    smollm2_f16: Path,
    q4_0: Path,
    eval_text: Path,
    eval_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The cached base rows are upstream's logits-file rows; a second run reuses them bit for bit."""
    first = ours
    rows_files = list((eval_cache / "eval").glob("*.rows"))
    assert len(rows_files) == 1
    assert not first.base.cached
    assert not [p for p in (eval_cache / "eval").iterdir() if p.name.startswith(".")]  # no temp files left
    raw = Path(str(upstream["logits"])).read_bytes()
    n_ctx, n_vocab, n_chunk = np.frombuffer(raw[8:20], dtype=np.int32)
    assert (n_ctx, n_chunk) == (CTX, CHUNKS)
    row_size = 2 * ((n_vocab + 1) // 2) + 4
    up_rows = np.frombuffer(raw[20 + 4 * n_ctx * n_chunk :], dtype=np.uint16).reshape(-1, row_size)
    our_rows = np.fromfile(rows_files[0], dtype=np.uint16).reshape(-1, row_size)
    assert our_rows.shape == up_rows.shape
    # the same decode gives the same bits up to rare last-bit rounding of a logit
    assert np.mean(our_rows == up_rows) > 0.999
    monkeypatch.setenv("LLQX_CACHE_DIR", str(eval_cache))
    second = llqx.evaluate(smollm2_f16, [q4_0], eval_text, ctx=CTX, chunks=CHUNKS, threads=THREADS)
    assert second.base.cached
    assert second.quants[0].kld_mean == first.quants[0].kld_mean
    assert second.base.ppl == first.base.ppl


def test_token_statistics_against_numpy() -> None:
    rng = np.random.default_rng(0)
    n = 5000
    nll_base = rng.gamma(2.0, 1.5, n).astype(np.float32)
    nll = (nll_base + rng.normal(0.1, 0.3, n)).astype(np.float32)
    kld = rng.exponential(0.05, n).astype(np.float32)
    p_diff = rng.normal(0, 0.1, n).astype(np.float32)
    same = (rng.random(n) < 0.8).astype(np.uint8)
    s = token_statistics(nll, nll_base, kld, p_diff, same)
    assert s["ppl"].value == pytest.approx(np.exp(nll.astype(np.float64).mean()), rel=1e-9)  # type: ignore[attr-defined]
    assert s["rho_ppl"] == pytest.approx(np.corrcoef(nll, nll_base)[0, 1], rel=1e-6)
    assert s["kld_mean"].value == pytest.approx(kld.astype(np.float64).mean(), rel=1e-9)  # type: ignore[attr-defined]
    assert s["kld_mean"].err == pytest.approx(kld.std() / np.sqrt(n - 1), rel=1e-4)  # type: ignore[attr-defined]
    assert s["kld_median"].value == pytest.approx(np.median(kld), rel=1e-6)  # type: ignore[attr-defined]
    assert s["kld_p99"].value == pytest.approx(np.percentile(kld, 99), rel=1e-5)  # type: ignore[attr-defined]
    assert 0 < s["kld_median"].err < 0.01  # type: ignore[attr-defined]
    assert s["same_top"].value == pytest.approx(same.mean())  # type: ignore[attr-defined]
    assert s["dp_rms"].value == pytest.approx(np.sqrt((p_diff.astype(np.float64) ** 2).mean()), rel=1e-9)  # type: ignore[attr-defined]


def test_cli_json_and_markdown(
    smollm2_f16: Path,
    q4_0: Path,
    eval_text: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("LLQX_CACHE_DIR", str(tmp_path))
    argv = [
        "eval",
        str(smollm2_f16),
        str(q4_0),
        "-f",
        str(eval_text),
        "-c",
        "128",
        "--chunks",
        "2",
        "-t",
        "2",
    ]
    assert cli.main([*argv, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ctx"] == 128
    assert doc["n_chunk"] == 2
    assert doc["n_tokens"] == 2 * 63
    q = doc["quants"][0]
    assert q["kld_mean"]["value"] > 0
    assert 0 < q["same_top"]["value"] < 1
    assert q["bpw"] < 6
    assert cli.main([*argv, "--markdown"]) == 0
    md = capsys.readouterr().out.strip().splitlines()
    assert md[0].startswith("| Model | BPW | Size (GB) | μPPL | 𝜌PPL | μKLD | Same Top-P |")
    assert md[2].startswith(f"| {smollm2_f16.stem} | 16.00")
    assert "| 100% | N/A | N/A |" in md[2]
    assert md[3].startswith(f"| {q4_0.stem} | ")
    assert f"{q['kld_mean']['value']:.6f}" in md[3]


def test_cli_errors(smollm2_f16: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    short = tmp_path / "short.txt"
    short.write_text("far too short", encoding="utf-8")
    assert cli.main(["eval", str(smollm2_f16), str(smollm2_f16), "-f", str(short), "-c", "128"]) == 1
    assert "needs at least 256" in " ".join(capsys.readouterr().err.split())
    assert cli.main(["eval", str(smollm2_f16), str(tmp_path / "missing.gguf"), "-f", str(short)]) == 1
    assert "model not found" in " ".join(capsys.readouterr().err.split())
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(60))
    assert cli.main(["eval", str(smollm2_f16), str(bad), "-f", str(short)]) == 1
    assert "corrupt or truncated GGUF file" in " ".join(capsys.readouterr().err.split())


def test_same_numbers_on_any_thread_count(smollm2_f16: Path, q4_0: Path, eval_text: Path) -> None:
    """Per-token statistics are bit-identical on 1 and 3 threads (decode and per-token math)."""
    from llqx import _core

    tokens, n_vocab = _core.eval_tokenize(str(smollm2_f16), eval_text.read_text(encoding="utf-8")[:6000])
    n_ctx, n_chunk = 64, 2
    n_rows = n_chunk * _core.eval_n_scored(n_ctx)
    runs = []
    for threads in (1, 3):
        rows = np.zeros((n_rows, _core.eval_row_size(n_vocab)), dtype=np.uint16)
        nll = np.zeros(n_rows, dtype=np.float32)
        _core.eval_base(str(smollm2_f16), tokens, n_chunk, rows, nll, n_vocab, n_ctx, threads)
        per_token = _core.eval_compare(str(q4_0), tokens, n_chunk, rows, n_vocab, n_ctx, threads)
        runs.append((rows, nll, per_token))
    assert np.array_equal(runs[0][0], runs[1][0])
    assert np.array_equal(runs[0][1], runs[1][1])
    for key in ("nll", "nll_base", "kld", "p_diff", "same_top"):
        assert np.array_equal(runs[0][2][key], runs[1][2][key]), key
    assert runs[0][2]["kld"].mean() > 0


def test_interrupt_leaves_no_cache_file(
    smollm2_f16: Path, q4_0: Path, eval_text: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl+C in the progress callback stops the C++ loop, is raised again and leaves no partial file."""
    monkeypatch.setenv("LLQX_CACHE_DIR", str(tmp_path))
    seen: list[tuple[str, int, int]] = []

    def progress(stage: str, done: int, total: int) -> None:
        seen.append((stage, done, total))
        if done == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        llqx.evaluate(smollm2_f16, [q4_0], eval_text, ctx=64, chunks=3, threads=2, on_progress=progress)
    assert seen == [("base", 0, 3), ("base", 1, 3)]
    assert list((tmp_path / "eval").iterdir()) == []
