"""Speed and memory of `--target-bpw` against plain upstream llama-quantize Q4_K_M, same model and threads.

One invocation measures, under /usr/bin/time -v and --repeat times in turn (medians reported):
  1. upstream llama-quantize --imatrix IM MODEL out Q4_K_M T            (the baseline)
  2. llqx target mode, cold (fresh state file), at the bpw upstream's Q4_K_M landed on
  3. llqx target mode, warm (same state file: no scoring)
  4. upstream llama-quantize writing llqx's mix (--pure, one anchored --tensor-type-file entry per
     tensor, base Q8_0): what llama.cpp alone takes for the types llqx chose, so warm ÷ this is
     llqx's own overhead (quantizing some types, e.g. Q4_1 with an imatrix, is 4x slower than others)
With --calibration-chunks N the llqx runs measure sensitivities on N chunks of c4 (--calibration-file):
cold then includes the probes (one forward pass per tensor group), warm takes them from the state file.
With --imatrix-sensitivity-chunks N the imatrix is llqx's, made with `llqx imatrix --sensitivity-chunks N`
(4 chunks of 512 tokens of c4, the probes on the first N): the llqx runs plan with the measured
sensitivities it carries and no calibration text, and the imatrix pass itself is timed against
llama-imatrix on the same chunks (ratio_imatrix_pass).
and writes ratios (wall time and peak RSS, llqx ÷ upstream) to benchmarks/results/target_speed.json
(merged by model name). Goals: cold ≤ 2.0, warm ≤ 1.1, RSS ≤ 1.25 (against Q4_K_M). Also measured: the
seconds llama.cpp takes to build the candidate IQ types' lookup grids, and from it the floor of both
ratios (grid set-up + upstream writing llqx's mix; the write alone when warm).

    python benchmarks/target_speed.py --model M.gguf [--imatrix IM.gguf] [--threads 2] [--repeat 3]
    [--candidates window|all] [--calibration-chunks N] [--imatrix-sensitivity-chunks N]
    [--llqx-root OLD/python] [--results R.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "python"))

import llqx  # noqa: E402
from llqx import data  # noqa: E402
from llqx.llama_rules import tensor_is_quantizable  # noqa: E402
from llqx.plan import anchored_pattern  # noqa: E402

# child processes import the same llqx as this script (installed, or python/ of a dev build)
LLQX_ROOT = str(Path(data.__file__).resolve().parent.parent)


def tool(name: str) -> Path:
    for c in (os.environ.get("LLQX_UPSTREAM_BIN", ""), str(REPO / "build" / "dev" / "bin")):
        p = Path(c) / name
        if c and p.is_file():
            return p
    raise SystemExit(f"upstream {name} not found (build/dev/bin or $LLQX_UPSTREAM_BIN)")


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB) of one command, from /usr/bin/time -v."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
        t0 = time.monotonic()
        proc = subprocess.run(
            ["/usr/bin/time", "-v", "-o", tf.name, *cmd], env=env, capture_output=True, text=True
        )
        wall = time.monotonic() - t0
        if proc.returncode != 0:
            raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
        rss = int(
            re.search(r"Maximum resident set size \(kbytes\): (\d+)", Path(tf.name).read_text()).group(1)
        )
    return wall, rss


def llqx_imatrix(model: Path, work: Path, threads: int, probe_chunks: int, root: str) -> tuple[Path, dict[str, object]]:
    """llqx imatrix with measured sensitivities, and llama-imatrix on the same 4×512 tokens, both timed."""
    calib = work / "calib.txt"
    calib.write_text(data.text("c4").read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    common = ["-m", str(model), "-f", str(calib), "-c", "512", "--chunks", "4", "-t", str(threads)]
    up_wall, up_rss = timed([str(tool("llama-imatrix")), *common, "-o", str(work / "upstream-imatrix.gguf")])
    out = work / "llqx-imatrix.gguf"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    wall, rss = timed([sys.executable, "-m", "llqx.cli", "imatrix", *common, "--sensitivity-chunks",
                       str(probe_chunks), "--quiet", "-o", str(out)], env)
    return out, {"chunks": 4, "ctx": 512, "sensitivity_chunks": probe_chunks,
                 "llama_imatrix": {"wall_s": round(up_wall, 2), "peak_rss_kib": int(up_rss)},
                 "llqx_imatrix": {"wall_s": round(wall, 2), "peak_rss_kib": int(rss)},
                 "ratio_imatrix_pass": round(wall / up_wall, 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="F16 GGUF (default: the SmolLM2 fixture)")
    ap.add_argument(
        "--imatrix", type=Path, default=None, help="imatrix (default: made with llama-imatrix on c4)"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each command, in turn (medians)")
    ap.add_argument(
        "--candidates", choices=("window", "all"), default=None, help="llqx's --candidates (default: its own)"
    )
    ap.add_argument(
        "--calibration-chunks", type=int, default=0,
        help="measure sensitivities on this many chunks of c4 in the llqx runs (default: none)",
    )
    ap.add_argument(
        "--imatrix-sensitivity-chunks", type=int, default=0,
        help="make the imatrix with llqx imatrix --sensitivity-chunks N and time it (default: llama-imatrix)",
    )
    ap.add_argument(
        "--llqx-root",
        default=LLQX_ROOT,
        help="the folder holding the llqx package the timed runs import (e.g. an older build's python/)",
    )
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "target_speed.json")
    args = ap.parse_args()

    model = args.model or data.smollm2_f16()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="llqx-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    imatrix = args.imatrix
    imatrix_pass: dict[str, object] = {}
    if args.imatrix_sensitivity_chunks > 0:
        imatrix, imatrix_pass = llqx_imatrix(model, work, args.threads, args.imatrix_sensitivity_chunks,
                                             args.llqx_root)
    if imatrix is None:
        calib = work / "calib.txt"
        calib.write_text(data.text("c4").read_text(encoding="utf-8")[:40_000], encoding="utf-8")
        imatrix = work / "imatrix.gguf"
        subprocess.run(
            [
                str(tool("llama-imatrix")),
                "-m",
                str(model),
                "-f",
                str(calib),
                "-c",
                "256",
                "--chunks",
                "4",
                "-t",
                str(args.threads),
                "-o",
                str(imatrix),
            ],
            check=True,
            capture_output=True,
        )

    up_out = work / "upstream-q4_k_m.gguf"
    upstream = [
        str(tool("llama-quantize")),
        "--imatrix",
        str(imatrix),
        str(model),
        str(up_out),
        "Q4_K_M",
        str(args.threads),
    ]
    subprocess.run(upstream, check=True, capture_output=True)
    target = round(llqx.inspect(up_out).bpw, 4)
    up_out.unlink()

    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([args.llqx_root, os.environ.get("PYTHONPATH", "")])
    )
    state = work / "bench.llqx-state"
    out = work / "llqx-target.gguf"
    cmd = [
        sys.executable,
        "-c",
        "import sys; from llqx.cli.quantize import main; sys.exit(main())",
        "--imatrix",
        str(imatrix),
        "--target-bpw",
        str(target),
        "--state-file",
        str(state),
        *(["--candidates", args.candidates] if args.candidates else []),
        *(
            ["--calibration-file", str(data.text("c4")), "--calibration-chunks", str(args.calibration_chunks)]
            if args.calibration_chunks > 0
            else []
        ),
        "--quiet",
        str(model),
        str(out),
        "Q8_0",
        str(args.threads),
    ]
    mix = work / "llqx-mix.txt"
    mix_out = work / "upstream-mix.gguf"
    same_mix = [
        str(tool("llama-quantize")),
        "--imatrix",
        str(imatrix),
        "--pure",
        "--tensor-type-file",
        str(mix),
        str(model),
        str(mix_out),
        "Q8_0",
        str(args.threads),
    ]
    runs: dict[str, list[tuple[float, int]]] = {"upstream": [], "cold": [], "warm": [], "same_mix": []}
    got = 0.0
    for _ in range(args.repeat):
        runs["upstream"].append(timed(upstream))
        up_out.unlink()
        state.unlink(missing_ok=True)
        runs["cold"].append(timed(cmd, env))
        info = llqx.inspect(out)
        got = info.bpw
        arch = info.architecture
        mix.write_text(
            "".join(
                f"{anchored_pattern(t.name)}={t.type_name}\n"
                for t in info.tensors
                if tensor_is_quantizable(t.name, len(t.shape), arch)
            ),
            encoding="utf-8",
        )
        out.unlink()
        runs["warm"].append(timed(cmd, env))
        written = {t.name: t.type for t in llqx.inspect(out).tensors}
        out.unlink()
        runs["same_mix"].append(timed(same_mix))
        if {t.name: t.type for t in llqx.inspect(mix_out).tensors} != written:
            raise SystemExit("upstream did not write llqx's mix: the same-mix baseline is not comparable")
        mix_out.unlink()

    # llama.cpp's own share of a cold run: building the lookup grids of the candidate IQ types (inside
    # ggml's global lock, which every ggml_quantize_chunk call takes, so nothing overlaps it), then
    # writing the chosen mix (same_mix): no implementation on llama.cpp's quantizers goes below it
    scores = llqx.score(model, imatrix, state=state, nthread=args.threads, progress=False)  # the state: no scoring
    grid = sorted({t for c in scores.candidates.values() for t in c if llqx.ggml_type(t).has_grid})
    del scores
    init_runs: list[float] = []
    for _ in range(args.repeat):
        code = (
            "import time; from llqx import _core; t0 = time.perf_counter(); "
            f"[_core.quantize_init(t) for t in {grid!r}]; print(time.perf_counter() - t0)"
        )
        proc = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True)
        init_runs.append(float(proc.stdout))
    grid_init = statistics.median(init_runs)

    def med(k: str, i: int) -> float:
        return statistics.median(r[i] for r in runs[k])

    up_wall, up_rss = med("upstream", 0), med("upstream", 1)
    cold_wall, cold_rss = med("cold", 0), med("cold", 1)
    warm_wall, warm_rss = med("warm", 0), med("warm", 1)
    mix_wall, mix_rss = med("same_mix", 0), med("same_mix", 1)
    row = {
        "model": Path(model).name,
        "threads": args.threads,
        "candidates": args.candidates or "default",
        "calibration_chunks": args.calibration_chunks,
        "llqx_root": args.llqx_root,
        "repeat": args.repeat,
        "target_bpw": target,
        "achieved_bpw": got,
        "upstream_q4_k_m": {"wall_s": round(up_wall, 2), "peak_rss_kib": int(up_rss)},
        "llqx_cold": {"wall_s": round(cold_wall, 2), "peak_rss_kib": int(cold_rss)},
        "llqx_warm": {"wall_s": round(warm_wall, 2), "peak_rss_kib": int(warm_rss)},
        "upstream_same_mix": {"wall_s": round(mix_wall, 2), "peak_rss_kib": int(mix_rss)},
        "runs_wall_s": {k: [round(w, 2) for w, _ in v] for k, v in runs.items()},
        "ratio_cold_time": round(cold_wall / up_wall, 3),
        "ratio_warm_time": round(warm_wall / up_wall, 3),
        "ratio_cold_rss": round(cold_rss / up_rss, 3),
        "ratio_warm_rss": round(warm_rss / up_rss, 3),
        "ratio_mix_time": round(mix_wall / up_wall, 3),
        "ratio_warm_vs_same_mix": round(warm_wall / mix_wall, 3),
        "ratio_cold_vs_same_mix": round(cold_wall / mix_wall, 3),
        "grid_types": [llqx.ggml_type(t).name for t in grid],
        "grid_init_s": round(grid_init, 2),
        "ratio_grid_init": round(grid_init / up_wall, 3),
        # the least a cold / warm run can take ÷ upstream Q4_K_M: grid set-up + writing the mix / the write
        "ratio_floor_cold": round((grid_init + mix_wall) / up_wall, 3),
        "ratio_floor_warm": round(mix_wall / up_wall, 3),
        **({"imatrix_pass": imatrix_pass} if imatrix_pass else {}),
        "goals": {"cold_time": 2.0, "warm_time": 1.1, "rss": 1.25},
        "load_average_1min": os.getloadavg()[0],
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    doc = json.loads(args.results.read_text(encoding="utf-8")) if args.results.exists() else {}
    suffix = f"+calibration{args.calibration_chunks}" if args.calibration_chunks else ""
    suffix += f"+imatrix-sensitivities{args.imatrix_sensitivity_chunks}" if args.imatrix_sensitivity_chunks else ""
    suffix += f"+{args.candidates}" if args.candidates else ""
    doc[row["model"] + suffix] = row
    args.results.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(row, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
