"""`llqx plot`: plan heat map and state curves from real quantization data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import matplotlib  # noqa: F401  (the llqx[plot] extra: these tests need it and fail, not skip, without it)
import numpy as np
import pytest

import llqx
from llqx import _core, cli
from llqx.plot import fill_bytes, parse_plan, parse_state

PNG = b"\x89PNG\r\n\x1a\n"


def _png_size(path: Path) -> tuple[int, int]:
    raw = path.read_bytes()
    assert raw[:8] == PNG
    return int.from_bytes(raw[16:20], "big"), int.from_bytes(raw[20:24], "big")


@pytest.fixture(scope="module")
def q3_k_m(tmp_path_factory: pytest.TempPathFactory, llama_quantize: Path, smollm2_f16: Path) -> Path:
    out = tmp_path_factory.mktemp("plotq") / "smollm2-Q3_K_M.gguf"
    proc = subprocess.run(
        [str(llama_quantize), str(smollm2_f16), str(out), "Q3_K_M", "2"], capture_output=True
    )
    assert proc.returncode == 0
    return out


def test_plan_heatmap_from_a_real_mix(q3_k_m: Path, tmp_path: Path) -> None:
    info = llqx.inspect(q3_k_m)
    plan = [
        {"name": t.name, "type": t.type_name, "bpw": 8 * t.nbytes / t.n_elements, "n_elements": t.n_elements}
        for t in info.tensors
        if len(t.shape) >= 2 and t.name.endswith("weight")
    ]
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"version": 1, "tensors": plan}), encoding="utf-8")
    entries = parse_plan(json.loads(path.read_text()))
    assert len(entries) == len(plan)
    assert len({e.type for e in entries}) >= 3  # a real mix: K types and the width fallbacks
    out = tmp_path / "plan.png"
    assert cli.main(["plot", str(path), "-o", str(out), "-q"]) == 0
    w, h = _png_size(out)
    assert w > 400
    assert h > 400
    # the other accepted layouts give the same entries
    by_name = {e["name"]: e["type"] for e in plan}
    alt = parse_plan(by_name)
    assert [(e.name, e.type) for e in alt] == [(e.name, e.type) for e in entries]
    assert alt[0].bpw == pytest.approx(llqx.ggml_type(alt[0].type).bpw)


def test_state_curves_from_real_errors(smollm2_f16: Path, tmp_path: Path) -> None:
    reader = gguf.GGUFReader(str(smollm2_f16))
    wanted = {"blk.0.attn_v.weight", "blk.0.ffn_down.weight", "blk.15.ffn_down.weight"}
    state: dict[str, object] = {}
    for t in reader.tensors:
        if t.name not in wanted:
            continue
        w = np.asarray(t.data, dtype=np.float32).reshape(-1, int(t.shape[0]))[:64]
        cands = []
        for name in ("Q4_0", "Q5_0", "Q8_0", "Q4_K", "Q6_K"):
            ty = llqx.ggml_type(name)
            if w.shape[1] % ty.block_size:
                continue
            q = _core.quantize_rows(ty.id, w)
            d = np.asarray(_core.dequantize_rows(ty.id, q, w.shape[1])).reshape(w.shape)
            cands.append(
                {"type": name, "bytes": int(q.size), "error": float(((d - w) ** 2).sum() / (w**2).sum())}
            )
        state[t.name] = {"candidates": cands}
    assert len(state) == 3
    curves = parse_state({"version": 3, "tensors": state})
    # sorted by bytes: the smallest type (Q4_0) errs most, the largest (Q8_0) least
    for cs in curves.values():
        errs = [c.error for c in cs]
        assert cs[0].type == "Q4_0"
        assert errs[0] == max(errs)
        assert cs[-1].type == "Q8_0"
        assert errs[-1] == min(errs)
    path = tmp_path / "state.json"
    path.write_text(json.dumps(state), encoding="utf-8")
    out = tmp_path / "curves.png"
    assert cli.main(["plot", str(path), "-o", str(out), "--tensor", r"ffn_down", "-q"]) == 0
    assert _png_size(out)[0] > 400
    assert cli.main(["plot", str(path), "-o", str(out), "--tensor", "nothing_like_this"]) == 1

    # the llqx state file's layout: parallel type/error lists, bytes from the model's shapes
    llqx_state = {
        "format": "llqx-state",
        "key": {"candidates": {}},
        "tensors": {
            n: {
                "types": [c["type"] for c in v["candidates"]],  # type: ignore[index]
                "errors": [c["error"] for c in v["candidates"]],
                "rows": 64,
            }  # type: ignore[index]
            for n, v in state.items()
        },
    }
    curves2 = parse_state(llqx_state)
    assert all(c.bytes is None for cs in curves2.values() for c in cs)
    fill_bytes(curves2, smollm2_f16)
    info = llqx.inspect(smollm2_f16)
    for name, cs in curves2.items():
        n_rows = info.tensor(name).n_rows
        sampled = {c["type"]: c["bytes"] for c in state[name]["candidates"]}  # type: ignore[index]
        assert {c.type: c.bytes for c in cs} == {t: b // 64 * n_rows for t, b in sampled.items()}
    path.write_text(json.dumps(llqx_state), encoding="utf-8")
    assert cli.main(["plot", str(path), "-o", str(out), "-m", str(smollm2_f16), "-q"]) == 0
    assert cli.main(["plot", str(path), "-o", str(out), "-q"]) == 0  # nominal bpw axis without the model


def test_plot_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    assert cli.main(["plot", str(bad)]) == 1
    assert "not a JSON plan or state" in " ".join(capsys.readouterr().err.split())
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"version": 1}), encoding="utf-8")
    assert cli.main(["plot", str(empty)]) == 1
    assert "neither a plan" in " ".join(capsys.readouterr().err.split())
    plan = tmp_path / "p.json"
    plan.write_text(json.dumps([{"name": "blk.0.attn_q.weight", "type": "Q4_K"}]), encoding="utf-8")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as on an install without the [plot] extra
    assert cli.main(["plot", str(plan)]) == 1
    assert "pip install 'llqx[plot]'" in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "p.png").exists()
