"""Does a selection strategy find good stitches? Ground truth over every candidate of a model family
against the selections of ``klas``, ``snnet``, ``cka`` and ``random``, at equal count and training.

:func:`run_family` does it for one family; ``benchmarks/bench_quality.py`` runs it for the demo
families and prints and plots the report.

For each demo family (``klas.zoo.FAMILIES``: the ViT trio and the ResNet pair, trained on the built-in
``digits`` set) separately:

1. **Cache.** ``klas.cache.build_cache`` on digits: the whole probe-train / score / eval splits
   (``--quick``: 300 images of each), split seed 0, the zoo's split, so eval images were never trained on.
2. **Search.** ``klas.search.search(strategy="klas")`` writes a real run directory; Γ of every
   candidate comes from it. The CKA distance ``1 - CKA`` comes from ``klas.search.cka_distance``,
   the function ``search(strategy="cka")`` uses, and every strategy's selection is
   made by ``klas.select.select`` on the same candidates, buckets and scores, i.e. what ``klas search
   --strategy S`` writes (the probes are seeded, so re-running search per strategy would retrain the
   same probes; ``tests/test_bench_quality.py`` checks the equivalence). Only probe-train and score are read here.
3. **Equal counts.** K = the number ``klas`` selects with its bucket rule (B buckets, τ). Every other
   strategy is brought to exactly K, each by its own rule:

   (``klas.select.select(..., count=K)``)

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
   stitches that continue in the same target block through it as one concatenated batch (the
   training core's :func:`klas.train.core.fit` with several networks per step).
5. **Joint fine-tuning.** Each selection (K stitches) starts from the same least-squares init and is
   trained SN-Net style, exactly like ``klas train --sampling uniform``: T = K · gt_steps steps, each
   one uniformly sampled stitch on one batch (same data order and seeds for every strategy;
   :func:`klas.train.core.fit`). T is
   the same for every strategy; on average each stitch gets the ground truth's per-stitch budget.
6. **Evaluation** on the eval split (the only place it is read): every candidate (ground truth),
   every selection's stitches and the anchors, prefixes shared per batch
   (:func:`klas.train.evaluate.correct_per_image`).

Metrics (accuracies are fractions on disk, percent on screen; costs in GFLOPs, fvcore convention:
one multiply-add = one FLOP):

All metrics are :mod:`klas.metrics`.

* **Front** of a strategy: ``klas.metrics.pareto_front`` over its K fine-tuned stitches plus the anchors
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

import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from rich.console import Console

from klas.cache import build_cache, open_cache
from klas.errors import KlasError
from klas.metrics import front_summary, percentile_ci, recovery, spearman
from klas.optim import warmup_cosine, warmup_steps_of
from klas.search import cka_distance, search
from klas.select import select, select_count_by_score, select_random, select_snnet_count, snnet_levels
from klas.stitch.candidates import Candidate, anchors as list_anchors, enumerate_stitches
from klas.stitch.init import DEFAULT_RIDGE
from klas.stitch.network import StitchNet, StitchSpec
from klas.train import (
    Objective, SplitData, correct_per_image, epoch_positions, fit, init_stitches, make_optimizer, parse_loss,
    stitch_sequence,
)
from klas.utils import DEFAULT_ROOT, resolve_device, seed_everything

#: KLAS (ICLR 2026): share of FLOPs buckets whose best stitch each method selects, Swin-Ti/B.
PAPER_RECOVERY = {"klas": 0.889, "snnet": 0.611, "cka": 0.055}
#: Budgets at which the best accuracy is reported: x_lo + q (x_hi - x_lo).
BUDGET_QUANTILES = (0.25, 0.5, 0.75)


@dataclass(frozen=True)
class QualityConfig:
    """Sizes and recipe of one quality run (``benchmarks/bench_quality.py``; ``--quick`` shrinks them)."""

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




# -- data, selections, training ----------------------------------------------------------------------------


def _quiet() -> Console:
    return Console(file=open(os.devnull, "w"), width=120)


def build_family_cache(models: Sequence[str], out: Path, cfg: QualityConfig, root: Path, keep: bool):
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
    """``klas train``'s least-squares init (same images) of every stitch; returns each layer's state."""
    init_stitches(net, train, images=cfg.init_images, ridge=DEFAULT_RIDGE, seed=cfg.seed,
                  batch_size=cfg.eval_batch_size, device=dev)
    return {i: {k: v.detach().clone() for k, v in net.stitch_layer(i).state_dict().items()} for i in net.stitch_ids}


def _fit(net: StitchNet, train, cfg: QualityConfig, sequence: list, dev: torch.device, chunk_images: int = 0) -> list[float]:
    """The training core's ``fit`` with ``klas train``'s recipe (CE, AdamW, warm-up + cosine) over ``sequence``."""
    steps = len(sequence)
    warm = warmup_steps_of(cfg.warmup, steps)
    return fit(net, train, sequence, Objective(parse_loss("ce")), make_optimizer(net, cfg.lr, cfg.weight_decay),
               positions=epoch_positions(train.n, steps, cfg.batch_size, cfg.seed, 1), batch_size=cfg.batch_size,
               device=dev, schedule=lambda s: warmup_cosine(s, steps, warm), chunk_images=chunk_images)


def train_ground_truth(net: StitchNet, train, cfg: QualityConfig, dev: torch.device) -> list[float]:
    """``gt_steps`` steps for every stitch of ``net`` on the same batches; returns the mean loss per step.

    One AdamW over all stitch layers: Adam and decoupled weight decay act per parameter, so this is
    the same as an optimizer per stitch; the summed loss gives each layer its own gradient.
    """
    return _fit(net, train, cfg, [net.stitch_ids] * cfg.gt_steps, dev, chunk_images=cfg.train_chunk_images)


def train_joint(net: StitchNet, train, cfg: QualityConfig, steps: int, dev: torch.device) -> float:
    """``klas train --sampling uniform --epochs 1 --steps-per-epoch steps`` on ``net``'s stitches (already
    least-squares initialised); returns the mean loss."""
    ids = net.stitch_ids
    sequence = [ids[i] for i in stitch_sequence(len(ids), steps, "uniform", [0] * len(ids), cfg.seed, 1)]
    return sum(_fit(net, train, cfg, sequence, dev)) / max(1, steps)


# -- one family ----------------------------------------------------------------------------------------


def _spec(c: Candidate, gamma: float, bucket: int) -> StitchSpec:
    return StitchSpec(id=c.id, src=c.src, src_cut=c.src_cut, dst=c.dst, dst_cut=c.dst_cut, route=c.route,
                      macs=c.macs, params=c.params, gamma=float(gamma), bucket=int(bucket))


def run_family(family: str, models: Sequence[str], cfg: QualityConfig, work: Path, *, root: Path = DEFAULT_ROOT,
               device: str | None = None, keep_cache: bool = False, say=print) -> dict:
    """Everything for one family; returns its JSON-ready results (plus ``_bits`` for the bootstrap)."""
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
    bits = correct_per_image(nets, eval_data, batch_size=cfg.eval_batch_size, device=dev, chunk_images=cfg.eval_chunk_images)
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


def _metrics(bits, stitches, anchor_ids, gflops, cheapest, bucket, masks, span, idx=None) -> dict:
    """Fronts, HV, best at budgets and recovery of the anchors, the ground truth and every selection,
    on the eval images ``idx`` (all when None)."""
    x_lo, x_hi, budgets = span
    anchors_pts = _points(anchor_ids, bits["anchors"], gflops, idx)
    y_ref = next(p["acc"] for p in anchors_pts if p["id"] == cheapest)
    gt_acc = np.array([bits["gt"][c.id].mean() if idx is None else bits["gt"][c.id][idx].mean() for c in stitches])
    res = {"y_ref": y_ref, "anchors": anchors_pts, "gt_acc": gt_acc, "strategies": {}}
    res["anchors_only"] = front_summary(anchors_pts, x_lo, x_hi, y_ref, budgets)
    gt_pts = [{"id": c.id, "gflops": gflops[c.id], "acc": float(a)} for c, a in zip(stitches, gt_acc)]
    res["ground_truth"] = front_summary(gt_pts + anchors_pts, x_lo, x_hi, y_ref, budgets, gt_pts)
    for name, mask in masks.items():
        ids = [stitches[j].id for j in np.flatnonzero(mask)]
        pts = _points(ids, bits[name], gflops, idx)
        m = front_summary(pts + anchors_pts, x_lo, x_hi, y_ref, budgets, pts)
        m["stitches"] = pts
        m["recovery"] = recovery(gt_acc, bucket, mask)
        res["strategies"][name] = m
    return res


def _bootstrap(metrics, masks, n_eval: int, rounds: int, seed: int) -> tuple[dict, dict, dict]:
    """HV, HV of the stitches and recovery over ``rounds`` resamples of the eval images (the same
    resamples for every network), plus klas's HV differences to each other strategy."""
    rng = np.random.default_rng(seed)
    boot_hv: dict[str, list[float]] = {}
    boot_hvs: dict[str, list[float]] = {}
    boot_rec: dict[str, list[float]] = {}
    for _ in range(rounds):
        r = metrics(rng.integers(0, n_eval, n_eval))
        for name, m in r["strategies"].items():
            boot_hv.setdefault(name, []).append(m["hypervolume"])
            boot_hvs.setdefault(name, []).append(m["hypervolume_stitches"])
            boot_rec.setdefault(name, []).append(m["recovery"]["rate"])
        boot_hv.setdefault("anchors_only", []).append(r["anchors_only"]["hypervolume"])
        boot_hv.setdefault("ground_truth", []).append(r["ground_truth"]["hypervolume"])
        boot_hvs.setdefault("ground_truth", []).append(r["ground_truth"]["hypervolume_stitches"])
        klas = r["strategies"]["klas"]
        for name in masks:
            if name != "klas":
                other = r["strategies"][name]
                boot_hv.setdefault(f"klas-minus-{name}", []).append(klas["hypervolume"] - other["hypervolume"])
                boot_hvs.setdefault(f"klas-minus-{name}", []).append(
                    klas["hypervolume_stitches"] - other["hypervolume_stitches"])
    return boot_hv, boot_hvs, boot_rec


