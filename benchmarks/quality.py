#!/usr/bin/env python3
"""Quality benchmark: llama.cpp's recipes against llqx at the same size, by KLD to the base model.

    python benchmarks/quality.py qwen-coder                  # the full benchmark (hours on 2 cores)
    python benchmarks/quality.py smollm2 --recipes Q3_K_M,IQ4_XS --skip-llqx --eval-tokens 1024

Steps (each timed):
1. imatrix from the calibration text (c4; never the evaluation text), with ``llqx.collect_imatrix``
   when it is importable, else upstream ``llama-imatrix``;
2. each recipe (IQ2_XS ... IQ4_XS) with that imatrix by upstream ``llama-quantize``;
3. llqx at each recipe's achieved bpw: ``llqx-quantize --target-bpw X --imatrix I --state-file S``,
   one state file, so the first call scores and the others reuse it (``--skip-llqx`` leaves it out);
4. evaluation of every quant against the base model on held-out wiki text (``llqx.evaluate``: the
   base model runs once); at least 8,192 scored tokens unless ``--eval-tokens`` asks for fewer, in which
   case the output says it is a quick run.

Writes ``<out-dir>/<model>.md``, ``.json`` (a list ``points``, one per recipe, with ``recipe``,
``recipe_bpw``, ``recipe_kld``, ``llqx_bpw``, ``llqx_kld`` and more) and ``.png`` (KLD vs bpw, both curves,
log scale; needs matplotlib: ``pip install llqx[plot]``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import llqx
from llqx import _core, data
from llqx.cli.eval import eval_progress
from llqx.errors import LlqxError
from llqx.evaluate import EvalResult, QuantResult
from llqx.imatrix_collect import SKETCH_RANK
from llqx.probe import Calibration
from llqx.sensitivity import calibrate
from llqx.upstream import upstream_tool

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules below
from quality_report import (
    MIN_EVAL_TOKENS,
    Report,
    log,
    log_correlation,
    markdown,
    quant_record,
    write_text,
)
from quality_reuse import record, record_eval, reused, reused_eval

REPO = Path(__file__).resolve().parent.parent
DEFAULT_RECIPES = ["IQ2_XS", "IQ2_M", "Q2_K", "IQ3_XXS", "IQ3_M", "Q3_K_S", "Q3_K_M", "Q3_K_L", "IQ4_XS"]


@dataclass(frozen=True)
class ModelAlias:
    path: object  # () -> Path
    reference: str
    dequantized: bool = True  # on a low-bit model's own grid: flatters an error-driven allocator


ALIASES: dict[str, ModelAlias] = {
    "smollm2": ModelAlias(data.smollm2_f16, "reference: dequantized Q4_1 (SmolLM2-135M-Instruct)"),
    "smollm2-moe": ModelAlias(
        data.smollm2_moe_f16,
        "reference: dequantized Q4_1 SmolLM2-135M-Instruct, rewritten as an exactly equivalent 4-expert MoE",
    ),
    "qwen-coder": ModelAlias(
        data.qwen_coder_f16, "reference: dequantized Q4_K_M (Qwen2.5-Coder-1.5B-Instruct)"
    ),
    "smollm2-rotated": ModelAlias(
        data.smollm2_rotated_f16,
        "grid-neutral reference: SmolLM2-135M-Instruct with its residual stream rotated (exactly equivalent, "
        "no weight on a quantization grid, head untied)", dequantized=False,
    ),
    "qwen-coder-rotated": ModelAlias(
        data.qwen_coder_rotated_f16,
        "grid-neutral reference: Qwen2.5-Coder-1.5B-Instruct with its residual stream rotated (exactly "
        "equivalent, no weight on a quantization grid, head untied)", dequantized=False,
    ),
}


def run_cmd(cmd: list[object], what: str) -> float:
    """Run a command, fail with its stderr tail; return the seconds it took."""
    t0 = time.perf_counter()
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if proc.returncode != 0:
        raise LlqxError(f"{what} failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
    return time.perf_counter() - t0


def text_slice(name: str, tokens: int) -> str:
    """Enough of a packaged text for `tokens` tokens (generously ~8 characters per token)."""
    content = data.text(name).read_text(encoding="utf-8")
    return content[: tokens * 8]


def build_imatrix(model: Path, out: Path, chunks: int, ctx: int, threads: int) -> tuple[float, str]:
    calib = text_slice("c4", chunks * ctx)
    t0 = time.perf_counter()
    try:
        from llqx import collect_imatrix  # type: ignore[attr-defined]
    except ImportError:
        collect_imatrix = None
    if collect_imatrix is not None:
        # with the sketch of Σ x xᵀ, so runs with and without --score-sketch share it (llama.cpp ignores it)
        im = collect_imatrix(model, calib, n_ctx=ctx, chunks=chunks, threads=threads, dataset="c4",
                             sketch_rank=SKETCH_RANK)
        im.save(out)
        return time.perf_counter() - t0, "llqx.collect_imatrix"
    calib_file = out.with_suffix(".c4.txt")
    calib_file.write_text(calib, encoding="utf-8")
    run_cmd(
        [
            upstream_tool("llama-imatrix"),
            "-m",
            model,
            "-f",
            calib_file,
            "-o",
            out,
            "-c",
            ctx,
            "--chunks",
            chunks,
            "-t",
            threads,
            "--no-ppl",
        ],
        "llama-imatrix",
    )
    return time.perf_counter() - t0, "upstream llama-imatrix"


def calibration_file(work: Path, chunks: int) -> Path | None:
    """The calibration text llqx measures sensitivities on: c4, as the imatrix (never the eval text)."""
    if chunks <= 0:
        return None
    path = work / "calibration-c4.txt"
    write_text(path, text_slice("c4", chunks * 512))
    return path


def proxy_errors(
    model: Path, imatrix: Path, state: Path, files: list[Path], calibration: Path | None, chunks: int, sketch: bool
) -> dict[str, float]:
    """The estimator's total error of each quant file's type mix (from the state file, no rescoring); in
    KL divergence when llqx measured sensitivities (they are in the state file)."""
    scores = llqx.score(model, imatrix, state=state, progress=False, sketch=sketch)
    if calibration is not None:
        calibrate(scores, llqx.Imatrix.load(imatrix), Calibration(calibration, chunks=chunks))
    out: dict[str, float] = {}
    for f in files:
        error = scores.mix_error({t.name: t.type for t in llqx.inspect(f).tensors})
        if error is not None:
            out[str(f)] = error
    return out


def llqx_quantize_cmd() -> list[str]:
    exe = shutil.which("llqx-quantize")
    if exe:
        return [exe]
    return [sys.executable, "-c", "import sys; from llqx.cli.quantize import main; sys.exit(main())"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="alias (" + ", ".join(ALIASES) + ") or a GGUF path (F16/BF16/F32)")
    ap.add_argument(
        "--recipes", default=",".join(DEFAULT_RECIPES), help="comma-separated llama-quantize types"
    )
    ap.add_argument(
        "--skip-llqx", action="store_true", help="only the recipes (llqx's target mode not needed)"
    )
    ap.add_argument("--reference", default=None, help="what the base model is (default: from the alias)")
    ap.add_argument("--name", default=None, help="result file name (default: alias or model file stem)")
    ap.add_argument(
        "--eval-tokens", type=int, default=MIN_EVAL_TOKENS, help="scored wiki tokens (default 8192)"
    )
    ap.add_argument("--eval-ctx", type=int, default=512, help="evaluation chunk size (default 512)")
    ap.add_argument("--calib-chunks", type=int, default=32, help="imatrix chunks of c4 (default 32)")
    ap.add_argument("--calib-ctx", type=int, default=512, help="imatrix chunk size (default 512)")
    ap.add_argument("--imatrix", default=None, help="use this imatrix instead of building one")
    ap.add_argument("--score-sketch", action="store_true",
                    help="llqx weighs errors with the imatrix's sketch of Σ x xᵀ (llqx-quantize --score-sketch); "
                         "with --reuse and another --name, the recipes and their evaluations are shared")
    ap.add_argument("--calibrate", type=int, default=4, metavar="N",
                    help="llqx measures sensitivities on N chunks of c4 (--calibration-file); 0: estimator only")
    ap.add_argument("-t", "--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument(
        "--work-dir", default=None, help="quants, imatrix, state (default: $LLQX_CACHE_DIR/bench/<name>)"
    )
    ap.add_argument(
        "--reuse",
        action="store_true",
        help="reuse the imatrix, the recipe quants, llqx's state and quants and their evaluations that an "
             "earlier run made with the same settings (with its times): sizes can be added run by run",
    )
    ap.add_argument("--only-recipes", action="store_true", help="stop after the imatrix and the recipe quants")
    ap.add_argument("--no-eval-cache", action="store_true", help="do not cache the base model's log-probs")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    try:
        return run(args)
    except LlqxError as exc:
        log(f"error: {exc}")
        return 1


@dataclass
class Setup:
    """What the command line asks for, resolved: the model, its reference text, the folders."""

    model: Path
    reference: str
    dequantized: bool  # a dequantized low-bit reference (grid-flattered); rotated ones are grid-neutral
    name: str
    recipes: list[str]
    work: Path
    out_dir: Path


def resolve(args: argparse.Namespace) -> Setup:
    if args.model in ALIASES:
        alias = ALIASES[args.model]
        model = Path(alias.path())  # type: ignore[operator]
        reference, dequantized, name = args.reference or alias.reference, alias.dequantized, args.name or args.model
    else:
        model = Path(args.model)
        if not model.is_file():
            raise LlqxError(f"model not found: {model}")
        reference, dequantized, name = args.reference or f"reference: {model.name}", False, args.name or model.stem
    recipes = [r.strip().upper() for r in args.recipes.split(",") if r.strip()]
    unknown = [r for r in recipes if llqx.file_type(r) is None]
    if unknown:
        raise LlqxError(f"unknown llama-quantize type(s): {', '.join(unknown)}")
    work = Path(args.work_dir) if args.work_dir else data.cache_dir() / "bench" / name
    work.mkdir(parents=True, exist_ok=True)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return Setup(model, reference, dequantized, name, recipes, work, out_dir)


def make_imatrix(args: argparse.Namespace, s: Setup, times: dict[str, float]) -> tuple[Path, str]:
    """1. the imatrix from c4 (one for the recipes and llqx alike)."""
    if args.imatrix:
        times["imatrix_s"] = 0.0
        return Path(args.imatrix), "given"
    imatrix = s.work / "imatrix-c4.gguf"
    settings: dict[str, object] = {"chunks": args.calib_chunks, "ctx": args.calib_ctx, "text": "c4"}
    earlier = reused(imatrix, settings) if args.reuse else None
    if earlier is not None:
        times["imatrix_s"], how = earlier, "llqx.collect_imatrix, made by an earlier run"
    else:
        log(f"imatrix: {args.calib_chunks} chunks of {args.calib_ctx} tokens of c4 ...")
        times["imatrix_s"], how = build_imatrix(s.model, imatrix, args.calib_chunks, args.calib_ctx, args.threads)
        record(imatrix, settings, times["imatrix_s"])
    log(f"imatrix: {times['imatrix_s']:.1f} s ({how})")
    return imatrix, how


def make_recipes(args: argparse.Namespace, s: Setup, imatrix: Path) -> tuple[dict[str, Path], dict[str, float]]:
    """2. each recipe by upstream llama-quantize with that imatrix."""
    quantize = upstream_tool("llama-quantize")
    files: dict[str, Path] = {}
    seconds: dict[str, float] = {}
    for r in s.recipes:
        out = s.work / f"{s.name}-{r}.gguf"
        settings: dict[str, object] = {"recipe": r, "threads": args.threads, "imatrix": imatrix.stat().st_size}
        earlier = reused(out, settings) if args.reuse else None
        if earlier is None:
            seconds[r] = run_cmd([quantize, "--imatrix", imatrix, s.model, out, r, args.threads], f"llama-quantize {r}")
            record(out, settings, seconds[r])
        else:
            seconds[r] = earlier
        files[r] = out
        log(f"recipe {r}: {llqx.inspect(out).bpw:.4f} bpw in {seconds[r]:.1f} s")
    return files, seconds


def make_llqx(
    args: argparse.Namespace, s: Setup, imatrix: Path, recipe_files: dict[str, Path], calibration: Path | None
) -> tuple[dict[str, Path], dict[str, float]]:
    """3. llqx at each recipe's bpw: one state file, scored by the first call and reused by the others
    (with calibration text, the first call also measures the sensitivities). With --reuse the state and
    the llqx files an earlier run made with the same settings are kept, so sizes can be added run by run."""
    files: dict[str, Path] = {}
    seconds: dict[str, float] = {}
    chunks, sketch = args.calibrate, args.score_sketch
    state = s.work / f"{s.name}-llqx-state.json"
    if not args.reuse:
        state.unlink(missing_ok=True)  # the first call scores (timed as such), the rest reuse the state
    for r in s.recipes:
        target = llqx.inspect(recipe_files[r]).bpw
        out = s.work / f"{s.name}-llqx-{target:.4f}.gguf"
        settings: dict[str, object] = {"target_bpw": f"{target:.6f}", "imatrix": imatrix.stat().st_size,
                                       "calibration_chunks": chunks if calibration else 0, "sketch": sketch}
        earlier = reused(out, settings) if args.reuse else None
        if earlier is not None:
            seconds[r], files[r] = earlier, out
            log(f"llqx @ {target:.4f}: reused from an earlier run ({earlier:.1f} s then)")
            continue
        # no type/nthreads positional: in llama-quantize's grammar a third word is the type
        cmd = [*llqx_quantize_cmd(), "--target-bpw", f"{target:.6f}", "--imatrix", str(imatrix), "--state-file",
               str(state)]
        if calibration is not None:
            cmd += ["--calibration-file", str(calibration), "--calibration-chunks", str(chunks)]
        if sketch:
            cmd.append("--score-sketch")
        cmd += [str(s.model), str(out)]
        seconds[r] = run_cmd(list(cmd), f"llqx-quantize --target-bpw {target:.4f}")
        record(out, settings, seconds[r])
        files[r] = out
        log(f"llqx @ {target:.4f}: {llqx.inspect(out).bpw:.4f} bpw in {seconds[r]:.1f} s")
    return files, seconds


def evaluate_all(args: argparse.Namespace, s: Setup, recipe_files: dict[str, Path], llqx_files: dict[str, Path],
                 times: dict[str, float]) -> tuple[EvalResult, dict[str, QuantResult], dict[str, object]]:
    """4. every quant against the base model on held-out wiki (a reused recipe quant keeps its evaluation)."""
    n_chunk = max(2, math.ceil(args.eval_tokens / _core.eval_n_scored(args.eval_ctx)))
    text = text_slice("wiki", n_chunk * args.eval_ctx)
    quants = [recipe_files[r] for r in s.recipes] + [llqx_files[r] for r in s.recipes if r in llqx_files]
    settings: dict[str, object] = {"base": str(s.model), "base_size": s.model.stat().st_size, "ctx": args.eval_ctx,
                                   "chunks": n_chunk, "text_chars": len(text)}
    cached: dict[str, QuantResult] = {}  # by file path
    if args.reuse:
        for q in quants:
            rec = reused_eval(q, settings)
            if rec is not None:
                cached[str(q)] = rec
                log(f"{q.name}: evaluation reused from an earlier run")
    # once per file: on a small model several recipe sizes can give llqx the same size, hence the same file
    to_eval = list(dict.fromkeys(q for q in quants if str(q) not in cached))
    t0 = time.perf_counter()
    with eval_progress(args.eval_ctx, enabled=not args.quiet) as on_progress:
        result = llqx.evaluate(s.model, to_eval, text, ctx=args.eval_ctx, chunks=n_chunk, threads=args.threads,
                               cache=not args.no_eval_cache, on_progress=on_progress,
                               text_name=f"wiki (first {len(text):,} characters)")
    times["eval_s"] = time.perf_counter() - t0
    if result.n_chunk < n_chunk:
        log(f"warning: the wiki slice gave only {result.n_chunk} of {n_chunk} chunks")
    result.quants = [*cached.values(), *result.quants]
    return result, cached, settings


def collect_points(s: Setup, result: EvalResult, recipe_files: dict[str, Path], recipe_times: dict[str, float],
                   llqx_files: dict[str, Path], llqx_times: dict[str, float]) -> list[dict[str, object]]:
    """One record per recipe: the recipe's quant and llqx's at its size, side by side."""
    by_path = {q.path: q for q in result.quants}
    points = []
    for r in s.recipes:
        rq = by_path[str(recipe_files[r])]
        lq = by_path.get(str(llqx_files[r])) if r in llqx_files else None
        pt: dict[str, object] = {"recipe": r, **quant_record("recipe", rq), "recipe_quantize_s": recipe_times[r]}
        if lq is not None:
            pt.update(quant_record("llqx", lq))
            pt["llqx_quantize_s"] = llqx_times[r]
            pt["kld_ratio"] = lq.kld_mean.value / rq.kld_mean.value if rq.kld_mean.value > 0 else None
        else:
            pt.update({"llqx_bpw": None, "llqx_kld": None})
        points.append(pt)
    return points


def run(args: argparse.Namespace) -> int:
    s = resolve(args)
    times: dict[str, float] = {}
    imatrix, im_how = make_imatrix(args, s, times)
    recipe_files, recipe_times = make_recipes(args, s, imatrix)
    if args.only_recipes:
        return 0
    calibration = None if args.skip_llqx else calibration_file(s.work, args.calibrate)
    llqx_files, llqx_times = ({}, {}) if args.skip_llqx else make_llqx(args, s, imatrix, recipe_files, calibration)
    result, cached, eval_settings = evaluate_all(args, s, recipe_files, llqx_files, times)
    by_path = {q.path: q for q in result.quants}
    for f in [*recipe_files.values(), *llqx_files.values()]:
        if str(f) not in cached:
            record_eval(f, eval_settings, by_path[str(f)])
    points = collect_points(s, result, recipe_files, recipe_times, llqx_files, llqx_times)
    proxy: dict[str, float] = {}
    if not args.skip_llqx:
        quants = [Path(q.path) for q in result.quants]
        proxy = proxy_errors(s.model, imatrix, s.work / f"{s.name}-llqx-state.json", quants, calibration,
                             args.calibrate, args.score_sketch)
        for p in points:
            for prefix, files in (("recipe", recipe_files), ("llqx", llqx_files)):
                r = str(p["recipe"])
                if r in files and str(files[r]) in proxy:
                    p[f"{prefix}_proxy_error"] = proxy[str(files[r])]
    corr = log_correlation([(proxy[q.path], q.kld_mean.value) for q in result.quants if q.path in proxy])
    ratios = [float(p["kld_ratio"]) for p in points if p.get("kld_ratio")]  # type: ignore[arg-type]
    geo = math.exp(sum(math.log(x) for x in ratios) / len(ratios)) if ratios else None
    doc = {
        "model": s.name,
        "caveat": "reference is a dequantized low-bit model (grid-flattered)" if s.dequantized else None,
        "model_file": str(s.model),
        "reference": s.reference,
        "eval_text": "wiki (exllamav2 0.3.2 standard_cal_data/wiki.utf8), held out",
        "calib_text": "c4 (exllamav2 0.3.2 standard_cal_data/c4.utf8)",
        "imatrix": {"path": str(imatrix), "how": im_how, "chunks": args.calib_chunks, "ctx": args.calib_ctx,
                    "has_sketch": llqx.Imatrix.load(imatrix).has_sketch, "llqx_score_sketch": args.score_sketch},
        "llqx_calibration": {"text": "c4", "chunks": args.calibrate, "ctx": 512} if calibration else None,
        "eval": {
            "ctx": result.ctx,
            "chunks": result.n_chunk,
            "scored_tokens": result.n_tokens,
            "quick_run": result.n_tokens < MIN_EVAL_TOKENS,
            "base_ppl": result.base.ppl.value,
            "base_ppl_err": result.base.ppl.err,
            "base_bpw": result.base.bpw,
            "base_eval_s": result.base.seconds,
        },
        "threads": args.threads,
        "times": times,
        "llqx_skipped": args.skip_llqx,
        "geomean_kld_ratio_llqx_over_recipe": geo,
        "proxy_kld_correlation": None if corr is None else {"pearson_log": corr[0], "spearman": corr[1]},
        "points": points,
        "evaluation": result.to_dict(),
    }
    write_text(s.out_dir / f"{s.name}.json", json.dumps(doc, indent=2, default=str) + "\n")
    report = Report(s.name, s.reference, s.dequantized, args.calib_chunks, args.calib_ctx, im_how, args.threads,
                    s.recipes, recipe_times, llqx_times, times, points, result, geo, corr,
                    len([q for q in result.quants if q.path in proxy]))
    md = markdown(report, s.out_dir)
    write_text(s.out_dir / f"{s.name}.md", "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
