"""benchmarks/bench_quality.py: its metrics on hand-made cases, and its whole pipeline on a tiny random-init run.

The pipeline test checks plumbing, not results: untrained models, 30 images per split, 2 steps.
"""
from __future__ import annotations

import io
import json
import math
import random
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_quality as bq  # noqa: E402

from klas.select import select_by_bucket  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# -- metrics ---------------------------------------------------------------------------------------


def test_hypervolume_hand_made():
    anchors = [(1.0, 0.5), (3.0, 0.9)]
    # anchors only: f = y_ref on [1, 3): nothing above the reference
    assert bq.hypervolume(anchors, 1.0, 3.0, 0.5) == 0.0
    # a stitch at cost 2 with 0.7: 0.2 over [2, 3) -> 0.2 / (2 * 0.5)
    assert bq.hypervolume(anchors + [(2.0, 0.7)], 1.0, 3.0, 0.5) == pytest.approx(0.2)
    # a cheaper-than-range point counts from x_lo on: 0.1 over [1, 2) + 0.2 over [2, 3)
    assert bq.hypervolume(anchors + [(2.0, 0.7), (0.5, 0.6)], 1.0, 3.0, 0.5) == pytest.approx(0.3)
    # points beyond x_hi add nothing; a dominated point adds nothing; accuracy 1 everywhere fills the rectangle
    assert bq.hypervolume(anchors + [(4.0, 1.0), (2.5, 0.55), (2.0, 0.7)], 1.0, 3.0, 0.5) == pytest.approx(0.2)
    assert bq.hypervolume([(1.0, 1.0)], 1.0, 3.0, 0.5) == pytest.approx(1.0)
    # degenerate range / reference
    assert math.isnan(bq.hypervolume(anchors, 2.0, 2.0, 0.5))
    assert math.isnan(bq.hypervolume(anchors, 1.0, 3.0, 1.0))


def test_hypervolume_matches_numerical_integration():
    rng = random.Random(0)
    for _ in range(50):
        pts = [(rng.uniform(0.5, 3.5), rng.uniform(0.4, 1.0)) for _ in range(rng.randint(1, 8))] + [(1.0, 0.4)]
        grid = np.linspace(1.0, 3.0, 20001)[:-1] + 1e-4
        f = np.array([bq.step_value(pts, x, 0.4) for x in grid])
        num = (f - 0.4).mean() / 0.6
        assert bq.hypervolume(pts, 1.0, 3.0, 0.4) == pytest.approx(num, abs=2e-3)


def test_best_at_budget_and_recovery_hand_made():
    pts = [(1.0, 0.5), (2.0, 0.7), (3.0, 0.9)]
    assert bq.step_value(pts, 2.5) == 0.7
    assert bq.step_value(pts, 0.5, float("nan")) != bq.step_value(pts, 0.5, float("nan"))  # nan below everything
    gt = np.array([0.5, 0.7, 0.6, 0.9, 0.8, 0.95])
    bucket = np.array([0, 0, 1, 1, 2, -1])
    sel = np.array([False, True, False, False, True, True])
    r = bq.recovery(gt, bucket, sel)
    assert (r["recovered"], r["buckets"]) == (2, 3) and r["rate"] == pytest.approx(2 / 3)  # bucket 1's best (3) missed
    assert [b["recovered"] for b in r["per_bucket"]] == [True, False, True]
    # ties: selecting any of the tied best counts; an empty bucket index does not count
    r = bq.recovery(np.array([0.7, 0.7, 0.1]), np.array([0, 0, 4]), np.array([False, True, False]))
    assert (r["recovered"], r["buckets"]) == (1, 2)


def test_spearman_sign():
    acc = np.array([0.1, 0.2, 0.3, 0.4])
    assert bq.spearman(-np.array([4.0, 3.0, 2.0, 1.0]), acc)["rho"] == pytest.approx(1.0)
    assert math.isnan(bq.spearman(np.ones(4), acc)["rho"])


def test_equalise_by_score_is_the_bucket_rule_with_another_tau():
    rng = np.random.default_rng(0)
    for _ in range(100):
        n = rng.integers(3, 30)
        scores = rng.uniform(0.1, 2.0, n)
        bucket = rng.integers(-1, 5, n)
        if not (bucket >= 0).any():
            continue
        tau = float(rng.uniform(0, 0.9))
        rule = select_by_bucket(scores, bucket, tau)
        eq, tau_eff = bq.equalise_by_score(scores, bucket, int(rule.sum()))
        assert (eq == rule).all() and tau_eff <= tau + 1e-9
        # bucket winners come first
        winners = select_by_bucket(scores, bucket, 0.0)
        k = int(rng.integers(0, winners.sum() + 1))
        eq, _ = bq.equalise_by_score(scores, bucket, k)
        assert eq.sum() == k and (eq <= winners).all()
        eq, _ = bq.equalise_by_score(scores, bucket, 1000)
        assert (eq == (bucket >= 0)).all()


