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

import torch
from rich.console import Console
from rich.table import Table

from klas.cache import open_cache
from klas.errors import KlasError
from klas.fs import DEFAULT_ROOT, DirLock, claim_dir, clear_dir, read_json, write_json_atomic
from klas.run import open_run_cache
from klas.models import device_identity
from klas.stitch.latency import find_profile
from klas.stitch.network import StitchNet
from klas.stitch.tree import AllModels, StitchTree, TreeSpec, check_share, tree_cost
from klas.term import make_console
from klas.train.checkpoint import load_checkpoint
from klas.tree.choose import Scores, auto_shares, candidate_trees, chosen_specs, rank_trunks
from klas.tree.config import TreeConfig
from klas.tree.evaluate import (
    HELD_OUT, SPLITS, classifier_accuracy, concat, fidelity, latency_ms, recovered_gain, split_outputs,
)
from klas.tree.fit import (
    CHECKPOINTS, check_tree_cache, load_tree_checkpoint, load_tuned, train_tree, tree_checkpoint, tune_branches,
)
from klas.tree.gain import floor_model, reference, reference_sets, single_key, tree_models
from klas.tree.prepare import Prepared, prepare
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
    """Refuse, before any work, models or a trunk the cache lacks or share points outside the trunk's range."""
    names = tree_models(cache, cfg)
    if len(names) < 2:
        raise KlasError(f"cache {cache.path} has {len(names)} model; a stitch tree needs two or more: re-run klas cache "
                        f"with more --model")
    if cfg.trunk is not None and cfg.trunk not in names:
        where = f"cache {cache.path}" if cfg.models is None else "--models"
        raise KlasError(f"trunk {cfg.trunk!r} is not in {where} (it has {', '.join(names)}); pass one of them "
                        f"to --trunk, or leave --trunk out to let klas choose")
    if cfg.trunk is not None and cfg.share_at is not None:
        for s in cfg.share_at:
            check_share(cfg.trunk, cache.profiles[cfg.trunk], s)


def plan_tree(cache, cfg: TreeConfig, scores: Scores, floor: str | None = None) -> Plan:
    """The trunk (given, else the best-ranked by ``scores`` or, under ``trunk_rule="floor"``, the ``floor``
    model) and its share points (given or auto), checked."""
    names = tree_models(cache, cfg)
    profiles = {n: cache.profiles[n] for n in names}
    trunks = rank_trunks(profiles, scores, cfg.match, cfg.layer)
    if cfg.trunk is None and cfg.trunk_rule == "floor" and floor is None:
        raise KlasError("trunk_rule 'floor' needs the floor model; plan with choose_plan")
    trunk = cfg.trunk or (floor if cfg.trunk_rule == "floor" else trunks[0]["trunk"])
    if cfg.share_at is not None:
        for s in cfg.share_at:
            check_share(trunk, profiles[trunk], s)
    candidates = candidate_trees(profiles, scores, trunk, cfg.match, cfg.layer)
    shares = list(cfg.share_at) if cfg.share_at is not None else auto_shares(candidates, cfg.points)
    for c in candidates:
        c["chosen"] = c["share"] in shares
    return Plan(scores, trunks, trunk, candidates, chosen_specs(profiles, scores, trunk, shares, cfg.match),
                cfg.share_at is None)


def choose_plan(cache, cfg: TreeConfig, prepared: Prepared, device: torch.device) -> Plan:
    """:func:`plan_tree` with the floor model found first where ``trunk_rule="floor"`` picks the trunk."""
    floor = None
    if cfg.trunk is None and cfg.trunk_rule == "floor":
        floor = floor_model(prepared.own, prepared.data, prepared.names, len(cache.classes), cfg, device)
    return plan_tree(cache, cfg, prepared.scores, floor)


def plan_tables(plan: Plan, auto_trunk: bool, rule: str = "score") -> list[Table]:
    """The trunk ranking and the chosen trunk's share points, as klas scored them."""
    t = Table(title="trunks: median over share points of Σ Γ (trunk -> each branch), lower is better")
    for col in ("trunk", "median Σ Γ", "best share point", "its Σ Γ", ""):
        t.add_column(col, justify="left" if col in ("trunk", "") else "right")
    for r in plan.trunks:
        mark = (f"chosen ({rule})" if auto_trunk else "given") if r["trunk"] == plan.trunk else ""
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


