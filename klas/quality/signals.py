"""How well does a training-free signal rank the stitches, and how well could any signal?

* :func:`rate`: one signal (lower = predicted better, like Γ) against one split's ground-truth
  accuracies: Spearman ρ(-signal, accuracy) over all candidates and over those in the search's FLOPs
  range, and the recovery of klas's bucket rule on that signal brought to K stitches (the share of
  non-empty buckets whose ground-truth best stitch it keeps; :func:`klas.metrics.recovery`).
* :func:`competitive`: the signals a run also trains, judged on the score split only.
* :func:`ceiling`: the ground truth against itself, trained again with another seed (data order and
  least-squares images): ρ between the two and the recovery of the second's bucket winners (one per
  bucket, and the bucket rule at K on its accuracies) against the first. No signal can rank the
  ground truth better than the ground truth predicts itself.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from klas.metrics import recovery, spearman
from klas.select import select_count_by_score


def rate(signal: np.ndarray, gt_acc: np.ndarray, bucket: np.ndarray, k: int) -> dict:
    """ρ over all / in range and recovery at K of one signal (module docstring)."""
    signal, gt_acc, bucket = np.asarray(signal, float), np.asarray(gt_acc, float), np.asarray(bucket)
    r = bucket >= 0
    keep, _ = select_count_by_score(signal, bucket, k)
    return {"rho": spearman(-signal, gt_acc)["rho"], "rho_in_range": spearman(-signal[r], gt_acc[r])["rho"],
            "recovery": recovery(gt_acc, bucket, keep)["rate"], "count": int(keep.sum())}


def rate_signals(signals: Mapping[str, np.ndarray], gt_acc: Mapping[str, np.ndarray], bucket: np.ndarray,
                 k: int) -> dict[str, dict[str, dict]]:
    """``{signal: {split: rate(...)}}`` for every signal against every split's ground truth."""
    return {name: {split: rate(s, acc, bucket, k) for split, acc in gt_acc.items()} for name, s in signals.items()}


def competitive(ratings: Mapping[str, Mapping[str, dict]], margin: float, split: str = "score") -> list[str]:
    """The signals whose in-range ρ on ``split`` is within ``margin`` of the best signal's (finite ones)."""
    rho = {n: r[split]["rho_in_range"] for n, r in ratings.items() if math.isfinite(r[split]["rho_in_range"])}
    if not rho:
        return []
    best = max(rho.values())
    return [n for n, v in rho.items() if v >= best - margin]


def bucket_winners(acc: np.ndarray, bucket: np.ndarray) -> np.ndarray:
    """Mask of one best candidate per non-empty bucket (the first on a tie)."""
    acc, bucket = np.asarray(acc, float), np.asarray(bucket)
    keep = np.zeros(len(acc), dtype=bool)
    for b in np.unique(bucket[bucket >= 0]):
        members = np.flatnonzero(bucket == b)
        keep[members[int(np.argmax(acc[members]))]] = True
    return keep


def ceiling(reference: np.ndarray, other: np.ndarray, bucket: np.ndarray, k: int) -> dict:
    """The ground truth trained with another seed (``other``) as if it were a signal of ``reference``:
    ρ over all / in range, the recovery of its bucket winners (one per bucket) and of the bucket rule
    at K on its accuracies."""
    ref, oth, bucket = np.asarray(reference, float), np.asarray(other, float), np.asarray(bucket)
    r = bucket >= 0
    at_k, _ = select_count_by_score(1.0 - oth, bucket, k)
    return {"rho": spearman(oth, ref)["rho"], "rho_in_range": spearman(oth[r], ref[r])["rho"],
            "recovery_winners": recovery(ref, bucket, bucket_winners(oth, bucket))["rate"],
            "recovery": recovery(ref, bucket, at_k)["rate"], "count": int(at_k.sum())}


def mean_range(values: Sequence[float]) -> dict:
    """``{"mean", "min", "max"}`` of the finite values (nan when there are none)."""
    v = [float(x) for x in values if x is not None and math.isfinite(x)]
    if not v:
        return {"mean": float("nan"), "min": float("nan"), "max": float("nan")}
    return {"mean": float(np.mean(v)), "min": min(v), "max": max(v)}


__all__ = ["bucket_winners", "ceiling", "competitive", "mean_range", "rate", "rate_signals"]
