"""Every klas stage on a CUDA machine in one prepared command, with the checks that prove the GPU path.

    make gpu-check                                  # = PYTHONPATH=. python benchmarks/bench_gpu.py
    PYTHONPATH=. python benchmarks/bench_gpu.py --device cpu --small --out /tmp/gpu.json   # the same, tiny, on CPU

Runs from a checkout with no installation (torch, timm, numpy, scipy, pyarrow, safetensors, rich,
scikit-learn and matplotlib are all it needs) and downloads nothing. On real timm architectures with
random weights at 224 px (deit_tiny/small/base_patch16_224 and resnet50 for a cross-family pair;
``--small``: the demo family's klas_vit_ti, klas_vit_s and klas_resnet_s at 32 px) over a synthetic
ImageFolder of JPEGs (klas's digits generator, 10 classes, written under ``--work``) it runs, through
klas's library API:

1. ``klas cache --amp bf16 --workers auto``: images/s against a bare forward of the same models with
   the same loader, workers, pinned memory and precision (benchmarks/bench_cache.py's; target >= 0.9);
2. ``klas search``: wall time, its probe training's and scoring's parts, and the KL scorer's GFLOP/s against a
   plain matmul of the same shape on the device (benchmarks/bench_scorer.py's synthetic logits; target >= 0.7);
3. ``klas train`` with the default recipe (``--amp bf16``) on the ~20 selected stitches for a few
   hundred steps: steps/s, peak memory; then the resume check's trainings;
4. ``klas export pareto --models``, every exported model evaluated again;
5. ``klas tree`` and ``klas export tree``.

Checks (each printed pass/fail; the exit status is 1 if one fails):

* **costs**: every model's per-block MACs counted on the device equal its count on the meta device;
* **bf16 features**: the bf16 cache's features and logits of the first eval images are within
  :data:`klas.cache.compare.BF16_TOLERANCE` (relative error, worst representation) of the same models
  recomputed in float32 on the CPU (the bound is justified in klas/cache/compare.py);
* **resume**: a training stopped after its first epoch and resumed equals the uninterrupted one, every
  trained tensor and every accuracy (:func:`klas.train.compare_runs`), both run under torch's
  deterministic algorithms (by default several CUDA kernels, cuBLAS's among them, may sum in a varying
  order, so two uninterrupted runs could differ in the last bits); ops torch has no deterministic
  kernel for (on CUDA: bilinear resampling's backward, used by the bridges between grids, and adaptive
  average pooling's) still run and are named, and when the runs differ an uninterrupted repeat says
  whether the device or the resume is to blame;
* **export**: every exported model gets as many eval images right, evaluated on the device with the
  run's precision and batch size, as ``results.parquet`` records (:func:`klas.export.reproduce_artifacts`).

Writes ``benchmarks/results/gpu.json`` (``--out``; with ``--small`` only where ``--out`` says): device,
torch, CUDA, sizes, timings, measurements and checks. GFLOPs of models follow fvcore (one
multiply-add = one FLOP); the scorer's GFLOP/s count two per multiply-add (hardware convention).
"""
from __future__ import annotations

import argparse
import io
import os
import shlex
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from rich.console import Console
from rich.table import Table

# cuBLAS is deterministic under torch's deterministic algorithms only with a fixed workspace, set before
# CUDA starts (the resume check trains under them); a workspace of 8 x 4 MiB costs the other stages nothing.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's klas, also when run from elsewhere
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_cache import bare_forward  # noqa: E402
from bench_scorer import bench_matmul, chunk_rows, stream, synthetic_chunk, timed  # noqa: E402

from klas.cache import build_cache, open_cache  # noqa: E402
from klas.cache.compare import BF16_TOLERANCE, feature_agreement, recompute  # noqa: E402
from klas.data import DigitsConfig, build_transform, generate_digits, make_splits, open_source, resolve_workers  # noqa: E402
from klas.export import export_pareto, export_tree, reproduce_artifacts  # noqa: E402
from klas.models import load_model  # noqa: E402
from klas.score import kl_matrix  # noqa: E402
from klas.search import probe_index, search  # noqa: E402
from klas.train import compare_runs, train_run  # noqa: E402
from klas.tree import tree_run  # noqa: E402
from klas.utils import FLOPS_CONVENTION, machine_info, package_versions, peak_rss, resolve_device, write_json_atomic  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "gpu.json"
AMP = "bf16"


