"""How long should klas tree train its stitch layers? A sweep of its recipe (FFM epochs, task epochs, stitch
layer, least-squares images), chosen on the score split, reported on eval.

    python benchmarks/bench_tree.py [--quick] [--models A,B[,C...]] [--limit 3000] [--stages "epochs=2,8,32;layer=linear,mlp"]
                                    [--trunk M] [--share-at 2,4] [--work DIR] [--keep-cache] [--out PATH]

:func:`klas.tree.sweep.tree_sweep` does the work (method in its module docstring: every variant a real
``klas tree`` run with the same trunk and share points, one stage per recipe field, each stage's value
chosen on the score split's mean system top-1). It first prints the models' gains (floor, ceiling and
gain of every pair, :func:`klas.tree.subset_gains`: the gain the tree can recover). Models are zoo
names or ``ALIAS:NAME=weights.safetensors`` (e.g. a second training of one architecture); the cache is
built over the digits set as ``make demo-tree`` builds it (``--limit`` images per split). This script
parses arguments, prints the tables, writes ``benchmarks/results/tree[.quick].json`` and a picture
beside it.
"""
from __future__ import annotations

import argparse
import io
import os
import shlex
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's klas, also when run from elsewhere

from klas.models.load import parse_spec  # noqa: E402
from klas.quality import build_family_cache  # noqa: E402
from klas.tree import GainReport, TreeConfig, parse_share_at  # noqa: E402
from klas.tree.sweep import DEFAULT_STAGES, parse_stages, tree_sweep  # noqa: E402
from klas.utils import DEFAULT_ROOT, FLOPS_CONVENTION, machine_info, package_versions, write_json_atomic  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
FULL_MODELS = ("klas_vit_s", "klas_resnet_s")  # make demo-tree's pair
FULL_LIMIT = 3000  # images per split, as make demo-tree caches them
QUICK_MODELS = ("klas_vit_ti", "b:klas_vit_ti")  # one architecture twice (random-init: different weights)
QUICK_STAGES = "epochs=1,2;layer=linear,mlp"
QUICK = dict(steps_per_epoch=3, batch_size=16, probe_epochs=1, init_images=16, eval_batch_size=64, points=2)


def stage_table(rep: dict, stage: dict) -> Table:
    t = Table(title=f"stage {stage['field']}: chose {stage['chosen']!r} on the score split (trunk {rep['trunk']}, "
                    f"share points {rep['shares']})",
              caption="system top-1 % on score / eval, mean over share points; recovered gain % (eval) per share "
                      "point; mean branch cosine to the model replaced; added: mean branch top-1 % on the images its model gets "
                      "right and the trunk's wrong (eval); training steps and seconds of all share points.")
    for col in (stage["field"], "score top-1", "eval top-1", "recovered (eval)", "per share point", "cosine", "added",
                "steps", "s"):
        t.add_column(col, justify="left" if col in ("per share point",) else "right")
    for value, name in zip(stage["values"], stage["runs"]):
        v = rep["variants"][name]
        per = ", ".join(f"s{s['share']} {100 * s['recovered']:.0f}%@{100 * s['extra_cost']:+.0f}%" for s in v["shares"])
        cos = [c for s in v["shares"] for c in s["cosine"].values()]
        added = [a for s in v["shares"] for a in s["top1_added"].values() if a is not None]
        mark = " *" if value == stage["chosen"] else ""
        t.add_row(f"{value}{mark}", f"{100 * v['mean_score']:.2f}", f"{100 * v['mean_eval']:.2f}",
                  f"{100 * v['mean_recovered']:.1f}", per, f"{sum(cos) / len(cos):.3f}",
                  f"{100 * sum(added) / len(added):.1f}" if added else "", str(v["steps"]),
                  f"{v['train_seconds']:.0f}")
    return t


