"""benchmarks/bench_quality.py end to end on a tiny random-init run, and its agreement with the library.

The metrics and the exact-count selection rules are tested in tests/test_metrics.py and
tests/test_select.py; this checks plumbing, not results: untrained models, 30 images per split, 2 steps
per route. The Γ variants are scored (their default must be klas search's Γ).
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
    report = main(["--quick", "--random-init", "--families", "cnn", "--limit", "30", "--route-steps", "2",
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
            assert s["routes"] == k + 2 and s["steps"] == (k + 2) * cfg["route_steps"]  # K stitches + 2 anchors
    assert fam["strategies"]["klas"]["paper_recovery"] == pytest.approx(0.889)
    assert fam["ground_truth_run"]["steps"] == (fam["num_candidates"] + 2) * cfg["route_steps"]
    assert all(0.0 <= g["acc_score"] <= 1.0 for g in fam["ground_truth"])
    var = fam["variants"]
    assert var["default_matches_search_max_rel_diff"] < 1e-3  # the variants' default is klas search's Γ
    assert {"default", "T=2", "theta=reverse", "sigma=none", "probe_epochs=4", "cka"} <= set(var["score"])
    assert report["variant_choice"]["chosen"] in var["score"]
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

    # the training is klas train's default recipe (anchors fine-tuned and sampled as routes): same LS init,
    # schedule, sampling and data order, only shorter
    res = train_run(tmp_path / "work" / "cnn" / "run-klas", epochs=1, steps_per_epoch=(k + 2) * cfg["route_steps"],
                    batch_size=cfg["batch_size"], init_images=cfg["init_images"], eval_batch_size=cfg["eval_batch_size"],
                    latency=False, seed=cfg["seed"], overwrite=True, console=Console(file=io.StringIO()), progress=False)
    assert res.config["full_tune"] and res.config["anchor_routes"] and res.config["lr"] == cfg["lr"]
    ours = {**fam["strategies"]["klas"]["accuracy"], **fam["strategies"]["klas"]["anchor_accuracy"]}
    assert len(res.rows) == len(ours)
    for row in res.rows:
        assert row["acc_after"] == pytest.approx(ours[row["id"]], abs=1.5 / 30), row["id"]
