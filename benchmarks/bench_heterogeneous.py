"""Mai et al.'s protocol on a pair of models: ce / ffm / ffm->ce (and lfm when asked) at shallow, middle and deep
stitch points, in both directions, with self-stitch controls, trained for 150 -> 1,500 -> 5,000 steps; where the
curves flatten, and Mai et al.'s three claims tested at that length.

    python benchmarks/bench_heterogeneous.py [--quick] [--pair A,B ...] [--lengths 150,1500,5000] [--schedule constant]
                                             [--lrs 1e-3,3e-3] [--out PATH]

A pair names two models: zoo names or ``ALIAS:NAME=weights.safetensors`` (two trainings of one architecture:
``--pair klas_vit_s,b:klas_vit_s=other.safetensors``); ``--pair`` repeats, one protocol per pair (default: the
ViT<->ResNet pair klas_vit_s,klas_resnet_l). :func:`klas.heterogeneous.run_protocol` does the work (method in
its package docstring: anchors frozen, only the stitch layers train, every loss from the same least-squares
start, lr, length and stitches chosen on the score split, eval reported) on a cache of the pair made by
:func:`klas.quality.build_family_cache` (zoo models missing or out of date are trained first, outside the timed
part). This script parses arguments, prints the tables and the claims, writes
``benchmarks/results/heterogeneous[.quick].json`` and a picture beside it.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's klas, also when run from elsewhere

from klas.heterogeneous import HeteroConfig, cell, run_protocol, total_steps  # noqa: E402
from klas.models.load import parse_spec  # noqa: E402
from klas.quality import build_family_cache  # noqa: E402
from klas.utils import DEFAULT_ROOT, FLOPS_CONVENTION, machine_info, package_versions, write_json_atomic  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
FULL = HeteroConfig()
#: The pairs the full benchmark runs by default: the ViT<->ResNet pair (a same-architecture pair is given with --pair).
FULL_PAIRS: tuple[tuple[str, str], ...] = (("klas_vit_s", "klas_resnet_l"),)
QUICK = HeteroConfig(models=("klas_vit_ti", "klas_resnet_s"), lengths=(3, 6), batch_size=16, limit=300, score_limit=None,
                     init_images=32)


def _short(name: str) -> str:
    return name.removeprefix("klas_")


def length_table(rep: dict) -> Table:
    a, b = rep["models"]
    lengths = rep["config"]["lengths"]
    t = Table(title=f"{_short(a)} <-> {_short(b)}: mean top-1 % of the cross-model stitches (both directions, "
                    f"{', '.join(rep['cuts'])}) by training length, score split / eval split "
                    f"({rep['config']['schedule']} schedule)",
              caption=f"chosen length: {rep['length']['chosen']} steps ({rep['length']['rule']}).")
    t.add_column("loss")
    for n in lengths:
        t.add_column(f"{n} steps", justify="right")
    for loss, c in rep["curves"].items():
        t.add_row(loss, *(f"{100 * c[str(n)]['score']:.1f} / {100 * c[str(n)]['eval']:.1f}" +
                          (" *" if n == rep["length"]["chosen"] else "") for n in lengths))
    return t


def table(rep: dict) -> Table:
    a, b = rep["models"]
    an = rep["anchors"]
    n = rep["length"]["chosen"]
    t = Table(title=(f"Mai et al.'s protocol at {n} steps: {_short(a)} ({100 * an[a]['eval']:.1f} %, {an[a]['gflops']:.4f} "
                     f"GFLOPs) and {_short(b)} ({100 * an[b]['eval']:.1f} %, {an[b]['gflops']:.4f} GFLOPs); anchors frozen, "
                     f"only the {rep['config']['layer']} stitch layer trains; eval top-1 % (relative to the target alone); "
                     + (f"lr {rep['config']['lrs'][0]:g} for every loss" if len(rep["config"]["lrs"]) == 1 else
                        "lr per loss chosen on the score split")))
    losses = list(rep["curves"])
    for col in ("depth", "stitch", "kind", "GFLOPs", "LS start", *losses):
        t.add_column(col, justify="left" if col in ("depth", "stitch", "kind") else "right")
    seen = []
    for r in rep["rows"]:
        if r["id"] in seen:
            continue
        seen.append(r["id"])
        best = max(cell(rep, r["id"], loss)["acc"] for loss in losses)
        cells = []
        for loss in losses:
            c = cell(rep, r["id"], loss)
            txt = f"{100 * c['acc']:.1f} ({c['relative_to_target']:.2f})" + (" *" if c["beats_both"] else "")
            cells.append(f"[bold]{txt}[/]" if c["acc"] == best else txt)
        route = f"{_short(r['src'])}:{r['src_cut']} -> {_short(r['dst'])}:{r['dst_cut']}"
        t.add_row(r["depth"], route, r["kind"], f"{r['gflops']:.4f}", f"{100 * r['acc_start']:.1f}", *cells,
                  end_section=len(seen) % 4 == 0)
    t.caption = (f"* beats both models. stitch a:i -> b:j runs a's blocks 0..i-1, then b's from block j. "
                 f"{FLOPS_CONVENTION}.")
    return t


def claims_table(rep: dict) -> Table:
    a, b = rep["models"]
    t = Table(title=f"Mai et al.'s claims on {_short(a)} <-> {_short(b)} at {rep['length']['chosen']} steps "
                    f"(loss for claim 3 chosen on score: {rep['claim_loss']})")
    for col in ("claim", "result", "numbers (eval)", "Mai et al."):
        t.add_column(col, overflow="fold")
    for c in rep["claims"]:
        colour = {"reproduced": "green", "not reproduced": "red"}.get(c["status"], "yellow")
        t.add_row(c["claim"], f"[{colour}]{c['status']}[/]", c["detail"], c["paper"])
    return t


def plot(reports: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(reports), 2, figsize=(11, 4 * len(reports)), dpi=120, squeeze=False)
    for (ax_len, ax_bar), rep in zip(axes, reports):
        lengths = rep["config"]["lengths"]
        pair = " <-> ".join(map(_short, rep["models"]))
        for loss, c in rep["curves"].items():
            line, = ax_len.plot(lengths, [100 * c[str(n)]["eval"] for n in lengths], "-o", label=f"{loss} (eval)")
            ax_len.plot(lengths, [100 * c[str(n)]["score"] for n in lengths], "--", color=line.get_color(), alpha=0.6)
        ax_len.axvline(rep["length"]["chosen"], color="grey", linewidth=0.8)
        ax_len.set_xscale("log")
        ax_len.set_xticks(lengths, [f"{n:,}" for n in lengths])  # the lengths trained, not log-scale minor labels
        ax_len.xaxis.set_minor_locator(plt.NullLocator())
        ax_len.set_xlabel("training steps (dashed: score split)")
        ax_len.set_ylabel("mean top-1 % of the cross stitches")
        ax_len.set_title(f"{pair}: training length", fontsize=10)
        ax_len.grid(True, alpha=0.3)
        ax_len.legend(fontsize=8)
        losses, depths = list(rep["curves"]), list(rep["cuts"])
        cross = [(r["src"], r["dst"]) for r in rep["rows"] if r["kind"] == "cross"]
        routes = list(dict.fromkeys(cross))
        width = 0.8 / (len(losses) * len(routes))
        k = 0
        for src, dst in routes:
            for loss in losses:
                vals = [next(r["relative_to_target"] for r in rep["rows"] if (r["src"], r["dst"], r["depth"], r["loss"],
                        r["steps"]) == (src, dst, d, loss, rep["length"]["chosen"])) for d in depths]
                ax_bar.bar([i + (k - (len(losses) * len(routes) - 1) / 2) * width for i in range(len(depths))], vals, width,
                           label=f"{_short(src)}->{_short(dst)} {loss}")
                k += 1
        ax_bar.axhline(1.0, color="black", linewidth=0.8)
        ax_bar.set_xticks(range(len(depths)), depths)
        ax_bar.set_ylabel("eval top-1 / target model's top-1")
        ax_bar.set_title(f"{pair}: cross stitches at {rep['length']['chosen']} steps", fontsize=10)
        ax_bar.grid(True, axis="y", alpha=0.3)
        ax_bar.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def run_pair(specs: Sequence[str], cfg: HeteroConfig, work: Path, *, root: Path, device: str, keep_cache: bool,
             console: Console) -> dict:
    """One pair: its cache, the protocol with a progress bar, the report (printed by the caller)."""
    if not cfg.random_init:
        from klas.zoo import train_named

        train_named(specs, root, console)  # outside the benchmark's clock, as `klas zoo` would
    started = time.perf_counter()
    cache = build_family_cache(list(specs), work / "cache", cfg, root, keep_cache)
    say = lambda m: console.print(m, markup=False, highlight=False)  # noqa: E731
    say(f"cache {cache.path}: {dict(cache.manifest['splits'])} ({time.perf_counter() - started:.0f} s)")
    with Progress(TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("steps", total=len(cfg.lrs) * total_steps(cfg))
        rep = run_protocol(cache, cfg, root=root, device=device, say=say, on_step=lambda: bar.advance(task))
    rep["model_specs"] = list(specs)
    rep["wall_s"] = time.perf_counter() - started
    return rep


def run(pairs: Sequence[Sequence[str]], cfg: HeteroConfig, work: Path, out_json: Path, *, command: str, quick: bool,
        root: Path, device: str, keep_cache: bool, console: Console | None = None) -> dict:
    console = console or Console(stderr=True, width=max(160, Console(stderr=True).width))
    started = time.perf_counter()
    info = machine_info()
    reports = []
    for specs in pairs:
        names = tuple(parse_spec(m).name for m in specs)
        rep = run_pair(specs, replace(cfg, models=names), work / "-".join(names), root=root, device=device,
                       keep_cache=keep_cache, console=console)
        reports.append(rep)
        for t in (length_table(rep), table(rep), claims_table(rep)):
            console.print(t)
    out = {"pairs": reports, "command": command, "quick": quick, "machine": info, "flops": FLOPS_CONVENTION,
           "accuracy_unit": "fraction", "versions": package_versions(), "paper": reports[0]["paper"]}
    out["machine"]["load_average_at_end"] = list(os.getloadavg())
    out["wall_s"] = time.perf_counter() - started
    write_json_atomic(out_json, out)
    plot(reports, out_json.with_suffix(".png"))
    console.print(f"paper: {out['paper']}", markup=False, highlight=False)
    console.print(f"wrote {out_json} and {out_json.with_suffix('.png')} in {out['wall_s']:.0f} s")
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="reduced version: the two smallest demo models, 300 images, 3 and 6 steps")
    ap.add_argument("--pair", action="append", help="A,B: zoo names or ALIAS:NAME=weights; repeat for several pairs "
                                                    "(default klas_vit_s,klas_resnet_l; quick klas_vit_ti,klas_resnet_s)")
    ap.add_argument("--models", help="A,B: the same as one --pair")
    ap.add_argument("--depths", help="comma-separated: shallow, middle, deep (default all)")
    ap.add_argument("--losses", help="comma-separated of lfm, ce, ffm, ffm->ce (default ce,ffm,ffm->ce)")
    ap.add_argument("--layer", help="stitch layer: mlp (default, Mai et al.), linear or lora")
    ap.add_argument("--lengths", help="training lengths in steps, increasing (default 150,1500,5000)")
    ap.add_argument("--steps", type=int, help="one training length (the same as --lengths N)")
    ap.add_argument("--schedule", help="constant (default: warm-up then constant lr, one run per loss read off at every "
                                       "length) or cosine (warm-up then cosine, one run per length)")
    ap.add_argument("--batch-size", type=int, help="training batch (default 32)")
    ap.add_argument("--lrs", help="learning rates to choose from on the score split, e.g. 1e-4,3e-4,1e-3 (default 3e-4)")
    ap.add_argument("--limit", type=int, help="images per split (default: all of digits)")
    ap.add_argument("--score-limit", type=int, help="score images for choosing (default 1000)")
    ap.add_argument("--no-self", action="store_true", help="skip the self-stitch controls")
    ap.add_argument("--random-init", action="store_true", help="untrained models (development only)")
    ap.add_argument("--work", help="scratch directory (default ROOT/bench-heterogeneous[-quick])")
    ap.add_argument("--keep-cache", action="store_true", help="reuse the scratch caches of an earlier run")
    ap.add_argument("--root", default=str(DEFAULT_ROOT), help="klas cache root holding the zoo and the digits data")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/heterogeneous[.quick].json)")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    split = lambda s: tuple(x.strip() for x in s.split(",") if x.strip())  # noqa: E731
    lengths = (args.steps,) if args.steps else (args.lengths and tuple(int(x) for x in split(args.lengths)))
    over = {k: v for k, v in (
        ("depths", args.depths and split(args.depths)), ("losses", args.losses and split(args.losses)),
        ("layer", args.layer), ("lengths", lengths), ("schedule", args.schedule), ("batch_size", args.batch_size),
        ("lrs", args.lrs and tuple(float(x) for x in split(args.lrs))), ("limit", args.limit),
        ("score_limit", args.score_limit)) if v}
    cfg = replace(QUICK if args.quick else FULL, random_init=args.random_init, self_controls=not args.no_self, **over)
    pairs = [split(p) for p in (args.pair or [])] + ([split(args.models)] if args.models else [])
    if not pairs:
        pairs = [QUICK.models] if args.quick else [tuple(p) for p in FULL_PAIRS]
    if any(len(p) != 2 for p in pairs):
        ap.error(f"a pair names two models, A,B; got {', '.join(','.join(p) for p in pairs)}")
    suffix = ".quick" if args.quick else ""
    out_json = Path(args.out) if args.out else RESULTS / f"heterogeneous{suffix}.json"
    root = Path(args.root)
    work = Path(args.work) if args.work else root / f"bench-heterogeneous{'-quick' if args.quick else ''}"
    command = " ".join(["python", "benchmarks/bench_heterogeneous.py",
                        *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    return run(pairs, cfg, work, out_json, command=command, quick=args.quick, root=root, device=args.device,
               keep_cache=args.keep_cache)


if __name__ == "__main__":
    main()
