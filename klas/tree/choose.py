"""Choosing a tree with klas's scores: which model is the trunk, and where it hands over.

From the cache alone (probe-train and score splits, no training of any stitch):

1. a linear probe per representation of every model on probe-train, Θ = the mean KL between every
   two probes' softmax on the score split (:mod:`klas.probes`, :func:`klas.score.kl_matrix`), as
   ``klas search`` computes it;
2. a branch ``T:s -> M:d`` scores its stitch's Γ = Θ(T_s, M_d) / Θ(M_d, M_d+1) (lower is better);
   a tree scores the sum of Γ over its branches (the trunk's own branch is exact and adds 0);
3. each model as trunk is ranked by the median tree score over its share points ``1..n_T-1`` (the
   median, because one near-zero Σ in a score's denominator can make a single Γ huge);
4. ``auto`` share points: the chosen trunk's trees are put in ``points`` equal-width buckets of cost
   (GFLOPs), and the best-scored share point of every non-empty bucket is kept, so the sweep spans
   the cost range instead of bunching where the score happens to be low.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from klas import probes, score
from klas.errors import KlasError
from klas.search import SIGMA_FLOOR, probe_index
from klas.stitch.tree import TreeSpec, tree_cost, tree_spec


@dataclass
class Scores:
    """Θ between every two representations of the cache's models (``where[(model, r)]`` -> row)."""

    theta: np.ndarray
    where: dict[tuple[str, int], int]
    probe_accuracy: dict[str, list[float]] = field(default_factory=dict)

    def gamma(self, src: str, src_cut: int, dst: str, dst_cut: int) -> float:
        a, b, n = self.where[(src, src_cut)], self.where[(dst, dst_cut)], self.where[(dst, dst_cut + 1)]
        return float(self.theta[a, b] / max(self.theta[b, n], SIGMA_FLOOR))


def block_scores(cache, *, probe_epochs: int, temperature: float, seed: int, device: torch.device,
                 progress: Callable[[int, int], None] | None = None, names: list[str] | None = None) -> Scores:
    """Probes on probe-train, Θ on the score split, for every representation of every cached model
    (of ``names`` where given)."""
    if len(cache.classes) < 2:
        raise KlasError(f"cache {cache.path} has no labels; klas tree's scores train label probes: cache labelled images")
    missing = [s for s in ("probe-train", "score", "eval") if s not in cache.splits]
    if missing:
        raise KlasError(f"cache {cache.path} lacks split {', '.join(missing)}; re-run klas cache with --split probe-train,score,eval")
    names = cache.model_names if names is None else list(names)
    index = [(m, r) for m, r in probe_index(cache) if m in names]
    train = [cache.rep_features("probe-train", m, r) for m, r in index]
    bank = probes.train_probes(train, np.array(cache.labels("probe-train")), len(cache.classes), epochs=probe_epochs,
                               seed=seed, device=device, progress=progress)
    held = [cache.rep_features("score", m, r) for m, r in index]
    theta = score.kl_matrix(bank.iter_logits(held), temperature=temperature, device=device).numpy()
    acc = bank.accuracy(held, np.array(cache.labels("score")))
    where = {key: p for p, key in enumerate(index)}
    per_model = {m: [float(acc[where[(m, r.index)]]) for r in cache.profiles[m].reps] for m in names}
    return Scores(theta, where, per_model)


def best_cuts(profiles, scores: Scores, trunk: str, share: int) -> dict[str, int]:
    """``match="score"``: each other model joins at the representation with the lowest Γ from ``trunk:share``."""
    return {m: min(range(p.num_blocks), key=lambda d: (scores.gamma(trunk, share, m, d), d))
            for m, p in profiles.items() if m != trunk}


def candidate_trees(profiles, scores: Scores, trunk: str, match: str, layer: str) -> list[dict]:
    """Every share point of ``trunk``: its tree, exact cost (MACs) and score (sum of Γ over branches)."""
    rows = []
    for s in range(1, profiles[trunk].num_blocks):
        cuts = best_cuts(profiles, scores, trunk, s) if match == "score" else None
        spec = tree_spec(profiles, trunk, s, cuts)
        gammas = {m: scores.gamma(trunk, s, m, c) for m, c in spec.branches}
        rows.append({"share": s, "spec": spec, "macs": tree_cost(profiles, spec, layer)["macs"],
                     "gamma": gammas, "score": float(sum(gammas.values()))})
    return rows


def rank_trunks(profiles, scores: Scores, match: str, layer: str) -> list[dict]:
    """Every model as trunk, best (lowest median tree score over its share points) first."""
    out = []
    for t in profiles:
        if profiles[t].num_blocks < 2:
            continue
        rows = candidate_trees(profiles, scores, t, match, layer)
        best = min(rows, key=lambda r: (r["score"], r["share"]))
        out.append({"trunk": t, "median_score": float(np.median([r["score"] for r in rows])), "best_share": best["share"],
                    "best_score": best["score"], "share_points": len(rows)})
    if not out:
        raise KlasError("no cached model has two or more blocks to split; a trunk needs at least two")
    return sorted(out, key=lambda r: (r["median_score"], r["trunk"]))


def auto_shares(rows: list[dict], points: int) -> list[int]:
    """The best-scored share point in each of ``points`` equal-width cost buckets (see the module docstring)."""
    if len(rows) <= points:
        return [r["share"] for r in rows]
    lo, hi = min(r["macs"] for r in rows), max(r["macs"] for r in rows)
    buckets: dict[int, dict] = {}
    for r in rows:
        b = 0 if hi == lo else min(points - 1, int((r["macs"] - lo) / (hi - lo) * points))
        if b not in buckets or (r["score"], r["share"]) < (buckets[b]["score"], buckets[b]["share"]):
            buckets[b] = r
    return sorted(r["share"] for r in buckets.values())


def chosen_specs(profiles, scores: Scores, trunk: str, shares: list[int], match: str) -> list[TreeSpec]:
    """The trees to train: one per share point (checked), branches joined as ``match`` says."""
    return [tree_spec(profiles, trunk, s, best_cuts(profiles, scores, trunk, s) if match == "score" else None)
            for s in shares]


__all__ = ["Scores", "auto_shares", "best_cuts", "block_scores", "candidate_trees", "chosen_specs", "rank_trunks"]
