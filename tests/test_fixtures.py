"""llqx.data's derived models compute what their source computes: the rotated (grid-neutral) SmolLM2 and
the MoE rewrite, each checked with upstream llama-perplexity and llqx.evaluate."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest

import llqx
from llqx import data
from llqx.errors import LlqxError

CTX = 128
CHUNKS = 4
THREADS = 2
SEED = 0


def _run(cmd: list[object]) -> str:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout + proc.stderr


def _tensors(path: Path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def _values(t: gguf.ReaderTensor) -> np.ndarray:
    shape = tuple(int(d) for d in reversed(t.shape))
    return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float64).reshape(shape)


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def rotated(smollm2_f16: Path) -> Path:
    return data.smollm2_rotated_f16()


def _ppl(llama_perplexity: Path, model: Path, text: Path) -> float:
    log = _run([llama_perplexity, "-m", model, "-f", text, "-c", CTX, "-b", CTX, "--chunks", CHUNKS, "-t", THREADS])
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", log)
    assert m, "no final PPL in llama-perplexity output"
    return float(m.group(1))


@pytest.mark.slow
def test_same_perplexity(llama_perplexity: Path, smollm2_f16: Path, rotated: Path, eval_text: Path) -> None:
    """llama.cpp loads the untied head and the rotation changes nothing but F16 rounding."""
    base, rot = _ppl(llama_perplexity, smollm2_f16, eval_text), _ppl(llama_perplexity, rotated, eval_text)
    assert abs(rot - base) / base < 1e-3, (base, rot)


@pytest.mark.slow
def test_same_distribution(smollm2_f16: Path, rotated: Path, eval_text: Path) -> None:
    res = llqx.evaluate(smollm2_f16, [rotated], eval_text, ctx=CTX, chunks=CHUNKS, threads=THREADS, cache=False)
    q = res.quants[0]
    assert q.kld_mean.value < 1e-3, q.kld_mean
    assert q.same_top.value > 0.98
    assert abs(q.ppl.value - res.base.ppl.value) / res.base.ppl.value < 1e-3


def _requantized(tmp: Path, llama_quantize: Path, model: Path, name: str) -> tuple[gguf.ReaderTensor, np.ndarray]:
    """A tensor of model after llama-quantize to Q4_1, and the model's own values of it."""
    out = tmp / (model.stem + "-Q4_1.gguf")
    _run([llama_quantize, model, out, "Q4_1", THREADS])
    q = _tensors(out)[name]
    assert q.tensor_type == gguf.GGMLQuantizationType.Q4_1
    return q, _values(_tensors(model)[name])


@pytest.mark.slow
def test_off_the_q4_1_grid(tmp_path: Path, llama_quantize: Path, smollm2_f16: Path, rotated: Path) -> None:
    name = "blk.0.ffn_down.weight"
    # the dequantized source requantizes to its own Q4_1 blocks bit for bit: only F16 rounding is lost
    q, orig = _requantized(tmp_path, llama_quantize, smollm2_f16, name)
    source = _tensors(data.fetch(data.SMOLLM2_Q4_1))[name]
    assert np.array_equal(np.asarray(q.data), np.asarray(source.data))
    assert _rel_err(_values(q), orig) < 1e-3
    q, rot = _requantized(tmp_path, llama_quantize, rotated, name)
    assert _rel_err(_values(q), rot) > 0.05


@pytest.mark.slow
def test_structure(smollm2_f16: Path, rotated: Path) -> None:
    """Gains folded to ones, head untied, shapes kept, and the file is the source rotated by seed 0's R."""
    src, dst = _tensors(smollm2_f16), _tensors(rotated)
    assert "output.weight" not in src
    assert set(dst) == {*src, "output.weight"}
    for name, t in src.items():
        assert tuple(dst[name].shape) == tuple(t.shape), name
    assert tuple(dst["output.weight"].shape) == tuple(src["token_embd.weight"].shape)
    norms = [n for n in dst if n == "output_norm.weight" or re.fullmatch(r"blk\.\d+\.(attn|ffn)_norm\.weight", n)]
    assert len(norms) == 2 * 30 + 1
    for n in norms:
        assert dst[n].tensor_type == gguf.GGMLQuantizationType.F32
        assert np.all(_values(dst[n]) == 1.0), n
    for n, t in dst.items():
        want = gguf.GGMLQuantizationType.F16 if len(t.shape) > 1 else gguf.GGMLQuantizationType.F32
        assert t.tensor_type == want, n
    rot = data.random_rotation(576, SEED)
    emb = _values(src["token_embd.weight"])
    # rotated rows map back onto the source's (to F16 rounding)
    assert _rel_err(_values(dst["token_embd.weight"]) @ rot, emb) < 1e-3
    head = _values(dst["output.weight"]) @ rot
    assert _rel_err(head, emb * _values(src["output_norm.weight"])) < 1e-3
    q = _values(dst["blk.0.attn_q.weight"]) @ rot
    assert _rel_err(q, _values(src["blk.0.attn_q.weight"]) * _values(src["blk.0.attn_norm.weight"])) < 1e-3
    down = rot.T @ _values(dst["blk.0.ffn_down.weight"])
    assert _rel_err(down, _values(src["blk.0.ffn_down.weight"])) < 1e-3


