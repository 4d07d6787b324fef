"""Target-bpw engine: scorer against a numpy reference, optimizer, state file, plans, writer, CLI."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from itertools import product
from pathlib import Path

import numpy as np
import pytest

import llqx
from conftest import default_sigint, subprocess_env
from llqx import _core
from llqx.cli.target import run_target
from llqx.estimator import PROPAGATION, output_weights
from llqx.imatrix import Imatrix
from llqx.llama_rules import tensor_candidates
from llqx.optimizer import allocate
from llqx.quantize import read_tensor_type_file
from llqx.request import QuantizeRequest, parse_size
from llqx.scoring import MIN_ROWS, score
from llqx.state import TensorScore, load_state

REPO = Path(__file__).resolve().parent.parent
SAMPLE = 8192  # small sampling keeps the tests fast; the default is exercised by the CLI test


@pytest.fixture(scope="session")
def states(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the session's full scorings keep their state files (window-mode tests reuse them)."""
    return tmp_path_factory.mktemp("states")


@pytest.fixture(scope="session")
def smol_scores(smollm2_f16: Path, smol_imatrix: Path, states: Path) -> llqx.Scores:
    return score(
        smollm2_f16, smol_imatrix, state=states / "smol", nthread=2, sample_elements=SAMPLE, progress=False
    )


@pytest.fixture(scope="session")
def moe_scores(moe_f16: Path, moe_imatrix: Path, states: Path) -> llqx.Scores:
    return score(
        moe_f16, moe_imatrix, state=states / "moe", nthread=2, sample_elements=SAMPLE, progress=False
    )


@pytest.fixture(scope="session")
def sketch_imatrix(tmp_path_factory: pytest.TempPathFactory, smollm2_f16: Path, calib_text: Path) -> Path:
    """llqx's own imatrix of SmolLM2 (with in_sum and the sketch of Σ x xᵀ), 3 chunks of 128 tokens."""
    out = tmp_path_factory.mktemp("im") / "smol.llqx.gguf"
    text = calib_text.read_text(encoding="utf-8")
    llqx.collect_imatrix(smollm2_f16, text, n_ctx=128, chunks=3, threads=2, compute_ppl=False,
                         sketch_rank=16).save(out)
    return out


@pytest.fixture(scope="session")
def sketch_scores(smollm2_f16: Path, sketch_imatrix: Path, states: Path) -> llqx.Scores:
    return score(
        smollm2_f16, sketch_imatrix, state=states / "sketch", nthread=2, sample_elements=SAMPLE, progress=False,
        sketch=True,
    )


ScoredModel = tuple[Path, Path, llqx.Scores]  # model, imatrix, full scores


@pytest.fixture(scope="session")
def scored_models(
    smollm2_f16: Path, smol_imatrix: Path, smol_scores: llqx.Scores, moe_f16: Path, moe_imatrix: Path,
    moe_scores: llqx.Scores,
) -> dict[str, ScoredModel]:
    """Both fixtures with their imatrix and full scores, by the name of their state file."""
    return {"smol": (smollm2_f16, smol_imatrix, smol_scores), "moe": (moe_f16, moe_imatrix, moe_scores)}


def _range(scores: llqx.Scores) -> tuple[float, float]:
    with pytest.raises(llqx.LlqxError) as exc:
        scores.plan(target_bpw=0.5)
    m = re.search(r"achievable: ([\d.]+) bpw to ([\d.]+) bpw", str(exc.value))
    assert m, str(exc.value)
    return float(m.group(1)), float(m.group(2))


# ---- scorer --------------------------------------------------------------------------------------


