"""The training core: one optimiser step, and a fit over a sequence of steps, for any trainer.

``klas train`` (:mod:`klas.train.loop`), the quality benchmark and later trainers all train a
:class:`~klas.stitch.network.StitchNet` the same way::

    objective = Objective(parse_loss("ce"))
    opt = make_optimizer(net, lr=1e-3, weight_decay=0.05)
    schedule = lambda s: warmup_cosine(s, total, warmup_steps_of(0.1, total))
    losses = fit(net, data, stitch_sequence(len(ids), total, "uniform", buckets, seed, 1), ..., objective, opt,
                 positions=epoch_positions(data.n, total, batch, seed, 1), batch_size=batch, schedule=schedule)

A step trains one network (a stitch id or an anchor name) on one batch, or several networks on the
same batch (their losses summed; stitches resuming the same target block share one forward,
:mod:`klas.train.forward`). What a step minimises is an :class:`Objective`: weighted loss terms
(:mod:`klas.train.losses`) and, for the label-free ones, each target model's own outputs per image.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from klas.errors import KlasError
from klas.optim import autocast, param_groups, set_lr
from klas.stitch.init import least_squares_init
from klas.stitch.network import StitchNet
from klas.train.data import SplitData, epoch_seed
from klas.train.forward import Outputs, anchor_outputs, group_outputs, match_needs, needs_of, target_groups, target_of
from klas.train.losses import needs_match, needs_teacher, stitch_loss, trains_anchors

Batch = tuple[Tensor, Tensor, Tensor]  # images, labels, positions in the split
Ids = str | Sequence[str]


class NonFiniteLoss(KlasError):
    """A training step's loss was nan or inf (the step was not applied)."""

    def __init__(self, value: float, ids: Ids) -> None:
        self.value, self.ids = value, ids
        super().__init__(f"loss became {value} on {ids}")


@dataclass(frozen=True)
class Objective:
    """What a step minimises for one network: ``weights`` of the terms ``ce`` / ``distill`` / ``ffm`` /
    ``lfm`` (:func:`klas.train.losses.parse_loss`), the distillation ``temperature``, and ``targets``: per
    model name, its own ``"logits"`` / ``"features"`` on every training image (rows indexed by the
    batch's positions; :func:`teacher_targets`). A network's target is the model whose head it ends in;
    ``ffm`` matches the target's features, ``distill`` the logits of ``teacher`` (None: the target's).
    ``lfm`` needs no stored targets: the target's representation at the stitch point is computed on
    the same batch (:func:`klas.train.forward.match_needs`) and passed in as ``target_rep``."""

    weights: Mapping[str, float]
    temperature: float = 1.0
    targets: Mapping[str, Mapping[str, Tensor]] = field(default_factory=dict)
    teacher: str | None = None

    @property
    def wants_features(self) -> bool:
        return needs_teacher(self.weights)[1]

    @property
    def wants_match(self) -> bool:
        """Whether steps must compute each stitch's output and its target's representation (``lfm``)."""
        return needs_match(self.weights)

    @property
    def trains_anchors(self) -> bool:
        """Whether an anchor sampled as a route has anything to learn (not under ``lfm`` alone)."""
        return trains_anchors(self.weights)

    def __call__(self, logits: Tensor, features: Tensor | None, labels: Tensor, positions: Tensor, target: str,
                 stitched: Tensor | None = None, target_rep: Tensor | None = None) -> Tensor:
        t, teacher = self.targets.get(target, {}), self.targets.get(self.teacher or target, {})
        dev = logits.device
        total, _ = stitch_loss(self.weights, logits, labels, features,
                               teacher["logits"][positions].to(dev) if "logits" in teacher else None,
                               t["features"][positions].to(dev) if "features" in t else None, self.temperature,
                               stitched, target_rep)
        return total

    def of(self, out: Outputs, labels: Tensor, positions: Tensor, target: str) -> Tensor:
        """The loss of one network's :class:`~klas.train.forward.Outputs`."""
        return self(out.logits, out.features, labels, positions, target, out.stitched, out.target_rep)


