"""_core.probe_mixes: the KLD of type mixes measured in memory, against files written by llama.cpp."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import llqx
from llqx import _core, data
from llqx.imatrix import Imatrix
from llqx.model import inspect
from llqx.types import ggml_type

CTX = 256
CHUNKS = 4
THREADS = 2
# the tests of behaviour rather than of numbers run on less text
SMALL_CTX = 128
SMALL_CHUNKS = 2


def type_id(name: str) -> int:
    return ggml_type(name).id


Q4_0 = type_id("Q4_0")
Q8_0 = type_id("Q8_0")


def _tokens(model: Path, text: Path, ctx: int = CTX, chunks: int = CHUNKS) -> np.ndarray:
    """The tokens llqx.evaluate scores: the text tokenized by the base model, cut into whole chunks."""
    tokens, _ = _core.eval_tokenize(str(model), text.read_text(encoding="utf-8"))
    n_chunk = min(chunks, tokens.size // ctx)
    return np.ascontiguousarray(tokens[: n_chunk * ctx], dtype=np.int32)


def _layer_weights(model: Path, layers: tuple[int, ...]) -> list[str]:
    prefixes = tuple(f"blk.{i}." for i in layers)
    return [t.name for t in inspect(model).tensors if t.name.startswith(prefixes) and len(t.shape) >= 2]


def _mix(names: list[str], types: dict[str, int], im: Imatrix | None) -> list[tuple[str, int, np.ndarray | None]]:
    return [(n, types[n], im.values(n).reshape(-1) if im is not None and n in im.entries else None) for n in names]


def _write_and_eval(
    model: Path, mix: list[tuple[str, int, np.ndarray | None]], imatrix: Path, text: Path, out_dir: Path,
    monkeypatch: pytest.MonkeyPatch, ctx: int = CTX, chunks: int = CHUNKS,
) -> list[float]:
    """[KLD of the mix written by llama.cpp, KLD of that file's weights dequantized to F16]."""
    quant = out_dir / "mix.gguf"
    # llama.cpp applies overrides only over a quantized ftype: a pure Q8_0 whose every other tensor stays F16
    overrides = [("^" + re.escape(name) + "$", t) for name, t, _ in mix] + [(".", type_id("F16"))]
    llqx.quantize(model, quant, "Q8_0", pure=True, imatrix=imatrix, tensor_types=overrides, nthread=THREADS)
    written = {t.name: t.type for t in inspect(quant).tensors}
    assert all(written[name] == t for name, t, _ in mix)  # llama.cpp kept every requested type
    assert sum(t != type_id("F16") for t in written.values() if t != type_id("F32")) == len(mix)
    deq = data.dequantize_to_f16(quant, out_dir / "mix-deq.gguf")
    monkeypatch.setenv("LLQX_CACHE_DIR", str(out_dir / "cache"))
    res = llqx.evaluate(model, [quant, deq], text, ctx=ctx, chunks=chunks, threads=THREADS)
    return [q.kld_mean.value for q in res.quants]


@pytest.fixture(scope="module")
def smol_im(smol_imatrix: Path) -> Imatrix:
    return Imatrix.load(smol_imatrix)


@pytest.fixture(scope="module")
def tokens(smollm2_f16: Path, eval_text: Path) -> np.ndarray:
    return _tokens(smollm2_f16, eval_text)


@pytest.fixture(scope="module")
def small(smollm2_f16: Path, eval_text: Path) -> np.ndarray:
    return _tokens(smollm2_f16, eval_text, SMALL_CTX, SMALL_CHUNKS)


@pytest.mark.slow
def test_matches_written_file(
    smollm2_f16: Path, smol_imatrix: Path, smol_im: Imatrix, eval_text: Path, tokens: np.ndarray,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """blk.0 and blk.1 at Q4_0 (ffn_down of blk.1 at Q8_0) with the imatrix: the same weights as llama.cpp's
    writer makes. The file's weights dequantized to F16 are exactly the probe's model (same KLD); the
    quantized file itself differs only by its matmuls (activations rounded to Q8_0, not F16)."""
    names = _layer_weights(smollm2_f16, (0, 1))
    types = {n: Q8_0 if n == "blk.1.ffn_down.weight" else Q4_0 for n in names}
    mix = _mix(names, types, smol_im)
    assert sum(imp is not None for _, _, imp in mix) == len(mix)
    plain = [(n, t, None) for n, t, _ in mix]
    got = _core.probe_mixes(str(smollm2_f16), tokens, CTX, [mix, plain], n_threads=THREADS)
    kld = float(got["kld"][0])
    assert float(got["kld"][1]) != kld  # the importance weights change the quantized weights
    file_kld, deq_kld = _write_and_eval(smollm2_f16, mix, smol_imatrix, eval_text, tmp_path, monkeypatch)
    print(f"probe KLD {kld:.9g}, F16-dequantized file {deq_kld:.9g}, quantized file {file_kld:.9g}")
    assert kld > 1e-3
    assert kld == pytest.approx(deq_kld, rel=1e-9)
    assert kld == pytest.approx(file_kld, rel=0.05)
    assert got["n_tokens"] == CHUNKS * _core.eval_n_scored(CTX)


@pytest.mark.slow
def test_moe_expert_slices(
    moe_f16: Path, moe_imatrix: Path, eval_text: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Per-expert importance on 3-D expert tensors, as llama_model_quantize slices it."""
    im = Imatrix.load(moe_imatrix)
    names = ["blk.0.ffn_up_exps.weight", "blk.0.ffn_down_exps.weight", "blk.1.ffn_gate_exps.weight"]
    assert all(im.entries[n].n_expert == 4 for n in names)
    mix = _mix(names, dict.fromkeys(names, Q4_0), im)
    toks = _tokens(moe_f16, eval_text, SMALL_CTX, SMALL_CHUNKS)
    got = _core.probe_mixes(str(moe_f16), toks, SMALL_CTX, [mix], n_threads=THREADS)
    _, deq_kld = _write_and_eval(moe_f16, mix, moe_imatrix, eval_text, tmp_path, monkeypatch, SMALL_CTX, SMALL_CHUNKS)
    assert float(got["kld"][0]) > 1e-4
    assert float(got["kld"][0]) == pytest.approx(deq_kld, rel=1e-9)


@pytest.mark.slow
def test_empty_mix_and_restore(
    smollm2_f16: Path, smol_im: Imatrix, eval_text: Path, small: np.ndarray, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    names = _layer_weights(smollm2_f16, (2,))
    a = _mix(names, dict.fromkeys(names, Q4_0), smol_im)
    # a grid type (IQ2_XS, needs importance) and the embedding (tied: also the output matmul)
    b = [("blk.5.ffn_down.weight", type_id("IQ2_XS"), smol_im.values("blk.5.ffn_down.weight").reshape(-1)),
         ("token_embd.weight", type_id("Q5_0"), None)]
    seen: list[tuple[int, int]] = []
    got = _core.probe_mixes(str(smollm2_f16), small, SMALL_CTX, [[], a, b, a, []], n_threads=THREADS,
                            progress=lambda done, total: seen.append((done, total)))
    kld = got["kld"]
    assert kld[1] == kld[3]  # bit for bit: b left no trace
    assert kld[0] == kld[4]
    assert kld[1] > 1e-3
    assert kld[2] > 1e-3
    assert got["nll"][1] == got["nll"][3]
    assert got["n_tokens"] == SMALL_CHUNKS * _core.eval_n_scored(SMALL_CTX)
    assert seen[-1] == (6 * SMALL_CHUNKS, 6 * SMALL_CHUNKS)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    # the base against itself: as llqx.evaluate measures the F16 file against itself (16-bit rows)
    monkeypatch.setenv("LLQX_CACHE_DIR", str(tmp_path))
    self_eval = llqx.evaluate(smollm2_f16, [smollm2_f16], eval_text, ctx=SMALL_CTX, chunks=SMALL_CHUNKS,
                              threads=THREADS)
    # the reference rows are rounded to 16 bits, so the base against itself is ~0 and may be a hair below it
    assert abs(kld[0]) < 1e-5
    assert kld[0] == pytest.approx(self_eval.quants[0].kld_mean.value, rel=1e-9, abs=1e-12)
    assert got["nll_base"] == pytest.approx(np.log(self_eval.base.ppl.value), rel=1e-9)
    # the thread count changes neither the quantized weights nor the decode
    one = _core.probe_mixes(str(smollm2_f16), small, SMALL_CTX, [a, b], n_threads=1)
    assert list(one["kld"]) == [kld[1], kld[2]]


def test_progress_stops(smollm2_f16: Path, small: np.ndarray) -> None:
    with pytest.raises(_core.CoreError, match=r"^aborted$"):
        _core.probe_mixes(str(smollm2_f16), small, SMALL_CTX, [[]], n_threads=THREADS,
                          progress=lambda d, t: d < SMALL_CHUNKS)

    def interrupt(done: int, total: int) -> None:
        if done >= 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _core.probe_mixes(str(smollm2_f16), small, SMALL_CTX, [[]], n_threads=THREADS, progress=interrupt)


def test_bad_input(smollm2_f16: Path, small: np.ndarray) -> None:
    model = str(smollm2_f16)
    tokens = small[:SMALL_CTX]  # one chunk: the checks run once the first chunk has shown the graph
    with pytest.raises(_core.InputError, match=r"^tensor nope\.weight is not used by the model's graph$"):
        _core.probe_mixes(model, tokens, SMALL_CTX, [[], [("nope.weight", Q4_0, None)]], n_threads=THREADS)
    with pytest.raises(_core.InputError, match="needs importance data"):
        _core.probe_mixes(model, tokens, SMALL_CTX, [[("blk.0.ffn_down.weight", type_id("IQ2_XXS"), None)]])
    with pytest.raises(_core.InputError, match="importance has 7 values, expected 576"):
        _core.probe_mixes(model, tokens, SMALL_CTX, [[("blk.0.attn_q.weight", Q4_0, np.ones(7, np.float32))]])
    with pytest.raises(_core.InputError, match="do not split into"):
        _core.probe_mixes(model, tokens, SMALL_CTX, [[("blk.0.attn_k.weight", type_id("Q4_K"), None)]])
    with pytest.raises(_core.InputError, match="appears twice"):
        _core.probe_mixes(model, tokens, SMALL_CTX, [[("blk.0.attn_q.weight", Q4_0), ("blk.0.attn_q.weight", Q8_0)]])
    with pytest.raises(_core.InputError, match="whole chunks"):
        _core.probe_mixes(model, tokens[:-1], SMALL_CTX, [[]])
    with pytest.raises(_core.InputError, match="expected a list"):
        _core.probe_mixes(model, tokens, SMALL_CTX, [[("blk.0.attn_q.weight",)]])
    q4_1 = str(data.fetch(data.SMOLLM2_Q4_1))
    with pytest.raises(_core.InputError,
                       match=r"^probing needs a full-precision model \(blk\.0\.attn_q\.weight is q4_1\)$"):
        _core.probe_mixes(q4_1, tokens, SMALL_CTX, [[("blk.0.attn_q.weight", Q4_0, None)]], n_threads=THREADS)
