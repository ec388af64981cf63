"""``klas tree CACHE``: choose a Stitch Tree with klas's scores, train a sweep of share points, evaluate it.

Phases: check the request (trunk, share points) -> score every representation (probes + KL, no
writing) -> choose the trunk and the share points -> claim and lock the run directory -> the models'
own outputs -> train every tree (resumable, :mod:`klas.tree.fit`) -> evaluate the system on the eval
split (:mod:`klas.tree.evaluate`) -> ``tree.json``, the run's manifest, last.

The run directory (kind ``tree``) holds ``checkpoints/s{share}.pt`` (a tree's stitch layers, optimiser
and RNG state; the finished tree when its epoch is the last) and ``tree.json``; ``klas export tree``
adds ``export/``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from klas.cache import open_cache
from klas.errors import KlasError
from klas.fs import DEFAULT_ROOT, DirLock, claim_dir, clear_dir, read_json, write_json_atomic
from klas.run import open_run_cache
from klas.models import device_identity
from klas.stitch.latency import find_profile
from klas.stitch.network import StitchNet
from klas.stitch.tree import AllModels, StitchTree, TreeSpec, check_share, tree_cost
from klas.train.checkpoint import load_checkpoint
from klas.train.data import SplitData
from klas.tree.choose import Scores, auto_shares, block_scores, candidate_trees, chosen_specs, rank_trunks
from klas.tree.config import TreeConfig
from klas.tree.evaluate import (
    classifier_accuracy, concat, fidelity, latency_ms, recovered_gain, split_outputs,
)
from klas.tree.fit import CHECKPOINTS, load_tree_checkpoint, train_tree, tree_checkpoint
from klas.units import FLOPS_CONVENTION
from klas.utils import package_versions, resolve_device, sha256_json

MANIFEST = "tree.json"
FORMAT = "klas.tree/1"
KIND = "tree"
EXPORT = "export"


@dataclass
class Plan:
    """What klas tree decided before training: the scores, the trunk ranking, the trees to train."""

    scores: Scores
    trunks: list[dict]
    trunk: str
    candidates: list[dict]
    specs: list[TreeSpec]
    auto: bool


@dataclass
class TreeResult:
    """What ``tree_run`` did; ``manifest`` is ``tree.json`` (empty while incomplete)."""

    run_dir: Path
    manifest: dict
    complete: bool
    seconds: float
    plan: Plan | None = None
    notes: list[str] = field(default_factory=list)

    def table(self) -> Table:
        return tradeoff_table(self.manifest, title=f"{self.run_dir.name}: Stitch Tree sweep")


# -- checking and planning (nothing written) --------------------------------------------------------


def check_request(cache, cfg: TreeConfig) -> None:
    """Refuse, before any work, a trunk the cache lacks or share points outside its range."""
    names = cache.model_names
    if len(names) < 2:
        raise KlasError(f"cache {cache.path} has {len(names)} model; a stitch tree needs two or more: re-run klas cache "
                        f"with more --model")
    if cfg.trunk is not None and cfg.trunk not in names:
        raise KlasError(f"trunk {cfg.trunk!r} is not in cache {cache.path} (it has {', '.join(names)}); pass one of them "
                        f"to --trunk, or leave --trunk out to let klas choose")
    if cfg.trunk is not None and cfg.share_at is not None:
        for s in cfg.share_at:
            check_share(cfg.trunk, cache.profiles[cfg.trunk], s)


def plan_tree(cache, cfg: TreeConfig, device: torch.device, console: Console, progress: bool) -> Plan:
    """Scores, the trunk (given or best-ranked) and its share points (given or auto), checked."""
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, disable=not progress, transient=True) as bar:
        task = bar.add_task("scoring: probes for every block", total=None)
        scores = block_scores(cache, probe_epochs=cfg.probe_epochs, temperature=cfg.temperature, seed=cfg.seed,
                              device=device, progress=lambda s, t: bar.update(task, completed=s, total=t))
    profiles = cache.profiles
    trunks = rank_trunks(profiles, scores, cfg.match, cfg.layer)
    trunk = cfg.trunk or trunks[0]["trunk"]
    if cfg.share_at is not None:
        for s in cfg.share_at:
            check_share(trunk, profiles[trunk], s)
    candidates = candidate_trees(profiles, scores, trunk, cfg.match, cfg.layer)
    shares = list(cfg.share_at) if cfg.share_at is not None else auto_shares(candidates, cfg.points)
    for c in candidates:
        c["chosen"] = c["share"] in shares
    return Plan(scores, trunks, trunk, candidates, chosen_specs(profiles, scores, trunk, shares, cfg.match),
                cfg.share_at is None)


def plan_tables(plan: Plan, auto_trunk: bool) -> list[Table]:
    """The trunk ranking and the chosen trunk's share points, as klas scored them."""
    t = Table(title="trunks: median over share points of Σ Γ (trunk -> each branch), lower is better")
    for col in ("trunk", "median Σ Γ", "best share point", "its Σ Γ", ""):
        t.add_column(col, justify="left" if col in ("trunk", "") else "right")
    for r in plan.trunks:
        mark = ("chosen" if auto_trunk else "given") if r["trunk"] == plan.trunk else ""
        t.add_row(r["trunk"], f"{r['median_score']:.3f}", str(r["best_share"]), f"{r['best_score']:.3f}", mark)
    s = Table(title=f"share points of trunk {plan.trunk}", caption=FLOPS_CONVENTION)
    for col in ("share", "branches (model@cut)", "GFLOPs", "Σ Γ", ""):
        s.add_column(col, justify="left" if col in ("branches (model@cut)", "") else "right")
    for c in plan.candidates:
        branches = ", ".join(f"{m}@{k}" for m, k in c["spec"].branches)
        s.add_row(str(c["share"]), branches, f"{c['macs'] / 1e9:.4f}", f"{c['score']:.3f}",
                  ("auto" if plan.auto else "given") if c["chosen"] else "")
    return [t, s]


