"""How many loader processes to use, and the DataLoader every streaming stage builds from them."""
from __future__ import annotations

import os
from typing import Sequence

import torch

from klas.errors import KlasError

#: Upper bound of ``--workers auto``: more processes than this rarely help one GPU decode JPEGs.
MAX_AUTO_WORKERS = 8


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def resolve_workers(workers: int | str, device: torch.device | str) -> int:
    """``--workers``: ``auto`` or a whole number >= 0 -> the number of DataLoader worker processes.

    ``auto`` is 0 on CPU (the models compete with loader processes for the same cores) and on CUDA
    ``min(8, CPUs of this process / local torchrun ranks)``, at least 1: decoding then overlaps the GPU.
    The number of workers never changes the images, only how fast they arrive.
    """
    text = str(workers).strip().lower()
    if text == "auto":
        if torch.device(device).type != "cuda":
            return 0
        ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        return max(1, min(MAX_AUTO_WORKERS, _cpus() // ranks))
    if isinstance(workers, bool) or not text.isdigit():
        raise KlasError(f"--workers must be 'auto' or a whole number >= 0, got {workers!r}")
    return int(text)


def pin_memory(device: torch.device | str) -> bool:
    """Whether batches bound for ``device`` go through pinned host memory with non-blocking copies:
    on CUDA only (elsewhere there is nothing to overlap, and torch's loader skips pinning anyway)."""
    return torch.device(device).type == "cuda"


def make_loader(
    dataset: torch.utils.data.Dataset, batches: Sequence[Sequence[int]], workers: int, device: torch.device
) -> torch.utils.data.DataLoader:
    """A loader over fixed batches of ``dataset``; pinned host memory when the batches go to CUDA."""
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, num_workers=workers, pin_memory=pin_memory(device)
    )
