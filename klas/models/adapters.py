"""Split a timm model into stem -> blocks -> head, one adapter class per architecture family.

Every adapter exposes the same contract, which stitching is built on:

* ``stem(x)`` maps images ``(B, 3, H, W)`` to the first representation,
* ``run_blocks(h, start, stop)`` applies blocks ``start .. stop-1``,
* ``head(h)`` maps the last representation to logits and ``pre_logits(h)`` to the features the
  classifier sees,

so that ``head(run_blocks(stem(x), 0, n)) == model(x)``. *Representation* ``r`` is the stem output
for ``r = 0`` and the output of block ``r - 1`` otherwise; a model with ``n`` blocks has ``n + 1``.

For hierarchical models (Swin, ConvNeXt) timm keeps a stage's downsampling layer outside its blocks;
the adapter folds it into the stage's first block, so that every block boundary is a place where a
stitch can go and every representation has one fixed grid.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from klas.errors import KlasError

Layout = Literal["tokens", "nhwc", "nchw"]


class _Chain(nn.Module):
    """Two modules in sequence; used to fold a stage's downsample into its first block."""

    def __init__(self, first: nn.Module, second: nn.Module) -> None:
        super().__init__()
        self.first = first
        self.second = second

    def forward(self, x: Tensor) -> Tensor:
        return self.second(self.first(x))


def _fold_downsamples(stages) -> list[nn.Module]:
    """The blocks of timm stages that each hold ``downsample`` + ``blocks``, the downsample folded into
    its stage's first block (so every block boundary is a representation of one shape)."""
    blocks: list[nn.Module] = []
    for stage in stages:
        inner = list(stage.blocks)
        blocks.append(_Chain(stage.downsample, inner[0]))
        blocks.extend(inner[1:])
    return blocks


def _as_channels(values: Sequence[float]) -> Tensor:
    """A per-channel constant (3 floats) as a float32 (1, C, 1, 1) tensor."""
    return torch.tensor([float(v) for v in values], dtype=torch.float32).view(1, -1, 1, 1)