def check_dir(run_dir: Path, cfg: TreeConfig, cache_fingerprint: str | None = None) -> None:
    """Before any work: refuse to clobber earlier output unasked, to resume nothing, or to resume
    checkpoints made with another recipe or on another cache (the trees themselves are compared once chosen)."""
    earlier = (run_dir / MANIFEST).exists() or (run_dir / CHECKPOINTS).exists()
    if earlier and not (cfg.resume or cfg.overwrite):
        raise KlasError(f"run {run_dir} already has tree output; pass --resume to continue it or --overwrite to start over")
    ckpts = sorted((run_dir / CHECKPOINTS).glob("s*.pt")) if cfg.resume else []
    if cfg.resume and not ckpts:
        raise KlasError(f"run {run_dir} has nothing to resume; run klas tree without --resume")
    for path in ckpts[:1]:
        ckpt = load_checkpoint(path)
        if ckpt.get("config") != cfg.recipe():
            raise KlasError(f"checkpoint {path} was made with other options or another tree; resume with the same "
                            f"options, or pass --overwrite to start over")
        check_tree_cache(ckpt, path, cache_fingerprint)


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
        raise KlasError(f"{path} is not a {FORMAT} manifest; rerun: klas tree CACHE --run {run_dir} --overwrite")
    return m


# -- evaluation -------------------------------------------------------------------------------------


def evaluate_trees(cache, names: list[str], trees: dict[int, StitchTree], own: dict, data: dict, cfg: TreeConfig,
                   device: torch.device) -> dict[str, Any]:
    """Fidelity, classifier accuracies on score and eval (trees; floor and ceiling, :func:`klas.tree.gain.reference`)
    and latencies; see :mod:`klas.tree.evaluate`."""
    feats = reference_sets(own, [names])
    fid = {}
    for s, tree in trees.items():
        out = {split: split_outputs(tree, data[split], batch_size=cfg.eval_batch_size, device=device) for split in SPLITS}
        fid[s] = fidelity(out["eval"], own["eval"], data["eval"].labels.numpy(), tree.spec.trunk)
        for split in SPLITS:
            feats[split][f"tree:{s}"] = concat(out[split], tree.spec.names)
    acc = classifier_accuracy(feats["probe-train"], {s: feats[s] for s in HELD_OUT}, data["probe-train"].labels.numpy(),
                              {s: data[s].labels.numpy() for s in HELD_OUT}, len(cache.classes), epochs=cfg.probe_epochs,
                              seed=cfg.seed, device=device)
    ref = reference(acc, names, cache.profiles)
    lat: dict[str, float] = {}
    if cfg.latency:
        x = data["eval"].first(cfg.latency_batch)
        adapters = {n: t.adapter(n) for t in trees.values() for n in t.spec.names}
        lat["all"] = latency_ms(AllModels(adapters), x, device=device, repeats=cfg.latency_repeats)
        floor = ref["floor"]["model"]
        lat["single"] = latency_ms(AllModels({floor: adapters[floor]}), x, device=device, repeats=cfg.latency_repeats)
        for s, tree in trees.items():
            lat[f"tree:{s}"] = latency_ms(tree, x, device=device, repeats=cfg.latency_repeats)
    return {"accuracy": acc, "fidelity": fid, "reference": ref, "latency_ms": lat}


def predicted_ms(cache, names: list[str], plan: Plan, floor: str, cfg: TreeConfig,
                 device: torch.device) -> dict[str, float]:
    """Latency predicted from the cache's profile for this device at ``latency_batch`` (:mod:`klas.stitch.latency`):
    ``tree:{s}`` per tree, ``single`` (the floor) and ``all`` (every model of ``names`` on its own); {} without
    a profile."""
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
    pred["all"] = math.fsum(profile.route_ms(profiles, n) for n in names)
    return pred


