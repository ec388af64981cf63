"""One family end to end: cache, search, selections, ground truth, joint training, evaluation, report."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from rich.console import Console

from klas.cache import build_cache, open_cache
from klas.errors import KlasError
from klas.quality.config import QualityConfig
from klas.quality.summary import FamilyData, summarise
from klas.quality.train import ls_init_all, make_selections, train_routes
from klas.quality.variants import DEFAULT, gamma_variants, rate_variants
from klas.search import cka_distance, search
from klas.stitch.candidates import Candidate, anchors as list_anchors, enumerate_stitches
from klas.stitch.network import StitchNet, StitchSpec
from klas.train import SplitData, correct_per_image
from klas.utils import DEFAULT_ROOT, resolve_device, seed_everything


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


def _spec(c: Candidate, gamma: float, bucket: int) -> StitchSpec:
    return StitchSpec(id=c.id, src=c.src, src_cut=c.src_cut, dst=c.dst, dst_cut=c.dst_cut, route=c.route,
                      macs=c.macs, params=c.params, gamma=float(gamma), bucket=int(bucket))


class _Family:
    """The shared pieces of one family's run: cache, data, candidates, fresh anchors on demand."""

    def __init__(self, cache, cfg: QualityConfig, root: Path, dev: torch.device) -> None:
        self.cache, self.cfg, self.root, self.dev = cache, cfg, root, dev
        self.profiles = cache.profiles
        self.stitches = enumerate_stitches(self.profiles, "up", "linear")
        self.anchor_list = list_anchors(self.profiles)
        self.anchor_ids = [a.src for a in self.anchor_list]
        self.train = SplitData(cache, "probe-train", root=root)
        self.splits = {s: SplitData(cache, s, root=root) for s in ("score", "eval")}

    def net(self, specs: Sequence[StitchSpec]) -> StitchNet:
        """A stitchable network over fresh copies of the original anchors (every run fine-tunes its own)."""
        seed_everything(self.cfg.seed)
        return StitchNet.from_loaded(self.cache.load_models(device=self.dev, root=self.root), specs).to(self.dev)

    def positions(self, split: str):
        n = self.splits[split].n
        return range(min(n, self.cfg.eval_limit or n))

    def bits(self, net: StitchNet, ids: Sequence[str], split: str) -> dict[str, np.ndarray]:
        return correct_per_image({"x": (net, list(ids))}, self.splits[split], batch_size=self.cfg.eval_batch_size,
                                 device=self.dev, chunk_images=self.cfg.eval_chunk_images,
                                 positions=self.positions(split))["x"]

    def run(self, net: StitchNet, what: str, say) -> dict:
        """``train_routes`` on ``net`` with its anchors as routes; returns steps, mean and last losses, seconds."""
        t = time.perf_counter()
        losses = train_routes(net, self.train, self.cfg, self.anchor_ids, self.dev)
        out = {"steps": len(losses), "routes": len(net.stitch_ids) + len(self.anchor_ids),
               "mean_loss": float(np.mean(losses)), "last_loss": float(np.mean(losses[-max(1, len(losses) // 10):])),
               "seconds": time.perf_counter() - t}
        say(f"{what}: {out['routes']} routes, {out['steps']} steps, loss {out['mean_loss']:.3f} (last 10 %: "
            f"{out['last_loss']:.3f}) ({out['seconds']:.0f} s)")
        return out


def _search(f: _Family, work: Path, say) -> tuple[np.ndarray, np.ndarray, dict, np.ndarray, dict]:
    """klas search's Γ (a real run directory), CKA, every strategy's selection at klas's count."""
    cfg = f.cfg
    res = search(f.cache.path, work / "run-klas", strategy="klas", buckets=cfg.buckets, tau=cfg.tau,
                 probe_epochs=cfg.probe_epochs, seed=cfg.seed, device=str(f.dev), overwrite=True, console=_quiet(),
                 progress=False)
    by_id = {r["id"]: r for r in res.rows}
    gamma = np.array([by_id[c.id]["gamma"] for c in f.stitches])
    cka_dist = cka_distance(f.cache, f.stitches, cfg.seed)
    masks, bucket, notes = make_selections(f.stitches, f.anchor_list, f.profiles, gamma, cka_dist, cfg)
    assert (np.array([by_id[c.id]["selected"] for c in f.stitches]) == masks["klas"]).all(), \
        "klas selection must equal what klas search wrote"
    return gamma, cka_dist, masks, bucket, notes


def run_family(family: str, models: Sequence[str], cfg: QualityConfig, work: Path, *, root: Path = DEFAULT_ROOT,
               device: str | None = None, keep_cache: bool = False, say=print) -> dict:
    """Everything for one family (:mod:`klas.quality`); returns its JSON-ready results."""
    dev = resolve_device(device)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    cache = build_family_cache(models, work / "cache", cfg, root, keep_cache)
    times["cache"] = time.perf_counter() - t0
    f = _Family(cache, cfg, root, dev)
    log = lambda m: say(f"[{family}] {m}")  # noqa: E731
    t = time.perf_counter()
    gamma, cka_dist, masks, bucket, notes = _search(f, work, say)
    times["search"] = time.perf_counter() - t
    k = int(masks["klas"].sum())
    log(f"{len(f.stitches)} candidates, K = {k} selected by klas; "
        + ", ".join(f"{s}: {n['count_own_rule']}->{n['count']}" for s, n in notes.items() if s != "klas")
        + f" ({times['search']:.0f} s)")

    t = time.perf_counter()
    all_specs = [_spec(c, g, b) for c, g, b in zip(f.stitches, gamma, bucket)]
    original = f.net([])
    bits = {"original": f.bits(original, f.anchor_ids, "eval")}
    gt_net = f.net(all_specs)
    ls_state = ls_init_all(gt_net, f.train, cfg, dev)
    joint = {"gt": f.run(gt_net, f"[{family}] ground truth (every candidate)", say)}
    ids = gt_net.stitch_ids + f.anchor_ids
    bits["gt"] = f.bits(gt_net, ids, "eval")
    gt_score = f.bits(gt_net, [c.id for c in f.stitches], "score")
    gt_score_acc = np.array([gt_score[c.id].mean() for c in f.stitches])
    times["ground_truth"] = time.perf_counter() - t
    del gt_net

    for name, mask in masks.items():
        t = time.perf_counter()
        specs = [all_specs[j] for j in np.flatnonzero(mask)]
        net = f.net(specs)
        for s in specs:
            net.stitch_layer(s.id).load_state_dict(ls_state[s.id])
        joint[name] = f.run(net, f"[{family}] {name}", say)
        bits[name] = f.bits(net, net.stitch_ids + f.anchor_ids, "eval")
        times[f"joint:{name}"] = time.perf_counter() - t

    out = summarise(FamilyData(family, models, f.stitches, f.anchor_list, gamma, cka_dist, bucket, masks, notes, bits),
                    cfg, joint, gt_score_acc)
    if cfg.variants:
        t = time.perf_counter()
        out["variants"] = _variants(f, cfg, gamma, gt_score_acc, out)
        times["variants"] = time.perf_counter() - t
    out.update(splits=dict(cache.manifest["splits"]), cache_fingerprint=cache.fingerprint, random_init=cfg.random_init,
               score_images=len(f.positions("score")), route_steps=cfg.route_steps)
    times["total"] = time.perf_counter() - t0
    out["seconds"] = times
    log(f"done in {times['total']:.0f} s")
    return out


def _variants(f: _Family, cfg: QualityConfig, gamma: np.ndarray, gt_score_acc: np.ndarray, out: dict) -> dict:
    """Every Γ variant's values and its ρ / recovery against the ground truth on score and on eval."""
    variants = gamma_variants(f.cache, f.stitches, cfg, f.dev)
    gt_eval_acc = np.array([g["acc"] for g in out["ground_truth"]])
    rel = float(np.max(np.abs(variants[DEFAULT] - gamma) / np.maximum(np.abs(gamma), 1e-12)))
    cka = {"cka": np.array([g["cka_distance"] for g in out["ground_truth"]])}  # 1 - CKA: lower is better, like Γ
    rate = lambda acc: rate_variants({**variants, **cka}, acc, f.stitches, f.anchor_list, f.profiles, cfg)  # noqa: E731
    return {"default_matches_search_max_rel_diff": rel, "score": rate(gt_score_acc), "eval": rate(gt_eval_acc),
            "gamma": {n: [float(x) for x in g] for n, g in variants.items()}}


__all__ = ["build_family_cache", "run_family"]