class Adapter(nn.Module):
    """A timm model seen as stem -> blocks -> head. Subclasses fill in one architecture family."""

    family: ClassVar[str] = ""
    layout: ClassVar[Layout] = "nchw"

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        # A plain list, not an nn.ModuleList: the blocks already live inside ``self.model`` and a
        # second registration would duplicate every key in state_dict().
        self._blocks: list[nn.Module] = self._split_blocks()
        self._input_affine: tuple[Tensor, Tensor] | None = None  # see set_input_norm
        self.input_norm: dict | None = None
        self.train(model.training)  # a fresh nn.Module starts in training mode; follow the model's

    # -- what each family provides -------------------------------------------------------------
    def _split_blocks(self) -> list[nn.Module]:
        raise NotImplementedError

    def _stem(self, x: Tensor) -> Tensor:
        """Images (B, 3, H, W), normalised for this model -> representation 0."""
        raise NotImplementedError

    def head(self, h: Tensor) -> Tensor:
        """Last representation -> logits (B, num_classes)."""
        raise NotImplementedError

    def pre_logits(self, h: Tensor) -> Tensor:
        """Last representation -> the pooled, normalised features the classifier reads (B, D)."""
        raise NotImplementedError

    def pool(self, h: Tensor) -> dict[str, Tensor]:
        """A representation -> named pooled vectors, each (B, width)."""
        raise NotImplementedError

    def head_modules(self) -> list[nn.Module]:
        """The modules ``head`` runs (for parameter accounting and export)."""
        raise NotImplementedError

    def shared_modules(self) -> list[nn.Module]:
        """Modules outside the blocks that every block also reads (Eva's rotary position embedding):
        a network that runs only the model's later blocks still needs them."""
        return []

    # -- input normalisation --------------------------------------------------------------------
    def stem(self, x: Tensor) -> Tensor:
        """Images (B, 3, H, W) -> representation 0.

        The images are normalised as :meth:`set_input_norm` says (by default: already normalised the
        way this model expects); a per-channel affine map converts them to this model's own
        normalisation first. The map is element-wise: it costs no MACs.
        """
        if self._input_affine is not None:
            scale, shift = self._input_affine
            x = x * scale.to(x.dtype) + shift.to(x.dtype)
        return self._stem(x)

    def set_input_norm(self, given: tuple[Sequence[float], Sequence[float]],
                       own: tuple[Sequence[float], Sequence[float]]) -> None:
        """Inputs arrive normalised with ``given = (mean, std)``; this model wants ``own = (mean, std)``.

        ``(x * s_g + m_g - m_o) / s_o``, per channel; nothing at all when the two agree.
        """
        (gm, gs), (om, os_) = (tuple(map(_as_channels, pair)) for pair in (given, own))
        if torch.equal(gm, om) and torch.equal(gs, os_):
            self._input_affine = None
            self.input_norm = None
            return
        device = next(self.model.parameters()).device
        self._input_affine = ((gs / os_).to(device), ((gm - om) / os_).to(device))
        self.input_norm = {"given": {"mean": given[0], "std": given[1]}, "own": {"mean": own[0], "std": own[1]}}

    def _apply(self, fn, recurse=True):  # .to() / .cuda() move the conversion with the model
        out = super()._apply(fn, recurse)
        if self._input_affine is not None:
            self._input_affine = tuple(fn(t) for t in self._input_affine)
        return out

    # -- shared ---------------------------------------------------------------------------------
    @property
    def blocks(self) -> list[nn.Module]:
        return self._blocks

    @property
    def num_blocks(self) -> int:
        return len(self._blocks)

    @property
    def pool_names(self) -> tuple[str, ...]:
        return ("avg",)

    @property
    def num_classes(self) -> int:
        return int(self.model.num_classes)

    @property
    def class_token(self) -> bool:
        """Whether prefix token 0 of every representation is a class token (token layout only)."""
        return False

    def run_blocks(self, h: Tensor, start: int = 0, stop: int | None = None) -> Tensor:
        """Apply blocks ``start .. stop-1`` (``stop=None``: to the end)."""
        for block in self._blocks[start:stop]:
            h = block(h)
        return h

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.run_blocks(self.stem(x)))

    def shape_of(self, h: Tensor) -> tuple[int, tuple[int, int], int]:
        """(width, (grid_h, grid_w), num_prefix_tokens) of a representation tensor."""
        if self.layout == "nchw":
            return h.shape[1], (h.shape[2], h.shape[3]), 0
        if self.layout == "nhwc":
            return h.shape[3], (h.shape[1], h.shape[2]), 0
        raise NotImplementedError


class ViTAdapter(Adapter):
    """Plain ViTs: ViT, DeiT (incl. distilled), DeiT3. Tokens (B, prefix + H*W, D), cls token kept."""

    family = "vit"
    layout = "tokens"

    def _split_blocks(self) -> list[nn.Module]:
        return list(self.model.blocks)

    @property
    def num_prefix(self) -> int:
        return int(self.model.num_prefix_tokens)

    @property
    def class_token(self) -> bool:
        return getattr(self.model, "cls_token", None) is not None

    @property
    def pool_names(self) -> tuple[str, ...]:
        return ("cls", "mean") if self.num_prefix else ("mean",)

    def _stem(self, x: Tensor) -> Tensor:
        m = self.model
        x = m.patch_embed(x)
        x = m._pos_embed(x)
        x = m.patch_drop(x)
        return m.norm_pre(x)

    def head(self, h: Tensor) -> Tensor:
        return self.model.forward_head(self.model.norm(h))

    def pre_logits(self, h: Tensor) -> Tensor:
        return self.model.forward_head(self.model.norm(h), pre_logits=True)

    def head_modules(self) -> list[nn.Module]:
        m = self.model
        pool = [m.attn_pool] if getattr(m, "attn_pool", None) is not None else []  # SigLIP's attention pool
        return [m.norm, *pool, m.fc_norm, m.head] + ([m.head_dist] if hasattr(m, "head_dist") else [])

    def pool(self, h: Tensor) -> dict[str, Tensor]:
        p = self.num_prefix
        out = {"cls": h[:, 0]} if p else {}
        out["mean"] = h[:, p:].mean(dim=1)
        return out

    def shape_of(self, h: Tensor) -> tuple[int, tuple[int, int], int]:
        grid = tuple(int(g) for g in self.model.patch_embed.grid_size)
        return h.shape[2], grid, self.num_prefix