def test_rotation_orthogonal_and_seeded() -> None:
    r = data.random_rotation(576, SEED)
    assert np.abs(r @ r.T - np.eye(576)).max() < 1e-12
    assert np.array_equal(data.random_rotation(64, SEED), data.random_rotation(64, SEED))
    assert not np.allclose(data.random_rotation(64, SEED), data.random_rotation(64, SEED + 1))


@pytest.mark.slow
def test_deterministic_file(tmp_path: Path, smollm2_f16: Path, rotated: Path) -> None:
    """A fresh seed-0 build is the cached fixture byte for byte (a stale cache from older code fails here)."""
    again = data.rotate_residual(smollm2_f16, tmp_path / "again.gguf", seed=SEED)
    assert data.sha256_of(again) == data.sha256_of(rotated)


def test_refuses_other_archs(tmp_path: Path) -> None:
    src = tmp_path / "gemma2.gguf"
    writer = gguf.GGUFWriter(src, arch="gemma2", use_temp_file=False)
    writer.add_embedding_length(4)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(LlqxError, match="supports llama and qwen2 models, not gemma2"):
        data.rotate_residual(src, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def _as_qwen2(source: Path, target: Path) -> None:
    """SmolLM2 relabelled as qwen2 with small random q/k/v biases: no real Qwen is small enough for CI.

    qwen2 ropes differently (NEOX), so this is another, still sensible model (PPL ~150 here).
    """
    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(target, arch="qwen2", use_temp_file=False)
    for f in reader.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        vtype = gguf.GGUFValueType(f.types[0])
        sub = gguf.GGUFValueType(f.types[-1]) if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(re.sub(r"^llama\.", "qwen2.", f.name), f.contents(), vtype, sub_type=sub)
    rng = np.random.default_rng(1)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
        m = re.fullmatch(r"blk\.(\d+)\.attn_([qkv])\.weight", t.name)
        if m:
            bias = rng.normal(0, 0.05, int(t.shape[-1])).astype(np.float32)
            writer.add_tensor(f"blk.{m.group(1)}.attn_{m.group(2)}.bias", bias)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.slow
def test_qwen2_with_biases(tmp_path: Path, smollm2_f16: Path, eval_text: Path) -> None:
    qwen2 = tmp_path / "qwen2.gguf"
    _as_qwen2(smollm2_f16, qwen2)
    rotated = data.rotate_residual(qwen2, tmp_path / "qwen2-rotated.gguf")
    src, dst = _tensors(qwen2), _tensors(rotated)
    assert np.array_equal(_values(dst["blk.0.attn_k.bias"]), _values(src["blk.0.attn_k.bias"]))
    res = llqx.evaluate(qwen2, [rotated], eval_text, ctx=CTX, chunks=2, threads=THREADS, cache=False)
    assert res.base.ppl.value < 1000  # a working model, not noise
    assert res.quants[0].kld_mean.value < 1e-3, res.quants[0].kld_mean


# ---- the MoE fixture computes what its dense source computes ----------------------------------

@pytest.mark.slow
def test_moe_fixture_equals_dense(tmp_path: Path, llama_perplexity: Path, smollm2_f16: Path, moe_f16: Path,
                                  eval_text: Path) -> None:
    base = tmp_path / "dense.kld"
    common = ["-f", eval_text, "-c", "128", "--chunks", "3", "-t", "2"]
    _run([llama_perplexity, "-m", smollm2_f16, *common, "--kl-divergence-base", base])
    text = _run([llama_perplexity, "-m", moe_f16, *common, "--kl-divergence-base", base, "--kl-divergence"])

    def stat(label: str) -> float:
        m = re.search(re.escape(label) + r"\s*:\s*(-?[\d.]+)", text)
        assert m, label
        return float(m.group(1))

    assert abs(stat("Mean PPL(Q)/PPL(base)") - 1.0) < 1e-3
    assert abs(stat("Mean    KLD")) < 1e-4
    assert stat("Maximum KLD") < 1e-3
    assert stat("Same top p") > 99.0
