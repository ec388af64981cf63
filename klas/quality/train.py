"""Selections brought to equal count, and the one training recipe the ground truth and every selection share."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from klas.optim import warmup_cosine, warmup_steps_of
from klas.quality.config import QualityConfig
from klas.select import select, select_count_by_score, select_random, select_snnet_count, snnet_levels
from klas.stitch.init import DEFAULT_RIDGE
from klas.stitch.network import StitchNet
from klas.train import Objective, epoch_positions, fit, init_stitches, make_optimizer, parse_loss, stitch_sequence
from klas.train.core import sampled_routes


def make_selections(stitches, anchor_list, profiles, gamma, cka_dist, cfg: QualityConfig) -> tuple[dict, np.ndarray, dict]:
    """Masks over ``stitches`` per strategy (random per seed), klas's buckets, and notes on each count."""
    kw = dict(gamma=gamma, cka_distance=cka_dist, buckets=cfg.buckets, tau=cfg.tau)
    keep_klas, bucket = select("klas", stitches, anchor_list, profiles, seed=cfg.seed, **kw)
    in_range = bucket >= 0
    k = int(keep_klas.sum())
    notes = {"klas": {"count_own_rule": k, "count": k, "how": f"bucket rule (B={cfg.buckets}, τ={cfg.tau}) on Γ: K = {k}"}}
    masks = {"klas": keep_klas}

    keep_cka, _ = select("cka", stitches, anchor_list, profiles, seed=cfg.seed, **kw)
    eq, tau_eff = select_count_by_score(cka_dist, bucket, k)
    assert (eq == select("cka", stitches, anchor_list, profiles, count=k, **kw)[0]).all()
    own = int(keep_cka.sum())
    if own == k:
        assert (eq == keep_cka).all()
    notes["cka"] = {"count_own_rule": own, "count": int(eq.sum()), "tau_effective": tau_eff,
                    "how": (f"bucket rule on 1 - CKA picks {own} at τ={cfg.tau}; τ moved to {tau_eff:.4g} to pick K = {k} "
                            "(bucket winners first, then by ratio to the bucket's best)") if own != k else "bucket rule, same count"}
    masks["cka"] = eq

    keep_sn, _ = select("snnet", stitches, anchor_list, profiles, seed=cfg.seed, **kw)
    level = snnet_levels(stitches, profiles, in_range)
    assert ((level == 0) == keep_sn).all(), "snnet_levels level 0 must equal klas.select.select_snnet"
    eq, how = select_snnet_count(stitches, level, k)
    assert (eq == select("snnet", stitches, anchor_list, profiles, count=k, **kw)[0]).all()
    notes["snnet"] = {"count_own_rule": int(keep_sn.sum()), "count": int(eq.sum()), "how": how}
    masks["snnet"] = eq

    for s in cfg.random_seeds:
        keep_r, _ = select("random", stitches, anchor_list, profiles, seed=s, **kw)
        assert int(keep_r.sum()) == k and (keep_r == select_random(in_range, k, s)).all()
        assert (keep_r == select("random", stitches, anchor_list, profiles, seed=s, count=k, **kw)[0]).all()
        masks[f"random-{s}"] = keep_r
        notes[f"random-{s}"] = {"count_own_rule": k, "count": k, "how": f"klas.select.select_random(K={k}, seed={s})"}
    return masks, bucket, notes


def ls_init_all(net: StitchNet, train, cfg: QualityConfig, dev: torch.device) -> dict[str, dict]:
    """``klas train``'s least-squares init (same images, original anchors) of every stitch; returns each
    layer's state, so that every selection starts from exactly the ground truth's init."""
    init_stitches(net, train, images=cfg.init_images, ridge=DEFAULT_RIDGE, seed=cfg.seed,
                  batch_size=cfg.eval_batch_size, device=dev)
    return {i: {k: v.detach().clone() for k, v in net.stitch_layer(i).state_dict().items()} for i in net.stitch_ids}


def route_steps_of(num_stitches: int, num_anchors: int, cfg: QualityConfig) -> int:
    """Steps of a run over these routes: ``route_steps`` per route on average."""
    return (num_stitches + num_anchors) * cfg.route_steps


def train_routes(net: StitchNet, train, cfg: QualityConfig, anchor_names: Sequence[str], dev: torch.device) -> list[float]:
    """``klas train``'s default recipe on ``net`` (stitches already least-squares initialised): every
    step one network drawn uniformly from its stitches and ``anchor_names`` (SN-Net: anchors are routes
    too), the anchors fine-tuned at ``anchor_lr_scale`` x lr, CE, AdamW, warm-up + cosine, for
    :func:`route_steps_of` steps. It is ``klas train --epochs 1 --steps-per-epoch T`` step for step
    (tests/test_bench_quality.py checks); returns each step's loss."""
    routes, buckets = sampled_routes(net.stitch_ids, [0] * len(net.stitch_ids), anchor_names)
    steps = route_steps_of(len(net.stitch_ids), len(anchor_names), cfg)
    sequence = [routes[i] for i in stitch_sequence(len(routes), steps, "uniform", buckets, cfg.seed, 1)]
    opt = make_optimizer(net, cfg.lr, cfg.weight_decay, full_tune=True, anchor_lr_scale=cfg.anchor_lr_scale)
    warm = warmup_steps_of(cfg.warmup, steps)
    return fit(net, train, sequence, Objective(parse_loss("ce")), opt,
               positions=epoch_positions(train.n, steps, cfg.batch_size, cfg.seed, 1), batch_size=cfg.batch_size,
               device=dev, schedule=lambda s: warmup_cosine(s, steps, warm))


__all__ = ["ls_init_all", "make_selections", "route_steps_of", "train_routes"]
