"""How close the scorer's sampled estimate comes to the exact error, per tensor and type.

Scores the model twice through ``llqx.score``: with the default row sample, and with every row (the exact
expected squared output error and energy of each tensor). Reports per type the spread of
estimate ÷ exact over the tensors (median, 90th percentile and largest deviation) and the worst tensors.
Run it with two builds of llqx to compare two samplers on the same model (the JSON names the version).

    python benchmarks/scoring_accuracy.py smollm2 --imatrix IM.gguf [--types Q3_K,Q4_K] [--tensors REGEX]

The committed results used imatrices from `llqx imatrix` on 16×512 tokens of c4 (32×512 for the rotated
SmolLM2, the one `quality.py smollm2-rotated` made) and --types Q4_0,IQ4_NL,Q3_K.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np

import llqx
from llqx import data
from llqx.scoring import score
from llqx.types import ggml_type

REPO = Path(__file__).resolve().parent.parent
ALIASES = {
    "smollm2": data.smollm2_f16,
    "smollm2-moe": data.smollm2_moe_f16,
    "smollm2-rotated": data.smollm2_rotated_f16,
    "qwen-coder": data.qwen_coder_f16,
    "qwen-coder-rotated": data.qwen_coder_rotated_f16,
}


def raw_scores(model: Path, imatrix: Path, names: list[str], types: list[int], sample: int | None,
               threads: int) -> dict[str, tuple[list[float], float]]:
    """Per tensor: its raw expected squared output error per type (in ``types`` order) and its energy."""
    s = score(model, imatrix, nthread=threads, sample_elements=sample, candidates="window", progress=False)
    need = {n: [t for t in types if t in s.candidates[n]] for n in names}
    s.ensure_scored({n: ts for n, ts in need.items() if ts})
    assert s.state is not None
    out = {}
    for n in names:
        if not need[n]:
            continue  # none of the types fits this tensor (width) or it needs no score
        held = s.state.tensors[n]
        errors = [held.error_of(ggml_type(t).name) for t in types]
        out[n] = ([float("nan") if e is None else e for e in errors], held.energy)
    return out


def spread(ratios: np.ndarray) -> dict[str, float]:
    dev = np.abs(ratios - 1.0)
    return {"median_abs_dev": float(np.median(dev)), "p90_abs_dev": float(np.quantile(dev, 0.9)),
            "max_abs_dev": float(dev.max()), "tensors": int(ratios.size)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="alias (" + ", ".join(ALIASES) + ") or a GGUF path (F16/BF16/F32)")
    ap.add_argument("--imatrix", required=True, help="the imatrix the scorer weighs errors with")
    ap.add_argument("--types", default="Q3_K,Q4_K", help="candidate types to compare (default Q3_K,Q4_K)")
    ap.add_argument("--tensors", default=".", help="regex over tensor names (default: all)")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--name", default=None, help="result name (default: the alias or model file stem)")
    ap.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args(argv)

    model = Path(ALIASES[args.model]() if args.model in ALIASES else args.model)
    info = llqx.inspect(model)
    pattern = re.compile(args.tensors)
    types = [ggml_type(t).id for t in args.types.split(",")]
    probe = score(model, args.imatrix, candidates="window", progress=False)
    names = [n for n in probe.candidates if pattern.search(n) and any(t in probe.candidates[n] for t in types)]
    every_row = max(info.tensor(n).n_elements for n in names)

    t0 = time.perf_counter()
    sampled = raw_scores(model, Path(args.imatrix), names, types, None, args.threads)
    t1 = time.perf_counter()
    exact = raw_scores(model, Path(args.imatrix), names, types, every_row, args.threads)
    t2 = time.perf_counter()

    result: dict[str, object] = {
        "model": str(model), "imatrix": str(args.imatrix), "llqx": llqx.__version__, "tensors": args.tensors,
        "seconds": {"sampled": t1 - t0, "every_row": t2 - t1},
        "energy": spread(np.array([sampled[n][1] / exact[n][1] for n in names if exact[n][1] > 0])),
        "types": {},
    }
    for i, t in enumerate(types):
        pairs = [(n, sampled[n][0][i] / exact[n][0][i]) for n in names
                 if exact[n][0][i] == exact[n][0][i] and exact[n][0][i] > 0]
        ratios = np.array([r for _, r in pairs])
        if ratios.size == 0:
            continue  # the type fits none of these tensors
        worst = sorted(pairs, key=lambda p: -abs(p[1] - 1.0))[:5]
        result["types"][ggml_type(t).name] = {**spread(ratios), "worst": [[n, r] for n, r in worst]}  # type: ignore[index]

    name = args.name or (args.model if args.model in ALIASES else model.stem)
    out = Path(args.out_dir) / f"scoring_accuracy-{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"energy (sampled / every row): {result['energy']}")
    for tname, r in result["types"].items():  # type: ignore[attr-defined]
        print(f"{tname}: median |dev| {r['median_abs_dev']:.4f}, p90 {r['p90_abs_dev']:.4f}, "
              f"max {r['max_abs_dev']:.4f} over {r['tensors']} tensors; worst {r['worst'][0]}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
