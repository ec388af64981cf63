"""Choose which candidate stitches to train: the KLAS rule and the baselines it is compared with.

All strategies see the same candidate list and the same budget. The cost range that buckets split
(GFLOPs, or with a latency budget predicted milliseconds on this device: :class:`CostAxis`) runs
from the cheapest candidate (anchors included) to the most expensive anchor, capped by the budget: a
stitch that costs more than the largest model is never worth training, and a budget narrows the
range so that all B buckets lie within it. Candidates outside the range get bucket -1 and are never
selected.

* ``klas``: in each of B equal-width buckets keep the stitch with the lowest score Γ and every
  stitch with Γ <= (1 + τ) · min (KLAS, ICLR 2026).
* ``cka``: the same bucket rule on the distance 1 - CKA(a_i, b_j) between pooled features.
* ``snnet``: SN-Net's fixed configuration: nearest-size model pairs only; for equal depths a paired
  sliding window of size 2, stride 1 over blocks (|i - j| <= 1 in block indices); for unequal
  depths an interpolated mapping j = round(i · n_b / n_a); only representations of the same
  positions (:meth:`~klas.models.Rep.compatible`: hierarchical models within the same stage), as
  SN-Net has no bridges.
* ``random``: a seeded uniform draw among in-range candidates, as many as ``klas`` picks.

``select(..., count=K)`` brings any strategy to exactly K stitches by its own rule, for comparisons
at equal count (the quality benchmark): the bucket rules move τ (bucket winners first, then by ratio
to the bucket's best), SN-Net's configuration is thinned evenly over FLOPs or its window widened.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from klas.config import STRATEGIES, SearchConfig, format_budget  # STRATEGIES re-exported
from klas.errors import KlasError
from klas.models import Profile
from klas.stitch.candidates import Candidate
from klas.units import macs_to_gflops


@dataclass(frozen=True)
class CostAxis:
    """What the buckets split and the budget caps: a cost per candidate and per anchor, on one axis.

    ``axis`` is ``gflops`` (costs in MACs, the budget too) or ``latency`` (predicted ms per batch on
    this device, :mod:`klas.stitch.latency`; ``where`` says for which batch and device).
    """

    cands: np.ndarray
    anchors: np.ndarray
    budget: float | None = None
    axis: str = "gflops"
    where: str = ""

    @classmethod
    def of_macs(cls, cands: Sequence[Candidate], anchors: Sequence[Candidate], budget_macs: float | None = None) -> "CostAxis":
        return cls(np.array([c.macs for c in cands], dtype=np.float64),
                   np.array([a.macs for a in anchors], dtype=np.float64), budget_macs)

    def show(self, value: float) -> str:
        """A cost on this axis as klas prints it: ``0.0054 GFLOPs`` or ``12.3 ms``."""
        return format_budget(self.axis, value if self.axis == "latency" else macs_to_gflops(value))

    @property
    def flag(self) -> str:
        return "--budget-ms" if self.axis == "latency" else "--budget"



def cost_range(cost: CostAxis) -> tuple[float, float]:
    """[cheapest candidate or anchor, most expensive anchor] on the cost's axis, the top capped by the budget."""
    lo = float(min(cost.cands.min(initial=np.inf), cost.anchors.min()))
    hi = float(cost.anchors.max())
    if cost.budget is not None:
        hi = min(hi, float(cost.budget))
    return lo, hi


def flops_range(cands: Sequence[Candidate], anchors: Sequence[Candidate], budget_macs: float | None) -> tuple[float, float]:
    """[cheapest candidate or anchor, most expensive anchor] in MACs, the top capped by the budget."""
    return cost_range(CostAxis.of_macs(cands, anchors, budget_macs))


def assign_buckets(macs: np.ndarray, lo: float, hi: float, buckets: int) -> np.ndarray:
    """Bucket index 0..B-1 of each cost over B equal-width buckets of [lo, hi]; -1 outside."""
    macs = np.asarray(macs, dtype=np.float64)
    width = (hi - lo) / buckets if hi > lo else 1.0
    idx = np.floor((macs - lo) / width).astype(np.int64)
    idx = np.minimum(idx, buckets - 1)  # the top edge belongs to the last bucket
    idx[(macs < lo) | (macs > hi)] = -1
    return idx


def bucket_best(scores: np.ndarray, bucket: np.ndarray) -> np.ndarray:
    """Each candidate's bucket's lowest finite score (nan out of range or where a bucket has none),
    in the scores' own float dtype."""
    scores, bucket = np.asarray(scores), np.asarray(bucket)
    best = np.full(len(scores), np.nan, dtype=scores.dtype if scores.dtype.kind == "f" else np.float64)
    for b in np.unique(bucket[bucket >= 0]):
        members = np.flatnonzero(bucket == b)
        vals = scores[members]
        finite = np.isfinite(vals)
        if finite.any():
            best[members] = vals[finite].min()
    return best


