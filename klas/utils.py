"""Small shared helpers that need torch: devices, seeding, hashing, distributed set-up.

File mechanics (atomic writes, owned directories, locks) live in :mod:`klas.fs`, torch-free.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from klas.errors import KlasError
from klas.fs import DEFAULT_ROOT, atomic_dir, check_free_space, read_json, write_json_atomic  # noqa: F401  re-exported
from klas.units import FLOPS_CONVENTION  # noqa: F401  re-exported

def resolve_device(device: str | None = None) -> torch.device:
    """``None``/``"auto"`` picks CUDA when present, else CPU; anything else is passed to torch."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise KlasError(f"unknown device {device!r}; use 'auto', 'cpu' or 'cuda[:N]'") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise KlasError(f"device {device!r} asked for but CUDA is not available; use --device cpu")
    return dev


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a CPU generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_state_dict(state: dict[str, torch.Tensor]) -> str:
    """Hex SHA-256 over a state dict's names, dtypes, shapes and bytes (order-independent)."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def dist_rank_world() -> tuple[int, int]:
    """(rank, world size); under torchrun, initialises the default process group on first call.

    gloo on CPU, nccl when CUDA is present. Outside torchrun this is (0, 1) and nothing is set up.
    """
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def dist_barrier() -> None:
    """A barrier when running distributed, a no-op otherwise."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def package_versions() -> dict[str, str]:
    """Versions that decide whether two runs can produce the same numbers."""
    import platform

    import timm

    import klas

    return {
        "klas": klas.__version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def sha256_json(data: Any) -> str:
    """Hex SHA-256 of a JSON-able object in canonical form (sorted keys)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def machine_info(device: torch.device | str | None = None) -> dict[str, Any]:
    """Facts about this machine that decide timings, recorded beside every benchmark's results."""
    import platform

    cpu = ""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "")
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu or platform.processor(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python": platform.python_version(),
    }
    if device is not None:
        info["device"] = str(device)
    info["load_average_at_start"] = list(os.getloadavg())
    if device is not None and torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (``VmRSS``, ``VmHWM``) in bytes (Linux only)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KlasError(f"{field} is not in /proc/self/status; peak memory is measured on Linux only")


def peak_rss(fn: Callable[[], object]) -> tuple[int, int, str]:
    """Run ``fn``; return (peak resident bytes during the call, resident bytes before it, how measured).

    The kernel's high-water mark ``VmHWM`` is reset to the current RSS through ``/proc/self/clear_refs``;
    where that is not allowed, ``VmRSS`` is polled every millisecond from a thread instead.
    """
    before = _status_bytes("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    except OSError:
        return _sampled_peak(fn), before, "VmRSS sampled every 1 ms"
    fn()
    return _status_bytes("VmHWM"), before, "VmHWM (reset via /proc/self/clear_refs before the call)"


def _sampled_peak(fn: Callable[[], object]) -> int:
    import threading
    import time

    peak, stop = [0], threading.Event()

    def poll() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _status_bytes("VmRSS"))
            time.sleep(0.001)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    try:
        fn()
    finally:
        stop.set()
        th.join()
    return peak[0]
