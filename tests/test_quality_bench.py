"""benchmarks/quality.py, recipe and evaluation halves (llqx's target mode is tested where it lives)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

import llqx

REPO = Path(__file__).resolve().parent.parent


def _load_bench() -> object:
    spec = importlib.util.spec_from_file_location("quality_bench", REPO / "benchmarks" / "quality.py")
    assert spec is not None
    assert spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["quality_bench"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_quick_recipe_run(smollm2_f16: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = _load_bench()
    out_dir, work = tmp_path / "results", tmp_path / "work"
    rc = bench.main(
        [  # type: ignore[attr-defined]
            str(smollm2_f16),
            "--name",
            "smol",
            "--recipes",
            "Q4_0,Q8_0",
            "--skip-llqx",
            "--eval-tokens",
            "200",
            "--eval-ctx",
            "128",
            "--calib-chunks",
            "2",
            "--calib-ctx",
            "128",
            "-t",
            "2",
            "--quiet",
            "--no-eval-cache",
            "--out-dir",
            str(out_dir),
            "--work-dir",
            str(work),
        ]
    )
    assert rc == 0
    doc = json.loads((out_dir / "smol.json").read_text())
    assert doc["eval"]["quick_run"] is True
    assert doc["eval"]["scored_tokens"] == 4 * 63  # ceil(200 / 63) chunks of 128
    assert (work / "imatrix-c4.gguf").is_file()
    pts = {p["recipe"]: p for p in doc["points"]}
    assert set(pts) == {"Q4_0", "Q8_0"}
    for r, p in pts.items():
        assert p["recipe_bpw"] == pytest.approx(llqx.inspect(work / f"smol-{r}.gguf").bpw)
        assert p["llqx_bpw"] is None
        assert p["llqx_kld"] is None
    # more bits, less divergence: Q8_0 is an order of magnitude closer to the base than Q4_0
    assert pts["Q8_0"]["recipe_bpw"] > pts["Q4_0"]["recipe_bpw"]
    assert 0 < 10 * pts["Q8_0"]["recipe_kld"] < pts["Q4_0"]["recipe_kld"]
    md = (out_dir / "smol.md").read_text()
    assert "Quick run: only 252 scored tokens" in md
    assert "| Q4_0 |" in md
    assert (out_dir / "smol.png").read_bytes()[:4] == b"\x89PNG"
    assert "Quick run" in capsys.readouterr().out


def test_reuse_keeps_llqx_quants_and_adds_sizes(smollm2_f16: Path, tmp_path: Path) -> None:
    """--reuse: a second run with one more recipe remakes nothing of the first (files untouched, same
    evaluations) and makes only the new size."""
    bench = _load_bench()
    out_dir, work = tmp_path / "results", tmp_path / "work"

    def run(recipes: str) -> dict[str, object]:
        rc = bench.main(  # type: ignore[attr-defined]
            [str(smollm2_f16), "--name", "smol", "--recipes", recipes, "--calibrate", "0", "--eval-tokens", "126",
             "--eval-ctx", "128", "--calib-chunks", "2", "--calib-ctx", "128", "-t", "2", "--quiet",
             "--no-eval-cache", "--reuse", "--out-dir", str(out_dir), "--work-dir", str(work)]
        )
        assert rc == 0
        return json.loads((out_dir / "smol.json").read_text())

    first = run("Q4_0")
    llqx_file = work / str(first["points"][0]["llqx_file"])  # type: ignore[index]
    made = llqx_file.stat().st_mtime_ns
    second = run("Q4_0,Q8_0")
    assert llqx_file.stat().st_mtime_ns == made
    pts = {p["recipe"]: p for p in second["points"]}  # type: ignore[union-attr]
    assert pts["Q4_0"]["llqx_kld"] == first["points"][0]["llqx_kld"]  # type: ignore[index]
    assert pts["Q4_0"]["llqx_quantize_s"] == first["points"][0]["llqx_quantize_s"]  # type: ignore[index]
    assert pts["Q8_0"]["llqx_bpw"] == pytest.approx(pts["Q8_0"]["recipe_bpw"], abs=1e-3)
    assert 0 < pts["Q8_0"]["llqx_kld"] < pts["Q4_0"]["llqx_kld"]
