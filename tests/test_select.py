"""Candidate enumeration, exact stitch costs, FLOPs buckets and the selection strategies."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from klas.errors import KlasError
from klas.models import adapt, count_macs, profile_adapter
from klas.select import assign_buckets, check_selection_args, select, select_by_bucket, select_snnet
from klas.stitch.candidates import anchors, enumerate_stitches, model_pairs


def _vit(width: int, depth: int = 4):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(width)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=width, depth=depth, num_heads=2, num_classes=10).eval()


@pytest.fixture(scope="module")
def vit_family():
    models = {"ti": _vit(32), "s": _vit(64), "b": _vit(128)}
    adapters = {k: adapt(m) for k, m in models.items()}
    return adapters, {k: profile_adapter(a, (3, 32, 32)) for k, a in adapters.items()}


@pytest.fixture(scope="module")
def resnet_family():
    out = {}
    for name in ("resnet18", "resnet34"):
        with torch.device("meta"):
            m = timm.create_model(name, pretrained=False).eval()
        out[name] = profile_adapter(adapt(m), (3, 64, 64))
    return out


def test_plain_vit_family_gives_every_cut_pair(vit_family):
    _, profiles = vit_family
    n = 4
    up = enumerate_stitches(profiles, "up")
    assert len(up) == 3 * n * n  # 3 cheaper->larger pairs, src_cut 1..n, dst_cut 0..n-1
    assert len(enumerate_stitches(profiles, "both")) == 6 * n * n
    assert model_pairs(profiles, "up") == [("ti", "s"), ("ti", "b"), ("s", "b")]
    assert all(1 <= c.src_cut <= n and 0 <= c.dst_cut <= n - 1 for c in up)
    assert len({c.id for c in up}) == len(up)


def test_hierarchical_models_pair_every_cut_snnet_only_equal_grids(resnet_family):
    cands = enumerate_stitches(resnet_family, "up")
    p18, p34 = resnet_family["resnet18"], resnet_family["resnet34"]
    assert len(cands) == p18.num_blocks * p34.num_blocks  # bridged where the grids differ
    picked = select_snnet(cands, resnet_family, np.ones(len(cands), dtype=bool))
    assert picked.any()
    assert all(p18.reps[c.src_cut].grid == p34.reps[c.dst_cut].grid for c, k in zip(cands, picked) if k)


def test_cost_table_equals_counting_the_stitched_network(vit_family):
    adapters, profiles = vit_family
    cands = enumerate_stitches(profiles, "up")
    x = torch.randn(1, 3, 32, 32)
    for c in cands[::7]:
        a, b = adapters[c.src], adapters[c.dst]
        ra, rb = profiles[c.src].reps[c.src_cut], profiles[c.dst].reps[c.dst_cut]
        layer = torch.nn.Linear(ra.width, rb.width)

        def run(inp):
            h = a.run_blocks(a.stem(inp), 0, c.src_cut)
            return b.head(b.run_blocks(layer(h), c.dst_cut))

        with torch.no_grad():
            macs, _ = count_macs(run, x)
        assert macs == c.macs, c.route
        params = sum(p.numel() for p in layer.parameters())
        assert c.params == profiles[c.src].prefix_params(c.src_cut) + params + profiles[c.dst].suffix_params(c.dst_cut)


def test_buckets_are_equal_width_and_closed_at_the_top():
    b = assign_buckets(np.array([0.0, 0.99, 1.0, 9.99, 10.0, 10.5, -1]), 0.0, 10.0, 10)
    assert b.tolist() == [0, 0, 1, 9, 9, -1, -1]


def test_bucket_rule_keeps_best_and_near_ties():
    scores = np.array([1.0, 1.04, 1.2, 3.0, 2.0])
    bucket = np.array([0, 0, 0, 1, 1])
    assert select_by_bucket(scores, bucket, 0.05).tolist() == [True, True, False, False, True]
    assert select_by_bucket(scores, bucket, 0.0).tolist() == [True, False, False, False, True]


def test_strategies_respect_budget_and_counts(vit_family):
    _, profiles = vit_family
    cands = enumerate_stitches(profiles, "up")
    anc = anchors(profiles)
    rng = np.random.default_rng(0)
    gamma = rng.random(len(cands))
    budget = (anc[0].macs + anc[-1].macs) / 2
    for strategy in ("klas", "snnet", "random", "cka"):
        keep, bucket = select(strategy, cands, anc, profiles, gamma=gamma, cka_distance=gamma[::-1].copy(),
                              budget_macs=budget, buckets=5, tau=0.05, seed=3)
        assert keep.any(), strategy
        assert all(cands[k].macs <= budget for k in np.flatnonzero(keep)), strategy
    klas_keep, _ = select("klas", cands, anc, profiles, gamma=gamma, budget_macs=budget, buckets=5)
    r1, _ = select("random", cands, anc, profiles, gamma=gamma, budget_macs=budget, buckets=5, seed=3)
    r2, _ = select("random", cands, anc, profiles, gamma=gamma, budget_macs=budget, buckets=5, seed=3)
    assert r1.sum() == klas_keep.sum() and (r1 == r2).all()


def test_snnet_uses_nearest_pairs_and_paired_windows(vit_family):
    _, profiles = vit_family
    cands = enumerate_stitches(profiles, "up")
    keep, _ = select("snnet", cands, anchors(profiles), profiles, gamma=np.zeros(len(cands)))
    chosen = [cands[k] for k in np.flatnonzero(keep)]
    assert chosen
    assert {(c.src, c.dst) for c in chosen} <= {("ti", "s"), ("s", "b")}
    assert all(abs((c.src_cut - 1) - (c.dst_cut - 1)) <= 1 for c in chosen)


def test_budget_below_cheapest_names_it(vit_family):
    _, profiles = vit_family
    cands = enumerate_stitches(profiles, "up")
    with pytest.raises(KlasError, match=r"below the cheapest candidate, .*\[0\.\."):
        select("klas", cands, anchors(profiles), profiles, gamma=np.zeros(len(cands)), budget_macs=1.0)


@pytest.mark.parametrize(
    "args,msg",
    [(("nope", 20, 0.05, None), "unknown --strategy"), (("klas", 0, 0.05, None), "--buckets"),
     (("klas", 20, 1.0, None), "--tau"), (("klas", 20, -0.1, None), "--tau"), (("klas", 20, 0.05, -1.0), "--budget")],
)
def test_bad_selection_settings(args, msg):
    with pytest.raises(KlasError, match=msg):
        check_selection_args(*args)


# -- exact counts (select(..., count=K)) ------------------------------------------------------------


def test_ratio_to_bucket_best_and_select_by_bucket_share_the_bucket_best():
    from klas.select import bucket_best, ratio_to_bucket_best

    scores = np.array([2.0, 1.0, 3.0, np.inf, 0.5, 9.0])
    bucket = np.array([0, 0, 0, 1, 2, -1])
    best = bucket_best(scores, bucket)
    assert best[:3].tolist() == [1.0] * 3 and np.isnan(best[3]) and best[4] == 0.5 and np.isnan(best[5])
    assert ratio_to_bucket_best(scores, bucket).tolist() == [2.0, 1.0, 3.0, np.inf, 1.0, np.inf]
    assert select_by_bucket(scores, bucket, 1.0).tolist() == [True, True, False, False, True, False]


def test_select_count_by_score_is_the_bucket_rule_with_another_tau():
    from klas.select import select_count_by_score

    rng = np.random.default_rng(0)
    for _ in range(100):
        n = rng.integers(3, 30)
        scores = rng.uniform(0.1, 2.0, n)
        bucket = rng.integers(-1, 5, n)
        if not (bucket >= 0).any():
            continue
        tau = float(rng.uniform(0, 0.9))
        rule = select_by_bucket(scores, bucket, tau)
        eq, tau_eff = select_count_by_score(scores, bucket, int(rule.sum()))
        assert (eq == rule).all() and tau_eff <= tau + 1e-9
        winners = select_by_bucket(scores, bucket, 0.0)  # bucket winners come first
        k = int(rng.integers(0, winners.sum() + 1))
        eq, _ = select_count_by_score(scores, bucket, k)
        assert eq.sum() == k and (eq <= winners).all()
        eq, _ = select_count_by_score(scores, bucket, 1000)
        assert (eq == (bucket >= 0)).all()


class _C:
    def __init__(self, macs):
        self.macs = macs


def test_snnet_count_thins_and_widens():
    from klas.select import select_snnet_count, spread_pick

    assert spread_pick([(i, float(i)) for i in range(5)], 3) == [0, 2, 4]
    assert spread_pick([(7, 1.0)], 3) == [7]
    cands = [_C(m) for m in (10, 20, 30, 40, 50, 60, 70)]
    level = np.array([0, 0, 0, 1, 1, 2, -1])
    keep, how = select_snnet_count(cands, level, 3)
    assert keep.tolist() == [True, True, True, False, False, False, False] and "exactly" in how
    keep, how = select_snnet_count(cands, level, 2)  # thinned over FLOPs: cheapest and dearest of level 0
    assert keep.tolist() == [True, False, True, False, False, False, False] and "thinned" in how
    keep, how = select_snnet_count(cands, level, 4)  # level 1 needed partly
    assert keep.sum() == 4 and keep[:3].all() and keep[3:5].sum() == 1 and "widened by 1" in how
    keep, how = select_snnet_count(cands, level, 10)  # never picks level -1
    assert keep.tolist() == [True] * 6 + [False] and "only 6" in how


def test_select_with_count_on_a_real_family(vit_family):
    from klas.select import snnet_levels

    adapters, profiles = vit_family
    cands = enumerate_stitches(profiles, "up", "linear")
    anchor_list = anchors(profiles)
    rng = np.random.default_rng(0)
    kw = dict(gamma=rng.uniform(0.1, 2.0, len(cands)), cka_distance=rng.uniform(0, 1, len(cands)), buckets=6, tau=0.05)
    own, bucket = select("klas", cands, anchor_list, profiles, **kw)
    k = int(own.sum())
    for strategy in ("klas", "cka", "snnet", "random"):
        keep, _ = select(strategy, cands, anchor_list, profiles, count=k, **kw)
        assert keep.sum() == k and not (keep & (bucket < 0)).any(), strategy
    assert (select("klas", cands, anchor_list, profiles, count=k, **kw)[0] == own).all()
    level = snnet_levels(cands, profiles, bucket >= 0)
    assert ((level == 0) == select("snnet", cands, anchor_list, profiles, **kw)[0]).all()
