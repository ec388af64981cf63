"""Does the search find good stitches? Ground truth over every candidate vs the selections of each strategy.

    python benchmarks/bench_quality.py [--quick] [--families vit,cnn] [--random-init] [--out PATH]

For each demo family (``klas.zoo.FAMILIES``: the ViT trio and the ResNet pair, trained on the built-in
``digits`` set) separately:

1. **Cache.** ``klas.cache.build_cache`` on digits: the whole probe-train / score / eval splits
   (``--quick``: 300 images of each), split seed 0, the zoo's split, so eval images were never trained on.
2. **Search.** ``klas.search.search(strategy="klas")`` writes a real run directory; Γ of every
   candidate comes from it. The CKA distance ``1 - CKA`` is computed with ``klas.score.linear_cka_matrix``
   on the score split exactly as ``search(strategy="cka")`` does, and every strategy's selection is
   made by ``klas.select.select`` on the same candidates, buckets and scores, i.e. what ``klas search
   --strategy S`` writes (the probes are seeded, so re-running search per strategy would retrain the
   same probes; the smoke test checks the equivalence). Only probe-train and score are read here.
3. **Equal counts.** K = the number ``klas`` selects with its bucket rule (B buckets, τ). Every other
   strategy is brought to exactly K, each by its own rule:

   * ``cka``: the same bucket rule on 1 - CKA with τ moved until exactly K are chosen: in-range
     candidates ordered by (score / its bucket's best score, score), the first K taken (bucket winners
     come first; ``tau_effective`` is reported);
   * ``snnet``: SN-Net's fixed configuration (nearest-size pairs; equal depths ``|i - j| <= 1``,
     unequal depths ``j = round(i n_b / n_a)``). Too many: thinned to K spread evenly over FLOPs (the
     stitches at ranks ``round(linspace(0, n-1, K))`` by cost). Too few: the sliding window is widened
     one step at a time (``|i - j| <= 1 + w``, resp. ``|j - round(i n_b / n_a)| <= w``) over the same
     model pairs; the last level needed is thinned evenly over FLOPs to land on K;
   * ``random``: ``klas.select.select_random`` draws exactly K in-range candidates (seeds 0, 1, 2),
     which is what ``search(strategy="random")`` does with klas's count.

4. **Ground truth.** Every candidate stitch (all of them, in range or not) gets the least-squares
   init of ``klas train`` (``klas.stitch.init.least_squares_init`` on the same ``init_images``
   probe-train images), then ``gt_steps`` AdamW steps on its stitch layer alone (anchors frozen, CE
   on probe-train, batch ``batch_size``, ``klas train``'s recipe: lr 1e-3, weight decay 0.05 on
   matrices, 10 % linear warm-up then cosine). Every stitch sees the same batches in the same order,
   so the step budget is exactly equal. Each step runs every anchor prefix once and feeds all
   stitches that continue in the same target block through it as one concatenated batch.
5. **Joint fine-tuning.** Each selection (K stitches) starts from the same least-squares init and is
   trained SN-Net style, exactly like ``klas train --sampling uniform``: T = K · gt_steps steps, each
   one uniformly sampled stitch on one batch (same data order and seeds for every strategy). T is
   the same for every strategy; on average each stitch gets the ground truth's per-stitch budget.
6. **Evaluation** on the eval split (the only place it is read): every candidate (ground truth),
   every selection's stitches and the anchors, prefixes shared per batch.

Metrics (accuracies are fractions on disk, percent on screen; costs in GFLOPs, fvcore convention:
one multiply-add = one FLOP):

* **Front** of a strategy: ``klas.export.pareto_front`` over its K fine-tuned stitches plus the anchors
  (every strategy's stitchable network holds the anchors).
* **Hypervolume** (normalised): with the front's step function f(x) = max accuracy of a network of
  cost <= x, ``HV = ∫_{x_lo}^{x_hi} (f(x) - y_ref) dx / ((x_hi - x_lo) · (1 - y_ref))`` where
  ``[x_lo, x_hi]`` = [cost of the cheapest anchor, cost of the largest anchor] (common to all
  strategies of a family), reference point ``(x_hi, y_ref)`` with ``y_ref`` = the cheapest anchor's
  accuracy and the rectangle's top at accuracy 1 (100 %). The cheapest anchor is on every front, so
  f >= y_ref on the range and HV lies in [0, 1]; "anchors only" is the floor every strategy starts
  from. 95 % intervals: percentile bootstrap over eval images (the same resamples for all networks).
* **Best accuracy at budgets** ``x_lo + q (x_hi - x_lo)``, q = 0.25, 0.5, 0.75: f at that cost.
* Secondary, because anchors can dominate every stitch of a family and then flatten HV for all:
  **HV stitches** = the same integral for the K selected stitches alone, y_ref = 0 (so it is the
  mean over the range of the best selected stitch, 0 where none is that cheap), and the best
  selected stitch at each budget.
* **Spearman** ρ (``scipy.stats.spearmanr``) over all candidate stitches between the ground-truth
  accuracy and ``-Γ`` (klas), resp. ``-(1 - CKA)`` = CKA similarity: positive = the score ranks
  stitches like their real accuracy.
* **Recovery rate**: the FLOPs buckets are klas's (B equal-width buckets of the search's range,
  ``klas.select.assign_buckets``); for every bucket holding a candidate, its ground-truth best stitch
  (highest ground-truth accuracy; ties: any of the best counts) is recovered if the strategy selected
  it. Rate = recovered / non-empty buckets. The KLAS paper's numbers (Swin-Ti/B) are printed beside.

Nothing is chosen on the eval split: probes, Γ, CKA and the selections see probe-train and score only;
all training uses probe-train. Seeded and deterministic for a fixed thread count.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from klas.export import pareto_front  # noqa: E402
from klas.select import assign_buckets, flops_range, select, select_random  # noqa: E402
from klas.stitch.candidates import Candidate, anchors as list_anchors, enumerate_stitches  # noqa: E402
from klas.stitch.network import StitchNet, StitchSpec  # noqa: E402
from klas.utils import DEFAULT_ROOT, FLOPS_CONVENTION, package_versions, write_json_atomic  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
STRATEGY_ORDER = ("klas", "snnet", "cka", "random")
#: KLAS (ICLR 2026): share of FLOPs buckets whose best stitch each method selects, Swin-Ti/B.
PAPER_RECOVERY = {"klas": 0.889, "snnet": 0.611, "cka": 0.055}
PAPER_SOURCE = "KLAS (ICLR 2026), Swin-Ti/B: KL 88.9 %, SN-Net heuristic 61.1 %, CKA 5.5 %"
BUDGET_QUANTILES = (0.25, 0.5, 0.75)
X_LABEL = "GFLOPs (fvcore: 1 multiply-add = 1 FLOP)"
Y_LABEL = "top-1 on eval split (%)"


@dataclass(frozen=True)
class Config:
    limit: int | None = None  # images per split (probe-train, score, eval); None: the whole digits splits
    gt_steps: int = 24  # ground truth: steps per stitch; joint: K * gt_steps steps in all
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: float = 0.1
    init_images: int = 100
    buckets: int = 20
    tau: float = 0.05
    probe_epochs: int = 10
    random_seeds: tuple[int, ...] = (0, 1, 2)
    seed: int = 0
    eval_batch_size: int = 128
    train_chunk_images: int = 192  # images per concatenated suffix call while training the ground truth
    eval_chunk_images: int = 512
    bootstrap: int = 500
    random_init: bool = False  # untrained models (tests / development only)


FULL = Config()
QUICK = Config(limit=300, gt_steps=4, batch_size=16, buckets=10, bootstrap=200)


# -- metrics (pure; the smoke test checks them on hand-made cases) ------------------------------------


def step_value(points: Sequence[tuple[float, float]], x: float, default: float = -math.inf) -> float:
    """f(x): the best accuracy among points (cost, acc) with cost <= x."""
    vals = [a for c, a in points if c <= x]
    return max(vals) if vals else default


def hypervolume(points: Sequence[tuple[float, float]], x_lo: float, x_hi: float, y_ref: float,
                y_top: float = 1.0) -> float:
    """Normalised area under the step function f over [x_lo, x_hi] above y_ref (module docstring).

    ``points`` are (cost, accuracy); where no point is as cheap as x, f(x) = y_ref (adds nothing).
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