@torch.no_grad()
def teacher_targets(net: StitchNet, data: SplitData, names: Sequence[str], weights: Mapping[str, float], *,
                    batch_size: int, device: torch.device, amp_dtype=None) -> dict[str, dict[str, Tensor]]:
    """Each named model's own logits / pre-logits features (as ``weights`` need them) on every image
    of ``data``, with its current weights, as float32 on the CPU."""
    want_logits, want_feats = needs_teacher(weights)
    names = list(names) if (want_logits or want_feats) else []
    out: dict[str, dict[str, Tensor]] = {n: {} for n in names}
    if not names:
        return out
    for x, _, p in data.batches(range(data.n), batch_size, device):
        for n in names:
            a = net.adapter(n)
            with autocast(device, amp_dtype):
                h = a.run_blocks(a.stem(x))
                parts = {}
                if want_logits:
                    parts["logits"] = a.head(h)
                if want_feats:
                    parts["features"] = a.pre_logits(h)
            for k, v in parts.items():
                if k not in out[n]:
                    out[n][k] = torch.empty((data.n, v.shape[1]), dtype=torch.float32)
                out[n][k][p] = v.float().cpu()
    return out


def make_optimizer(net: StitchNet, lr: float, weight_decay: float, *, full_tune: bool = False,
                   anchor_lr_scale: float = 0.1) -> torch.optim.AdamW:
    """AdamW over the stitch layers (and, with ``full_tune``, the anchors at ``anchor_lr_scale`` x ``lr``,
    their parameters switched to trainable); decay on matrices only (:func:`klas.optim.param_groups`),
    not on a bridge's learned prefix tokens (like timm's cls/register tokens)."""
    tokens = {n for n, _ in net.stitch_layers.named_parameters() if n.endswith("bridge.extra")}
    groups = param_groups(net.stitch_layers, lr, weight_decay, skip=tokens, name="stitch")
    if full_tune:
        for p in net.anchors.parameters():
            p.requires_grad_(True)
        groups += param_groups(net.anchors, lr * anchor_lr_scale, weight_decay, name="anchor")
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))


def init_stitches(net: StitchNet, data: SplitData, *, images: int, ridge: float, seed: int, batch_size: int,
                  device: torch.device) -> dict[str, float]:
    """Least-squares init of every stitch layer on ``images`` seeded images of ``data`` (the same
    images for the same seed); returns each stitch's R² (:func:`klas.stitch.init.least_squares_init`)."""
    g = torch.Generator().manual_seed(epoch_seed(seed, 0, 2))
    pos = torch.randperm(data.n, generator=g)[: min(images, data.n)].sort().values
    reports = least_squares_init(net, (x for x, _, _ in data.batches(pos, batch_size, device)), ridge=ridge)
    return {k: v.r2 for k, v in reports.items()}


def largest_anchor(net: StitchNet) -> str:
    """The anchor with the most MACs (the first listed on a tie): the ``teacher="largest"`` model."""
    return max(net.anchor_names, key=net.macs)


def sampled_routes(stitch_ids: Sequence[str], buckets: Sequence[int],
                   anchors: Sequence[str] = ()) -> tuple[list[str], list[int]]:
    """The networks steps sample from and their buckets: the stitches, then the ``anchors`` (SN-Net
    samples anchors as routes too), each anchor a bucket of its own after the stitches' buckets."""
    top = max(buckets, default=-1)
    return list(stitch_ids) + list(anchors), list(buckets) + [top + 1 + k for k in range(len(anchors))]


def stitch_sequence(n: int, steps: int, sampling: str, buckets: Sequence[int], seed: int, epoch: int) -> list[int]:
    """Which network each step of an epoch trains (indices 0..n-1), from (seed, epoch) only:
    ``uniform`` over the n, or ``bucket``: a bucket uniformly, then a member of it (SN-Netv2)."""
    g = torch.Generator().manual_seed(epoch_seed(seed, epoch, 1))
    if sampling == "uniform":
        return torch.randint(n, (steps,), generator=g).tolist()
    groups: dict[int, list[int]] = {}
    for i, b in enumerate(buckets):
        groups.setdefault(b, []).append(i)
    keys = sorted(groups)
    out = []
    for _ in range(steps):
        members = groups[keys[int(torch.randint(len(keys), (1,), generator=g))]]
        out.append(members[int(torch.randint(len(members), (1,), generator=g))])
    return out


