"""bpw accounting over a ladder of targets: planned bpw (dry run) for each, one real write checked.

    python benchmarks/target_bpw_sweep.py --model M.gguf --imatrix IM.gguf --state S.llqx-state \
        [--targets 2.5,3.0,...] [--write 4.0]

Reuses the state file of a previous run (e.g. benchmarks/target_speed.py --workdir), so it costs no
scoring. Writes benchmarks/results/target_bpw_sweep.json (merged by model name).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "python"))

import llqx  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--imatrix", type=Path, required=True)
    ap.add_argument("--state", type=Path, required=True)
    ap.add_argument("--targets", default="2.5,3.0,3.5,4.0,4.5,5.0,6.0,7.0")
    ap.add_argument("--write", type=float, default=4.0, help="target to write for real (0: none)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "target_bpw_sweep.json")
    args = ap.parse_args()

    scores = llqx.score(args.model, args.imatrix, state=args.state, nthread=args.threads, progress=False)
    rows = []
    for t in (float(x) for x in args.targets.split(",")):
        try:
            plan = scores.plan(target_bpw=t)
            rows.append(
                {"target": t, "planned_bpw": plan.bpw, "gap": t - plan.bpw, "file_size": plan.file_size}
            )
        except llqx.LlqxError as exc:
            rows.append({"target": t, "error": str(exc)})
    written = None
    if args.write:
        plan = scores.plan(target_bpw=args.write)
        with tempfile.TemporaryDirectory(dir=args.state.parent) as d:
            out = Path(d) / "sweep-write.gguf"
            t0 = time.monotonic()
            llqx.quantize(args.model, out, plan=plan, imatrix=args.imatrix, nthread=args.threads)
            info = llqx.inspect(out)
            written = {
                "target": args.write,
                "planned_bpw": plan.bpw,
                "file_bpw": info.bpw,
                "planned_size": plan.file_size,
                "file_size": info.file_size,
                "write_s": round(time.monotonic() - t0, 1),
            }
    doc = json.loads(args.results.read_text(encoding="utf-8")) if args.results.exists() else {}
    doc[args.model.name] = {
        "targets": rows,
        "written": written,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(doc[args.model.name], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