class SwinAdapter(Adapter):
    """Swin Transformer (v1). timm keeps NHWC tensors (B, H, W, C) between blocks."""

    family = "swin"
    layout = "nhwc"

    def _split_blocks(self) -> list[nn.Module]:
        return _fold_downsamples(self.model.layers)

    def _stem(self, x: Tensor) -> Tensor:
        x = self.model.patch_embed(x)
        pos = getattr(self.model, "absolute_pos_embed", None)
        return x if pos is None else x + pos

    def head(self, h: Tensor) -> Tensor:
        return self.model.forward_head(self.model.norm(h))

    def pre_logits(self, h: Tensor) -> Tensor:
        return self.model.forward_head(self.model.norm(h), pre_logits=True)

    def head_modules(self) -> list[nn.Module]:
        return [self.model.norm, self.model.head]

    def pool(self, h: Tensor) -> dict[str, Tensor]:
        return {"avg": h.mean(dim=(1, 2))}


class ResNetAdapter(Adapter):
    """timm ResNets (ResNet-18/50, ...). NCHW; every residual block of layer1..layer4 is a block."""

    family = "resnet"
    layout = "nchw"

    def _split_blocks(self) -> list[nn.Module]:
        m = self.model
        return [blk for layer in (m.layer1, m.layer2, m.layer3, m.layer4) for blk in layer]

    def _stem(self, x: Tensor) -> Tensor:
        m = self.model
        return m.maxpool(m.act1(m.bn1(m.conv1(x))))

    def head(self, h: Tensor) -> Tensor:
        return self.model.forward_head(h)

    def pre_logits(self, h: Tensor) -> Tensor:
        return self.model.forward_head(h, pre_logits=True)

    def head_modules(self) -> list[nn.Module]:
        return [self.model.global_pool, self.model.fc]

    def pool(self, h: Tensor) -> dict[str, Tensor]:
        return {"avg": h.mean(dim=(2, 3))}


class ConvNeXtAdapter(Adapter):
    """timm ConvNeXt. NCHW; each stage's downsample is folded into its first block."""

    family = "convnext"
    layout = "nchw"

    def _split_blocks(self) -> list[nn.Module]:
        return _fold_downsamples(self.model.stages)

    def _stem(self, x: Tensor) -> Tensor:
        return self.model.stem(x)

    def head(self, h: Tensor) -> Tensor:
        return self.model.forward_head(self.model.norm_pre(h))

    def pre_logits(self, h: Tensor) -> Tensor:
        return self.model.forward_head(self.model.norm_pre(h), pre_logits=True)

    def head_modules(self) -> list[nn.Module]:
        return [self.model.norm_pre, self.model.head]

    def pool(self, h: Tensor) -> dict[str, Tensor]:
        return {"avg": h.mean(dim=(2, 3))}


class _RopeBlock(nn.Module):
    """An Eva block that fetches its rotary position embedding itself, so it runs alone.

    Holds only the block (the rotary module stays with the model: see :meth:`Adapter.shared_modules`);
    ``rope(index, tokens)`` is the adapter's, a plain attribute so that the wrapper's state is the block's.
    """

    def __init__(self, block: nn.Module, rope, index: int) -> None:
        super().__init__()
        self.block = block
        self.rope = rope
        self.index = index

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x, rope=self.rope(self.index, x.shape[1]))


