"""Benchmark probe training (klas.probes.train_probes) as N grows: peak memory and time per epoch.

    python benchmarks/bench_search_scale.py [--quick] [--device auto|cpu|cuda] [--baseline-src DIR]

ImageNet-like shapes: three DeiT-like models (Ti, S, B) of 12 blocks plus the stem, 13
representations each (P = 39 probes), each representation cached with two pools side by side
(cls + mean: widths 384, 768 and 1,536, so Dmax = 1,536), C = 1,000 classes, labels mode (the
default ``--probe-target``). The features are written once, as a cache does, to one
``<split>/<model>/features.npy`` float16 array per model (N, 13 * width) plus ``labels.npy``;
the trainer gets the same column views of np.load(mmap_mode="r") arrays that
``Cache.rep_features`` hands to ``klas search``. A run at a smaller N reads the first N rows of the
same files. Values are seeded Gaussian noise: memory and time do not depend on them.

Each (trainer, N) runs one epoch (``min_steps=0``) in a fresh interpreter, so the numbers are
independent; ``--steps K`` stops every run after K optimiser steps and extrapolates the epoch
time (the streamed trainer's standardisation pass still reads all N rows once, and pages are
handed back after every batch, so a capped run already shows whether memory follows N).
Peak memory is the child's resident-set high-water mark (VmHWM, after the data were opened; reset through /proc/self/clear_refs just before the call where the kernel allows it),
reported whole and above the resident set before the call; on CUDA also
torch.cuda.max_memory_allocated. Time: the setup before the first step (standardisation
statistics, plus stacking all features for the in-memory trainer) and the median step time from
the progress callback; epoch = setup + steps x step.

``--baseline-src DIR`` also measures another klas checkout -- e.g. the in-memory trainer before
streaming, ``git archive de1eeaf klas | tar -x -C DIR`` -- through the same public call. Its
peak comes from holding all padded features before the first step, so it is stopped after
``--baseline-steps`` steps and its epoch time is extrapolated from them.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent

MODELS = [("deit_ti", 384), ("deit_s", 768), ("deit_b", 1536)]  # (name, width per representation: 2 pools)
REPS = 13  # 12 blocks + stem
NUM_CLASSES = 1000
SPLIT = "probe-train"
WRITE_ROWS = 4096


def write_cache_like(root: Path, n: int, seed: int = 0) -> None:
    """Write ``root/<split>/<model>/features.npy`` (n, 13 * width) float16 and ``labels.npy`` (n,) int64."""
    import numpy as np

    rng = np.random.default_rng(seed)
    split = root / SPLIT
    for name, width in MODELS:
        (split / name).mkdir(parents=True, exist_ok=True)
        out = np.lib.format.open_memmap(split / name / "features.npy", mode="w+", dtype=np.float16, shape=(n, REPS * width))
        for a in range(0, n, WRITE_ROWS):
            b = min(n, a + WRITE_ROWS)
            out[a:b] = rng.standard_normal((b - a, REPS * width), dtype=np.float32) * 2.0 + 0.5
        out.flush()
        del out
    np.save(split / "labels.npy", rng.integers(0, NUM_CLASSES, n))
    (root / "rows.json").write_text(json.dumps({"rows": n}))


def open_views(root: Path, n: int):
    """The trainer's inputs: P column views of the first ``n`` rows of each memmap, and labels (n,)."""
    import numpy as np

    views = []
    for name, width in MODELS:
        mm = np.load(root / SPLIT / name / "features.npy", mmap_mode="r")
        views += [mm[:n, r * width : (r + 1) * width] for r in range(REPS)]
    labels = np.array(np.load(root / SPLIT / "labels.npy", mmap_mode="r")[:n])  # as klas search: a writable copy
    return views, labels


class _Stop(Exception):
    """Raised from the progress callback to end a baseline run after a few steps."""


def _child(spec: dict) -> None:
    """Body of one measurement in a fresh interpreter; prints one JSON line."""
    sys.path.insert(0, spec["src"])
    import torch

    from klas.probes import train_probes  # before bench_scorer, which puts this repository first on sys.path
    from klas.utils import peak_rss, resolve_device

    assert Path(sys.modules["klas"].__file__).resolve().is_relative_to(Path(spec["src"]).resolve())
    dev = resolve_device(spec["device"])
    views, labels = open_views(Path(spec["data"]), spec["n"])
    stamps: list[float] = []

    def progress(step: int, total: int) -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        stamps.append(time.perf_counter())
        if spec["max_steps"] and step >= spec["max_steps"]:
            raise _Stop

    def run() -> None:
        try:
            train_probes(views, labels, NUM_CLASSES, epochs=1, min_steps=0, seed=0, device=dev, progress=progress)
        except _Stop:
            pass

    t0 = time.perf_counter()
    peak, before, how = peak_rss(run)
    wall = time.perf_counter() - t0
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    step_s = statistics.median(steps) if steps else float("nan")
    out = {
        "peak_rss_bytes": peak, "rss_before_bytes": before, "peak_above_before_bytes": peak - before,
        "method": how, "steps_run": len(stamps), "wall_s": wall,
        "setup_s": stamps[0] - t0 - (step_s if steps else 0.0), "step_s": step_s,
    }
    if dev.type == "cuda":
        out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(dev)
    print(json.dumps(out))


