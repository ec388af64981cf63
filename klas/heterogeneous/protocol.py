"""Training and measuring every stitch of the protocol at every length (the package docstring has the method)."""
from __future__ import annotations

import copy
import time
from dataclasses import asdict
from typing import Callable

import numpy as np
import torch

from klas.errors import KlasError
from klas.heterogeneous.config import DEPTHS, PAPER, HeteroConfig, cut_at, protocol_stitches, stages_of
from klas.optim import warmup_constant, warmup_cosine, warmup_steps_of
from klas.stitch.init import DEFAULT_RIDGE
from klas.stitch.network import StitchNet, stitch_macs
from klas.train import (
    Objective, SplitData, correct_per_image, epoch_positions, fit, init_stitches, make_optimizer, parse_loss,
    teacher_targets,
)
from klas.utils import DEFAULT_ROOT, resolve_device, seed_everything, sha256_state_dict

Snapshot = tuple[dict, dict, list[float]]  # stitch layers' state, optimiser state, per-step losses so far


class _Setup:
    """What every run shares: the frozen models, the stitches, the least-squares start, data and targets."""

    def __init__(self, adapters, profiles, specs, start_state, train: SplitData, targets, cfg: HeteroConfig,
                 dev: torch.device, on_step: Callable[[], None] | None) -> None:
        self.adapters, self.profiles, self.specs, self.start_state = adapters, profiles, specs, start_state
        self.train, self.targets, self.cfg, self.dev, self.on_step = train, targets, cfg, dev, on_step
        # the prefix of a longer draw is the shorter draw: every run sees the same batches in the same order
        self.positions = epoch_positions(train.n, cfg.lengths[-1], cfg.batch_size, cfg.seed, 1)

    def net(self, snapshot: Snapshot | None = None, lr: float | None = None):
        """A StitchNet over the shared (frozen) models at the least-squares start, or at ``snapshot``; with
        ``lr`` also its optimiser (the snapshot's state loaded)."""
        net = StitchNet(self.adapters, self.profiles, self.specs, self.cfg.layer).to(self.dev)
        net.stitch_layers.load_state_dict(snapshot[0] if snapshot else self.start_state)
        if lr is None:
            return net
        opt = make_optimizer(net, lr, self.cfg.weight_decay)  # stitch layers only: the anchors stay frozen
        if snapshot:
            opt.load_state_dict(snapshot[1])
        return net, opt

    def steps(self, net: StitchNet, opt, weights: dict[str, float], start: int, stop: int,
              schedule: Callable[[int], float]) -> list[float]:
        """Steps ``start .. stop-1`` of the shared batch sequence under ``weights``; per-step losses."""
        bs = self.cfg.batch_size
        on = self.on_step
        return fit(net, self.train, [net.stitch_ids] * (stop - start), Objective(weights, 1.0, self.targets), opt,
                   positions=self.positions[start * bs:stop * bs], batch_size=bs, device=self.dev, schedule=schedule,
                   start_step=start, chunk_images=self.cfg.chunk_images,
                   on_step=(lambda k, ids, value: on()) if on else None)


def _snapshot(net: StitchNet, opt, curve: list[float]) -> Snapshot:
    return ({k: v.detach().clone() for k, v in net.stitch_layers.state_dict().items()},
            copy.deepcopy(opt.state_dict()), list(curve))


