"""Running many networks of a :class:`~klas.stitch.network.StitchNet` on one batch, sharing work.

Each anchor's prefix runs once per batch (:meth:`StitchNet.representations`); stitches that continue
in the same target block can further share one call of that block stack on their concatenated
outputs (``chunk_images`` > 0). ``chunk_images = 0`` runs every network on its own, which gives
exactly the numbers of ``net.model(id)(x)``.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import Tensor

from klas.stitch.network import StitchNet

Group = tuple[str, int, list[str]]


def target_of(net: StitchNet, name_or_id: str) -> str:
    """The model whose head a network ends in: a stitch's target, or the anchor itself."""
    return name_or_id if net.is_anchor(name_or_id) else net.specs[name_or_id].dst


def needs_of(nets: Iterable[tuple[StitchNet, Sequence[str]]]) -> dict[str, set[int]]:
    """Union of :meth:`StitchNet.needs` over several (net, ids): which anchor representations to compute."""
    needs: dict[str, set[int]] = {}
    for net, ids in nets:
        for name, cuts in net.needs(ids).items():
            needs.setdefault(name, set()).update(cuts)
    return needs


def target_groups(net: StitchNet, stitch_ids: Sequence[str], chunk_images: int, batch_size: int) -> list[Group]:
    """``(dst, dst_cut, ids)``: stitches that resume the same target block, at most
    ``chunk_images // batch_size`` per group (one per group when ``chunk_images`` is 0)."""
    by: dict[tuple[str, int], list[str]] = {}
    for i in stitch_ids:
        s = net.specs[i]
        by.setdefault((s.dst, s.dst_cut), []).append(i)
    per = max(1, chunk_images // max(1, batch_size))
    return [(d, c, members[j:j + per]) for (d, c), members in sorted(by.items()) for j in range(0, len(members), per)]


def group_outputs(net: StitchNet, group: Group, reps: dict[tuple[str, int], Tensor],
                  features: bool = False) -> list[tuple[Tensor, Tensor | None]]:
    """(logits, pre-logits features or None) of each stitch in ``group``: its stitch layer on the
    source representation, then one pass of the target's remaining blocks over all of them."""
    dst, cut, members = group
    hs = [net.stitch_layer(i)(reps[(net.specs[i].src, net.specs[i].src_cut)]) for i in members]
    a = net.adapter(dst)
    sizes = [h.shape[0] for h in hs]
    h = a.run_blocks(torch.cat(hs, 0), cut)
    logits = a.head(h).split(sizes, 0)
    feats = a.pre_logits(h).split(sizes, 0) if features else [None] * len(members)
    return list(zip(logits, feats))


def anchor_outputs(net: StitchNet, name: str, reps: dict[tuple[str, int], Tensor],
                   features: bool = False) -> tuple[Tensor, Tensor | None]:
    """(logits, pre-logits features or None) of an anchor from its last representation."""
    a = net.adapter(name)
    h = reps[(name, net.profiles[name].num_blocks)]
    return a.head(h), (a.pre_logits(h) if features else None)


__all__ = ["Group", "anchor_outputs", "group_outputs", "needs_of", "target_groups", "target_of"]
