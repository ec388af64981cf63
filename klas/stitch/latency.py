"""Latency on the user's own device: per-block profiles measured at cache time, and a predictor for any route.

**Profile** (:class:`LatencyProfile`, one per device and batch size): the median milliseconds of every
model's stem, each block and the head, timed inside whole forward passes on a batch of ``batch``
images (:func:`klas.models.timing.part_times`), and of every stitch module search may propose,
one per distinct shape (:func:`stitch_shapes`: kind x source representation x target
representation, bridges included), timed on a batch of that representation. ``klas cache`` measures
them on the device and under the ``--amp`` it runs (``--latency-batch 1,64``) and stores them in
``CACHE/latency.json`` beside the manifest's MACs profile, with the device's name, threads, dtype and
torch version (:func:`klas.models.timing.device_identity`).

**Predictor**: a stitch ``a[0..src_cut-1] -> b[dst_cut..]`` takes ``a``'s stem and blocks
``0..src_cut-1`` + its stitch module + ``b``'s blocks ``dst_cut..`` and head; an anchor its stem,
blocks and head; a Stitch Tree its trunk prefix + the trunk's suffix + every other branch's stitch
module and suffix. Each model's parts are scaled by one factor, its whole forward pass (the median of
the timed passes' totals) over the sum of its parts' medians: a median per part leaves out the
variation between passes, which made the plain sum 5-10 % low on small networks, so an anchor's
prediction is its measured forward pass. Each prediction is the exactly rounded sum (``math.fsum``)
of the scaled parts (:meth:`LatencyProfile.route_parts`), so it is the same whichever order they come in.

A profile predicts only for the device, threads and dtype it was measured on, and the batch size:
:func:`find_profile` refuses any other in one line naming the fix (``klas cache --out CACHE`` on this
device adds its profile).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from klas.errors import KlasError
from klas.fs import write_json_atomic
from klas.models import Adapter, Profile, Rep, describe_device, median_ms, part_times, same_device, warm_up
from klas.optim import autocast
from klas.stitch.bridge import make_stitch

FILE = "latency.json"
FORMAT = "klas.latency/2"  # /2: every model records "forward" (/1 profiles are re-measured)
STATISTIC = "median ms per forward pass of one batch"


def rep_key(rep: Rep) -> str:
    """A representation's shape, which is all a stitch module's latency depends on: ``tokens 14x14+1c w192``."""
    return f"{rep.layout} {rep.grid[0]}x{rep.grid[1]}+{rep.num_prefix}{'c' if rep.class_token else ''} w{rep.width}"


def stitch_key(kind: str, src: Rep, dst: Rep) -> str:
    """The key of a stitch module's latency: ``linear tokens 14x14+1c w192 -> nchw 56x56+0 w256``."""
    return f"{kind} {rep_key(src)} -> {rep_key(dst)}"


def stitch_shapes(profiles: Mapping[str, Profile], kinds: Sequence[str]) -> dict[str, tuple[str, Rep, Rep]]:
    """Every distinct stitch module any search or tree may build between these models (any direction):
    key -> (kind, source rep, target rep); sources are representations 1..n_a, targets 0..n_b-1."""
    shapes: dict[str, tuple[str, Rep, Rep]] = {}
    for a, pa in profiles.items():
        for b, pb in profiles.items():
            if a == b:
                continue
            for ra in pa.reps[1:]:
                for rb in pb.reps[:-1]:
                    for kind in kinds:
                        shapes.setdefault(stitch_key(kind, ra, rb), (kind, ra, rb))
    return shapes


def rep_tensor(rep: Rep, batch: int, device: torch.device, generator: torch.Generator) -> Tensor:
    """A random batch in the layout of representation ``rep`` (what a stitch module reads)."""
    h, w = rep.grid
    shape = {"tokens": (batch, rep.num_prefix + h * w, rep.width), "nhwc": (batch, h, w, rep.width),
             "nchw": (batch, rep.width, h, w)}[rep.layout]
    return torch.randn(shape, generator=generator).to(device)


