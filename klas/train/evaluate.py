"""Top-1 accuracy of many stitches and anchors at once, and per-batch latency.

One grouped evaluator serves ``klas train`` and the benchmarks: :func:`correct_per_image` runs several
:class:`~klas.stitch.network.StitchNet`\\ s that share their anchor modules over a split, each anchor
prefix once per batch (:mod:`klas.train.forward`), and returns which images each network got right;
:func:`evaluate_all` turns that into accuracies, also under ``torch.distributed``.
"""
from __future__ import annotations

import time
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from klas.models import median_ms
from klas.optim import autocast
from klas.stitch.network import StitchNet
from klas.train.data import SplitData
from klas.train.forward import anchor_outputs, group_outputs, needs_of, target_groups, target_of


@torch.inference_mode()
def correct_per_image(
    nets: Mapping[str, tuple[StitchNet, Sequence[str]]],
    data: SplitData,
    *,
    batch_size: int,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    chunk_images: int = 0,
    positions: Sequence[int] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """``{tag: {id: bool array}}``: per image of ``positions`` (default: the whole split, in order),
    whether each listed stitch id / anchor name of each ``(net, ids)`` predicts the label.

    All nets must share the same anchor modules. Each anchor's blocks run once per batch. With
    ``chunk_images`` 0 (the default) the batch streams through each anchor in turn: at every
    representation a stitch leaves, those stitches run at once (stitch module, target suffix, head) and
    the representation is dropped, so only one representation per anchor is held at a time; each
    network computes exactly what it computes alone. With ``chunk_images`` > 0, stitches continuing in
    the same target block run together in chunks of that many images (every representation is held).
    """
    first = next(iter(nets.values()))[0]
    modes = [net.training for net, _ in nets.values()]
    for net, _ in nets.values():
        net.eval()
    out: dict[str, dict[str, list]] = {tag: {i: [] for i in ids} for tag, (_, ids) in nets.items()}
    run = _chunked(nets, chunk_images, batch_size) if chunk_images else _streamed(nets)
    for x, y, _ in data.batches(range(data.n) if positions is None else positions, batch_size, device):
        with autocast(device, amp_dtype):
            for tag, i, logits in run(first, x):
                out[tag][i].append((logits.argmax(1) == y).cpu())
        if on_batch:
            on_batch(len(y))
    for (net, _), mode in zip(nets.values(), modes):
        net.train(mode)
    return {tag: {i: (torch.cat(v).numpy() if v else np.zeros(0, bool)) for i, v in d.items()} for tag, d in out.items()}


def _streamed(nets: Mapping[str, tuple[StitchNet, Sequence[str]]]):
    """``run(first, x)`` yielding ``(tag, id, logits)``: each anchor's blocks once, every stitch run as soon
    as its source representation exists, every representation dropped once its stitches have run."""
    leaving: dict[tuple[str, int], list[tuple[str, StitchNet, str]]] = {}
    for tag, (net, ids) in nets.items():
        for i in ids:
            key = (i, net.profiles[i].num_blocks) if net.is_anchor(i) else (net.specs[i].src, net.specs[i].src_cut)
            leaving.setdefault(key, []).append((tag, net, i))
    walk: dict[str, list[int]] = {}
    for name, cut in sorted(leaving):
        walk.setdefault(name, []).append(cut)

    def run(first: StitchNet, x: torch.Tensor):
        for name, cuts in walk.items():
            adapter = first.adapter(name)
            h, r = adapter.stem(x), 0
            for cut in cuts:
                h, r = adapter.run_blocks(h, r, cut), cut
                for tag, net, i in leaving[(name, cut)]:
                    if net.is_anchor(i):
                        yield tag, i, net.adapter(i).head(h)
                    else:
                        s = net.specs[i]
                        dst = net.adapter(s.dst)
                        yield tag, i, dst.head(dst.run_blocks(net.stitch_layer(i)(h), s.dst_cut))
    return run


def _chunked(nets: Mapping[str, tuple[StitchNet, Sequence[str]]], chunk_images: int, batch_size: int):
    """``run(first, x)`` yielding ``(tag, id, logits)``: every needed representation first, then stitches
    that resume the same target block together, ``chunk_images // batch_size`` per call."""
    needs = needs_of(nets.values())
    plans = {tag: ([i for i in ids if net.is_anchor(i)],
                   target_groups(net, [i for i in ids if not net.is_anchor(i)], chunk_images, batch_size))
             for tag, (net, ids) in nets.items()}

    def run(first: StitchNet, x: torch.Tensor):
        reps = first.representations(x, needs)
        for tag, (net, _) in nets.items():
            anchor_ids, groups = plans[tag]
            for a in anchor_ids:
                yield tag, a, anchor_outputs(net, a, reps).logits
            for group in groups:
                for i, o in zip(group[2], group_outputs(net, group, reps)):
                    yield tag, i, o.logits
    return run


def evaluate_all(
    net: StitchNet,
    data: SplitData,
    ids: Sequence[str],
    *,
    batch_size: int,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    rank: int = 0,
    world: int = 1,
    chunk_images: int = 0,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Top-1 accuracy (a fraction in [0, 1]) of each id (stitch id or anchor name) on ``data``.

    Under ``torch.distributed`` each rank takes a contiguous share of the split and the counts are summed.
    """
    lo, hi = rank * data.n // world, (rank + 1) * data.n // world
    bits = correct_per_image({"": (net, ids)}, data, batch_size=batch_size, device=device, amp_dtype=amp_dtype,
                             chunk_images=chunk_images, positions=range(lo, hi), on_batch=on_batch)[""]
    correct = torch.tensor([int(bits[i].sum()) for i in ids], dtype=torch.float64)
    if world > 1:
        import torch.distributed as dist

        c = correct.to(device)
        dist.all_reduce(c)
        correct = c.cpu()
    return {i: float(correct[k] / data.n) for k, i in enumerate(ids)}


def required_macs(net: StitchNet, ids: Sequence[str]) -> int:
    """MACs per image the networks ``ids`` must cost together, at least: every model they use, forward
    once (their shared prefixes inside it), plus every stitch's own stitch module and suffix."""
    used = set()
    extra = 0
    for i in ids:
        if net.is_anchor(i):
            used.add(i)
        else:
            s = net.specs[i]
            used.add(s.src)
            extra += net.macs(i) - net.profiles[s.src].prefix_macs(s.src_cut)
    return sum(net.profiles[n].macs for n in used) + extra


@torch.inference_mode()
def bare_throughput(net: StitchNet, ids: Sequence[str], x: torch.Tensor, *, device: torch.device,
                    amp_dtype: torch.dtype | None = None) -> dict[str, float]:
    """The device's throughput on these models: MACs per second of one bare forward pass of the batch
    ``x`` through every model the networks ``ids`` use (call it with the models warm: no warm-up pass),
    per wall-clock second (``macs_per_s``) and per second of this process's CPU time (``macs_per_cpu_s``,
    which a busy machine disturbs less)."""
    names = sorted({n for n in needs_of([(net, ids)])} | {target_of(net, i) for i in ids})
    x = x.to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with autocast(device, amp_dtype):
        sync()
        wall, cpu = time.perf_counter(), time.process_time()
        for n in names:
            net.adapter(n)(x)  # Adapter.forward: stem -> every block -> head
        sync()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    macs = sum(net.profiles[n].macs for n in names) * x.shape[0]
    return {"macs_per_s": macs / max(wall, 1e-12), "macs_per_cpu_s": macs / max(cpu, 1e-12)}


@torch.inference_mode()  # as klas.stitch.latency's profiles are timed
def measure_latency(
    model: torch.nn.Module,
    x: torch.Tensor,
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    repeats: int = 10,
    warmup: int = 2,
) -> float:
    """Median wall-clock milliseconds of one forward pass over the batch ``x`` (:func:`klas.models.median_ms`)."""
    model.eval()
    x = x.to(device)
    with autocast(device, amp_dtype):
        return median_ms(lambda: model(x), device=device, repeats=repeats, warmup=warmup)


__all__ = ["autocast", "bare_throughput", "correct_per_image", "evaluate_all", "measure_latency", "required_macs"]
