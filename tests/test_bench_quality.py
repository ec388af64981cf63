"""benchmarks/bench_quality.py end to end on a tiny random-init run, and its agreement with the library.

The metrics and the exact-count selection rules are tested in tests/test_metrics.py and
tests/test_select.py; this checks plumbing, not results: untrained models, 30 images per split, 2 steps.
"""
from __future__ import annotations

import io
import json
import runpy
from pathlib import Path

import pytest
from rich.console import Console

from klas.search import search
from klas.train import train_run

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_quality.py"

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_bench_quality_quick_random_init_agrees_with_klas(tmp_path):
    main = runpy.run_path(str(SCRIPT), run_name="bench_quality")["main"]
    out = tmp_path / "q.json"
    report = main(["--quick", "--random-init", "--families", "cnn", "--limit", "30", "--gt-steps", "2",
                   "--batch-size", "8", "--buckets", "6", "--bootstrap", "10", "--work", str(tmp_path / "work"),
                   "--out", str(out)])
    cfg = report["config"]
    assert out.is_file() and out.with_suffix(".png").stat().st_size > 10_000
    fam = json.loads(out.read_text())["families"]["cnn"]
    k = fam["K"]
    assert k >= 1 and fam["num_candidates"] == len(fam["ground_truth"]) and fam["eval_images"] == 30
    assert set(fam["strategies"]) == {"klas", "cka", "snnet", "random-0", "random-1", "random-2", "random (mean)"}
    for name, s in fam["strategies"].items():
        assert s["count"] == k and 0.0 <= s["hypervolume"] <= 1.0 and 0.0 <= s["recovery"]["rate"] <= 1.0
        assert len(s["best_at_budget"]) == 3
        if "selected" in s:
            assert len(s["selected"]) == k and len(set(s["selected"])) == k
            assert s["joint_steps"] == k * cfg["gt_steps"]
    assert fam["strategies"]["klas"]["paper_recovery"] == pytest.approx(0.889)
    lo, hi = fam["range_gflops"]
    assert lo < hi and all(lo < b < hi for b in fam["budgets_gflops"])

    # the selections are what klas search writes for each strategy
    cache = tmp_path / "work" / "cnn" / "cache"
    for strategy in ("cka", "snnet"):
        res = search(cache, tmp_path / f"run-{strategy}", strategy=strategy, buckets=cfg["buckets"], tau=cfg["tau"],
                     seed=cfg["seed"], console=Console(file=io.StringIO()), progress=False)
        own = {s["id"] for s in res.selection["stitches"]}
        assert len(own) == fam["strategies"][strategy]["count_own_rule"]
        if strategy == "cka":
            rows = {r["id"]: r for r in res.rows if r["kind"] == "stitch"}
            for g in fam["ground_truth"]:
                assert g["cka_distance"] == pytest.approx(rows[g["id"]]["cka_distance"], abs=1e-9)
            if len(own) == k:
                assert own == set(fam["strategies"]["cka"]["selected"])
        else:
            chosen = set(fam["strategies"]["snnet"]["selected"])
            assert own <= chosen if len(own) <= k else chosen <= own

    # the joint fine-tuning is klas train's: same LS init, schedule, sampling and data order
    res = train_run(tmp_path / "work" / "cnn" / "run-klas", epochs=1, steps_per_epoch=k * cfg["gt_steps"],
                    batch_size=cfg["batch_size"], lr=cfg["lr"], weight_decay=cfg["weight_decay"], warmup=cfg["warmup"],
                    init_images=cfg["init_images"], eval_batch_size=cfg["eval_batch_size"], latency=False,
                    full_tune=False,  # the benchmark trains the stitch layers only (anchors frozen)
                    seed=cfg["seed"], overwrite=True, console=Console(file=io.StringIO()), progress=False)
    ours = fam["strategies"]["klas"]["accuracy"]
    for row in res.rows:
        if row["kind"] == "stitch":
            assert row["acc_after"] == pytest.approx(ours[row["id"]], abs=1.5 / 30), row["id"]