def train_loss(net: StitchNet, train: SplitData, loss: str, lr: float, targets, cfg: HeteroConfig, dev: torch.device,
               on_step: Callable[[], None] | None = None, steps: int | None = None) -> list[float]:
    """``steps`` (default the longest length) steps of every stitch of ``net`` (stitch layers only) under
    ``loss`` with warm-up + cosine over those steps (the ``cosine`` schedule); per-step losses (each
    the mean over the stitches). ``on_step()`` after every step."""
    steps = steps or cfg.lengths[-1]
    warm = warmup_steps_of(cfg.warmup, steps)
    opt = make_optimizer(net, lr, cfg.weight_decay)
    positions = epoch_positions(train.n, steps, cfg.batch_size, cfg.seed, 1)
    losses: list[float] = []
    done = 0
    for weights, n in stages_of(loss, steps, cfg.first_fraction):
        losses += fit(net, train, [net.stitch_ids] * n, Objective(weights, 1.0, targets), opt,
                      positions=positions[done * cfg.batch_size:(done + n) * cfg.batch_size],
                      batch_size=cfg.batch_size, device=dev, schedule=lambda s: warmup_cosine(s, steps, warm),
                      start_step=done, chunk_images=cfg.chunk_images,
                      on_step=(lambda k, ids, value: on_step()) if on_step else None)
        done += n
    return losses


def _constant_runs(setup: _Setup, lr: float) -> dict[tuple[str, int], Snapshot]:
    """Under the ``constant`` schedule: one run per single loss, read off at every length it is needed
    (each length, and each two-stage loss's switch point), then each two-stage loss continued from its
    first loss's snapshot. Returns ``{(loss, length): snapshot}`` for every configured loss and length."""
    cfg = setup.cfg
    schedule = lambda s: warmup_constant(s, warmup_steps_of(cfg.warmup, cfg.lengths[0]))  # noqa: E731
    stops: dict[str, set[int]] = {}
    for loss in cfg.losses:
        if "->" in loss:
            first = loss.split("->")[0]
            stops.setdefault(first, set()).update(stages_of(loss, n, cfg.first_fraction)[0][1] for n in cfg.lengths)
        else:
            stops.setdefault(loss, set()).update(cfg.lengths)
    snaps: dict[tuple[str, int], Snapshot] = {}
    for loss, wanted in stops.items():
        net, opt = setup.net(lr=lr)
        curve: list[float] = []
        done = 0
        for stop in sorted(wanted):
            curve += setup.steps(net, opt, parse_loss(loss), done, stop, schedule)
            snaps[(loss, stop)] = _snapshot(net, opt, curve)
            done = stop
    out = {}
    for loss in cfg.losses:
        for n in cfg.lengths:
            if "->" not in loss:
                out[(loss, n)] = snaps[(loss, n)]
                continue
            (w1, first), (w2, _) = stages_of(loss, n, cfg.first_fraction)
            snap = snaps[(loss.split("->")[0], first)]
            net, opt = setup.net(snap, lr)
            curve = snap[2] + setup.steps(net, opt, w2, first, n, schedule)
            out[(loss, n)] = _snapshot(net, opt, curve)
    return out


def _cosine_runs(setup: _Setup, lr: float) -> dict[tuple[str, int], Snapshot]:
    """Under the ``cosine`` schedule: one run per loss and length (:func:`train_loss`), each from the
    least-squares start."""
    out = {}
    for loss in setup.cfg.losses:
        for n in setup.cfg.lengths:
            net = setup.net()
            curve = train_loss(net, setup.train, loss, lr, setup.targets, setup.cfg, setup.dev, setup.on_step, steps=n)
            out[(loss, n)] = ({k: v.detach().clone() for k, v in net.stitch_layers.state_dict().items()}, {}, curve)
    return out


def _accuracies(nets: dict, data: SplitData, cfg: HeteroConfig, dev, positions=None) -> dict[str, dict[str, float]]:
    bits = correct_per_image(nets, data, batch_size=cfg.eval_batch_size, device=dev, chunk_images=cfg.chunk_images,
                             positions=positions)
    return {tag: {i: float(v.mean()) for i, v in d.items()} for tag, d in bits.items()}


def _score_positions(n: int, cfg: HeteroConfig) -> list[int] | None:
    if cfg.score_limit is None or cfg.score_limit >= n:
        return None
    g = torch.Generator().manual_seed(cfg.seed)
    return torch.randperm(n, generator=g)[: cfg.score_limit].sort().values.tolist()


