"""The binding layer's type table and row codecs against gguf-py and upstream llama-quantize."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest

from llqx import FILE_TYPES, LlqxError, _core, file_type, ggml_type, ggml_types

N_PER_ROW = 256


def _gguf_type(type_id: int) -> gguf.GGMLQuantizationType | None:
    try:
        return gguf.GGMLQuantizationType(type_id)
    except ValueError:
        return None


def test_type_table_matches_gguf_py() -> None:
    compared = 0
    for t in ggml_types().values():
        q = _gguf_type(t.id)
        if q is None:  # newer than the installed gguf-py
            continue
        assert t.name.upper() == q.name
        block, size = gguf.GGML_QUANT_SIZES[q]
        if q == gguf.GGMLQuantizationType.Q8_1:
            # gguf-py still has the old float-scale layout (4+4+32); ggml stores d and s as fp16.
            # Q8_1 is an internal dot-product type that never appears in a file.
            assert (t.block_size, t.type_size) == (block, size - 4)
        else:
            assert (t.block_size, t.type_size) == (block, size), t.name
        assert t.bpw == pytest.approx(8.0 * t.type_size / t.block_size)
        assert t.row_size(t.block_size * 3) == 3 * t.type_size
        compared += 1
    assert compared >= 30
    assert ggml_type("Q4_K").id == int(gguf.GGMLQuantizationType.Q4_K)
    assert ggml_type("iq2_xxs").name == "iq2_xxs"
    with pytest.raises(LlqxError):
        ggml_type("q9_9")


def _rows(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((8, N_PER_ROW)).astype(np.float32)
    x[:, ::37] *= 6.0  # a few outliers, as real weights have
    return x


@pytest.mark.parametrize("type_id", [t.id for t in ggml_types().values() if t.can_quantize])
def test_round_trip_matches_gguf_py(type_id: int) -> None:
    t = ggml_types()[type_id]
    x = _rows(type_id)
    imatrix = np.abs(np.random.default_rng(1).standard_normal(N_PER_ROW)).astype(np.float32) + 0.1
    q = _core.quantize_rows(t.id, x, imatrix if t.requires_imatrix else None)
    assert q.dtype == np.uint8
    assert q.shape == (x.shape[0], t.row_size(N_PER_ROW))
    ours = _core.dequantize_rows(t.id, q, N_PER_ROW)
    assert ours.shape == x.shape
    rmse = float(np.sqrt(np.mean((ours - x) ** 2)))
    rms = float(np.sqrt(np.mean(x**2)))
    bound = 0.95 if t.bpw < 2.3 else 0.5  # ternary and ~1-2 bit types keep little more than signs
    assert rmse < bound * rms, f"{t.name}: rmse {rmse} of {rms}"
    if t.bpw >= 8:
        assert rmse < 0.01 * rms
    qt = _gguf_type(t.id)
    if qt is None:
        return
    try:
        ref = gguf.quants.dequantize(q.reshape(-1), qt)
    except NotImplementedError:  # gguf-py has no numpy codec for this type (yet): error bound only
        return
    np.testing.assert_array_equal(np.asarray(ref, dtype=np.float32).reshape(x.shape), ours)


def test_more_bits_less_error() -> None:
    x = _rows(7)

    def err(name: str) -> float:
        t = ggml_type(name)
        return float(np.mean((_core.dequantize_rows(t.id, _core.quantize_rows(t.id, x), N_PER_ROW) - x) ** 2))

    assert err("q8_0") < err("q6_K") < err("q4_K") < err("q3_K") < err("q2_K")


def test_imatrix_weights_the_error() -> None:
    """An importance matrix moves error away from the columns it marks as important."""
    t = ggml_type("q4_K")
    x = _rows(3)
    w = np.full(N_PER_ROW, 0.01, dtype=np.float32)
    w[:32] = 100.0
    plain = _core.dequantize_rows(t.id, _core.quantize_rows(t.id, x), N_PER_ROW)
    weighted = _core.dequantize_rows(t.id, _core.quantize_rows(t.id, x, w), N_PER_ROW)
    assert np.mean((weighted - x)[:, :32] ** 2) < np.mean((plain - x)[:, :32] ** 2)


def test_grids_rebuilt_after_free() -> None:
    """quantize_free drops the IQ grids (target mode does, before writing a mix without them); the next
    quantization rebuilds them and gives the same bytes."""
    grid = {t.name for t in ggml_types().values() if t.has_grid}
    assert grid == {"iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s"}
    x = _rows(3)
    w = np.linspace(0.5, 2.0, N_PER_ROW, dtype=np.float32)
    before = {name: _core.quantize_rows(ggml_type(name).id, x, w) for name in sorted(grid)}
    _core.quantize_free()
    for name in sorted(grid):
        assert np.array_equal(_core.quantize_rows(ggml_type(name).id, x, w), before[name]), name


def test_non_quantizable_types_raise() -> None:
    x = _rows(0)
    refused = [t for t in ggml_types().values() if not t.can_quantize]
    assert {"q8_1", "q8_K", "i8", "i32", "f64"} <= {t.name for t in refused}
    for t in refused:
        with pytest.raises(ValueError, match=f"{t.name} cannot be quantized|not a multiple"):
            _core.quantize_rows(t.id, x)
    with pytest.raises(ValueError, match="unknown type id 4"):
        _core.quantize_rows(4, x)  # a retired id (Q4_2)
    with pytest.raises(ValueError, match="requires importance weights"):
        _core.quantize_rows(ggml_type("iq2_xxs").id, x)
    with pytest.raises(ValueError, match="not a multiple of the block size"):
        _core.quantize_rows(ggml_type("q4_0").id, x[:, :100])
    with pytest.raises(ValueError, match="imatrix must be"):
        _core.quantize_rows(ggml_type("q4_0").id, x, np.ones(3, dtype=np.float32))
    with pytest.raises(ValueError, match="whole number of rows"):
        _core.dequantize_rows(ggml_type("q4_0").id, np.zeros(17, dtype=np.uint8), N_PER_ROW)
    assert _core.type_info(4) is None
    assert _core.row_size(ggml_type("q4_K").id, 100) == 0


def test_file_types_match_llama_quantize(llama_quantize: Path) -> None:
    """FILE_TYPES is llama-quantize's table: its usage lists every name with its number, in order."""
    out = subprocess.run([str(llama_quantize)], capture_output=True, text=True).stdout
    table = re.findall(r"^\s+(?:(\d+)\s+or\s+)?(\S+)\s+:\s?(.*)$", out, re.MULTILINE)
    upstream = [(name, int(num) if num else 0, desc) for num, name, desc in table]
    assert [(ft.name, ft.ftype, ft.desc.strip()) for ft in FILE_TYPES] == [
        (n, f, d.strip()) for n, f, d in upstream]


