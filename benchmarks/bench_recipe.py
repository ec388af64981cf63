"""Which training recipe makes stitches pay off? One fixed selection, one variant per recipe choice.

    python benchmarks/bench_recipe.py --run cache/runs/demo-vit [--root cache] [--quick] [--variants a,b] [--out PATH]

The run directory is a finished ``klas search`` (the demo: ``klas search cache/demo-vit --run
cache/runs/demo-vit``, no budget, so the selection spans klas_vit_ti to klas_vit_b). Every variant
copies its ``selection.json`` into a run of its own under ``--work`` and trains it with
:func:`klas.train.train_run` from the same start (same seed: the same least-squares images, data
order and route sequence wherever the recipe allows). Each variant changes one thing against
``base``, ``klas train``'s defaults (anchors fine-tuned jointly at 0.1x the lr and sampled as routes,
``ce``, linear stitches, least squares on 100 images, 5 epochs, lr 3e-3).

Choosing uses the **score** split only: after training, :func:`klas.train.trained_net` rebuilds the
evaluated network and :func:`klas.train.evaluate_all` measures it on the cached score split; the
variants are ranked by the score split's hypervolume. The eval split numbers come from the run's
``results.parquet`` and are reported, never used to choose. Per split: mean stitch top-1, stitches on
the Pareto front of stitches + anchors *as trained in that variant*, and the normalised hypervolume
(:func:`klas.metrics.hypervolume` over [cheapest, largest anchor GFLOPs], reference = the cheapest
anchor's original accuracy on that split). Writes ``benchmarks/results/recipe[.quick].json``.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's klas, also when run from elsewhere

from klas.metrics import hypervolume, pareto_front  # noqa: E402
from klas.run import SELECTION, claim_run, open_run_cache, read_selection  # noqa: E402
from klas.stitch.network import StitchNet  # noqa: E402
from klas.term import make_console  # noqa: E402
from klas.train import SplitData, TrainConfig, evaluate_all, read_results, train_run, trained_net  # noqa: E402
from klas.utils import DEFAULT_ROOT, FLOPS_CONVENTION, package_versions, write_json_atomic  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
#: ``klas train``'s defaults (TrainConfig): joint training with anchor routes, ``ce``, the selection's stitch
#: layer (linear), least squares on 100 images, 5 epochs, lr 3e-3, anchors at 0.1x.
BASE: dict = {}
#: name -> (what changes against BASE, overrides)
VARIANTS: dict[str, tuple[str, dict]] = {  # in order of importance: a partial study keeps the first ones
    "base": ("klas train's defaults (joint, anchor routes, ce, linear, LS 100, 5 ep, lr 3e-3)", {}),
    "epochs-10": ("10 epochs", dict(epochs=10)),
    "epochs-20": ("20 epochs", dict(epochs=20)),
    "ce+distill": ("ce + distill (largest anchor)", dict(loss="ce=1,distill=1", teacher="largest")),
    "distill": ("distill from the largest anchor", dict(loss="distill", teacher="largest")),
    "anchor-lr-0.03": ("anchors at 0.03x the lr (0.1x)", dict(anchor_lr_scale=0.03)),
    "lr-1e-2": ("lr 1e-2", dict(lr=1e-2)),
    "mlp": ("mlp stitch layer", dict(layer="mlp")),
    "frozen": ("anchors frozen (stitch layers only)", dict(full_tune=False)),
    "lr-1e-3": ("lr 1e-3", dict(lr=1e-3)),
    "epochs-2": ("2 epochs", dict(epochs=2)),
    "ls-1000": ("least squares on 1000 images", dict(init_images=1000)),
    "lora": ("lora stitch layer (rank 8)", dict(layer="lora")),
    "ffm->ce": ("2 epochs ffm, then ce (Mai et al.)", dict(first_loss="ffm", first_epochs=2)),
    "no-anchor-routes": ("full-tune, anchors not sampled as routes", dict(anchor_routes=False)),
    "bucket": ("bucket sampling", dict(sampling="bucket")),
}
QUICK = dict(epochs=2, steps_per_epoch=3, init_images=32, batch_size=16, eval_batch_size=64)
QUICK_VARIANTS = ("frozen", "base", "ce+distill")


def split_metrics(rows: list[dict], acc: dict[str, float], y_ref: float) -> dict:
    """Mean stitch top-1, stitches on the front (stitches + anchors as trained) and hypervolume."""
    pts = [{"id": r["id"], "kind": r["kind"], "gflops": r["gflops"], "acc": acc[r["id"]]} for r in rows]
    anchors = sorted((p for p in pts if p["kind"] == "anchor"), key=lambda p: p["gflops"])
    front = pareto_front(pts, acc="acc")
    stitches = [p["acc"] for p in pts if p["kind"] == "stitch"]
    return {"mean_stitch": sum(stitches) / len(stitches), "front_stitches": sum(p["kind"] == "stitch" for p in front),
            "front": [p["id"] for p in front], "anchors": {p["id"]: p["acc"] for p in anchors},
            "hypervolume": hypervolume([(p["gflops"], p["acc"]) for p in pts], anchors[0]["gflops"],
                                       anchors[-1]["gflops"], y_ref)}


def original_anchor_accuracy(run_dir: Path, split: str, root: Path, batch: int) -> dict[str, float]:
    """The anchors' accuracy with their original weights (the hypervolume's reference)."""
    sel = read_selection(run_dir)
    cache = open_run_cache(sel, run_dir)
    names = [a["name"] for a in sel["anchors"]]
    models = [m for m in cache.load_models(device="cpu", root=root) if m.name in names]
    net = StitchNet.from_loaded(models, [])
    return evaluate_all(net, SplitData(cache, split, root=root), names, batch_size=batch, device=torch.device("cpu"))


def run_variant(name: str, overrides: dict, run_dir: Path, work: Path, root: Path, base: dict) -> dict:
    """Train one variant in its own copy of the run; its score-split accuracies and eval-split results."""
    vdir = work / name
    if vdir.exists():
        shutil.rmtree(vdir)
    claim_run(vdir)
    shutil.copy2(run_dir / SELECTION, vdir / SELECTION)
    cfg = TrainConfig(**{**base, **overrides, "root": root, "latency": False, "overwrite": True, "device": "cpu"})
    t0 = time.perf_counter()
    train_run(vdir, cfg, console=Console(file=io.StringIO()), progress=False)
    seconds = time.perf_counter() - t0
    rows = read_results(vdir)
    trained = trained_net(vdir, root=root)
    score = evaluate_all(trained.net, SplitData(trained.cache, "score", root=root), [r["id"] for r in rows],
                         batch_size=cfg.eval_batch_size, device=torch.device("cpu"))
    return {"rows": rows, "score": score, "eval": {r["id"]: r["acc_after"] for r in rows}, "seconds": seconds,
            "config": {**overrides}}


def table(report: dict) -> Table:
    t = Table(title=f"recipe study on {report['run']} ({report['stitches']} stitches); chosen by score-split HV; "
                    f"top-1 in %")
    for col in ("variant", "what changes", "score HV", "eval mean stitch", "eval stitches on front", "eval HV",
                "eval anchors", "train s"):
        t.add_column(col, justify="left" if col in ("variant", "what changes") else "right")
    for name, v in sorted(report["variants"].items(), key=lambda kv: -kv[1]["score"]["hypervolume"]):
        e = v["eval"]
        t.add_row(("* " if name == report["winner"] else "") + name, v["what"], f"{v['score']['hypervolume']:.3f}",
                  f"{100 * e['mean_stitch']:.1f}", f"{e['front_stitches']} / {report['stitches']}",
                  f"{e['hypervolume']:.3f}", " / ".join(f"{100 * a:.1f}" for a in e["anchors"].values()),
                  f"{v['seconds']:.0f}")
    return t


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, default=Path("cache/runs/demo-vit"), help="a finished klas search run")
    ap.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="klas cache root (demo weights and data)")
    ap.add_argument("--work", type=Path, default=None, help="where the variants' runs go (default: RUN-recipe)")
    ap.add_argument("--variants", default=None, help=f"comma-separated subset of {', '.join(VARIANTS)}")
    ap.add_argument("--quick", action="store_true", help=f"{', '.join(QUICK_VARIANTS)} with a few steps (a smoke test)")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/recipe[.quick].json)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (1 helps on a shared CPU)")
    ap.add_argument("--add", action="store_true",
                    help="keep the variants already in --out (same run and base) and add/replace the ones given")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.variants.split(",") if args.variants else list(QUICK_VARIANTS if args.quick else VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    base = {**BASE, **(QUICK if args.quick else {})}
    work = args.work or args.run.with_name(args.run.name + "-recipe")
    t0 = time.perf_counter()
    refs = {split: original_anchor_accuracy(args.run, split, args.root, 256) for split in ("score", "eval")}
    report = {"run": str(args.run), "base": base, "variants": {}, "flops": FLOPS_CONVENTION,
              "choice": "highest hypervolume on the score split; eval split reported only",
              "original_anchors": refs}
    console = make_console()
    out = args.out or RESULTS / ("recipe.quick.json" if args.quick else "recipe.json")
    if args.add:
        report["variants"] = earlier_variants(out, report)
    for name in names:
        what, overrides = VARIANTS[name]
        over = {k: v for k, v in overrides.items() if not (args.quick and k == "epochs")}
        res = run_variant(name, over, args.run, work, args.root, base)
        rows = res["rows"]
        cheapest = min((r for r in rows if r["kind"] == "anchor"), key=lambda r: r["gflops"])["id"]
        report["stitches"] = sum(r["kind"] == "stitch" for r in rows)
        report["variants"][name] = {"what": what, "overrides": over, "seconds": res["seconds"], "command": _command(argv),
                                    **{s: split_metrics(rows, res[s], refs[s][cheapest]) for s in ("score", "eval")}}
        console.print(f"{name}: score HV {report['variants'][name]['score']['hypervolume']:.3f}, "
                      f"eval front stitches {report['variants'][name]['eval']['front_stitches']} [{res['seconds']:.0f} s]")
        _finish(report, argv, t0, out, complete=name == names[-1])  # after every variant: a partial study survives
    console.print(table(report))
    console.print(f"winner on the score split: {report['winner']}  [{report['seconds']:.0f} s in all]")
    return report


def _command(argv) -> str:
    return "python benchmarks/bench_recipe.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))


def earlier_variants(out: Path, report: dict) -> dict:
    """The variants of an earlier study in ``out``, if it trained the same run from the same base."""
    if not out.exists():
        return {}
    old = json.loads(out.read_text())
    if old.get("run") != report["run"] or old.get("base") != report["base"]:
        sys.exit(f"error: {out} holds a study of another run or base recipe; drop --add or choose another --out")
    for split, acc in report["original_anchors"].items():
        if any(abs(acc[k] - v) > 1e-9 for k, v in old["original_anchors"].get(split, {}).items()):
            sys.exit(f"error: the anchors of {report['run']} changed since {out} was written; drop --add to start over")
    return old["variants"]


def _finish(report: dict, argv, t0: float, out: Path, complete: bool) -> None:
    """Winner so far, time, command and machine; written to ``out``."""
    report["winner"] = max(report["variants"], key=lambda n: report["variants"][n]["score"]["hypervolume"])
    report["complete"] = complete
    report["seconds"] = time.perf_counter() - t0
    report["command"] = _command(argv)
    report["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                         "versions": package_versions()}
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, report)


if __name__ == "__main__":
    main()