def plot(rep: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    stages = rep["stages"]
    fig, axes = plt.subplots(1, len(stages), figsize=(3.6 * len(stages), 3.6), dpi=130, sharey=True, squeeze=False)
    for ax, st in zip(axes[0], stages):
        xs = list(range(len(st["values"])))
        for key, label in (("mean_recovered_score", "score"), ("mean_recovered", "eval")):
            ax.plot(xs, [100 * rep["variants"][n][key] for n in st["runs"]], "-o", label=label)
        ax.set_xticks(xs, [str(v) for v in st["values"]])
        ax.set_xlabel(st["field"])
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("recovered gain (%), mean over share points")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"klas tree recipe sweep: {' + '.join(rep['models'])} (each stage from the previous stage's choice)",
                 fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def run(models: Sequence[str], base: TreeConfig, stages, work: Path, out_json: Path, *, limit: int | None,
        random_init: bool, keep_cache: bool, command: str, quick: bool, console: Console | None = None,
        data: str = "digits") -> dict:
    console = console or Console(stderr=True, width=max(160, Console(stderr=True).width))
    if not random_init:
        from klas.zoo import train_named

        train_named(models, base.root, console)  # outside the benchmark's clock, as klas zoo would
    started = time.perf_counter()
    info = machine_info()
    cache = build_family_cache(models, work / "cache", SimpleNamespace(limit=limit, random_init=random_init), base.root,
                               keep_cache, data=data)
    say = lambda m: console.print(m, markup=False, highlight=False)  # noqa: E731
    say(f"cache {cache.path}: {dict(cache.manifest['splits'])} ({time.perf_counter() - started:.0f} s)")
    quiet = Console(file=io.StringIO(), width=160)  # the runs' own plan tables and progress stay out of the report
    rep = tree_sweep(cache.path, work / "runs", base, stages, console=quiet, progress=False, say=say)
    rep.update(command=command, quick=quick, model_specs=list(models), data=data, machine=info, flops=FLOPS_CONVENTION,
               accuracy_unit="fraction", versions=package_versions())
    rep["machine"]["load_average_at_end"] = list(os.getloadavg())
    rep["wall_s"] = time.perf_counter() - started
    write_json_atomic(out_json, rep)
    plot(rep, out_json.with_suffix(".png"))
    console.print(GainReport.from_json(rep["gains"]).table())
    for st in rep["stages"]:
        console.print(stage_table(rep, st))
    f = rep["final"]
    console.print(f"chosen recipe (score split): {rep['chosen']}; eval top-1 {100 * f['mean_eval']:.2f} %, recovered "
                  f"{100 * f['mean_recovered']:.1f} % of the gain (mean over share points)", markup=False)
    console.print(f"wrote {out_json} and {out_json.with_suffix('.png')} in {rep['wall_s']:.0f} s")
    return rep


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="reduced version: two tiny models, 3 steps per epoch, two stages")
    ap.add_argument("--models", help=f"M1,M2[,...]: zoo names or ALIAS:NAME=weights (default {','.join(FULL_MODELS)})")
    ap.add_argument("--limit", type=int, help=f"images per split (default {FULL_LIMIT}; quick 60)")
    ap.add_argument("--data", default="digits", help="built-in digits set: digits (default, make demo-tree's) or digits-hard")
    ap.add_argument("--stages", help="FIELD=v1,v2;... (default: " + "; ".join(
        f"{s.field}={','.join(map(str, s.values))}" for s in DEFAULT_STAGES) + ")")
    ap.add_argument("--trunk", help="fix the trunk (default: klas tree's choice)")
    ap.add_argument("--trunk-rule", help="without --trunk: score (klas tree's default) or floor (the best single model)")
    ap.add_argument("--share-at", help="fix the share points s1,s2,... (default: klas tree's auto choice)")
    ap.add_argument("--points", type=int, help="auto share points (default 3)")
    ap.add_argument("--steps-per-epoch", type=int, help="default: one pass over probe-train")
    ap.add_argument("--random-init", action="store_true", help="untrained models (development only)")
    ap.add_argument("--work", help="scratch directory (default ROOT/bench-tree[-quick]); finished runs there are reused")
    ap.add_argument("--keep-cache", action="store_true", help="reuse the scratch cache of an earlier run")
    ap.add_argument("--root", default=str(DEFAULT_ROOT), help="klas cache root holding the zoo and the digits data")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/tree[.quick].json)")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    models = tuple(m.strip() for m in (args.models or ",".join(QUICK_MODELS if args.quick else FULL_MODELS)).split(","))
    names = [parse_spec(m).name for m in models]
    over = {k: v for k, v in (("trunk", args.trunk), ("trunk_rule", args.trunk_rule), ("share_at", parse_share_at(args.share_at)), ("points", args.points),
                              ("steps_per_epoch", args.steps_per_epoch)) if v is not None}
    base = TreeConfig(**(QUICK if args.quick else {}), models=tuple(names), device=args.device, root=Path(args.root))
    base = base.with_overrides(**over)
    stages = parse_stages(args.stages) if args.stages else (parse_stages(QUICK_STAGES) if args.quick else DEFAULT_STAGES)
    suffix = ".quick" if args.quick else ""
    out_json = Path(args.out) if args.out else RESULTS / f"tree{suffix}.json"
    work = Path(args.work) if args.work else Path(args.root) / f"bench-tree{'-quick' if args.quick else ''}"
    command = " ".join(["python", "benchmarks/bench_tree.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    limit = args.limit or (60 if args.quick else FULL_LIMIT)
    return run(models, base, stages, work, out_json, limit=limit, random_init=args.random_init, keep_cache=args.keep_cache,
               command=command, quick=args.quick, data=args.data)


if __name__ == "__main__":
    main()
