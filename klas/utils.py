"""Small shared helpers: devices, seeding, atomic files, hashing, paths."""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from klas.errors import KlasError

#: Where klas writes by default; override with the KLAS_CACHE environment variable.
DEFAULT_ROOT = Path(os.environ.get("KLAS_CACHE", "cache"))

#: Stated next to every cost figure klas shows.
FLOPS_CONVENTION = "GFLOPs: fvcore convention, one multiply-add = one FLOP"


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


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that readers see either the old file or the complete new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_json(path: Path, what: str = "file") -> Any:
    """Read JSON with a one-line error when it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise KlasError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise KlasError(f"{what} {path} is unreadable ({exc.__class__.__name__}); delete it and rerun") from exc


@contextmanager
def atomic_dir(final: Path, overwrite: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary name and move it into place only when the block succeeds."""
    final = Path(final)
    if final.exists() and not overwrite:
        raise KlasError(f"{final} already exists; pass --overwrite to replace it")
    tmp = final.with_name(f".{final.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


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


def check_free_space(path: Path, needed_bytes: int) -> None:
    """Refuse to start writing when the disk cannot hold the result."""
    path = Path(path)
    probe = path
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed_bytes:
        raise KlasError(
            f"not enough disk space at {probe}: need {needed_bytes / 2**30:.2f} GiB, "
            f"{free / 2**30:.2f} GiB free; free some space or choose another --out"
        )


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