# -- the run directory ------------------------------------------------------------------------------


def check_dir(run_dir: Path, cfg: TreeConfig) -> None:
    """Before any work: refuse to clobber earlier output unasked, to resume nothing, or to resume
    checkpoints made with another recipe (the trees themselves are compared once chosen)."""
    earlier = (run_dir / MANIFEST).exists() or (run_dir / CHECKPOINTS).exists()
    if earlier and not (cfg.resume or cfg.overwrite):
        raise KlasError(f"run {run_dir} already has tree output; pass --resume to continue it or --overwrite to start over")
    ckpts = sorted((run_dir / CHECKPOINTS).glob("s*.pt")) if cfg.resume else []
    if cfg.resume and not ckpts:
        raise KlasError(f"run {run_dir} has nothing to resume; run klas tree without --resume")
    for path in ckpts[:1]:
        if load_checkpoint(path).get("config") != cfg.recipe():
            raise KlasError(f"checkpoint {path} was made with other options or another tree; resume with the same "
                            f"options, or pass --overwrite to start over")


def prepare_dir(run_dir: Path, cfg: TreeConfig) -> None:
    """``overwrite`` clears earlier output; a (re)started run drops the manifest and export first, so
    only a finished run has them."""
    if cfg.overwrite:
        clear_dir(run_dir, KIND)
    for name in (MANIFEST, EXPORT):
        if (run_dir / name).exists():
            clear_dir(run_dir, KIND, keep=tuple(p.name for p in run_dir.iterdir() if p.name != name))


def read_manifest(run_dir: Path | str) -> dict:
    """``RUN/tree.json``, or a one-line error naming the fix."""
    run_dir = Path(run_dir)
    path = run_dir / MANIFEST
    if not run_dir.is_dir():
        raise KlasError(f"there is no tree run {run_dir}; make one with: klas tree CACHE --run {run_dir}")
    if not path.is_file():
        raise KlasError(f"tree run {run_dir} has no {MANIFEST} (klas tree has not finished there); run: klas tree CACHE "
                        f"--run {run_dir} --resume")
    m = read_json(path, "tree manifest")
    if not isinstance(m, dict) or m.get("format") != FORMAT or not isinstance(m.get("trees"), list):
        raise KlasError(f"{path} is not a {FORMAT} manifest; rerun klas tree with --overwrite")
    return m


# -- evaluation -------------------------------------------------------------------------------------


def best_single(cache) -> str:
    """The model whose own head scores best on the score split (the floor; chosen off the eval split)."""
    labels = np.asarray(cache.labels("score"))
    acc = {m: float(np.mean(np.asarray(cache.logits("score", m)).argmax(1) == labels)) for m in cache.model_names}
    return max(cache.model_names, key=lambda m: (acc[m], m))


