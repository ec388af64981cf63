"""Training one tree: least-squares init of its stitch layers, then FFM (and optionally the task loss).

A tree at share point ``s`` is a :class:`~klas.stitch.network.StitchNet` over the cached models whose
stitches are its branches ``T:s -> M:cut_M``. Every step trains all of them on one batch with the
training core (:func:`klas.train.core.fit` with the list of branch ids): the trunk prefix runs once
and each branch's loss is backpropagated into its own stitch layer; the models stay frozen (Mai et al.).
The loss is ``ffm`` (MSE of the branch's pre-logits features to the model's own, label-free) for
``epochs`` epochs, then ``ce`` for ``task_epochs``, under one warm-up + cosine schedule.

``RUN/checkpoints/s{share}.pt`` is replaced after every epoch (and after the init), so an interrupted
run continues exactly with ``--resume``; a finished tree's checkpoint is the trained tree.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from klas.errors import KlasError
from klas.optim import warmup_cosine, warmup_steps_of
from klas.stitch.network import StitchNet
from klas.stitch.tree import TreeSpec
from klas.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from klas.train.core import NonFiniteLoss, Objective, fit, init_stitches, make_optimizer
from klas.train.data import SplitData, epoch_positions
from klas.tree.config import TreeConfig
from klas.utils import seed_everything

CHECKPOINTS = "checkpoints"


def tree_checkpoint(run_dir: Path, share: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"s{int(share)}.pt"


@dataclass
class TreeFit:
    """A tree's network, how far it trained, the least-squares fit's R² and the per-epoch history."""

    net: StitchNet
    epoch_done: int
    fit_r2: dict[str, float] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)


def build_net(models: Mapping, spec: TreeSpec, cfg: TreeConfig, device: torch.device) -> StitchNet:
    """The tree's StitchNet over the loaded models (shared, frozen), stitch layers seeded per share point."""
    seed_everything(cfg.seed * 1000 + spec.share)
    net = StitchNet({n: models[n].adapter for n in spec.names}, {n: models[n].profile for n in spec.names},
                    spec.stitch_specs(), kind=cfg.layer)
    return net.to(device)


def _state(net: StitchNet, opt, spec: TreeSpec, cfg: TreeConfig, tf: TreeFit, cache_fingerprint: str | None) -> dict:
    return {"config": cfg.recipe(), "spec": spec.to_json(), "cache_fingerprint": cache_fingerprint,
            "epoch": tf.epoch_done,
            "stitch_states": {sid: {k: v.detach().cpu().clone() for k, v in net.stitch_layer(sid).state_dict().items()}
                              for sid in net.stitch_ids},
            "optimizer": opt.state_dict(), "rng": rng_state(), "fit_r2": dict(tf.fit_r2), "history": list(tf.history),
            "layer": net.kind}


def load_tree_checkpoint(path: Path, spec: TreeSpec, recipe: dict, cache_fingerprint: str | None = None) -> dict:
    """A tree checkpoint made for ``spec`` with ``recipe`` (on the cache of ``cache_fingerprint`` when given),
    or a one-line error naming the fix."""
    ckpt = load_checkpoint(path)
    if ckpt.get("spec") != spec.to_json() or ckpt.get("config") != recipe:
        raise KlasError(f"checkpoint {path} was made with other options or another tree; resume with the same "
                        f"options, or pass --overwrite to start over")
    check_tree_cache(ckpt, path, cache_fingerprint)
    return ckpt


def check_tree_cache(ckpt: dict, path: Path, cache_fingerprint: str | None) -> None:
    """Refuse a tree checkpoint trained on another cache than ``cache_fingerprint`` (None: not checked)."""
    made_on = ckpt.get("cache_fingerprint")
    if cache_fingerprint is not None and made_on is not None and made_on != cache_fingerprint:
        raise KlasError(f"checkpoint {path} was trained on another cache (fingerprint {str(made_on)[:12]}, this one "
                        f"{cache_fingerprint[:12]}); give the cache it was made from, or pass --overwrite to start over")


