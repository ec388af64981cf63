"""Wall time of ``klas cache`` against a bare forward pass of the same models over the same data.

Both sides load and preprocess each batch once and run all k models on it; the cache additionally
pools every block's output, converts to float16 and writes memory-mapped files with resumable
progress. Runs alternate (bare, cache, bare, cache, ...) and the ratio of medians is reported, so
machine noise hits both sides alike. Target: ratio <= 1.15.

    python benchmarks/bench_cache.py [--quick] [--models klas_vit_ti,klas_vit_s,klas_vit_b]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import klas.zoo  # noqa: F401  registers the demo architectures with timm
from klas.cache import build_cache
from klas.data import SplitDataset, build_transform, make_loader, make_splits, open_source
from klas.models import load_model
from klas.optim import autocast, parse_amp
from klas.utils import DEFAULT_ROOT, package_versions

RESULTS = Path(__file__).parent / "results" / "cache.json"


def bare_forward(models, source, splits, transform, batch_size: int, *, device: str = "cpu", amp: str | None = None,
                 workers: int = 0) -> float:
    """Seconds to push every split through every model, nothing stored: the batches, loader processes,
    pinned memory and mixed precision of ``klas cache`` (:func:`klas.data.make_loader`), its forward passes
    without pooling, float16 conversion or writes."""
    dev = torch.device(device)
    dtype = parse_amp(amp, dev)
    start = time.perf_counter()
    with torch.inference_mode():
        for split in splits.values():
            n = len(split.ids)
            batches = [list(range(s, min(n, s + batch_size))) for s in range(0, n, batch_size)]
            for x, _, _ in make_loader(SplitDataset(source, split, transform), batches, workers, dev):
                x = x.to(dev, non_blocking=True)
                with autocast(dev, dtype):
                    for m in models:
                        m.adapter(x)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
    return time.perf_counter() - start


def cached(names, limit: int, batch_size: int, root: Path) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        build_cache(names, "digits", Path(tmp) / "c", random_init=True, limit=limit, batch_size=batch_size,
                    root=root, progress=False, latency_batch=())  # the features alone (no latency profile)
        return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="klas_vit_ti,klas_vit_s,klas_vit_b")
    ap.add_argument("--limit", type=int, default=600, help="images per split")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="limit 128, 2 repeats")
    args = ap.parse_args()
    if args.quick:
        args.limit, args.repeats = 128, 2
    names = args.models.split(",")
    root = DEFAULT_ROOT
    models = [load_model(n, random_init=True, root=root) for n in names]
    source = open_source("digits", root=root)
    splits = make_splits(source, limit=args.limit)
    transform = build_transform(models[0].data_config)
    bare_forward(models, source, splits, transform, args.batch_size)  # warm-up: digits generation, kernels

    bare, cache = [], []
    for _ in range(args.repeats):
        bare.append(bare_forward(models, source, splits, transform, args.batch_size))
        cache.append(cached(names, args.limit, args.batch_size, root))
    images = sum(len(s.ids) for s in splits.values())
    ratio = statistics.median(cache) / statistics.median(bare)
    result = {
        "command": "python " + " ".join(sys.argv),
        "models": names,
        "images": images,
        "batch_size": args.batch_size,
        "bare_seconds": bare,
        "cache_seconds": cache,
        "ratio_of_medians": ratio,
        "target": 1.15,
        "machine": {"cpus": torch.get_num_threads(), "device": "cpu", "platform": platform.platform()},
        "versions": package_versions(),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    table = Table(title=f"klas cache vs bare forward ({images} images, {len(names)} models, batch {args.batch_size})")
    for col in ("run", "median s", "all runs s"):
        table.add_column(col)
    table.add_row("bare forward", f"{statistics.median(bare):.2f}", ", ".join(f"{t:.2f}" for t in bare))
    table.add_row("klas cache", f"{statistics.median(cache):.2f}", ", ".join(f"{t:.2f}" for t in cache))
    Console().print(table)
    Console().print(f"ratio cache / bare = [bold]{ratio:.3f}[/] (target <= 1.15); written to {RESULTS}")


if __name__ == "__main__":
    main()
