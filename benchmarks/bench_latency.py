"""How well the latency predictor predicts: median and worst relative error over every network of a run.

For each family the script builds a cache (random-init weights: latency does not depend on them) with
this device's latency profile, searches it (every model pair both ways, the default bucket rule), and
times every selected stitch and every anchor as ``klas train`` times them (one warm-up per model,
median of repeats), beside the profile's prediction (:mod:`klas.stitch.latency`):

* ``demo``: the demo ViT family (klas_vit_ti / s / b, 32 px digits), at batch 1 and 64;
* ``real``: DeiT-Ti / S / B at 224 px (timm architectures, random init), at batch 1.

    python benchmarks/bench_latency.py            # both families (minutes on 2 CPU cores)
    python benchmarks/bench_latency.py --quick    # smoke test: two models per family, batch 1, 8 networks

Published figures need a quiet machine: every number is a wall-clock measurement. Every network is
timed twice, one pass over all of them after the other; the *retest* columns (|second - first| / first)
are the clock's own repeatability on this machine, the floor under the predictor's error.
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

from klas.cache import build_cache
from klas.search import search
from klas.term import make_console
from klas.train.latency import check_predictor
from klas.utils import DEFAULT_ROOT, package_versions

RESULTS = Path(__file__).parent / "results" / "latency.json"
FAMILIES = {
    "demo": {"models": ["klas_vit_ti", "klas_vit_s", "klas_vit_b"], "input_size": None, "batches": [1, 64]},
    "real": {"models": ["deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224"],
             "input_size": 224, "batches": [1]},
}


def run_family(name: str, spec: dict, work: Path, args, console: Console) -> list[dict]:
    """Cache + profile, search, then the predictor against the clock at each batch size."""
    pre = {"input_size": [3, spec["input_size"], spec["input_size"]]} if spec["input_size"] else None
    t0 = time.perf_counter()
    build_cache(spec["models"], "digits", work / "cache", random_init=True, limit=args.limit, preprocess=pre,
                latency_batch=tuple(spec["batches"]), latency_repeats=args.repeats, root=args.root, console=console)
    search(work / "cache", work / "run", direction="both", probe_epochs=1, console=console, progress=False)
    rows = []
    for batch in spec["batches"]:
        report = check_predictor(work / "run", batch=batch, repeats=args.repeats, root=args.root, limit=args.networks,
                                 passes=2)
        err = report.errors()
        summary = report.summary()
        retest, again = report.retest_changes(), report.retests[0]
        rows.append({"family": name, "models": spec["models"], "batch": batch, "networks": len(err),
                     "median_abs_rel_error": summary["median"], "worst_abs_rel_error": summary["worst"],
                     "retest_median": statistics.median(retest), "retest_worst": max(retest),
                     "profile": report.profile,
                     "per_network": {i: {"measured_ms": report.measured[i], "predicted_ms": report.predicted[i],
                                         "retest_ms": again[i], "rel_error": e} for i, e in err.items()}})
    console.print(f"{name}: {time.perf_counter() - t0:.0f} s")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", action="append", choices=list(FAMILIES), help="default: both")
    ap.add_argument("--limit", type=int, default=32, help="images per split of each cache (search only)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (the median is kept)")
    ap.add_argument("--networks", type=int, default=None, help="time only the N cheapest networks of each run")
    ap.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="klas root (the digits data)")
    ap.add_argument("--quick", action="store_true", help="two models per family, batch 1, 8 networks, 3 repeats")
    args = ap.parse_args()
    families = {k: dict(FAMILIES[k]) for k in (args.family or FAMILIES)}
    if args.quick:
        args.limit, args.repeats, args.networks = 16, 3, 8
        for spec in families.values():
            spec["models"], spec["batches"] = spec["models"][:2], [1]
    console = make_console(stderr=True)
    rows = []
    for name, spec in families.items():
        with tempfile.TemporaryDirectory() as tmp:
            rows += run_family(name, spec, Path(tmp), args, console)
    result = {
        "command": "python " + " ".join(sys.argv), "rows": rows,
        "statistic": "|predicted - measured| / measured, ms per forward pass of one batch",
        "machine": {"threads": torch.get_num_threads(), "platform": platform.platform(),
                    "device": rows[0]["profile"] if rows else None},
        "versions": package_versions(),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    table = Table(title="latency predictor: relative error over every network of a run (measured on this device)")
    for col in ("family", "batch", "networks", "median error", "worst error", "retest: median", "retest: worst"):
        table.add_column(col, justify="left" if col == "family" else "right")
    for r in rows:
        table.add_row(r["family"], str(r["batch"]), str(r["networks"]), f"{100 * r['median_abs_rel_error']:.1f}%",
                      f"{100 * r['worst_abs_rel_error']:.1f}%", f"{100 * r['retest_median']:.1f}%",
                      f"{100 * r['retest_worst']:.1f}%")
    out = make_console()
    out.print(table)
    out.print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