def tree_rows(cache, names: list[str], plan: Plan, fits: dict, ev: dict, cfg: TreeConfig) -> tuple[list[dict], dict]:
    """One row per share point and the reference systems (floor, ceiling), for ``tree.json``. ``acc`` and
    ``recovered`` are on the eval split, ``acc_score`` and ``recovered_score`` on the score split."""
    profiles, acc, lat, ref = {n: cache.profiles[n] for n in names}, ev["accuracy"], ev["latency_ms"], ev["reference"]
    pred = ev.get("latency_pred_ms", {})
    floor, ceiling = ref["floor"], ref["ceiling"]
    score = {c["share"]: c["score"] for c in plan.candidates}
    rows = []
    for spec in plan.specs:
        s, cost = spec.share, tree_cost(profiles, spec, cfg.layer)
        a = {split: acc[split][f"tree:{s}"] for split in HELD_OUT}
        rows.append({
            "share": s, "spec": spec.to_json(), "macs": cost["macs"], "gflops": cost["macs"] / 1e9, "params": cost["params"],
            "cost_parts": cost, "extra_cost": cost["macs"] / cost["largest_macs"] - 1, "score": score.get(s),
            "acc": a["eval"], "recovered": recovered_gain(a["eval"], floor["eval"], ceiling["eval"]),
            "acc_score": a["score"], "recovered_score": recovered_gain(a["score"], floor["score"], ceiling["score"]),
            "fidelity": ev["fidelity"][s], "latency_ms": lat.get(f"tree:{s}"), "latency_pred_ms": pred.get(f"tree:{s}"),
            "fit_r2": fits[s].fit_r2, "history": fits[s].history, "checkpoint_sha256": fits[s].weights_sha256,
        })
    largest = ref["largest"]["macs"]
    reference = {
        "floor": {"model": floor["model"], "macs": floor["macs"], "acc": floor["eval"], "acc_score": floor["score"],
                  "latency_ms": lat.get("single"), "latency_pred_ms": pred.get("single"),
                  "extra_cost": floor["macs"] / largest - 1},
        "ceiling": {"models": names, "macs": ceiling["macs"], "acc": ceiling["eval"], "acc_score": ceiling["score"],
                    "latency_ms": lat.get("all"), "latency_pred_ms": pred.get("all"), "extra_cost": ceiling["extra_cost"]},
        "largest": ref["largest"],
        "singles": {n: {"macs": profiles[n].macs, "acc": acc["eval"][single_key(n)],
                        "acc_score": acc["score"][single_key(n)]} for n in names},
    }
    return rows, reference


# -- the entry point --------------------------------------------------------------------------------


def tree_run(cache_path: Path | str, run_dir: Path | str | None = None, config: TreeConfig | None = None, *,
             console: Console | None = None, progress: bool = True, prepared: Prepared | None = None,
             **overrides: Any) -> TreeResult:
    """Choose, train and evaluate a Stitch Tree sweep over the models of a cache (module docstring).

    ``config`` holds the options (:class:`~klas.tree.config.TreeConfig`), keyword ``overrides`` replace
    single fields. Writes ``run_dir`` (default ``cache/runs/<cache>-tree``) and returns a :class:`TreeResult`.
    ``prepared`` (:func:`klas.tree.prepare.prepare`, same models and scoring settings): the scores and the
    models' own outputs of an earlier run over this cache, reused instead of computed again.
    """
    t0 = time.perf_counter()
    cfg = (config or TreeConfig()).with_overrides(**overrides) if overrides else (config or TreeConfig())
    console = console or make_console(stderr=True)
    cache = open_cache(cache_path)
    check_request(cache, cfg)
    run_dir = Path(run_dir) if run_dir else DEFAULT_ROOT / "runs" / f"{cache.path.name}-tree"
    check_dir(run_dir, cfg, cache.fingerprint)
    device = resolve_device(cfg.device)
    if prepared is not None:
        prepared.check(cache, cfg, device)
    claim_dir(run_dir, KIND, "--run")
    with DirLock(run_dir, "--run"):  # before the scoring: a second klas tree on this run learns of it at once
        check_dir(run_dir, cfg, cache.fingerprint)  # again: a writer that held the lock may have finished meanwhile
        prepared = prepared or prepare(cache, cfg, device, console=console, progress=progress)
        plan = choose_plan(cache, cfg, prepared, device)
        for t in plan_tables(plan, cfg.trunk is None, cfg.trunk_rule):
            console.print(t)
        prepare_dir(run_dir, cfg)
        return _run_locked(cache, run_dir, plan, cfg, prepared, device, console, progress, t0)