def recovery(gt_acc: np.ndarray, bucket: np.ndarray, selected: np.ndarray) -> dict:
    """Share of non-empty buckets (bucket >= 0) whose ground-truth best candidate is selected."""
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
    from scipy.stats import spearmanr

    s, a = np.asarray(score_higher_better, float), np.asarray(acc, float)
    ok = np.isfinite(s) & np.isfinite(a)
    if ok.sum() < 3 or np.ptp(s[ok]) == 0 or np.ptp(a[ok]) == 0:
        return {"rho": float("nan"), "p": float("nan"), "n": int(ok.sum())}
    res = spearmanr(s[ok], a[ok])
    return {"rho": float(res.statistic), "p": float(res.pvalue), "n": int(ok.sum())}


def equalise_by_score(scores: np.ndarray, bucket: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """The bucket rule with τ moved until exactly ``k`` in-range candidates are chosen.

    Order: (score / best score of its bucket, score, index); bucket winners (ratio 1) come first, then
    the others as τ grows. Returns the mask and τ_effective (largest chosen ratio - 1).
    """
    scores, bucket = np.asarray(scores, float), np.asarray(bucket)
    ratio = np.full(len(scores), np.inf)
    for b in np.unique(bucket[bucket >= 0]):
        members = np.flatnonzero(bucket == b)
        vals = scores[members]
        fin = np.isfinite(vals)
        if not fin.any():
            continue
        best = vals[fin].min()
        r = np.where(vals == best, 1.0, vals / best if best > 0 else np.inf)
        ratio[members] = np.where(fin, r, np.inf)
    pool = [i for i in np.flatnonzero(bucket >= 0) if np.isfinite(scores[i])]
    pool.sort(key=lambda i: (ratio[i], scores[i], i))
    keep = np.zeros(len(scores), dtype=bool)
    keep[pool[:k]] = True
    tau_eff = float(max(ratio[pool[:k]]) - 1.0) if k and pool else float("nan")
    return keep, tau_eff


def spread_pick(order_costs: Sequence[tuple[int, float]], m: int) -> list[int]:
    """``m`` of the (index, cost) items spread evenly over cost: ranks round(linspace(0, n-1, m))."""
    items = sorted(order_costs, key=lambda t: (t[1], t[0]))
    n = len(items)
    if m >= n:
        return [i for i, _ in items]
    if m <= 0:
        return []
    if m == 1:
        return [items[(n - 1) // 2][0]]
    ranks = sorted({int(round(r)) for r in np.linspace(0, n - 1, m)})
    return [items[r][0] for r in ranks]


def snnet_levels(cands: Sequence[Candidate], profiles: Mapping, in_range: np.ndarray) -> np.ndarray:
    """Window widening needed for SN-Net's rule to include each candidate (0 = SN-Net's own rule; -1 = never:
    not a nearest-size pair, or out of range). Level 0 is exactly ``klas.select.select_snnet``."""
    order = sorted(profiles, key=lambda n: (profiles[n].macs, n))
    neighbours = set(zip(order, order[1:])) | {(b, a) for a, b in zip(order, order[1:])}
    level = np.full(len(cands), -1, dtype=np.int64)
    for k, c in enumerate(cands):
        if (c.src, c.dst) not in neighbours or not in_range[k]:
            continue
        n_a, n_b = profiles[c.src].num_blocks, profiles[c.dst].num_blocks
        if n_a == n_b:
            level[k] = max(0, abs((c.src_cut - 1) - (c.dst_cut - 1)) - 1)
        else:
            level[k] = abs(c.dst_cut - int(round(c.src_cut * n_b / n_a)))
    return level


def equalise_snnet(cands: Sequence[Candidate], level: np.ndarray, k: int) -> tuple[np.ndarray, str]:
    """SN-Net's configuration brought to ``k`` stitches (module docstring); returns the mask and what was done."""
    keep = np.zeros(len(cands), dtype=bool)
    own = int((level == 0).sum())
    if own == k:
        keep[level == 0] = True
        return keep, f"SN-Net's configuration has exactly {k} stitches"
    if own > k:
        pick = spread_pick([(i, cands[i].macs) for i in np.flatnonzero(level == 0)], k)
        keep[pick] = True
        return keep, f"SN-Net's configuration has {own} stitches; thinned to {k} spread evenly over FLOPs"
    w = 0
    while keep.sum() < k:
        members = np.flatnonzero(level == w)
        if w > level.max():
            break
        need = k - int(keep.sum())
        if len(members) <= need:
            keep[members] = True
        else:
            keep[spread_pick([(i, cands[i].macs) for i in members], need)] = True
        w += 1
    got = int(keep.sum())
    return keep, (f"SN-Net's configuration has {own} stitches; window widened by {w - 1} block(s) over the same "
                  f"nearest-size pairs (last level thinned evenly over FLOPs) to reach {got}"
                  + ("" if got == k else f" (only {got} exist)"))


def strategy_metrics(points: list[dict], x_lo: float, x_hi: float, y_ref: float, budgets: Sequence[float],
                     stitches: list[dict] | None = None) -> dict:
    """Front, HV and best-at-budget of one set of evaluated networks (rows with gflops, acc); with
    ``stitches``, also the secondary stitches-only HV (reference accuracy 0) and best stitch at each budget."""
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


# -- data, models, training ----------------------------------------------------------------------------


def _quiet() -> Console:
    return Console(file=open(os.devnull, "w"), width=120)


def build_family_cache(models: Sequence[str], out: Path, cfg: Config, root: Path, keep: bool):
    from klas.cache import build_cache, open_cache
    from klas.errors import KlasError

    try:
        if keep:
            cache = open_cache(out)
            if [m["name"] for m in cache.manifest["models"]] == list(models):
                return cache
    except KlasError:
        pass
    build_cache(list(models), "digits", out, limit=cfg.limit, random_init=cfg.random_init, seed=0, root=root,
                overwrite=True, console=_quiet(), progress=False)
    return open_cache(out)


def cka_distance(cache, stitches: Sequence[Candidate], seed: int) -> np.ndarray:
    """1 - linear CKA on the score split, as ``search(strategy="cka")`` computes it."""
    from klas.score import linear_cka_matrix

    index = [(m, r.index) for m in cache.model_names for r in cache.profiles[m].reps]
    where = {key: p for p, key in enumerate(index)}
    feats = [cache.rep_features("score", m, r) for m, r in index]
    cka = linear_cka_matrix(feats, seed=seed).numpy()
    t = np.array([where[(c.src, c.src_cut)] for c in stitches])
    d = np.array([where[(c.dst, c.dst_cut)] for c in stitches])
    return 1.0 - cka[t, d]


def make_selections(stitches, anchor_list, profiles, gamma, cka_dist, cfg: Config) -> tuple[dict, np.ndarray, dict]:
    """Masks over ``stitches`` per strategy (random per seed), klas's buckets, and notes on each count."""
    kw = dict(gamma=gamma, cka_distance=cka_dist, buckets=cfg.buckets, tau=cfg.tau)
    keep_klas, bucket = select("klas", stitches, anchor_list, profiles, seed=cfg.seed, **kw)
    in_range = bucket >= 0
    k = int(keep_klas.sum())
    notes = {"klas": {"count_own_rule": k, "count": k, "how": f"bucket rule (B={cfg.buckets}, τ={cfg.tau}) on Γ: K = {k}"}}
    masks = {"klas": keep_klas}

    keep_cka, _ = select("cka", stitches, anchor_list, profiles, seed=cfg.seed, **kw)
    eq, tau_eff = equalise_by_score(cka_dist, bucket, k)
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
    eq, how = equalise_snnet(stitches, level, k)
    notes["snnet"] = {"count_own_rule": int(keep_sn.sum()), "count": int(eq.sum()), "how": how}
    masks["snnet"] = eq

    for s in cfg.random_seeds:
        keep_r, _ = select("random", stitches, anchor_list, profiles, seed=s, **kw)
        assert int(keep_r.sum()) == k and (keep_r == select_random(in_range, k, s)).all()
        masks[f"random-{s}"] = keep_r
        notes[f"random-{s}"] = {"count_own_rule": k, "count": k, "how": f"klas.select.select_random(K={k}, seed={s})"}
    return masks, bucket, notes


def _groups(net: StitchNet, ids: Sequence[str], max_images: int, batch: int) -> list[tuple[str, int, list[str]]]:
    """Stitches that continue in the same target block, in chunks of at most max_images // batch."""
    by: dict[tuple[str, int], list[str]] = {}
    for i in ids:
        s = net.specs[i]
        by.setdefault((s.dst, s.dst_cut), []).append(i)
    per = max(1, max_images // max(1, batch))
    return [(d, c, members[j:j + per]) for (d, c), members in sorted(by.items()) for j in range(0, len(members), per)]


def _suffix(net: StitchNet, dst: str, cut: int, hs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Run the target's blocks from ``cut`` and its head on the concatenated stitch outputs; split back."""
    a = net.adapter(dst)
    sizes = [h.shape[0] for h in hs]
    out = a.head(a.run_blocks(torch.cat(hs, 0), cut))
    return list(out.split(sizes, 0))


def _needs(nets: Iterable[tuple[StitchNet, Sequence[str]]]) -> dict[str, set[int]]:
    needs: dict[str, set[int]] = {}
    for net, ids in nets:
        for name, cuts in net.needs(ids).items():
            needs.setdefault(name, set()).update(cuts)
    return needs


def ls_init_all(net: StitchNet, train, cfg: Config, dev: torch.device) -> dict[str, dict]:
    """``klas train``'s least-squares init (same images) of every stitch; returns each layer's state."""
    from klas.stitch.init import least_squares_init
    from klas.train.data import epoch_seed

    g = torch.Generator().manual_seed(epoch_seed(cfg.seed, 0, 2))
    pos = torch.randperm(train.n, generator=g)[: min(cfg.init_images, train.n)].sort().values
    least_squares_init(net, (x for x, _, _ in train.batches(pos, cfg.eval_batch_size, dev)))
    return {i: {k: v.detach().clone() for k, v in net.stitch_layer(i).state_dict().items()} for i in net.stitch_ids}


def _optimizer(net: StitchNet, cfg: Config, total: int):
    from klas.train.loop import _param_groups

    groups = _param_groups(net, cfg.lr, cfg.weight_decay, False, 0.1)
    warm = max(1, round(cfg.warmup * total)) if cfg.warmup > 0 else 0
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999)), warm


def _set_lr(opt, step: int, total: int, warm: int) -> None:
    from klas.train.loop import _lr_factor

    f = _lr_factor(step, total, warm)
    for grp in opt.param_groups:
        grp["lr"] = grp["base_lr"] * f


def train_ground_truth(net: StitchNet, train, cfg: Config, dev: torch.device) -> list[float]:
    """``gt_steps`` steps for every stitch of ``net`` on the same batches; returns the mean loss per step.

    One AdamW over all stitch layers: Adam and decoupled weight decay act per parameter, so this is
    the same as an optimizer per stitch; the summed loss gives each layer its own gradient.
    """
    from klas.train.data import epoch_positions

    steps, b = cfg.gt_steps, cfg.batch_size
    ids = net.stitch_ids
    opt, warm = _optimizer(net, cfg, steps)
    positions = epoch_positions(train.n, steps, b, cfg.seed, 1).view(steps, b)
    groups = _groups(net, ids, cfg.train_chunk_images, b)
    needs = _needs([(net, ids)])
    losses = []
    net.train()
    for step in range(steps):
        _set_lr(opt, step, steps, warm)
        x, y, _ = next(train.batches(positions[step], b, dev))
        with torch.no_grad():
            reps = net.representations(x, needs)
        total = 0.0
        for dst, cut, members in groups:
            hs = [net.stitch_layer(i)(reps[(net.specs[i].src, net.specs[i].src_cut)]) for i in members]
            outs = _suffix(net, dst, cut, hs)
            loss = sum(F.cross_entropy(o, y) for o in outs)
            loss.backward()
            total += float(loss.detach())
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total / len(ids))
    net.eval()
    return losses


def train_joint(net: StitchNet, train, cfg: Config, steps: int, dev: torch.device) -> float:
    """``klas train --sampling uniform --epochs 1 --steps-per-epoch steps`` on ``net``'s stitches (already
    least-squares initialised); returns the mean loss."""
    from klas.train.data import epoch_positions
    from klas.train.loop import _stitch_sequence

    specs = [net.specs[i] for i in net.stitch_ids]
    b = cfg.batch_size
    opt, warm = _optimizer(net, cfg, steps)
    positions = epoch_positions(train.n, steps, b, cfg.seed, 1)
    sequence = _stitch_sequence(len(specs), steps, "uniform", [0] * len(specs), cfg.seed, 1)
    batches = train.batches(positions, b, dev)
    net.train()
    loss_sum = 0.0
    for k in range(steps):
        _set_lr(opt, k, steps, warm)
        x, y, _ = next(batches)
        loss = F.cross_entropy(net.model(specs[sequence[k]].id)(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_sum += float(loss.detach())
    net.eval()
    return loss_sum / max(1, steps)


@torch.no_grad()
def evaluate(nets: Mapping[str, tuple[StitchNet, Sequence[str]]], data, cfg: Config, dev: torch.device) -> dict[str, dict[str, np.ndarray]]:
    """Per-image correctness (bool, eval order) of every listed stitch / anchor of every net.

    All nets must share the same anchor modules; each batch runs the anchors' prefixes once.
    """
    needs = _needs(nets.values())
    first = next(iter(nets.values()))[0]
    plans = {tag: ([i for i in ids if net.is_anchor(i)],
                   _groups(net, [i for i in ids if not net.is_anchor(i)], cfg.eval_chunk_images, cfg.eval_batch_size))
             for tag, (net, ids) in nets.items()}
    out: dict[str, dict[str, list]] = {tag: {i: [] for i in ids} for tag, (_, ids) in nets.items()}
    for net, _ in nets.values():
        net.eval()
    for x, y, _ in data.batches(range(data.n), cfg.eval_batch_size, dev):
        reps = first.representations(x, needs)
        for tag, (net, _) in nets.items():
            anchor_ids, groups = plans[tag]
            for a in anchor_ids:
                out[tag][a].append((net.adapter(a).head(reps[(a, net.profiles[a].num_blocks)]).argmax(1) == y).cpu())
            for dst, cut, members in groups:
                hs = [net.stitch_layer(i)(reps[(net.specs[i].src, net.specs[i].src_cut)]) for i in members]
                for i, o in zip(members, _suffix(net, dst, cut, hs)):
                    out[tag][i].append((o.argmax(1) == y).cpu())
    return {tag: {i: torch.cat(v).numpy() for i, v in d.items()} for tag, d in out.items()}


# -- one family ----------------------------------------------------------------------------------------


def _spec(c: Candidate, gamma: float, bucket: int) -> StitchSpec:
    return StitchSpec(id=c.id, src=c.src, src_cut=c.src_cut, dst=c.dst, dst_cut=c.dst_cut, route=c.route,
                      macs=c.macs, params=c.params, gamma=float(gamma), bucket=int(bucket))


def run_family(family: str, models: Sequence[str], cfg: Config, work: Path, *, root: Path = DEFAULT_ROOT,
               device: str | None = None, keep_cache: bool = False, say=print) -> dict:
    """Everything for one family; returns its JSON-ready results (plus ``_bits`` for the bootstrap)."""
    from klas.search import search
    from klas.train.data import SplitData
    from klas.utils import resolve_device, seed_everything

    dev = resolve_device(device)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    cache = build_family_cache(models, work / "cache", cfg, root, keep_cache)
    times["cache"] = time.perf_counter() - t0
    say(f"[{family}] cache {cache.path}: {dict(cache.manifest['splits'])} ({times['cache']:.0f} s)")

    t = time.perf_counter()
    res = search(cache.path, work / "run-klas", strategy="klas", buckets=cfg.buckets, tau=cfg.tau,
                 probe_epochs=cfg.probe_epochs, seed=cfg.seed, device=str(dev), overwrite=True, console=_quiet(),
                 progress=False)
    profiles = cache.profiles
    stitches = enumerate_stitches(profiles, "up", "linear")
    anchor_list = list_anchors(profiles)
    by_id = {r["id"]: r for r in res.rows}
    gamma = np.array([by_id[c.id]["gamma"] for c in stitches])
    cka_dist = cka_distance(cache, stitches, cfg.seed)
    masks, bucket, notes = make_selections(stitches, anchor_list, profiles, gamma, cka_dist, cfg)
    search_keep = np.array([by_id[c.id]["selected"] for c in stitches])
    assert (search_keep == masks["klas"]).all(), "klas selection must equal what klas search wrote"
    times["search"] = time.perf_counter() - t
    k = int(masks["klas"].sum())
    say(f"[{family}] {len(stitches)} candidates, K = {k} selected by klas; "
        + ", ".join(f"{s}: {n['count_own_rule']}->{n['count']}" for s, n in notes.items() if s != "klas")
        + f" ({times['search']:.0f} s)")

    # -- ground truth ------------------------------------------------------------------------------
    t = time.perf_counter()
    seed_everything(cfg.seed)
    loaded = [m for m in cache.load_models(device=dev, root=root)]
    adapters = {m.name: m.adapter for m in loaded}
    all_specs = [_spec(c, g, b) for c, g, b in zip(stitches, gamma, bucket)]
    gt_net = StitchNet(adapters, profiles, all_specs).to(dev)
    train = SplitData(cache, "probe-train", root=root)
    eval_data = SplitData(cache, "eval", root=root)
    ls_state = ls_init_all(gt_net, train, cfg, dev)
    times["ls_init"] = time.perf_counter() - t
    t = time.perf_counter()
    gt_losses = train_ground_truth(gt_net, train, cfg, dev)
    times["gt_train"] = time.perf_counter() - t
    say(f"[{family}] ground truth: {len(stitches)} stitches x {cfg.gt_steps} steps, loss {gt_losses[0]:.3f} -> "
        f"{gt_losses[-1]:.3f} ({times['gt_train']:.0f} s)")

    # -- joint fine-tuning of each selection ---------------------------------------------------------
    steps = k * cfg.gt_steps
    nets: dict[str, tuple[StitchNet, list[str]]] = {"gt": (gt_net, gt_net.stitch_ids),
                                                     "anchors": (gt_net, [a.src for a in anchor_list])}
    joint_loss, times["joint_train"] = {}, {}
    for name, mask in masks.items():
        t = time.perf_counter()
        specs = [all_specs[j] for j in np.flatnonzero(mask)]
        net = StitchNet(adapters, profiles, specs).to(dev)
        for s in specs:
            net.stitch_layer(s.id).load_state_dict(ls_state[s.id])
        joint_loss[name] = train_joint(net, train, cfg, steps, dev)
        nets[name] = (net, net.stitch_ids)
        times["joint_train"][name] = time.perf_counter() - t
        say(f"[{family}] {name}: {len(specs)} stitches, {steps} joint steps, loss {joint_loss[name]:.3f} "
            f"({times['joint_train'][name]:.0f} s)")

    t = time.perf_counter()
    bits = evaluate(nets, eval_data, cfg, dev)
    times["eval"] = time.perf_counter() - t
    say(f"[{family}] evaluated {sum(len(v) for v in bits.values())} networks on {eval_data.n} eval images "
        f"({times['eval']:.0f} s)")

    out = summarise(family, models, cfg, stitches, anchor_list, gamma, cka_dist, bucket, masks, notes, bits,
                    steps, joint_loss, gt_losses)
    out["splits"] = dict(cache.manifest["splits"])
    out["cache_fingerprint"] = cache.fingerprint
    out["random_init"] = cfg.random_init
    times["total"] = time.perf_counter() - t0
    out["seconds"] = times
    return out


def _points(ids: Sequence[str], bits: Mapping[str, np.ndarray], gflops: Mapping[str, float], idx=None) -> list[dict]:
    return [{"id": i, "gflops": gflops[i], "acc": float(bits[i].mean() if idx is None else bits[i][idx].mean())}
            for i in ids]


def summarise(family, models, cfg: Config, stitches, anchor_list, gamma, cka_dist, bucket, masks, notes, bits,
              steps, joint_loss, gt_losses) -> dict:
    gflops = {c.id: c.macs / 1e9 for c in list(stitches) + list(anchor_list)}
    anchor_ids = [a.src for a in anchor_list]
    x_lo, x_hi = min(gflops[a] for a in anchor_ids), max(gflops[a] for a in anchor_ids)
    cheapest = min(anchor_ids, key=lambda a: gflops[a])
    budgets = [x_lo + q * (x_hi - x_lo) for q in BUDGET_QUANTILES]
    n_eval = len(next(iter(bits["anchors"].values())))

    def evaluate_all(idx=None) -> dict:
        anchors_pts = _points(anchor_ids, bits["anchors"], gflops, idx)
        y_ref = next(p["acc"] for p in anchors_pts if p["id"] == cheapest)
        gt_acc = np.array([bits["gt"][c.id].mean() if idx is None else bits["gt"][c.id][idx].mean() for c in stitches])
        res = {"y_ref": y_ref, "anchors": anchors_pts, "gt_acc": gt_acc, "strategies": {}}
        res["anchors_only"] = strategy_metrics(anchors_pts, x_lo, x_hi, y_ref, budgets)
        gt_pts = [{"id": c.id, "gflops": gflops[c.id], "acc": float(a)} for c, a in zip(stitches, gt_acc)]
        res["ground_truth"] = strategy_metrics(gt_pts + anchors_pts, x_lo, x_hi, y_ref, budgets, gt_pts)
        for name, mask in masks.items():
            ids = [stitches[j].id for j in np.flatnonzero(mask)]
            pts = _points(ids, bits[name], gflops, idx)
            m = strategy_metrics(pts + anchors_pts, x_lo, x_hi, y_ref, budgets, pts)
            m["stitches"] = pts
            m["recovery"] = recovery(gt_acc, bucket, mask)
            res["strategies"][name] = m
        return res

    full = evaluate_all()
    # bootstrap over eval images: the same resamples for every network
    rng = np.random.default_rng(cfg.seed)
    boot_hv: dict[str, list[float]] = {}
    boot_hvs: dict[str, list[float]] = {}
    boot_rec: dict[str, list[float]] = {}
    for _ in range(cfg.bootstrap):
        idx = rng.integers(0, n_eval, n_eval)
        r = evaluate_all(idx)
        for name, m in r["strategies"].items():
            boot_hv.setdefault(name, []).append(m["hypervolume"])
            boot_hvs.setdefault(name, []).append(m["hypervolume_stitches"])
            boot_rec.setdefault(name, []).append(m["recovery"]["rate"])
        boot_hv.setdefault("anchors_only", []).append(r["anchors_only"]["hypervolume"])
        boot_hv.setdefault("ground_truth", []).append(r["ground_truth"]["hypervolume"])
        boot_hvs.setdefault("ground_truth", []).append(r["ground_truth"]["hypervolume_stitches"])
        for name in masks:
            if name != "klas":
                boot_hv.setdefault(f"klas-minus-{name}", []).append(
                    r["strategies"]["klas"]["hypervolume"] - r["strategies"][name]["hypervolume"])
                boot_hvs.setdefault(f"klas-minus-{name}", []).append(
                    r["strategies"]["klas"]["hypervolume_stitches"] - r["strategies"][name]["hypervolume_stitches"])

    def ci(v):
        return [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if v else None

    gt_acc = full["gt_acc"]
    strategies = {}
    for name, m in full["strategies"].items():
        strategies[name] = {
            **notes[name],
            "selected": [p["id"] for p in m["stitches"]],
            "accuracy": {p["id"]: p["acc"] for p in m["stitches"]},
            "front": m["front"],
            "hypervolume": m["hypervolume"], "hypervolume_ci95": ci(boot_hv[name]),
            "best_at_budget": m["best_at_budget"],
            "hypervolume_stitches": m["hypervolume_stitches"], "hypervolume_stitches_ci95": ci(boot_hvs[name]),
            "best_stitch_at_budget": m["best_stitch_at_budget"],
            "recovery": {k: v for k, v in m["recovery"].items()}, "recovery_ci95": ci(boot_rec[name]),
            "joint_steps": steps, "joint_mean_loss": joint_loss[name],
            "paper_recovery": PAPER_RECOVERY.get(name.split("-")[0]),
        }
        if name != "klas":
            strategies[name]["klas_minus_this_hypervolume_ci95"] = ci(boot_hv[f"klas-minus-{name}"])
            strategies[name]["klas_minus_this_hypervolume_stitches_ci95"] = ci(boot_hvs[f"klas-minus-{name}"])
    rand = [n for n in strategies if n.startswith("random-")]
    if rand:
        strategies["random (mean)"] = {
            "count": strategies[rand[0]]["count"],
            "hypervolume": float(np.mean([strategies[n]["hypervolume"] for n in rand])),
            "best_at_budget": [float(np.mean([strategies[n]["best_at_budget"][q] for n in rand])) for q in range(len(budgets))],
            "hypervolume_stitches": float(np.mean([strategies[n]["hypervolume_stitches"] for n in rand])),
            "best_stitch_at_budget": [float(np.mean([strategies[n]["best_stitch_at_budget"][q] for n in rand]))
                                      for q in range(len(budgets))],
            "recovery": {"rate": float(np.mean([strategies[n]["recovery"]["rate"] for n in rand]))},
            "of": rand,
        }
    in_range = bucket >= 0
    return {
        "family": family,
        "models": list(models),
        "anchors": [{"id": p["id"], "gflops": p["gflops"], "acc": p["acc"]} for p in full["anchors"]],
        "range_gflops": [x_lo, x_hi],
        "y_ref": full["y_ref"], "y_ref_from": cheapest,
        "budgets_gflops": budgets,
        "num_candidates": len(stitches), "num_in_range": int(in_range.sum()),
        "buckets": cfg.buckets, "nonempty_buckets": int(len(np.unique(bucket[in_range]))),
        "K": int(masks["klas"].sum()),
        "eval_images": n_eval,
        "ground_truth": [
            {"id": c.id, "route": c.route, "gflops": c.macs / 1e9, "acc": float(a), "gamma": float(g),
             "cka_distance": float(d), "bucket": int(b)}
            for c, a, g, d, b in zip(stitches, gt_acc, gamma, cka_dist, bucket)
        ],
        "ground_truth_loss_first_last": [gt_losses[0], gt_losses[-1]],
        "ground_truth_front": full["ground_truth"]["front"],
        "ground_truth_hypervolume": full["ground_truth"]["hypervolume"],
        "ground_truth_hypervolume_ci95": ci(boot_hv["ground_truth"]),
        "ground_truth_best_at_budget": full["ground_truth"]["best_at_budget"],
        "ground_truth_hypervolume_stitches": full["ground_truth"]["hypervolume_stitches"],
        "ground_truth_hypervolume_stitches_ci95": ci(boot_hvs["ground_truth"]),
        "ground_truth_best_stitch_at_budget": full["ground_truth"]["best_stitch_at_budget"],
        "anchors_only_hypervolume": full["anchors_only"]["hypervolume"],
        "anchors_only_hypervolume_ci95": ci(boot_hv["anchors_only"]),
        "anchors_only_best_at_budget": full["anchors_only"]["best_at_budget"],
        "spearman": {
            "neg_gamma_vs_gt": spearman(-gamma, gt_acc),
            "cka_similarity_vs_gt": spearman(-cka_dist, gt_acc),
            "neg_gamma_vs_gt_in_range": spearman(-gamma[in_range], gt_acc[in_range]),
            "cka_similarity_vs_gt_in_range": spearman(-cka_dist[in_range], gt_acc[in_range]),
        },
        "strategies": strategies,
    }


# -- output --------------------------------------------------------------------------------------------


def _pct(v, digits: int = 1) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{100 * v:.{digits}f}"


def _hv(v, c) -> str:
    return f"{v:.3f}" + (f" [{c[0]:.3f}, {c[1]:.3f}]" if c else "")


def _three(vals) -> str:
    return " / ".join(_pct(v) for v in vals)


def family_table(fam: dict) -> Table:
    b = ", ".join(f"{x:.4f}" for x in fam["budgets_gflops"])
    t = Table(title=(f"{fam['family']}: {fam['num_candidates']} candidates, K = {fam['K']} per strategy, "
                     f"{fam['nonempty_buckets']} non-empty buckets, {fam['eval_images']} eval images\n"
                     f"HV over [{fam['range_gflops'][0]:.4f}, {fam['range_gflops'][1]:.4f}] GFLOPs above "
                     f"{_pct(fam['y_ref'])} % ({fam['y_ref_from']}), anchors on every front; HV stitches: the K "
                     f"stitches alone, above 0 %; budgets b1-b3 = {b} GFLOPs"))
    for col in ("strategy", "K (own rule)", "HV [95% CI]", "best @ b1/b2/b3 %", "HV stitches [95% CI]",
                "best stitch @ b1/b2/b3 %", "recovery", "recovery (paper)", "ρ(score, GT)"):
        t.add_column(col, justify="left" if col == "strategy" else "right")
    sp = fam["spearman"]
    rho = {"klas": sp["neg_gamma_vs_gt"]["rho"], "cka": sp["cka_similarity_vs_gt"]["rho"]}
    for name, s in fam["strategies"].items():
        rec = s["recovery"]
        rec_txt = (f"{_pct(rec['rate'])} % ({rec['recovered']}/{rec['buckets']})" if "recovered" in rec
                   else f"{_pct(rec['rate'])} %")
        paper = s.get("paper_recovery")
        t.add_row(name, f"{s['count']} ({s.get('count_own_rule', s['count'])})",
                  _hv(s["hypervolume"], s.get("hypervolume_ci95")), _three(s["best_at_budget"]),
                  _hv(s["hypervolume_stitches"], s.get("hypervolume_stitches_ci95")), _three(s["best_stitch_at_budget"]),
                  rec_txt, f"{_pct(paper)} %" if paper is not None else "-",
                  f"{rho[name]:+.3f}" if name in rho and math.isfinite(rho[name]) else "-")
    t.add_row("anchors only", "0", _hv(fam["anchors_only_hypervolume"], fam["anchors_only_hypervolume_ci95"]),
              _three(fam["anchors_only_best_at_budget"]), "", "", "", "", "", style="dim")
    t.add_row("ground truth (every stitch, own FT)", str(fam["num_candidates"]),
              _hv(fam["ground_truth_hypervolume"], fam["ground_truth_hypervolume_ci95"]),
              _three(fam["ground_truth_best_at_budget"]),
              _hv(fam["ground_truth_hypervolume_stitches"], fam["ground_truth_hypervolume_stitches_ci95"]),
              _three(fam["ground_truth_best_stitch_at_budget"]), "100.0 %", "", "", style="dim")
    return t


COLOURS = {"klas": "#c44e52", "snnet": "#4c72b0", "cka": "#55a868", "random": "#8172b2"}
MARKERS = {"klas": "o", "snnet": "s", "cka": "^", "random": "d"}
WIDTHS = {"klas": 3.2, "cka": 2.3, "snnet": 1.4}  # identical fronts stay visible as stacked colours


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fams = list(report["families"].values())
    fig, axes = plt.subplots(1, len(fams), figsize=(7.4 * len(fams), 6.0), dpi=150, squeeze=False)
    for ax, fam in zip(axes[0], fams):
        gt = fam["ground_truth"]
        strategies = {n: s for n, s in fam["strategies"].items() if "front" in s}
        shown = [100 * p["acc"] for s in strategies.values() for p in s["front"]] + [100 * fam["y_ref"]]
        shown += [100 * a for s in strategies.values() for a in s["accuracy"].values()]
        shown += [100 * a["acc"] for a in fam["anchors"]] + [100 * p["acc"] for p in fam["ground_truth_front"]]
        y_lo = max(0.0, min(shown) - 3)
        y_hi = min(100.0, max(shown + [100 * g["acc"] for g in gt]) + 1.5)
        below = sum(100 * g["acc"] < y_lo for g in gt)
        ax.scatter([g["gflops"] for g in gt], [max(100 * g["acc"], y_lo + 0.3) for g in gt], s=16, color="#c8c8c8",
                   zorder=1, label=f"ground truth: every stitch ({len(gt)}), own fine-tune"
                   + (f"; {below} below the axis, drawn at its foot" if below else ""))
        anchors_xy = sorted((a["gflops"], 100 * a["acc"]) for a in fam["anchors"])
        stair = pareto_front([{"id": i, "gflops": x, "acc": y} for i, (x, y) in enumerate(anchors_xy)], acc="acc")
        ax.step([p["gflops"] for p in stair] + [fam["range_gflops"][1]], [p["acc"] for p in stair] + [stair[-1]["acc"]],
                where="post", color="black", linewidth=1.0, zorder=2, label="anchors only")
        for name, s in strategies.items():
            base = name.split("-")[0]
            rnd = base == "random"
            pts = [{"id": i, "gflops": next(g["gflops"] for g in gt if g["id"] == i), "acc": a}
                   for i, a in s["accuracy"].items()]
            front = pareto_front(pts, acc="acc")
            xs = [p["gflops"] for p in front]
            ys = [100 * p["acc"] for p in front]
            ax.step(xs + [fam["range_gflops"][1]], ys + [ys[-1]], where="post", color=COLOURS[base],
                    linewidth=1.0 if rnd else WIDTHS[base], linestyle="--" if rnd else "-", alpha=0.7 if rnd else 0.95,
                    zorder=3 if rnd else 4,
                    label=f"{name}: HV {s['hypervolume']:.3f} (with anchors), {s['hypervolume_stitches']:.3f} (stitches)")
            ax.scatter(xs, ys, s=18 if rnd else 30, marker=MARKERS[base], color=COLOURS[base],
                       alpha=0.7 if rnd else 0.95, zorder=3 if rnd else 4)
            if not rnd:  # where the strategy's other stitches landed
                on = {p["id"] for p in front}
                rest = [p for p in pts if p["id"] not in on]
                if rest:
                    ax.scatter([p["gflops"] for p in rest], [max(100 * p["acc"], y_lo + 0.3) for p in rest], s=22,
                               marker=MARKERS[base], facecolors="none", edgecolors=COLOURS[base], linewidths=0.9,
                               alpha=0.8, zorder=2)
        top = max(a["gflops"] for a in fam["anchors"])
        for a in fam["anchors"]:
            ax.scatter([a["gflops"]], [100 * a["acc"]], s=120, marker="*", color="#dd8452", edgecolors="black",
                       linewidths=0.6, zorder=6)
            last = a["gflops"] == top
            ax.annotate(a["id"], (a["gflops"], 100 * a["acc"]), xytext=(-6 if last else 6, -13),
                        textcoords="offset points", fontsize=8, fontweight="bold", zorder=7,
                        ha="right" if last else "left")
        for q, b in zip(BUDGET_QUANTILES, fam["budgets_gflops"]):
            ax.axvline(b, color="0.55", linestyle=":", linewidth=0.9, zorder=0)
        ax.axhline(100 * fam["y_ref"], color="0.55", linestyle="-.", linewidth=0.8, zorder=0)
        ax.set_ylim(y_lo, y_hi)
        ax.set_xlabel(X_LABEL)
        ax.set_ylabel(Y_LABEL)
        ax.set_title(f"{fam['family']}: {', '.join(fam['models'])}\nK = {fam['K']} stitches per strategy, "
                     f"{fam['eval_images']} eval images; lines: stitch fronts, hollow: other selected stitches",
                     fontsize=9.5)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right", fontsize=6.8, framealpha=0.92)
    fig.suptitle("Selected stitches after joint fine-tuning (equal K and steps) over the ground truth; a strategy's "
                 "full front = the upper envelope of its line and the anchors' staircase\n"
                 "dotted: budgets b1-b3; dash-dot: HV reference accuracy (cheapest anchor)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def machine_info() -> dict:
    cpu = ""
    try:
        cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "")
    except OSError:
        pass
    return {"cpu_count": os.cpu_count(), "cpu_model": cpu or platform.processor(), "torch_threads": torch.get_num_threads(),
            "torch_version": torch.__version__, "python": platform.python_version(),
            "load_average_at_start": list(os.getloadavg())}


def run(cfg: Config, families: Sequence[str], work: Path, out_json: Path, out_png: Path, *, command: str,
        quick: bool, root: Path = DEFAULT_ROOT, device: str | None = None, keep_cache: bool = False,
        console: Console | None = None) -> dict:
    from klas.zoo import FAMILIES, stale_models

    console = console or Console(stderr=True, width=max(190, Console(stderr=True).width))
    if not cfg.random_init:
        stale = stale_models(root, [m for f in families for m in FAMILIES[f]])
        if stale:  # training them here would be timed as part of the benchmark
            raise SystemExit(f"zoo models {', '.join(stale)} are missing or out of date; run `klas zoo` first")
    started = time.perf_counter()
    info = machine_info()
    report = {
        "command": command, "quick": quick, "config": asdict(cfg), "machine": info,
        "flops": FLOPS_CONVENTION, "accuracy_unit": "fraction",
        "definitions": {
            "front": "klas.export.pareto_front over the strategy's K jointly fine-tuned stitches plus the anchors",
            "hypervolume": ("HV = integral over [x_lo, x_hi] of (f(x) - y_ref) dx / ((x_hi - x_lo) * (1 - y_ref)); "
                            "f(x) = best accuracy among the front's networks costing <= x GFLOPs; x_lo / x_hi = cost of "
                            "the cheapest / largest anchor; reference point (x_hi, y_ref), y_ref = the cheapest anchor's "
                            "eval accuracy; rectangle top = accuracy 1.0; in [0, 1]"),
            "hypervolume_ci95": f"percentile bootstrap over eval images ({cfg.bootstrap} resamples, shared by all networks)",
            "best_at_budget": f"f(x_lo + q (x_hi - x_lo)) for q in {list(BUDGET_QUANTILES)}",
            "hypervolume_stitches": ("secondary: the same integral for the step function of the K selected stitches "
                                     "alone (no anchors) with y_ref = 0: HV_s = integral over [x_lo, x_hi] of g(x) dx / "
                                     "(x_hi - x_lo), g(x) = best accuracy among the selected stitches costing <= x, 0 "
                                     "where none does; i.e. the mean over the range of the best stitch available"),
            "best_stitch_at_budget": "g at the same three budgets (nan: no selected stitch that cheap)",
            "spearman": ("scipy.stats.spearmanr over all candidate stitches between the ground-truth accuracy and -Gamma "
                         "(neg_gamma) resp. CKA similarity = -(1 - CKA) (cka_similarity); *_in_range: only candidates "
                         "inside the search's FLOPs range"),
            "recovery": ("klas's FLOPs buckets (B equal-width over the search range); a non-empty bucket is recovered if "
                         "the strategy selected its ground-truth best stitch (ties: any); rate = recovered / non-empty"),
            "ground_truth": ("every candidate: least-squares init (klas train's, same images) + gt_steps AdamW steps on its "
                             "stitch layer alone, same batches for all, klas train's recipe"),
            "joint": "each selection: same LS init, then K * gt_steps steps of klas train --sampling uniform",
            "counts": "see strategies.*.how: all strategies are brought to klas's count K",
        },
        "paper_recovery": {**PAPER_RECOVERY, "source": PAPER_SOURCE},
        "families": {},
    }
    for fam in families:
        fr = run_family(fam, FAMILIES[fam], cfg, work / fam, root=root, device=device, keep_cache=keep_cache,
                        say=lambda m: console.print(m, markup=False, highlight=False))
        report["families"][fam] = fr
        console.print(family_table(fr))
        for name, st in fr["strategies"].items():
            if "how" in st and not name.startswith("random-"):
                console.print(f"  {name}: {st['how']}", markup=False, highlight=False)
        sp = fr["spearman"]
        console.print("  Spearman over all {n} candidates: ρ(-Γ, GT) = {a:+.3f} (p = {pa:.2g}), ρ(CKA, GT) = {b:+.3f} "
                      "(p = {pb:.2g}); in range: {c:+.3f} / {d:+.3f}".format(
                          n=sp["neg_gamma_vs_gt"]["n"], a=sp["neg_gamma_vs_gt"]["rho"], pa=sp["neg_gamma_vs_gt"]["p"],
                          b=sp["cka_similarity_vs_gt"]["rho"], pb=sp["cka_similarity_vs_gt"]["p"],
                          c=sp["neg_gamma_vs_gt_in_range"]["rho"], d=sp["cka_similarity_vs_gt_in_range"]["rho"]),
                      markup=False, highlight=False)
        for name, st in fr["strategies"].items():
            d, ds = st.get("klas_minus_this_hypervolume_ci95"), st.get("klas_minus_this_hypervolume_stitches_ci95")
            if d and ds:
                console.print(f"  klas - {name}: HV difference 95% CI [{d[0]:+.4f}, {d[1]:+.4f}], "
                              f"HV stitches [{ds[0]:+.4f}, {ds[1]:+.4f}]", markup=False, highlight=False)
    report["machine"]["load_average_at_end"] = list(os.getloadavg())
    report["wall_s"] = time.perf_counter() - started
    report["versions"] = package_versions()
    out_json.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_json, report)
    plot(report, out_png)
    console.print(f"paper: {PAPER_SOURCE}")
    console.print(f"wrote {out_json} and {out_png} in {report['wall_s']:.0f} s")
    return report


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="reduced version (< 5 min): fewer images, steps, buckets")
    ap.add_argument("--families", default="vit,cnn", help="comma-separated: vit, cnn")
    ap.add_argument("--random-init", action="store_true", help="untrained models (development only)")
    ap.add_argument("--limit", type=int, help="images per split (default: all, 8626 / 2875 / 2875; quick 300)")
    ap.add_argument("--gt-steps", type=int, help="ground-truth steps per stitch (default 24; quick 4)")
    ap.add_argument("--batch-size", type=int, help="training batch (default 32; quick 16)")
    ap.add_argument("--buckets", type=int, help="FLOPs buckets (default 20; quick 10)")
    ap.add_argument("--bootstrap", type=int, help="bootstrap resamples for the CIs")
    ap.add_argument("--work", default=None, help="scratch directory (default cache/bench-quality[-quick])")
    ap.add_argument("--keep-cache", action="store_true", help="reuse the scratch caches of an earlier run")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: on a shared 2-core machine 2 threads oversubscribe badly)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/quality[.quick].json)")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    cfg = QUICK if args.quick else FULL
    over = {k: v for k, v in (("limit", args.limit), ("gt_steps", args.gt_steps), ("batch_size", args.batch_size),
                              ("buckets", args.buckets), ("bootstrap", args.bootstrap)) if v is not None}
    cfg = replace(cfg, random_init=args.random_init, **over)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    suffix = ".quick" if args.quick else ""
    out_json = Path(args.out) if args.out else RESULTS / f"quality{suffix}.json"
    out_png = out_json.with_suffix(".png")
    work = Path(args.work) if args.work else DEFAULT_ROOT / f"bench-quality{'-quick' if args.quick else ''}"
    command = " ".join(["python", "benchmarks/bench_quality.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    return run(cfg, families, work, out_json, out_png, command=command, quick=args.quick, device=args.device,
               keep_cache=args.keep_cache)


if __name__ == "__main__":
    main()
