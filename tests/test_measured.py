"""Measured steps of target mode: recipe mixes read from llama.cpp's dry run, measured sensitivities and
--verify, end to end through the installed llqx-quantize, files checked with gguf-py and llqx eval."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

import llqx
from conftest import subprocess_env
from llqx import Imatrix, _core, data, ggml_type
from llqx.cli.target import run_target
from llqx.llama_rules import quantizable_tensors
from llqx.request import QuantizeRequest
from llqx.scoring import score
from llqx.sensitivity import BANDS, calibrate, tensor_group
from llqx.verify import nearest_recipe, recipe_mix, recipe_plan


def file_types(path: Path) -> dict[str, int]:
    return {t.name: int(t.tensor_type) for t in gguf.GGUFReader(path).tensors}


LLQX_QUANTIZE = Path(sys.executable).parent / "llqx-quantize"


def quantize_cli(*args: object) -> subprocess.CompletedProcess[str]:
    cmd = [str(LLQX_QUANTIZE), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=900)


@pytest.mark.parametrize("recipe", ["Q4_K_M", "Q3_K_S", "IQ4_XS"])
def test_recipe_mix_is_what_llama_quantize_writes(
    recipe: str, smollm2_f16: Path, smol_imatrix: Path, llama_quantize: Path, tmp_path: Path
) -> None:
    out = tmp_path / f"{recipe}.gguf"
    subprocess.run([str(llama_quantize), "--imatrix", str(smol_imatrix), str(smollm2_f16), str(out), recipe],
                   check=True, capture_output=True)
    written = file_types(out)
    mix = recipe_mix(smollm2_f16, recipe, Imatrix.load(smol_imatrix))
    assert mix == written


def test_recipe_mix_honours_pins(smollm2_f16: Path, smol_imatrix: Path, llama_quantize: Path, tmp_path: Path) -> None:
    out = tmp_path / "pinned.gguf"
    subprocess.run([str(llama_quantize), "--imatrix", str(smol_imatrix), "--tensor-type", "ffn_down=q8_0",
                    str(smollm2_f16), str(out), "Q4_K_M"], check=True, capture_output=True)
    mix = recipe_mix(smollm2_f16, "Q4_K_M", Imatrix.load(smol_imatrix), tensor_types=["ffn_down=q8_0"])
    assert mix == file_types(out)


def test_groups_split_layers_into_bands() -> None:
    assert tensor_group("blk.0.ffn_down.weight", 30) == "ffn_down@0"
    assert tensor_group("blk.29.ffn_down.weight", 30) == f"ffn_down@{BANDS - 1}"
    assert tensor_group("blk.15.attn_q.weight", 30) == "attn_q@1"
    assert tensor_group("token_embd.weight", 30) == "token_embd"
    assert tensor_group("output.weight", 30) == "output"


def test_calibration_refuses_a_quantized_model(smol_imatrix: Path, calib_text: Path, tmp_path: Path) -> None:
    """Probes need full-precision weights: said in one line before anything is scored."""
    q41 = data.fetch(data.SMOLLM2_Q4_1)
    state = tmp_path / "s.state"
    r = quantize_cli("--imatrix", smol_imatrix, "--target-bpw", "5", "--allow-requantize", "--state-file", state,
                     "--calibration-file", calib_text, q41, tmp_path / "o.gguf")
    assert r.returncode == 1
    assert "full-precision" in r.stderr.strip().splitlines()[-1]
    assert not state.exists()
    assert not (tmp_path / "o.gguf").exists()


def test_target_with_calibration_and_verify(
    smollm2_f16: Path, smol_imatrix: Path, calib_text: Path, tmp_path: Path
) -> None:
    """Through the CLI: sensitivities measured and kept in the state file, the plan compared with the
    nearest recipe, the kept mix written and checked with gguf-py; a second run measures nothing."""
    state = tmp_path / "s.state"
    out = tmp_path / "o.gguf"
    args = ["--imatrix", smol_imatrix, "--target-bpw", "5.0", "--state-file", state, "--calibration-file",
            calib_text, "--calibration-chunks", "2", "--verify", "--json", smollm2_f16, out]
    r = quantize_cli(*args)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    groups = {g["group"] for g in doc["sensitivity"]}
    assert {"token_embd", "ffn_down@0", f"attn_v@{BANDS - 1}"} <= groups
    assert all(g["kld"] > 0 and g["factor"] > 0 for g in doc["sensitivity"])
    v = doc["verify"]
    assert v["recipe_bpw"] <= 5.0
    assert v["plan_bpw"] <= 5.0
    assert v["kept"] == ("llqx" if v["plan_kld"] <= v["recipe_kld"] else v["recipe"])
    written = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert {t["name"]: t["type"].upper() for t in doc["tensors"]} == written
    stored = json.loads(state.read_text())["probes"]
    assert len(stored) == 1
    assert set(next(iter(stored.values()))) == groups
    again = quantize_cli(*args[:-2], "--dry-run", smollm2_f16)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["sensitivity"] == doc["sensitivity"]


def test_verify_at_a_recipes_size_compares_with_that_recipe(
    smollm2_f16: Path, smol_imatrix: Path, calib_text: Path, llama_quantize: Path, tmp_path: Path
) -> None:
    """Asked for exactly Q4_K_M's file size, --verify measures against Q4_K_M itself (the plan lands a few
    bytes under its target, so comparing with what fits the plan's bytes would pick a smaller recipe)."""
    q4 = tmp_path / "q4_k_m.gguf"
    subprocess.run([str(llama_quantize), "--imatrix", str(smol_imatrix), str(smollm2_f16), str(q4), "Q4_K_M"],
                   check=True, capture_output=True, env=subprocess_env())
    size = q4.stat().st_size
    r = quantize_cli("--imatrix", smol_imatrix, "--target-size", size, "--state-file", tmp_path / "s.state",
                     "--calibration-file", calib_text, "--calibration-chunks", "1", "--verify", "--dry-run",
                     "--json", smollm2_f16)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    v = doc["verify"]
    assert v["recipe"] == "Q4_K_M"
    assert v["recipe_bpw"] == pytest.approx(llqx.inspect(q4).bpw, abs=1e-9)
    assert doc["file_size"] <= size
    if v["kept"] == "Q4_K_M":
        assert {t["name"]: ggml_type(t["type"]).id for t in doc["tensors"]} == file_types(q4)
    else:
        assert v["plan_kld"] <= v["recipe_kld"]


