"""Speed of `llqx imatrix` against upstream `llama-imatrix` (same model, text, chunks, threads).

Runs both tools alternately (ABBA order per repeat, so a drift in machine load hits both alike) and
reports the median ratio of tokens/s, llqx ÷ upstream, two ways:
- wall: tokens / wall-clock seconds of the whole process (model load, tokenizing, Python start-up
  included): what a user waits for;
- loop: tokens / seconds of the chunk loop alone (upstream: from its "computing over" log line to its
  "Final estimate" line, watched as they are written; llqx: the loop time it reports with --json).

    python benchmarks/imatrix_speed.py [--model M] [-c 512] [--chunks 8] [-t 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "python"))

from llqx import data  # noqa: E402

# child processes import the same llqx as this script (installed, or python/ of a dev build)
LLQX_ROOT = str(Path(data.__file__).resolve().parent.parent)


def upstream_bin() -> Path:
    for c in (Path(os.environ.get("LLQX_UPSTREAM_BIN", "")) / "llama-imatrix",
              REPO / "build" / "dev" / "bin" / "llama-imatrix"):
        if c.is_file():
            return c
    raise SystemExit("llama-imatrix not found: build with -DLLQX_BUILD_UPSTREAM_TOOLS=ON")


def run_upstream(common: list[str], out: Path) -> tuple[float, float]:
    """Wall time, and the chunk loop's time as seen on its output: from the "computing over" log
    line (stderr) to the "Final estimate" line (stdout), both read as they are written."""
    seen: dict[str, float] = {}
    tails: dict[str, list[str]] = {"stdout": [], "stderr": []}

    def watch(stream: IO[str], name: str, marker: str) -> None:
        for line in stream:
            if marker in line and marker not in seen:
                seen[marker] = time.perf_counter()
            tails[name].append(line)

    t = time.perf_counter()
    proc = subprocess.Popen([str(upstream_bin()), *common, "-o", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, bufsize=1)
    assert proc.stdout is not None
    assert proc.stderr is not None
    readers = [threading.Thread(target=watch, args=(proc.stderr, "stderr", "computing over")),
               threading.Thread(target=watch, args=(proc.stdout, "stdout", "Final estimate"))]
    for r in readers:
        r.start()
    proc.wait()
    wall = time.perf_counter() - t
    for r in readers:
        r.join()
    if proc.returncode != 0 or len(seen) != 2:
        raise SystemExit("llama-imatrix failed:\n" + "".join(tails["stderr"][-30:]))
    return wall, seen["Final estimate"] - seen["computing over"]


COLLECT_SHARE: list[float] = []  # llqx's own time summing activations ÷ its loop time, per run


def run_llqx(common: list[str], out: Path) -> tuple[float, float]:
    env = dict(os.environ, PYTHONPATH=LLQX_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "llqx.cli", "imatrix", *common, "-o", str(out), "--json"],
                          capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"llqx imatrix failed:\n{proc.stderr[-2000:]}")
    summary = json.loads(proc.stdout)
    COLLECT_SHARE.append(float(summary["collect_s"]) / float(summary["eval_s"]))
    return wall, float(summary["eval_s"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model GGUF (default: SmolLM2-135M F16 from llqx.data)")
    ap.add_argument("--text", default=None, help="calibration text (default: a slice of c4)")
    ap.add_argument("-c", "--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "imatrix_speed.json"))
    args = ap.parse_args()

    model = Path(args.model) if args.model else data.smollm2_f16()
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        if args.text:
            text = Path(args.text)
        else:
            text = tmpdir / "c4.txt"
            text.write_text(data.text("c4").read_text(encoding="utf-8")[:120_000], encoding="utf-8")
        common = ["-m", str(model), "-f", str(text), "-c", str(args.ctx), "--chunks", str(args.chunks),
                  "-t", str(args.threads)]
        tokens = args.ctx * args.chunks
        runs: dict[str, list[tuple[float, float]]] = {"upstream": [], "llqx": []}
        for r in range(args.repeats):
            order = ("upstream", "llqx") if r % 2 == 0 else ("llqx", "upstream")
            for name in order:
                fn = run_upstream if name == "upstream" else run_llqx
                wall, loop = fn(common, tmpdir / f"{name}.gguf")
                runs[name].append((wall, loop))
                print(f"repeat {r + 1} {name:8s}: wall {wall:7.2f} s ({tokens / wall:7.1f} tok/s), "
                      f"loop {loop:7.2f} s ({tokens / loop:7.1f} tok/s)", flush=True)

    ratios_wall = [u[0] / q[0] for u, q in zip(runs["upstream"], runs["llqx"], strict=True)]
    ratios_loop = [u[1] / q[1] for u, q in zip(runs["upstream"], runs["llqx"], strict=True)]
    result = {
        "benchmark": "imatrix_speed",
        "metric": "tokens/s of llqx imatrix ÷ tokens/s of upstream llama-imatrix (median over repeats)",
        "ratio_wall": statistics.median(ratios_wall),
        "ratio_loop": statistics.median(ratios_loop),
        "ratios_wall": ratios_wall,
        "ratios_loop": ratios_loop,
        "llqx_collect_share": statistics.median(COLLECT_SHARE),
        "tokens_per_run": tokens,
        "model": model.name,
        "ctx": args.ctx,
        "chunks": args.chunks,
        "threads": args.threads,
        "repeats": args.repeats,
        "upstream_runs_s": [{"wall": w, "loop": lp} for w, lp in runs["upstream"]],
        "llqx_runs_s": [{"wall": w, "loop": lp} for w, lp in runs["llqx"]],
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus (shared; load varies)",
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"median ratio llqx/upstream: wall {result['ratio_wall']:.3f}, loop {result['ratio_loop']:.3f}; "
          f"llqx sums activations {100 * result['llqx_collect_share']:.2f}% of its loop -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