def _run_locked(cache, run_dir: Path, plan: Plan, cfg: TreeConfig, prepared: Prepared, device: torch.device,
                console: Console, progress: bool, t0: float) -> TreeResult:
    """Train every tree of the plan and, once all are trained, evaluate them and write ``tree.json``."""
    names, data, models, own = prepared.names, prepared.data, prepared.models, prepared.own
    targets = {n: {"features": torch.from_numpy(own["probe-train"][n]["features"])} for n in names}
    budget = [cfg.stop_after if cfg.stop_after is not None else math.inf]
    fits = {}
    for spec in plan.specs:
        fits[spec.share] = train_tree(run_dir, models, spec, cfg, data["probe-train"], targets, device,
                                      console=console, progress=progress, budget=budget,
                                      cache_fingerprint=cache.fingerprint)
        if fits[spec.share].epoch_done < cfg.total_epochs:
            console.print(f"stopped at share point {spec.share}, epoch {fits[spec.share].epoch_done}/{cfg.total_epochs}; "
                          f"continue with --resume")
            return TreeResult(run_dir, {}, False, time.perf_counter() - t0, plan)
    console.print(f"evaluating {len(fits)} trees on the score and eval splits ...")
    trees = {s: StitchTree.from_net(f.net, spec).eval() for (s, f), spec in zip(fits.items(), plan.specs)}
    ev = evaluate_trees(cache, names, trees, own, data, cfg, device)
    ev["latency_pred_ms"] = predicted_ms(cache, names, plan, ev["reference"]["floor"]["model"], cfg, device)
    rows, reference = tree_rows(cache, names, plan, fits, ev, cfg)
    manifest = {
        "format": FORMAT, "cache": {"path": str(cache.path), "fingerprint": cache.fingerprint},
        "config": cfg.recipe(), "config_sha256": sha256_json(cfg.recipe()), "trunk": plan.trunk,
        "trunk_ranking": plan.trunks,
        "candidates": [{k: (v.to_json() if k == "spec" else v) for k, v in c.items()} for c in plan.candidates],
        "models": names, "trees": rows, "reference": reference, "train_images": data["probe-train"].n,
        "score_images": data["score"].n, "eval_images": data["eval"].n,
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
    cache = open_run_cache(manifest, run_dir, stage="tree")
    ckpt = load_tree_checkpoint(tree_checkpoint(run_dir, share), spec, manifest["config"], manifest["cache"].get("fingerprint"))
    if int(ckpt["epoch"]) != manifest["config"]["epochs"] + manifest["config"]["task_epochs"]:
        raise KlasError(f"checkpoint of share point {share} in {run_dir} is not the evaluated one; rerun: klas tree "
                        f"{manifest['cache']['path']} --run {run_dir} --resume (with the options it was made with)")
    if ckpt.get("weights_sha256") != row.get("checkpoint_sha256", ckpt.get("weights_sha256")):
        raise KlasError(f"checkpoint {tree_checkpoint(run_dir, share)} is not the one {MANIFEST} was evaluated with "
                        f"(its weights come from another training); restore it, or rerun: klas tree "
                        f"{manifest['cache']['path']} --run {run_dir} --overwrite")
    dev = torch.device(device)
    loaded = {} if loaded is None else loaded
    if not set(spec.names) <= set(loaded):
        loaded.update({m.name: m for m in cache.load_models(device=dev, root=root or DEFAULT_ROOT)})
    adapters = {n: loaded[n].adapter for n in spec.names}
    tuned = ckpt.get("anchor_states") or {}
    if tuned:  # fine-tuned branches: their own copies, the shared loaded models untouched
        adapters.update(tune_branches(adapters, spec))
    net = StitchNet(adapters, {n: loaded[n].profile for n in spec.names}, spec.stitch_specs(), kind=ckpt["layer"]).to(dev)
    for sid, sd in ckpt["stitch_states"].items():
        net.stitch_layer(sid).load_state_dict(sd)
    for name, sd in tuned.items():
        load_tuned(net.adapter(name), sd)
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


__all__ = ["FORMAT", "KIND", "MANIFEST", "Plan", "TreeResult", "check_request", "choose_plan", "plan_tree", "read_manifest",
           "trained_tree", "tree_run", "tradeoff_table"]