def test_a_kept_recipe_is_written_as_llama_quantize_writes_it(
    smollm2_f16: Path, smol_imatrix: Path, llama_quantize: Path, tmp_path: Path
) -> None:
    """When --verify keeps the recipe, the plan is the recipe's mix (the largest that fits the target, here
    1 MiB above Q4_K_M's file) and reports the user's target: its types are those llama-quantize writes."""
    q4 = tmp_path / "q4_k_m.gguf"
    subprocess.run([str(llama_quantize), "--imatrix", str(smol_imatrix), str(smollm2_f16), str(q4), "Q4_K_M"],
                   check=True, capture_output=True, env=subprocess_env())
    target = q4.stat().st_size + 2**20
    im = Imatrix.load(smol_imatrix)
    scores = llqx.score(smollm2_f16, smol_imatrix, nthread=2, progress=False)
    plan = scores.plan(target_size=target)
    recipe = nearest_recipe(scores, plan, im, {})
    assert q4.stat().st_size <= recipe.file_size <= target
    kept = recipe_plan(scores, plan, recipe, {})
    assert kept.target_size == target
    assert kept.file_size == recipe.file_size
    written = tmp_path / "recipe.gguf"
    subprocess.run([str(llama_quantize), "--imatrix", str(smol_imatrix), str(smollm2_f16), str(written),
                    recipe.name], check=True, capture_output=True, env=subprocess_env())
    assert {t.name: t.type for t in kept.tensors} == file_types(written)
    assert kept.file_size == written.stat().st_size


