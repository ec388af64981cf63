"""One family end to end: cache, search, signals, ground truth (twice), selections, evaluation, report,
with the wall time of every phase."""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from rich.console import Console

from klas.cache import build_cache, open_cache
from klas.errors import KlasError
from klas.probes import ProbeBank
from klas.quality.config import QualityConfig, QualityFamily
from klas.quality.signals import competitive, rate_signals
from klas.quality.summary import KLAS_SCORES, FamilyData, gt_tag, summarise
from klas.quality.train import SCORE_STRATEGIES, ls_init_all, make_selections, train_routes
from klas.quality.variants import DEFAULT, gamma_variants, rate_variants
from klas.run import PROBES
from klas.score import ls_residual
from klas.search import DEFAULT_SCORE, cka_distance, search
from klas.stitch.candidates import Candidate, anchors as list_anchors, enumerate_stitches
from klas.stitch.network import StitchNet, StitchSpec
from klas.train import SplitData, correct_per_image
from klas.utils import DEFAULT_ROOT, resolve_device, seed_everything

#: Strategies every run trains; the other signals of SCORE_STRATEGIES only when competitive on the score split.
ALWAYS_TRAINED = ("gamma", "theta", "cka")


def _quiet() -> Console:
    return Console(file=open(os.devnull, "w"), width=120)


def build_family_cache(models: Sequence[str], out: Path, cfg: QualityConfig, root: Path, keep: bool,
                       data: str = "digits"):
    """The cache of ``models`` over the built-in digits set ``data`` at ``out`` (``cfg.limit`` images per
    split); with ``keep`` an earlier one there of the same models and data is reused."""
    try:
        if keep:
            cache = open_cache(out)
            if ([m["name"] for m in cache.manifest["models"]] == list(models)
                    and cache.manifest["data"].get("source") == data and cache.manifest["data"].get("limit") == cfg.limit):
                return cache
    except KlasError:
        pass
    build_cache(list(models), data, out, limit=cfg.limit, random_init=cfg.random_init, seed=0, root=root,
                overwrite=True, console=_quiet(), progress=False)
    return open_cache(out)


def _spec(c: Candidate, gamma: float, bucket: int) -> StitchSpec:
    return StitchSpec(id=c.id, src=c.src, src_cut=c.src_cut, dst=c.dst, dst_cut=c.dst_cut, route=c.route,
                      macs=c.macs, params=c.params, gamma=float(gamma), bucket=int(bucket))


