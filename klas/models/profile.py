"""Per-representation shapes and per-block cost of an adapted model, measured once.

Costs are MACs (multiply-accumulates). klas shows them as "GFLOPs" in the convention of the
stitching literature and fvcore, where one multiply-add counts as one FLOP; torch's FlopCounterMode
counts two FLOPs per multiply-add, so its totals are halved here. Like fvcore, klas counts the
matmuls and convolutions (attention's ``q @ k^T`` and ``attn @ v`` included), not biases,
activations or softmax; unlike fvcore, not LayerNorm either (fvcore adds 5 per element of an affine
LayerNorm: 0.1-0.4 % of a DeiT, the whole of the gap to the published DeiT figures).

The count must not depend on the device a model lives on. Attention is where it could: torch picks
a fused kernel per device (``_scaled_dot_product_flash_attention_for_cpu`` on CPU, flash /
efficient / cuDNN on CUDA, ...), and torch's flop counter knows formulas for only some of them; an
unknown kernel silently counts as zero. :func:`count_macs` therefore

1. forces the math attention backend and turns off ``nn.MultiheadAttention``'s fused fast path,
   so attention runs as two ordinary batched matmuls on every backend that honours the switch
   (CPU, CUDA and the meta device all do), which the counter sees like any other matmul;
2. gives the counter the same formula (``B*H*L*S*(E + Ev)`` MACs) for the fused kernels it lacks,
   for backends that run one anyway (MPS's math kernel, out-of-tree "overrideable" backends);
3. refuses, with an error, a count during which any other attention kernel ran, rather than
   return a figure with its attention left out.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from klas.errors import KlasError
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
    class_token: bool = False  # prefix token 0 is a class token (the others: register / distillation)

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
        # caches written before ``class_token`` was recorded held only ViTs whose prefix starts with cls
        return cls(**{"class_token": d.get("num_prefix", 0) > 0, **d, "grid": tuple(d["grid"])})


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


def _sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """torch-convention FLOPs (2 per multiply-add) of one fused attention call on shapes
    ``query (..., L, E)``, ``key (..., S, E)``, ``value (..., S, Ev)``: ``q @ k^T`` and ``attn @ v``.
    Grouped-query attention (fewer key/value heads) costs the same per query head."""
    *batch, length, e = query
    source, ev = key[-2], value[-1]
    return 2 * math.prod(batch) * length * source * (e + ev)


# Fused attention kernels torch's flop counter has no formula for (torch 2.14: these three); each
# takes (query, key, value, ...) in the (B, heads, tokens, dim) layout. Read with getattr so a
# torch without one of them still imports.
FUSED_ATTENTION_FLOPS = {
    op: _sdpa_flops
    for op in (
        getattr(torch.ops.aten, name, None)
        for name in (
            "_scaled_dot_product_flash_attention_for_cpu",
            "_scaled_dot_product_fused_attention_overrideable",
            "_scaled_dot_product_attention_math_for_mps",
        )
    )
    if op is not None and op not in flop_registry
}


class _AttentionOpsSeen(TorchDispatchMode):
    """Records every op run whose name mentions attention, to catch kernels nobody counts."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "attention" in func.name():
            self.ops.add(getattr(func, "_overloadpacket", func))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _plain_attention() -> Iterator[None]:
    """Math SDPA backend and no ``nn.MultiheadAttention`` fast path, restored on exit."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


@contextlib.contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """No parameter of ``module`` requires grad inside the block; restored on exit.

    torch's flop counter tracks modules by hooking every module input that requires grad. Under
    ``no_grad`` a view of a trainable parameter (SigLIP's attention-pool query,
    ``latent.expand(B, -1, -1)``) requires grad but has no autograd node, and the tracker fails
    ("Expected gradient function to be set"). With nothing requiring grad there is nothing to hook.
    """
    trainable = [p for p in module.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)


def count_macs(fn, *args, plain_attention: bool = True) -> tuple[int, object]:
    """MACs of one call (torch counts 2 FLOPs per multiply-add; fvcore and klas count 1).

    Independent of the device's attention kernels (see the module docstring); ``plain_attention=
    False`` lets the device pick its fused kernel, which the formulas then count (for tests).
    Raises :class:`KlasError` if an attention kernel ran that no formula counts. A module ``fn``
    runs with its parameters frozen (see :func:`_frozen`).
    """
    counter = FlopCounterMode(display=False, custom_mapping=FUSED_ATTENTION_FLOPS)
    seen = _AttentionOpsSeen()
    frozen = _frozen(fn) if isinstance(fn, nn.Module) else contextlib.nullcontext()
    attention = _plain_attention() if plain_attention else contextlib.nullcontext()
    # ``seen`` outside ``counter``: it sees what the counter runs, after the counter has broken
    # composite ops (``scaled_dot_product_attention`` itself, under inference mode) into their parts.
    with frozen, attention, seen, counter:
        out = fn(*args)
    uncounted = sorted(str(op) for op in seen.ops if op not in counter.flop_registry)
    if uncounted:
        raise KlasError(
            f"cannot count the MACs of attention kernel {', '.join(uncounted)} (torch {torch.__version__}); "
            "profile on CPU or CUDA, or report it to klas"
        )
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
    """Run one image through the adapter, counting MACs and reading shapes block by block.

    The counts are the same on every device, the meta device included (see :func:`count_macs`).
    """
    with _frozen(adapter):
        return _profile(adapter, input_size)


def _profile(adapter: Adapter, input_size: tuple[int, int, int]) -> Profile:
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
        reps.append(Rep(len(reps), adapter.layout, int(width), tuple(map(int, grid)), prefix, macs, params,
                        bool(adapter.class_token)))

    macs, h = count_macs(adapter.stem, x)
    record(h, macs, stem_params)
    for i, block in enumerate(adapter.blocks):
        macs, h = count_macs(block, h)
        record(h, macs, block_params[i])
    head_macs, _ = count_macs(adapter.head, h)
    adapter.train(was_training)
    return Profile(tuple(reps), head_macs, head_params, tuple(input_size))