def test_verify_needs_calibration_text(smollm2_f16: Path, smol_imatrix: Path, tmp_path: Path) -> None:
    r = quantize_cli("--imatrix", smol_imatrix, "--target-bpw", "5", "--verify", smollm2_f16, tmp_path / "o.gguf")
    assert r.returncode == 1
    assert "--calibration-file" in r.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "o.gguf").exists()


def test_measured_groups_price_local_error(
    smollm2_f16: Path, smol_imatrix: Path, calib_text: Path, tmp_path: Path
) -> None:
    """Inside a measured group every tensor's planned error is the group's factor times its local error,
    read back from the state file: the error a writer (attn_output, ffn_down) adds to the residual stream,
    the error of any other tensor over its output energy; whatever layer it is in, the estimator's layer
    weights do not reach a calibrated plan."""
    state = tmp_path / "s.state"
    r = quantize_cli("--imatrix", smol_imatrix, "--target-bpw", "5.0", "--state-file", state, "--calibration-file",
                     calib_text, "--calibration-chunks", "1", "--dry-run", "--json", smollm2_f16, tmp_path / "o.gguf")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    n_layer = max(int(t["name"].split(".")[1]) for t in doc["tensors"] if t["name"].startswith("blk.")) + 1
    factor = {g["group"]: g["factor"] for g in doc["sensitivity"]}
    scored = json.loads(state.read_text())["tensors"]
    checked = 0
    for t in doc["tensors"]:
        if t["status"] != "optimized" or t["name"] not in scored:
            continue
        s = scored[t["name"]]
        error = s["errors"][[x.upper() for x in s["types"]].index(t["type"].upper())]
        writes = t["name"].endswith(("attn_output.weight", "ffn_down.weight"))
        local = error if writes else error / s["energy"]
        assert t["error"] == pytest.approx(factor[tensor_group(t["name"], n_layer)] * local, rel=1e-9)
        checked += 1
    assert checked >= 7 * n_layer


def imatrix_cli(*args: object) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "llqx.cli", "imatrix", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=900)


@pytest.fixture(scope="module")
def carried_imatrix(
    smollm2_f16: Path, calib_text: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, object]]:
    """An imatrix made with `llqx imatrix --sensitivity-chunks 1`, and the command's --json summary."""
    im = tmp_path_factory.mktemp("carried") / "im.gguf"
    r = imatrix_cli("-m", smollm2_f16, "-f", calib_text, "-c", "512", "--chunks", "2", "-t", "2",
                    "--sensitivity-chunks", "1", "--json", "-o", im)
    assert r.returncode == 0, r.stderr
    return im, json.loads(r.stdout)


def test_imatrix_pass_carries_the_sensitivities(
    smollm2_f16: Path, calib_text: Path, llama_quantize: Path, tmp_path: Path,
    carried_imatrix: tuple[Path, dict[str, object]],
) -> None:
    """llqx imatrix --sensitivity-chunks 1 stores each group's probe in the file (upstream still reads it);
    a target planned from it measures nothing and equals the target that measures the same chunk itself
    (--calibration-file, same text) on the same sums; a merge, which changes the sums, drops them."""
    im, summary = carried_imatrix
    carried = Imatrix.load(im)
    assert summary["sensitivity_groups"] == len(carried.sensitivities) > 20
    assert all(k > 0 for k in carried.sensitivities.values())
    q4 = tmp_path / "q4.gguf"
    up = subprocess.run([str(llama_quantize), "--imatrix", str(im), str(smollm2_f16), str(q4), "Q4_K_M", "2"],
                        capture_output=True, text=True)
    assert up.returncode == 0, up.stderr

    plain = tmp_path / "plain.gguf"
    bare = Imatrix.load(im)
    bare.sensitivities = {}
    bare.save(plain)
    assert not Imatrix.load(plain).sensitivities

    common = ["--target-bpw", "4.5", "--dry-run", "--json"]
    from_file = quantize_cli("--imatrix", im, *common, smollm2_f16)
    measured = quantize_cli("--imatrix", plain, *common, "--calibration-file", calib_text,
                            "--calibration-chunks", "1", smollm2_f16)
    estimator = quantize_cli("--imatrix", plain, *common, smollm2_f16)
    for run in (from_file, measured, estimator):
        assert run.returncode == 0, run.stderr
    a, b, c = (json.loads(x.stdout) for x in (from_file, measured, estimator))
    assert a["sensitivity_source"].startswith("from the imatrix file")
    assert {g["group"]: g["kld"] for g in a["sensitivity"]} == {g["group"]: g["kld"] for g in b["sensitivity"]}
    assert a["tensors"] == b["tensors"]
    assert "sensitivity" not in c
    assert a["error"] != pytest.approx(c["error"])  # calibrated: the error is in KL divergence

    merged = tmp_path / "merged.gguf"
    r = imatrix_cli("--in-file", im, "--in-file", im, "-o", merged)
    assert r.returncode == 0, r.stderr
    twice, once = Imatrix.load(merged), Imatrix.load(im)
    assert not twice.sensitivities
    # the stream sums and their block maxima add up like the others
    st2, st1 = twice.entries["blk.3.ffn_down.weight"].stream, once.entries["blk.3.ffn_down.weight"].stream
    assert st2 is not None
    assert st1 is not None
    assert st2.count == 2 * st1.count
    assert sorted(st2.in_max2) == sorted(st1.in_max2) == [32, 256]
    for width, m in st1.in_max2.items():
        np.testing.assert_allclose(st2.in_max2[width], 2 * m, rtol=1e-6)


