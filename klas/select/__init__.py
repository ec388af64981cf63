"""Choose which candidate stitches to train: the KLAS rule and the baselines it is compared with.

All strategies see the same candidate list and the same budget. The FLOPs range that buckets split
runs from the cheapest candidate (anchors included) to the most expensive anchor, capped by the
budget: a stitch that costs more than the largest model is never worth training, and a budget
narrows the range so that all B buckets lie within it. Candidates outside the range get bucket -1
and are never selected.

* ``klas``: in each of B equal-width buckets keep the stitch with the lowest score Γ and every
  stitch with Γ <= (1 + τ) · min (KLAS, ICLR 2026).
* ``cka``: the same bucket rule on the distance 1 - CKA(a_i, b_j) between pooled features.
* ``snnet``: SN-Net's fixed configuration: nearest-size model pairs only; for equal depths a paired
  sliding window of size 2, stride 1 over blocks (|i - j| <= 1 in block indices); for unequal
  depths an interpolated mapping j = round(i · n_b / n_a); hierarchical models only within the
  same stage (grid), which shape compatibility already guarantees.
* ``random``: a seeded uniform draw among in-range candidates, as many as ``klas`` picks.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from klas.errors import KlasError
from klas.models import Profile
from klas.stitch.candidates import Candidate

STRATEGIES = ("klas", "snnet", "random", "cka")


def flops_range(cands: Sequence[Candidate], anchors: Sequence[Candidate], budget_macs: float | None) -> tuple[float, float]:
    """[cheapest candidate or anchor, most expensive anchor], the top capped by the budget."""
    lo = min(c.macs for c in list(cands) + list(anchors))
    hi = max(a.macs for a in anchors)
    if budget_macs is not None:
        hi = min(hi, budget_macs)
    return float(lo), float(hi)


def assign_buckets(macs: np.ndarray, lo: float, hi: float, buckets: int) -> np.ndarray:
    """Bucket index 0..B-1 of each cost over B equal-width buckets of [lo, hi]; -1 outside."""
    macs = np.asarray(macs, dtype=np.float64)
    width = (hi - lo) / buckets if hi > lo else 1.0
    idx = np.floor((macs - lo) / width).astype(np.int64)
    idx = np.minimum(idx, buckets - 1)  # the top edge belongs to the last bucket
    idx[(macs < lo) | (macs > hi)] = -1
    return idx


def select_by_bucket(scores: np.ndarray, bucket: np.ndarray, tau: float) -> np.ndarray:
    """In each bucket: the lowest score and all within (1 + τ) of it (scores are >= 0, lower better)."""
    keep = np.zeros(len(scores), dtype=bool)
    for b in np.unique(bucket[bucket >= 0]):
        members = np.flatnonzero(bucket == b)
        vals = scores[members]
        finite = np.isfinite(vals)
        if not finite.any():
            continue
        best = vals[finite].min()
        keep[members[finite & (vals <= (1.0 + tau) * best + 1e-12)]] = True
    return keep


def select_snnet(cands: Sequence[Candidate], profiles: Mapping[str, Profile], in_range: np.ndarray) -> np.ndarray:
    """SN-Net's configuration (see module docstring)."""
    order = sorted(profiles, key=lambda n: (profiles[n].macs, n))
    neighbours = {(a, b) for a, b in zip(order, order[1:])} | {(b, a) for a, b in zip(order, order[1:])}
    keep = np.zeros(len(cands), dtype=bool)
    for k, c in enumerate(cands):
        if (c.src, c.dst) not in neighbours or not in_range[k]:
            continue
        n_a, n_b = profiles[c.src].num_blocks, profiles[c.dst].num_blocks
        i, j = c.src_cut - 1, c.dst_cut - 1  # block indices: a runs 0..i, b resumes after block j
        if n_a == n_b:
            keep[k] = abs(i - j) <= 1
        else:
            keep[k] = c.dst_cut == int(round(c.src_cut * n_b / n_a))
    return keep


def select_random(in_range: np.ndarray, count: int, seed: int) -> np.ndarray:
    """``count`` in-range candidates drawn uniformly without replacement, seeded."""
    pool = np.flatnonzero(in_range)
    rng = np.random.default_rng(seed)
    pick = rng.choice(pool, size=min(count, len(pool)), replace=False)
    keep = np.zeros(len(in_range), dtype=bool)
    keep[pick] = True
    return keep


def check_selection_args(strategy: str, buckets: int, tau: float, budget_gflops: float | None) -> None:
    """One-line errors for out-of-range selection settings."""
    if strategy not in STRATEGIES:
        raise KlasError(f"unknown --strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    if buckets < 1:
        raise KlasError(f"--buckets must be at least 1, got {buckets}")
    if not 0.0 <= tau < 1.0:
        raise KlasError(f"--tau must lie in [0, 1), got {tau}")
    if budget_gflops is not None and not (np.isfinite(budget_gflops) and budget_gflops > 0):
        raise KlasError(f"--budget must be a positive number of GFLOPs, got {budget_gflops}")


def check_budget(cands: Sequence[Candidate], anchors: Sequence[Candidate], budget_macs: float | None) -> None:
    """Refuse a budget below every candidate (costs are known before any scoring: check it first)."""
    cheapest = min(list(cands) + list(anchors), key=lambda c: c.macs)
    if budget_macs is not None and budget_macs < cheapest.macs:
        raise KlasError(
            f"--budget {budget_macs / 1e9:.4g} GFLOPs is below the cheapest candidate, {cheapest.route} "
            f"at {cheapest.macs / 1e9:.4g} GFLOPs; raise the budget"
        )


def select(
    strategy: str,
    cands: Sequence[Candidate],
    anchors: Sequence[Candidate],
    profiles: Mapping[str, Profile],
    *,
    gamma: np.ndarray | None = None,
    cka_distance: np.ndarray | None = None,
    budget_macs: float | None = None,
    buckets: int = 20,
    tau: float = 0.05,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """(selected mask, bucket index) over ``cands`` for one strategy."""
    macs = np.array([c.macs for c in cands], dtype=np.float64)
    check_budget(cands, anchors, budget_macs)
    lo, hi = flops_range(cands, anchors, budget_macs)
    bucket = assign_buckets(macs, lo, hi, buckets)
    in_range = bucket >= 0
    if strategy == "klas":
        keep = select_by_bucket(np.asarray(gamma), bucket, tau)
    elif strategy == "cka":
        keep = select_by_bucket(np.asarray(cka_distance), bucket, tau)
    elif strategy == "snnet":
        keep = select_snnet(cands, profiles, in_range)
    elif strategy == "random":
        count = int(select_by_bucket(np.asarray(gamma), bucket, tau).sum())
        keep = select_random(in_range, count, seed)
    else:
        raise KlasError(f"unknown --strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    return keep & in_range, bucket


__all__ = [
    "STRATEGIES", "assign_buckets", "check_budget", "check_selection_args", "flops_range", "select", "select_by_bucket",
    "select_random", "select_snnet",
]