def tag_of(loss: str, lr: float, steps: int) -> str:
    return f"{loss}@{lr:g}@{steps}"


def run_protocol(cache, cfg: HeteroConfig, *, root=DEFAULT_ROOT, device: str | None = None,
                 say: Callable[[str], None] = print, on_step: Callable[[], None] | None = None) -> dict:
    """The whole protocol on ``cache`` (which must hold ``cfg.models`` and the three digits-style splits);
    returns its JSON-ready report (:func:`summarise`). ``on_step()`` is called after every training step
    (:func:`klas.heterogeneous.config.total_steps` times ``len(cfg.lrs)``)."""
    dev = resolve_device(device)
    missing = [m for m in cfg.models if m not in cache.model_names]
    if missing:
        raise KlasError(f"cache {cache.path} does not hold {missing}; build it with these models")
    times: dict[str, float] = {}
    t = time.perf_counter()
    seed_everything(cfg.seed)
    loaded = {m.name: m for m in cache.load_models(device=dev, root=root) if m.name in cfg.models}
    adapters, profiles = {n: m.adapter for n, m in loaded.items()}, {n: m.profile for n, m in loaded.items()}
    anchors_sha = {n: sha256_state_dict(a.state_dict()) for n, a in adapters.items()}
    plan = protocol_stitches(profiles, cfg)
    specs = [p["spec"] for p in plan]
    data = {s: SplitData(cache, s, root=root) for s in ("probe-train", "score", "eval")}
    start = StitchNet(adapters, profiles, specs, cfg.layer).to(dev)
    r2 = init_stitches(start, data["probe-train"], images=cfg.init_images, ridge=DEFAULT_RIDGE, seed=cfg.seed,
                       batch_size=cfg.eval_batch_size, device=dev)
    start_state = {k: v.detach().clone() for k, v in start.stitch_layers.state_dict().items()}
    wants = {k: 1.0 for loss in cfg.losses for part in loss.split("->") for k in parse_loss(part)}
    targets = teacher_targets(start, data["probe-train"], list(cfg.models), wants, batch_size=cfg.eval_batch_size,
                              device=dev)
    setup = _Setup(adapters, profiles, specs, start_state, data["probe-train"], targets, cfg, dev, on_step)
    times["setup"] = time.perf_counter() - t
    say(f"{len(specs)} stitches ({', '.join(cfg.depths)}; {cfg.layer}), least squares on {cfg.init_images} images; "
        f"{len(cfg.losses)} losses x {len(cfg.lrs)} lr, lengths {list(cfg.lengths)} ({cfg.schedule} schedule) "
        f"({times['setup']:.0f} s)")
    nets: dict[str, tuple[StitchNet, list[str]]] = {"start": (start, start.stitch_ids + list(cfg.models))}
    curves: dict[str, list[float]] = {}
    t = time.perf_counter()
    for lr in cfg.lrs:
        runs = (_constant_runs if cfg.schedule == "constant" else _cosine_runs)(setup, lr)
        for (loss, n), snap in runs.items():
            tag = tag_of(loss, lr, n)
            net = setup.net(snap)
            nets[tag], curves[tag] = (net, net.stitch_ids), snap[2]
        say(f"  lr {lr:g}: " + "; ".join(f"{loss} {curves[tag_of(loss, lr, cfg.lengths[-1])][-1]:.4f}"
                                          for loss in cfg.losses) + f" at {cfg.lengths[-1]} steps "
            f"({time.perf_counter() - t:.0f} s)")
    times["train"] = time.perf_counter() - t
    t = time.perf_counter()
    score = _accuracies(nets, data["score"], cfg, dev, _score_positions(data["score"].n, cfg))
    evals = _accuracies(nets, data["eval"], cfg, dev)
    times["evaluate"] = time.perf_counter() - t
    unchanged = {n: sha256_state_dict(a.state_dict()) == anchors_sha[n] for n, a in adapters.items()}
    return summarise(cfg, plan, profiles, r2, curves, score, evals, unchanged, times,
                     {s: d.n for s, d in data.items()})


