"""Train one demo model on the digits ``probe-train`` split and measure it on ``eval``, on CPU, seeded.

Plain recipe: the split is preprocessed once into a tensor, then minibatch AdamW with linear warmup and
a cosine decay, cross-entropy with label smoothing, gradient clipping. No augmentation beyond the
digits set's own variants. Same seed, machine and torch thread count => same weights.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import timm
import torch
import torch.nn.functional as F
from rich.progress import Progress, TaskID
from torch import Tensor, nn

from klas.optim import param_groups, warmup_cosine
from klas.utils import seed_everything


@dataclass(frozen=True)
class Recipe:
    """Training hyper-parameters of one zoo model (recorded in zoo.json; changing them retrains)."""

    epochs: int
    batch_size: int = 128
    lr: float = 2e-3  # peak AdamW learning rate
    weight_decay: float = 0.05  # on weights with >= 2 dims only
    warmup_frac: float = 0.1  # share of steps spent warming up linearly from 0
    label_smoothing: float = 0.1
    clip_grad: float = 1.0  # max global grad norm
    seed: int = 0
    augment: float = 0.0  # strength of a random per-image affine warp (0: none; 1: ±3 px, ±10°, scale ±10 %)
    ema: float = 0.0  # decay of an exponential moving average of the weights, kept and saved (0: none)
    max_steps: int | None = None  # cap on optimiser steps (smoke tests); None trains all epochs
    limit: int | None = None  # keep N images of the train and eval splits (smoke tests); None keeps all

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    state_dict: dict[str, Tensor]
    eval_acc: float  # top-1 on the eval split, fraction in [0, 1]
    steps: int
    seconds: float  # wall time: model init, optimisation loop and evaluation


def random_affine(x: Tensor, strength: float, gen: torch.Generator) -> Tensor:
    """A random affine warp per image of x (B, C, H, W): shift up to ``3 * strength`` pixels, rotation up to
    ``10 * strength`` degrees, scale within ``1 ± 0.1 * strength``; borders repeat the edge pixels."""
    b, _, h, _ = x.shape
    u = torch.rand(b, 4, generator=gen) * 2 - 1  # (B, 4) in [-1, 1): angle, scale, shift x, shift y
    angle = u[:, 0] * (10.0 * strength) * torch.pi / 180
    scale = 1.0 + 0.1 * strength * u[:, 1]
    shift = u[:, 2:] * (3.0 * strength) * 2 / h  # pixels -> normalised units
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (B, H, W, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


@torch.inference_mode()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` (put in eval mode) on x (N, C, H, W), y (N,)."""
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += (model(x[i : i + batch_size]).argmax(-1) == y[i : i + batch_size]).sum().item()
    return correct / len(x)


def train_model(
    arch: str,
    train: tuple[Tensor, Tensor],
    evaluation: tuple[Tensor, Tensor],
    recipe: Recipe,
    progress: Progress | None = None,
) -> TrainResult:
    """Train ``arch`` from a seeded random init on ``train`` = (x, y) and report top-1 on ``evaluation``."""
    start = time.perf_counter()
    x, y = train  # (N, 3, 32, 32) float32, (N,) int64
    gen = seed_everything(recipe.seed)
    model = timm.create_model(arch, pretrained=False)
    model.train()
    # decay matrices / kernels only: not biases, norms, the cls token or position embeddings
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    groups = param_groups(model, recipe.lr, recipe.weight_decay, skip=skip)
    opt = torch.optim.AdamW(groups, lr=recipe.lr, betas=(0.9, 0.999), fused=True)
    batch_size = min(recipe.batch_size, len(x))
    steps_per_epoch = len(x) // batch_size  # drop the ragged last batch (BatchNorm, even step cost)
    total = recipe.epochs * steps_per_epoch
    if recipe.max_steps is not None:
        total = min(total, recipe.max_steps)
    warm = max(1, round(recipe.warmup_frac * total))
    ema = torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(recipe.ema), use_buffers=True
    ) if recipe.ema > 0 else None
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: warmup_cosine(step, total, warm))
    task: TaskID | None = None
    if progress is not None:
        task = progress.add_task(arch, total=total, epoch=0, epochs=recipe.epochs, loss=float("nan"))

    step = 0
    for epoch in range(recipe.epochs):
        order = torch.randperm(len(x), generator=gen)
        for b in range(steps_per_epoch):
            if step >= total:
                break
            idx = order[b * batch_size : (b + 1) * batch_size]
            xb = random_affine(x[idx], recipe.augment, gen) if recipe.augment > 0 else x[idx]
            loss = F.cross_entropy(model(xb), y[idx], label_smoothing=recipe.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), recipe.clip_grad)
            opt.step()
            sched.step()
            if ema is not None:
                ema.update_parameters(model)
            step += 1
            if task is not None:
                progress.update(task, advance=1, epoch=epoch + 1, loss=loss.item())
    if ema is not None:
        model = ema.module  # the averaged weights are the model
    eval_acc = accuracy(model, *evaluation)
    if task is not None:
        progress.update(task, description=f"{arch} [green]eval {100 * eval_acc:.1f}%")
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    return TrainResult(state, eval_acc, step, time.perf_counter() - start)
