"""Stitched networks: one model's prefix, a stitch layer, another model's suffix.

Cut points follow ``docs/formats.md``: a stitch ``(src, src_cut) -> (dst, dst_cut)`` runs ``src``'s
stem and blocks ``0 .. src_cut-1`` (so representation ``src_cut`` leaves it), the stitch layer, then
``dst``'s blocks ``dst_cut .. n_dst-1`` and its head.

:class:`StitchNet` is SN-Net's *stitchable network*: it holds every anchor model once and one stitch
layer per selected stitch, so any number of stitches share the anchors' weights.
:func:`stitch_macs` / :func:`stitch_params` are the one place stitch costs are computed; they are sums
of the per-block costs in :class:`~klas.models.Profile` plus the stitch layer's own cost, and the tests
check them against a direct MAC count of a built :class:`StitchedModel`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from klas.errors import KlasError
from klas.models import Adapter, Profile, Rep
from klas.stitch.bridge import make_stitch, stitch_module_macs, stitch_module_params


@dataclass(frozen=True)
class StitchSpec:
    """One selected stitch, as in ``selection.json``'s ``stitches`` list."""

    id: str
    src: str
    src_cut: int
    dst: str
    dst_cut: int
    route: str = ""
    macs: int | None = None
    params: int | None = None
    theta: float | None = None
    gamma: float | None = None
    bucket: int | None = None

    @classmethod
    def from_json(cls, d: Mapping) -> "StitchSpec":
        try:
            return cls(
                id=str(d["id"]), src=str(d["src"]), src_cut=int(d["src_cut"]), dst=str(d["dst"]),
                dst_cut=int(d["dst_cut"]), route=str(d.get("route") or route_string(d["src"], d["src_cut"], d["dst"], d["dst_cut"], None)),
                macs=_opt(d.get("macs"), int), params=_opt(d.get("params"), int),
                theta=_opt(d.get("theta"), float), gamma=_opt(d.get("gamma"), float), bucket=_opt(d.get("bucket"), int),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise KlasError(f"malformed stitch entry {dict(d)!r} ({exc.__class__.__name__}: {exc}); rerun klas search") from exc

    def to_json(self) -> dict:
        return asdict(self)


def _opt(v, cast):
    return None if v is None else cast(v)


def route_string(src: str, src_cut: int, dst: str | None, dst_cut: int | None, dst_blocks: int | None) -> str:
    """``a[0..src_cut-1] -> b[dst_cut..n_b-1]`` (``docs/formats.md``); an anchor reads ``a[0..n-1]``."""
    left = f"{src}[0..{int(src_cut) - 1}]"
    if dst is None:
        return left
    last = "n-1" if dst_blocks is None else str(int(dst_blocks) - 1)
    return f"{left} -> {dst}[{int(dst_cut)}..{last}]"


def stitch_id(src: str, src_cut: int, dst: str, dst_cut: int) -> str:
    return f"{src}:{int(src_cut)}->{dst}:{int(dst_cut)}"


# -- costs ---------------------------------------------------------------------------------------


def check_stitch(profile_a: Profile, src_cut: int, profile_b: Profile, dst_cut: int, what: str = "stitch") -> None:
    """Raise a KlasError unless the cut points exist (any two representations can be stitched:
    :mod:`klas.stitch.bridge` lines up differing layouts, grids and prefix tokens)."""
    n_a, n_b = profile_a.num_blocks, profile_b.num_blocks
    if not 1 <= src_cut <= n_a:
        raise KlasError(f"{what}: src_cut={src_cut} is outside 1..{n_a} (the source has {n_a} blocks)")
    if not 0 <= dst_cut <= n_b - 1:
        raise KlasError(f"{what}: dst_cut={dst_cut} is outside 0..{n_b - 1} (the target must run at least one block)")


def stitch_macs(profile_a: Profile, src_cut: int, profile_b: Profile, dst_cut: int, layer_kind: str = "linear") -> int:
    """MACs of one image through ``a[0..src_cut-1] -> stitch layer -> b[dst_cut..] + head``.

    = ``profile_a.prefix_macs(src_cut)`` (stem + blocks ``0..src_cut-1``)
    + the stitch layer at every position of representation ``src_cut`` (bridged: at every position of
      representation ``dst_cut`` that it maps, the bridge's resampling counted as zero)
    + ``profile_b.suffix_macs(dst_cut)`` (blocks ``dst_cut..n_b-1`` + head).
    """
    check_stitch(profile_a, src_cut, profile_b, dst_cut)
    layer = stitch_module_macs(layer_kind, profile_a.reps[src_cut], profile_b.reps[dst_cut])
    return int(profile_a.prefix_macs(src_cut) + layer + profile_b.suffix_macs(dst_cut))


def stitch_params(profile_a: Profile, src_cut: int, profile_b: Profile, dst_cut: int, layer_kind: str = "linear") -> int:
    """Parameters the stitched network runs: a's stem + blocks ``0..src_cut-1``, the layer, b's rest + head."""
    check_stitch(profile_a, src_cut, profile_b, dst_cut)
    layer = stitch_module_params(layer_kind, profile_a.reps[src_cut], profile_b.reps[dst_cut])
    return int(profile_a.prefix_params(src_cut) + layer + profile_b.suffix_params(dst_cut))


def direct_stitch_macs(src: Adapter, src_cut: int, dst: Adapter, dst_cut: int, input_size: tuple[int, int, int],
                       layer_kind: str = "linear") -> int:
    """MACs of one image through a freshly built :class:`StitchedModel`, counted by running it
    (:func:`klas.models.count_macs`); the cross-check for :func:`stitch_macs`."""
    from klas.models import count_macs

    with torch.no_grad():
        ra = rep_of(src, src.run_blocks(src.stem(torch.zeros(1, *input_size, device=_device_of(src))), 0, src_cut))
        rb = rep_of(dst, dst.run_blocks(dst.stem(torch.zeros(1, *input_size, device=_device_of(dst))), 0, dst_cut))
    layer = make_stitch(layer_kind, ra, rb).to(_device_of(src))
    model = StitchedModel(src, src_cut, layer, dst, dst_cut)
    with torch.no_grad():
        macs, _ = count_macs(model, torch.zeros(1, *input_size, device=_device_of(src)))
    return int(macs)


def rep_of(adapter: Adapter, h: Tensor, index: int = 0) -> Rep:
    """The :class:`Rep` (shape only; no costs) of representation tensor ``h`` of ``adapter``."""
    width, grid, prefix = adapter.shape_of(h)
    return Rep(index, adapter.layout, int(width), tuple(map(int, grid)), int(prefix), 0, 0, bool(adapter.class_token))


def _device_of(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


# -- modules -------------------------------------------------------------------------------------


class StitchedModel(nn.Module):
    """``src`` stem + blocks ``0..src_cut-1`` -> ``stitch`` -> ``dst`` blocks ``dst_cut..`` + head.

    The adapters are referenced, not copied: a StitchedModel built from a :class:`StitchNet` shares the
    anchors' parameters.
    """

    def __init__(self, src: Adapter, src_cut: int, stitch: nn.Module, dst: Adapter, dst_cut: int) -> None:
        super().__init__()
        if not 1 <= src_cut <= src.num_blocks:
            raise KlasError(f"src_cut={src_cut} is outside 1..{src.num_blocks}")
        if not 0 <= dst_cut <= dst.num_blocks - 1:
            raise KlasError(f"dst_cut={dst_cut} is outside 0..{dst.num_blocks - 1}")
        self.src = src
        self.dst = dst
        self.stitch = stitch
        self.src_cut = int(src_cut)
        self.dst_cut = int(dst_cut)

    def representation(self, x: Tensor) -> Tensor:
        """Images -> ``dst``'s last representation (what its head reads)."""
        h = self.src.run_blocks(self.src.stem(x), 0, self.src_cut)
        return self.dst.run_blocks(self.stitch(h), self.dst_cut)

    def forward(self, x: Tensor) -> Tensor:
        return self.dst.head(self.representation(x))

    def pre_logits(self, x: Tensor) -> Tensor:
        """The features ``dst``'s classifier reads (what final-feature matching compares)."""
        return self.dst.pre_logits(self.representation(x))

    def logits_and_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.representation(x)
        return self.dst.head(h), self.dst.pre_logits(h)

    def extra_repr(self) -> str:
        return f"src_cut={self.src_cut}, dst_cut={self.dst_cut}"


class AnchorModel(nn.Module):
    """An anchor seen through the same interface as :class:`StitchedModel`."""

    def __init__(self, adapter: Adapter) -> None:
        super().__init__()
        self.adapter = adapter

    def representation(self, x: Tensor) -> Tensor:
        return self.adapter.run_blocks(self.adapter.stem(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.adapter.head(self.representation(x))

    def pre_logits(self, x: Tensor) -> Tensor:
        return self.adapter.pre_logits(self.representation(x))

    def logits_and_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.representation(x)
        return self.adapter.head(h), self.adapter.pre_logits(h)


def _module_key(name: str) -> str:
    """nn.ModuleDict keys may not contain '.', which timm tags (``vit_b.augreg``) and ids can."""
    return name.replace(".", "\u00b7")


class StitchNet(nn.Module):
    """The anchors, held once, plus one stitch layer per selected stitch (SN-Net's stitchable network).

    ``anchors`` maps a model name to its adapter and ``profiles`` the same names to their profiles (the
    stitch layers' widths and layouts come from them). ``forward(x, name_or_id)`` runs an anchor by name
    or a stitch by id.
    """

    def __init__(
        self,
        anchors: Mapping[str, Adapter],
        profiles: Mapping[str, Profile],
        stitches: Sequence[StitchSpec],
        kind: str = "linear",
    ) -> None:
        super().__init__()
        self.kind = kind
        self.anchors = nn.ModuleDict()
        self.stitch_layers = nn.ModuleDict()
        self._anchor_keys: dict[str, str] = {}
        self._stitch_keys: dict[str, str] = {}
        self.profiles: dict[str, Profile] = {}
        self.specs: dict[str, StitchSpec] = {}
        for name, adapter in anchors.items():
            key = _module_key(name)
            if key in self.anchors:
                raise KlasError(f"two anchors share the name {name!r}")
            if name not in profiles:
                raise KlasError(f"no profile for anchor {name!r}")
            self.anchors[key] = adapter
            self._anchor_keys[name] = key
            self.profiles[name] = profiles[name]
        for spec in stitches:
            if spec.id in self.specs or spec.id in self._anchor_keys:
                raise KlasError(f"duplicate stitch id {spec.id!r} in the selection")
            for role, name in (("source", spec.src), ("target", spec.dst)):
                if name not in self._anchor_keys:
                    raise KlasError(f"stitch {spec.id}: {role} model {name!r} is not among the anchors {list(self._anchor_keys)}")
            pa, pb = self.profiles[spec.src], self.profiles[spec.dst]
            check_stitch(pa, spec.src_cut, pb, spec.dst_cut, what=f"stitch {spec.id}")
            key = f"s{len(self.specs)}"  # ids may hold any character; the ModuleDict key is positional
            self.stitch_layers[key] = make_stitch(kind, pa.reps[spec.src_cut], pb.reps[spec.dst_cut])
            self._stitch_keys[spec.id] = key
            self.specs[spec.id] = spec
        self.train(False)

    @classmethod
    def from_loaded(cls, models: Iterable, stitches: Sequence[StitchSpec], kind: str = "linear") -> "StitchNet":
        """Build from :class:`~klas.models.LoadedModel` objects (what ``cache.load_models`` returns)."""
        models = list(models)
        return cls({m.name: m.adapter for m in models}, {m.name: m.profile for m in models}, stitches, kind)

    def train(self, mode: bool = True) -> "StitchNet":
        """Only stitch layers change mode: anchors always run in eval mode (no dropout or drop-path,
        batch-norm statistics frozen), also when they are fine-tuned (``full_tune``)."""
        super().train(mode)
        self.anchors.eval()
        return self

    # -- lookup -----------------------------------------------------------------------------------
    @property
    def anchor_names(self) -> list[str]:
        return list(self._anchor_keys)

    @property
    def stitch_ids(self) -> list[str]:
        return list(self.specs)

    def adapter(self, name: str) -> Adapter:
        try:
            return self.anchors[self._anchor_keys[name]]
        except KeyError:
            raise KlasError(f"unknown anchor {name!r}; anchors are {', '.join(self._anchor_keys)}") from None

    def stitch_layer(self, sid: str) -> nn.Module:
        try:
            return self.stitch_layers[self._stitch_keys[sid]]
        except KeyError:
            raise KlasError(f"unknown stitch {sid!r}") from None

    def is_anchor(self, name_or_id: str) -> bool:
        return name_or_id in self._anchor_keys

    def model(self, name_or_id: str) -> nn.Module:
        """A :class:`StitchedModel` (or :class:`AnchorModel`) view sharing this net's modules."""
        if self.is_anchor(name_or_id):
            return AnchorModel(self.adapter(name_or_id))
        spec = self.specs.get(name_or_id)
        if spec is None:
            raise KlasError(f"unknown stitch or anchor {name_or_id!r}")
        return StitchedModel(self.adapter(spec.src), spec.src_cut, self.stitch_layer(spec.id), self.adapter(spec.dst), spec.dst_cut)

    def macs(self, name_or_id: str) -> int:
        if self.is_anchor(name_or_id):
            return self.profiles[name_or_id].macs
        s = self.specs[name_or_id]
        return stitch_macs(self.profiles[s.src], s.src_cut, self.profiles[s.dst], s.dst_cut, self.kind)

    def params(self, name_or_id: str) -> int:
        if self.is_anchor(name_or_id):
            return self.profiles[name_or_id].params
        s = self.specs[name_or_id]
        return stitch_params(self.profiles[s.src], s.src_cut, self.profiles[s.dst], s.dst_cut, self.kind)

    # -- running ----------------------------------------------------------------------------------
    def forward(self, x: Tensor, name_or_id: str) -> Tensor:
        return self.model(name_or_id)(x)

    def representations(self, x: Tensor, needs: Mapping[str, Iterable[int]]) -> dict[tuple[str, int], Tensor]:
        """Run each listed anchor's blocks once, as far as needed; return ``{(name, r): representation r}``."""
        out: dict[tuple[str, int], Tensor] = {}
        for name, cuts in needs.items():
            cuts = sorted(set(int(c) for c in cuts))
            if not cuts:
                continue
            adapter = self.adapter(name)
            h = adapter.stem(x)
            r = 0
            for cut in cuts:
                h = adapter.run_blocks(h, r, cut)
                r = cut
                out[(name, cut)] = h
        return out

    def needs(self, ids: Sequence[str]) -> dict[str, set[int]]:
        """Which representations of which anchor the networks ``ids`` start from (anchor -> cuts)."""
        needs: dict[str, set[int]] = {}
        for i in ids:
            if self.is_anchor(i):
                needs.setdefault(i, set()).add(self.profiles[i].num_blocks)
            else:
                s = self.specs[i]
                needs.setdefault(s.src, set()).add(s.src_cut)
        return needs

    def logits_all(self, x: Tensor, ids: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Logits of many stitches and anchors at once, running each anchor's prefix only once."""
        ids = list(self.specs) + list(self._anchor_keys) if ids is None else list(ids)
        reps = self.representations(x, self.needs(ids))
        out: dict[str, Tensor] = {}
        for i in ids:
            if self.is_anchor(i):
                out[i] = self.adapter(i).head(reps[(i, self.profiles[i].num_blocks)])
            else:
                s = self.specs[i]
                dst = self.adapter(s.dst)
                h = self.stitch_layer(i)(reps[(s.src, s.src_cut)])
                out[i] = dst.head(dst.run_blocks(h, s.dst_cut))
        return out
