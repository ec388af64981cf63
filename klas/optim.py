"""Optimisation helpers shared by every trainer in klas: the learning-rate schedule, AdamW parameter
groups and the mixed-precision vocabulary.

Low level on purpose: imports torch and :mod:`klas.errors` only, so ``klas.train``, ``klas.zoo``,
``klas.probes`` and the benchmarks can all use it.
"""
from __future__ import annotations

import functools
import math
import warnings
from contextlib import nullcontext
from typing import Collection

import torch
from torch import nn

from klas.config import AMP_CHOICES  # the one --amp vocabulary (torch-free), re-exported
from klas.errors import KlasError



def warmup_cosine(step: int, total: int, warmup_steps: int) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based) of ``total``: linear warm-up from
    ``1 / warmup_steps`` to 1 over ``warmup_steps`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup_steps, span) / span))


def warmup_constant(step: int, warmup_steps: int) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based): the linear warm-up of :func:`warmup_cosine`,
    then constant. It does not depend on the run's length, so a shorter run is exactly a prefix of a longer one."""
    return (step + 1) / warmup_steps if step < warmup_steps else 1.0


def warmup_steps_of(fraction: float, total: int) -> int:
    """Warm-up length for a ``fraction`` of ``total`` steps: at least 1 step when ``fraction`` > 0."""
    return max(1, round(fraction * total)) if fraction > 0 else 0


def set_lr(opt: torch.optim.Optimizer, factor: float) -> None:
    """Set every group's learning rate to its ``base_lr`` (see :func:`param_groups`) times ``factor``."""
    for group in opt.param_groups:
        group["lr"] = group["base_lr"] * factor


def param_groups(module: nn.Module, lr: float, weight_decay: float, *, skip: Collection[str] = (),
                 name: str = "params") -> list[dict]:
    """AdamW groups over ``module``'s trainable parameters: weight decay on matrices and kernels
    (``ndim >= 2``) only, not on biases and norms nor on the parameter names in ``skip``.

    Each group carries ``lr`` and ``base_lr`` (what :func:`set_lr` scales) and a ``name``
    (``{name}_decay``, ``{name}_no_decay``); empty groups are left out.
    """
    decay, no_decay = [], []
    for pname, p in module.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and pname not in skip else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "base_lr": lr, "lr": lr, "name": f"{name}_decay"},
        {"params": no_decay, "weight_decay": 0.0, "base_lr": lr, "lr": lr, "name": f"{name}_no_decay"},
    ]
    return [g for g in groups if g["params"]]


#: The explicit ``--amp`` words and the autocast dtypes they name.
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def parse_amp(text: str | None, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype an ``--amp`` word asks for on ``device``; None = full precision.

    ``auto``: on CUDA bf16 where the GPU supports it, else fp16; elsewhere full precision.
    ``bf16`` / ``fp16``: that dtype on any device whose autocast supports it (CUDA;
    the CPU's autocast, where this torch has it), refused in one line otherwise. ``off`` (or None).
    One vocabulary for ``klas cache`` and ``klas train``.
    """
    if text is None:
        return None
    word = str(text).lower()
    if word not in AMP_CHOICES:
        raise KlasError(f"unknown --amp {text!r}; use one of {', '.join(AMP_CHOICES)}")
    if word == "off":
        return None
    kind = torch.device(device).type
    if word == "auto":
        if kind != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if kind != "cuda" and not autocast_supports(kind, AMP_DTYPES[word]):
        raise KlasError(f"--amp {word}: torch {torch.__version__} has no {word} autocast on {kind}; "
                        f"use --amp off there (or a CUDA device)")
    return AMP_DTYPES[word]


@functools.cache
def autocast_supports(device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch's autocast on ``device_type`` computes a matmul in ``dtype`` (tried once, on a 2x2)."""
    available = getattr(torch.amp, "is_autocast_available", None)  # torch >= 2.4
    if available is not None and not available(device_type):
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns, then disables autocast, for a dtype it lacks
            x = torch.ones(2, 2, device=device_type)
            with torch.autocast(device_type, dtype=dtype):
                return (x @ x).dtype == dtype
    except (RuntimeError, ValueError):
        return False


def autocast(device: torch.device, amp_dtype: torch.dtype | None):
    """Mixed precision in ``amp_dtype`` on ``device`` (CUDA or CPU autocast); a no-op context for None."""
    if amp_dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype)


def grad_scaler(device: torch.device, amp_dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """Loss scaling for fp16 training on ``device`` (its range needs it); disabled for bf16 and full precision."""
    return torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)


__all__ = ["AMP_CHOICES", "AMP_DTYPES", "autocast", "autocast_supports", "grad_scaler", "param_groups", "parse_amp", "set_lr",
           "warmup_constant", "warmup_cosine", "warmup_steps_of"]
