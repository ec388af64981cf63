"""Stage 2, ``klas search``: probes -> block distances -> stitch scores -> selection -> run directory.

The method (KLAS, ICLR 2026) as klas implements it:

1. A linear probe per block of every model, trained on the probe-train split's cached features
   (labels, or with ``probe_target="model"`` the model's own final softmax: label-free).
2. On the score split, P_{m,r}(x) = softmax(probe_{m,r}(x) / T) and
   Θ(m_r, m'_r') = mean_x KL(P_{m,r}(x) || P_{m',r'}(x)) for every pair of representations.
3. Stitch score Γ = Θ(a_src, b_dst) / Σ with Σ = Θ(b_dst, b_dst+1): the KL between what the stitch
   must imitate and the next representation of the target, i.e. how much the first block the
   target still runs changes things. Lower is better. Because a stitch always leaves at least one
   target block to run (docs/formats.md), representation dst+1 exists, so Σ is always defined;
   the last-block case (dst = n_b - 1) compares the target's last block input with its output.
   Σ is floored at 1e-8 so a block that changes nothing cannot divide by zero.
4. Anchor pairs: the KL between two models' real final softmax outputs ranks model pairs.
5. Selection: see :mod:`klas.select`.

Only the probe-train and score splits are read here; the eval split is left for ``klas train``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from klas import probes, score
from klas.cache import Cache, open_cache
from klas.config import (  # the vocabularies and the default score, re-exported
    DEFAULT_SCORE, PROBE_TARGETS, SCORE_TEXT, SCORES, STRATEGIES, SearchConfig,
)
from klas.errors import KlasError
from klas.fs import DirLock, read_json
from klas.models import device_identity
from klas.probes import ProbeBank, SoftmaxTargets
from klas.run import SELECTION, SELECTION_FORMAT, claim_run, write_search
from klas.select import CostAxis, check_budget, select
from klas.stitch.candidates import Candidate, anchors, enumerate_stitches
from klas.stitch.latency import LatencyProfile, find_profile
from klas.stitch.report import compatibility_report, report_table
from klas.term import make_console
from klas.units import macs_to_gflops
from klas.utils import DEFAULT_ROOT, package_versions, resolve_device, sha256_json

SIGMA_FLOOR = 1e-8
CHUNK = 2048


@dataclass
class SearchResult:
    """What ``search`` decided, for printing; the same content is on disk in ``run_dir``."""

    run_dir: Path
    selection: dict
    rows: list[dict]  # every candidate and anchor, as in candidates.parquet
    probe_accuracy: dict[str, list[float]]  # model -> top-1 per representation (score split)
    anchor_pairs: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)  # seconds: probe_training, scoring (Θ)

    @property
    def selected(self) -> list[dict]:
        return sorted((r for r in self.rows if r["selected"]), key=lambda r: (r["macs"], r["id"]))


def probe_index(cache: Cache) -> list[tuple[str, int]]:
    """(model, representation) of every probe, in bank order."""
    return [(m, r.index) for m in cache.model_names for r in cache.profiles[m].reps]


def _features(cache: Cache, split: str, index: list[tuple[str, int]]) -> list[np.ndarray]:
    """One split's cached features of every probe's representation, in bank order (memmaps)."""
    return [cache.rep_features(split, m, r) for m, r in index]


def _check_cache(cache: Cache, probe_target: str) -> None:
    """Refuse, in one line naming the fix, a cache search cannot use (one model, missing split, labels)."""
    if len(cache.model_names) < 2:
        raise KlasError(
            f"cache {cache.path} has {len(cache.model_names)} model; stitching needs at least two: "
            "re-run klas cache with two or more --model"
        )
    missing = [s for s in ("probe-train", "score") if s not in cache.splits]
    if missing:
        raise KlasError(f"cache {cache.path} lacks split {', '.join(missing)}; re-run klas cache with --split probe-train,score,eval")
    if probe_target == "labels" and len(cache.classes) < 2:
        raise KlasError(f"cache {cache.path} has no labels; use --probe-target model (label-free)")
    if probe_target == "model" and len({cache.model(m)["num_classes"] for m in cache.model_names}) > 1:
        raise KlasError("--probe-target model needs models with the same classifier size; use --probe-target labels")


def search(
    cache_path: Path | str,
    run_dir: Path | str | None = None,
    config: SearchConfig | None = None,
    *,
    console: Console | None = None,
    progress: bool = True,
    **overrides: Any,
) -> SearchResult:
    """Score every binary stitch between the cached models and select the ones worth training.

    ``config`` holds the options (:class:`~klas.config.SearchConfig`, its defaults when None); keyword
    ``overrides`` replace single fields (``search(cache, run, budget=3.0)``). A ``budget`` is in GFLOPs
    (fvcore convention: one multiply-add = one FLOP), a ``budget_ms`` in milliseconds per batch of
    ``latency_batch`` images on this device, predicted from the cache's latency profile
    (:mod:`klas.stitch.latency`; a profile of another device or batch is refused); only stitches at
    or under it are kept, by every strategy, and the buckets split that axis. Writes ``run_dir``
    (default ``cache/runs/<cache>-<strategy>``, see docs/formats.md) and returns the same content.
    ``run_dir`` is checked, claimed and locked before any probe is trained (:mod:`klas.run`).
    """
    start = time.perf_counter()
    cfg = (config or SearchConfig()).with_overrides(**overrides) if overrides else (config or SearchConfig())
    dev = resolve_device(cfg.device)
    cache = open_cache(cache_path)
    _check_cache(cache, cfg.probe_target)
    stitches, anchor_list = enumerate_stitches(cache.profiles, cfg.direction, cfg.layer), anchors(cache.profiles)
    cost, latency = cost_axis(cache, cfg, stitches, anchor_list, dev)
    check_budget(stitches, anchor_list, cfg.budget_macs, cost)
    run_dir = Path(run_dir) if run_dir else DEFAULT_ROOT / "runs" / f"{cache.path.name}-{cfg.strategy}"
    inputs = cfg.inputs(cache.fingerprint, latency.device if latency else None)
    claim_run(run_dir)
    with DirLock(run_dir, "--run"):
        _check_run_dir(run_dir, sha256_json(inputs), cfg.overwrite)
        job = _Job(cache, run_dir, cfg, inputs, dev, cost, latency)
        return _search_locked(job, start, console or make_console(stderr=True), progress)


def cost_axis(cache: Cache, cfg: SearchConfig, stitches: list[Candidate], anchor_list: list[Candidate],
              dev: torch.device) -> tuple[CostAxis, LatencyProfile | None]:
    """What the buckets split and the budget caps: MACs, or with ``budget_ms`` each candidate's latency
    predicted from this device's profile at ``latency_batch`` (refused when the cache has none)."""
    if cfg.axis == "gflops":
        return CostAxis.of_macs(stitches, anchor_list, cfg.budget_macs), None
    profile = find_profile(cache.path, cache.fingerprint, device_identity(dev, cache.manifest.get("amp")),
                           cfg.latency_batch)
    ms = [profile.route_ms(cache.profiles, c.src, c.src_cut, c.dst, c.dst_cut, cfg.layer) for c in stitches]
    anchor_ms = [profile.route_ms(cache.profiles, a.src) for a in anchor_list]
    return CostAxis(np.array(ms), np.array(anchor_ms), cfg.budget_ms, "latency", profile.describe()), profile


