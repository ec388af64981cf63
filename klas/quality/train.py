"""Selections brought to equal count, and the one training recipe the ground truth and every selection share."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from klas.optim import warmup_cosine, warmup_steps_of
from klas.quality.config import QualityConfig
from klas.select import (
    select, select_by_bucket, select_count_by_score, select_random, select_snnet_count, snnet_levels,
)
from klas.stitch.init import DEFAULT_RIDGE
from klas.stitch.network import StitchNet
from klas.train import Objective, epoch_positions, fit, init_stitches, make_optimizer, parse_loss, stitch_sequence
from klas.train.core import sampled_routes

#: Training-free signals with klas's bucket rule, each a candidate default of ``klas search`` except CKA
#: (lower is better): Γ = Θ / Σ (the paper's), Θ alone, the least-squares residual 1 - R², 1 - CKA.
SCORE_STRATEGIES = ("gamma", "theta", "ls", "cka")
#: What each is, for notes and tables.
SCORE_WORDS = {"gamma": "Γ = Θ/Σ (klas, the paper's)", "theta": "Θ alone (klas search --score theta)",
               "ls": "least-squares residual 1 - R² (klas.score.ls)", "cka": "1 - CKA"}


def _by_score(name: str, score: np.ndarray, bucket: np.ndarray, k: int, tau: float) -> tuple[np.ndarray, dict]:
    """klas's bucket rule on ``score`` brought to exactly ``k`` (τ moved), and a note on how."""
    own = int(select_by_bucket(score, bucket, tau).sum())
    keep, tau_eff = select_count_by_score(score, bucket, k)
    how = (f"bucket rule on {SCORE_WORDS[name]}: K = {k}" if own == k else
           f"bucket rule on {SCORE_WORDS[name]} picks {own} at τ={tau}; τ moved to {tau_eff:.4g} to pick K = {k} "
           "(bucket winners first, then by ratio to the bucket's best)")
    return keep, {"count_own_rule": own, "count": int(keep.sum()), "tau_effective": tau_eff, "how": how}


def make_selections(stitches, anchor_list, profiles, scores: Mapping[str, np.ndarray], k: int,
                    cfg: QualityConfig) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, dict]]:
    """Masks over ``stitches`` per strategy at count ``k`` (the count ``klas search`` selected): the bucket
    rule on each of ``scores`` (:data:`SCORE_STRATEGIES`), SN-Net's configuration, random per seed; klas's
    buckets; notes on each count. Every mask is what ``klas.select.select(..., count=k)`` returns."""
    kw = dict(buckets=cfg.buckets, tau=cfg.tau, gamma=scores["gamma"], cka_distance=scores.get("cka"))
    _, bucket = select("klas", stitches, anchor_list, profiles, seed=cfg.seed, **kw)
    masks, notes = {}, {}
    for name in SCORE_STRATEGIES:
        if name in scores:
            masks[name], notes[name] = _by_score(name, np.asarray(scores[name]), bucket, k, cfg.tau)
    for name, mask in masks.items():  # what klas.select.select(count=k) returns, i.e. what klas search keeps
        ref, _ = select("cka" if name == "cka" else "klas", stitches, anchor_list, profiles, buckets=cfg.buckets,
                        tau=cfg.tau, gamma=scores[name], cka_distance=scores[name], seed=cfg.seed, count=k)
        assert (mask == ref).all(), f"{name}: the exact-count selection must equal klas.select.select(count=K)"

    level = snnet_levels(stitches, profiles, bucket >= 0)
    assert ((level == 0) == select("snnet", stitches, anchor_list, profiles, **kw)[0]).all()
    eq, how = select_snnet_count(stitches, level, k)
    assert (eq == select("snnet", stitches, anchor_list, profiles, count=k, **kw)[0]).all()
    notes["snnet"] = {"count_own_rule": int((level == 0).sum()), "count": int(eq.sum()), "how": how}
    masks["snnet"] = eq

    for s in cfg.random_seeds:
        keep_r, _ = select("random", stitches, anchor_list, profiles, seed=s, count=k, **kw)
        assert (keep_r == select_random(bucket >= 0, k, s)).all()
        masks[f"random-{s}"] = keep_r
        notes[f"random-{s}"] = {"count_own_rule": k, "count": int(keep_r.sum()),
                                "how": f"klas.select.select_random(K={k}, seed={s})"}
    return masks, bucket, notes


def ls_init_all(net: StitchNet, train, cfg: QualityConfig, dev: torch.device, seed: int) -> dict[str, dict]:
    """``klas train``'s least-squares init (``init_images`` images drawn by ``seed``, original anchors) of
    every stitch; returns each layer's state, so that every selection starts from exactly that init."""
    init_stitches(net, train, images=cfg.init_images, ridge=DEFAULT_RIDGE, seed=seed,
                  batch_size=cfg.eval_batch_size, device=dev)
    return {i: {k: v.detach().clone() for k, v in net.stitch_layer(i).state_dict().items()} for i in net.stitch_ids}


def train_routes(net: StitchNet, train, cfg: QualityConfig, anchor_names: Sequence[str], dev: torch.device, *,
                 route_steps: int, seed: int) -> list[float]:
    """``klas train``'s default recipe on ``net`` (stitches already least-squares initialised): every
    step one network drawn uniformly from its stitches and ``anchor_names`` (SN-Net: anchors are routes
    too), the anchors fine-tuned at ``anchor_lr_scale`` x lr, CE, AdamW, warm-up + cosine, for
    ``route_steps`` x routes steps, data order and draws from ``seed``. It is ``klas train --epochs 1
    --steps-per-epoch T --seed S`` step for step (tests/test_bench_quality.py checks); returns each
    step's loss."""
    routes, buckets = sampled_routes(net.stitch_ids, [0] * len(net.stitch_ids), anchor_names)
    steps = len(routes) * route_steps
    sequence = [routes[i] for i in stitch_sequence(len(routes), steps, "uniform", buckets, seed, 1)]
    opt = make_optimizer(net, cfg.lr, cfg.weight_decay, full_tune=True, anchor_lr_scale=cfg.anchor_lr_scale)
    warm = warmup_steps_of(cfg.warmup, steps)
    return fit(net, train, sequence, Objective(parse_loss("ce")), opt,
               positions=epoch_positions(train.n, steps, cfg.batch_size, seed, 1), batch_size=cfg.batch_size,
               device=dev, schedule=lambda s: warmup_cosine(s, steps, warm))


__all__ = ["SCORE_STRATEGIES", "SCORE_WORDS", "ls_init_all", "make_selections", "train_routes"]