def summarise(family, models, cfg: QualityConfig, stitches, anchor_list, gamma, cka_dist, bucket, masks, notes, bits,
              steps, joint_loss, gt_losses) -> dict:
    """One family's JSON-ready report: per strategy its selection, front, HV, recovery (with bootstrap CIs)."""
    gflops = {c.id: c.macs / 1e9 for c in list(stitches) + list(anchor_list)}
    anchor_ids = [a.src for a in anchor_list]
    x_lo, x_hi = min(gflops[a] for a in anchor_ids), max(gflops[a] for a in anchor_ids)
    cheapest = min(anchor_ids, key=lambda a: gflops[a])
    budgets = [x_lo + q * (x_hi - x_lo) for q in BUDGET_QUANTILES]
    n_eval = len(next(iter(bits["anchors"].values())))

    metrics = partial(_metrics, bits, stitches, anchor_ids, gflops, cheapest, bucket, masks, (x_lo, x_hi, budgets))
    full = metrics()
    boot_hv, boot_hvs, boot_rec = _bootstrap(metrics, masks, n_eval, cfg.bootstrap, cfg.seed)

    gt_acc = full["gt_acc"]
    strategies = {}
    for name, m in full["strategies"].items():
        strategies[name] = {
            **notes[name],
            "selected": [p["id"] for p in m["stitches"]],
            "accuracy": {p["id"]: p["acc"] for p in m["stitches"]},
            "front": m["front"],
            "hypervolume": m["hypervolume"], "hypervolume_ci95": percentile_ci(boot_hv[name]),
            "best_at_budget": m["best_at_budget"],
            "hypervolume_stitches": m["hypervolume_stitches"], "hypervolume_stitches_ci95": percentile_ci(boot_hvs[name]),
            "best_stitch_at_budget": m["best_stitch_at_budget"],
            "recovery": {k: v for k, v in m["recovery"].items()}, "recovery_ci95": percentile_ci(boot_rec[name]),
            "joint_steps": steps, "joint_mean_loss": joint_loss[name],
            "paper_recovery": PAPER_RECOVERY.get(name.split("-")[0]),
        }
        if name != "klas":
            strategies[name]["klas_minus_this_hypervolume_ci95"] = percentile_ci(boot_hv[f"klas-minus-{name}"])
            strategies[name]["klas_minus_this_hypervolume_stitches_ci95"] = percentile_ci(boot_hvs[f"klas-minus-{name}"])
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
        "ground_truth_hypervolume_ci95": percentile_ci(boot_hv["ground_truth"]),
        "ground_truth_best_at_budget": full["ground_truth"]["best_at_budget"],
        "ground_truth_hypervolume_stitches": full["ground_truth"]["hypervolume_stitches"],
        "ground_truth_hypervolume_stitches_ci95": percentile_ci(boot_hvs["ground_truth"]),
        "ground_truth_best_stitch_at_budget": full["ground_truth"]["best_stitch_at_budget"],
        "anchors_only_hypervolume": full["anchors_only"]["hypervolume"],
        "anchors_only_hypervolume_ci95": percentile_ci(boot_hv["anchors_only"]),
        "anchors_only_best_at_budget": full["anchors_only"]["best_at_budget"],
        "spearman": {
            "neg_gamma_vs_gt": spearman(-gamma, gt_acc),
            "cka_similarity_vs_gt": spearman(-cka_dist, gt_acc),
            "neg_gamma_vs_gt_in_range": spearman(-gamma[in_range], gt_acc[in_range]),
            "cka_similarity_vs_gt_in_range": spearman(-cka_dist[in_range], gt_acc[in_range]),
        },
        "strategies": strategies,
    }


__all__ = [
    "BUDGET_QUANTILES", "PAPER_RECOVERY", "QualityConfig", "build_family_cache", "cka_distance", "make_selections",
    "run_family", "summarise", "train_ground_truth", "train_joint",
]
