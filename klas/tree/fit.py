"""Training one tree: least-squares init of its stitch layers, then FFM (and optionally the task loss).

A tree at share point ``s`` is a :class:`~klas.stitch.network.StitchNet` over the cached models whose
stitches are its branches ``T:s -> M:cut_M``. Every step trains all of them on one batch with the
training core (:func:`klas.train.core.fit` with the list of branch ids): the trunk prefix runs once
and each branch's loss is backpropagated into its own stitch layer; the models stay frozen (Mai et al.).
With ``branch_lr_scale`` > 0 each branch runs on its own copy of its model, whose blocks from the cut
and head train too (:func:`tune_branches`); the trunk and the shared models stay frozen.
The loss is ``ffm`` (MSE of the branch's pre-logits features to the model's own, label-free) for
``epochs`` epochs, then ``ce`` for ``task_epochs``, under one warm-up + cosine schedule.

``RUN/checkpoints/s{share}.pt`` is replaced after every epoch (and after the init), so an interrupted
run continues exactly with ``--resume``; a finished tree's checkpoint is the trained tree.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from klas.errors import KlasError
from klas.optim import param_groups, warmup_cosine, warmup_steps_of
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
    """A tree's network, how far it trained, the least-squares fit's R², the per-epoch history and the
    ``weights_sha256`` of its latest checkpoint (what ``tree.json`` records as ``checkpoint_sha256``)."""

    net: StitchNet
    epoch_done: int
    fit_r2: dict[str, float] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    weights_sha256: str | None = None


def build_net(models: Mapping, spec: TreeSpec, cfg: TreeConfig, device: torch.device) -> StitchNet:
    """The tree's StitchNet over the loaded models (shared, frozen), stitch layers seeded per share point;
    with ``cfg.tunes_branches`` every branch on a copy of its model (:func:`tune_branches`)."""
    seed_everything(cfg.seed * 1000 + spec.share)
    adapters = {n: models[n].adapter for n in spec.names}
    if cfg.tunes_branches:
        adapters.update(tune_branches(adapters, spec))
    net = StitchNet(adapters, {n: models[n].profile for n in spec.names}, spec.stitch_specs(), kind=cfg.layer)
    return net.to(device)


def tune_branches(adapters: Mapping, spec: TreeSpec) -> dict:
    """A copy of every branch's model (not the trunk's) whose blocks from the branch's cut and head
    modules are trainable and the rest frozen: what the tree's branches run when they are fine-tuned.
    The given adapters are left as they are."""
    out = {}
    for name, cut in spec.branches:
        a = copy.deepcopy(adapters[name])
        for p in a.parameters():
            p.requires_grad_(False)
        for module in (*a.blocks[cut:], *a.head_modules(), *a.shared_modules()):
            for p in module.parameters():
                p.requires_grad_(True)
        out[name] = a
    return out


def tuned_states(net: StitchNet) -> dict[str, dict[str, torch.Tensor]]:
    """Per branch model of ``net``, its trainable parameters by name (empty when the models are frozen)."""
    out = {}
    for name in net.anchor_names:
        state = {k: p.detach().cpu().clone() for k, p in net.adapter(name).named_parameters() if p.requires_grad}
        if state:
            out[name] = state
    return out


def load_tuned(adapter, state: Mapping[str, torch.Tensor]) -> None:
    """Copy a branch's fine-tuned parameters (:func:`tuned_states`) into ``adapter``."""
    params = dict(adapter.named_parameters())
    unknown = sorted(set(state) - set(params))
    if unknown:
        raise KlasError(f"a tree checkpoint holds parameters its model lacks ({unknown[0]}, ...); retrain it with --overwrite")
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)


def tree_optimizer(net: StitchNet, spec: TreeSpec, cfg: TreeConfig) -> torch.optim.Optimizer:
    """AdamW over the stitch layers at ``lr`` and, when the branches are tuned, each branch's trainable
    parameters at ``branch_lr_scale`` x ``lr`` (:func:`klas.optim.param_groups`)."""
    opt = make_optimizer(net, cfg.lr, cfg.weight_decay)
    for name, _ in spec.branches if cfg.tunes_branches else ():
        for group in param_groups(net.adapter(name), cfg.lr * cfg.branch_lr_scale, cfg.weight_decay,
                                  name=f"branch:{name}"):
            opt.add_param_group(group)
    return opt


def _state(net: StitchNet, opt, spec: TreeSpec, cfg: TreeConfig, tf: TreeFit, cache_fingerprint: str | None) -> dict:
    return {"config": cfg.recipe(), "spec": spec.to_json(), "cache_fingerprint": cache_fingerprint,
            "epoch": tf.epoch_done,
            "stitch_states": {sid: {k: v.detach().cpu().clone() for k, v in net.stitch_layer(sid).state_dict().items()}
                              for sid in net.stitch_ids},
            "anchor_states": tuned_states(net),
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
    opt = tree_optimizer(net, spec, cfg)
    path = tree_checkpoint(run_dir, spec.share)
    if cfg.resume and path.is_file():
        ckpt = load_tree_checkpoint(path, spec, cfg.recipe(), cache_fingerprint)
        for sid, sd in ckpt["stitch_states"].items():
            net.stitch_layer(sid).load_state_dict(sd)
        for name, sd in ckpt.get("anchor_states", {}).items():
            load_tuned(net.adapter(name), sd)
        opt.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"])
        return TreeFit(net, int(ckpt["epoch"]), dict(ckpt["fit_r2"]), list(ckpt["history"]), ckpt["weights_sha256"]), opt
    r2 = init_stitches(net, data, images=cfg.init_images, ridge=cfg.ridge, seed=cfg.seed,
                       batch_size=cfg.eval_batch_size, device=device)
    tf = TreeFit(net, 0, r2, [])
    tf.weights_sha256 = save_checkpoint(path, _state(net, opt, spec, cfg, tf, cache_fingerprint))
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
        tf.weights_sha256 = save_checkpoint(tree_checkpoint(run_dir, spec.share),
                                            _state(tf.net, opt, spec, cfg, tf, cache_fingerprint))
        console.print(f"tree s={spec.share}: epoch {epoch}/{cfg.total_epochs} {record['loss_kind']} loss "
                      f"{record['loss']:.4f} ({steps} steps, {record['seconds']:.1f} s)")
        budget[0] -= 1
    return tf


__all__ = ["CHECKPOINTS", "TreeFit", "build_net", "check_tree_cache", "load_tree_checkpoint", "load_tuned", "start_tree",
           "tree_checkpoint", "tree_optimizer", "train_tree", "tune_branches", "tuned_states"]
