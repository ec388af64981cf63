"""Does the search pick the stitches worth training? Ground truth over every candidate vs each strategy's selection.

    python benchmarks/bench_quality.py                   # the full run: klas train's recipe and length, all families
    python benchmarks/bench_quality.py --quick           # reduced (the test suite runs a tiny version)
    python benchmarks/bench_quality.py --replot benchmarks/results/quality.json   # tables + plot from the JSON

For each family of :data:`klas.quality.QUALITY_FAMILIES` (the ViT trio, ViTs of unequal depths and widths,
the ResNet pair, a ViT and a ResNet stitched both ways through bridges; all trained on the built-in
``digits`` set, missing zoo models are trained first, outside the timed part), one after another,
:func:`klas.quality.run_family` builds a cache, searches, computes the training-free signals (Γ, Θ,
least-squares residual, CKA), trains the ground truth (every candidate, one joint run) twice with
different seeds (the ceiling), trains each strategy's K stitches (Γ, Θ, CKA, SN-Net, random x3, and
the least-squares residual when it is competitive on the score split) with ``klas train``'s default
recipe and length, evaluates everything and times every phase. Then
:func:`klas.quality.choose_default_score` chooses ``klas search``'s default score on the score split.
The method and the metrics are in :mod:`klas.quality` and :mod:`klas.metrics`; this script parses
arguments, prints the tables, writes ``benchmarks/results/quality[.quick].json`` and plots the fronts
beside it.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import shlex
import sys
import textwrap
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Mapping, Sequence

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's klas, also when run from elsewhere

from klas.errors import KlasError  # noqa: E402
from klas.fs import atomic_write  # noqa: E402
from klas.metrics import pareto_front  # noqa: E402
from klas.quality import (  # noqa: E402
    BUDGET_QUANTILES, PAPER_RECOVERY, QUALITY_FAMILIES, QualityConfig, QualityFamily, choose_default_score, run_family,
)
from klas.utils import (  # noqa: E402
    DEFAULT_ROOT, FLOPS_CONVENTION, machine_info, package_versions, read_json, write_json_atomic,
)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
PAPER_SOURCE = "KLAS (ICLR 2026), Swin-Ti/B: KL 88.9 %, SN-Net heuristic 61.1 %, CKA 5.5 %"
X_LABEL = "GFLOPs (fvcore: 1 multiply-add = 1 FLOP)"
Y_LABEL = "top-1 on eval split (%)"
LABELS = {"gamma": "klas Γ (paper)", "theta": "klas Θ", "ls": "klas LS", "cka": "CKA", "snnet": "SN-Net"}

FULL = QualityConfig()
#: Reduced: 300 images per split, batch 16, 10 buckets; the length rule is the full run's (klas train's 5 epochs
#: of 300 images at batch 16 over K + A routes: about 4 steps per route).
QUICK = QualityConfig(limit=300, batch_size=16, buckets=10, bootstrap=200)
FAMILY_NAMES = tuple(QUALITY_FAMILIES)


def label(name: str) -> str:
    return LABELS.get(name, name)


# -- output --------------------------------------------------------------------------------------------


def _pct(v, digits: int = 1) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{100 * v:.{digits}f}"


def _hv(v, c=None) -> str:
    if v is None or not math.isfinite(v):
        return "-"
    return f"{v:.3f}" + (f" [{c[0]:.3f}, {c[1]:.3f}]" if c else "")


def _rho(v) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:+.2f}"


def _three(vals) -> str:
    return " / ".join(_pct(v) for v in vals)


def _ci(c, signed: bool = True) -> str:
    return "-" if not c else (f"[{c[0]:+.3f}, {c[1]:+.3f}]" if signed else f"[{c[0]:.3f}, {c[1]:.3f}]")


def _strategy_cells(s: dict) -> list[str]:
    """One strategy's cells; ``random (mean)`` shows the seeds' mean and range instead of intervals."""
    rec = s["recovery"]
    if "hypervolume_range" in s:  # the mean over random seeds
        rng = lambda key: "{:.3f} (range {:.3f}-{:.3f})".format(s[key], *s[f"{key}_range"])  # noqa: E731
        hv, hvs = rng("hypervolume"), rng("hypervolume_stitches")
        rec_txt = f"{_pct(rec['rate'])} % (range {_pct(s['recovery_range'][0], 0)}-{_pct(s['recovery_range'][1], 0)})"
    else:
        hv, hvs = _hv(s["hypervolume"], s.get("hypervolume_ci95")), _hv(s["hypervolume_stitches"], s.get("hypervolume_stitches_ci95"))
        rec_txt = f"{_pct(rec['rate'])} % ({rec['recovered']}/{rec['buckets']})"
    paper = s.get("paper_recovery")
    return [hv, _three(s["best_at_budget"]), hvs, _three(s["best_stitch_at_budget"]), f"{s['stitches_on_front']:.3g}",
            rec_txt, f"{_pct(paper)} %" if paper is not None else "", _rho(s.get("rho_in_range")), _rho(s.get("rho"))]


def _steps(fam: dict) -> str:
    """Steps per route, with the family's length when it trains longer than ``klas train`` (QualityFamily.length)."""
    length = fam.get("length") or 1
    return f"{fam['route_steps']} ({length}× klas train's)" if length > 1 else str(fam["route_steps"])


