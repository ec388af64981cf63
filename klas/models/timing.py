"""Wall-clock timing on the device a model runs on: one timer for every latency klas reports.

* :func:`median_ms`: the median of ``repeats`` timed calls after ``warmup`` untimed ones, the device
  synchronised around each (CUDA), so a call's time is its whole work.
* :func:`part_times`: stem, every block and the head of an adapter, timed inside whole forward passes
  (each part on the real output of the one before), median per part: what a latency profile records.
* :func:`warm_up`: untimed calls until the device is warm (at least :data:`WARMUP_SECONDS`): a CPU
  coming from other work ran the first networks it timed 20-30 % slow after one warm-up pass each.
* :func:`device_identity`: which device, threads, torch and dtype a measurement belongs to; a
  latency profile is used only where it matches.
"""
from __future__ import annotations

import functools
import platform
import statistics
import time
from typing import Any, Callable, Sequence

import torch

from klas.models.adapters import Adapter
from klas.optim import autocast

#: Identity fields a latency profile must share with the device it predicts for.
IDENTITY_KEYS = ("type", "name", "threads", "dtype")


#: How long :func:`warm_up` keeps calling before anything is timed.
WARMUP_SECONDS = 0.3


def _sync(device: torch.device) -> Callable[[], None]:
    device = torch.device(device)
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def warm_up(fns: Sequence[Callable[[], Any]], *, device: torch.device, seconds: float = WARMUP_SECONDS) -> float:
    """Call every function of ``fns`` once, then keep cycling through them until ``seconds`` have passed
    (thread pools, clocks and caches settle); returns the seconds it took."""
    sync, t0 = _sync(device), time.perf_counter()
    while True:
        for fn in fns:
            fn()
        sync()
        if time.perf_counter() - t0 >= seconds:
            return time.perf_counter() - t0


def median_ms(fn: Callable[[], Any], *, device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median wall-clock milliseconds of ``fn()`` over ``repeats`` calls, after ``warmup`` untimed calls."""
    sync, times = _sync(device), []
    for k in range(warmup + repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        if k >= warmup:
            times.append((time.perf_counter() - t0) * 1000.0)
    return float(statistics.median(times))


@torch.inference_mode()
def part_times(adapter: Adapter, x: torch.Tensor, *, device: torch.device, amp_dtype: torch.dtype | None = None,
               repeats: int, warmup: int = 1) -> dict[str, Any]:
    """``{"stem": ms, "blocks": [ms, ...], "head": ms, "forward": ms}``: median ms of each part over
    ``repeats`` whole forward passes of the batch ``x`` (after ``warmup`` passes), each part timed on the
    real output of the part before it, the device synchronised between parts; ``forward`` is the median
    of the passes' totals, which the sum of the parts' medians understates when a pass's parts vary
    (:class:`klas.stitch.latency.LatencyProfile` scales the parts to it)."""
    was = adapter.training
    adapter.eval()
    sync = _sync(device)
    runs: list[list[float]] = []
    parts = [adapter.stem, *adapter.blocks, adapter.head]
    with autocast(torch.device(device), amp_dtype):
        for k in range(warmup + repeats):
            h, times = x, []
            for part in parts:
                sync()
                t0 = time.perf_counter()
                h = part(h)
                sync()
                times.append((time.perf_counter() - t0) * 1000.0)
            if k >= warmup:
                runs.append(times)
    adapter.train(was)
    med = [float(statistics.median(col)) for col in zip(*runs)]
    return {"stem": med[0], "blocks": med[1:-1], "head": med[-1], "forward": float(statistics.median(map(sum, runs)))}


@functools.lru_cache(maxsize=1)
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_identity(device: torch.device | str, amp: str | None = None) -> dict[str, Any]:
    """What a latency measurement on ``device`` belongs to: ``type``, ``name`` (the CPU model or the GPU),
    ``threads`` (torch's intra-op threads on CPU, else null), ``dtype`` (the parameters' float32, or the
    ``--amp`` dtype ``bf16`` / ``fp16``), and ``torch`` (the version, recorded, not compared)."""
    device = torch.device(device)
    if device.type == "cuda":
        name, threads = torch.cuda.get_device_name(device), None
    else:
        name, threads = (_cpu_name() if device.type == "cpu" else device.type), torch.get_num_threads()
    return {"type": device.type, "name": name, "threads": threads, "dtype": amp or "float32", "torch": torch.__version__}


def same_device(a: dict, b: dict) -> bool:
    """Whether two :func:`device_identity` records describe the same device, threads and dtype."""
    return all(a.get(k) == b.get(k) for k in IDENTITY_KEYS)


def describe_device(d: dict) -> str:
    """``cpu "Intel Xeon ..." 2 threads float32`` / ``cuda "NVIDIA H200" bf16``: an identity in one phrase."""
    threads = f" {d.get('threads')} threads" if d.get("threads") is not None else ""
    return f"{d.get('type')} \"{d.get('name')}\"{threads} {d.get('dtype')}"


__all__ = ["IDENTITY_KEYS", "describe_device", "device_identity", "median_ms", "part_times", "same_device"]
