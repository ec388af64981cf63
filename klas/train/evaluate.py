"""Top-1 accuracy of every stitch and anchor on a split, and per-batch latency."""
from __future__ import annotations

import statistics
import time
from contextlib import nullcontext
from typing import Callable, Sequence

import torch

from klas.stitch.network import StitchNet
from klas.train.data import SplitData


def autocast(device: torch.device, amp_dtype: torch.dtype | None):
    """Mixed precision on CUDA only; a no-op context elsewhere."""
    if amp_dtype is None or device.type != "cuda":
        return nullcontext()
    return torch.autocast("cuda", dtype=amp_dtype)


@torch.no_grad()
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
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Top-1 accuracy (a fraction in [0, 1]) of each id (stitch id or anchor name) on ``data``.

    Each batch runs every anchor's prefix once and branches into all stitches from there
    (:meth:`StitchNet.logits_all`). Under ``torch.distributed`` each rank takes a contiguous share of
    the split and the counts are summed.
    """
    was_training = net.training
    net.eval()
    lo, hi = rank * data.n // world, (rank + 1) * data.n // world
    correct = torch.zeros(len(ids), dtype=torch.float64)
    for x, y, _ in data.batches(range(lo, hi), batch_size, device):
        with autocast(device, amp_dtype):
            out = net.logits_all(x, ids)
        for k, i in enumerate(ids):
            correct[k] += (out[i].argmax(1) == y).sum().item()
        if on_batch:
            on_batch(len(y))
    if world > 1:
        import torch.distributed as dist

        c = correct.to(device)
        dist.all_reduce(c)
        correct = c.cpu()
    net.train(was_training)
    return {i: float(correct[k] / data.n) for k, i in enumerate(ids)}


@torch.no_grad()
def measure_latency(
    model: torch.nn.Module,
    x: torch.Tensor,
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    repeats: int = 10,
    warmup: int = 2,
) -> float:
    """Median wall-clock milliseconds of one forward pass over the batch ``x``."""
    model.eval()
    x = x.to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    with autocast(device, amp_dtype):
        for k in range(warmup + repeats):
            sync()
            t0 = time.perf_counter()
            model(x)
            sync()
            if k >= warmup:
                times.append((time.perf_counter() - t0) * 1000.0)
    return float(statistics.median(times))