def family_table(fam: dict) -> Table:
    b = ", ".join(f"{x:.4f}" for x in fam["budgets_gflops"])
    t = Table(title=(f"{fam['family']} ({', '.join(fam['models'])}; {fam.get('direction', 'up')}): "
                     f"{fam['num_candidates']} candidates ({fam['num_in_range']} in range), K = {fam['K']} per strategy, "
                     f"{fam['nonempty_buckets']} non-empty buckets, {_steps(fam)} steps per route, "
                     f"{fam['eval_images']} eval images\nHV over [{fam['range_gflops'][0]:.4f}, "
                     f"{fam['range_gflops'][1]:.4f}] GFLOPs above {_pct(fam['y_ref'])} % ({fam['y_ref_from']}), "
                     f"anchors on every front; HV stitches: the K stitches alone, above 0 %; b1-b3 = {b} GFLOPs"))
    for col in ("strategy", "K (own rule)", "HV [95% CI]", "best @ b1/b2/b3 %", "HV stitches [95% CI]",
                "best stitch @ b1/b2/b3 %", "on front", "recovery", "(paper)", "ρ in range", "ρ all"):
        t.add_column(col, justify="left" if col == "strategy" else "right")
    for name, s in fam["strategies"].items():
        t.add_row(label(name), f"{s['count']} ({s.get('count_own_rule', s['count'])})", *_strategy_cells(s))
    t.add_row("anchors only", "0", _hv(fam["anchors_only_hypervolume"], fam["anchors_only_hypervolume_ci95"]),
              _three(fam["anchors_only_best_at_budget"]), "", "", "", "", "", "", "", style="dim")
    seeds = fam["gt_seeds"]
    t.add_row(f"ground truth (seed {seeds[0]}; every stitch, one joint run)", str(fam["num_candidates"]),
              _hv(fam["ground_truth_hypervolume"], fam["ground_truth_hypervolume_ci95"]),
              _three(fam["ground_truth_best_at_budget"]),
              _hv(fam["ground_truth_hypervolume_stitches"], fam["ground_truth_hypervolume_stitches_ci95"]),
              _three(fam["ground_truth_best_stitch_at_budget"]), str(fam["ground_truth_stitches_on_front"]),
              "100.0 %", "", "", "", style="dim")
    for s in seeds[1:]:
        c = fam["ceiling"][str(s)]
        t.add_row(f"ceiling: ground truth seed {s} vs seed {seeds[0]}", "",
                  _hv(fam["ground_truth_hypervolume_by_seed"][str(s)]), "", "", "", "",
                  f"{_pct(c['recovery'])} % (winners {_pct(c['recovery_winners'])} %)", "",
                  _rho(c["rho_in_range"]), _rho(c["rho"]), style="dim")
    return t


def differences_table(fam: dict) -> Table | None:
    diffs = fam.get("differences") or {}
    if not diffs:
        return None
    t = Table(title=f"{fam['family']}: klas's selections minus each baseline at equal K (eval; 95% bootstrap CI; "
                    "* = CI excludes 0)")
    for col in ("klas score", "vs", "HV diff", "HV diff CI", "HV stitches diff", "HV stitches diff CI"):
        t.add_column(col, justify="left" if col in ("klas score", "vs") else "right")
    for s, by in diffs.items():
        for b, d in by.items():
            if b.startswith("random-"):  # the seeds one by one are in the JSON; the table shows their mean
                continue
            star = lambda c: "*" if c and (c[0] > 0 or c[1] < 0) else ""  # noqa: E731
            t.add_row(label(s), label(b) if b != "random" else "random (mean of seeds)", f"{d['hypervolume']:+.4f}",
                      _ci(d["hypervolume_ci95"]) + star(d["hypervolume_ci95"]), f"{d['hypervolume_stitches']:+.4f}",
                      _ci(d["hypervolume_stitches_ci95"]) + star(d["hypervolume_stitches_ci95"]))
    return t