def ratio_to_bucket_best(scores: np.ndarray, bucket: np.ndarray) -> np.ndarray:
    """score / its bucket's best score: 1 for bucket winners, inf out of range, for non-finite scores
    and where the best is 0 (the bucket rule keeps a candidate when this is <= 1 + τ)."""
    scores = np.asarray(scores, dtype=np.float64)
    best = bucket_best(scores, bucket)
    ratio = np.full(len(scores), np.inf)
    ok = np.isfinite(scores) & np.isfinite(best)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(scores == best, 1.0, np.where(best > 0, scores / best, np.inf))
    ratio[ok] = r[ok]
    return ratio


def select_by_bucket(scores: np.ndarray, bucket: np.ndarray, tau: float) -> np.ndarray:
    """In each bucket: the lowest score and all within (1 + τ) of it (scores are >= 0, lower better)."""
    scores = np.asarray(scores)
    best = bucket_best(scores, bucket)
    with np.errstate(invalid="ignore"):
        return np.isfinite(scores) & np.isfinite(best) & (scores <= (1.0 + tau) * best + 1e-12)


def select_count_by_score(scores: np.ndarray, bucket: np.ndarray, count: int) -> tuple[np.ndarray, float]:
    """The bucket rule with τ moved until exactly ``count`` in-range candidates are chosen (fewer
    only when fewer have a finite score).

    Order: (ratio to the bucket's best, score, index): bucket winners come first, then the others as
    τ grows. Returns the mask and τ_effective (the largest chosen ratio - 1; nan when none is chosen).
    """
    scores, bucket = np.asarray(scores, dtype=np.float64), np.asarray(bucket)
    ratio = ratio_to_bucket_best(scores, bucket)
    pool = [i for i in np.flatnonzero(bucket >= 0) if np.isfinite(scores[i])]
    pool.sort(key=lambda i: (ratio[i], scores[i], i))
    keep = np.zeros(len(scores), dtype=bool)
    keep[pool[:count]] = True
    tau_eff = float(max(ratio[pool[:count]]) - 1.0) if count and pool else float("nan")
    return keep, tau_eff


def _nearest_size_pairs(profiles: Mapping[str, Profile]) -> set[tuple[str, str]]:
    """The ordered model pairs SN-Net stitches: neighbours in cost order (by MACs, then name), both ways."""
    order = sorted(profiles, key=lambda n: (profiles[n].macs, n))
    return set(zip(order, order[1:])) | {(b, a) for a, b in zip(order, order[1:])}


def _snnet_pair(c: Candidate, profiles: Mapping[str, Profile], neighbours: set[tuple[str, str]]) -> bool:
    """Whether SN-Net would stitch these two models at these cuts at all: neighbours, no bridge."""
    return (c.src, c.dst) in neighbours and profiles[c.src].reps[c.src_cut].compatible(profiles[c.dst].reps[c.dst_cut])


def select_snnet(cands: Sequence[Candidate], profiles: Mapping[str, Profile], in_range: np.ndarray) -> np.ndarray:
    """SN-Net's configuration (see module docstring)."""
    neighbours = _nearest_size_pairs(profiles)
    keep = np.zeros(len(cands), dtype=bool)
    for k, c in enumerate(cands):
        if not _snnet_pair(c, profiles, neighbours) or not in_range[k]:
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


def snnet_levels(cands: Sequence[Candidate], profiles: Mapping[str, Profile], in_range: np.ndarray) -> np.ndarray:
    """How far SN-Net's window must widen to include each candidate: 0 = SN-Net's own rule
    (:func:`select_snnet`), w = ``|i - j| <= 1 + w`` (equal depths) resp. ``|j - round(i n_b / n_a)| <= w``;
    -1 = never (not a nearest-size pair, bridged, or out of range)."""
    neighbours = _nearest_size_pairs(profiles)
    level = np.full(len(cands), -1, dtype=np.int64)
    for k, c in enumerate(cands):
        if not _snnet_pair(c, profiles, neighbours) or not in_range[k]:
            continue
        n_a, n_b = profiles[c.src].num_blocks, profiles[c.dst].num_blocks
        if n_a == n_b:
            level[k] = max(0, abs((c.src_cut - 1) - (c.dst_cut - 1)) - 1)
        else:
            level[k] = abs(c.dst_cut - int(round(c.src_cut * n_b / n_a)))
    return level


