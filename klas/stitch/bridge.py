"""Bridges: stitch any representation onto any other (layout, spatial grid, prefix tokens).

A per-position stitch layer needs the same positions on both sides. When two representations differ
(:meth:`~klas.models.Rep.compatible` is false) a :class:`Bridge` lines them up around the layer:

1. **rows** (source width): the source's patch grid as ``(B, C_in, H, W)`` (tokens without their
   prefix, NHWC permuted, NCHW as is), resampled to the target's grid ``(H', W')``: *area pooling*
   (``adaptive_avg_pool2d``) when the grid shrinks in both directions, *bilinear interpolation*
   (``align_corners=False``) otherwise; flattened row-major to ``(B, H'*W', C_in)``. When the target
   has a class token, a row for it goes first: the source's class token where it has one, else the
   mean of the source's patch tokens (before resampling). Source prefix tokens the target has no
   slot for (registers, distillation, a class token the target lacks) are dropped.
2. the stitch layer maps every row ``C_in -> C_out`` (``T' = H'*W' + [target has cls]`` rows);
3. **assemble** (target width): the rows in the target's layout; for tokens, the class row first,
   then the target's other prefix tokens (registers, distillation), which are *learned parameters*
   (``extra``, zeros until :func:`klas.stitch.init.least_squares_init` sets them to the target's own
   mean values at that representation), then the patch rows.

Cost (fvcore convention, as everywhere in klas): the layer's MACs at the ``T'`` target rows plus
nothing for the bridge: resampling, pooling and the mean are counted as zero, like klas's other
non-matmul ops (LayerNorm, softmax, activations; torch's counter sees none of them). Bilinear
resampling is at most 4 multiply-adds per output value (``4 * T' * C_in``), a fraction
``4 / C_out`` of a linear stitch layer. Parameters: the layer's plus ``extra`` (``n_extra * C_out``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from klas.models import Rep
from klas.stitch.layers import make_stitch_layer, stitch_layer_macs, stitch_layer_params


def needs_bridge(src: Rep, dst: Rep) -> bool:
    """Whether a stitch from ``src`` to ``dst`` needs a bridge (positions differ)."""
    return not src.compatible(dst)


def resample_mode(src_grid: tuple[int, int], dst_grid: tuple[int, int]) -> str:
    """``none`` (same grid), ``area`` (shrinks both ways) or ``bilinear`` (any other change)."""
    if tuple(src_grid) == tuple(dst_grid):
        return "none"
    if dst_grid[0] <= src_grid[0] and dst_grid[1] <= src_grid[1]:
        return "area"
    return "bilinear"


def prefix_plan(src: Rep, dst: Rep) -> dict[str, object]:
    """How the target's prefix tokens are made: ``cls`` ("source cls" | "mean of patches" | None),
    ``learned`` (number of target register/distillation tokens), ``dropped`` (source prefix tokens)."""
    dst_cls = dst.layout == "tokens" and dst.class_token
    src_cls = src.layout == "tokens" and src.class_token
    learned = (dst.num_prefix - int(dst_cls)) if dst.layout == "tokens" else 0
    src_prefix = src.num_prefix if src.layout == "tokens" else 0
    return {
        "cls": ("source cls" if src_cls else "mean of patches") if dst_cls else None,
        "learned": learned,
        "dropped": src_prefix - int(src_cls and dst_cls),
    }


def bridge_rows(dst: Rep) -> int:
    """Positions the stitch layer of a bridged stitch runs at: the target's grid plus its class row."""
    return dst.grid[0] * dst.grid[1] + int(dst.layout == "tokens" and dst.class_token)


