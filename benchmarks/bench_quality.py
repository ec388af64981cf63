"""Does the search find good stitches? Ground truth over every candidate vs the selections of each strategy.

    python benchmarks/bench_quality.py [--quick] [--families vit,vit-depth,cnn] [--root ROOT] [--out PATH]

For each family (``klas.zoo.FAMILIES`` and ``BENCH_FAMILIES``: the ViT trio, the ViT family of unequal
depths and widths, the ResNet pair, trained on the built-in ``digits`` set; train the benchmark-only
models first with ``klas zoo --model klas_vit_d4 --model klas_vit_d8``) :func:`klas.quality.run_family`
builds a cache, searches, brings every strategy (klas, snnet, cka, random) to klas's count K, trains
the ground truth (every candidate, one joint run) and each selection with ``klas train``'s recipe, and
evaluates everything; then every Γ variant is re-scored against the stored ground truth, one variant
is chosen on the score split (mean in-range ρ over the families) and reported on the eval split. The
method and the metric definitions are in :mod:`klas.quality` and :mod:`klas.metrics`. This script
parses arguments, prints the tables, writes ``benchmarks/results/quality[.quick].json`` and plots the
fronts beside it.
"""
from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Sequence

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's klas, also when run from elsewhere

from klas.metrics import pareto_front  # noqa: E402
from klas.quality import BUDGET_QUANTILES, PAPER_RECOVERY, QualityConfig, run_family  # noqa: E402
from klas.utils import (  # noqa: E402
    DEFAULT_ROOT, FLOPS_CONVENTION, machine_info, package_versions, read_json, write_json_atomic,
)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
PAPER_SOURCE = "KLAS (ICLR 2026), Swin-Ti/B: KL 88.9 %, SN-Net heuristic 61.1 %, CKA 5.5 %"
X_LABEL = "GFLOPs (fvcore: 1 multiply-add = 1 FLOP)"
Y_LABEL = "top-1 on eval split (%)"


FULL = QualityConfig()
QUICK = QualityConfig(limit=300, route_steps=4, batch_size=16, buckets=10, bootstrap=200)
FAMILY_NAMES = ("vit", "vit-depth", "cnn")


# -- output --------------------------------------------------------------------------------------------


def _pct(v, digits: int = 1) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{100 * v:.{digits}f}"


def _hv(v, c) -> str:
    return f"{v:.3f}" + (f" [{c[0]:.3f}, {c[1]:.3f}]" if c else "")


def _three(vals) -> str:
    return " / ".join(_pct(v) for v in vals)


def family_table(fam: dict) -> Table:
    b = ", ".join(f"{x:.4f}" for x in fam["budgets_gflops"])
    t = Table(title=(f"{fam['family']}: {fam['num_candidates']} candidates, K = {fam['K']} per strategy, "
                     f"{fam['nonempty_buckets']} non-empty buckets, {fam['eval_images']} eval images\n"
                     f"HV over [{fam['range_gflops'][0]:.4f}, {fam['range_gflops'][1]:.4f}] GFLOPs above "
                     f"{_pct(fam['y_ref'])} % ({fam['y_ref_from']}), anchors on every front; HV stitches: the K "
                     f"stitches alone, above 0 %; budgets b1-b3 = {b} GFLOPs"))
    for col in ("strategy", "K (own rule)", "HV [95% CI]", "best @ b1/b2/b3 %", "HV stitches [95% CI]",
                "best stitch @ b1/b2/b3 %", "recovery", "recovery (paper)", "ρ(score, GT)"):
        t.add_column(col, justify="left" if col == "strategy" else "right")
    sp = fam["spearman"]
    rho = {"klas": sp["neg_gamma_vs_gt"]["rho"], "cka": sp["cka_similarity_vs_gt"]["rho"]}
    for name, s in fam["strategies"].items():
        rec = s["recovery"]
        rec_txt = (f"{_pct(rec['rate'])} % ({rec['recovered']}/{rec['buckets']})" if "recovered" in rec
                   else f"{_pct(rec['rate'])} %")
        paper = s.get("paper_recovery")
        t.add_row(name, f"{s['count']} ({s.get('count_own_rule', s['count'])})",
                  _hv(s["hypervolume"], s.get("hypervolume_ci95")), _three(s["best_at_budget"]),
                  _hv(s["hypervolume_stitches"], s.get("hypervolume_stitches_ci95")), _three(s["best_stitch_at_budget"]),
                  rec_txt, f"{_pct(paper)} %" if paper is not None else "-",
                  f"{rho[name]:+.3f}" if name in rho and math.isfinite(rho[name]) else "-")
    t.add_row("anchors only", "0", _hv(fam["anchors_only_hypervolume"], fam["anchors_only_hypervolume_ci95"]),
              _three(fam["anchors_only_best_at_budget"]), "", "", "", "", "", style="dim")
    t.add_row("ground truth (every stitch, one joint run)", str(fam["num_candidates"]),
              _hv(fam["ground_truth_hypervolume"], fam["ground_truth_hypervolume_ci95"]),
              _three(fam["ground_truth_best_at_budget"]),
              _hv(fam["ground_truth_hypervolume_stitches"], fam["ground_truth_hypervolume_stitches_ci95"]),
              _three(fam["ground_truth_best_stitch_at_budget"]), "100.0 %", "", "", style="dim")
    return t