@dataclass
class LatencyProfile:
    """Recorded latencies of one device and batch size (see the module docstring); all in ms per batch."""

    device: dict[str, Any]
    batch: int
    repeats: int
    models: dict[str, dict[str, Any]]  # name -> {"stem": ms, "blocks": [ms, ...], "head": ms, "forward": ms}
    stitches: dict[str, float]  # stitch_key -> ms
    seconds: float = 0.0  # how long measuring took
    statistic: str = STATISTIC

    # -- the predictor ---------------------------------------------------------------------------------
    def _model(self, name: str) -> dict[str, Any]:
        if name not in self.models:
            raise KlasError(f"the latency profile has no model {name!r} (it has {', '.join(self.models)}); "
                            f"re-run klas cache --out CACHE on this device")
        return self.models[name]

    def scale(self, name: str) -> float:
        """``name``'s whole forward pass over the sum of its parts' medians (1.0 when they sum to 0)."""
        m = self._model(name)
        parts = math.fsum([m["stem"], *m["blocks"], m["head"]])
        return m["forward"] / parts if parts > 0 else 1.0

    def prefix_parts(self, name: str, cut: int) -> list[float]:
        """The ms of the stem and blocks ``0..cut-1`` of ``name`` (recorded, times :meth:`scale`)."""
        m, f = self._model(name), self.scale(name)
        return [f * v for v in (m["stem"], *m["blocks"][:cut])]

    def suffix_parts(self, name: str, cut: int) -> list[float]:
        """The ms of blocks ``cut..n-1`` and the head of ``name`` (recorded, times :meth:`scale`)."""
        m, f = self._model(name), self.scale(name)
        return [f * v for v in (*m["blocks"][cut:], m["head"])]

    def stitch_ms(self, kind: str, src: Rep, dst: Rep) -> float:
        key = stitch_key(kind, src, dst)
        if key not in self.stitches:
            raise KlasError(f"the latency profile has no {key} stitch module (its cache holds other models or "
                            f"layer kinds); re-run klas cache --out CACHE on this device")
        return self.stitches[key]

    def route_parts(self, profiles: Mapping[str, Profile], src: str, src_cut: int | None = None, dst: str | None = None,
                    dst_cut: int | None = None, kind: str = "linear") -> dict[str, list[float]]:
        """The recorded parts a network runs: ``prefix`` (stem + blocks), ``stitch``, ``suffix`` (blocks + head).
        An anchor (``dst`` None) is its whole model: prefix to its last block, no stitch, its head."""
        if dst is None:
            n = profiles[src].num_blocks
            return {"prefix": self.prefix_parts(src, n), "stitch": [], "suffix": self.suffix_parts(src, n)}
        return {"prefix": self.prefix_parts(src, src_cut), "stitch": [self.stitch_ms(kind, profiles[src].reps[src_cut],
                                                                                    profiles[dst].reps[dst_cut])],
                "suffix": self.suffix_parts(dst, dst_cut)}

    def route_ms(self, profiles: Mapping[str, Profile], src: str, src_cut: int | None = None, dst: str | None = None,
                 dst_cut: int | None = None, kind: str = "linear") -> float:
        """Predicted ms per batch of a stitch (or, with ``dst`` None, an anchor): the sum of its parts."""
        parts = self.route_parts(profiles, src, src_cut, dst, dst_cut, kind)
        return math.fsum(v for p in parts.values() for v in p)

    def tree_parts(self, profiles: Mapping[str, Profile], trunk: str, share: int, branches: Sequence[tuple[str, int]],
                   kind: str = "linear") -> dict[str, list[float]]:
        """A Stitch Tree's parts: the trunk prefix once, the trunk's own suffix, every branch's stitch module and suffix."""
        rep = profiles[trunk].reps[share]
        parts = {"trunk_prefix": self.prefix_parts(trunk, share), trunk: self.suffix_parts(trunk, share)}
        for m, c in branches:
            parts[m] = [self.stitch_ms(kind, rep, profiles[m].reps[c]), *self.suffix_parts(m, c)]
        return parts

    def tree_ms(self, profiles: Mapping[str, Profile], trunk: str, share: int, branches: Sequence[tuple[str, int]],
                kind: str = "linear") -> float:
        """Predicted ms per batch of a Stitch Tree's ``outputs``: the sum of :meth:`tree_parts`."""
        return math.fsum(v for p in self.tree_parts(profiles, trunk, share, branches, kind).values() for v in p)

    # -- storage ---------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"device": self.device, "batch": self.batch, "repeats": self.repeats, "statistic": self.statistic,
                "seconds": round(self.seconds, 3), "models": self.models, "stitches": self.stitches}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "LatencyProfile":
        return cls(dict(d["device"]), int(d["batch"]), int(d["repeats"]),
                   {k: {"stem": float(v["stem"]), "blocks": [float(b) for b in v["blocks"]], "head": float(v["head"]),
                        "forward": float(v["forward"])}
                    for k, v in d["models"].items()},
                   {k: float(v) for k, v in d["stitches"].items()}, float(d.get("seconds", 0.0)),
                   str(d.get("statistic", STATISTIC)))

    def describe(self) -> str:
        return f"batch {self.batch} on {describe_device(self.device)}"


# -- measuring -------------------------------------------------------------------------------------