def _reference_sums(model: llqx.ModelInfo, im: Imatrix, name: str, type_id: int, sample: int) -> tuple[float, float]:
    """The docs/method.md (scoring) estimator in numpy: the expected squared output of every row (exact),
    and the expected squared output error of the rows the scorer samples by those energies, each times the
    rows it stands for (quantization via ggml row calls); expert slices weighted by their share of the
    imatrix counts."""
    t = model.tensor(name)
    ne0, ne1 = t.shape[0], t.shape[1]
    ne2 = t.shape[2] if len(t.shape) > 2 else 1
    src = np.memmap(model.path, dtype=np.float16, mode="r", offset=t.offset, shape=(ne2, ne1, ne0))
    v_all = im.values(name)
    a_all = im.activations(name)
    counts = np.asarray(im.entries[name].counts, dtype=np.float64).reshape(-1)
    moments = im.second_moments(name)  # the sketch read back (tests/test_sketch.py checks it against numpy)
    share = counts / counts.sum() if ne2 > 1 else np.ones(1)
    per_expert = max(MIN_ROWS, (sample // ne2 + ne0 - 1) // ne0)
    err_total = energy_total = 0.0

    def quadratic(rows: np.ndarray, v: np.ndarray, dirs: np.ndarray | None) -> np.ndarray:
        """dᵀ·(diag(v) + Σ a aᵀ)·d per row d."""
        return (rows**2 * v).sum(1) + (0.0 if dirs is None else ((rows @ dirs.T) ** 2).sum(1))

    for e in range(ne2):
        v = v_all[e].astype(np.float64)
        a = None if a_all is None else a_all[e].astype(np.float64)[None]
        if moments is not None:
            # E[x xᵀ] ≈ diag(d) + Σ a aᵀ, the sketch's directions a per token and d = E[x²] − Σ a²
            v, a = moments[0][e].astype(np.float64), moments[1][e].astype(np.float64)
        whole = np.asarray(src[e], dtype=np.float64)
        energy = quadratic(whole, v, a)
        rows, scales = _core.score_sample_rows(name, e, energy, per_expert)
        x = np.asarray(src[e, rows], dtype=np.float32)
        y = _core.dequantize_rows(type_id, _core.quantize_rows(type_id, x, v_all[e]), ne0).astype(np.float64)
        num = quadratic(y - x, v, a)
        err_total += share[e] * float(num @ np.asarray(scales))
        energy_total += share[e] * float(energy.sum())
    return err_total, energy_total


def test_scorer_matches_numpy_reference(
    smol_scores: llqx.Scores, moe_scores: llqx.Scores, smol_imatrix: Path, moe_imatrix: Path, states: Path,
    sketch_scores: llqx.Scores, sketch_imatrix: Path,
) -> None:
    # the state holds each tensor's own expected squared output error per type and its output energy;
    # the curves are those errors times output_weights (tested by hand below)
    for scores, imf, state, name in (
        (sketch_scores, sketch_imatrix, states / "sketch", "blk.3.ffn_down.weight"),
        (sketch_scores, sketch_imatrix, states / "sketch", "blk.5.attn_v.weight"),
        (smol_scores, smol_imatrix, states / "smol", "blk.3.ffn_down.weight"),
        (smol_scores, smol_imatrix, states / "smol", "blk.5.attn_v.weight"),
        (moe_scores, moe_imatrix, states / "moe", "blk.2.ffn_down_exps.weight"),
        (moe_scores, moe_imatrix, states / "moe", "blk.2.ffn_gate_exps.weight"),
    ):
        im = Imatrix.load(imf)
        held = json.loads(state.read_text(encoding="utf-8"))["tensors"]
        scored = {n: TensorScore(v["types"], v["errors"], v["rows"], v["energy"]) for n, v in held.items()}
        weight = output_weights(scores.model, scored, True)[name]
        c = scores.curves[name]
        for tid, err in zip(c.types, c.errors, strict=True):
            ref, energy = _reference_sums(scores.model, im, name, tid, SAMPLE)
            assert scored[name].energy == pytest.approx(energy, rel=1e-6), name
            assert err == pytest.approx(ref * weight, rel=1e-6, abs=1e-12), (name, llqx.ggml_type(tid).name)


def test_output_head_weighs_against_the_residual_stream(smol_scores: llqx.Scores) -> None:
    # SmolLM2 ties its embeddings: token_embd is also the output head, so an error there must cost
    # more than the same relative error of any single block tensor
    te = smol_scores.curves["token_embd.weight"]
    q4 = llqx.ggml_type("Q4_0").id
    rel_te = te.errors[te.types.index(q4)]
    for name in ("blk.0.ffn_down.weight", "blk.29.attn_v.weight", "blk.10.ffn_up.weight"):
        c = smol_scores.curves[name]
        assert rel_te > c.errors[c.types.index(q4)], name


def test_candidates_follow_the_width_fallback(smol_scores: llqx.Scores) -> None:
    q = smol_scores.curves["blk.0.attn_q.weight"]  # 576 wide: K and IQ types fall back
    names = {llqx.ggml_type(t).name.upper() for t in q.types}
    assert names == {"IQ4_NL", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16"}
    d = smol_scores.curves["blk.0.ffn_down.weight"]  # 1536 wide: every candidate
    assert len(d.types) == 20
    # token_embd has no imatrix entry and is 576 wide: only the legacy types and F16 are left
    te = {llqx.ggml_type(t).name.upper() for t in smol_scores.curves["token_embd.weight"].types}
    assert te == {"IQ4_NL", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16"}
    # norms are kept; errors fall with bytes along the hull's end points
    assert "blk.0.attn_norm.weight" not in smol_scores.curves
    assert q.errors[q.types.index(llqx.ggml_type("F16").id)] == 0.0


# llama.cpp b11312's rules, transcribed from its source as the reference: llama-quant.cpp's
# tensor_requires_imatrix (these types, Q2_K only in a Q2_K_S file) for every tensor but the token
# embedding and the output head, where only ggml_quantize_requires_imatrix's types remain (ggml.c)
NEED_IMATRIX = {"IQ3_XXS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_M", "IQ1_S"}
NEED_IMATRIX_HEAD = {"IQ2_XXS", "IQ2_XS", "IQ1_S"}


@pytest.mark.parametrize(("name", "refused"), [
    ("blk.0.attn_q.weight", NEED_IMATRIX),
    ("blk.3.ffn_down_exps.weight", NEED_IMATRIX),
    ("token_embd.weight", NEED_IMATRIX_HEAD),
    ("output.weight", NEED_IMATRIX_HEAD),
])
def test_candidates_without_an_imatrix_follow_llama_cpp(name: str, refused: set[str]) -> None:
    t = llqx.TensorInfo(name, llqx.ggml_type("F16").id, (256, 64), 0, 256 * 64 * 2)  # 256 wide: no fallback
    with_weights = {llqx.ggml_type(x).name.upper() for x in tensor_candidates(t, True)}
    without = {llqx.ggml_type(x).name.upper() for x in tensor_candidates(t, False)}
    assert len(with_weights) == 20
    assert with_weights - without == refused


def test_scoring_is_thread_count_independent(
    smollm2_f16: Path, smol_imatrix: Path, smol_scores: llqx.Scores
) -> None:
    one = score(smollm2_f16, smol_imatrix, nthread=1, sample_elements=SAMPLE, progress=False)
    for name, c in smol_scores.curves.items():
        assert one.curves[name].errors == c.errors


# ---- optimizer -----------------------------------------------------------------------------------


def test_optimizer_near_bruteforce_optimum() -> None:
    rng = np.random.default_rng(3)
    curves = []
    for _ in range(6):
        c = np.sort(rng.choice(np.arange(10, 200), 4, replace=False)).astype(float)
        e = np.sort(rng.random(4))[::-1] * rng.uniform(0.5, 5)
        curves.append((c, e))
    lo = sum(c.min() for c, _ in curves)
    hi = sum(c.max() for c, _ in curves)
    for budget in np.linspace(lo, hi, 9).astype(int):
        best = min(
            sum(e[i] for (_, e), i in zip(curves, combo, strict=True))
            for combo in product(range(4), repeat=6)
            if sum(c[i] for (c, _), i in zip(curves, combo, strict=True)) <= budget
        )
        # no slack: every byte that fits is spent; with slack: pure error minimization
        for slack, tol in ((0.0, None), (1e18, 1.05)):
            chosen = allocate(curves, int(budget), slack)
            cost = sum(c[i] for (c, _), i in zip(curves, chosen, strict=True))
            err = sum(e[i] for (_, e), i in zip(curves, chosen, strict=True))
            assert cost <= budget
            if tol is None:
                left = budget - cost  # nothing single move that spends bytes still fits
                assert all(
                    not (0 < c[k] - c[i] <= left)
                    for (c, _), i in zip(curves, chosen, strict=True)
                    for k in range(4)
                )
            else:
                assert err <= best * tol + 1e-12


# ---- plans: bpw and size accounting --------------------------------------------------------------


@pytest.mark.parametrize("which", ["smol", "moe"])
def test_bpw_sweep_lands_on_target(which: str, smol_scores: llqx.Scores, moe_scores: llqx.Scores) -> None:
    scores = smol_scores if which == "smol" else moe_scores
    lo, hi = _range(scores)
    assert 3.5 < lo < 5.0  # 576-wide tensors fall back to legacy types
    assert 15.9 < hi <= 16.1  # F16 everywhere (+ the MoE's F32 router)
    # feasible: near the all-F16 corner the nearest mixes lie apart (one F16 -> Q8_0 step of the
    # smallest tensor is ~0.006 bpw here), so the sweep stops 0.1 bpw below the maximum
    for target in np.round(np.linspace(lo + 0.0001, hi - 0.1, 25), 4):
        plan = scores.plan(target_bpw=float(target))
        assert plan.bpw <= target
        assert plan.bpw >= target - 0.002, (target, plan.bpw)
    assert scores.plan(target_bpw=float(hi - 0.0001)).bpw <= hi - 0.0001
    with pytest.raises(llqx.LlqxError, match="above the largest achievable"):
        scores.plan(target_bpw=hi + 0.01)
    with pytest.raises(llqx.LlqxError, match="below the smallest achievable"):
        scores.plan(target_bpw=lo - 0.01)


def test_written_files_match_plans(tmp_path: Path, scored_models: dict[str, ScoredModel]) -> None:
    smollm2_f16, smol_imatrix, smol_scores = scored_models["smol"]
    for which, target in (("smol", 8.3), ("moe", 6.7)):
        model, imf, scores = scored_models[which]
        plan = scores.plan(target_bpw=target)
        out = tmp_path / f"{Path(model).stem}-{target}.gguf"
        llqx.quantize(model, out, plan=plan, imatrix=imf, nthread=2)
        info = llqx.inspect(out)
        assert target - 0.002 <= info.bpw <= target
        assert info.bpw == plan.bpw
        assert info.file_size == plan.file_size
        assert {t.name: t.type for t in info.tensors} == {t.name: t.type for t in plan.tensors}
        assert info.metadata["quantize.imatrix.file"] == os.fspath(imf)
    # the whole file, metadata included, at most N and at least 0.999 N
    n = parse_size("0.09G")
    plan = smol_scores.plan(target_size=n)
    out = tmp_path / "sized.gguf"
    llqx.quantize(smollm2_f16, out, plan=plan, imatrix=smol_imatrix, nthread=2)
    size = out.stat().st_size
    assert 0.999 * n <= size <= n


def test_target_size_accounting(smol_scores: llqx.Scores) -> None:
    for text in ("75M", "0.1G", "123456789", "150MiB"):
        n = parse_size(text)
        plan = smol_scores.plan(target_size=n)
        assert 0.999 * n <= plan.file_size <= n
    assert parse_size("1.5G") == 3 * 2**29
    with pytest.raises(llqx.LlqxError):
        parse_size("1.5X")


def test_pins_are_respected(smol_scores: llqx.Scores) -> None:
    plan = smol_scores.plan(target_bpw=6.0, tensor_types=[(r"ffn_up", "q8_0")], token_embedding_type="q4_0")
    assert 5.998 <= plan.bpw <= 6.0
    for t in plan.tensors:
        if "ffn_up" in t.name:
            assert t.type_name.upper() == "Q8_0"
            assert t.status == "pinned"
    assert plan.type_of("token_embd.weight") == llqx.ggml_type("Q4_0").id
    # a K type on a 576-wide tensor is written as its fallback, and planned so
    plan = smol_scores.plan(target_bpw=6.0, tensor_types=[(r"attn_q", "q6_k")])
    assert plan.type_of("blk.0.attn_q.weight") == llqx.ggml_type("Q8_0").id
    with pytest.raises(llqx.LlqxError, match="pinned tensors"):
        smol_scores.plan(target_bpw=5.0, tensor_types=[(r"weight", "f16")])


# ---- state file ----------------------------------------------------------------------------------


def test_state_file_reuse_and_rejection(
    tmp_path: Path,
    smollm2_f16: Path,
    smol_imatrix: Path,
    moe_imatrix: Path,
    smol_scores: llqx.Scores,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    state = tmp_path / "s.llqx-state"
    first = score(smollm2_f16, smol_imatrix, state=state, nthread=2, sample_elements=SAMPLE, progress=False)
    assert state.is_file()

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("rescored although the state file holds every curve")

    with monkeypatch.context() as mp:
        mp.setattr(_core, "score_run", boom)
        again = score(
            smollm2_f16, smol_imatrix, state=state, nthread=2, sample_elements=SAMPLE, progress=False
        )
    assert {n: c.errors for n, c in again.curves.items()} == {n: c.errors for n, c in first.curves.items()}

    # another scoring version (same model and imatrix): the curves are rescored, the measured probes kept
    # (their KL divergences do not depend on how errors are scored); another imatrix drops them as well
    doc = json.loads(state.read_text(encoding="utf-8"))
    key = doc["key"]
    doc["key"] = {**key, "scoring": key["scoring"] - 1}
    doc["probes"] = {"cal": {"ffn_down@0": 0.01}}
    state.write_text(json.dumps(doc), encoding="utf-8")
    older = load_state(state, key)
    assert older.tensors == {}
    assert older.probes == {"cal": {"ffn_down@0": 0.01}}
    doc["key"]["imatrix"] = "another"
    state.write_text(json.dumps(doc), encoding="utf-8")
    assert load_state(state, key).probes == {}

    # another imatrix (same model): reported and rebuilt, never reused
    im = Imatrix.load(smol_imatrix)
    e = im.entries["blk.0.attn_q.weight"]
    e.in_sum2 = e.in_sum2 * 2.0 + 1.0
    other = tmp_path / "other.imatrix.gguf"
    im.save(other)
    caplog.clear()
    with monkeypatch.context() as mp:
        mp.setattr(_core, "score_run", boom)
        with pytest.raises(AssertionError, match="rescored"):  # the state is not trusted: scoring starts
            score(smollm2_f16, other, state=state, nthread=2, sample_elements=SAMPLE, progress=False)
    assert any("another imatrix" in r.getMessage() for r in caplog.records)

    # a file llqx did not write (or cannot read as its own): refused, never replaced
    state.write_text("{not json", encoding="utf-8")
    with pytest.raises(llqx.LlqxError, match="not an llqx state file"):
        score(smollm2_f16, smol_imatrix, state=state, nthread=2, sample_elements=SAMPLE, progress=False)
    assert state.read_text(encoding="utf-8") == "{not json"
    # an llqx state file without its tensors: ours, so it is rebuilt
    state.write_text(json.dumps({"format": "llqx-state", "key": {}}), encoding="utf-8")
    caplog.clear()
    rebuilt = score(smollm2_f16, smol_imatrix, state=state, nthread=2, sample_elements=SAMPLE, progress=False)
    assert any("damaged" in r.getMessage() for r in caplog.records)
    assert rebuilt.curves["blk.0.attn_q.weight"].errors == first.curves["blk.0.attn_q.weight"].errors
    assert json.loads(state.read_text(encoding="utf-8"))["format"] == "llqx-state"


# ---- bad input -----------------------------------------------------------------------------------


def _args(**kw: object) -> QuantizeRequest:
    """The request both quantize front ends build (see test_target_cli.py for the CLI itself)."""
    base: dict[str, object] = {"nthread": 2, "quiet": True, "score_elements": SAMPLE, "candidates": "window"}
    base.update(kw)
    for key in ("input", "output", "imatrix"):
        if base.get(key) is not None:
            base[key] = str(base[key])
    if isinstance(base.get("target_size"), str):
        base["target_size"] = parse_size(str(base["target_size"]))
    return QuantizeRequest(**base)  # type: ignore[arg-type]


def test_bad_input_is_refused(
    tmp_path: Path, smollm2_f16: Path, smol_imatrix: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "out.gguf"
    with pytest.raises(llqx.LlqxError, match="cannot be used together"):
        run_target(
            _args(input=smollm2_f16, output=out, imatrix=smol_imatrix, target_bpw=5, target_size="80M")
        )
    with pytest.raises(llqx.LlqxError, match="need an importance matrix"):
        run_target(_args(input=smollm2_f16, output=out, target_bpw=5.0))
    with pytest.raises(
        llqx.LlqxError, match=r"below the smallest achievable mix .*achievable: [\d.]+ bpw to"
    ):
        run_target(_args(input=smollm2_f16, output=out, imatrix=smol_imatrix, target_bpw=2.0))
    # imatrix of another model: wrong widths, or no tensor in common
    im = Imatrix.load(smol_imatrix)
    bad = Imatrix(
        entries={
            "blk.0.attn_q.weight": llqx.ImatrixEntry(np.ones((1, 100), np.float32), np.ones(1, np.float32))
        }
    )
    bad_path = tmp_path / "bad.gguf"
    bad.save(bad_path)
    with pytest.raises(llqx.LlqxError, match="does not belong to this model"):
        run_target(_args(input=smollm2_f16, output=out, imatrix=bad_path, target_bpw=5.0))
    foreign = Imatrix(entries={"blk.0.mixer.weight": im.entries["blk.0.attn_q.weight"]})
    foreign.save(bad_path)
    with pytest.raises(llqx.LlqxError, match="does not belong to this model"):
        run_target(_args(input=smollm2_f16, output=out, imatrix=bad_path, target_bpw=5.0))
    # pins alone above the budget
    with pytest.raises(llqx.LlqxError, match="pinned tensors"):
        run_target(
            _args(
                input=smollm2_f16, output=out, imatrix=smol_imatrix, target_bpw=5.0,
                tensor_types=[("blk", llqx.ggml_type("f16").id)]
            )
        )
    # an upstream imatrix has no activations: a warning, not an error
    caplog.clear()
    assert run_target(_args(input=smollm2_f16, imatrix=smol_imatrix, target_bpw=6.0, dry_run=True)) == 0
    assert any("no activation sums" in r.getMessage() for r in caplog.records)
    assert not out.exists()
    assert not list(tmp_path.glob(".out.gguf*"))


def test_dry_run_json(
    tmp_path: Path, smollm2_f16: Path, smol_imatrix: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tf = tmp_path / "types.txt"
    tf.write_text("output=q8_0\nffn_gate=q5_0\n", encoding="utf-8")
    rc = run_target(
        _args(
            input=smollm2_f16,
            output=tmp_path / "x.gguf",
            imatrix=smol_imatrix,
            target_bpw=7.0,
            dry_run=True,
            json=True,
            tensor_types=read_tensor_type_file(tf),
        )
    )
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert 6.998 <= doc["bpw"] <= 7.0
    gates = [t for t in doc["tensors"] if "ffn_gate" in t["name"]]
    assert gates
    assert all(t["type"].upper() == "Q5_0" for t in gates)
    assert all(t["status"] == "pinned" for t in gates)
    assert "blk.7" in doc["layers"]
    assert not (tmp_path / "x.gguf").exists()


# ---- CLI: Ctrl+C and resume, thread count ---------------------------------------------------------


def _cli(model: str, out: str, threads: str, *opts: str) -> list[str]:
    """The installed drop-in: options, then input, output, type and thread count, as upstream."""
    return [str(Path(sys.executable).parent / "llqx-quantize"), *opts, model, out, "Q8_0", threads]


def test_sigint_resume_and_threads_give_identical_files(
    tmp_path: Path, smollm2_f16: Path, smol_imatrix: Path
) -> None:
    env = subprocess_env()
    # enough sampled rows that scoring outlasts the state file's first save (2 s) on a loaded machine
    common = ["--imatrix", str(smol_imatrix), "--target-bpw", "8.5", "--score-elements", "262144", "--quiet"]
    ref = tmp_path / "ref.gguf"
    subprocess.run(
        _cli(
            str(smollm2_f16), str(ref), "1", "--state-file", str(tmp_path / "a.state"), *common
        ),
        check=True,
        env=env,
        capture_output=True,
    )

    state = tmp_path / "b.state"
    out = tmp_path / "resumed.gguf"
    proc = subprocess.Popen(
        _cli(str(smollm2_f16), str(out), "2", "--state-file", str(state), *common),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=default_sigint,
    )
    deadline = time.monotonic() + 120
    while not state.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "scoring finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()
    assert not out.exists()
    n_saved = len(json.loads(state.read_text(encoding="utf-8"))["tensors"])
    assert 0 < n_saved < 211

    subprocess.run(
        _cli(str(smollm2_f16), str(out), "2", "--state-file", str(state), *common),
        check=True,
        env=env,
        capture_output=True,
    )
    assert out.read_bytes() == ref.read_bytes()
    assert llqx.inspect(out).bpw <= 8.5


# ---- window mode: grid types scored only near the target -------------------------------------------

LAZY = {t.id for t in llqx.ggml_types().values() if t.has_grid}


def _forbid_scoring(mp: pytest.MonkeyPatch) -> None:
    def boom(*a: object, **k: object) -> None:
        raise AssertionError("scored although the state file holds every curve it needs")

    mp.setattr(_core, "score_run", boom)


@pytest.mark.parametrize("which", ["smol", "moe"])
def test_window_plans_fit_and_never_beat_full_plans(
    which: str,
    tmp_path: Path,
    scored_models: dict[str, ScoredModel],
    states: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, imf, full = scored_models[which]
    state = tmp_path / "state"
    state.write_bytes((states / which).read_bytes())
    with monkeypatch.context() as mp:
        _forbid_scoring(mp)  # the full scoring's state file holds every pair the window can ask for
        win = score(model, imf, state=state, nthread=2, sample_elements=SAMPLE, progress=False,
                    candidates="window")
        lo, hi = _range(full)
        targets = [lo + 0.05, lo + 0.3, 4.3, 4.5, 4.7, 5.0, 6.0, 8.0, hi - 1.0]
        cases: list[dict[str, object]] = [{"target_bpw": t} for t in targets if lo < t < hi]
        cases += [
            {"target_size": parse_size("75M")},
            {"target_bpw": 6.0, "tensor_types": [("ffn_up", "q8_0")], "token_embedding_type": "q4_0"},
        ]
        for kw in cases:
            a = full.plan(**kw)  # type: ignore[arg-type]
            b = win.plan(**kw)  # type: ignore[arg-type]
            # window mode plans over a subset of the candidates, widened while a type left out could
            # win at the plan's price of a byte: the same error as the full set (a tie may pick another mix)
            same = [x.type for x in a.tensors] == [x.type for x in b.tensors]
            assert same or abs(a.error - b.error) <= 1e-9 * a.error, (kw, a.error, b.error)
            assert b.bpw <= a.target_bpw if a.target_bpw is not None else b.file_size <= parse_size("75M")


def test_window_scores_lazily_and_extends_the_state(
    tmp_path: Path,
    smollm2_f16: Path,
    smol_imatrix: Path,
    smol_scores: llqx.Scores,
    states: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked: list[tuple[str, int]] = []
    real = _core.score_run

    def recording(path: str, jobs: list[dict[str, object]], **kw: object) -> object:
        for j in jobs:
            asked.extend((str(j["name"]), int(t)) for t in j["candidates"])  # type: ignore[attr-defined]
        return real(path, jobs, **kw)

    state = tmp_path / "s.llqx-state"
    kw: dict[str, object] = {"state": state, "nthread": 2, "sample_elements": SAMPLE, "progress": False}
    with monkeypatch.context() as mp:
        mp.setattr(_core, "score_run", recording)
        win = score(smollm2_f16, smol_imatrix, candidates="window", **kw)  # type: ignore[arg-type]
        assert not asked  # nothing is scored before a target is known
        high = win.plan(target_bpw=7.0)
        first = list(asked)
        assert first
        assert not any(t in LAZY for _, t in first)  # no IQ1/IQ2/IQ3 grid at 7 bpw
        assert len(set(first)) == len(first)
        low = win.plan(target_bpw=4.3)
        more = asked[len(first):]
        assert any(t in LAZY for _, t in more)  # near the grid types they are scored ...
        assert not set(more) & set(first)  # ... and what the state holds is never scored again
        assert len(set(more)) == len(more)
    # every error equals the one of a full scoring (same rows, same arithmetic)
    doc = json.loads(state.read_text(encoding="utf-8"))
    full_doc = json.loads((states / "smol").read_text(encoding="utf-8"))  # smol_scores' state file
    n_pairs = 0
    for name, entry in doc["tensors"].items():
        full = full_doc["tensors"][name]
        assert entry["energy"] == full["energy"]
        for tname, err in zip(entry["types"], entry["errors"], strict=True):
            assert err == full["errors"][full["types"].index(tname)]
            n_pairs += 1
    assert n_pairs == len(set(asked))
    # a later run finds it all in the state file: same plans, nothing scored
    with monkeypatch.context() as mp:
        _forbid_scoring(mp)
        again = score(smollm2_f16, smol_imatrix, candidates="window", **kw)  # type: ignore[arg-type]
        assert [t.type for t in again.plan(target_bpw=7.0).tensors] == [t.type for t in high.tensors]
        assert [t.type for t in again.plan(target_bpw=4.3).tensors] == [t.type for t in low.tensors]
    # "all" adds only the pairs still missing
    asked.clear()
    with monkeypatch.context() as mp:
        mp.setattr(_core, "score_run", recording)
        full = score(smollm2_f16, smol_imatrix, candidates="all", **kw)  # type: ignore[arg-type]
    n_all = sum(len(c.types) for c in full.curves.values())
    assert len(asked) == n_all - n_pairs
    assert {n: c.errors for n, c in full.curves.items()} == {n: c.errors for n, c in smol_scores.curves.items()}
    with pytest.raises(llqx.LlqxError, match="candidates mode"):
        score(smollm2_f16, smol_imatrix, candidates="some", **kw)  # type: ignore[arg-type]


def test_cli_candidates_window_and_all(
    tmp_path: Path, smollm2_f16: Path, smol_imatrix: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plans = {}
    for mode in ("window", "all"):
        capsys.readouterr()
        rc = run_target(
            _args(input=smollm2_f16, imatrix=smol_imatrix, target_bpw=6.5, dry_run=True, json=True,
                  candidates=mode, state_file=str(tmp_path / mode))
        )
        assert rc == 0
        plans[mode] = json.loads(capsys.readouterr().out)
        held = json.loads((tmp_path / mode).read_text(encoding="utf-8"))["tensors"]
        grid = {t for e in held.values() for t in e["types"] if llqx.ggml_type(t).id in LAZY}
        assert bool(grid) == (mode == "all")
    assert [t["type"] for t in plans["window"]["tensors"]] == [t["type"] for t in plans["all"]["tensors"]]


def _weights_of(info: llqx.ModelInfo, energy: dict[str, float], has_imatrix: bool = True) -> dict[str, float]:
    """output_weights for tensors with the given energies (token_embd's: 2 per token) and no errors."""
    n_vocab = info.tensor("token_embd.weight").shape[1]
    energy = {"token_embd.weight": 2.0 * n_vocab, **energy}
    return output_weights(info, {n: TensorScore(["F16"], [0.0], 1, e) for n, e in energy.items()}, has_imatrix)


# each later sub-layer passes c × (its written energy / the stream's energy before it) of an error on;
# the mix of both output_weights tests: embedding 2 per token, blk.0 attention 10, blk.0 FFN 30, blk.1 attention 50
G_ATTN1 = 1 + PROPAGATION * 50.0 / (2.0 + 10.0 + 30.0)
G_FFN0 = 1 + PROPAGATION * 30.0 / (2.0 + 10.0)
G_ATTN0 = 1 + PROPAGATION * 10.0 / 2.0


def test_output_weights_put_errors_in_residual_units(smol_scores: llqx.Scores) -> None:
    info = smol_scores.model
    n_vocab = info.tensor("token_embd.weight").shape[1]
    energy = {
        "blk.0.attn_q.weight": 5.0,
        "blk.0.attn_output.weight": 10.0,
        "blk.0.ffn_up.weight": 7.0,
        "blk.0.ffn_down.weight": 30.0,
        "blk.1.attn_output.weight": 50.0,
    }
    w = _weights_of(info, energy)
    c, g_attn1, g_ffn0, g_attn0 = PROPAGATION, G_ATTN1, G_FFN0, G_ATTN0
    assert w["blk.1.attn_output.weight"] == pytest.approx(1.0)
    assert w["blk.0.ffn_down.weight"] == pytest.approx(g_attn1)
    assert w["blk.0.attn_output.weight"] == pytest.approx(g_ffn0 * g_attn1)
    # block inputs: c × relative error × what the block writes, then as their writer
    assert w["blk.0.attn_q.weight"] == pytest.approx(c * 10.0 / 5.0 * g_ffn0 * g_attn1)
    assert w["blk.0.ffn_up.weight"] == pytest.approx(c * 30.0 / 7.0 * g_attn1)
    # tied head: the relative error per row of the first layer's input, grown by every sub-layer, plus
    # its relative error against the whole stream as the output head
    residual = 2.0 + 10.0 + 30.0 + 50.0
    expected = (2.0 * g_attn0 * g_ffn0 * g_attn1 + residual) / (2.0 * n_vocab)
    assert w["token_embd.weight"] == pytest.approx(expected)
    # no imatrix: plain relative errors
    assert _weights_of(info, energy, False)["blk.0.ffn_down.weight"] == pytest.approx(1 / 30.0)


def test_output_weights_gate_routed_experts(moe_f16: Path) -> None:
    """An expert slice's output is scaled by its gate (~1/k for k experts per token) before it reaches the
    stream: the same mix as above with ffn_down_exps' per-slice energy k × 30 gives the dense numbers."""
    info = llqx.inspect(moe_f16)
    k = info.metadata[f"{info.architecture}.expert_used_count"]
    assert k == 4
    energy = {
        "blk.0.attn_output.weight": 10.0,
        "blk.0.ffn_up_exps.weight": 7.0 * k,
        "blk.0.ffn_down_exps.weight": 30.0 * k,
        "blk.1.attn_output.weight": 50.0,
    }
    w = _weights_of(info, energy)
    c, g_attn1, g_ffn0 = PROPAGATION, G_ATTN1, G_FFN0
    # a slice's raw error is k times what reaches the stream (gate² × the k slices a token passes)
    assert w["blk.0.ffn_down_exps.weight"] == pytest.approx(g_attn1 / k)
    assert w["blk.0.ffn_up_exps.weight"] == pytest.approx(c * 30.0 / (7.0 * k) * g_attn1)
    assert w["blk.0.attn_output.weight"] == pytest.approx(g_ffn0 * g_attn1)
    # no imatrix: relative errors, gated or not
    assert _weights_of(info, energy, False)["blk.0.ffn_down_exps.weight"] == pytest.approx(1 / (30.0 * k))