def train_step(net: StitchNet, batch: Batch, ids: Ids, objective: Objective, opt: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler | None = None, *, amp_dtype: torch.dtype | None = None,
               chunk_images: int = 0, sync_grads: Callable[[], None] | None = None) -> float:
    """One optimiser step on ``batch`` for the network ``ids`` (a stitch id or anchor name), or for
    several networks at once (their losses summed; returns the mean). Raises :class:`NonFiniteLoss`
    before the update when the loss is nan or inf. ``sync_grads`` runs between backward and update
    (the all-reduce under torchrun)."""
    x, y, p = batch
    if isinstance(ids, str) and not objective.wants_match:
        model = net.model(ids)
        with autocast(x.device, amp_dtype):
            logits, feats = model.logits_and_features(x) if objective.wants_features else (model(x), None)
        loss = objective(logits, feats, y, p, target_of(net, ids))
        _backward(loss, scaler, ids)
        value = float(loss.detach())
    else:
        value = _grouped_backward(net, x, y, p, [ids] if isinstance(ids, str) else list(ids), objective, scaler,
                                  amp_dtype, chunk_images)
    if sync_grads is not None:
        sync_grads()
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return value


def _backward(loss: Tensor, scaler, ids: Ids, retain: bool = False) -> None:
    if not torch.isfinite(loss):
        raise NonFiniteLoss(float(loss), ids)
    if loss.requires_grad:  # not: an anchor under lfm alone has no term (nothing to learn)
        (scaler.scale(loss) if scaler is not None else loss).backward(retain_graph=retain)


def _grouped_backward(net: StitchNet, x: Tensor, y: Tensor, p: Tensor, ids: list[str], objective: Objective,
                      scaler, amp_dtype, chunk_images: int) -> float:
    """Backward of every listed network on one batch, anchor prefixes shared; one backward per group."""
    through_anchors = any(q.requires_grad for q in net.anchors.parameters())
    match = objective.wants_match
    needs = needs_of([(net, ids)])
    for name, cuts in (match_needs(net, ids) if match else {}).items():
        needs.setdefault(name, set()).update(cuts)
    with torch.set_grad_enabled(through_anchors), autocast(x.device, amp_dtype):
        reps = net.representations(x, needs)
    feats = objective.wants_features
    total = 0.0
    anchors = [i for i in ids if net.is_anchor(i)]
    groups = target_groups(net, [i for i in ids if not net.is_anchor(i)], chunk_images, len(y))
    for k, unit in enumerate([[a] for a in anchors] + groups):
        with autocast(x.device, amp_dtype):
            if isinstance(unit, list):
                outs = [anchor_outputs(net, unit[0], reps, feats)]
                targets = unit
            else:
                outs = group_outputs(net, unit, reps, feats, match)
                targets = [unit[0]] * len(outs)
        loss = sum(objective.of(o, y, p, t) for o, t in zip(outs, targets))
        _backward(loss, scaler, ids, retain=through_anchors and k < len(anchors) + len(groups) - 1)
        total += float(loss.detach())
    return total / len(ids)


def fit(net: StitchNet, data: SplitData, sequence: Sequence[Ids], objective: Objective, opt: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler | None = None, *, positions: Tensor, batch_size: int, device: torch.device,
        schedule: Callable[[int], float] | None = None, start_step: int = 0, amp_dtype: torch.dtype | None = None,
        chunk_images: int = 0, sync_grads: Callable[[], None] | None = None,
        on_step: Callable[[int, Ids, float], None] | None = None) -> list[float]:
    """``len(sequence)`` steps: step k trains ``sequence[k]`` (see :func:`train_step`) on the k-th batch
    of ``positions`` with every group's lr at ``base_lr * schedule(start_step + k)``; returns each
    step's loss. ``on_step(k, ids, loss)`` is called after every step. The net is in train mode
    meanwhile and back in its previous mode after."""
    was_training = net.training
    net.train()
    batches: Iterator[Batch] = data.batches(positions, batch_size, device)
    losses = []
    for k, ids in enumerate(sequence):
        if schedule is not None:
            set_lr(opt, schedule(start_step + k))
        losses.append(train_step(net, next(batches), ids, objective, opt, scaler, amp_dtype=amp_dtype,
                                 chunk_images=chunk_images, sync_grads=sync_grads))
        if on_step is not None:
            on_step(k, ids, losses[-1])
    net.train(was_training)
    return losses


__all__ = ["Batch", "NonFiniteLoss", "Objective", "fit", "init_stitches", "largest_anchor", "make_optimizer",
           "sampled_routes", "stitch_sequence", "teacher_targets", "train_step"]
