"""The quality benchmark's reports: the JSON record, the markdown page and the plot (benchmarks/quality.py)."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

from llqx.atomic import atomic_path
from llqx.cli.eval import markdown_table
from llqx.evaluate import EvalResult, QuantResult

MIN_EVAL_TOKENS = 8192


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def write_text(path: Path, content: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(content, encoding="utf-8")


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
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return True


@dataclass
class Report:
    """What the markdown page says: the run's settings and its results."""

    name: str
    reference: str
    dequantized: bool  # the reference is a dequantized low-bit model (grid-flattered)
    calib_chunks: int
    calib_ctx: int
    im_how: str
    threads: int
    recipes: list[str]
    recipe_times: dict[str, float]
    llqx_times: dict[str, float]
    times: dict[str, float]
    points: list[dict[str, object]]
    result: EvalResult
    geo: float | None
    corr: tuple[float, float] | None
    n_proxy: int


def markdown(r: Report, out_dir: Path) -> list[str]:
    name, reference, result, points, geo, corr = r.name, r.reference, r.result, r.points, r.geo, r.corr
    quick = result.n_tokens < MIN_EVAL_TOKENS
    md = [f"# Quality benchmark: {name}", "", f"*{reference}*", ""]
    if r.dequantized:
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
        f"({result.n_chunk} chunks of {result.ctx}); imatrix: {r.calib_chunks} chunks of "
        f"{r.calib_ctx} tokens of c4 ({r.im_how}); {r.threads} threads.",
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
            f"{r.n_proxy} quants: Pearson correlation of the logs "
            f"**{corr[0]:.3f}**, Spearman rank correlation **{corr[1]:.3f}**.",
        ]
    md += ["", "## Model card table", "", markdown_table(result), "", "## Times (s)", ""]
    md.append(
        f"imatrix {r.times['imatrix_s']:.1f}; evaluation {r.times['eval_s']:.1f} "
        f"(base {result.base.seconds:.1f}{', cached' if result.base.cached else ''})"
    )
    for recipe in r.recipes:
        line = f"- {recipe}: llama-quantize {r.recipe_times[recipe]:.1f}"
        if recipe in r.llqx_times:
            line += f"; llqx-quantize {r.llqx_times[recipe]:.1f}"
        md.append(line)
    if r.llqx_times:
        md.append("(the first llqx-quantize call includes the scoring pass; the others reuse its state file)")
    png = out_dir / f"{name}.png"
    if plot_points(points, f"{name}: KLD vs bpw\n{reference}; {result.n_tokens:,} wiki tokens", png):
        md += ["", f"![KLD vs bpw]({png.name})"]
    return md
