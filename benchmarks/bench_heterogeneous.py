"""Mai et al.'s protocol on a heterogeneous pair: lfm / ce / ffm / ffm->ce at shallow, middle and deep stitch
points, in both directions, with self-stitch controls.

    python benchmarks/bench_heterogeneous.py [--quick] [--models A,B] [--steps N] [--lrs 1e-3,3e-3] [--out PATH]

:func:`klas.heterogeneous.run_protocol` does the work (method in its module docstring: anchors frozen,
only the stitch layers train, every loss from the same least-squares start, lr chosen on the score
split, eval reported, accuracy also relative to the target model alone) on a cache of the pair made
by :func:`klas.quality.build_family_cache` from the demo zoo (zoo models missing or out of date are
trained first, outside the timed part). This script
parses arguments, prints the table, writes ``benchmarks/results/heterogeneous[.quick].json`` and a
picture beside it.
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

from klas.heterogeneous import HeteroConfig, cell, run_protocol  # noqa: E402
from klas.quality import build_family_cache  # noqa: E402
from klas.utils import DEFAULT_ROOT, FLOPS_CONVENTION, machine_info, package_versions, write_json_atomic  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
FULL = HeteroConfig()
QUICK = HeteroConfig(models=("klas_vit_ti", "klas_resnet_s"), steps=6, batch_size=16, limit=300, score_limit=None,
                     init_images=32)


def _short(name: str) -> str:
    return name.removeprefix("klas_")


def table(rep: dict) -> Table:
    a, b = rep["models"]
    an = rep["anchors"]
    t = Table(title=(f"Mai et al.'s protocol: {_short(a)} ({100 * an[a]['eval']:.1f} %, {an[a]['gflops']:.4f} GFLOPs) and "
                     f"{_short(b)} ({100 * an[b]['eval']:.1f} %, {an[b]['gflops']:.4f} GFLOPs); anchors frozen, only the "
                     f"{rep['config']['layer']} stitch layer trains; eval top-1 % (relative to the target alone); "
                     + (f"lr {rep['config']['lrs'][0]:g} for every loss" if len(rep["config"]["lrs"]) == 1 else
                        "lr per loss chosen on the score split: " + ", ".join(f"{k} {v:g}" for k, v in rep["chosen_lr"].items()))))
    losses = list(rep["chosen_lr"])
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


def plot(rep: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    losses, depths = list(rep["chosen_lr"]), list(rep["cuts"])
    routes = list(dict.fromkeys((r["src"], r["dst"]) for r in rep["rows"]))
    fig, axes = plt.subplots(1, len(routes), figsize=(4.2 * len(routes), 4.2), dpi=130, sharey=True, squeeze=False)
    width = 0.8 / len(losses)
    for ax, (src, dst) in zip(axes[0], routes):
        for k, loss in enumerate(losses):
            vals = [next(r["relative_to_target"] for r in rep["rows"] if (r["src"], r["dst"], r["depth"], r["loss"])
                         == (src, dst, d, loss)) for d in depths]
            ax.bar([i + (k - (len(losses) - 1) / 2) * width for i in range(len(depths))], vals, width, label=loss)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(depths)), depths)
        ax.set_title(f"{_short(src)} -> {_short(dst)}" + (" (self)" if src == dst else ""), fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0][0].set_ylabel("eval top-1 / target model's top-1")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Stitch layer trained with each loss (anchors frozen); 1.0 = the target model alone", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def run(cfg: HeteroConfig, work: Path, out_json: Path, *, command: str, quick: bool, root: Path, device: str,
        keep_cache: bool, console: Console | None = None) -> dict:
    console = console or Console(stderr=True, width=max(160, Console(stderr=True).width))
    if not cfg.random_init:
        from klas.zoo import stale_models, train_zoo

        stale = stale_models(root, list(cfg.models))
        if stale:  # trained first, outside the benchmark's clock, as `klas zoo` would
            console.print(f"training zoo models {', '.join(stale)} first (not part of the benchmark's time)")
            train_zoo(root, stale, console=console)
    started = time.perf_counter()
    info = machine_info()
    cache = build_family_cache(cfg.models, work / "cache", cfg, root, keep_cache)
    say = lambda m: console.print(m, markup=False, highlight=False)  # noqa: E731
    say(f"cache {cache.path}: {dict(cache.manifest['splits'])} ({time.perf_counter() - started:.0f} s)")
    with Progress(TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("steps", total=len(cfg.losses) * len(cfg.lrs) * cfg.steps)
        rep = run_protocol(cache, cfg, root=root, device=device, say=say, on_step=lambda: bar.advance(task))
    rep.update(command=command, quick=quick, machine=info, flops=FLOPS_CONVENTION, accuracy_unit="fraction",
               versions=package_versions())
    rep["machine"]["load_average_at_end"] = list(os.getloadavg())
    rep["wall_s"] = time.perf_counter() - started
    write_json_atomic(out_json, rep)
    plot(rep, out_json.with_suffix(".png"))
    console.print(table(rep))
    console.print(f"paper: {rep['paper']}", markup=False, highlight=False)
    console.print(f"wrote {out_json} and {out_json.with_suffix('.png')} in {rep['wall_s']:.0f} s")
    return rep


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="reduced version: the two smallest demo models, 300 images, 6 steps")
    ap.add_argument("--models", help="A,B (default klas_vit_s,klas_resnet_l; quick klas_vit_ti,klas_resnet_s)")
    ap.add_argument("--depths", help="comma-separated: shallow, middle, deep (default all)")
    ap.add_argument("--losses", help="comma-separated (default lfm,ce,ffm,ffm->ce)")
    ap.add_argument("--layer", help="stitch layer: mlp (default, Mai et al.), linear or lora")
    ap.add_argument("--steps", type=int, help="training steps per loss (default 150)")
    ap.add_argument("--batch-size", type=int, help="training batch (default 32)")
    ap.add_argument("--lrs", help="learning rates to choose from on the score split, e.g. 1e-4,3e-4,1e-3 (default 3e-4)")
    ap.add_argument("--limit", type=int, help="images per split (default: all of digits)")
    ap.add_argument("--score-limit", type=int, help="score images for choosing the lr (default 1000)")
    ap.add_argument("--no-self", action="store_true", help="skip the self-stitch controls")
    ap.add_argument("--random-init", action="store_true", help="untrained models (development only)")
    ap.add_argument("--work", help="scratch directory (default cache/bench-heterogeneous[-quick])")
    ap.add_argument("--keep-cache", action="store_true", help="reuse the scratch cache of an earlier run")
    ap.add_argument("--root", default=str(DEFAULT_ROOT), help="klas cache root holding the zoo and the digits data")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/heterogeneous[.quick].json)")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    split = lambda s: tuple(x.strip() for x in s.split(",") if x.strip())  # noqa: E731
    over = {k: v for k, v in (
        ("models", args.models and split(args.models)), ("depths", args.depths and split(args.depths)),
        ("losses", args.losses and split(args.losses)), ("layer", args.layer), ("steps", args.steps),
        ("batch_size", args.batch_size), ("lrs", args.lrs and tuple(float(x) for x in split(args.lrs))),
        ("limit", args.limit), ("score_limit", args.score_limit)) if v}
    cfg = replace(QUICK if args.quick else FULL, random_init=args.random_init, self_controls=not args.no_self, **over)
    suffix = ".quick" if args.quick else ""
    out_json = Path(args.out) if args.out else RESULTS / f"heterogeneous{suffix}.json"
    root = Path(args.root)
    work = Path(args.work) if args.work else root / f"bench-heterogeneous{'-quick' if args.quick else ''}"
    command = " ".join(["python", "benchmarks/bench_heterogeneous.py",
                        *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    return run(cfg, work, out_json, command=command, quick=args.quick, root=root, device=args.device,
               keep_cache=args.keep_cache)


if __name__ == "__main__":
    main()
