"""The latency ``klas train`` reports: measured for the networks that matter, predicted for all, compared.

* Which networks are timed (``--latency``): ``front`` (default) the anchors and those on the GFLOPs
  front or on the predicted-latency front of the trained accuracies (the best network under a budget
  on either axis is one of them, as far as the prediction ranks latency right), ``all``, or ``off``.
* How: the models the timed networks use run untimed forward passes on the batch for at least
  :data:`klas.models.timing.WARMUP_SECONDS` (:func:`klas.models.warm_up`); then each
  network is timed ``repeats`` times and the median kept (:func:`klas.models.median_ms`), on the
  device and under the cache's ``--amp`` (the dtype its latency profile was measured in).
* The prediction: the cache's latency profile for this device and batch (:mod:`klas.stitch.latency`),
  for every network; absent (with the reason) when the cache has no such profile.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from klas.errors import KlasError
from klas.metrics import pareto_front
from klas.models import device_identity, median_ms, warm_up
from klas.optim import AMP_DTYPES, autocast
from klas.stitch.latency import LatencyProfile, find_profile
from klas.stitch.network import StitchNet
from klas.train.forward import target_of


@dataclass
class LatencyReport:
    """Measured and predicted ms per batch, and how they compare (``train.json``'s ``latency``)."""

    measured: dict[str, float] = field(default_factory=dict)
    predicted: dict[str, float] = field(default_factory=dict)
    profile: str | None = None  # which profile predicted ("batch 1 on cpu ..."), or why none did
    device: dict | None = None
    warmup_seconds: float = 0.0
    retests: list[dict[str, float]] = field(default_factory=list)  # later timing passes, same networks

    def retest_changes(self) -> list[float]:
        """|retest - first| / first of every network over every later pass (test-retest of the clock)."""
        return [abs(again[i] - m) / m for again in self.retests for i, m in self.measured.items() if m > 0 and i in again]

    def errors(self) -> dict[str, float]:
        """Relative error (predicted - measured) / measured of every network that has both."""
        return {i: (self.predicted[i] - m) / m for i, m in self.measured.items() if i in self.predicted and m > 0}

    def summary(self) -> dict | None:
        """Median and worst absolute relative error of the predictor over the timed networks (None without)."""
        err = [abs(e) for e in self.errors().values()]
        if not err:
            return None
        return {"median": statistics.median(err), "worst": max(err), "networks": len(err)}


def predictions(net: StitchNet, ids: Sequence[str], cache, device: torch.device, batch: int) -> tuple[dict[str, float], str, LatencyProfile | None]:
    """Predicted ms of every network from the cache's profile for this device and batch, or ({}, why not, None)."""
    identity = device_identity(device, cache.manifest.get("amp"))
    try:
        profile = find_profile(cache.path, cache.fingerprint, identity, batch)
    except KlasError as exc:
        return {}, str(exc), None
    pred = {}
    for i in ids:
        if net.is_anchor(i):
            pred[i] = profile.route_ms(net.profiles, i)
        else:
            s = net.specs[i]
            pred[i] = profile.route_ms(net.profiles, s.src, s.src_cut, s.dst, s.dst_cut, net.kind)
    return pred, profile.describe(), profile


def to_time(mode: str, ids: Sequence[str], macs: Mapping[str, float], acc: Mapping[str, float],
            predicted: Mapping[str, float], anchors: Sequence[str] | None = None) -> list[str]:
    """The networks ``--latency mode`` times, in ``ids`` order: all of them, or those on the GFLOPs front
    or the predicted-latency front of ``acc`` (the GFLOPs front alone without predictions) and the
    anchors (the references every budget is read against); none when off."""
    if mode == "off":
        return []
    if mode == "all":
        return list(ids)
    points = [{"id": i, "macs": macs[i], "acc": acc[i], "ms": predicted.get(i, math.nan)} for i in ids]
    keep = {i for i in ids if anchors is not None and i in anchors}
    keep |= {p["id"] for p in pareto_front(points, cost="macs", acc="acc")}
    keep |= {p["id"] for p in pareto_front(points, cost="ms", acc="acc")}
    return [i for i in ids if i in keep]


def _models_of(net: StitchNet, ids: Sequence[str]) -> list[str]:
    """The anchors the networks ``ids`` run (sources and targets), in net order."""
    used = set()
    for i in ids:
        used.add(i if net.is_anchor(i) else net.specs[i].src)
        used.add(target_of(net, i))
    return [n for n in net.anchor_names if n in used]


@torch.inference_mode()  # as the profile's parts were timed (no_grad's bookkeeping is 10-20 % at batch 1 here)
def time_networks(net: StitchNet, ids: Sequence[str], x: torch.Tensor, *, device: torch.device, amp: str | None,
                  repeats: int, on_done=None) -> tuple[dict[str, float], float]:
    """Median ms per forward pass of ``x`` of each network: the models it uses warmed up together
    (:func:`klas.models.warm_up`), then ``repeats`` timed runs per network. Returns the times and the seconds the warm-ups took."""
    if not ids:
        return {}, 0.0
    was = net.training
    net.eval()
    x = x.to(device)
    dtype = AMP_DTYPES.get(amp)
    t0 = time.perf_counter()
    with autocast(device, dtype):
        warm_up([lambda m=net.model(name): m(x) for name in _models_of(net, ids)], device=device)
        warm = time.perf_counter() - t0
        out = {}
        for i in ids:
            model = net.model(i)
            out[i] = median_ms(lambda: model(x), device=device, repeats=repeats, warmup=0)
            if on_done:
                on_done(i)
    net.train(was)
    return out, warm


def check_predictor(run_dir, *, batch: int, repeats: int, device: str | None = None, root=None,
                    limit: int | None = None, passes: int = 1, on_done=None) -> LatencyReport:
    """The predictor against the clock on every network of a searched run (its selected stitches and
    anchors; the first ``limit`` by cost when given): each timed as ``klas train`` times it (a shared
    warm-up, median of ``repeats``) on a random batch of ``batch`` images, beside its prediction
    from the cache's profile for this device and batch (refused in one line when there is none).
    With ``passes`` > 1 the same loaded networks are timed again after the first pass (no second
    load; each pass warms up as ``klas train`` does), in ``retests``: the clock's own test-retest spread
    beside the predictor's error.
    Latency does not depend on the weights, so the stitch layers are left untrained."""
    from pathlib import Path

    from klas.fs import DEFAULT_ROOT
    from klas.run import open_run_cache, read_selection, stitch_specs
    from klas.utils import resolve_device

    if passes < 1:
        raise KlasError(f"passes must be at least 1, got {passes}: pass 1 to time each network once")
    run_dir = Path(run_dir)
    selection = read_selection(run_dir)
    cache = open_run_cache(selection, run_dir)
    dev = resolve_device(device)
    specs = stitch_specs(selection)
    used = {n for s in specs for n in (s.src, s.dst)} | {a["name"] for a in selection["anchors"]}
    models = [m for m in cache.load_models(device=dev, root=Path(root or DEFAULT_ROOT)) if m.name in used]
    net = StitchNet.from_loaded(models, specs, kind=selection.get("layer") or "linear").to(dev)
    ids = sorted([s.id for s in specs] + [a["name"] for a in selection["anchors"]], key=lambda i: (net.macs(i), i))
    ids = ids[:limit] if limit else ids
    predicted, why, profile = predictions(net, ids, cache, dev, batch)
    if profile is None:
        raise KlasError(why)
    size = cache.profiles[models[0].name].input_size
    x = torch.randn((batch, *size), generator=torch.Generator().manual_seed(0))
    timed = [time_networks(net, ids, x, device=dev, amp=cache.manifest.get("amp"), repeats=repeats, on_done=on_done)
             for _ in range(passes)]
    (measured, warm), retests = timed[0], [ms for ms, _ in timed[1:]]
    return LatencyReport(measured, predicted, profile.describe(), profile.device, warm, retests)


__all__ = ["LatencyReport", "check_predictor", "predictions", "time_networks", "to_time"]