def test_window_reads_each_tensor_once_with_carried_sensitivities(
    smollm2_f16: Path, carried_imatrix: tuple[Path, dict[str, object]], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--candidates window with the sensitivities an imatrix carries: the probe types are scored with the
    window's first candidates, so the first scoring pass reads every tensor once (it reads each whole) and
    a later one only a few, for the grid types the plan could still take; the plan is the one of scoring
    them in two passes, probe types first, as the sensitivities ask for them alone."""
    im, _ = carried_imatrix
    reads: list[str] = []
    calls: list[list[tuple[str, list[int]]]] = []
    real = _core.score_run

    def recording(path: str, jobs: list[dict[str, object]], **kw: object) -> object:
        reads.extend(str(j["name"]) for j in jobs)
        calls.append([(str(j["name"]), list(j["candidates"])) for j in jobs])  # type: ignore[call-overload]
        return real(path, jobs, **kw)

    monkeypatch.setattr(_core, "score_run", recording)
    req = QuantizeRequest(input=str(smollm2_f16), imatrix=str(im), target_bpw=6.0, candidates="window",
                          nthread=2, dry_run=True, json=True)
    assert run_target(req) == 0
    one_pass = json.loads(capsys.readouterr().out)
    assert one_pass["sensitivity_source"].startswith("from the imatrix file")
    n_tensors = len(quantizable_tensors(llqx.inspect(smollm2_f16)))
    first = [name for name, _ in calls[0]]
    assert len(first) == len(set(first)) == n_tensors
    grid = {t.id for t in llqx.ggml_types().values() if t.has_grid}
    widened = [(name, types) for call in calls[1:] for name, types in call]
    assert all(set(types) <= grid for _, types in widened)  # never the probe type again
    assert len(widened) < n_tensors / 4

    imatrix = Imatrix.load(im)
    scores = score(smollm2_f16, imatrix, nthread=2, progress=False, candidates="window")
    calibrate(scores, imatrix, None)  # scores the probe types alone: a first read of every tensor
    two_passes = scores.plan(target_bpw=6.0)
    assert len(reads) > 2 * n_tensors - 1 + len(widened)
    assert [t["type"] for t in one_pass["tensors"]] == [t["type"] for t in two_passes.to_dict()["tensors"]]


def test_imatrix_sensitivities_refused_up_front(calib_text: Path, tmp_path: Path) -> None:
    """A quantized model, or the legacy format, cannot carry them: one line, before anything runs."""
    q41 = data.fetch(data.SMOLLM2_Q4_1)
    for extra, msg in ((["-m", q41], "full-precision"),
                       (["-m", data.smollm2_f16(), "--output-format", "dat"], "--output-format dat")):
        out = tmp_path / "im.out"
        r = imatrix_cli(*extra, "-f", calib_text, "--sensitivity-chunks", "1", "-o", out)
        assert r.returncode == 1
        assert msg in r.stderr.strip().splitlines()[-1]
        assert not out.exists()


def eval_kld(base: Path, quant: Path, text: Path) -> float:
    cmd = [sys.executable, "-m", "llqx.cli", "eval", "-f", str(text), "-c", "256", "--chunks", "4", "-t", "2",
           "--no-cache", "--json", "-q", str(base), str(quant)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=900)
    assert r.returncode == 0, r.stderr
    return float(json.loads(r.stdout)["quants"][0]["kld_mean"]["value"])


def test_the_estimate_prices_the_rounding_of_activations(
    smollm2_f16: Path, calib_text: Path, eval_text: Path, tmp_path: Path
) -> None:
    """ggml's CPU dot products round a quantized tensor's input to 8 bits (Q8_0/Q8_1/Q8_K), which an in-memory
    probe never does. The imatrix pass stores each block's largest |x|² (bounded by the block's Σx²: at least
    its mean, at most its sum); with them a calibrated plan at 8.5 bpw (Q8_0, whose weights err little) prices
    that rounding, and its estimate tracks the written file's held-out KLD, which the weights alone
    underestimate."""
    im = tmp_path / "im.gguf"
    r = imatrix_cli("-m", smollm2_f16, "-f", calib_text, "-c", "256", "--chunks", "4", "-t", "2", "-o", im)
    assert r.returncode == 0, r.stderr
    carried = Imatrix.load(im)
    for e in carried.entries.values():
        m = e.in_max2[32].astype(np.float64)
        block = e.in_sum2.astype(np.float64).reshape(e.n_expert, -1, 32)
        assert np.all(m >= block.mean(axis=2) * (1 - 1e-5))
        assert np.all(m <= block.sum(axis=2) * (1 + 1e-5))
        if e.stream is not None:  # the same bounds per token, each weighted by its stream
            m, block = e.stream.in_max2[32], e.stream.in_sum2.reshape(-1, 32)
            assert np.all(m >= block.mean(axis=1) * (1 - 1e-5))
            assert np.all(m <= block.sum(axis=1) * (1 + 1e-5))
    state = tmp_path / "s.state"
    r = quantize_cli("--imatrix", im, "--target-bpw", "8.5", "--calibration-file", calib_text, "--calibration-chunks",
                     "1", "--state-file", state, "--json", smollm2_f16, tmp_path / "q8.gguf")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    n_layer = max(int(t["name"].split(".")[1]) for t in doc["tensors"] if t["name"].startswith("blk.")) + 1
    factor = {g["group"]: g["factor"] for g in doc["sensitivity"]}
    scored = json.loads(state.read_text())["tensors"]
    weights_only = 0.0
    for t in doc["tensors"]:
        if t["name"] not in scored or t["error"] is None:
            continue
        s = scored[t["name"]]
        writes = t["name"].endswith(("attn_output.weight", "ffn_down.weight"))
        i = [x.upper() for x in s["types"]].index(t["type"].upper())
        block = str(ggml_type(t["type"]).act_block)
        # a writer's local error is its stream error: the imatrix pass collected its stream sums
        assert ("stream_errors" in s) == writes, t["name"]
        error = s["stream_errors"][i] if writes else s["errors"][i]
        rounding = (s["stream_rounding"] if writes else s["rounding"]).get(block, 0.0)
        f = factor[tensor_group(t["name"], n_layer)] / (1.0 if writes else s["energy"])
        assert t["error"] == pytest.approx(f * (error + rounding), rel=1e-9)
        weights_only += f * error
    assert int(gguf.GGMLQuantizationType.Q8_0) in set(file_types(tmp_path / "q8.gguf").values())
    measured = eval_kld(smollm2_f16, tmp_path / "q8.gguf", eval_text)
    assert weights_only < measured / 3
    assert measured / 2 < doc["error"] < measured * 2