@dataclass(frozen=True)
class Plan:
    """The sizes of one run."""

    models: tuple[str, ...]
    images: int  # JPEGs written (10 classes), split 60/20/20 by klas
    pixels: int  # side of the generated digits; JPEGs are written at ``jpeg_side``
    jpeg_side: int
    batch_size: int
    train_epochs: int
    train_steps: int  # per epoch
    tree_steps: int  # per epoch, 1 epoch of ffm
    probe_epochs: int
    reference_rows: int  # eval images recomputed in float32 on the CPU
    scorer: tuple[tuple[int, int, int], ...]  # (probes P, samples N, classes C)
    timing_repeats: int
    latency: bool  # klas train and klas tree time every network (off in --small: seconds of CPU for nothing)


FULL = Plan(("deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224", "resnet50"),
            images=3000, pixels=64, jpeg_side=256, batch_size=64, train_epochs=2, train_steps=100, tree_steps=25,
            probe_epochs=10, reference_rows=64, scorer=((39, 10_000, 1000), (150, 10_000, 1000)), timing_repeats=3,
            latency=True)
SMALL = Plan(("klas_vit_ti", "klas_vit_s", "klas_resnet_s"), images=200, pixels=32, jpeg_side=32, batch_size=16,
             train_epochs=2, train_steps=3, tree_steps=2, probe_epochs=2, reference_rows=16,
             scorer=((39, 1000, 100),), timing_repeats=1, latency=False)


