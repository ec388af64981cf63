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
        self.train(model.training)  # a fresh nn.Module starts in training mode; follow the model's

    # -- what each family provides -------------------------------------------------------------
    def _split_blocks(self) -> list[nn.Module]:
        raise NotImplementedError

    def stem(self, x: Tensor) -> Tensor:
        """Images (B, 3, H, W) -> representation 0."""
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

    def stem(self, x: Tensor) -> Tensor:
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
        blocks: list[nn.Module] = []
        for stage in self.model.layers:
            inner = list(stage.blocks)
            blocks.append(_Chain(stage.downsample, inner[0]))
            blocks.extend(inner[1:])
        return blocks

    def stem(self, x: Tensor) -> Tensor:
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

    def stem(self, x: Tensor) -> Tensor:
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
        blocks: list[nn.Module] = []
        for stage in self.model.stages:
            inner = list(stage.blocks)
            blocks.append(_Chain(stage.downsample, inner[0]))
            blocks.extend(inner[1:])
        return blocks

    def stem(self, x: Tensor) -> Tensor:
        return self.model.stem(x)

    def head(self, h: Tensor) -> Tensor:
        return self.model.forward_head(self.model.norm_pre(h))

    def pre_logits(self, h: Tensor) -> Tensor:
        return self.model.forward_head(self.model.norm_pre(h), pre_logits=True)

    def head_modules(self) -> list[nn.Module]:
        return [self.model.norm_pre, self.model.head]

    def pool(self, h: Tensor) -> dict[str, Tensor]:
        return {"avg": h.mean(dim=(2, 3))}


def _family_table() -> list[tuple[type, type[Adapter]]]:
    from timm.models.convnext import ConvNeXt
    from timm.models.resnet import ResNet
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer

    return [
        (VisionTransformer, ViTAdapter),
        (SwinTransformer, SwinAdapter),
        (ResNet, ResNetAdapter),
        (ConvNeXt, ConvNeXtAdapter),
    ]


SUPPORTED_FAMILIES = "ViT/DeiT/DeiT3, Swin (v1), ResNet, ConvNeXt"


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