class _C:
    def __init__(self, macs):
        self.macs = macs


def test_snnet_equalisation_thins_and_widens():
    assert bq.spread_pick([(i, float(i)) for i in range(5)], 3) == [0, 2, 4]
    assert bq.spread_pick([(7, 1.0)], 3) == [7]
    cands = [_C(m) for m in (10, 20, 30, 40, 50, 60, 70)]
    level = np.array([0, 0, 0, 1, 1, 2, -1])
    keep, how = bq.equalise_snnet(cands, level, 3)
    assert keep.tolist() == [True, True, True, False, False, False, False] and "exactly" in how
    keep, how = bq.equalise_snnet(cands, level, 2)  # thinned over FLOPs: cheapest and dearest of level 0
    assert keep.tolist() == [True, False, True, False, False, False, False] and "thinned" in how
    keep, how = bq.equalise_snnet(cands, level, 4)  # level 1 needed partly
    assert keep.sum() == 4 and keep[:3].all() and keep[3:5].sum() == 1 and "widened by 1" in how
    keep, how = bq.equalise_snnet(cands, level, 10)  # never picks level -1
    assert keep.tolist() == [True] * 6 + [False] and "only 6" in how


# -- the pipeline ----------------------------------------------------------------------------------


def test_pipeline_tiny_random_init(tmp_path):
    from klas.search import search
    from klas.train import train_run

    cfg = replace(bq.QUICK, limit=30, gt_steps=2, batch_size=8, buckets=6, bootstrap=10, random_init=True)
    out = tmp_path / "q.json"
    report = bq.run(cfg, ["cnn"], tmp_path / "work", out, out.with_suffix(".png"), command="test", quick=True,
                    console=Console(file=io.StringIO(), width=200))
    assert out.is_file() and out.with_suffix(".png").stat().st_size > 10_000
    disk = json.loads(out.read_text())
    fam = disk["families"]["cnn"]
    k = fam["K"]
    assert k >= 1 and fam["num_candidates"] == len(fam["ground_truth"])
    names = {"klas", "cka", "snnet", "random-0", "random-1", "random-2", "random (mean)"}
    assert set(fam["strategies"]) == names
    for name, s in fam["strategies"].items():
        assert s["count"] == k
        assert 0.0 <= s["hypervolume"] <= 1.0
        assert 0.0 <= s["recovery"]["rate"] <= 1.0
        assert len(s["best_at_budget"]) == 3
        if "selected" in s:
            assert len(s["selected"]) == k and len(set(s["selected"])) == k
            assert s["joint_steps"] == k * cfg.gt_steps
    assert fam["strategies"]["klas"]["paper_recovery"] == pytest.approx(0.889)
    lo, hi = fam["range_gflops"]
    assert lo < hi and all(lo < b < hi for b in fam["budgets_gflops"])
    assert report["families"]["cnn"]["eval_images"] == 30

    # the selections are what klas search writes for each strategy
    cache = tmp_path / "work" / "cnn" / "cache"
    for strategy in ("cka", "snnet"):
        res = search(cache, tmp_path / f"run-{strategy}", strategy=strategy, buckets=cfg.buckets, tau=cfg.tau,
                     seed=cfg.seed, console=Console(file=io.StringIO()), progress=False)
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
    run = tmp_path / "work" / "cnn" / "run-klas"
    res = train_run(run, epochs=1, steps_per_epoch=k * cfg.gt_steps, batch_size=cfg.batch_size, lr=cfg.lr,
                    weight_decay=cfg.weight_decay, warmup=cfg.warmup, init_images=cfg.init_images,
                    eval_batch_size=cfg.eval_batch_size, latency=False, seed=cfg.seed, overwrite=True,
                    console=Console(file=io.StringIO()), progress=False)
    ours = fam["strategies"]["klas"]["accuracy"]
    for row in res.rows:
        if row["kind"] == "stitch":
            assert row["acc_after"] == pytest.approx(ours[row["id"]], abs=1.5 / 30), row["id"]
