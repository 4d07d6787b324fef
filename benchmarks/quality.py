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
import dataclasses
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
from llqx import data
from llqx.cli.eval import eval_progress, markdown_table
from llqx.errors import LlqxError
from llqx.evaluate import Estimate, QuantResult
from llqx.upstream import upstream_tool

REPO = Path(__file__).resolve().parent.parent
DEFAULT_RECIPES = ["IQ2_XS", "IQ2_M", "Q2_K", "IQ3_XXS", "IQ3_M", "Q3_K_S", "Q3_K_M", "Q3_K_L", "IQ4_XS"]
MIN_EVAL_TOKENS = 8192


@dataclass(frozen=True)
class ModelAlias:
    path: object  # () -> Path
    reference: str


ALIASES: dict[str, ModelAlias] = {
    "smollm2": ModelAlias(data.smollm2_f16, "reference: dequantized Q4_1 (SmolLM2-135M-Instruct)"),
    "smollm2-moe": ModelAlias(
        data.smollm2_moe_f16,
        "reference: dequantized Q4_1 SmolLM2-135M-Instruct, rewritten as an exactly equivalent 4-expert MoE",
    ),
    "qwen-coder": ModelAlias(
        data.qwen_coder_f16, "reference: dequantized Q4_K_M (Qwen2.5-Coder-1.5B-Instruct)"
    ),
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


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
        im = collect_imatrix(model, calib, n_ctx=ctx, chunks=chunks, threads=threads, dataset="c4")
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


def _sidecar(out: Path, suffix: str, settings: dict[str, object]) -> dict[str, object] | None:
    """What an earlier run recorded next to `out` (`<out><suffix>`), if it made `out` with the same
    settings and `out` is unchanged in size; else None."""
    try:
        doc = json.loads(out.with_name(out.name + suffix).read_text(encoding="utf-8"))
        if out.is_file() and doc["settings"] == settings and doc["size"] == out.stat().st_size:
            return dict(doc)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _write_sidecar(out: Path, suffix: str, settings: dict[str, object], **fields: object) -> None:
    doc = {"settings": settings, "size": out.stat().st_size, **fields}
    atomic_write_text(out.with_name(out.name + suffix), json.dumps(doc))


def reused(out: Path, settings: dict[str, object]) -> float | None:
    """Seconds an earlier run took to make `out` with the same settings (its sidecar), else None."""
    doc = _sidecar(out, ".json", settings)
    return None if doc is None else float(doc["seconds"])  # type: ignore[arg-type]


def record(out: Path, settings: dict[str, object], seconds: float) -> None:
    _write_sidecar(out, ".json", settings, seconds=seconds)


def reused_eval(out: Path, settings: dict[str, object]) -> QuantResult | None:
    """An earlier run's evaluation of `out` (a recipe quant) on the same text and settings, else None."""
    doc = _sidecar(out, ".eval.json", settings)
    if doc is None:
        return None
    try:
        q = {k: Estimate(**v) if isinstance(v, dict) else v for k, v in doc["result"].items()}  # type: ignore[attr-defined]
        return QuantResult(**{**q, "path": str(out)})
    except (KeyError, TypeError, AttributeError):
        return None


def record_eval(out: Path, settings: dict[str, object], q: QuantResult) -> None:
    _write_sidecar(out, ".eval.json", settings, result=dataclasses.asdict(q))


def proxy_errors(model: Path, imatrix: Path, state: Path, files: list[Path]) -> dict[str, float]:
    """The estimator's total error of each quant file's type mix (from the state file, no rescoring)."""
    scores = llqx.score(model, imatrix, state=state, progress=False)
    out: dict[str, float] = {}
    for f in files:
        error = scores.mix_error({t.name: t.type for t in llqx.inspect(f).tensors})
        if error is not None:
            out[str(f)] = error
    return out


def log_correlation(pairs: list[tuple[float, float]]) -> tuple[float, float] | None:
    """Pearson correlation of log values and Spearman rank correlation."""
    pairs = [(a, b) for a, b in pairs if a > 0 and b > 0]
    if len(pairs) < 3:
        return None
    x = [math.log(a) for a, _ in pairs]
    y = [math.log(b) for _, b in pairs]

    def pearson(u: list[float], v: list[float]) -> float:
        mu, mv = sum(u) / len(u), sum(v) / len(v)
        cov = sum((a - mu) * (b - mv) for a, b in zip(u, v, strict=True))
        su = math.sqrt(sum((a - mu) ** 2 for a in u))
        sv = math.sqrt(sum((b - mv) ** 2 for b in v))
        return cov / (su * sv) if su > 0 and sv > 0 else float("nan")

    def ranks(u: list[float]) -> list[float]:
        order = sorted(range(len(u)), key=lambda i: u[i])
        r = [0.0] * len(u)
        for k, i in enumerate(order):
            r[i] = float(k)
        return r

    return pearson(x, y), pearson(ranks(x), ranks(y))


def llqx_quantize_cmd() -> list[str]:
    exe = shutil.which("llqx-quantize")
    if exe:
        return [exe]
    return [sys.executable, "-c", "import sys; from llqx.cli.quantize import main; sys.exit(main())"]


def quant_record(prefix: str, q: QuantResult | None) -> dict[str, object]:
    if q is None:
        return {}
    return {
        f"{prefix}_file": Path(q.path).name,
        f"{prefix}_bpw": q.bpw,
        f"{prefix}_size": q.size,
        f"{prefix}_ppl": q.ppl.value,
        f"{prefix}_ppl_err": q.ppl.err,
        f"{prefix}_kld": q.kld_mean.value,
        f"{prefix}_kld_err": q.kld_mean.err,
        f"{prefix}_kld_median": q.kld_median.value,
        f"{prefix}_kld_p99": q.kld_p99.value,
        f"{prefix}_kld_max": q.kld_max,
        f"{prefix}_rho_ppl": q.rho_ppl,
        f"{prefix}_same_top": q.same_top.value,
        f"{prefix}_same_top_err": q.same_top.err,
        f"{prefix}_dp_rms": q.dp_rms.value,
        f"{prefix}_eval_s": q.seconds,
    }


def plot_points(points: list[dict[str, object]], title: str, out: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no PNG (pip install 'llqx[plot]')")
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    rp = sorted((p["recipe_bpw"], p["recipe_kld"], p["recipe"]) for p in points)
    ax.plot([p[0] for p in rp], [p[1] for p in rp], "o-", label="llama.cpp recipes")
    for x, y, name in rp:
        ax.annotate(str(name), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    lp = sorted((p["llqx_bpw"], p["llqx_kld"]) for p in points if p.get("llqx_kld") is not None)
    if lp:
        ax.plot([p[0] for p in lp], [p[1] for p in lp], "s-", label="llqx (target bpw)")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight")
    ax.set_ylabel("mean KLD to the base model")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out.with_name("." + out.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out)
    return True


def atomic_write_text(path: Path, content: str) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(content, encoding="utf-8")
    os.replace(tmp, path)


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
    ap.add_argument("-t", "--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument(
        "--work-dir", default=None, help="quants, imatrix, state (default: $LLQX_CACHE_DIR/bench/<name>)"
    )
    ap.add_argument(
        "--reuse",
        action="store_true",
        help="reuse the imatrix and recipe quants an earlier run made with the same settings (with its times)",
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


def run(args: argparse.Namespace) -> int:
    if args.model in ALIASES:
        alias = ALIASES[args.model]
        model = Path(alias.path())  # type: ignore[operator]
        reference = args.reference or alias.reference
        name = args.name or args.model
    else:
        model = Path(args.model)
        if not model.is_file():
            raise LlqxError(f"model not found: {model}")
        reference = args.reference or f"reference: {model.name}"
        name = args.name or model.stem
    recipes = [r.strip().upper() for r in args.recipes.split(",") if r.strip()]
    unknown = [r for r in recipes if llqx.file_type(r) is None]
    if unknown:
        raise LlqxError(f"unknown llama-quantize type(s): {', '.join(unknown)}")
    work = Path(args.work_dir) if args.work_dir else data.cache_dir() / "bench" / name
    work.mkdir(parents=True, exist_ok=True)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}

    # 1. imatrix from c4
    if args.imatrix:
        imatrix, im_how = Path(args.imatrix), "given"
        times["imatrix_s"] = 0.0
    else:
        imatrix = work / "imatrix-c4.gguf"
        im_settings: dict[str, object] = {"chunks": args.calib_chunks, "ctx": args.calib_ctx, "text": "c4"}
        earlier = reused(imatrix, im_settings) if args.reuse else None
        if earlier is not None:
            times["imatrix_s"], im_how = earlier, "llqx.collect_imatrix, made by an earlier run"
        else:
            log(f"imatrix: {args.calib_chunks} chunks of {args.calib_ctx} tokens of c4 ...")
            times["imatrix_s"], im_how = build_imatrix(
                model, imatrix, args.calib_chunks, args.calib_ctx, args.threads
            )
            record(imatrix, im_settings, times["imatrix_s"])
        log(f"imatrix: {times['imatrix_s']:.1f} s ({im_how})")

    # 2. recipes
    quantize = upstream_tool("llama-quantize")
    recipe_files: dict[str, Path] = {}
    recipe_times: dict[str, float] = {}
    for r in recipes:
        out = work / f"{name}-{r}.gguf"
        settings: dict[str, object] = {"recipe": r, "threads": args.threads, "imatrix": imatrix.stat().st_size}
        earlier = reused(out, settings) if args.reuse else None
        if earlier is None:
            recipe_times[r] = run_cmd(
                [quantize, "--imatrix", imatrix, model, out, r, args.threads], f"llama-quantize {r}"
            )
            record(out, settings, recipe_times[r])
        else:
            recipe_times[r] = earlier
        recipe_files[r] = out
        log(f"recipe {r}: {llqx.inspect(out).bpw:.4f} bpw in {recipe_times[r]:.1f} s")

    if args.only_recipes:
        return 0

    # 3. llqx at each recipe's bpw: one state file, scored once
    llqx_files: dict[str, Path] = {}
    llqx_times: dict[str, float] = {}
    if not args.skip_llqx:
        state = work / "llqx-state.json"
        state.unlink(missing_ok=True)  # the first call scores (timed as such), the rest reuse the state
        for r in recipes:
            target = llqx.inspect(recipe_files[r]).bpw
            out = work / f"{name}-llqx-{target:.4f}.gguf"
            cmd = [
                *llqx_quantize_cmd(),
                "--target-bpw",
                f"{target:.6f}",
                "--imatrix",
                str(imatrix),
                "--state-file",
                str(state),
                str(model),
                str(out),
                # no type/nthreads positional: in llama-quantize's grammar a third word is the type
            ]
            llqx_times[r] = run_cmd(list(cmd), f"llqx-quantize --target-bpw {target:.4f}")
            llqx_files[r] = out
            log(f"llqx @ {target:.4f}: {llqx.inspect(out).bpw:.4f} bpw in {llqx_times[r]:.1f} s")

    # 4. evaluation on held-out wiki
    n_scored = args.eval_ctx - 1 - args.eval_ctx // 2
    n_chunk = max(2, math.ceil(args.eval_tokens / n_scored))
    text = text_slice("wiki", n_chunk * args.eval_ctx)
    quants = [recipe_files[r] for r in recipes] + [llqx_files[r] for r in recipes if r in llqx_files]
    # a recipe quant reused from an earlier run keeps that run's evaluation too (same base, text, settings)
    eval_settings: dict[str, object] = {
        "base": str(model),
        "base_size": model.stat().st_size,
        "ctx": args.eval_ctx,
        "chunks": n_chunk,
        "text_chars": len(text),
    }
    cached: dict[str, QuantResult] = {}
    if args.reuse:
        for r in recipes:
            rec = reused_eval(recipe_files[r], eval_settings)
            if rec is not None:
                cached[r] = rec
                log(f"recipe {r}: evaluation reused from an earlier run")
    to_eval = [q for q in quants if q not in {recipe_files[r] for r in cached}]
    t0 = time.perf_counter()
    with eval_progress(args.eval_ctx, enabled=not args.quiet) as on_progress:
        result = llqx.evaluate(
            model,
            to_eval,
            text,
            ctx=args.eval_ctx,
            chunks=n_chunk,
            threads=args.threads,
            cache=not args.no_eval_cache,
            on_progress=on_progress,
            text_name=f"wiki (first {len(text):,} characters)",
        )
    times["eval_s"] = time.perf_counter() - t0
    if result.n_chunk < n_chunk:
        log(f"warning: the wiki slice gave only {result.n_chunk} of {n_chunk} chunks")
    result.quants = [*cached.values(), *result.quants]
    by_path = {q.path: q for q in result.quants}
    quick = result.n_tokens < MIN_EVAL_TOKENS
    points = []
    for r in recipes:
        rq = by_path[str(recipe_files[r])]
        if r not in cached:
            record_eval(recipe_files[r], eval_settings, rq)
        lq = by_path.get(str(llqx_files[r])) if r in llqx_files else None
        pt: dict[str, object] = {
            "recipe": r,
            **quant_record("recipe", rq),
            "recipe_quantize_s": recipe_times[r],
        }
        if lq is not None:
            pt.update(quant_record("llqx", lq))
            pt["llqx_quantize_s"] = llqx_times[r]
            pt["kld_ratio"] = lq.kld_mean.value / rq.kld_mean.value if rq.kld_mean.value > 0 else None
        else:
            pt.update({"llqx_bpw": None, "llqx_kld": None})
        points.append(pt)
    proxy: dict[str, float] = {}
    if not args.skip_llqx:
        proxy = proxy_errors(model, imatrix, work / "llqx-state.json", [Path(q) for q in quants])
        for p in points:
            for prefix, files in (("recipe", recipe_files), ("llqx", llqx_files)):
                r = str(p["recipe"])
                if r in files and str(files[r]) in proxy:
                    p[f"{prefix}_proxy_error"] = proxy[str(files[r])]
    corr = log_correlation([(proxy[q.path], q.kld_mean.value) for q in result.quants if q.path in proxy])
    ratios = [float(p["kld_ratio"]) for p in points if p.get("kld_ratio")]
    geo = math.exp(sum(math.log(x) for x in ratios) / len(ratios)) if ratios else None
    doc = {
        "model": name,
        "caveat": (
            "reference is a dequantized low-bit model (grid-flattered)" if args.model in ALIASES else None
        ),
        "model_file": str(model),
        "reference": reference,
        "eval_text": "wiki (exllamav2 0.3.2 standard_cal_data/wiki.utf8), held out",
        "calib_text": "c4 (exllamav2 0.3.2 standard_cal_data/c4.utf8)",
        "imatrix": {"path": str(imatrix), "how": im_how, "chunks": args.calib_chunks, "ctx": args.calib_ctx},
        "eval": {
            "ctx": result.ctx,
            "chunks": result.n_chunk,
            "scored_tokens": result.n_tokens,
            "quick_run": quick,
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
    atomic_write_text(out_dir / f"{name}.json", json.dumps(doc, indent=2, default=str) + "\n")

    md = [f"# Quality benchmark: {name}", "", f"*{reference}*", ""]
    if args.model in ALIASES:
        md += [
            "Caveat: the reference is a dequantized low-bit model. Types on its own grid requantize almost "
            "losslessly, which flatters an error-driven allocator against fixed recipes; check gains on a "
            "grid-neutral reference before quoting them.",
            "",
        ]
    if quick:
        md += [
            f"**Quick run: only {result.n_tokens:,} scored tokens (< {MIN_EVAL_TOKENS:,}); not a benchmark "
            f"result.**",
            "",
        ]
    md += [
        f"Evaluation: {result.n_tokens:,} scored tokens of held-out wiki "
        f"({result.n_chunk} chunks of {result.ctx}); imatrix: {args.calib_chunks} chunks of "
        f"{args.calib_ctx} tokens of c4 ({im_how}); {args.threads} threads.",
        "",
        "| recipe | recipe bpw | recipe KLD | recipe same top "
        "| llqx bpw | llqx KLD | llqx same top | KLD ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in points:

        def f(key: str, fmt: str, p: dict[str, object] = p) -> str:
            v = p.get(key)
            return fmt.format(v) if isinstance(v, (int, float)) else "-"

        md.append(
            f"| {p['recipe']} | {f('recipe_bpw', '{:.4f}')} | {f('recipe_kld', '{:.5f}')} ± "
            f"{f('recipe_kld_err', '{:.5f}')} | {f('recipe_same_top', '{:.2%}')} | "
            f"{f('llqx_bpw', '{:.4f}')} | {f('llqx_kld', '{:.5f}')} ± {f('llqx_kld_err', '{:.5f}')} | "
            f"{f('llqx_same_top', '{:.2%}')} | "
            f"{f('kld_ratio', '{:.3f}')} |"
        )
    if geo is not None:
        md += [
            "",
            f"Geometric mean of KLD(llqx)/KLD(recipe): **{geo:.3f}** (< 1: llqx better at the same size).",
        ]
    if corr is not None:
        md += [
            "",
            f"The estimator's total error of each file's type mix against its measured mean KLD, over all "
            f"{len([q for q in result.quants if q.path in proxy])} quants: Pearson correlation of the logs "
            f"**{corr[0]:.3f}**, Spearman rank correlation **{corr[1]:.3f}**.",
        ]
    md += ["", "## Model card table", "", markdown_table(result), "", "## Times (s)", ""]
    md.append(
        f"imatrix {times['imatrix_s']:.1f}; evaluation {times['eval_s']:.1f} "
        f"(base {result.base.seconds:.1f}{', cached' if result.base.cached else ''})"
    )
    for r in recipes:
        line = f"- {r}: llama-quantize {recipe_times[r]:.1f}"
        if r in llqx_times:
            line += f"; llqx-quantize {llqx_times[r]:.1f}"
        md.append(line)
    if llqx_times:
        md.append("(the first llqx-quantize call includes the scoring pass; the others reuse its state file)")
    png = out_dir / f"{name}.png"
    if plot_points(points, f"{name}: KLD vs bpw\n{reference}; {result.n_tokens:,} wiki tokens", png):
        md += ["", f"![KLD vs bpw]({png.name})"]
    atomic_write_text(out_dir / f"{name}.md", "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