@dataclass
class _Job:
    """One search after its checks: what it reads, where it writes, its settings and its cost axis."""

    cache: Cache
    run_dir: Path
    cfg: SearchConfig
    inputs: dict
    dev: torch.device
    cost: CostAxis
    latency: LatencyProfile | None


def _search_locked(job: _Job, start: float, console: Console, progress: bool) -> SearchResult:
    """The search proper, run while this process holds the run's lock: score, select, write the run."""
    cache, cfg = job.cache, job.cfg
    stitches = enumerate_stitches(cache.profiles, cfg.direction, cfg.layer)
    console.print(report_table(compatibility_report(cache.profiles, cfg.direction, cfg.layer)))
    anchor_list = anchors(cache.profiles)
    index = probe_index(cache)
    timings: dict[str, float] = {}
    bank, score_feats, theta = _probe_and_score(cache, index, cfg, job.dev, console, progress, timings)
    probe_accuracy = _probe_accuracy(cache, bank, score_feats, index, cfg.probe_target)
    th, sigma, gamma = stitch_scores(theta, stitches, index)
    cka_dist = cka_distance(cache, stitches, cfg.seed) if cfg.strategy == "cka" else None
    ranked = th if cfg.score == "theta" else gamma
    if cfg.strategy == "klas":
        console.print(f"klas ranks the candidates by {SCORE_TEXT[cfg.score]} (--score {cfg.score})")
    keep, bucket = select(cfg.strategy, stitches, anchor_list, cache.profiles, gamma=ranked, cka_distance=cka_dist,
                          budget_macs=cfg.budget_macs, buckets=cfg.buckets, tau=cfg.tau, seed=cfg.seed, cost=job.cost)
    rows = _rows(stitches, anchor_list, (th, sigma, gamma, cka_dist), keep, bucket, cfg.strategy, job.cost)
    pairs = _anchor_pairs(cache, cfg.temperature, job.dev)
    selection = _selection(job, len(stitches), rows, pairs)
    write_search(job.run_dir, rows, bank, probe_accuracy, selection)
    return SearchResult(job.run_dir, selection, rows, probe_accuracy, pairs, time.perf_counter() - start, timings)