def start_tree(run_dir: Path, models: Mapping, spec: TreeSpec, cfg: TreeConfig, data: SplitData,
               device: torch.device, cache_fingerprint: str | None = None) -> tuple[TreeFit, torch.optim.Optimizer]:
    """A fresh tree (least-squares init, checkpoint at epoch 0) or, with ``resume``, the checkpointed one."""
    net = build_net(models, spec, cfg, device)
    opt = make_optimizer(net, cfg.lr, cfg.weight_decay)
    path = tree_checkpoint(run_dir, spec.share)
    if cfg.resume and path.is_file():
        ckpt = load_tree_checkpoint(path, spec, cfg.recipe(), cache_fingerprint)
        for sid, sd in ckpt["stitch_states"].items():
            net.stitch_layer(sid).load_state_dict(sd)
        opt.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"])
        return TreeFit(net, int(ckpt["epoch"]), dict(ckpt["fit_r2"]), list(ckpt["history"])), opt
    r2 = init_stitches(net, data, images=cfg.init_images, ridge=cfg.ridge, seed=cfg.seed,
                       batch_size=cfg.eval_batch_size, device=device)
    tf = TreeFit(net, 0, r2, [])
    save_checkpoint(path, _state(net, opt, spec, cfg, tf, cache_fingerprint))
    return tf, opt


def train_tree(run_dir: Path, models: Mapping, spec: TreeSpec, cfg: TreeConfig, data: SplitData,
               targets: Mapping[str, Mapping[str, torch.Tensor]], device: torch.device, *, console: Console,
               progress: bool, budget: list[int], cache_fingerprint: str | None = None) -> TreeFit:
    """Train the tree ``spec`` to ``cfg.total_epochs`` (or until ``budget[0]`` epochs of this
    invocation are spent; ``budget`` is shared by the trees of one run and decremented)."""
    tf, opt = start_tree(run_dir, models, spec, cfg, data, device, cache_fingerprint)
    steps = cfg.steps_per_epoch or -(-data.n // cfg.batch_size)
    total = cfg.total_epochs * steps
    warm = warmup_steps_of(cfg.warmup, total)
    ids = tf.net.stitch_ids
    for epoch in range(tf.epoch_done + 1, cfg.total_epochs + 1):
        if budget[0] <= 0:
            break
        loss = cfg.loss_at(epoch)
        objective = Objective(loss, targets=targets)
        positions = epoch_positions(data.n, steps, cfg.batch_size, cfg.seed, epoch)
        t0 = time.perf_counter()
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), console=console,
                      disable=not progress, transient=True) as bar:
            task = bar.add_task(f"tree s={spec.share}: epoch {epoch}/{cfg.total_epochs} ({next(iter(loss))})",
                                total=steps, loss="-")
            try:
                losses = fit(tf.net, data, [ids] * steps, objective, opt, positions=positions, batch_size=cfg.batch_size,
                             device=device, schedule=lambda s: warmup_cosine(s, total, warm), start_step=(epoch - 1) * steps,
                             on_step=lambda k, _i, v: bar.update(task, advance=1, loss=f"{v:.4f}"))
            except NonFiniteLoss as exc:
                raise KlasError(f"loss became {exc.value} training the tree at share point {spec.share}, epoch {epoch}; "
                                f"lower --lr (now {cfg.lr:g}) and run again with --overwrite") from None
        record = {"epoch": epoch, "loss_kind": next(iter(loss)), "loss": sum(losses) / len(losses), "steps": steps,
                  "seconds": time.perf_counter() - t0}
        tf.history.append(record)
        tf.epoch_done = epoch
        save_checkpoint(tree_checkpoint(run_dir, spec.share), _state(tf.net, opt, spec, cfg, tf, cache_fingerprint))
        console.print(f"tree s={spec.share}: epoch {epoch}/{cfg.total_epochs} {record['loss_kind']} loss "
                      f"{record['loss']:.4f} ({steps} steps, {record['seconds']:.1f} s)")
        budget[0] -= 1
    return tf


__all__ = ["CHECKPOINTS", "TreeFit", "build_net", "check_tree_cache", "load_tree_checkpoint", "start_tree", "tree_checkpoint", "train_tree"]
