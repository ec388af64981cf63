"""A Stitch Tree (Mai et al., CVPR 2026, "VFM Stitch Tree"): one trunk, k branches, one pass of the trunk.

Several models are run at once by running the early blocks of one of them, the *trunk* ``T``, only
once: representation ``share`` of ``T`` (after its blocks ``0..share-1``) is handed

* to ``T``'s own remaining blocks and head (the trunk's branch, exactly model ``T``), and
* for every other model ``M``, through a stitch layer ``T[share] -> M[cut_M]`` (bridged where the
  layouts differ, :mod:`klas.stitch.bridge`) to ``M``'s blocks ``cut_M..n_M-1`` and head.

``cut_M`` defaults to the same relative depth, ``round(share * n_M / n_T)`` clamped to ``0..n_M-1``
(:func:`relative_cut`). Each branch is the binary stitch ``T:share -> M:cut_M`` of
:mod:`klas.stitch.network`; a tree is a :class:`~klas.stitch.network.StitchNet` whose stitches all
leave the same representation, run so that the trunk prefix is computed once.

Cost (fvcore convention, one multiply-add = one FLOP): :func:`tree_cost` = trunk prefix
(``T.prefix_macs(share)``) + the trunk's suffix + for each other branch its stitch layer and its
suffix (blocks and head), each part from the models' :class:`~klas.models.Profile`; the tests check it
against a direct count of :meth:`StitchTree.outputs`. Pre-logits features are read on the head's
path (pooling and norms, no matmuls for the supported families), so they add nothing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from klas.errors import KlasError
from klas.models import Adapter, Profile
from klas.stitch.bridge import stitch_module_macs, stitch_module_params
from klas.stitch.network import StitchNet, StitchSpec, _module_key, stitch_id

MATCHES = ("relative", "score")


@dataclass(frozen=True)
class TreeSpec:
    """The shape of a tree: trunk model, share point, and ``(model, cut)`` of every other branch."""

    trunk: str
    share: int
    branches: tuple[tuple[str, int], ...]

    @property
    def names(self) -> list[str]:
        """Every branch's model, trunk first."""
        return [self.trunk] + [m for m, _ in self.branches]

    def stitch_specs(self) -> list[StitchSpec]:
        """The branches other than the trunk's as binary stitches (ids ``T:share->M:cut``)."""
        return [StitchSpec(stitch_id(self.trunk, self.share, m, c), self.trunk, self.share, m, c) for m, c in self.branches]

    def to_json(self) -> dict:
        return {"trunk": self.trunk, "share": self.share, "branches": [{"model": m, "cut": c} for m, c in self.branches]}

    @classmethod
    def from_json(cls, d: Mapping) -> "TreeSpec":
        try:
            return cls(str(d["trunk"]), int(d["share"]), tuple((str(b["model"]), int(b["cut"])) for b in d["branches"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise KlasError(f"malformed tree entry {dict(d)!r} ({exc.__class__.__name__}); rerun klas tree") from exc


def check_share(trunk: str, profile: Profile, share: int) -> None:
    """A share point must leave the trunk at least one block of its own: ``1..n_T-1``."""
    n = profile.num_blocks
    if isinstance(share, bool) or not isinstance(share, int) or not 1 <= share <= n - 1:
        raise KlasError(f"share point {share!r} is out of range for trunk {trunk} ({n} blocks): "
                        f"use a block boundary in 1..{n - 1} (--share-at s1,s2,... or auto)")


def relative_cut(trunk_profile: Profile, share: int, profile: Profile) -> int:
    """The representation of a model at the trunk's relative depth ``share / n_T``, within ``0..n_M-1``."""
    n_t, n_m = trunk_profile.num_blocks, profile.num_blocks
    return int(min(max(math.floor(share * n_m / n_t + 0.5), 0), n_m - 1))


def tree_spec(profiles: Mapping[str, Profile], trunk: str, share: int,
              cuts: Mapping[str, int] | None = None) -> TreeSpec:
    """The tree over every model of ``profiles`` with trunk ``trunk`` split at ``share``; the other
    models join at ``cuts[M]`` where given, else at :func:`relative_cut`."""
    if trunk not in profiles:
        raise KlasError(f"trunk {trunk!r} is not among the models {', '.join(profiles)}; pick one of them with --trunk")
    if len(profiles) < 2:
        raise KlasError(f"a stitch tree needs at least two models, got {len(profiles)}; cache more --model")
    check_share(trunk, profiles[trunk], share)
    branches = []
    for name, p in profiles.items():
        if name == trunk:
            continue
        cut = (cuts or {}).get(name, relative_cut(profiles[trunk], share, p))
        if not 0 <= cut <= p.num_blocks - 1:
            raise KlasError(f"branch {name}: cut {cut} is outside 0..{p.num_blocks - 1}")
        branches.append((name, int(cut)))
    return TreeSpec(trunk, int(share), tuple(branches))


def tree_cost(profiles: Mapping[str, Profile], spec: TreeSpec, kind: str = "linear") -> dict:
    """Exact MACs and parameters of a tree, by part: ``trunk_prefix``, per branch ``suffix`` and ``stitch``
    (0 for the trunk's own branch), ``macs`` in all; and the references ``all_separate_macs`` (every
    model run on its own) and ``largest_macs`` (the most expensive single model)."""
    pt = profiles[spec.trunk]
    rep = pt.reps[spec.share]
    parts = {spec.trunk: {"suffix": pt.suffix_macs(spec.share), "stitch": 0, "suffix_params": pt.suffix_params(spec.share),
                          "stitch_params": 0}}
    for m, c in spec.branches:
        p = profiles[m]
        parts[m] = {"suffix": p.suffix_macs(c), "stitch": stitch_module_macs(kind, rep, p.reps[c]),
                    "suffix_params": p.suffix_params(c), "stitch_params": stitch_module_params(kind, rep, p.reps[c])}
    prefix = pt.prefix_macs(spec.share)
    macs = prefix + sum(b["suffix"] + b["stitch"] for b in parts.values())
    params = pt.prefix_params(spec.share) + sum(b["suffix_params"] + b["stitch_params"] for b in parts.values())
    names = spec.names
    return {"trunk_prefix": int(prefix), "branches": parts, "macs": int(macs), "params": int(params),
            "all_separate_macs": int(sum(profiles[n].macs for n in names)),
            "largest_macs": int(max(profiles[n].macs for n in names))}


class StitchTree(nn.Module):
    """The tree as one module: ``forward(x)`` -> ``{model: pre-logits features}``, ``outputs(x)`` ->
    ``{model: (logits, features)}``, the trunk prefix run once per batch.

    ``adapters`` holds every branch's model (trunk included) and ``stitches`` a stitch module per
    other branch; they are referenced, so a tree built by :meth:`from_net` shares a StitchNet's weights.
    """

    def __init__(self, spec: TreeSpec, adapters: Mapping[str, Adapter], stitches: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.spec = spec
        self.models = nn.ModuleDict({_module_key(n): adapters[n] for n in spec.names})
        self.stitches = nn.ModuleDict({_module_key(m): stitches[m] for m, _ in spec.branches})

    @classmethod
    def from_net(cls, net: StitchNet, spec: TreeSpec) -> "StitchTree":
        """The tree of ``spec`` over a StitchNet holding its models and its branches' stitches."""
        stitches = {s.dst: net.stitch_layer(s.id) for s in spec.stitch_specs()}
        return cls(spec, {n: net.adapter(n) for n in spec.names}, stitches)

    def adapter(self, name: str) -> Adapter:
        return self.models[_module_key(name)]

    def stitch(self, name: str) -> nn.Module:
        """The stitch module into branch ``name`` (a model other than the trunk)."""
        return self.stitches[_module_key(name)]

    def representations(self, x: Tensor) -> dict[str, Tensor]:
        """Every branch's last representation (what its head reads), the trunk prefix computed once."""
        t = self.adapter(self.spec.trunk)
        h = t.run_blocks(t.stem(x), 0, self.spec.share)
        out = {self.spec.trunk: t.run_blocks(h, self.spec.share)}
        for m, c in self.spec.branches:
            out[m] = self.adapter(m).run_blocks(self.stitch(m)(h), c)
        return out

    def outputs(self, x: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        """``{model: (logits, pre-logits features)}`` of every branch."""
        return {n: (self.adapter(n).head(h), self.adapter(n).pre_logits(h)) for n, h in self.representations(x).items()}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {n: self.adapter(n).pre_logits(h) for n, h in self.representations(x).items()}

    def extra_repr(self) -> str:
        return f"trunk={self.spec.trunk}, share={self.spec.share}, branches={list(self.spec.branches)}"


class AllModels(nn.Module):
    """Every model run on its own, the same interface as :class:`StitchTree` (the ceiling's system)."""

    def __init__(self, adapters: Mapping[str, Adapter]) -> None:
        super().__init__()
        self.names = list(adapters)
        self.models = nn.ModuleDict({_module_key(n): a for n, a in adapters.items()})

    def outputs(self, x: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        out = {}
        for n in self.names:
            a = self.models[_module_key(n)]
            h = a.run_blocks(a.stem(x))
            out[n] = (a.head(h), a.pre_logits(h))
        return out

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {n: f for n, (_, f) in self.outputs(x).items()}


def direct_tree_macs(tree: StitchTree, input_size: Sequence[int]) -> int:
    """MACs of one image through :meth:`StitchTree.outputs`, counted by running it (the cross-check
    of :func:`tree_cost`)."""
    from klas.models import count_macs

    dev = next(tree.parameters()).device
    with torch.no_grad():
        macs, _ = count_macs(tree.outputs, torch.zeros(1, *input_size, device=dev))
    return int(macs)


__all__ = ["MATCHES", "AllModels", "StitchTree", "TreeSpec", "check_share", "direct_tree_macs", "relative_cut",
           "tree_cost", "tree_spec"]