def signals_table(fam: dict) -> Table:
    t = Table(title=(f"{fam['family']}: training-free signals against the ground truth (seed {fam['gt_seeds'][0]}), "
                     f"ρ over all / in range, recovery of the bucket rule at K = {fam['K']}; score split (chooses) | "
                     "eval split (reports)"))
    for col in ("signal", "score ρ all", "score ρ range", "score recovery", "eval ρ all", "eval ρ range",
                "eval recovery", "trained"):
        t.add_column(col, justify="left" if col == "signal" else "right")
    for name, r in fam["signals"].items():
        sc, ev = r["score"], r["eval"]
        trained = "yes" if name in fam["strategies"] else fam.get("not_trained", {}).get(name, "no")
        t.add_row(label(name), _rho(sc["rho"]), _rho(sc["rho_in_range"]), f"{_pct(sc['recovery'], 0)} %",
                  _rho(ev["rho"]), _rho(ev["rho_in_range"]), f"{_pct(ev['recovery'], 0)} %", trained)
    for s, c in fam.get("ceiling", {}).items():
        t.add_row(f"ceiling (ground truth seed {s})", "", "", "", _rho(c["rho"]), _rho(c["rho_in_range"]),
                  f"{_pct(c['recovery'], 0)} %", "", style="bold")
    return t


def phases_table(fam: dict) -> Table:
    sec, cpu = fam["seconds"], fam.get("cpu_seconds", {})
    total = sec["total"]
    t = Table(title=f"{fam['family']}: time per phase ({fam.get('threads', '?')} torch threads; load average "
                    f"{', '.join(f'{x:.1f}' for x in fam.get('load_average', []))} at start / end)")
    for col in ("phase", "wall s", "share", "CPU s"):
        t.add_column(col, justify="left" if col == "phase" else "right")
    for name, s in sec.items():
        c = f"{cpu[name]:.1f}" if name in cpu else "-"
        t.add_row(name, f"{s:.1f}", f"{100 * s / total:.0f} %", c, style="bold" if name == "total" else None)
    return t


def choice_table(choice: dict) -> Table:
    t = Table(title=f"klas search's default score, chosen on the score split: {choice['chosen']} "
                    f"(current default: {choice['current_default']})\n{choice['why']}")
    for col in ("score", "score ρ range (mean)", "score HV (mean)", "eval ρ range (mean)", "eval recovery (mean)",
                "eval HV (mean)"):
        t.add_column(col, justify="left" if col == "score" else "right")
    for name, ev in choice["evidence"].items():
        sc, rp = ev["score"], ev["eval"]
        t.add_row(label(name), _rho(sc["mean_rho_in_range"]), _hv(sc["mean_hypervolume"]), _rho(rp["mean_rho_in_range"]),
                  f"{_pct(rp['mean_recovery'])} %", _hv(rp["mean_hypervolume"]),
                  style="bold" if name == choice["chosen"] else None)
    return t


def target_lines(report: dict, score: str) -> list[str]:
    """The issue's target per family: ``score``'s selection beats random and SN-Net at equal K with the
    HV-stitches CI of the difference excluding 0."""
    lines, hits, n = [], 0, 0
    for fam in report["families"].values():
        diffs = fam.get("differences", {}).get(score)
        if not diffs:
            continue
        n += 1
        parts, ok = [], True
        for b in ("random", "snnet"):
            d = diffs.get(b)
            if d is None:
                parts.append(f"{label(b)}: not trained ({fam.get('not_trained', {}).get(b, 'absent')})")
                continue
            c = d["hypervolume_stitches_ci95"]
            beat = bool(c and c[0] > 0)
            ok &= beat
            parts.append(f"vs {b}: HV stitches {d['hypervolume_stitches']:+.4f} {_ci(c)} {'beats' if beat else 'does not beat'}")
        hits += ok
        lines.append(f"  {fam['family']}: " + "; ".join(parts))
    return [f"target (HV-stitches CI excludes 0 against random and SN-Net) for {label(score)}: met on {hits} of {n} "
            "families", *lines]


