"""klas.metrics on hand-made cases and against brute force."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest

from klas.metrics import front_summary, hypervolume, pareto_front, percentile_ci, recovery, spearman, step_value


def test_hypervolume_hand_made():
    anchors = [(1.0, 0.5), (3.0, 0.9)]
    # anchors only: f = y_ref on [1, 3): nothing above the reference
    assert hypervolume(anchors, 1.0, 3.0, 0.5) == 0.0
    # a stitch at cost 2 with 0.7: 0.2 over [2, 3) -> 0.2 / (2 * 0.5)
    assert hypervolume(anchors + [(2.0, 0.7)], 1.0, 3.0, 0.5) == pytest.approx(0.2)
    # a cheaper-than-range point counts from x_lo on: 0.1 over [1, 2) + 0.2 over [2, 3)
    assert hypervolume(anchors + [(2.0, 0.7), (0.5, 0.6)], 1.0, 3.0, 0.5) == pytest.approx(0.3)
    # points beyond x_hi add nothing; a dominated point adds nothing; accuracy 1 everywhere fills the rectangle
    assert hypervolume(anchors + [(4.0, 1.0), (2.5, 0.55), (2.0, 0.7)], 1.0, 3.0, 0.5) == pytest.approx(0.2)
    assert hypervolume([(1.0, 1.0)], 1.0, 3.0, 0.5) == pytest.approx(1.0)
    # degenerate range / reference
    assert math.isnan(hypervolume(anchors, 2.0, 2.0, 0.5))
    assert math.isnan(hypervolume(anchors, 1.0, 3.0, 1.0))


def test_hypervolume_matches_a_brute_force_grid():
    rng = random.Random(0)
    for _ in range(50):
        pts = [(rng.uniform(0.5, 3.5), rng.uniform(0.4, 1.0)) for _ in range(rng.randint(1, 8))] + [(1.0, 0.4)]
        grid = np.linspace(1.0, 3.0, 20001)[:-1] + 1e-4
        f = np.array([max([a for c, a in pts if c <= x] or [0.4]) for x in grid])
        assert hypervolume(pts, 1.0, 3.0, 0.4) == pytest.approx((f - 0.4).mean() / 0.6, abs=2e-3)


def test_pareto_front_matches_brute_force_dominance():
    rng = random.Random(1)
    for _ in range(50):
        pts = [{"id": str(k), "gflops": rng.choice([1.0, 2.0, 3.0, 4.0]), "acc": rng.choice([0.5, 0.6, 0.7, 0.8])}
               for k in range(rng.randint(1, 10))]
        dominated = {p["id"] for p in pts for q in pts
                     if q["gflops"] <= p["gflops"] and q["acc"] >= p["acc"] and (q["gflops"], q["acc"]) != (p["gflops"], p["acc"])}
        front = pareto_front(pts, acc="acc")
        assert {p["id"] for p in front} == {p["id"] for p in pts} - dominated
        assert [p["gflops"] for p in front] == sorted(p["gflops"] for p in front)
    assert pareto_front([{"id": "a", "gflops": float("nan"), "acc": 0.9}], acc="acc") == []


def test_step_value_front_summary_and_ci():
    pts = [(1.0, 0.5), (2.0, 0.7), (3.0, 0.9)]
    assert step_value(pts, 2.5) == 0.7
    assert math.isnan(step_value(pts, 0.5, float("nan")))
    nets = [{"id": i, "gflops": c, "acc": a} for i, (c, a) in zip("abc", pts)]
    s = front_summary(nets, 1.0, 3.0, 0.5, [1.5, 2.5], stitches=nets[1:2])
    assert [p["id"] for p in s["front"]] == ["a", "b", "c"] and s["best_at_budget"] == [0.5, 0.7]
    assert s["hypervolume"] == pytest.approx(0.2) and s["hypervolume_stitches"] == pytest.approx(0.35)
    assert math.isnan(s["best_stitch_at_budget"][0]) and s["best_stitch_at_budget"][1] == 0.7
    assert percentile_ci([]) is None
    assert percentile_ci(list(range(101))) == [2.5, 97.5]


def test_recovery_hand_made():
    gt = np.array([0.5, 0.7, 0.6, 0.9, 0.8, 0.95])
    bucket = np.array([0, 0, 1, 1, 2, -1])
    sel = np.array([False, True, False, False, True, True])
    r = recovery(gt, bucket, sel)
    assert (r["recovered"], r["buckets"]) == (2, 3) and r["rate"] == pytest.approx(2 / 3)  # bucket 1's best (3) missed
    assert [b["recovered"] for b in r["per_bucket"]] == [True, False, True]
    # ties: selecting any of the tied best counts; an empty bucket index does not count
    r = recovery(np.array([0.7, 0.7, 0.1]), np.array([0, 0, 4]), np.array([False, True, False]))
    assert (r["recovered"], r["buckets"]) == (1, 2)
    assert math.isnan(recovery(np.array([0.5]), np.array([-1]), np.array([True]))["rate"])


def test_spearman_sign():
    acc = np.array([0.1, 0.2, 0.3, 0.4])
    assert spearman(-np.array([4.0, 3.0, 2.0, 1.0]), acc)["rho"] == pytest.approx(1.0)
    assert math.isnan(spearman(np.ones(4), acc)["rho"])
    assert spearman(np.array([1.0, np.nan, 3.0, 4.0]), acc)["n"] == 3