def _probe_targets(cache: Cache, index: list[tuple[str, int]], probe_target: str) -> tuple[np.ndarray | SoftmaxTargets, list[int] | None, int]:
    """What the probes learn: (targets, which model's targets each probe uses, number of classes).

    ``labels``: the probe-train labels, shared by every probe. ``model``: each model's own final
    softmax (k, N, C), probe p learning its own model's row, computed per batch from the cached
    logits so that memory stays flat in N.
    """
    if probe_target == "labels":
        return np.array(cache.labels("probe-train")), None, len(cache.classes)  # a writable copy for torch
    targets = SoftmaxTargets([cache.logits("probe-train", m) for m in cache.model_names])  # (k, N, C), streamed
    return targets, [cache.model_names.index(m) for m, _ in index], targets.shape[2]


def _probe_and_score(cache: Cache, index: list[tuple[str, int]], cfg: SearchConfig, dev: torch.device, console: Console,
                     progress: bool, timings: dict[str, float]) -> tuple[ProbeBank, list[np.ndarray], np.ndarray]:
    """Train every probe, then Θ (P, P) between their score-split distributions.

    Returns the bank, the score-split features and Θ; books the seconds of each in ``timings``.
    """
    t0 = time.perf_counter()
    targets, target_index, classes = _probe_targets(cache, index, cfg.probe_target)
    with Progress(TextColumn("[bold]{task.description:<28}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, disable=not progress) as bar:
        task = bar.add_task(f"training {len(index)} probes", total=None)
        bank = probes.train_probes(
            _features(cache, "probe-train", index), targets, classes, epochs=cfg.probe_epochs,
            seed=cfg.seed, device=dev, target_index=target_index,
            progress=lambda s, t: bar.update(task, completed=s, total=t),
        )
        timings["probe_training"] = time.perf_counter() - t0
        score_feats = _features(cache, "score", index)
        task = bar.add_task(f"KL over {len(index)}² block pairs", total=score_feats[0].shape[0])

        def counted(chunks: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
            for c in chunks:  # (P, n_chunk, C) probe logits
                yield c
                bar.advance(task, c.shape[1])

        theta = score.kl_matrix(counted(bank.iter_logits(score_feats)), temperature=cfg.temperature,
                                device=dev).numpy()
    timings["scoring"] = time.perf_counter() - t0 - timings["probe_training"]
    return bank, score_feats, theta


def _probe_accuracy(cache: Cache, bank: ProbeBank, score_feats: list[np.ndarray], index: list[tuple[str, int]],
                    probe_target: str) -> dict[str, list[float]]:
    """Top-1 of every probe on the score split, per model and representation (NaN without labels)."""
    where = {key: p for p, key in enumerate(index)}
    acc = bank.accuracy(score_feats, np.array(cache.labels("score"))) if probe_target == "labels" else None
    return {m: [float(acc[where[(m, r.index)]]) if acc is not None else float("nan") for r in cache.profiles[m].reps]
            for m in cache.model_names}


def rep_positions(stitches: Sequence[Candidate], index: list[tuple[str, int]], dst_offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Bank positions of each stitch's source representation and of its target's ``dst_cut + dst_offset``."""
    where = {key: p for p, key in enumerate(index)}
    return (np.array([where[(c.src, c.src_cut)] for c in stitches]),
            np.array([where[(c.dst, c.dst_cut + dst_offset)] for c in stitches]))


def stitch_scores(theta: np.ndarray, stitches: list[Candidate],
                   index: list[tuple[str, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per stitch: Θ(a_src, b_dst), Σ = Θ(b_dst, b_dst+1) and Γ = Θ / max(Σ, floor)."""
    t_idx, d_idx = rep_positions(stitches, index)
    _, n_idx = rep_positions(stitches, index, dst_offset=1)
    th = theta[t_idx, d_idx]
    sigma = theta[d_idx, n_idx]
    return th, sigma, th / np.maximum(sigma, SIGMA_FLOOR)


def cka_distance(cache: Cache, stitches: Sequence[Candidate], seed: int) -> np.ndarray:
    """1 - linear CKA between each stitch's source and target representations on the score split
    (``strategy="cka"``'s score, lower is better; the CKA subsample is seeded)."""
    index = probe_index(cache)
    cka = score.linear_cka_matrix(_features(cache, "score", index), seed=seed).numpy()
    t_idx, d_idx = rep_positions(stitches, index)
    return 1.0 - cka[t_idx, d_idx]


def _selection(job: _Job, num_candidates: int, rows: list[dict], pairs: list[dict]) -> dict:
    """The ``selection.json`` document (docs/formats.md): the settings, the budget (one key, on its axis),
    the anchors and stitches kept, anchor pairs."""
    cache, cfg = job.cache, job.cfg
    settings = {k: v for k, v in job.inputs.items() if k not in ("cache", "budget", "budget_ms", "latency_batch",
                                                                 "latency_device")}
    return {
        "format": SELECTION_FORMAT,
        "cache": {"path": str(cache.path), "fingerprint": cache.fingerprint},
        "inputs": sha256_json(job.inputs),
        **settings,
        "axis": cfg.axis,
        "budget": _budget_entry(job),
        "num_candidates": num_candidates,
        "anchors": [{"name": r["src"], "macs": r["macs"], "params": r["params"],
                     **({"latency_ms": r["latency_ms"]} if job.latency else {})}
                    for r in rows if r["kind"] == "anchor" and r["selected"]],
        "stitches": [
            {k: r[k] for k in STITCH_KEYS + (("latency_ms",) if job.latency else ())}
            for r in rows if r["selected"] and r["kind"] == "stitch"
        ],
        "anchor_pairs": pairs,
        "versions": package_versions(),
    }


#: Keys of every stitch entry of ``selection.json`` (``latency_ms`` too under a latency budget).
STITCH_KEYS = ("id", "src", "src_cut", "dst", "dst_cut", "route", "macs", "params", "theta", "gamma", "bucket")


def _budget_entry(job: _Job) -> dict | None:
    """``selection.json``'s ``budget``: None, ``{"axis": "gflops", "value": G, "unit": "GFLOPs"}`` or
    ``{"axis": "latency", "value": ms, "unit": "ms", "batch": N, "device": {...}}`` (predicted latency)."""
    cfg = job.cfg
    if cfg.budget is not None:
        return {"axis": "gflops", "value": cfg.budget, "unit": "GFLOPs"}
    if cfg.budget_ms is not None:
        return {"axis": "latency", "value": cfg.budget_ms, "unit": "ms", "batch": cfg.latency_batch,
                "device": job.latency.device, "statistic": job.latency.statistic}
    return None


def _rows(stitches: list[Candidate], anchor_list: list[Candidate], scores: tuple, keep, bucket, strategy: str,
          cost: CostAxis) -> list[dict]:
    """Every stitch, then every anchor, as a ``candidates.parquet`` row (anchors over the budget unselected);
    ``latency_ms`` is the predicted latency under a latency budget, NaN otherwise."""
    theta, sigma, gamma, cka_dist = scores
    latency = cost.axis == "latency"
    nan = float("nan")
    rows = []
    for k, c in enumerate(stitches):
        rows.append({
            "id": c.id, "kind": "stitch", "route": c.route, "src": c.src, "src_cut": c.src_cut, "dst": c.dst,
            "dst_cut": c.dst_cut, "macs": c.macs, "gflops": macs_to_gflops(c.macs), "params": c.params,
            "latency_ms": float(cost.cands[k]) if latency else nan,
            "theta": float(theta[k]), "sigma": float(sigma[k]), "gamma": float(gamma[k]),
            "cka_distance": float(cka_dist[k]) if cka_dist is not None else nan,
            "bucket": int(bucket[k]), "selected": bool(keep[k]), "strategy": strategy,
        })
    for k, a in enumerate(anchor_list):
        rows.append({
            "id": a.id, "kind": "anchor", "route": a.route, "src": a.src, "src_cut": a.src_cut, "dst": None,
            "dst_cut": None, "macs": a.macs, "gflops": macs_to_gflops(a.macs), "params": a.params,
            "latency_ms": float(cost.anchors[k]) if latency else nan, "theta": nan, "sigma": nan, "gamma": nan,
            "cka_distance": nan, "bucket": -1, "selected": cost.budget is None or cost.anchors[k] <= cost.budget,
            "strategy": strategy,
        })
    return rows


def _anchor_pairs(cache: Cache, temperature: float, dev: torch.device) -> list[dict]:
    """KL between every two models' final softmax on the score split (their real outputs, not probes)."""
    names = cache.model_names
    if len({cache.model(m)["num_classes"] for m in names}) > 1:
        return []
    logits = [cache.logits("score", m) for m in names]
    n = logits[0].shape[0]
    chunks = (torch.stack([torch.from_numpy(np.asarray(l[s : s + CHUNK], dtype=np.float32)) for l in logits])
              for s in range(0, n, CHUNK))
    kl = score.kl_matrix(chunks, temperature=temperature, device=dev).numpy()
    pairs = [{"src": a, "dst": b, "kl": float(kl[i, j])} for i, a in enumerate(names) for j, b in enumerate(names) if i != j]
    return sorted(pairs, key=lambda p: p["kl"])


def _check_run_dir(run_dir: Path, inputs: str, overwrite: bool) -> None:
    """Refuse, before the long work, to replace a selection made with other inputs unless ``overwrite``."""
    sel = run_dir / SELECTION
    if not sel.is_file() or overwrite:
        return
    try:
        old = read_json(sel, "selection")
    except KlasError:
        raise KlasError(f"run {run_dir} holds an unreadable {SELECTION}; pass --overwrite to replace it") from None
    if not isinstance(old, dict) or old.get("inputs") != inputs:
        raise KlasError(f"run {run_dir} holds a selection made with other inputs; pass --run NAME for a new run "
                        f"or --overwrite to replace it (its training and export go with it)")


__all__ = ["DEFAULT_SCORE", "PROBE_TARGETS", "SCORE_TEXT", "SCORES", "SIGMA_FLOOR", "STITCH_KEYS", "STRATEGIES", "SearchConfig", "SearchResult", "cost_axis", "cka_distance", "probe_index", "rep_positions", "search",
           "stitch_scores"]
