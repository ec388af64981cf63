"""Enumerate every binary stitch between k models, with its exact cost.

A candidate ``(a, src_cut) -> (b, dst_cut)`` (see docs/formats.md) may join any two representations:
where their positions differ (layout, grid, prefix tokens) the stitch carries a bridge
(:mod:`klas.stitch.bridge`) and its cost includes it. The source runs at least one block
(1 <= src_cut <= n_a) and so does the target (0 <= dst_cut <= n_b - 1); a "stitch" that ran only
b's head would be model a with a retrained classifier, not a stitch.

With k models of n blocks this is O(k^2 n^2) candidates; anchors (each model alone) are listed too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from klas.config import DIRECTIONS  # re-exported
from klas.errors import KlasError
from klas.models import Profile
from klas.stitch.network import route_string, stitch_id, stitch_macs, stitch_params



@dataclass(frozen=True)
class Candidate:
    """One binary stitch, or an anchor (``dst is None``)."""

    src: str
    src_cut: int
    dst: str | None
    dst_cut: int | None
    macs: int
    params: int
    route: str

    @property
    def kind(self) -> str:
        return "anchor" if self.dst is None else "stitch"

    @property
    def id(self) -> str:
        return self.src if self.dst is None else stitch_id(self.src, self.src_cut, self.dst, self.dst_cut)


def model_pairs(profiles: Mapping[str, Profile], direction: str = "up") -> list[tuple[str, str]]:
    """Ordered (source, target) pairs: cheaper -> more expensive (``up``) or every ordered pair (``both``)."""
    if direction not in DIRECTIONS:
        raise KlasError(f"unknown --direction {direction!r}; use one of {', '.join(DIRECTIONS)}")
    names = sorted(profiles, key=lambda n: (profiles[n].macs, n))
    if direction == "up":
        return [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    return [(a, b) for a in names for b in names if a != b]


def anchors(profiles: Mapping[str, Profile]) -> list[Candidate]:
    """Each model alone, cheapest first."""
    return [
        Candidate(n, p.num_blocks, None, None, p.macs, p.params, route_string(n, p.num_blocks, None, None, None))
        for n, p in sorted(profiles.items(), key=lambda kv: (kv[1].macs, kv[0]))
    ]


def enumerate_stitches(
    profiles: Mapping[str, Profile], direction: str = "up", layer: str = "linear"
) -> list[Candidate]:
    """Every binary stitch over the model pairs of ``direction`` (bridged where positions differ)."""
    if len(profiles) < 2:
        raise KlasError(f"stitching needs at least two models, the cache has {len(profiles)}; cache more --model")
    out = []
    for a, b in model_pairs(profiles, direction):
        pa, pb = profiles[a], profiles[b]
        for src_cut in range(1, pa.num_blocks + 1):
            for dst_cut in range(0, pb.num_blocks):
                out.append(Candidate(
                    a, src_cut, b, dst_cut,
                    stitch_macs(pa, src_cut, pb, dst_cut, layer),
                    stitch_params(pa, src_cut, pb, dst_cut, layer),
                    route_string(a, src_cut, b, dst_cut, pb.num_blocks),
                ))
    return out