def measure(trainer: str, src: Path, data: Path, n: int, device: str, max_steps: int, batch: int) -> dict:
    """One (trainer, N) measurement in a fresh interpreter; adds the per-epoch estimate."""
    spec = {"src": str(src), "data": str(data), "n": n, "device": device, "max_steps": max_steps}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), str(BENCH)])}
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_child", json.dumps(spec)],
                         capture_output=True, text=True, cwd=REPO, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{trainer} at N={n} failed:\n{out.stderr[-3000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    steps_per_epoch = -(-n // batch)
    r.update(trainer=trainer, N=n, steps_per_epoch=steps_per_epoch,
             epoch_s=r["setup_s"] + steps_per_epoch * r["step_s"],
             epoch_extrapolated=r["steps_run"] < steps_per_epoch)
    return r


def print_table(results: list[dict], info: dict, quick: bool, ratio: float, target: float) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 140))
    t = Table(title=f"Probe training, P = 39, Dmax = 1,536, C = 1,000, one epoch, on {info['device']} "
                    f"({info['cpu_count']} CPUs, {info['torch_threads']} threads){' [quick]' if quick else ''}")
    for col in ("trainer", "N", "peak RSS MiB", "above start MiB", "CUDA peak MiB", "setup s", "s / step", "epoch s", "steps run"):
        t.add_column(col, justify="right")
    for r in results:
        cuda = f"{r['cuda_max_allocated_bytes'] / 2**20:,.0f}" if "cuda_max_allocated_bytes" in r else "-"
        t.add_row(r["trainer"], f"{r['N']:,}", f"{r['peak_rss_bytes'] / 2**20:,.0f}", f"{r['peak_above_before_bytes'] / 2**20:,.0f}",
                  cuda, f"{r['setup_s']:.1f}", f"{r['step_s']:.3f}",
                  f"{r['epoch_s']:.0f}{' (extrap.)' if r['epoch_extrapolated'] else ''}", f"{r['steps_run']}/{r['steps_per_epoch']}")
    console.print(t)
    console.print(f"streamed peak RSS, largest N / smallest N: {ratio:.3f} (target <= {target:.2f}: "
                  f"{'met' if ratio <= target else 'NOT met'}). memory: {results[0]['method']}; each row a fresh process.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="N = 2,000 vs 10,000 (same P, Dmax, C), 3 steps each")
    ap.add_argument("--device", default="cpu", help="cpu (default), auto or cuda[:N]")
    ap.add_argument("--baseline-src", default=None, help="another klas checkout (folder holding klas/) to measure the same way")
    ap.add_argument("--baseline-steps", type=int, default=3, help="steps the baseline runs before it is stopped")
    ap.add_argument("--steps", type=int, default=0, help="stop the streamed runs after this many steps too (0: a full epoch)")
    ap.add_argument("--baseline-max-n", type=int, default=0, help="measure the baseline only up to this N (0: every N)")
    ap.add_argument("--data", default=None, help="folder for the synthetic cache (default: a temporary one, removed after)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "search_scale.json"))
    ap.add_argument("--_child", dest="child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        _child(json.loads(args.child))
        return

    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(BENCH))
    import torch

    from klas.probes import DEFAULT_BATCH_SIZE
    from klas.probes.train import training_bytes
    from klas.utils import machine_info, resolve_device, write_json_atomic

    sizes = (2_000, 10_000) if args.quick else (10_000, 50_000)
    steps = 3 if args.quick else args.steps
    baseline_steps = min(steps, args.baseline_steps) if steps else args.baseline_steps
    data = Path(args.data) if args.data else Path(tempfile.mkdtemp(prefix="klas-scale-"))
    info = machine_info(resolve_device(args.device))
    started = time.perf_counter()
    try:
        rows = json.loads((data / "rows.json").read_text())["rows"] if (data / "rows.json").is_file() else 0
        if rows < max(sizes):
            write_cache_like(data, max(sizes))
        write_s = time.perf_counter() - started
        results = [measure("streamed", REPO, data, n, args.device, steps, DEFAULT_BATCH_SIZE) for n in sizes]
        for n in sizes if args.baseline_src else ():
            if args.baseline_max_n and n > args.baseline_max_n:
                continue
            results.append(measure("in-memory (baseline)", Path(args.baseline_src).resolve(), data, n, args.device,
                                   baseline_steps, DEFAULT_BATCH_SIZE))
    finally:
        if not args.data:
            shutil.rmtree(data, ignore_errors=True)
    target = 1.10
    ratio = results[1]["peak_rss_bytes"] / results[0]["peak_rss_bytes"]
    print_table(results, info, args.quick, ratio, target)
    p, dmax = REPS * len(MODELS), max(w for _, w in MODELS)
    report = {
        "command": " ".join(["python", "benchmarks/bench_search_scale.py", *sys.argv[1:]]),
        "quick": args.quick,
        "machine": info,
        "shapes": {"P": p, "Dmax": dmax, "C": NUM_CLASSES, "widths": {m: w for m, w in MODELS}, "N": list(sizes),
                   "batch": DEFAULT_BATCH_SIZE, "feature_bytes_at_max_N": max(sizes) * REPS * sum(w for _, w in MODELS) * 2,
                   "padded_bytes_at_max_N": p * max(sizes) * dmax * 2},
        "streamed_working_set_estimate_bytes": training_bytes(p, dmax, NUM_CLASSES, DEFAULT_BATCH_SIZE),
        "streamed_peak_ratio": ratio,
        "target_ratio": target,
        "target_met": ratio <= target,
        "torch": torch.__version__,
        "write_s": write_s,
        "results": results,
        "wall_s": time.perf_counter() - started,
    }
    write_json_atomic(Path(args.out), report)
    print(f"wrote {args.out} ({report['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