COLOURS = {"klas": "#c44e52", "snnet": "#4c72b0", "cka": "#55a868", "random": "#8172b2"}
MARKERS = {"klas": "o", "snnet": "s", "cka": "^", "random": "d"}
WIDTHS = {"klas": 3.2, "cka": 2.3, "snnet": 1.4}  # identical fronts stay visible as stacked colours


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fams = list(report["families"].values())
    fig, axes = plt.subplots(1, len(fams), figsize=(7.4 * len(fams), 6.0), dpi=150, squeeze=False)
    for ax, fam in zip(axes[0], fams):
        gt = fam["ground_truth"]
        strategies = {n: s for n, s in fam["strategies"].items() if "front" in s}
        shown = [100 * p["acc"] for s in strategies.values() for p in s["front"]] + [100 * fam["y_ref"]]
        shown += [100 * a for s in strategies.values() for a in s["accuracy"].values()]
        shown += [100 * a["acc"] for a in fam["anchors"]] + [100 * p["acc"] for p in fam["ground_truth_front"]]
        y_lo = max(0.0, min(shown) - 3)
        y_hi = min(100.0, max(shown + [100 * g["acc"] for g in gt]) + 1.5)
        below = sum(100 * g["acc"] < y_lo for g in gt)
        ax.scatter([g["gflops"] for g in gt], [max(100 * g["acc"], y_lo + 0.3) for g in gt], s=16, color="#c8c8c8",
                   zorder=1, label=f"ground truth: every stitch ({len(gt)}), one joint run"
                   + (f"; {below} below the axis, drawn at its foot" if below else ""))
        anchors_xy = sorted((a["gflops"], 100 * a["acc"]) for a in fam["anchors"])
        stair = pareto_front([{"id": i, "gflops": x, "acc": y} for i, (x, y) in enumerate(anchors_xy)], acc="acc")
        ax.step([p["gflops"] for p in stair] + [fam["range_gflops"][1]], [p["acc"] for p in stair] + [stair[-1]["acc"]],
                where="post", color="black", linewidth=1.0, zorder=2, label="original anchors only")
        for name, s in strategies.items():
            base = name.split("-")[0]
            rnd = base == "random"
            pts = [{"id": i, "gflops": next(g["gflops"] for g in gt if g["id"] == i), "acc": a}
                   for i, a in s["accuracy"].items()]
            front = pareto_front(pts, acc="acc")
            xs = [p["gflops"] for p in front]
            ys = [100 * p["acc"] for p in front]
            ax.step(xs + [fam["range_gflops"][1]], ys + [ys[-1]], where="post", color=COLOURS[base],
                    linewidth=1.0 if rnd else WIDTHS[base], linestyle="--" if rnd else "-", alpha=0.7 if rnd else 0.95,
                    zorder=3 if rnd else 4,
                    label=f"{name}: HV {s['hypervolume']:.3f} (with anchors), {s['hypervolume_stitches']:.3f} (stitches)")
            ax.scatter(xs, ys, s=18 if rnd else 30, marker=MARKERS[base], color=COLOURS[base],
                       alpha=0.7 if rnd else 0.95, zorder=3 if rnd else 4)
            if not rnd:  # where the strategy's other stitches landed
                on = {p["id"] for p in front}
                rest = [p for p in pts if p["id"] not in on]
                if rest:
                    ax.scatter([p["gflops"] for p in rest], [max(100 * p["acc"], y_lo + 0.3) for p in rest], s=22,
                               marker=MARKERS[base], facecolors="none", edgecolors=COLOURS[base], linewidths=0.9,
                               alpha=0.8, zorder=2)
        top = max(a["gflops"] for a in fam["anchors"])
        for a in fam["anchors"]:
            ax.scatter([a["gflops"]], [100 * a["acc"]], s=120, marker="*", color="#dd8452", edgecolors="black",
                       linewidths=0.6, zorder=6)
            last = a["gflops"] == top
            ax.annotate(a["id"], (a["gflops"], 100 * a["acc"]), xytext=(-6 if last else 6, -13),
                        textcoords="offset points", fontsize=8, fontweight="bold", zorder=7,
                        ha="right" if last else "left")
        for q, b in zip(BUDGET_QUANTILES, fam["budgets_gflops"]):
            ax.axvline(b, color="0.55", linestyle=":", linewidth=0.9, zorder=0)
        ax.axhline(100 * fam["y_ref"], color="0.55", linestyle="-.", linewidth=0.8, zorder=0)
        ax.set_ylim(y_lo, y_hi)
        ax.set_xlabel(X_LABEL)
        ax.set_ylabel(Y_LABEL)
        ax.set_title(f"{fam['family']}: {', '.join(fam['models'])}\nK = {fam['K']} stitches per strategy, "
                     f"{fam['eval_images']} eval images; lines: stitch fronts, hollow: other selected stitches",
                     fontsize=9.5)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right", fontsize=6.8, framealpha=0.92)
    fig.suptitle("Selected stitches after klas train's joint recipe (equal K and steps; anchors fine-tuned) over the "
                 "ground truth;\na strategy's full front also holds its own fine-tuned anchors (in its HV; stars: the "
                 "original anchors);\n"
                 "dotted: budgets b1-b3; dash-dot: HV reference accuracy (cheapest anchor)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def _families():
    from klas.zoo import BENCH_FAMILIES, FAMILIES

    return {**FAMILIES, **BENCH_FAMILIES}


DEFINITIONS = {
    "front": "klas.metrics.pareto_front over the strategy's K stitches plus its own jointly trained anchors",
    "hypervolume": ("HV = integral over [x_lo, x_hi] of max(0, f(x) - y_ref) dx / ((x_hi - x_lo) * (1 - y_ref)); f(x) = "
                    "best accuracy among the front's networks costing <= x GFLOPs; x_lo / x_hi = cost of the cheapest / "
                    "largest anchor; y_ref = the cheapest original anchor's eval accuracy; in [0, 1]"),
    "best_at_budget": f"f(x_lo + q (x_hi - x_lo)) for q in {list(BUDGET_QUANTILES)}",
    "hypervolume_stitches": "the same integral for the K selected stitches alone, y_ref = 0",
    "spearman": ("scipy.stats.spearmanr over all candidates between the ground-truth accuracy and -Gamma resp. CKA "
                 "similarity; *_in_range: only candidates inside the search's FLOPs range; spearman: eval split, "
                 "spearman_score_split: score split"),
    "recovery": ("klas's FLOPs buckets; a non-empty bucket is recovered if the strategy selected its ground-truth best "
                 "stitch (ties: any); rate = recovered / non-empty"),
    "recipe": ("klas train's defaults (TrainConfig): batch 64, AdamW lr 3e-3 (anchors 0.1x, fine-tuned and sampled as "
               "routes), wd 0.05, 10 % warm-up + cosine, CE, least-squares init; R routes -> R * route_steps steps"),
    "ground_truth": ("one joint run of the recipe over every candidate plus the anchors ((N + A) * route_steps steps), "
                     "evaluated per candidate on the score split and the eval split"),
    "joint": "each selection: same LS init, fresh original anchors, (K + A) * route_steps steps of the recipe",
    "counts": "see strategies.*.how: all strategies are brought to klas's count K",
    "variants": ("klas.quality.variants: Gamma under one changed choice each, rated against the stored ground truth "
                 "(rho over all / in range, recovery of the bucket rule with that Gamma) on score and on eval; the "
                 "variant with the highest mean score-split in-range rho over the families is the chosen one"),
}


def choose_variant(report: dict) -> dict:
    """The Γ variant with the best mean in-range ρ on the score split over the families (eval untouched)."""
    fams = [f for f in report["families"].values() if "variants" in f]
    if not fams:
        return {}
    # variants every family has (pool=cls / pool=mean exist only where models cache several pools)
    names = [n for n in fams[0]["variants"]["score"] if n != "cka" and all(n in f["variants"]["score"] for f in fams)]
    mean = {n: float(sum(f["variants"]["score"][n]["rho_in_range"] for f in fams) / len(fams)) for n in names}
    best = max(names, key=lambda n: (mean[n], n == "default"))
    return {"criterion": "mean over families of the score-split in-range Spearman rho(-Gamma, ground truth)",
            "score_mean_rho_in_range": mean, "chosen": best}


def variants_table(report: dict) -> Table:
    choice = report["variant_choice"]
    fams = [f for f in report["families"].values() if "variants" in f]
    t = Table(title=(f"Γ variants against the ground truth: ρ in range / recovery, score split (choose) | eval split "
                     f"(report); chosen on score: {choice['chosen']}"))
    t.add_column("variant")
    for f in fams:
        t.add_column(f"{f['family']} score", justify="right")
        t.add_column(f"{f['family']} eval", justify="right")
    t.add_column("mean ρ score", justify="right")
    for name in dict.fromkeys(n for f in fams for n in f["variants"]["score"]):
        row = [name]
        for f in fams:
            for split in ("score", "eval"):
                v = f["variants"][split].get(name)
                row.append(f"{v['rho_in_range']:+.2f} / {_pct(v['recovery'], 0)} %" if v else "-")
        mean = choice["score_mean_rho_in_range"].get(name)
        row.append(f"{mean:+.3f}" if mean is not None else "-")
        t.add_row(*row, style="bold" if name == choice["chosen"] else None)
    return t


def _print_family(console: Console, fr: dict) -> None:
    console.print(family_table(fr))
    for name, st in fr["strategies"].items():
        if "how" in st and not name.startswith("random-"):
            console.print(f"  {name}: {st['how']}", markup=False, highlight=False)
    for key, what in (("spearman", "eval"), ("spearman_score_split", "score")):
        sp = fr[key]
        console.print("  Spearman ({w}) over all {n} candidates: ρ(-Γ, GT) = {a:+.3f}, ρ(CKA, GT) = {b:+.3f}; in range: "
                      "{c:+.3f} / {d:+.3f}".format(
                          w=what, n=sp["neg_gamma_vs_gt"]["n"], a=sp["neg_gamma_vs_gt"]["rho"],
                          b=sp["cka_similarity_vs_gt"]["rho"], c=sp["neg_gamma_vs_gt_in_range"]["rho"],
                          d=sp["cka_similarity_vs_gt_in_range"]["rho"]), markup=False, highlight=False)
    for name, st in fr["strategies"].items():
        d, ds = st.get("klas_minus_this_hypervolume_ci95"), st.get("klas_minus_this_hypervolume_stitches_ci95")
        if d and ds:
            console.print(f"  klas - {name}: HV difference 95% CI [{d[0]:+.4f}, {d[1]:+.4f}], "
                          f"HV stitches [{ds[0]:+.4f}, {ds[1]:+.4f}]", markup=False, highlight=False)


def run(cfg: QualityConfig, families: Sequence[str], work: Path, out_json: Path, out_png: Path, *, command: str,
        quick: bool, root: Path = DEFAULT_ROOT, device: str | None = None, keep_cache: bool = False,
        console: Console | None = None) -> dict:
    from klas.zoo import stale_models, train_zoo

    known = _families()
    unknown = [f for f in families if f not in known]
    if unknown:
        raise SystemExit(f"unknown family {unknown[0]!r}; use {', '.join(known)}")
    console = console or Console(stderr=True, width=max(190, Console(stderr=True).width))
    if not cfg.random_init:
        stale = stale_models(root, [m for f in families for m in known[f]])
        if stale:  # trained first, outside the benchmark's clock, as `klas zoo --model ...` would
            console.print(f"training zoo models {', '.join(stale)} first (not part of the benchmark's time)")
            train_zoo(root, stale, console=console)
    started = time.perf_counter()
    report = {
        "command": command, "quick": quick, "config": asdict(cfg), "machine": machine_info(),
        "flops": FLOPS_CONVENTION, "accuracy_unit": "fraction", "definitions": DEFINITIONS,
        "paper_recovery": {**PAPER_RECOVERY, "source": PAPER_SOURCE}, "families": {},
    }
    for fam in families:
        fr = run_family(fam, known[fam], cfg, work / fam, root=root, device=device, keep_cache=keep_cache,
                        say=lambda m: console.print(m, markup=False, highlight=False))
        report["families"][fam] = fr
        _print_family(console, fr)
    report["variant_choice"] = choose_variant(report)
    if report["variant_choice"]:
        console.print(variants_table(report))
    report["machine"]["load_average_at_end"] = list(os.getloadavg())
    report["wall_s"] = time.perf_counter() - started
    report["versions"] = package_versions()
    out_json.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_json, report)
    plot(report, out_png)
    console.print(f"paper: {PAPER_SOURCE}")
    console.print(f"wrote {out_json} and {out_png} in {report['wall_s']:.0f} s")
    return report


