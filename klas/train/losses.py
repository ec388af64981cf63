"""Training objectives for stitch layers, combinable with weights: ``"ce"``, ``"ce=1,ffm=0.5"``, ...

* ``ce``: cross-entropy with the labels,
* ``distill``: KL(target model b's softmax || stitched net's softmax) on the same images (label-free;
  b is the stitch's target model with its original weights),
* ``ffm``: final-feature matching (Mai et al.): MSE between the stitched net's pre-logits features and
  b's own pre-logits features on the same images (label-free),
* ``lfm``: local feature matching at the stitch point (Mai et al.'s LFM): MSE between the stitch
  module's output (after the bridge, in b's layout) and b's own representation ``dst_cut`` on the same
  images (label-free). The target representation is a constant (no gradient flows into it). An
  anchor has no stitch point: its ``lfm`` term is absent (it would match itself, 0).
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import Tensor

from klas.errors import KlasError

LOSSES: tuple[str, ...] = ("ce", "distill", "ffm", "lfm")


def parse_loss(text: str | dict, flag: str = "--loss") -> dict[str, float]:
    """``"ce"`` -> ``{"ce": 1.0}``; ``"ce=1,ffm=0.5"`` (or ``+``-separated) -> weights per term.

    Terms with weight 0 are dropped; at least one positive term must remain. ``flag`` names the
    option in error messages.
    """
    if isinstance(text, dict):
        items = [(str(k), v) for k, v in text.items()]
    else:
        parts = [p.strip() for p in re.split(r"[,+]", str(text)) if p.strip()]
        if not parts:
            raise KlasError(f"empty {flag} {text!r}; use e.g. ce, distill, ffm, lfm or ce=1,ffm=0.5")
        items = []
        for part in parts:
            name, sep, weight = part.partition("=")
            items.append((name.strip(), weight.strip() if sep else 1.0))
    out: dict[str, float] = {}
    for name, weight in items:
        if name not in LOSSES:
            raise KlasError(f"unknown loss {name!r} in {flag} {text!r}; use {', '.join(LOSSES)} (e.g. ce=1,ffm=0.5)")
        if name in out:
            raise KlasError(f"loss {name!r} given twice in {flag} {text!r}")
        try:
            w = float(weight)
        except (TypeError, ValueError):
            raise KlasError(f"loss weight {weight!r} for {name} is not a number; write e.g. {name}=0.5") from None
        if not (w >= 0 and math.isfinite(w)):
            raise KlasError(f"loss weight for {name} must be a non-negative number, got {weight!r}")
        if w > 0:
            out[name] = w
    if not out:
        raise KlasError(f"{flag} {text!r} has no positive weight; give at least one term a weight above 0")
    return out


def loss_string(weights: dict[str, float]) -> str:
    """The canonical spelling of parsed weights (``ce=1,ffm=0.5``)."""
    return ",".join(f"{k}={weights[k]:g}" for k in LOSSES if k in weights)


def needs_teacher(weights: dict[str, float]) -> tuple[bool, bool]:
    """(needs b's logits, needs b's pre-logits features)."""
    return "distill" in weights, "ffm" in weights


def needs_match(weights: dict[str, float]) -> bool:
    """Whether the loss reads the stitch output and the target's representation at the stitch point (``lfm``)."""
    return "lfm" in weights


def trains_anchors(weights: dict[str, float]) -> bool:
    """Whether the loss has a term for an anchor (every term but ``lfm``, which an anchor lacks)."""
    return any(k != "lfm" for k in weights)


def stitch_loss(
    weights: dict[str, float],
    logits: Tensor,
    labels: Tensor | None = None,
    features: Tensor | None = None,
    teacher_logits: Tensor | None = None,
    teacher_features: Tensor | None = None,
    temperature: float = 1.0,
    stitched: Tensor | None = None,
    target_rep: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Weighted sum of the requested terms (float32), and each term's value for display.

    ``stitched`` / ``target_rep``: the stitch module's output and the target's representation at the
    stitch point (``lfm``; both None for an anchor, which then has no ``lfm`` term)."""
    total = logits.new_zeros((), dtype=torch.float32)
    parts: dict[str, float] = {}
    logits = logits.float()
    if "ce" in weights:
        term = F.cross_entropy(logits, labels)
        total = total + weights["ce"] * term
        parts["ce"] = float(term.detach())
    if "distill" in weights:
        t = temperature
        term = F.kl_div(F.log_softmax(logits / t, dim=1), F.log_softmax(teacher_logits.float() / t, dim=1),
                        reduction="batchmean", log_target=True) * (t * t)
        total = total + weights["distill"] * term
        parts["distill"] = float(term.detach())
    if "ffm" in weights:
        term = F.mse_loss(features.float(), teacher_features.float())
        total = total + weights["ffm"] * term
        parts["ffm"] = float(term.detach())
    if "lfm" in weights and stitched is not None:
        term = F.mse_loss(stitched.float(), target_rep.detach().float())
        total = total + weights["lfm"] * term
        parts["lfm"] = float(term.detach())
    return total, parts