class Clock:
    """Wall and CPU seconds (this process, all threads) per named phase, in the order first seen (a phase
    entered twice adds up). On a loaded machine CPU time is the steadier of the two."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}
        self._start, self._cpu = time.perf_counter(), time.process_time()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t, c = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t
            self.cpu_seconds[name] = self.cpu_seconds.get(name, 0.0) + time.process_time() - c

    def totals(self) -> tuple[float, float]:
        """(wall, CPU) seconds since the clock was made."""
        return time.perf_counter() - self._start, time.process_time() - self._cpu


class _Family:
    """The shared pieces of one family's run: cache, data, candidates, fresh anchors on demand."""

    def __init__(self, cache, cfg: QualityConfig, root: Path, dev: torch.device, direction: str) -> None:
        self.cache, self.cfg, self.root, self.dev = cache, cfg, root, dev
        self.profiles = cache.profiles
        self.stitches = enumerate_stitches(self.profiles, direction, "linear")
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
        """Per image of ``split``, whether each network was right: the grouped evaluator (each anchor
        prefix once per batch, stitches resuming the same target block in one call)."""
        return correct_per_image({"x": (net, list(ids))}, self.splits[split], batch_size=self.cfg.eval_batch_size,
                                 device=self.dev, chunk_images=self.cfg.eval_chunk_images,
                                 positions=self.positions(split))["x"]

    def run(self, net: StitchNet, what: str, route_steps: int, seed: int, say) -> dict:
        """``train_routes`` on ``net`` with its anchors as routes; returns steps, losses, seconds."""
        t = time.perf_counter()
        losses = train_routes(net, self.train, self.cfg, self.anchor_ids, self.dev, route_steps=route_steps, seed=seed)
        sec = time.perf_counter() - t
        out = {"steps": len(losses), "routes": len(net.stitch_ids) + len(self.anchor_ids), "route_steps": route_steps,
               "seed": seed, "mean_loss": float(np.mean(losses)),
               "last_loss": float(np.mean(losses[-max(1, len(losses) // 10):])), "seconds": sec,
               "steps_per_second": len(losses) / sec if sec > 0 else float("nan")}
        say(f"{what}: {out['routes']} routes, {out['steps']} steps, loss {out['mean_loss']:.3f} (last 10 %: "
            f"{out['last_loss']:.3f}) ({sec:.0f} s, {out['steps_per_second']:.1f} steps/s)")
        return out


def _search(f: _Family, work: Path, direction: str) -> tuple[dict[str, np.ndarray], np.ndarray, Path]:
    """``klas search`` with its default score (a real run directory): Γ and Θ of every candidate, and
    the mask it selected."""
    cfg = f.cfg
    run_dir = work / "run-klas"
    res = search(f.cache.path, run_dir, strategy="klas", buckets=cfg.buckets, tau=cfg.tau, direction=direction,
                 probe_epochs=cfg.probe_epochs, seed=cfg.seed, device=str(f.dev), overwrite=True, console=_quiet(),
                 progress=False)
    by_id = {r["id"]: r for r in res.rows}
    scores = {k: np.array([by_id[c.id][k] for c in f.stitches]) for k in ("gamma", "theta")}
    return scores, np.array([by_id[c.id]["selected"] for c in f.stitches]), run_dir


def _ground_truth(f: _Family, specs: list[StitchSpec], route_steps: int, clock: Clock, bits: dict, runs: dict,
                  log) -> dict[str, dict]:
    """Every candidate plus the anchors, one joint run per ground-truth seed, evaluated per candidate on
    the eval split (and the first seed's also on the score split); returns the first seed's
    least-squares init of every stitch (each selection starts from it)."""
    ref_state: dict[str, dict] = {}
    for n, seed in enumerate(f.cfg.gt_seeds):
        tag, label = gt_tag(seed), f"ground truth seed {seed}"
        net = f.net(specs)
        with clock.phase(f"{label}: least-squares init"):
            state = ls_init_all(net, f.train, f.cfg, f.dev, seed)
        with clock.phase(f"{label}: train"):
            runs[tag] = f.run(net, f"{label} (every candidate)", route_steps, seed, log)
        ids = net.stitch_ids + f.anchor_ids
        with clock.phase(f"{label}: eval (eval split)"):
            bits["eval"][tag] = f.bits(net, ids, "eval")
        if n == 0:
            with clock.phase(f"{label}: eval (score split)"):
                bits["score"][tag] = f.bits(net, ids, "score")
            ref_state = state
        del net
    return ref_state


def _trained(masks: dict, ratings: dict, cfg: QualityConfig, notes: dict) -> list[str]:
    """The strategies to train: Γ, Θ, CKA, SN-Net and random always; another signal when its score-split
    in-range ρ is within ``train_margin`` of the best signal's; never one with no stitch (SN-Net on
    bridged pairs)."""
    close = set(competitive(ratings, cfg.train_margin, "score"))
    out = []
    for name, mask in masks.items():
        optional = name in SCORE_STRATEGIES and name not in ALWAYS_TRAINED
        if optional and name not in close:
            notes[name]["not_trained"] = (f"score-split in-range ρ {ratings[name]['score']['rho_in_range']:+.3f} is "
                                          f"not within {cfg.train_margin} of the best signal's")
        elif not mask.any():
            notes[name]["not_trained"] = "no candidate qualifies (SN-Net stitches no bridged pair)"
        else:
            out.append(name)
    return out


def _selections(f: _Family, masks: dict, names: list[str], specs: list[StitchSpec], ls_state: dict, route_steps: int,
                clock: Clock, bits: dict, runs: dict, log) -> None:
    """Train and evaluate each named selection from the reference least-squares init over fresh anchors
    (eval split; klas's scores also on the score split). A selection equal to one already trained is
    not trained again: same stitches, init, seed and steps give the same network."""
    done: dict[frozenset, str] = {}
    for name in names:
        chosen = [specs[j] for j in np.flatnonzero(masks[name])]
        key, wants_score = frozenset(s.id for s in chosen), name in KLAS_SCORES  # the default is chosen on score
        same = done.get(key)
        if same is not None and (not wants_score or same in bits["score"]):
            runs[name] = {**runs[same], "same_as": same}
            for split in ("eval", "score") if wants_score else ("eval",):
                bits[split][name] = bits[split][same]
            log(f"{name}: the same {len(chosen)} stitches as {same}; its results are reused")
            continue
        net = f.net(chosen)
        for s in chosen:
            net.stitch_layer(s.id).load_state_dict(ls_state[s.id])
        with clock.phase(f"{name}: train"):
            runs[name] = f.run(net, name, route_steps, f.cfg.seed, log)
        with clock.phase(f"{name}: eval"):
            ids = net.stitch_ids + f.anchor_ids
            for split in ("eval", "score") if wants_score else ("eval",):
                bits[split][name] = f.bits(net, ids, split)
        done.setdefault(key, name)
        del net


def run_family(family: str, spec: QualityFamily, cfg: QualityConfig, work: Path, *, root: Path = DEFAULT_ROOT,
               device: str | None = None, keep_cache: bool = False, say=print) -> dict:
    """Everything for one family (:mod:`klas.quality`); returns its JSON-ready results."""
    dev = resolve_device(device)
    clock = Clock()
    log = lambda m: say(f"[{family}] {m}")  # noqa: E731
    work.mkdir(parents=True, exist_ok=True)
    with clock.phase("cache"):
        cache = build_family_cache(spec.models, work / "cache", cfg, root, keep_cache)
    f = _Family(cache, cfg, root, dev, spec.direction)
    with clock.phase("search: probes, Θ, Γ"):
        scores, searched, run_dir = _search(f, work, spec.direction)
    with clock.phase("signal: CKA"):
        scores["cka"] = cka_distance(cache, f.stitches, cfg.seed)
    with clock.phase("signal: least squares"):
        scores["ls"] = ls_residual(cache, f.stitches, seed=cfg.seed, fit_images=cfg.init_images,
                                   score_images=cfg.ls_score_images, device=dev, root=root)
    k, a = int(searched.sum()), len(f.anchor_ids)
    masks, bucket, notes = make_selections(f.stitches, f.anchor_list, f.profiles, scores, k, cfg)
    assert (masks[DEFAULT_SCORE] == searched).all(), "klas's selection must equal what klas search wrote"
    route_steps = cfg.steps_per_route(f.train.n, k, a, spec.length)
    log(f"{len(f.stitches)} candidates ({spec.direction}), K = {k} selected by klas search (--score {DEFAULT_SCORE}); "
        f"{route_steps} steps per route; " + ", ".join(f"{s}: {n['count_own_rule']}->{n['count']}" for s, n in notes.items()))

    bits: dict[str, dict] = {"eval": {}, "score": {}}
    runs: dict[str, dict] = {}
    with clock.phase("original anchors: eval (both splits)"):
        original = f.net([])
        for split in ("eval", "score"):
            bits[split]["original"] = f.bits(original, f.anchor_ids, split)
        del original
    specs = [_spec(c, g, b) for c, g, b in zip(f.stitches, scores["gamma"], bucket)]
    ls_state = _ground_truth(f, specs, route_steps, clock, bits, runs, log)
    gt_acc = {split: np.array([bits[split][gt_tag(cfg.gt_seeds[0])][c.id].mean() for c in f.stitches])
              for split in ("score", "eval")}
    ratings = rate_signals(scores, gt_acc, bucket, k)

    _selections(f, masks, _trained(masks, ratings, cfg, notes), specs, ls_state, route_steps, clock, bits, runs, log)
    trained = {n: m for n, m in masks.items() if n in runs}

    data = FamilyData(family, spec.models, spec.direction, f.stitches, f.anchor_list, scores, bucket, k, trained,
                      notes, bits, tuple(cfg.gt_seeds))
    with clock.phase("summary + bootstrap"):
        out = summarise(data, cfg, runs, ratings, gt_acc["score"])
    out["not_trained"] = {n: notes[n]["not_trained"] for n in notes if "not_trained" in notes[n]}
    if cfg.variants:
        with clock.phase("variants"):
            out["variants"] = _variants(f, cfg, scores["gamma"], gt_acc, bucket, k, run_dir)
    out.update(splits=dict(cache.manifest["splits"]), cache_fingerprint=cache.fingerprint, random_init=cfg.random_init,
               score_images=len(f.positions("score")), route_steps=route_steps,
               length=None if cfg.route_steps is not None else spec.length, threads=torch.get_num_threads(),
               default_score=DEFAULT_SCORE)
    wall, cpu = clock.totals()
    out["seconds"] = {**clock.seconds, "total": wall}
    out["cpu_seconds"] = {**clock.cpu_seconds, "total": cpu}
    for w in out["warnings"]:
        say(f"WARNING: {w}")
    log(f"done in {out['seconds']['total']:.0f} s")
    return out


def _variants(f: _Family, cfg: QualityConfig, gamma: np.ndarray, gt_acc: dict, bucket: np.ndarray, k: int,
              run_dir: Path) -> dict:
    """Every Γ variant's values and its ρ / recovery against the ground truth on score and on eval."""
    bank = ProbeBank.load(run_dir / PROBES, device=f.dev)
    variants = gamma_variants(f.cache, f.stitches, cfg, f.dev, bank)
    rel = float(np.max(np.abs(variants[DEFAULT] - gamma) / np.maximum(np.abs(gamma), 1e-12)))
    return {"default_matches_search_max_rel_diff": rel,
            **{split: rate_variants(variants, acc, bucket, k) for split, acc in gt_acc.items()},
            "gamma": {n: [float(x) for x in g] for n, g in variants.items()}}


__all__ = ["ALWAYS_TRAINED", "Clock", "build_family_cache", "run_family"]
