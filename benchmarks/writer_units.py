"""Which local unit prices a residual writer's error alike in every layer (docs/method.md, §5b).

For parts of the layer bands (the writers at the massive activations and their neighbours), each part's
writers are quantized to Q3_K alone and probed on calibration text (KL divergence to the unchanged model),
and scored under two local units: the absolute error (E[x²] and the mean) and the stream error (each token
relative to the stream the writer adds to: the imatrix's stream sums). A unit that holds across layers
needs the same factor KLD / Σ local error for every part of a kind.

    python benchmarks/writer_units.py qwen-coder-rotated --imatrix IMATRIX --chunks 2

Writes ``<out-dir>/writer_units-<name>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

import llqx
from llqx import _core, data
from llqx.estimator import combine_experts
from llqx.imatrix import Imatrix
from llqx.probe import Calibration, measure_mixes
from llqx.score_metric import score_job
from scoring_accuracy import ALIASES

REPO = Path(__file__).resolve().parent.parent
# Qwen2.5-Coder-1.5B: layers 1, 2 and 26 write the massive activations; attn_output of layer 0 is the
# part the absolute unit prices worst
QWEN_PARTS = "ffn_down:1;ffn_down:2;ffn_down:3-9;ffn_down:26;ffn_down:19-25,27;attn_output:0;attn_output:3-9"
PROBE = "Q3_K"


def parse_parts(spec: str) -> list[tuple[str, list[int]]]:
    """'ffn_down:1;ffn_down:19-25,27' -> [('ffn_down', [1]), ('ffn_down', [19, ..., 25, 27])]."""
    out = []
    for part in spec.split(";"):
        kind, _, layers = part.partition(":")
        ids: list[int] = []
        for r in layers.split(","):
            a, _, b = r.partition("-")
            ids += list(range(int(a), int(b or a) + 1))
        out.append((kind, ids))
    return out


def local_errors(model: Path, im: Imatrix, names: list[str], threads: int) -> dict[str, tuple[float, float]]:
    """Per writer at the probe type: (absolute error, stream error), from the scorer's usual row sample."""
    info = llqx.inspect(model)
    tid = _core.type_from_name(PROBE)
    jobs, widths = [], []
    for n in names:
        job, w, streamed = score_job(im, info.tensor(n), [tid], False)
        if not streamed:
            sys.exit(f"{n} has no stream sums in the imatrix: collect it with this llqx")
        jobs.append(job)
        widths.append(len(w))
    _, res = _core.score_run(str(model), jobs, nthread=threads)
    out = {}
    for n, v, nn in zip(names, res, widths, strict=True):
        errors, _, rest = combine_experts(np.asarray(v), 1, np.ones(1))
        out[n] = (errors[0], rest[2 * nn])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="alias (" + ", ".join(ALIASES) + ") or a GGUF path (F16/BF16/F32)")
    ap.add_argument("--imatrix", required=True, help="an imatrix made by llqx (with stream sums)")
    ap.add_argument("--parts", default=QWEN_PARTS, help="kind:layers;... (default: Qwen2.5-Coder-1.5B's)")
    ap.add_argument("--chunks", type=int, default=2, help="calibration chunks of 512 tokens of c4 (default 2)")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--name", default=None, help="result name (default: the alias or model file stem)")
    ap.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args(argv)

    model = Path(ALIASES[args.model]() if args.model in ALIASES else args.model)
    name = args.name or (args.model if args.model in ALIASES else model.stem)
    im = Imatrix.load(args.imatrix)
    parts = parse_parts(args.parts)
    members = [[f"blk.{i}.{kind}.weight" for i in layers] for kind, layers in parts]
    local = local_errors(model, im, sorted({n for m in members for n in m}), args.threads)
    text = Path(args.out_dir) / f".writer_units-{name}-c4.txt"
    text.parent.mkdir(parents=True, exist_ok=True)
    text.write_text(data.text("c4").read_text(encoding="utf-8")[: args.chunks * 512 * 8], encoding="utf-8")
    try:
        tid = _core.type_from_name(PROBE)
        klds = measure_mixes(model, [[(n, tid) for n in m] for m in members], im,
                             Calibration(text, chunks=args.chunks, threads=args.threads))
    finally:
        text.unlink(missing_ok=True)

    rows = []
    for (kind, layers), m, kld in zip(parts, members, klds, strict=True):
        absolute = sum(local[n][0] for n in m)
        stream = sum(local[n][1] for n in m)
        rows.append({"kind": kind, "layers": layers, "kld": kld, "absolute": absolute, "stream": stream,
                     "factor_absolute": kld / absolute, "factor_stream": kld / stream})
    spread = {}
    for kind in sorted({k for k, _ in parts}):
        f = [r for r in rows if r["kind"] == kind]
        spread[kind] = {u: max(r[f"factor_{u}"] for r in f) / min(r[f"factor_{u}"] for r in f)
                        for u in ("absolute", "stream")}
    doc = {"model": str(model), "imatrix": str(args.imatrix), "probe": PROBE, "calibration": f"c4, {args.chunks}x512",
           "parts": rows, "spread": spread}
    out = Path(args.out_dir) / f"writer_units-{name}"
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1), encoding="utf-8")
    lines = [f"# Writer units on {name} ({PROBE} probes, c4 {args.chunks}x512)", "",
             "| part | KLD | factor, absolute | factor, stream |", "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['kind']} {','.join(map(str, r['layers']))} | {r['kld']:.5f} | "
                     f"{r['factor_absolute']:.3g} | {r['factor_stream']:.3g} |")
    lines += ["", "Spread of the factor within a kind (largest / smallest):", ""]
    lines += [f"- {k}: absolute {v['absolute']:.2f}x, stream {v['stream']:.2f}x" for k, v in spread.items()]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