class Bridge(nn.Module):
    """Source representation ``src`` <-> rows at ``dst``'s positions (see the module docstring)."""

    def __init__(self, src: Rep, dst: Rep) -> None:
        super().__init__()
        self.src, self.dst = src, dst
        self.mode = resample_mode(src.grid, dst.grid)
        plan = prefix_plan(src, dst)
        self.cls_from = plan["cls"]
        n_extra = int(plan["learned"])
        self.extra = nn.Parameter(torch.zeros(n_extra, dst.width)) if n_extra else None

    @property
    def dst_cls(self) -> bool:
        return self.cls_from is not None

    def _grid(self, h: Tensor) -> tuple[Tensor, Tensor | None]:
        """Source rep -> its patch grid ``(B, C, H, W)`` and its class token ``(B, C)`` or None."""
        s = self.src
        if s.layout == "tokens":
            cls = h[:, 0] if s.class_token else None
            patches = h[:, s.num_prefix:]
            return patches.transpose(1, 2).reshape(h.shape[0], h.shape[2], *s.grid), cls
        if s.layout == "nhwc":
            return h.permute(0, 3, 1, 2), None
        return h, None

    def rows(self, h: Tensor) -> Tensor:
        """Source rep -> ``(B, T', C_in)``: class row (if the target has one), then the resampled grid."""
        grid, cls = self._grid(h)
        if self.mode == "area":
            out = F.adaptive_avg_pool2d(grid, self.dst.grid)
        elif self.mode == "bilinear":
            out = F.interpolate(grid, size=self.dst.grid, mode="bilinear", align_corners=False)
        else:
            out = grid
        out = out.flatten(2).transpose(1, 2)
        if self.dst_cls:
            cls = grid.mean(dim=(2, 3)) if cls is None else cls
            out = torch.cat([cls[:, None], out], dim=1)
        return out

    def assemble(self, y: Tensor) -> Tensor:
        """Mapped rows ``(B, T', C_out)`` -> the target's representation (its layout and prefix)."""
        d, (gh, gw) = self.dst, self.dst.grid
        if d.layout == "tokens":
            parts = [y[:, :1]] if self.dst_cls else []
            if self.extra is not None:
                parts.append(self.extra[None].expand(y.shape[0], -1, -1).to(y.dtype))
            parts.append(y[:, int(self.dst_cls):])
            return torch.cat(parts, dim=1)
        out = y.reshape(y.shape[0], gh, gw, y.shape[-1])
        return out if d.layout == "nhwc" else out.permute(0, 3, 1, 2).contiguous()

    def target_rows(self, h: Tensor) -> Tensor:
        """Target rep ``h`` -> ``(B, T', C_out)``, the values the stitch layer's rows should take."""
        d = self.dst
        if d.layout == "tokens":
            return torch.cat([h[:, :1], h[:, d.num_prefix:]], 1) if self.dst_cls else h[:, d.num_prefix:]
        if d.layout == "nchw":
            h = h.permute(0, 2, 3, 1)
        return h.reshape(h.shape[0], -1, h.shape[-1])

    def target_extra(self, h: Tensor) -> Tensor | None:
        """Target rep -> its learned-slot tokens ``(B, n_extra, C_out)`` (None when there are none)."""
        if self.extra is None:
            return None
        start = int(self.dst_cls)
        return h[:, start: start + self.extra.shape[0]]

    def extra_repr(self) -> str:
        return (f"{self.src.layout}{tuple(self.src.grid)}+{self.src.num_prefix} -> "
                f"{self.dst.layout}{tuple(self.dst.grid)}+{self.dst.num_prefix}, resample={self.mode}, cls={self.cls_from}")


class BridgedStitch(nn.Module):
    """``bridge.assemble(layer(bridge.rows(h)))``: a per-row stitch layer between differing positions."""

    def __init__(self, kind: str, src: Rep, dst: Rep) -> None:
        super().__init__()
        self.bridge = Bridge(src, dst)
        self.layer = make_stitch_layer(kind, src.width, dst.width, "tokens")

    @property
    def kind(self) -> str:
        return self.layer.kind

    @property
    def in_width(self) -> int:
        return self.layer.in_width

    @property
    def out_width(self) -> int:
        return self.layer.out_width

    def forward(self, h: Tensor) -> Tensor:
        return self.bridge.assemble(self.layer(self.bridge.rows(h)))


def make_stitch(kind: str, src: Rep, dst: Rep) -> nn.Module:
    """The stitch module from representation ``src`` to ``dst``: a plain stitch layer where the
    positions agree (what klas always built), a :class:`BridgedStitch` where they differ."""
    if needs_bridge(src, dst):
        return BridgedStitch(kind, src, dst)
    return make_stitch_layer(kind, src.width, dst.width, src.layout)


def stitch_module_macs(kind: str, src: Rep, dst: Rep) -> int:
    """MACs of :func:`make_stitch`'s module for one image (bridge resampling counted as zero)."""
    positions = bridge_rows(dst) if needs_bridge(src, dst) else src.tokens
    return stitch_layer_macs(kind, src.width, dst.width, positions)


def stitch_module_params(kind: str, src: Rep, dst: Rep) -> int:
    """Parameters of :func:`make_stitch`'s module (a bridge's learned prefix tokens included)."""
    extra = int(prefix_plan(src, dst)["learned"]) * dst.width if needs_bridge(src, dst) else 0
    return stitch_layer_params(kind, src.width, dst.width) + extra
