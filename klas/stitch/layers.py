"""Stitch layers: the small trainable maps that carry one model's representation into another's.

Three kinds, applied independently at every position (token or pixel) of a representation:

* ``linear``: one affine map ``y = W x + b`` (for NCHW feature maps this is a 1x1 convolution; it is
  computed as a Linear on the channel dimension, which gives the same numbers and the same MACs),
* ``mlp``: ``Linear(in, out) -> ReLU -> Linear(out, out)``, hidden width = target width (Mai et al.),
* ``lora``: ``y = W0 x + b + B A x`` with ``W0`` frozen (the least-squares fit) and a trainable
  low-rank update ``B A`` of rank ``r = min(LORA_RANK, in, out)``, ``B`` starting at zero (SN-Netv2).
  It runs unmerged (what is trained is what is evaluated and exported), so it costs
  ``in*out + r*(in+out)`` MACs per position.

Costs follow fvcore: a Linear of ``in x out`` applied at ``T`` positions is ``T * in * out`` MACs;
biases and the ReLU are not counted.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from klas.config import STITCH_KINDS  # re-exported
from klas.errors import KlasError

StitchKind = Literal["linear", "mlp", "lora"]
#: Rank of a ``lora`` stitch's update (capped by its widths). SN-Netv2 uses 64 for DeiT-scale widths
#: (384-1024); the demo's widths are 32-128, so a proportionally smaller rank.
LORA_RANK = 8
LAYOUTS: tuple[str, ...] = ("tokens", "nhwc", "nchw")


def _check(kind: str, in_width: int, out_width: int, layout: str) -> None:
    if kind not in STITCH_KINDS:
        raise KlasError(f"unknown stitch layer kind {kind!r}; use one of {', '.join(STITCH_KINDS)}")
    if layout not in LAYOUTS:
        raise KlasError(f"unknown representation layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if in_width < 1 or out_width < 1:
        raise KlasError(f"stitch layer widths must be positive, got {in_width} -> {out_width}")


class _ChannelMap(nn.Module):
    """Base: applies ``_map`` to the channel dimension of any layout."""

    kind: str = ""

    def __init__(self, in_width: int, out_width: int, layout: str) -> None:
        super().__init__()
        self.in_width = int(in_width)
        self.out_width = int(out_width)
        self.layout = layout

    def _map(self, h: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, h: Tensor) -> Tensor:
        if self.layout == "nchw":  # (B, C, H, W): channels last, map, channels first again
            return self._map(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).contiguous()
        return self._map(h)  # tokens (B, T, C) and NHWC (B, H, W, C) carry channels last already

    def extra_repr(self) -> str:
        return f"{self.in_width} -> {self.out_width}, layout={self.layout}"


class LinearStitch(_ChannelMap):
    """``y = W x + b`` at every position."""

    kind = "linear"

    def __init__(self, in_width: int, out_width: int, layout: str) -> None:
        super().__init__(in_width, out_width, layout)
        self.proj = nn.Linear(in_width, out_width)

    def _map(self, h: Tensor) -> Tensor:
        return self.proj(h)

    @torch.no_grad()
    def set_affine(self, weight: Tensor, bias: Tensor) -> None:
        """Set ``W`` (out, in) and ``b`` (out,), e.g. from a least-squares fit."""
        self.proj.weight.copy_(weight)
        self.proj.bias.copy_(bias)


class MLPStitch(_ChannelMap):
    """``fc2(relu(fc1(x)))`` at every position, hidden width = ``out_width``."""

    kind = "mlp"

    def __init__(self, in_width: int, out_width: int, layout: str) -> None:
        super().__init__(in_width, out_width, layout)
        self.fc1 = nn.Linear(in_width, out_width)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(out_width, out_width)

    def _map(self, h: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(h)))

    @torch.no_grad()
    def set_affine(self, weight: Tensor, bias: Tensor, shift: Tensor) -> None:
        """Make the MLP reproduce ``W x + b`` wherever ``W x + b > -shift``.

        ``fc1 = (W, b + shift)``, ``fc2 = (I, -shift)``: the ReLU passes every pre-activation that the
        shift keeps positive, so the MLP equals the affine map there (see :mod:`klas.stitch.init`).
        """
        self.fc1.weight.copy_(weight)
        self.fc1.bias.copy_(bias + shift)
        self.fc2.weight.copy_(torch.eye(self.out_width, dtype=weight.dtype))
        self.fc2.bias.copy_(-shift)


class LoRAStitch(_ChannelMap):
    """``proj(x) + up(down(x))``: ``proj`` frozen (set by the least-squares fit), ``down`` (rank x in,
    random) and ``up`` (out x rank, zero) trainable, so training starts exactly at ``proj``."""

    kind = "lora"

    def __init__(self, in_width: int, out_width: int, layout: str) -> None:
        super().__init__(in_width, out_width, layout)
        self.rank = lora_rank(in_width, out_width)
        self.proj = nn.Linear(in_width, out_width)
        self.proj.weight.requires_grad_(False)
        self.down = nn.Linear(in_width, self.rank, bias=False)
        self.up = nn.Linear(self.rank, out_width, bias=False)
        nn.init.zeros_(self.up.weight)

    def _map(self, h: Tensor) -> Tensor:
        return self.proj(h) + self.up(self.down(h))

    @torch.no_grad()
    def set_affine(self, weight: Tensor, bias: Tensor) -> None:
        """Set the frozen ``W0`` and the bias (trainable), and reset the update to zero."""
        self.proj.weight.copy_(weight)
        self.proj.bias.copy_(bias)
        self.up.weight.zero_()


_LAYERS = {"linear": LinearStitch, "mlp": MLPStitch, "lora": LoRAStitch}


def lora_rank(in_width: int, out_width: int) -> int:
    """The rank of a ``lora`` stitch between these widths: ``min(LORA_RANK, in, out)``."""
    return min(LORA_RANK, int(in_width), int(out_width))


def make_stitch_layer(kind: str, in_width: int, out_width: int, layout: str) -> nn.Module:
    """A fresh stitch layer mapping ``in_width`` channels to ``out_width`` in the given layout."""
    _check(kind, in_width, out_width, layout)
    return _LAYERS[kind](int(in_width), int(out_width), layout)


def stitch_layer_macs(kind: str, in_width: int, out_width: int, positions: int) -> int:
    """MACs of one stitch layer applied at ``positions`` positions (fvcore: biases, ReLU not counted)."""
    _check(kind, in_width, out_width, "tokens")
    extra = {"linear": 0, "mlp": out_width * out_width,
             "lora": lora_rank(in_width, out_width) * (in_width + out_width)}[kind]
    return int(positions) * (in_width * out_width + extra)


def stitch_layer_params(kind: str, in_width: int, out_width: int) -> int:
    """Parameters of one stitch layer (weights and biases, frozen ones included)."""
    _check(kind, in_width, out_width, "tokens")
    extra = {"linear": 0, "mlp": out_width * out_width + out_width,
             "lora": lora_rank(in_width, out_width) * (in_width + out_width)}[kind]
    return in_width * out_width + out_width + extra