class Clock:
    """Wall seconds per stage, CUDA work included."""

    def __init__(self, dev: torch.device) -> None:
        self.dev, self.seconds = dev, {}

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        sync(self.dev)
        t0 = time.perf_counter()
        out = fn()
        sync(self.dev)
        self.seconds[name] = round(time.perf_counter() - t0, 3)
        return out


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def write_images(out: Path, plan: Plan) -> Path:
    """A 10-class ImageFolder of ``plan.images`` JPEGs from klas's digits generator."""
    from PIL import Image

    images, labels, _ = generate_digits(DigitsConfig(variants=-(-plan.images // 1797), size=plan.pixels))
    for i in range(plan.images):
        folder = out / str(int(labels[i]))
        folder.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(images[i])
        if plan.jpeg_side != plan.pixels:
            img = img.resize((plan.jpeg_side, plan.jpeg_side), Image.BILINEAR)
        img.save(folder / f"{i:05d}.jpg", quality=90)
    return out


def check(passed: bool, detail: str, **data: Any) -> dict:
    return {"passed": bool(passed), "detail": detail, **data}


# -- stage 1: cache ---------------------------------------------------------------------------------------------


def cache_stage(env: dict, plan: Plan, report: dict) -> None:
    dev, workers, clock = env["device"], env["workers"], env["clock"]
    source = open_source(str(env["data"]))
    splits = make_splits(source)
    models = clock.run("bare_models", lambda: [load_model(m, random_init=True, device=dev) for m in plan.models])
    transform = build_transform(models[0].data_config)
    run_bare = lambda s: bare_forward(models, source, s, transform, plan.batch_size, device=str(dev), amp=AMP, workers=workers)  # noqa: E731
    clock.run("bare_warmup", lambda: run_bare({"eval": splits["eval"]}))
    bare_s = clock.run("bare_forward", lambda: run_bare(splits))
    del models
    empty_cache(dev)
    loaded_at: list[float] = []
    summary = clock.run("cache", lambda: build_cache(
        list(plan.models), str(env["data"]), env["cache"], random_init=True, batch_size=plan.batch_size,
        workers=workers, device=str(dev), amp=AMP, console=env["log"], progress=False,
        on_loaded=lambda _: loaded_at.append(time.perf_counter())))
    cache_s = time.perf_counter() - loaded_at[0]
    images = sum(len(s.ids) for s in splits.values())
    report["measurements"]["cache"] = {
        "images": images, "models": list(plan.models), "workers": workers, "amp": AMP, "batch_size": plan.batch_size,
        "bare_images_per_s": images / bare_s, "cache_images_per_s": images / cache_s,
        "ratio": bare_s / cache_s, "target": 0.9,
        "cache_seconds_total": summary.seconds, "cache_seconds_after_models_loaded": cache_s,
        "gflops": {r["model"]: r["gflops"] for r in summary.rows},
    }


def empty_cache(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def costs_check(env: dict) -> dict:
    """Each model's profile on the device (the cache's) against the same model's on the meta device."""
    cache = open_cache(env["cache"])
    size = tuple(cache.manifest["data"]["preprocess"]["input_size"])
    differing, macs = [], {}
    for m in cache.manifest["models"]:
        meta = load_model(m["spec"], random_init=True, device="meta", input_size=size, num_classes=len(cache.classes))
        macs[m["name"]] = [cache.profiles[m["name"]].macs, meta.profile.macs]
        if meta.profile != cache.profiles[m["name"]]:
            differing.append(m["name"])
    detail = f"{len(macs)} models, per-block MACs and shapes equal" if not differing else f"differ: {', '.join(differing)}"
    return check(not differing, detail, macs_device_vs_meta=macs)


def bf16_check(env: dict, plan: Plan) -> dict:
    cache = open_cache(env["cache"])
    rows = range(min(plan.reference_rows, len(cache.ids("eval"))))
    reference = env["clock"].run("fp32_cpu_reference", lambda: recompute(cache, "eval", rows, device="cpu"))
    errors = feature_agreement(cache, "eval", rows, reference)
    worst = max(max(e.values()) for e in errors.values())
    return check(worst <= BF16_TOLERANCE, f"worst relative error {worst:.2e} <= {BF16_TOLERANCE:g} over {len(rows)} eval "
                 f"images" if worst <= BF16_TOLERANCE else f"worst relative error {worst:.2e} > {BF16_TOLERANCE:g}",
                 tolerance=BF16_TOLERANCE, relative_errors=errors, rows=len(rows))


# -- stage 2: search --------------------------------------------------------------------------------------------


def search_stage(env: dict, plan: Plan, report: dict) -> None:
    dev, clock = env["device"], env["clock"]
    result = clock.run("search", lambda: search(env["cache"], env["run"], device=str(dev), probe_epochs=plan.probe_epochs,
                                                console=env["log"], progress=False))
    report["measurements"]["search"] = {
        "probes": len(probe_index(open_cache(env["cache"]))), "selected_stitches": len(result.selection["stitches"]),
        "seconds": result.seconds, "probe_training_seconds": result.timings["probe_training"],
        "scoring_seconds": result.timings["scoring"],
        "scorer": [scorer_speed(p, n, c, dev, plan.timing_repeats) for p, n, c in plan.scorer],
    }


def scorer_speed(probes: int, samples: int, classes: int, dev: torch.device, repeats: int) -> dict:
    """The KL scorer's GEMM rate against a plain matmul of its per-chunk shape (bench_scorer.py's method)."""
    rows = chunk_rows(probes, classes)
    chunk = synthetic_chunk(probes, rows, classes, dev)
    kl_matrix(stream(chunk, rows), device=dev)  # warm-up
    t_scorer, _ = timed(lambda: kl_matrix(stream(chunk, samples), device=dev), dev, repeats)
    t_matmul = bench_matmul(probes, rows, classes, samples, dev, repeats)
    flops = 2.0 * probes**2 * samples * classes
    return {"P": probes, "N": samples, "C": classes, "scorer_gflops": flops / t_scorer / 1e9,
            "matmul_gflops": flops / t_matmul / 1e9, "ratio": t_matmul / t_scorer, "target": 0.7}


# -- stage 3: train ---------------------------------------------------------------------------------------------


def train_stage(env: dict, plan: Plan, report: dict) -> dict:
    """The timed run, then the resume check (:func:`resume_check`) on copies of the searched run."""
    dev, clock, run = env["device"], env["clock"], env["run"]
    copies = {k: run.parent / f"{run.name}-{k}" for k in ("straight", "resumed", "repeat")}
    for copy in copies.values():
        shutil.copytree(run, copy)  # the same selection: search is deterministic, a copy saves running it again
    opts = dict(epochs=plan.train_epochs, steps_per_epoch=plan.train_steps, batch_size=plan.batch_size, amp=AMP,
                latency=plan.latency, device=str(dev), console=env["log"], progress=False)
    result, peak = measure_peak(dev, lambda: clock.run("train", lambda: train_run(run, **opts)))
    steps = sum(h["steps"] for h in result.history)
    report["measurements"]["train"] = {
        "stitches": sum(r["kind"] == "stitch" for r in result.rows), "networks": len(result.rows), "steps": steps,
        "steps_per_s": steps / sum(h["seconds"] for h in result.history), "peak_memory_bytes": peak[0],
        "peak_memory": peak[1], "seconds": result.seconds, "phases_s": result.timings,
        "best_stitch_acc": max((r["acc_after"] for r in result.rows if r["kind"] == "stitch"), default=None),
    }
    return resume_check(clock, copies, {**opts, "latency": False})


def resume_check(clock: Clock, runs: dict[str, Path], opts: dict) -> dict:
    """An uninterrupted run against one stopped after its first epoch and resumed, both under torch's
    deterministic algorithms (module docstring). An op without a deterministic kernel still runs and
    is named; when the runs differ, an uninterrupted repeat tells the device's own nondeterminism from
    a resume that changed the training."""
    with deterministic() as caught:
        clock.run("train_straight", lambda: train_run(runs["straight"], **opts))
        clock.run("train_interrupted", lambda: train_run(runs["resumed"], stop_after=1, **opts))
        clock.run("train_resumed", lambda: train_run(runs["resumed"], resume=True, **opts))
        same = compare_runs(runs["straight"], runs["resumed"])
        if not same["identical"]:
            clock.run("train_repeat", lambda: train_run(runs["repeat"], **opts))
    ops = sorted({str(w.message).split(" does not have")[0] for w in caught if "deterministic" in str(w.message)})
    same["nondeterministic_ops"] = ops
    if same["identical"]:
        return check(True, f"{same['tensors']} trained tensors and every accuracy equal", **same)
    control = compare_runs(runs["straight"], runs["repeat"])
    why = (f"an uninterrupted repeat differs too: the device is not deterministic ({', '.join(ops) or 'no op named'})"
           if not control["identical"] else "an uninterrupted repeat is identical: resuming changed the training")
    return check(False, f"max |difference| {same['max_abs_diff']:.2e}; {why}", **same, repeat=control)


@contextmanager
def deterministic() -> Iterator[list]:
    """torch's deterministic algorithms, warn-only (an op without one still runs); yields the warnings."""
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield caught
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def measure_peak(dev: torch.device, fn: Callable[[], Any]) -> tuple[Any, tuple[int, str]]:
    """``fn()`` and its peak memory: CUDA allocations above the start, or the process's resident set on CPU."""
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        out = fn()
        return out, (torch.cuda.max_memory_allocated(dev) - before, "torch.cuda.max_memory_allocated above the start")
    box: list = []
    peak, _, how = peak_rss(lambda: box.append(fn()))
    return box[0], (peak, f"process peak resident set ({how})")


# -- stage 4 and 5: export, tree --------------------------------------------------------------------------------


def export_stage(env: dict, report: dict) -> dict:
    dev, clock = env["device"], env["clock"]
    res = clock.run("export", lambda: export_pareto(env["run"], models=True, device=str(dev), console=env["log"]))
    rows = clock.run("export_reevaluated", lambda: reproduce_artifacts(
        env["run"], device=dev, workers=env["workers"], preload_limit_gb=0))
    report["measurements"]["export"] = {"front": len(res.front), "models": len(res.models), "seconds": res.seconds}
    wrong = [r for r in rows if not r["reproduced"]]
    detail = (f"{len(rows)} models, each {rows[0]['images']} eval images, the recorded count of correct ones"
              if rows and not wrong else
              "no exported model" if not rows else
              "differ: " + ", ".join(f"{r['id']} {r['measured']} vs {r['recorded']}" for r in wrong[:3]))
    return check(bool(rows) and not wrong, detail, models=rows)


def tree_stage(env: dict, plan: Plan, report: dict) -> None:
    dev, clock = env["device"], env["clock"]
    tree_dir = env["run"].parent / "tree"
    res = clock.run("tree", lambda: tree_run(env["cache"], tree_dir, device=str(dev), epochs=1,
                                             steps_per_epoch=plan.tree_steps, batch_size=plan.batch_size,
                                             probe_epochs=plan.probe_epochs, latency=plan.latency, console=env["log"],
                                             progress=False))
    clock.run("export_tree", lambda: export_tree(tree_dir, device=str(dev), console=env["log"]))
    report["measurements"]["tree"] = {"trees": len(res.manifest["trees"]), "trunk": res.manifest["trunk"],
                                      "seconds": res.seconds}


# -- the run ----------------------------------------------------------------------------------------------------


def run_all(env: dict, plan: Plan, report: dict) -> None:
    checks = report["checks"]
    env["clock"].run("images", lambda: write_images(env["data"], plan))
    cache_stage(env, plan, report)
    checks["costs"] = costs_check(env)
    checks["bf16 features"] = bf16_check(env, plan)
    search_stage(env, plan, report)
    checks["resume"] = train_stage(env, plan, report)
    checks["export"] = export_stage(env, report)
    tree_stage(env, plan, report)


def device_info(dev: torch.device) -> dict:
    info = machine_info(dev)
    info["torch_cuda"] = torch.version.cuda  # the CUDA this torch was built for
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        info["gpu_memory_bytes"] = props.total_memory
        info["bf16_supported"] = torch.cuda.is_bf16_supported()
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def tables(report: dict) -> list[Table]:
    m = report["measurements"]
    t = Table(title=f"klas on {report['machine'].get('gpu', report['machine']['device'])} "
                    f"({'small' if report['small'] else 'full'} sizes, {report['wall_s']:.0f} s)")
    for col in ("stage", "measurement", "value", "target"):
        t.add_column(col, justify="left" if col != "value" else "right")
    if "cache" in m:
        c = m["cache"]
        t.add_row("cache", f"images/s, klas cache --amp {AMP} ({c['workers']} workers)", f"{c['cache_images_per_s']:.0f}", "")
        t.add_row("", "images/s, bare forward", f"{c['bare_images_per_s']:.0f}", "")
        t.add_row("", "ratio cache / bare", f"{c['ratio']:.2f}", ">= 0.9")
    if "search" in m:
        s = m["search"]
        t.add_row("search", f"wall s ({s['probes']} probes, {s['selected_stitches']} stitches selected)", f"{s['seconds']:.1f}", "")
        t.add_row("", "probe training s", f"{s['probe_training_seconds']:.1f}", "")
        t.add_row("", "scoring (KL of every probe pair) s", f"{s['scoring_seconds']:.1f}", "")
        for r in s["scorer"]:
            t.add_row("", f"scorer / matmul GFLOP/s (P {r['P']}, N {r['N']:,}, C {r['C']:,})",
                      f"{r['scorer_gflops']:.0f} / {r['matmul_gflops']:.0f} = {r['ratio']:.2f}", ">= 0.7")
    if "train" in m:
        r = m["train"]
        t.add_row("train", f"steps/s ({r['stitches']} stitches, {r['steps']} steps, batch {report['sizes']['batch_size']})",
                  f"{r['steps_per_s']:.1f}", "")
        t.add_row("", "peak memory MiB", f"{r['peak_memory_bytes'] / 2**20:.0f}", "")
    if "export" in m:
        t.add_row("export", f"front models written ({m['export']['models']})", f"{m['export']['seconds']:.1f} s", "")
    if "tree" in m:
        t.add_row("tree", f"trees trained (trunk {m['tree']['trunk']})", f"{m['tree']['trees']}", "")
    c = Table(title="checks")
    for col in ("check", "result", "detail"):
        c.add_column(col)
    for name, r in report["checks"].items():
        c.add_row(name, "[green]pass[/]" if r["passed"] else "[red]FAIL[/]", r["detail"])
    if report.get("error"):
        c.add_row("(run)", "[red]FAIL[/]", report["error"])
    return [t, c]


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="auto (CUDA when present), cuda[:N] or cpu")
    ap.add_argument("--small", action="store_true", help="tiny sizes (demo models at 32 px, 200 images): minutes on a CPU")
    ap.add_argument("--out", default=None, help=f"results JSON (default {RESULTS.relative_to(REPO)}; --small: none)")
    ap.add_argument("--work", default=None, help="where images, cache and runs go (default: a temporary directory, removed)")
    ap.add_argument("--verbose", action="store_true", help="show the stages' own output")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    plan = SMALL if args.small else FULL
    dev = resolve_device(args.device)
    out = Path(args.out) if args.out else (None if args.small else RESULTS)
    console = Console(width=max(Console().width, 140))
    with tempfile.TemporaryDirectory(prefix="klas-gpu-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        if work.exists() and any(work.iterdir()):
            raise SystemExit(f"--work {work} is not empty; give a new or empty directory")
        log = Console(stderr=True) if args.verbose else Console(file=io.StringIO(), width=140)
        env = {"device": dev, "workers": resolve_workers("auto" if dev.type == "cuda" else 2, dev),
               "clock": Clock(dev), "log": log, "data": work / "images", "cache": work / "cache", "run": work / "runs" / "run"}
        report: dict[str, Any] = {
            "command": "python " + shlex.join(["benchmarks/bench_gpu.py", *(argv if argv is not None else sys.argv[1:])]),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "small": args.small,
            "machine": device_info(dev), "versions": package_versions(), "sizes": asdict(plan),
            "flops": FLOPS_CONVENTION, "measurements": {}, "checks": {}, "timings_s": env["clock"].seconds}
        started = time.perf_counter()
        try:
            run_all(env, plan, report)
        except Exception as exc:  # record how far it got, then fail
            report["error"] = f"{exc.__class__.__name__}: {exc}"
            traceback.print_exc()
            if not args.verbose:
                sys.stderr.write(log.file.getvalue()[-6000:])
        report["wall_s"] = time.perf_counter() - started
    report["passed"] = not report.get("error") and all(c["passed"] for c in report["checks"].values())
    for t in tables(report):
        console.print(t)
    if out is not None:
        write_json_atomic(out, report)
        console.print(f"wrote {out}")
    console.print("[green]all checks passed[/]" if report["passed"] else "[red]a check failed[/]")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
