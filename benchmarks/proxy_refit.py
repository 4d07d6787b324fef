"""The estimator of this llqx on the quant files of an earlier quality run: their calibrated estimates
against the KL divergence that run measured (its ``.eval.json`` sidecars), as Pearson of logs and Spearman.

The files keep their mixes and measurements; only the estimate is redone (with the imatrix given, which
may carry data the earlier run's did not), so a change of the estimator is seen on the same 18 files.

    python benchmarks/proxy_refit.py qwen-coder --work-dir DIR --name qwen-coder-v4 --imatrix IMATRIX \\
        --calibrate 2

Writes ``<out-dir>/<name>-refit.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import llqx
from llqx.imatrix import Imatrix
from llqx.probe import Calibration
from llqx.sensitivity import calibrate
from quality import ALIASES, calibration_file
from quality_report import log_correlation

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="alias (" + ", ".join(ALIASES) + ") or a GGUF path")
    ap.add_argument("--work-dir", required=True, help="the earlier run's folder (quants and their .eval.json)")
    ap.add_argument("--name", required=True, help="the earlier run's name (its files are <name>-*.gguf)")
    ap.add_argument("--imatrix", required=True, help="the imatrix to estimate with")
    ap.add_argument("--calibrate", type=int, default=2, metavar="N", help="sensitivities on N chunks of c4")
    ap.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args(argv)

    model = Path(ALIASES[args.model].path()) if args.model in ALIASES else Path(args.model)  # type: ignore[operator]
    work = Path(args.work_dir)
    measured: dict[Path, float] = {}
    for f in sorted(work.glob(f"{args.name}-*.gguf")):
        side = f.with_name(f.name + ".eval.json")
        if side.is_file():
            measured[f] = float(json.loads(side.read_text(encoding="utf-8"))["result"]["kld_mean"]["value"])
    mixes = {f: {t.name: t.type for t in llqx.inspect(f).tensors} for f in measured}
    with tempfile.TemporaryDirectory() as tmp:
        scores = llqx.score(model, args.imatrix, state=Path(tmp) / "state.json", progress=False,
                            candidates="window")
        need: dict[str, set[int]] = {}
        for mix in mixes.values():
            for name, tid in mix.items():
                if name in scores.candidates:
                    need.setdefault(name, set()).add(tid)
        scores.ensure_scored({n: sorted(v) for n, v in need.items()})
        cal_text = calibration_file(Path(tmp), args.calibrate)
        if cal_text is not None:
            calibrate(scores, Imatrix.load(args.imatrix), Calibration(cal_text, chunks=args.calibrate))
        estimates = {f: scores.mix_error(m) for f, m in mixes.items()}
    points = [{"file": f.name, "kld": measured[f], "estimate": estimates[f]} for f in measured]
    pairs = [(p["estimate"], p["kld"]) for p in points if p["estimate"] is not None]
    corr = log_correlation(pairs)  # type: ignore[arg-type]
    doc = {"model": str(model), "files_of": args.name, "imatrix": args.imatrix, "calibration_chunks": args.calibrate,
           "llqx": llqx.__version__, "pearson_log": None if corr is None else corr[0],
           "spearman": None if corr is None else corr[1], "points": points}
    out = Path(args.out_dir) / f"{args.name}-refit.json"
    out.write_text(json.dumps(doc, indent=1), encoding="utf-8")
    for p in points:
        print(f"{p['file']:40s} KLD {p['kld']:.4f}  estimate {p['estimate']}")
    print(f"Pearson(log) {doc['pearson_log']}, Spearman {doc['spearman']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