def test_file_type_parsing_as_upstream() -> None:
    assert file_type("q4_k_m").name == "Q4_K_M"
    assert file_type("15").name == "Q4_K"  # the first name for ftype 15, as upstream's output name
    assert file_type(" 15xyz").name == "Q4_K"  # std::stoi ignores what follows the digits
    assert file_type("0").name == "F32"
    assert file_type("copy").name == "COPY"
    assert file_type("99") is None
    assert file_type("Q9_9") is None
    assert file_type("") is None


def test_core_errors_name_the_kind_of_failure(tmp_path: Path) -> None:
    """One Python class per kind of failure, whichever core function meets it."""
    for cls in (_core.LoadError, _core.InputError, _core.CoreError):
        assert issubclass(cls, _core.Error)
    assert issubclass(_core.InputError, ValueError)
    assert issubclass(_core.CoreError, RuntimeError)
    missing = str(tmp_path / "missing.gguf")
    with pytest.raises(_core.LoadError, match="no such file"):
        _core.model_inspect(missing)
    with pytest.raises(_core.LoadError, match="cannot read GGUF"):
        _core.layout_meta_size(missing, [])
    with pytest.raises(_core.LoadError, match="cannot open"):
        _core.score_run(missing, [])
    with pytest.raises(_core.LoadError, match="failed to load model"):
        _core.eval_tokenize(missing, "text")
    p = _core.ImatrixParams()
    p.model_path = missing
    with pytest.raises(_core.LoadError, match="failed to load model"):
        _core.ImatrixCollector(p)
    p.n_ctx = 0
    with pytest.raises(_core.InputError, match="context size"):
        _core.ImatrixCollector(p)
    with pytest.raises(_core.InputError, match="at least 4 tokens"):
        _core.eval_base(missing, np.zeros(2, np.int32), 1, np.zeros(0, np.uint16), np.zeros(0, np.float32), 8, 2)
    with pytest.raises(_core.InputError, match="unknown type id 4"):
        _core.quantize_rows(4, _rows(0))