def evaluate_trees(cache, trees: dict[int, StitchTree], own: dict, data: dict, cfg: TreeConfig,
                   device: torch.device) -> dict[str, Any]:
    """Fidelity, classifier accuracies (trees, ceiling, singles) and latencies; see :mod:`klas.tree.evaluate`."""
    names = cache.model_names
    tr, ev = "probe-train", "eval"
    feats = {tr: {"all": concat(own[tr], names)}, ev: {"all": concat(own[ev], names)}}
    for n in names:
        for split in (tr, ev):
            feats[split][f"single:{n}"] = own[split][n]["features"]
    fid = {}
    for s, tree in trees.items():
        out = {split: split_outputs(tree, data[split], batch_size=cfg.eval_batch_size, device=device) for split in (tr, ev)}
        fid[s] = fidelity(out[ev], own[ev], data[ev].labels.numpy())
        for split in (tr, ev):
            feats[split][f"tree:{s}"] = concat(out[split], tree.spec.names)
    acc = classifier_accuracy(feats[tr], feats[ev], data[tr].labels.numpy(), data[ev].labels.numpy(), len(cache.classes),
                              epochs=cfg.probe_epochs, seed=cfg.seed, device=device)
    floor = best_single(cache)
    lat: dict[str, float] = {}
    if cfg.latency:
        x = data[ev].first(cfg.latency_batch)
        adapters = {n: t.adapter(n) for t in trees.values() for n in t.spec.names}
        lat["all"] = latency_ms(AllModels(adapters), x, device=device, repeats=cfg.latency_repeats)
        lat["single"] = latency_ms(AllModels({floor: adapters[floor]}), x, device=device, repeats=cfg.latency_repeats)
        for s, tree in trees.items():
            lat[f"tree:{s}"] = latency_ms(tree, x, device=device, repeats=cfg.latency_repeats)
    return {"accuracy": acc, "fidelity": fid, "floor": floor, "latency_ms": lat}


def predicted_ms(cache, plan: Plan, floor: str, cfg: TreeConfig, device: torch.device) -> dict[str, float]:
    """Latency predicted from the cache's profile for this device at ``latency_batch`` (:mod:`klas.stitch.latency`):
    ``tree:{s}`` per tree, ``single`` (the floor) and ``all`` (every model on its own); {} without a profile."""
    if not cfg.latency:
        return {}
    try:
        profile = find_profile(cache.path, cache.fingerprint, device_identity(device, cache.manifest.get("amp")),
                               cfg.latency_batch)
    except KlasError:
        return {}
    profiles = cache.profiles
    pred = {f"tree:{t.share}": profile.tree_ms(profiles, t.trunk, t.share, t.branches, cfg.layer) for t in plan.specs}
    pred["single"] = profile.route_ms(profiles, floor)
    pred["all"] = math.fsum(profile.route_ms(profiles, n) for n in cache.model_names)
    return pred


def tree_rows(cache, plan: Plan, fits: dict, ev: dict, cfg: TreeConfig) -> tuple[list[dict], dict]:
    """One row per share point and the reference systems (floor, ceiling), for ``tree.json``."""
    profiles, acc, lat, pred = cache.profiles, ev["accuracy"], ev["latency_ms"], ev.get("latency_pred_ms", {})
    floor, ceiling = acc[f"single:{ev['floor']}"], acc["all"]
    score = {c["share"]: c["score"] for c in plan.candidates}
    rows = []
    for spec in plan.specs:
        s, cost = spec.share, tree_cost(profiles, spec, cfg.layer)
        rows.append({
            "share": s, "spec": spec.to_json(), "macs": cost["macs"], "gflops": cost["macs"] / 1e9, "params": cost["params"],
            "cost_parts": cost, "extra_cost": cost["macs"] / cost["largest_macs"] - 1, "score": score.get(s),
            "acc": acc[f"tree:{s}"], "recovered": recovered_gain(acc[f"tree:{s}"], floor, ceiling),
            "fidelity": ev["fidelity"][s], "latency_ms": lat.get(f"tree:{s}"), "latency_pred_ms": pred.get(f"tree:{s}"),
            "fit_r2": fits[s].fit_r2,
            "history": fits[s].history,
        })
    largest = max(p.macs for p in profiles.values())
    all_macs = sum(p.macs for p in profiles.values())
    reference = {
        "floor": {"model": ev["floor"], "macs": profiles[ev["floor"]].macs, "acc": floor, "latency_ms": lat.get("single"),
                  "latency_pred_ms": pred.get("single"),
                  "extra_cost": profiles[ev["floor"]].macs / largest - 1},
        "ceiling": {"models": cache.model_names, "macs": all_macs, "acc": ceiling, "latency_ms": lat.get("all"),
                    "latency_pred_ms": pred.get("all"),
                    "extra_cost": all_macs / largest - 1},
        "largest": {"model": max(profiles, key=lambda n: profiles[n].macs), "macs": largest},
        "singles": {n: {"macs": profiles[n].macs, "acc": acc[f"single:{n}"]} for n in cache.model_names},
    }
    return rows, reference


