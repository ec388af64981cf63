"""How good is a set of networks, and how good is a selection? Pure functions on numbers.

Costs are in any unit (klas uses GFLOPs, fvcore convention), accuracies are fractions.

* :func:`pareto_front`: the networks nothing else is both cheaper and more accurate than.
* :func:`step_value`: f(x) = the best accuracy among networks costing <= x.
* :func:`hypervolume` (normalised): ``HV = ∫_{x_lo}^{x_hi} (f(x) - y_ref) dx / ((x_hi - x_lo) · (y_top - y_ref))``,
  reference point ``(x_hi, y_ref)``, rectangle top ``y_top`` (1 = 100 %). With ``y_ref`` the accuracy
  of a network costing ``x_lo`` that is on every front, f >= y_ref on the range and HV lies in [0, 1].
* :func:`front_summary`: front, HV and best accuracy at cost budgets of one set of networks.
* :func:`recovery`: the share of cost buckets whose ground-truth best candidate a selection holds
  (KLAS, ICLR 2026, Table 1).
* :func:`spearman`: rank correlation of a score (higher = predicted better) with real accuracy.
* :func:`percentile_ci`: a 95 % percentile interval of bootstrap values.
* :func:`is_finite`: whether a table cell holds a usable number.

Imports numpy (and scipy for :func:`spearman`) only.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np


def is_finite(v: Any) -> bool:
    """True for a real number that is neither NaN nor infinite (None, strings and the like: False)."""
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def pareto_front(points: Iterable[Mapping[str, Any]], cost: str = "gflops", acc: str = "acc_after",
                 key: str = "id") -> list[dict]:
    """The points no other point dominates, cheapest first.

    ``q`` dominates ``p`` when ``q[cost] <= p[cost]`` and ``q[acc] >= p[acc]`` with at least one strict.
    Ties: points with exactly the same cost and accuracy do not dominate each other, so all of them
    are kept; the result is ordered by (cost, -accuracy, ``key``), independent of the input order.
    Points whose cost or accuracy is missing or not finite are ignored.
    """
    pts = [dict(p) for p in points if is_finite(p.get(cost)) and is_finite(p.get(acc))]
    pts.sort(key=lambda p: (p[cost], -p[acc], str(p.get(key))))
    front: list[dict] = []
    best = -math.inf  # best accuracy among strictly cheaper points
    i = 0
    while i < len(pts):
        j = i
        while j < len(pts) and pts[j][cost] == pts[i][cost]:
            j += 1
        top = pts[i][acc]  # the group's best (sorted by -acc within a cost)
        if top > best:
            front.extend(p for p in pts[i:j] if p[acc] == top)
            best = top
        i = j
    return front


def step_value(points: Sequence[tuple[float, float]], x: float, default: float = -math.inf) -> float:
    """f(x): the best accuracy among points (cost, acc) with cost <= x; ``default`` when none is."""
    vals = [a for c, a in points if c <= x]
    return max(vals) if vals else default


def hypervolume(points: Sequence[tuple[float, float]], x_lo: float, x_hi: float, y_ref: float,
                y_top: float = 1.0) -> float:
    """Normalised area under the step function f over [x_lo, x_hi] above y_ref (module docstring).

    ``points`` are (cost, accuracy); where no point is as cheap as x, f(x) = y_ref (adds nothing);
    accuracies above ``y_top`` count as ``y_top``. nan for an empty range or ``y_top <= y_ref``.
    """
    if not x_hi > x_lo or not y_top > y_ref:
        return float("nan")
    pts = [(float(c), float(a)) for c, a in points if math.isfinite(c) and math.isfinite(a)]
    cuts = sorted({x_lo, x_hi, *(c for c, _ in pts if x_lo < c < x_hi)})
    area = 0.0
    for a, b in zip(cuts, cuts[1:]):
        f = step_value(pts, a, y_ref)
        area += max(0.0, min(f, y_top) - y_ref) * (b - a)
    return area / ((x_hi - x_lo) * (y_top - y_ref))


def front_summary(points: list[dict], x_lo: float, x_hi: float, y_ref: float, budgets: Sequence[float],
                  stitches: list[dict] | None = None) -> dict:
    """Front, HV and best-at-budget of one set of networks (dicts with ``id``, ``gflops``, ``acc``).

    With ``stitches`` (a subset without the anchors), also ``hypervolume_stitches``: the same integral
    for them alone with y_ref = 0 (the mean over the range of the best stitch available, 0 where none
    is that cheap) and ``best_stitch_at_budget`` (nan where none is that cheap).
    """
    front = pareto_front(points, cost="gflops", acc="acc")
    xy = [(p["gflops"], p["acc"]) for p in points]
    out = {
        "front": [{"id": p["id"], "gflops": p["gflops"], "acc": p["acc"]} for p in front],
        "hypervolume": hypervolume(xy, x_lo, x_hi, y_ref),
        "best_at_budget": [step_value(xy, b, float("nan")) for b in budgets],
    }
    if stitches is not None:
        sxy = [(p["gflops"], p["acc"]) for p in stitches]
        out["hypervolume_stitches"] = hypervolume(sxy, x_lo, x_hi, 0.0)
        out["best_stitch_at_budget"] = [step_value(sxy, b, float("nan")) for b in budgets]
    return out


def recovery(gt_acc: np.ndarray, bucket: np.ndarray, selected: np.ndarray) -> dict:
    """Share of non-empty buckets (bucket >= 0) whose ground-truth best candidate is selected.

    Ties: selecting any of a bucket's equally best candidates counts. Returns ``recovered``,
    ``buckets`` (non-empty ones), ``rate`` (nan without buckets) and ``per_bucket`` details.
    """
    gt_acc, bucket, selected = np.asarray(gt_acc, float), np.asarray(bucket), np.asarray(selected, bool)
    hits, per_bucket = 0, []
    buckets = [int(b) for b in np.unique(bucket[bucket >= 0])]
    for b in buckets:
        members = np.flatnonzero(bucket == b)
        best = gt_acc[members].max()
        winners = members[gt_acc[members] == best]
        hit = bool(selected[winners].any())
        hits += hit
        per_bucket.append({"bucket": b, "best": [int(w) for w in winners], "recovered": hit})
    return {"recovered": hits, "buckets": len(buckets), "rate": hits / len(buckets) if buckets else float("nan"),
            "per_bucket": per_bucket}


def spearman(score_higher_better: np.ndarray, acc: np.ndarray) -> dict:
    """Spearman ρ (``scipy.stats.spearmanr``) over the pairs where both are finite: ``rho``, ``p``, ``n``;
    nan with fewer than 3 pairs or a constant side."""
    from scipy.stats import spearmanr

    s, a = np.asarray(score_higher_better, float), np.asarray(acc, float)
    ok = np.isfinite(s) & np.isfinite(a)
    if ok.sum() < 3 or np.ptp(s[ok]) == 0 or np.ptp(a[ok]) == 0:
        return {"rho": float("nan"), "p": float("nan"), "n": int(ok.sum())}
    res = spearmanr(s[ok], a[ok])
    return {"rho": float(res.statistic), "p": float(res.pvalue), "n": int(ok.sum())}


def percentile_ci(values: Sequence[float], level: float = 0.95) -> list[float] | None:
    """``[lo, hi]`` percentile interval of bootstrap ``values`` (None when there are none)."""
    if not len(values):
        return None
    half = 50 * level  # 47.5 for 95 %: exact in binary, so the bounds are the 2.5th and 97.5th percentiles
    return [float(np.percentile(values, 50 - half)), float(np.percentile(values, 50 + half))]


__all__ = ["front_summary", "hypervolume", "is_finite", "pareto_front", "percentile_ci", "recovery", "spearman", "step_value"]