def spread_pick(items: Sequence[tuple[int, float]], m: int) -> list[int]:
    """``m`` of the (index, cost) items spread evenly over cost: ranks round(linspace(0, n-1, m))."""
    items = sorted(items, key=lambda t: (t[1], t[0]))
    n = len(items)
    if m >= n:
        return [i for i, _ in items]
    if m <= 0:
        return []
    if m == 1:
        return [items[(n - 1) // 2][0]]
    ranks = sorted({int(round(r)) for r in np.linspace(0, n - 1, m)})
    return [items[r][0] for r in ranks]


def select_snnet_count(cands: Sequence[Candidate], level: np.ndarray, count: int) -> tuple[np.ndarray, str]:
    """SN-Net's configuration brought to exactly ``count`` stitches; returns the mask and what was done.

    Too many: thinned to ``count`` spread evenly over FLOPs (:func:`spread_pick`). Too few: the window
    is widened one step at a time over the same model pairs (:func:`snnet_levels`), the last level
    needed thinned evenly over FLOPs.
    """
    keep = np.zeros(len(cands), dtype=bool)
    own = int((level == 0).sum())
    if own == count:
        keep[level == 0] = True
        return keep, f"SN-Net's configuration has exactly {count} stitches"
    if own > count:
        keep[spread_pick([(i, cands[i].macs) for i in np.flatnonzero(level == 0)], count)] = True
        return keep, f"SN-Net's configuration has {own} stitches; thinned to {count} spread evenly over FLOPs"
    w = 0
    while keep.sum() < count and w <= level.max():
        members = np.flatnonzero(level == w)
        need = count - int(keep.sum())
        keep[members if len(members) <= need else spread_pick([(i, cands[i].macs) for i in members], need)] = True
        w += 1
    got = int(keep.sum())
    return keep, (f"SN-Net's configuration has {own} stitches; window widened by {w - 1} block(s) over the same "
                  f"nearest-size pairs (last level thinned evenly over FLOPs) to reach {got}"
                  + ("" if got == count else f" (only {got} exist)"))


def check_selection_args(strategy: str, buckets: int, tau: float, budget_gflops: float | None) -> None:
    """One-line errors for out-of-range selection settings (:class:`~klas.config.SearchConfig`'s checks)."""
    SearchConfig(strategy=strategy, buckets=buckets, tau=tau, budget=budget_gflops)


def check_budget(cands: Sequence[Candidate], anchors: Sequence[Candidate], budget_macs: float | None,
                 cost: CostAxis | None = None) -> None:
    """Refuse a budget below every candidate (costs are known before any scoring: check it first).

    ``cost`` (default: MACs and ``budget_macs``) gives the axis; the message names the cheapest network.
    """
    cost = cost or CostAxis.of_macs(cands, anchors, budget_macs)
    if cost.budget is None:
        return
    everyone = list(cands) + list(anchors)
    values = np.concatenate([cost.cands, cost.anchors])
    k = int(np.argmin(values))
    if cost.budget < values[k]:
        where = f" ({cost.where})" if cost.where else ""
        raise KlasError(
            f"{cost.flag} {cost.show(cost.budget)} is below the cheapest candidate, {everyone[k].route} "
            f"at {cost.show(float(values[k]))}{where}; raise the budget"
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
    count: int | None = None,
    cost: CostAxis | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(selected mask, bucket index) over ``cands`` for one strategy.

    ``cost``: the axis buckets split and the budget caps (default: MACs, capped by ``budget_macs``;
    a latency axis buckets over predicted milliseconds instead).

    ``count``: select exactly that many in-range stitches (when that many exist) instead of each
    strategy's own count, each by its own rule: ``klas`` / ``cka`` move τ
    (:func:`select_count_by_score`), ``snnet`` thins or widens its window (:func:`select_snnet_count`),
    ``random`` draws ``count``.
    """
    cost = cost or CostAxis.of_macs(cands, anchors, budget_macs)
    check_budget(cands, anchors, budget_macs, cost)
    lo, hi = cost_range(cost)
    bucket = assign_buckets(cost.cands, lo, hi, buckets)
    in_range = bucket >= 0
    scores = {"klas": gamma, "cka": cka_distance}
    if strategy in scores:
        if count is None:
            keep = select_by_bucket(np.asarray(scores[strategy]), bucket, tau)
        else:
            keep, _ = select_count_by_score(np.asarray(scores[strategy]), bucket, count)
    elif strategy == "snnet":
        if count is None:
            keep = select_snnet(cands, profiles, in_range)
        else:
            keep, _ = select_snnet_count(cands, snnet_levels(cands, profiles, in_range), count)
    elif strategy == "random":
        n = int(select_by_bucket(np.asarray(gamma), bucket, tau).sum()) if count is None else count
        keep = select_random(in_range, n, seed)
    else:
        raise KlasError(f"unknown --strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    return keep & in_range, bucket


__all__ = [
    "STRATEGIES", "CostAxis", "assign_buckets", "cost_range", "bucket_best", "check_budget", "check_selection_args", "flops_range", "ratio_to_bucket_best",
    "select", "select_by_bucket", "select_count_by_score", "select_random", "select_snnet", "select_snnet_count",
    "snnet_levels", "spread_pick",
]