# -- the entry point --------------------------------------------------------------------------------


def tree_run(cache_path: Path | str, run_dir: Path | str | None = None, config: TreeConfig | None = None, *,
             console: Console | None = None, progress: bool = True, **overrides: Any) -> TreeResult:
    """Choose, train and evaluate a Stitch Tree sweep over the models of a cache (module docstring).

    ``config`` holds the options (:class:`~klas.tree.config.TreeConfig`), keyword ``overrides`` replace
    single fields. Writes ``run_dir`` (default ``cache/runs/<cache>-tree``) and returns a :class:`TreeResult`.
    """
    t0 = time.perf_counter()
    cfg = (config or TreeConfig()).with_overrides(**overrides) if overrides else (config or TreeConfig())
    console = console or Console(stderr=True)
    cache = open_cache(cache_path)
    check_request(cache, cfg)
    run_dir = Path(run_dir) if run_dir else DEFAULT_ROOT / "runs" / f"{cache.path.name}-tree"
    check_dir(run_dir, cfg)
    device = resolve_device(cfg.device)
    plan = plan_tree(cache, cfg, device, console, progress)
    for t in plan_tables(plan, cfg.trunk is None):
        console.print(t)
    claim_dir(run_dir, KIND, "--run")
    with DirLock(run_dir, "--run"):
        prepare_dir(run_dir, cfg)
        return _run_locked(cache, run_dir, plan, cfg, device, console, progress, t0)


def _run_locked(cache, run_dir: Path, plan: Plan, cfg: TreeConfig, device: torch.device, console: Console,
                progress: bool, t0: float) -> TreeResult:
    """Train every tree of the plan and, once all are trained, evaluate them and write ``tree.json``."""
    data = {s: SplitData(cache, s, root=cfg.root) for s in ("probe-train", "eval")}
    models = {m.name: m for m in cache.load_models(device=device, root=cfg.root)}
    console.print(f"running the {len(models)} models on probe-train and eval ...")
    everyone = AllModels({n: models[n].adapter for n in cache.model_names})
    own = {s: split_outputs(everyone, d, batch_size=cfg.eval_batch_size, device=device) for s, d in data.items()}
    targets = {n: {"features": torch.from_numpy(own["probe-train"][n]["features"])} for n in cache.model_names}
    budget = [cfg.stop_after if cfg.stop_after is not None else math.inf]
    fits = {}
    for spec in plan.specs:
        fits[spec.share] = train_tree(run_dir, models, spec, cfg, data["probe-train"], targets, device,
                                      console=console, progress=progress, budget=budget)
        if fits[spec.share].epoch_done < cfg.total_epochs:
            console.print(f"stopped at share point {spec.share}, epoch {fits[spec.share].epoch_done}/{cfg.total_epochs}; "
                          f"continue with --resume")
            return TreeResult(run_dir, {}, False, time.perf_counter() - t0, plan)
    console.print(f"evaluating {len(fits)} trees on the eval split ...")
    trees = {s: StitchTree.from_net(f.net, spec).eval() for (s, f), spec in zip(fits.items(), plan.specs)}
    ev = evaluate_trees(cache, trees, own, data, cfg, device)
    ev["latency_pred_ms"] = predicted_ms(cache, plan, ev["floor"], cfg, device)
    rows, reference = tree_rows(cache, plan, fits, ev, cfg)
    manifest = {
        "format": FORMAT, "cache": {"path": str(cache.path), "fingerprint": cache.fingerprint},
        "config": cfg.recipe(), "config_sha256": sha256_json(cfg.recipe()), "trunk": plan.trunk,
        "trunk_ranking": plan.trunks,
        "candidates": [{k: (v.to_json() if k == "spec" else v) for k, v in c.items()} for c in plan.candidates],
        "trees": rows, "reference": reference, "train_images": data["probe-train"].n, "eval_images": data["eval"].n,
        "input_size": list(data["eval"].input_size), "data_config": cache.manifest["data"]["preprocess"],
        "latency": {"batch": min(cfg.latency_batch, data["eval"].n), "device": str(device), "repeats": cfg.latency_repeats,
                    "statistic": "median ms per forward pass of one batch"} if cfg.latency else None,
        "accuracy_unit": "fraction", "flops": FLOPS_CONVENTION, "seconds": time.perf_counter() - t0,
        "versions": package_versions(),
    }
    write_json_atomic(run_dir / MANIFEST, manifest)
    return TreeResult(run_dir, manifest, True, time.perf_counter() - t0, plan)


# -- what export reads ------------------------------------------------------------------------------