def print_family(console: Console, fam: dict) -> None:
    console.print(family_table(fam))
    for name, st in fam["strategies"].items():
        if "how" in st and not name.startswith("random-"):
            console.print(f"  {label(name)}: {st['how']}", markup=False, highlight=False)
    for name, why in fam.get("not_trained", {}).items():
        console.print(f"  {label(name)}: not trained: {why}", markup=False, highlight=False)
    diffs = differences_table(fam)
    if diffs is not None:
        console.print(diffs)
    console.print(signals_table(fam))
    console.print(phases_table(fam))
    for w in fam.get("warnings", []):
        console.print(f"[bold red]WARNING[/]: {w}")


def _md_ci(c) -> str:
    return "" if not c else f" [{c[0]:+.3f}, {c[1]:+.3f}]"


def write_markdown(report: dict, path: Path) -> None:
    with atomic_write(path) as fh:
        fh.write(markdown(report))


def markdown(report: dict) -> str:
    """The README's tables from a report: per family, each strategy's HV [CI], HV stitches with the CI of
    the default score's lead over random and SN-Net, best at the budgets, stitches on front, recovery and
    ρ in range, the ceiling; then the default-score choice, machine, date and wall time per family."""
    choice = report.get("default_score") or {}
    ref = choice.get("current_default", "gamma")
    lines = ["| family (K of N; steps per route) | strategy | HV [95% CI] | HV stitches (Δ vs random / SN-Net [95% CI]) "
             "| best @ ¼ / ½ / ¾ (%) | stitches on front | recovery | ρ in range |", "|---|---|---|---|---|---|---|---|"]
    for fam in report["families"].values():
        head = f"{fam['family']} (K = {fam['K']} of {fam['num_candidates']}; {_steps(fam)})"
        for name, st in fam["strategies"].items():
            if name.startswith("random-"):
                continue
            hv = (f"{st['hypervolume']:.3f} (seeds {st['hypervolume_range'][0]:.3f}–{st['hypervolume_range'][1]:.3f})"
                  if "hypervolume_range" in st else _hv(st["hypervolume"], st.get("hypervolume_ci95")))
            hvs = f"{st['hypervolume_stitches']:.3f}"
            diffs = fam.get("differences", {}).get(name, {})
            parts = [f"{d['hypervolume_stitches']:+.3f}{_md_ci(d['hypervolume_stitches_ci95'])}"
                     for b in ("random", "snnet") if (d := diffs.get(b))]
            if parts:
                hvs += " (" + " / ".join(parts) + ")"
            rec = st["recovery"]
            rec_txt = f"{_pct(rec['rate'])} %" + (f" ({rec['recovered']}/{rec['buckets']})" if "recovered" in rec else "")
            lines.append(f"| {head} | {label(name)}{' (default)' if name == ref else ''} | {hv} | {hvs} | "
                         f"{_three(st['best_at_budget'])} | {st['stitches_on_front']:.3g} | {rec_txt} | "
                         f"{_rho(st.get('rho_in_range'))} |")
            head = ""
        lines.append(f"| | original anchors only | {_hv(fam['anchors_only_hypervolume'], fam['anchors_only_hypervolume_ci95'])}"
                     f" | | {_three(fam['anchors_only_best_at_budget'])} | | | |")
        lines.append(f"| | ground truth (all {fam['num_candidates']}, seed {fam['gt_seeds'][0]}) | "
                     f"{_hv(fam['ground_truth_hypervolume'], fam['ground_truth_hypervolume_ci95'])} | "
                     f"{fam['ground_truth_hypervolume_stitches']:.3f} | {_three(fam['ground_truth_best_at_budget'])} | "
                     f"{fam['ground_truth_stitches_on_front']} | 100 % | |")
        for seed, c in fam.get("ceiling", {}).items():
            lines.append(f"| | ceiling (ground truth seed {seed} vs {fam['gt_seeds'][0]}; ρ all {_rho(c['rho'])}) | "
                         f"{_hv(fam['ground_truth_hypervolume_by_seed'][seed])} | | | | {_pct(c['recovery'])} % "
                         f"(winners {_pct(c['recovery_winners'])} %) | {_rho(c['rho_in_range'])} |")
    if choice:
        lines += ["", f"Default score chosen on the score split: **{choice['chosen']}** ({choice['why']}).", "",
                  "| score | score split: mean ρ in range | score split: mean HV | eval: mean ρ in range | eval: mean recovery "
                  "| eval: mean HV |", "|---|---|---|---|---|---|"]
        for name, ev in choice["evidence"].items():
            sc, rp = ev["score"], ev["eval"]
            lines.append(f"| {label(name)} | {_rho(sc['mean_rho_in_range'])} | {_hv(sc['mean_hypervolume'])} | "
                         f"{_rho(rp['mean_rho_in_range'])} | {_pct(rp['mean_recovery'])} % | {_hv(rp['mean_hypervolume'])} |")
    m = report.get("machine", {})
    walls = ", ".join(f"{n} {f['seconds']['total'] / 60:.0f} min" for n, f in report["families"].items())
    lines += ["", f"`{report.get('command', '')}` on {m.get('cpu_model', '?')} ({m.get('cpu_count', '?')} cores, "
                  f"{m.get('torch_threads', '?')} torch threads), {report.get('date', '?')}; wall time per family: {walls}."]
    return "\n".join(lines) + "\n"