def _choose(cfg: HeteroConfig, score: dict, ids: list[str]) -> dict[tuple[str, int], float]:
    """Per loss and length, the lr with the best mean score-split accuracy over its stitches (the first on a tie)."""
    return {(loss, n): max(cfg.lrs, key=lambda lr: (np.mean([score[tag_of(loss, lr, n)][i] for i in ids]),
                                                     -cfg.lrs.index(lr)))
            for loss in cfg.losses for n in cfg.lengths}


def summarise(cfg: HeteroConfig, plan, profiles, r2, curves, score, evals, unchanged, times, split_sizes) -> dict:
    """The JSON-ready report: anchors, stitch points, one row per (stitch, loss, length) at its chosen lr;
    :func:`klas.heterogeneous.claims.assess` adds the length curves, the chosen length and the claims."""
    from klas.heterogeneous.claims import assess

    a, b = cfg.models
    ids = [p["spec"].id for p in plan]
    chosen = _choose(cfg, score, ids)
    anchors = {m: {"gflops": profiles[m].macs / 1e9, "blocks": profiles[m].num_blocks,
                   "eval": evals["start"][m], "score": score["start"][m]} for m in cfg.models}
    rows = []
    for p in plan:
        s = p["spec"]
        target = anchors[s.dst]["eval"]
        for loss in cfg.losses:
            for n in cfg.lengths:
                tag = tag_of(loss, chosen[(loss, n)], n)
                acc = evals[tag][s.id]
                rows.append({
                    "depth": p["depth"], "kind": p["kind"], "id": s.id, "src": s.src, "src_cut": s.src_cut,
                    "dst": s.dst, "dst_cut": s.dst_cut, "loss": loss, "steps": n, "lr": chosen[(loss, n)],
                    "gflops": stitch_macs(profiles[s.src], s.src_cut, profiles[s.dst], s.dst_cut, cfg.layer) / 1e9,
                    "init_r2": r2[s.id], "acc_start": evals["start"][s.id], "acc_start_score": score["start"][s.id],
                    "acc_score": score[tag][s.id], "acc": acc,
                    "relative_to_target": acc / target if target > 0 else float("nan"),
                    "beats_both": bool(acc > max(anchors[a]["eval"], anchors[b]["eval"])),
                    "loss_first": curves[tag][0], "loss_last": curves[tag][-1],
                })
    rep = {
        "config": {**asdict(cfg), "models": list(cfg.models), "lengths": list(cfg.lengths)}, "models": list(cfg.models),
        "anchors": anchors, "cuts": {d: {m: cut_at(profiles[m].num_blocks, DEPTHS[d]) for m in cfg.models} for d in cfg.depths},
        "chosen_lr": {f"{loss}@{n}": lr for (loss, n), lr in chosen.items()}, "chosen_on": "score", "reported_on": "eval",
        "split_sizes": split_sizes, "score_images": min(cfg.score_limit or split_sizes["score"], split_sizes["score"]),
        "anchors_unchanged": unchanged, "rows": rows,
        "score_by_lr": {tag: float(np.mean([score[tag][i] for i in ids])) for tag in curves},
        "seconds": times, "paper": PAPER,
    }
    rep.update(assess(rep, cfg))
    return rep


def cell(report: dict, stitch: str, loss: str, steps: int | None = None) -> dict:
    """The row of ``stitch`` trained with ``loss`` for ``steps`` (default: the report's chosen length)."""
    steps = steps or report["length"]["chosen"]
    return next(r for r in report["rows"] if r["id"] == stitch and r["loss"] == loss and r["steps"] == steps)


__all__ = ["cell", "run_protocol", "summarise", "tag_of", "train_loss"]