def merge(parts: Sequence[Path], out_json: Path, command: str, console: Console | None = None) -> dict:
    """One report from per-family reports of this script (families run one process each), with the Γ
    variant chosen over all of them; the parts' commands and wall times are kept."""
    console = console or Console(stderr=True, width=max(190, Console(stderr=True).width))
    reports = [read_json(p, what="quality report") for p in parts]
    report = {k: v for k, v in reports[0].items() if k not in ("families", "wall_s", "command", "variant_choice")}
    report["command"] = command
    report["parts"] = [{"path": str(p), "command": r["command"], "wall_s": r["wall_s"], "families": list(r["families"]),
                        "load_average_at_end": r["machine"].get("load_average_at_end")} for p, r in zip(parts, reports)]
    report["families"] = {name: fam for r in reports for name, fam in r["families"].items()}
    report["wall_s"] = sum(r["wall_s"] for r in reports)
    for fam in report["families"].values():
        _print_family(console, fam)
    report["variant_choice"] = choose_variant(report)
    if report["variant_choice"]:
        console.print(variants_table(report))
    write_json_atomic(out_json, report)
    plot(report, out_json.with_suffix(".png"))
    console.print(f"wrote {out_json} and {out_json.with_suffix('.png')} ({report['wall_s']:.0f} s of family runs)")
    return report


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="merge per-family reports of earlier runs into --out")
    ap.add_argument("--quick", action="store_true", help="reduced version (< 5 min): fewer images, steps, buckets")
    ap.add_argument("--families", default=",".join(FAMILY_NAMES), help=f"comma-separated: {', '.join(FAMILY_NAMES)}")
    ap.add_argument("--root", default=str(DEFAULT_ROOT), help="klas cache root holding the zoo and the digits data")
    ap.add_argument("--random-init", action="store_true", help="untrained models (development only)")
    ap.add_argument("--limit", type=int, help="images per split (default: all, 8626 / 2875 / 2875; quick 300)")
    ap.add_argument("--eval-limit", type=int, help="evaluate on the first N score / eval images (default: all)")
    ap.add_argument("--route-steps", type=int, help="training steps per route (stitch or anchor) in every run (default 24; quick 4)")
    ap.add_argument("--batch-size", type=int, help="training batch (default 64, klas train's; quick 16)")
    ap.add_argument("--random-seeds", help="comma-separated seeds of the random baseline (default 0,1,2)")
    ap.add_argument("--no-variants", action="store_true", help="skip the Γ variants")
    ap.add_argument("--buckets", type=int, help="FLOPs buckets (default 20; quick 10)")
    ap.add_argument("--bootstrap", type=int, help="bootstrap resamples for the CIs")
    ap.add_argument("--work", default=None, help="scratch directory (default cache/bench-quality[-quick])")
    ap.add_argument("--keep-cache", action="store_true", help="reuse the scratch caches of an earlier run")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: on a shared 2-core machine 2 threads oversubscribe badly)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/quality[.quick].json)")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    command = " ".join(["python", "benchmarks/bench_quality.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    if args.merge:
        return merge([Path(p) for p in args.merge], Path(args.out) if args.out else RESULTS / "quality.json", command)
    cfg = QUICK if args.quick else FULL
    over = {k: v for k, v in (("limit", args.limit), ("eval_limit", args.eval_limit), ("route_steps", args.route_steps),
                              ("batch_size", args.batch_size), ("buckets", args.buckets), ("bootstrap", args.bootstrap))
            if v is not None}
    if args.random_seeds:
        over["random_seeds"] = tuple(int(x) for x in args.random_seeds.split(","))
    cfg = replace(cfg, random_init=args.random_init, variants=not args.no_variants, **over)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    suffix = ".quick" if args.quick else ""
    out_json = Path(args.out) if args.out else RESULTS / f"quality{suffix}.json"
    out_png = out_json.with_suffix(".png")
    work = Path(args.work) if args.work else DEFAULT_ROOT / f"bench-quality{'-quick' if args.quick else ''}"
    return run(cfg, families, work, out_json, out_png, command=command, quick=args.quick, root=Path(args.root),
               device=args.device, keep_cache=args.keep_cache)


if __name__ == "__main__":
    main()