COLOURS = {"gamma": "#c44e52", "theta": "#dd8452", "ls": "#937860", "snnet": "#4c72b0", "cka": "#55a868",
           "random": "#8172b2"}
MARKERS = {"gamma": "o", "theta": "P", "ls": "X", "snnet": "s", "cka": "^", "random": "d"}
WIDTHS = {"gamma": 3.2, "theta": 2.7, "ls": 2.0, "cka": 1.7, "snnet": 1.2}  # identical fronts stay visible


def _panel(ax, fam: dict) -> None:
    gt = fam["ground_truth"]
    cost = {g["id"]: g["gflops"] for g in gt}
    strategies = {n: s for n, s in fam["strategies"].items() if "front" in s}
    shown = [100 * p["acc"] for s in strategies.values() for p in s["front"]] + [100 * fam["y_ref"]]
    shown += [100 * a for s in strategies.values() for a in s["accuracy"].values()]
    shown += [100 * a["acc"] for a in fam["anchors"]] + [100 * p["acc"] for p in fam["ground_truth_front"]]
    y_lo = max(0.0, min(shown) - 3)
    y_hi = min(100.0, max(shown + [100 * g["acc"] for g in gt]) + 1.5)
    below = sum(100 * g["acc"] < y_lo for g in gt)
    ax.scatter([g["gflops"] for g in gt], [max(100 * g["acc"], y_lo + 0.3) for g in gt], s=14, color="#c8c8c8",
               zorder=1, label=f"ground truth: every stitch ({len(gt)}), one joint run"
               + (f"; {below} below the axis, drawn at its foot" if below else ""))
    anchors_xy = sorted((a["gflops"], 100 * a["acc"]) for a in fam["anchors"])
    stair = pareto_front([{"id": i, "gflops": x, "acc": y} for i, (x, y) in enumerate(anchors_xy)], acc="acc")
    ax.step([p["gflops"] for p in stair] + [fam["range_gflops"][1]], [p["acc"] for p in stair] + [stair[-1]["acc"]],
            where="post", color="black", linewidth=1.0, zorder=2, label="original anchors only")
    for name, s in strategies.items():
        base = name.split("-")[0]
        rnd = base == "random"
        pts = [{"id": i, "gflops": cost[i], "acc": a} for i, a in s["accuracy"].items()]
        front = pareto_front(pts, acc="acc")
        xs, ys = [p["gflops"] for p in front], [100 * p["acc"] for p in front]
        if not xs:
            continue
        ax.step(xs + [fam["range_gflops"][1]], ys + [ys[-1]], where="post", color=COLOURS[base],
                linewidth=1.0 if rnd else WIDTHS[base], linestyle="--" if rnd else "-", alpha=0.7 if rnd else 0.95,
                zorder=3 if rnd else 4,
                label=f"{label(name)}: HV {s['hypervolume']:.3f} (with anchors), {s['hypervolume_stitches']:.3f} (stitches)")
        ax.scatter(xs, ys, s=18 if rnd else 30, marker=MARKERS[base], color=COLOURS[base], alpha=0.7 if rnd else 0.95,
                   zorder=3 if rnd else 4)
    top = max(a["gflops"] for a in fam["anchors"])
    for a in fam["anchors"]:
        ax.scatter([a["gflops"]], [100 * a["acc"]], s=120, marker="*", color="#ffd24d", edgecolors="black",
                   linewidths=0.6, zorder=6)
        last = a["gflops"] == top
        ax.annotate(a["id"], (a["gflops"], 100 * a["acc"]), xytext=(-6 if last else 6, -13), textcoords="offset points",
                    fontsize=8, fontweight="bold", zorder=7, ha="right" if last else "left")
    for b in fam["budgets_gflops"]:
        ax.axvline(b, color="0.55", linestyle=":", linewidth=0.9, zorder=0)
    ax.axhline(100 * fam["y_ref"], color="0.55", linestyle="-.", linewidth=0.8, zorder=0)
    ax.set_ylim(y_lo, y_hi)
    ax.set_xlabel(X_LABEL)
    ax.set_ylabel(Y_LABEL)
    ax.set_title(f"{fam['family']}: {', '.join(fam['models'])} ({fam.get('direction', 'up')})\nK = {fam['K']} stitches "
                 f"per strategy, {_steps(fam)} steps per route, {fam['eval_images']} eval images", fontsize=9.5)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=6.5, framealpha=0.92)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fams = list(report["families"].values())
    cols = min(2, len(fams))
    rows = math.ceil(len(fams) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(7.6 * cols, 6.2 * rows), dpi=150, squeeze=False)
    for ax, fam in zip(axes.flat, fams):
        _panel(ax, fam)
    for ax in list(axes.flat)[len(fams):]:
        ax.axis("off")
    title = ("Selected stitches after klas train's joint recipe and length (equal K and steps; anchors fine-tuned) over "
             "the ground truth; a strategy's front (lines) also holds its own fine-tuned anchors (in its HV; stars: the "
             "original anchors); dotted: budgets b1-b3; dash-dot: HV reference accuracy")
    fig.suptitle("\n".join(textwrap.wrap(title, width=95 * cols)), fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


DEFINITIONS = {
    "front": "klas.metrics.pareto_front over the strategy's K stitches plus its own jointly trained anchors",
    "hypervolume": ("HV = integral over [x_lo, x_hi] of max(0, f(x) - y_ref) dx / ((x_hi - x_lo) * (1 - y_ref)); f(x) = "
                    "best accuracy among the front's networks costing <= x GFLOPs; x_lo / x_hi = cost of the cheapest / "
                    "largest anchor; y_ref = the cheapest original anchor's accuracy; in [0, 1]"),
    "best_at_budget": f"f(x_lo + q (x_hi - x_lo)) for q in {list(BUDGET_QUANTILES)}",
    "hypervolume_stitches": "the same integral for the K selected stitches alone, y_ref = 0",
    "signals": ("klas.quality.signals.rate: Spearman rho(-signal, ground-truth accuracy) over all candidates and in the "
                "search's FLOPs range, and the recovery of the bucket rule on the signal at K; score and eval split"),
    "recovery": ("klas's FLOPs buckets; a non-empty bucket is recovered if the selection holds its ground-truth best "
                 "stitch (ties: any); rate = recovered / non-empty"),
    "ceiling": ("the ground truth trained again with another seed (data order, least-squares images) taken as a signal "
                "of the reference: rho over all / in range, recovery of its bucket winners and of its bucket rule at K"),
    "recipe": ("klas train's defaults (TrainConfig): batch 64, AdamW lr 3e-3 (anchors 0.1x, fine-tuned and sampled as "
               "routes), wd 0.05, 10 % warm-up + cosine, CE, least-squares init; R routes -> R * route_steps steps; "
               "route_steps = klas train's epochs * ceil(train images / batch) / (K + anchors) unless given"),
    "ground_truth": ("one joint run of the recipe over every candidate plus the anchors ((N + A) * route_steps steps) per "
                     "gt seed, evaluated per candidate on the eval split (the reference seed also on the score split)"),
    "selections": "each: the reference ground truth's LS init, fresh original anchors, (K + A) * route_steps steps",
    "counts": "see strategies.*.how: all strategies are brought to klas search's count K",
    "default_score": "klas.quality.choose_default_score (score split only; see its docstring)",
}


def _run_header(cfg: QualityConfig, command: str, quick: bool) -> dict:
    return {"command": command, "quick": quick, "config": asdict(cfg), "machine": machine_info(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "flops": FLOPS_CONVENTION, "accuracy_unit": "fraction", "definitions": DEFINITIONS,
            "paper_recovery": {**PAPER_RECOVERY, "source": PAPER_SOURCE}, "families": {}}


def report_all(console: Console, report: dict, per_family: bool = True) -> None:
    """Every table of a finished report (also what ``--replot`` prints); ``per_family=False``: only what
    spans the families (their own tables were printed as each finished)."""
    if per_family:
        for fam in report["families"].values():
            print_family(console, fam)
    choice = report.get("default_score") or {}
    if choice:
        console.print(choice_table(choice))
        for score in dict.fromkeys([choice["chosen"], choice["current_default"]]):
            for line in target_lines(report, score):
                console.print(line, markup=False, highlight=False)
    m = report.get("machine", {})
    console.print(f"{report.get('date', '?')} on {m.get('cpu_model', '?')} ({m.get('cpu_count', '?')} cores, "
                  f"{m.get('torch_threads', '?')} torch threads); wall time per family: "
                  + ", ".join(f"{n} {f['seconds']['total']:.0f} s (load {', '.join(f'{x:.1f}' for x in f.get('load_average', []))})"
                              for n, f in report["families"].items()), markup=False, highlight=False)
    console.print(f"paper: {PAPER_SOURCE}")


def run(cfg: QualityConfig, families: Mapping[str, QualityFamily], work: Path, out_json: Path, out_png: Path, *,
        command: str, quick: bool, root: Path = DEFAULT_ROOT, device: str | None = None, keep_cache: bool = False,
        console: Console | None = None) -> dict:
    from klas.zoo import is_zoo_model, stale_models, train_zoo

    console = console or Console(stderr=True, width=max(190, Console(stderr=True).width))
    if not cfg.random_init:
        zoo = [m for f in families.values() for m in f.models if is_zoo_model(m)]
        stale = stale_models(root, list(dict.fromkeys(zoo)))
        if stale:  # trained first, outside the benchmark's clock, as `klas zoo --model ...` would
            console.print(f"training zoo models {', '.join(stale)} first (not part of the benchmark's time)")
            train_zoo(root, stale, console=console)
    started = time.perf_counter()
    report = _run_header(cfg, command, quick)
    for fam, spec in families.items():
        load = list(os.getloadavg())
        fr = run_family(fam, spec, cfg, work / fam, root=root, device=device, keep_cache=keep_cache,
                        say=lambda m: console.print(m, markup=False, highlight=False))
        fr["load_average"] = [load[0], os.getloadavg()[0]]
        fr["finished_at"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        report["families"][fam] = fr
        print_family(console, fr)
    report["default_score"] = choose_default_score(report["families"])
    report["machine"]["load_average_at_end"] = list(os.getloadavg())
    report["wall_s"] = time.perf_counter() - started
    report["versions"] = package_versions()
    out_json.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_json, report)
    plot(report, out_png)
    write_markdown(report, out_json.with_suffix(".md"))
    report_all(console, report, per_family=False)
    console.print(f"wrote {out_json}, {out_png} and {out_json.with_suffix('.md')} in {report['wall_s']:.0f} s")
    return report


def replot(path: Path, console: Console | None = None) -> dict:
    """Tables and plot again from a results JSON, without training (the default score re-chosen from it)."""
    console = console or Console(stderr=True, width=max(190, Console(stderr=True).width))
    report = read_json(path, what="quality report")
    old = [n for n, f in report.get("families", {}).items() if "signals" not in f or "ceiling" not in f]
    if old or not report.get("families"):
        raise SystemExit(f"error: {path} was not written by this version of bench_quality.py (no ceiling or signals "
                         f"for {', '.join(old) or 'any family'}); rerun the benchmark to get a report --replot can draw")
    report["default_score"] = choose_default_score(report["families"])
    report_all(console, report)
    plot(report, path.with_suffix(".png"))
    write_markdown(report, path.with_suffix(".md"))
    console.print(f"redrew {path.with_suffix('.png')} and {path.with_suffix('.md')} from {path}")
    return report


def merge(parts: Sequence[Path], out_json: Path, command: str, console: Console | None = None) -> dict:
    """One report from per-family reports of this script, with the default score chosen over all of them;
    the parts' commands and wall times are kept."""
    console = console or Console(stderr=True, width=max(190, Console(stderr=True).width))
    reports = [read_json(p, what="quality report") for p in parts]
    report = {k: v for k, v in reports[0].items() if k not in ("families", "wall_s", "command", "default_score")}
    report["command"] = command
    report["parts"] = [{"path": str(p), "command": r["command"], "wall_s": r["wall_s"], "families": list(r["families"]),
                        "load_average_at_end": r["machine"].get("load_average_at_end")} for p, r in zip(parts, reports)]
    report["families"] = {name: fam for r in reports for name, fam in r["families"].items()}
    report["wall_s"] = sum(r["wall_s"] for r in reports)
    report["default_score"] = choose_default_score(report["families"])
    write_json_atomic(out_json, report)
    plot(report, out_json.with_suffix(".png"))
    write_markdown(report, out_json.with_suffix(".md"))
    report_all(console, report)
    console.print(f"wrote {out_json} and {out_json.with_suffix('.png')} ({report['wall_s']:.0f} s of family runs)")
    return report


def _families(names: str, models: str | None, direction: str) -> dict[str, QualityFamily]:
    """The families to run: ``--models`` as one family named ``custom``, else the named benchmark families."""
    if models:
        try:
            return {"custom": QualityFamily(tuple(m.strip() for m in models.split(",") if m.strip()), direction)}
        except KlasError as exc:
            raise SystemExit(f"error: {exc}") from None
    chosen = [f.strip() for f in names.split(",") if f.strip()]
    unknown = [f for f in chosen if f not in QUALITY_FAMILIES]
    if unknown or not chosen:
        raise SystemExit(f"error: unknown family {unknown[0] if unknown else names!r}; use {', '.join(QUALITY_FAMILIES)}")
    return {f: QUALITY_FAMILIES[f] for f in chosen}


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--replot", metavar="JSON", help="print the tables and redraw the plot of a results JSON (no training)")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="merge per-family reports of earlier runs into --out")
    ap.add_argument("--quick", action="store_true", help="reduced version: 300 images per split, batch 16, 10 buckets")
    ap.add_argument("--families", default=",".join(FAMILY_NAMES), help=f"comma-separated: {', '.join(FAMILY_NAMES)}")
    ap.add_argument("--models", help="instead of --families: one family of these models (comma-separated timm "
                                     "names or zoo models), named 'custom'")
    ap.add_argument("--direction", default="up", help="with --models: up (cheaper -> more expensive) or both")
    ap.add_argument("--root", default=str(DEFAULT_ROOT), help="klas cache root holding the zoo and the digits data")
    ap.add_argument("--random-init", action="store_true", help="untrained models (development only)")
    ap.add_argument("--limit", type=int, help="images per split (default: all, 8626 / 2875 / 2875; quick 300)")
    ap.add_argument("--eval-limit", type=int, help="evaluate on the first N score / eval images (default: all)")
    ap.add_argument("--route-steps", type=int, help="training steps per route (stitch or anchor) in every run (default: "
                                                    "what klas train's 5 epochs give a selection of K, times the family's length: "
                                                    "2x for vit and cnn, klas.quality.QUALITY_FAMILIES)")
    ap.add_argument("--batch-size", type=int, help="training batch (default 64, klas train's; quick 16)")
    ap.add_argument("--gt-seeds", help="comma-separated seeds of the ground truth; the first is the reference (default 0,1)")
    ap.add_argument("--random-seeds", help="comma-separated seeds of the random baseline (default 0,1,2)")
    ap.add_argument("--no-variants", action="store_true", help="skip the Γ variants")
    ap.add_argument("--buckets", type=int, help="FLOPs buckets (default 20; quick 10)")
    ap.add_argument("--bootstrap", type=int, help="bootstrap resamples for the CIs (default 500; quick 200)")
    ap.add_argument("--work", default=None, help="scratch directory (default cache/bench-quality[-quick])")
    ap.add_argument("--keep-cache", action="store_true", help="reuse the scratch caches of an earlier run")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: on a shared 2-core machine 2 threads oversubscribe badly)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/quality[.quick].json)")
    args = ap.parse_args(argv)
    if args.replot:
        return replot(Path(args.replot))
    torch.set_num_threads(max(1, args.threads))
    command = " ".join(["python", "benchmarks/bench_quality.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    if args.merge:
        return merge([Path(p) for p in args.merge], Path(args.out) if args.out else RESULTS / "quality.json", command)
    cfg = QUICK if args.quick else FULL
    over = {k: v for k, v in (("limit", args.limit), ("eval_limit", args.eval_limit), ("route_steps", args.route_steps),
                              ("batch_size", args.batch_size), ("buckets", args.buckets), ("bootstrap", args.bootstrap))
            if v is not None}
    for name, text in (("random_seeds", args.random_seeds), ("gt_seeds", args.gt_seeds)):
        if text:
            over[name] = tuple(int(x) for x in text.split(","))
    cfg = replace(cfg, random_init=args.random_init, variants=not args.no_variants, **over)
    families = _families(args.families, args.models, args.direction)
    out_json = Path(args.out) if args.out else RESULTS / f"quality{'.quick' if args.quick else ''}.json"
    work = Path(args.work) if args.work else DEFAULT_ROOT / f"bench-quality{'-quick' if args.quick else ''}"
    return run(cfg, families, work, out_json, out_json.with_suffix(".png"), command=command, quick=args.quick,
               root=Path(args.root), device=args.device, keep_cache=args.keep_cache)


if __name__ == "__main__":
    main()