def measure_profile(models: Mapping[str, Adapter], profiles: Mapping[str, Profile], *, batch: int,
                    device: torch.device, amp_dtype: torch.dtype | None, identity: dict[str, Any], repeats: int,
                    kinds: Sequence[str], seed: int = 0, on_step: Callable[[int, int], None] | None = None) -> LatencyProfile:
    """Measure one :class:`LatencyProfile`: every model's parts on a random batch of ``batch`` images at its
    profiled input size, and every stitch module of :func:`stitch_shapes` on a random batch of its source
    representation (median of ``repeats``, after the models ran together for :func:`klas.models.warm_up`'s
    time and each item once more)."""
    t0 = time.perf_counter()
    shapes = stitch_shapes(profiles, kinds)
    steps = len(models) + len(shapes)
    g = torch.Generator().manual_seed(seed)
    done = 0
    timed: dict[str, dict[str, Any]] = {}
    inputs = {name: torch.randn((batch, *profiles[name].input_size), generator=g).to(device) for name in models}
    _warm_models(models, inputs, device, amp_dtype)
    for name, adapter in models.items():
        timed[name] = part_times(adapter, inputs[name], device=device, amp_dtype=amp_dtype, repeats=repeats)
        done += 1
        if on_step:
            on_step(done, steps)
    stitches = {}
    with torch.inference_mode(), autocast(device, amp_dtype):
        for key, (kind, src, dst) in shapes.items():
            module = make_stitch(kind, src, dst).to(device).eval()
            h = rep_tensor(src, batch, device, g)
            stitches[key] = median_ms(lambda: module(h), device=device, repeats=repeats)
            done += 1
            if on_step:
                on_step(done, steps)
    return LatencyProfile(identity, int(batch), int(repeats), timed, stitches, time.perf_counter() - t0)


def _warm_models(models: Mapping[str, Adapter], inputs: Mapping[str, Tensor], device: torch.device,
                 amp_dtype: torch.dtype | None) -> None:
    """Whole forward passes of every model in eval mode (:func:`klas.models.warm_up`); modes restored."""
    modes = {n: a.training for n, a in models.items()}
    try:
        with torch.inference_mode(), autocast(device, amp_dtype):
            for a in models.values():
                a.eval()
            warm_up([lambda a=a, x=inputs[n]: a(x) for n, a in models.items()], device=device)
    finally:
        for n, a in models.items():
            a.train(modes[n])


def measure_steps(profiles: Mapping[str, Profile], kinds: Sequence[str]) -> int:
    """How many timed items :func:`measure_profile` has (models + stitch shapes), for a progress bar."""
    return len(profiles) + len(stitch_shapes(profiles, kinds))


# -- the file beside the cache's manifest ----------------------------------------------------------


def read_profiles(cache_dir: Path | str, fingerprint: str) -> list[LatencyProfile]:
    """The profiles in ``CACHE/latency.json`` measured for this cache (``fingerprint``); none when the file
    is absent, unreadable or of another cache (the cache was rebuilt)."""
    import json

    path = Path(cache_dir) / FILE
    try:
        doc = json.loads(path.read_text())
        if doc.get("format") != FORMAT or doc.get("cache_fingerprint") != fingerprint:
            return []
        return [LatencyProfile.from_json(p) for p in doc["profiles"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []


def write_profiles(cache_dir: Path | str, fingerprint: str, new: Sequence[LatencyProfile]) -> None:
    """Add ``new`` to ``CACHE/latency.json`` (atomically), replacing earlier profiles of the same device and batch."""
    keep = [p for p in read_profiles(cache_dir, fingerprint)
            if not any(same_device(p.device, n.device) and p.batch == n.batch for n in new)]
    profiles = sorted(keep + list(new), key=lambda p: (describe_device(p.device), p.batch))
    write_json_atomic(Path(cache_dir) / FILE, {"format": FORMAT, "cache_fingerprint": fingerprint,
                                               "profiles": [p.to_json() for p in profiles]})


def missing_batches(cache_dir: Path | str, fingerprint: str, identity: dict, batches: Sequence[int]) -> list[int]:
    """The batch sizes of ``batches`` that have no profile for this device yet."""
    have = {p.batch for p in read_profiles(cache_dir, fingerprint) if same_device(p.device, identity)}
    return [b for b in batches if b not in have]


def find_profile(cache_dir: Path | str, fingerprint: str, identity: dict, batch: int, flag: str = "--latency-batch") -> LatencyProfile:
    """The profile of this device (``identity``) at ``batch``, or a one-line error naming the fix:
    no profile at all, only other devices' (named), or only other batch sizes (listed)."""
    cache_dir = Path(cache_dir)
    profiles = read_profiles(cache_dir, fingerprint)
    here = [p for p in profiles if same_device(p.device, identity)]
    for p in here:
        if p.batch == batch:
            return p
    add = f"klas cache --out {cache_dir} --latency-batch {batch}"
    if not profiles:
        raise KlasError(f"cache {cache_dir} has no latency profile; measure one on this device with: {add}")
    if not here:
        other = "; ".join(sorted({describe_device(p.device) for p in profiles}))
        raise KlasError(f"cache {cache_dir}'s latency profile was measured on {other}, not on this device "
                        f"({describe_device(identity)}); measure this device's with: {add}")
    sizes = ", ".join(str(p.batch) for p in sorted(here, key=lambda p: p.batch))
    raise KlasError(f"cache {cache_dir}'s latency profile on this device covers batch {sizes}, not {flag} {batch}; "
                    f"use one of those or measure it with: {add}")


__all__ = ["FILE", "FORMAT", "LatencyProfile", "find_profile", "measure_profile", "measure_steps", "missing_batches",
           "read_profiles", "rep_key", "rep_tensor", "stitch_key", "stitch_shapes", "write_profiles"]
