"""Per-representation shapes and per-block cost of an adapted model, measured once.

Costs are MACs (multiply-accumulates). klas shows them as "GFLOPs" in the convention of the
stitching literature and fvcore, where one multiply-add counts as one FLOP; torch's FlopCounterMode
counts two FLOPs per multiply-add, so its totals are halved here.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from klas.models.adapters import Adapter


@dataclass(frozen=True)
class Rep:
    """Representation ``index`` of a model: 0 is the stem output, r > 0 the output of block r-1."""

    index: int
    layout: str  # "tokens" (B, prefix + H*W, D) | "nhwc" (B, H, W, C) | "nchw" (B, C, H, W)
    width: int  # D or C
    grid: tuple[int, int]  # spatial grid (H, W) of the tokens / feature map
    num_prefix: int  # cls/dist tokens in front of the patch tokens (token layout only)
    macs: int  # MACs of the module producing it (stem for index 0, block index-1 otherwise)
    params: int  # parameters of that module

    @property
    def tokens(self) -> int:
        """Positions a per-token stitch layer is applied at."""
        return self.grid[0] * self.grid[1] + self.num_prefix

    def compatible(self, other: "Rep") -> bool:
        """Whether a stitch layer can map this representation onto ``other``'s shape."""
        return (self.layout, self.grid, self.num_prefix) == (other.layout, other.grid, other.num_prefix)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Rep":
        return cls(**{**d, "grid": tuple(d["grid"])})


@dataclass(frozen=True)
class Profile:
    """Shapes and costs of one model: ``reps[0..n]``, plus the head."""

    reps: tuple[Rep, ...]
    head_macs: int
    head_params: int
    input_size: tuple[int, int, int]

    @property
    def num_blocks(self) -> int:
        return len(self.reps) - 1

    @property
    def macs(self) -> int:
        return sum(r.macs for r in self.reps) + self.head_macs

    @property
    def params(self) -> int:
        return sum(r.params for r in self.reps) + self.head_params

    def prefix_macs(self, cut: int) -> int:
        """MACs of the stem and blocks 0..cut-1 (representation ``cut`` is their output)."""
        return sum(r.macs for r in self.reps[: cut + 1])

    def suffix_macs(self, cut: int) -> int:
        """MACs of blocks cut..n-1 and the head (what runs after representation ``cut``)."""
        return sum(r.macs for r in self.reps[cut + 1 :]) + self.head_macs

    def prefix_params(self, cut: int) -> int:
        return sum(r.params for r in self.reps[: cut + 1])

    def suffix_params(self, cut: int) -> int:
        return sum(r.params for r in self.reps[cut + 1 :]) + self.head_params

    def to_json(self) -> dict:
        return {
            "reps": [r.to_json() for r in self.reps],
            "head_macs": self.head_macs,
            "head_params": self.head_params,
            "input_size": list(self.input_size),
        }

    @classmethod
    def from_json(cls, d: dict) -> "Profile":
        return cls(
            reps=tuple(Rep.from_json(r) for r in d["reps"]),
            head_macs=int(d["head_macs"]),
            head_params=int(d["head_params"]),
            input_size=tuple(d["input_size"]),
        )


def count_macs(fn, *args) -> tuple[int, object]:
    """MACs of one call (torch counts 2 FLOPs per multiply-add; fvcore and klas count 1)."""
    with FlopCounterMode(display=False) as counter:
        out = fn(*args)
    return counter.get_total_flops() // 2, out


def _numel(modules: list[nn.Module]) -> int:
    seen: set[int] = set()
    total = 0
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


@torch.no_grad()
def profile_adapter(adapter: Adapter, input_size: tuple[int, int, int]) -> Profile:
    """Run one image through the adapter, counting MACs and reading shapes block by block."""
    device = next(adapter.parameters()).device
    x = torch.zeros(1, *input_size, device=device)
    was_training = adapter.training
    adapter.eval()
    block_params = [_numel([b]) for b in adapter.blocks]
    head_params = _numel(adapter.head_modules())
    stem_params = _numel([adapter]) - sum(block_params) - head_params

    reps: list[Rep] = []

    def record(h: Tensor, macs: int, params: int) -> None:
        width, grid, prefix = adapter.shape_of(h)
        reps.append(Rep(len(reps), adapter.layout, int(width), tuple(map(int, grid)), prefix, macs, params))

    macs, h = count_macs(adapter.stem, x)
    record(h, macs, stem_params)
    for i, block in enumerate(adapter.blocks):
        macs, h = count_macs(block, h)
        record(h, macs, block_params[i])
    head_macs, _ = count_macs(adapter.head, h)
    adapter.train(was_training)
    return Profile(tuple(reps), head_macs, head_params, tuple(input_size))
