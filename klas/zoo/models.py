"""The demo family as timm architectures: ``timm.create_model("klas_vit_ti")`` works once this is imported.

Two demo families and one benchmark family, sized for 32x32 inputs and CPU training:

* ViT (DeiT-Ti/S/B analogue): ``klas_vit_ti`` / ``_s`` / ``_b``, timm ``VisionTransformer`` with a cls token,
  6 blocks each, widths 32 / 64 / 128 with 2 / 4 / 8 heads (head dim 16, like DeiT's fixed 64), 8x8
  patches -> 4x4 tokens.
* CNN (ResNet-18/50 analogue): ``klas_resnet_s`` (BasicBlock, 2-2-2-2, widths 8-64) and ``klas_resnet_l``
  (Bottleneck, 3-4-6-3, widths 16-128, outputs 64-512), timm ``ResNet``.
* ViT of unequal depths and widths (the quality benchmark's second family, not trained by ``make demo``):
  ``klas_vit_d4`` (4 blocks, width 32, 2 heads), ``klas_vit_s`` (above: 6 blocks, width 64) and
  ``klas_vit_d8`` (8 blocks, width 96, 6 heads); same patches, head dim and MLP ratio as the trio.

The pretrained cfgs carry no url / hf_hub: the weights come from :func:`klas.zoo.zoo_weights`. With
``pretrained=True`` and no explicit file, the entrypoint points timm at those (training on first use).
"""
from __future__ import annotations

from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

#: Architecture kwargs per demo model (what differs between family members).
VIT_ARGS: dict[str, dict[str, Any]] = {
    "klas_vit_ti": dict(embed_dim=32, num_heads=2),
    "klas_vit_s": dict(embed_dim=64, num_heads=4),
    "klas_vit_b": dict(embed_dim=128, num_heads=8),
    "klas_vit_d4": dict(embed_dim=32, num_heads=2, depth=4),
    "klas_vit_d8": dict(embed_dim=96, num_heads=6, depth=8),
}
#: Shared by the ViTs: 32x32 input, 8x8 patches (4x4 tokens + cls), 6 blocks (unless VIT_ARGS says), head dim 16, MLP ratio 4.
VIT_COMMON: dict[str, Any] = dict(img_size=32, patch_size=8, depth=6, mlp_ratio=4.0, class_token=True, global_pool="token")

#: ResNet-18 analogue at 1/8 of its width, ResNet-50 analogue at 1/4 (Bottleneck: outputs 4x wider).
RESNET_ARGS: dict[str, dict[str, Any]] = {
    "klas_resnet_s": dict(block=BasicBlock, layers=(2, 2, 2, 2), channels=(8, 16, 32, 64), stem_width=8),
    "klas_resnet_l": dict(block=Bottleneck, layers=(3, 4, 6, 3), channels=(16, 32, 64, 128), stem_width=16),
}


def arch_args(arch: str) -> dict[str, Any]:
    """JSON-able constructor arguments of a demo model (recorded with its weights; a change retrains)."""
    if arch in VIT_ARGS:
        return {"class": "VisionTransformer", **VIT_COMMON, **VIT_ARGS[arch]}
    args = dict(RESNET_ARGS[arch])
    return {"class": "ResNet", **args, "block": args["block"].__name__, "layers": list(args["layers"]),
            "channels": list(args["channels"])}


def _cfg(classifier: str, first_conv: str) -> dict[str, Any]:
    """A pretrained cfg for the digits weights: preprocessing only, no download source."""
    return dict(
        num_classes=10,
        input_size=(3, 32, 32),
        fixed_input_size=False,
        pool_size=None,
        crop_pct=1.0,
        crop_mode="center",
        interpolation="bilinear",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        first_conv=first_conv,
        classifier=classifier,
        license="same as klas",
        notes=("trained by klas on the built-in digits set (klas zoo)",),
    )


default_cfgs = generate_default_cfgs({
    **{name: _cfg("head", "patch_embed.proj") for name in VIT_ARGS},
    **{name: _cfg("fc", "conv1") for name in RESNET_ARGS},
})


def _with_zoo_weights(variant: str, pretrained: bool, kwargs: dict[str, Any]) -> None:
    """For ``pretrained=True`` without a file of the caller's, load klas's own weights for ``variant``."""
    if not pretrained:
        return
    overlay = dict(kwargs.get("pretrained_cfg_overlay") or {})
    if not any(overlay.get(k) for k in ("file", "state_dict", "url", "hf_hub_id")):
        from klas.zoo import zoo_weights

        overlay["file"] = str(zoo_weights(variant))
        kwargs["pretrained_cfg_overlay"] = overlay


def _create_vit(variant: str, pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    _with_zoo_weights(variant, pretrained, kwargs)
    args = {**VIT_COMMON, **VIT_ARGS[variant], **kwargs}
    return build_model_with_cfg(
        VisionTransformer, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **args
    )


def _create_resnet(variant: str, pretrained: bool = False, **kwargs: Any) -> ResNet:
    _with_zoo_weights(variant, pretrained, kwargs)
    return build_model_with_cfg(ResNet, variant, pretrained, **{**RESNET_ARGS[variant], **kwargs})


@register_model
def klas_vit_ti(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """DeiT-Ti analogue for 32x32: width 32, 2 heads, 6 blocks."""
    return _create_vit("klas_vit_ti", pretrained, **kwargs)


@register_model
def klas_vit_s(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """DeiT-S analogue for 32x32: width 64, 4 heads, 6 blocks."""
    return _create_vit("klas_vit_s", pretrained, **kwargs)


@register_model
def klas_vit_b(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """DeiT-B analogue for 32x32: width 128, 8 heads, 6 blocks."""
    return _create_vit("klas_vit_b", pretrained, **kwargs)


@register_model
def klas_vit_d4(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """Shallow narrow ViT for 32x32: width 32, 2 heads, 4 blocks (benchmark family ``vit-depth``)."""
    return _create_vit("klas_vit_d4", pretrained, **kwargs)


@register_model
def klas_vit_d8(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """Deep wide ViT for 32x32: width 96, 6 heads, 8 blocks (benchmark family ``vit-depth``)."""
    return _create_vit("klas_vit_d8", pretrained, **kwargs)


@register_model
def klas_resnet_s(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-18 analogue: BasicBlock (2, 2, 2, 2), channels 8-64."""
    return _create_resnet("klas_resnet_s", pretrained, **kwargs)


@register_model
def klas_resnet_l(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-50 analogue: Bottleneck (3, 4, 6, 3), channels 16-128 (x4 expansion: outputs 64-512)."""
    return _create_resnet("klas_resnet_l", pretrained, **kwargs)
