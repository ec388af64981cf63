"""Running many networks of a :class:`~klas.stitch.network.StitchNet` on one batch, sharing work.

Each anchor's prefix runs once per batch (:meth:`StitchNet.representations`); stitches that continue
in the same target block can further share one call of that block stack on their concatenated
outputs (``chunk_images`` > 0). ``chunk_images = 0`` runs every network on its own, which gives
exactly the numbers of ``net.model(id)(x)``.

For local feature matching (``lfm``) a stitch also needs the target's own representation at its
stitch point: :func:`match_needs` adds ``(dst, dst_cut)`` to the representations the batch computes,
so the target's prefix runs on the same batch, once, however many stitches share that point, and
with the net's current weights (under ``full_tune`` the prefix the target's own suffix is trained
on; see :class:`klas.train.config.TrainConfig`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import Tensor

from klas.stitch.network import StitchNet

Group = tuple[str, int, list[str]]


@dataclass
class Outputs:
    """What a network produced on a batch: its logits, and, when asked, its pre-logits ``features``
    (``ffm``), its stitch module's output ``stitched`` and the target's own representation at the stitch
    point ``target_rep`` (``lfm``; both None for an anchor)."""

    logits: Tensor
    features: Tensor | None = None
    stitched: Tensor | None = None
    target_rep: Tensor | None = None


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


def match_needs(net: StitchNet, ids: Sequence[str]) -> dict[str, set[int]]:
    """The target representations ``lfm`` compares the stitches ``ids`` with: ``dst -> {dst_cut}``."""
    needs: dict[str, set[int]] = {}
    for i in ids:
        if not net.is_anchor(i):
            s = net.specs[i]
            needs.setdefault(s.dst, set()).add(s.dst_cut)
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
                  features: bool = False, match: bool = False) -> list[Outputs]:
    """The :class:`Outputs` of each stitch in ``group``: its stitch layer on the source representation,
    then one pass of the target's remaining blocks over all of them. ``match`` also returns each stitch
    module's output and the target's representation at ``dst_cut`` (which ``reps`` must hold:
    :func:`match_needs`)."""
    dst, cut, members = group
    hs = [net.stitch_layer(i)(reps[(net.specs[i].src, net.specs[i].src_cut)]) for i in members]
    a = net.adapter(dst)
    sizes = [h.shape[0] for h in hs]
    h = a.run_blocks(torch.cat(hs, 0), cut)
    logits = a.head(h).split(sizes, 0)
    feats = a.pre_logits(h).split(sizes, 0) if features else [None] * len(members)
    target = reps[(dst, cut)] if match else None
    return [Outputs(lg, ft, hi if match else None, target) for lg, ft, hi in zip(logits, feats, hs)]


def anchor_outputs(net: StitchNet, name: str, reps: dict[tuple[str, int], Tensor],
                   features: bool = False) -> Outputs:
    """The :class:`Outputs` of an anchor from its last representation (no stitch point)."""
    a = net.adapter(name)
    h = reps[(name, net.profiles[name].num_blocks)]
    return Outputs(a.head(h), a.pre_logits(h) if features else None)


__all__ = ["Group", "Outputs", "anchor_outputs", "group_outputs", "match_needs", "needs_of", "target_groups", "target_of"]