# llama.cpp's rule for when a tensor cannot be written without importance data, as its sources state it
# (test_requires_imatrix_rule_is_llama_cpps checks these three sets against them)
_WRITER_REFUSES = {"IQ3_XXS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_M", "IQ1_S"}  # tensor_requires_imatrix
_WRITER_EXEMPT = {"token_embd.weight", "per_layer_token_embd.weight", "output.weight"}  # ... but never these
_GGML_ASSERTS = {"IQ2_XXS", "IQ2_XS", "IQ1_S"}  # ggml_quantize_requires_imatrix: ggml_quantize_chunk asserts


@pytest.mark.parametrize(
    "name", ["token_embd.weight", "output.weight", "per_layer_token_embd.weight", "blk.0.attn_q.weight"]
)
def test_tensor_requires_imatrix(name: str) -> None:
    live = ggml_types()
    for type_id in range(_core.type_count()):
        t = live.get(type_id)
        want = t is not None and (
            t.name.upper() in _GGML_ASSERTS or (name not in _WRITER_EXEMPT and t.name.upper() in _WRITER_REFUSES)
        )
        assert _core.tensor_requires_imatrix(name, type_id) is want, (name, type_id)
        if t is not None and name == "blk.0.attn_q.weight":
            assert t.requires_imatrix is want, t.name  # the type table's flag: any tensor but the exempt ones


def test_requires_imatrix_rule_is_llama_cpps() -> None:
    src = Path(
        os.environ.get("LLQX_LLAMA_CPP_DIR") or Path(__file__).resolve().parents[1] / "third_party" / "llama.cpp"
    )
    if not (src / "src" / "llama-quant.cpp").is_file():
        pytest.skip(f"no llama.cpp source tree at {src}")

    def body(text: str, head: str) -> str:
        start = text.index(head)
        return text[start : text.index("\n}\n", start)]

    quant = (src / "src" / "llama-quant.cpp").read_text(encoding="utf-8")
    rule = body(quant, "static bool tensor_requires_imatrix(")
    assert set(re.findall(r"case GGML_TYPE_(\w+):", rule[: rule.index("return true;")])) == _WRITER_REFUSES
    assert "case GGML_TYPE_Q2_K:" in rule  # the one case left out: Q2_K only inside a Q2_K_S file
    assert "LLAMA_FTYPE_MOSTLY_Q2_K_S" in rule
    assert "tensor_name_match_token_embd(tensor_name) || tensor_name_match_output_weight(tensor_name)" in rule
    exempt = body(quant, "static bool tensor_name_match_token_embd(") + body(
        quant, "static bool tensor_name_match_output_weight("
    )
    assert set(re.findall(r'strcmp\(tensor_name, "([^"]+)"\)', exempt)) == _WRITER_EXEMPT
    ggml = (src / "ggml" / "src" / "ggml.c").read_text(encoding="utf-8")
    asserts = body(ggml, "bool ggml_quantize_requires_imatrix(")
    assert set(re.findall(r"type == GGML_TYPE_(\w+)", asserts[: asserts.index(";")])) == _GGML_ASSERTS


def test_activation_rounding_blocks_are_ggml_cpus() -> None:
    """Which 8-bit type ggml's CPU dot product rounds a weight type's input to (its vec_dot_type): Q8_1/Q8_0
    (blocks of 32) for the legacy quants and IQ4_NL, Q8_K (256) for the K-quants and the other IQ types,
    none for float weights."""
    block = {t.name.upper(): t.act_block for t in ggml_types().values()}
    for name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL"):
        assert block[name] == 32, name
    for name in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ2_XS", "IQ3_S", "IQ4_XS"):
        assert block[name] == 256, name
    assert block["F16"] == block["BF16"] == block["F32"] == 0