class EvaAdapter(ViTAdapter):
    """timm's ``Eva``: EVA-02, DINOv3 (``vit_*_dinov3``), ... Tokens like a ViT (cls + register
    prefix); the rotary position embedding (RoPE) is applied inside every block's attention, so
    each block computes it for its input's grid (no MACs: sines, cosines and products)."""

    family = "eva"

    def _split_blocks(self) -> list[nn.Module]:
        return [_RopeBlock(b, self._rope, i) for i, b in enumerate(self.model.blocks)]

    def _grid(self, tokens: int) -> tuple[int, int]:
        """The patch grid of a representation with ``tokens`` tokens (prefix included)."""
        grid = tuple(int(g) for g in self.model.patch_embed.grid_size)
        patches = tokens - self.num_prefix
        if grid[0] * grid[1] == patches:
            return grid
        side = int(round(patches ** 0.5))  # dynamic_img_size at another size: square inputs
        if side * side != patches:
            raise KlasError(f"cannot tell the patch grid of {patches} tokens; give {type(self.model).__name__} square inputs")
        return side, side

    def _rope(self, index: int, tokens: int) -> Tensor | None:
        m = self.model
        if m.rope is None:
            return None
        if getattr(m, "dynamic_img_size", False) or not hasattr(m.rope, "feat_shape"):
            emb = m.rope.get_embed(shape=self._grid(tokens))
        else:
            emb = m.rope.get_embed()
        return emb[index] if getattr(m, "rope_mixed", False) else emb

    def shape_of(self, h: Tensor) -> tuple[int, tuple[int, int], int]:
        return h.shape[2], self._grid(h.shape[1]), self.num_prefix

    @property
    def class_token(self) -> bool:
        return getattr(self.model, "cls_token", None) is not None

    def _stem(self, x: Tensor) -> Tensor:
        m = self.model
        x, _ = m._pos_embed(m.patch_embed(x))
        return m.norm_pre(x)

    def head_modules(self) -> list[nn.Module]:
        m = self.model
        pool = [m.attn_pool] if getattr(m, "attn_pool", None) is not None else []
        return [m.norm, *pool, m.fc_norm, m.head]

    def shared_modules(self) -> list[nn.Module]:
        return [self.model.rope] if self.model.rope is not None else []


class LevitAdapter(Adapter):
    """timm LeViT. ``levit_*``: tokens (B, H*W, C) without prefix tokens; ``levit_conv_*``: NCHW.
    Each stage's (attention) subsampling is folded into its first block."""

    family = "levit"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.layout = "nchw" if model.use_conv else "tokens"  # an instance attribute: one class, two layouts

    def _split_blocks(self) -> list[nn.Module]:
        return _fold_downsamples(self.model.stages)

    def _stem(self, x: Tensor) -> Tensor:
        x = self.model.stem(x)
        return x if self.model.use_conv else x.flatten(2).transpose(1, 2)

    def head(self, h: Tensor) -> Tensor:
        return self.model.forward_head(h)

    def pre_logits(self, h: Tensor) -> Tensor:
        return self.model.forward_head(h, pre_logits=True)

    def head_modules(self) -> list[nn.Module]:
        m = self.model
        return [m.head] + ([m.head_dist] if hasattr(m, "head_dist") else [])

    def pool(self, h: Tensor) -> dict[str, Tensor]:
        return {"avg": h.mean(dim=(2, 3)) if self.model.use_conv else h.mean(dim=1)}

    def shape_of(self, h: Tensor) -> tuple[int, tuple[int, int], int]:
        if self.layout == "nchw":
            return super().shape_of(h)
        side = int(round(h.shape[1] ** 0.5))  # LeViT's token grids are square (its img_size is one number)
        return h.shape[2], (side, side), 0