def trained_tree(run_dir: Path | str, share: int, *, root: Path | None = None, device: str | torch.device = "cpu",
                 loaded: dict | None = None) -> tuple[StitchTree, dict, dict[str, str]]:
    """The evaluated tree at ``share`` of a finished run, rebuilt: (tree, its tree.json row, model -> timm arch).

    ``loaded`` (model name -> :class:`~klas.models.LoadedModel`) is filled on the first call and reused by
    later ones, so several trees of a run share one load of the cache's models (they are frozen)."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    row = next((r for r in manifest["trees"] if r["share"] == share), None)
    if row is None:
        raise KlasError(f"tree run {run_dir} has no share point {share}; it has {[r['share'] for r in manifest['trees']]}")
    spec = TreeSpec.from_json(row["spec"])
    cache = open_run_cache(manifest, run_dir)
    ckpt = load_tree_checkpoint(tree_checkpoint(run_dir, share), spec, manifest["config"])
    if int(ckpt["epoch"]) != manifest["config"]["epochs"] + manifest["config"]["task_epochs"]:
        raise KlasError(f"checkpoint of share point {share} in {run_dir} is not the evaluated one; rerun klas tree --resume")
    dev = torch.device(device)
    loaded = {} if loaded is None else loaded
    if not set(spec.names) <= set(loaded):
        loaded.update({m.name: m for m in cache.load_models(device=dev, root=root or DEFAULT_ROOT)})
    net = StitchNet({n: loaded[n].adapter for n in spec.names}, {n: loaded[n].profile for n in spec.names},
                    spec.stitch_specs(), kind=ckpt["layer"]).to(dev)
    for sid, sd in ckpt["stitch_states"].items():
        net.stitch_layer(sid).load_state_dict(sd)
    return StitchTree.from_net(net, spec).eval(), row, {n: loaded[n].spec.arch for n in spec.names}


# -- printing ---------------------------------------------------------------------------------------


def tradeoff_table(manifest: dict, title: str) -> Table:
    """Share point, branches, cost, extra cost over the largest single model, system top-1, recovered
    gain, per-branch fidelity (cosine; branch top-1 / the model's own), latency; floor and ceiling last."""
    ref = manifest["reference"]
    t = Table(title=f"{title}, trunk {manifest['trunk']}",
              caption=f"{FLOPS_CONVENTION}. extra: cost over the largest single model ({ref['largest']['model']}). "
                      f"top-1: linear classifier on the concatenated features (eval split). fidelity per branch: "
                      f"cosine to the model's own features; branch top-1 / model top-1 (%). ms: measured per batch "
                      f"(in brackets: predicted from the cache's latency profile).")
    for col in ("share", "branches", "GFLOPs", "extra", "top-1 %", "recovered", "fidelity", "ms (pred)"):
        t.add_column(col, justify="left" if col in ("share", "branches", "fidelity") else "right", overflow="fold")

    def ms(r):
        """Measured ms, the profile's prediction in brackets."""
        got, pred = r.get("latency_ms"), r.get("latency_pred_ms")
        return " ".join(x for x in ("" if got is None else f"{got:.1f}", "" if pred is None else f"({pred:.1f})") if x)

    for r in sorted(manifest["trees"], key=lambda r: r["macs"]):
        spec = r["spec"]
        fid = "; ".join(f"{n} {f['cosine']:.3f}; {100 * f['top1']:.1f}/{100 * f['model_top1']:.1f}"
                        for n, f in r["fidelity"].items() if n != spec["trunk"])
        rec = "" if r["recovered"] is None or not math.isfinite(r["recovered"]) else f"{100 * r['recovered']:.1f}%"
        t.add_row(str(r["share"]), ", ".join(f"{b['model']}@{b['cut']}" for b in spec["branches"]), f"{r['gflops']:.4f}",
                  f"{100 * r['extra_cost']:+.1f}%", f"{100 * r['acc']:.2f}", rec, fid, ms(r))
    f, c = ref["floor"], ref["ceiling"]
    t.add_row("floor", f"{f['model']} alone", f"{f['macs'] / 1e9:.4f}", f"{100 * f['extra_cost']:+.1f}%",
              f"{100 * f['acc']:.2f}", "0%", "", ms(f))
    t.add_row("ceiling", f"all {len(c['models'])} models", f"{c['macs'] / 1e9:.4f}", f"{100 * c['extra_cost']:+.1f}%",
              f"{100 * c['acc']:.2f}", "100%", "", ms(c))
    return t


__all__ = ["FORMAT", "KIND", "MANIFEST", "Plan", "TreeResult", "check_request", "plan_tree", "read_manifest",
           "trained_tree", "tree_run", "tradeoff_table"]