class StagedAdapter(Adapter):
    """One adapter for timm's CNNs built as stem modules -> stages (each a sequence of blocks run in
    order) -> modules before the head -> ``forward_head``: EfficientNet, MobileNetV3, RegNet, ...
    Every block of every stage is a block; each family is a row of names (:data:`STAGED`)."""

    layout = "nchw"
    stem_names: ClassVar[tuple[str, ...]] = ()
    stage_names: ClassVar[tuple[str, ...]] = ()  # attributes that are stages, or one attribute holding them
    pre_head_names: ClassVar[tuple[str, ...]] = ()  # forward_features' modules after the stages
    head_names: ClassVar[tuple[str, ...]] = ()  # modules forward_head runs

    def _stages(self) -> list[nn.Module]:
        m = self.model
        if len(self.stage_names) == 1:
            return list(getattr(m, self.stage_names[0]))
        return [getattr(m, n) for n in self.stage_names]

    def _split_blocks(self) -> list[nn.Module]:
        return [blk for stage in self._stages() for blk in stage.children()]

    def _stem(self, x: Tensor) -> Tensor:
        for name in self.stem_names:
            x = getattr(self.model, name)(x)
        return x

    def _pre_head(self, h: Tensor) -> Tensor:
        for name in self.pre_head_names:
            h = getattr(self.model, name)(h)
        return h

    def head(self, h: Tensor) -> Tensor:
        return self.model.forward_head(self._pre_head(h))

    def pre_logits(self, h: Tensor) -> Tensor:
        return self.model.forward_head(self._pre_head(h), pre_logits=True)

    def head_modules(self) -> list[nn.Module]:
        return [getattr(self.model, n) for n in (*self.pre_head_names, *self.head_names)]

    def pool(self, h: Tensor) -> dict[str, Tensor]:
        return {"avg": h.mean(dim=(2, 3))}


class EfficientNetAdapter(StagedAdapter):
    family = "efficientnet"
    stem_names = ("conv_stem", "bn1")
    stage_names = ("blocks",)
    pre_head_names = ("conv_head", "bn2")
    head_names = ("global_pool", "classifier")


class MobileNetV3Adapter(StagedAdapter):
    family = "mobilenetv3"
    stem_names = ("conv_stem", "bn1")
    stage_names = ("blocks",)
    head_names = ("global_pool", "conv_head", "norm_head", "act2", "flatten", "classifier")


class RegNetAdapter(StagedAdapter):
    family = "regnet"
    stem_names = ("stem",)
    stage_names = ("s1", "s2", "s3", "s4")
    pre_head_names = ("final_conv",)
    head_names = ("head",)


def _family_table() -> list[tuple[type, type[Adapter]]]:
    from timm.models.convnext import ConvNeXt
    from timm.models.efficientnet import EfficientNet
    from timm.models.eva import Eva
    from timm.models.levit import Levit
    from timm.models.mobilenetv3 import MobileNetV3
    from timm.models.regnet import RegNet
    from timm.models.resnet import ResNet
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.swin_transformer_v2 import SwinTransformerV2
    from timm.models.vision_transformer import VisionTransformer

    return [
        (VisionTransformer, ViTAdapter),
        (Eva, EvaAdapter),
        (SwinTransformer, SwinAdapter),
        (SwinTransformerV2, SwinAdapter),
        (Levit, LevitAdapter),
        (ResNet, ResNetAdapter),
        (ConvNeXt, ConvNeXtAdapter),
        (EfficientNet, EfficientNetAdapter),
        (MobileNetV3, MobileNetV3Adapter),
        (RegNet, RegNetAdapter),
    ]


SUPPORTED_FAMILIES = ("ViT/DeiT/DeiT3/CLIP/SigLIP/DINOv2, Eva (EVA-02, DINOv3), Swin (v1, v2), LeViT, ResNet, "
                      "ConvNeXt, EfficientNet, MobileNetV3, RegNet")


def adapter_class(model: nn.Module, name: str = "") -> type[Adapter]:
    """The adapter class for a timm model instance, or a KlasError naming what is supported."""
    for cls, adapter in _family_table():
        if isinstance(model, cls):
            return adapter
    raise KlasError(
        f"unsupported architecture {name or type(model).__name__} ({type(model).__name__}); "
        f"klas can split {SUPPORTED_FAMILIES} models: pick one of those"
    )


def adapt(model: nn.Module, name: str = "") -> Adapter:
    """Wrap a timm model in its family's adapter."""
    return adapter_class(model, name)(model)
