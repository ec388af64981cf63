"""A cache split as batches for training and evaluation: in memory when small, streamed when not.

Small splits (the demo's 32x32 digits) are preprocessed once into one float32 tensor, so every
epoch is pure tensor indexing; a split whose preprocessed size exceeds ``preload_limit_gb`` is read
through a DataLoader over the cache's dataset instead. Either way batches come as
``(images, labels, positions)``, ``positions`` indexing the split (for per-image teacher targets).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from klas.data import pin_memory
from klas.errors import KlasError
from klas.utils import DEFAULT_ROOT

#: Preprocessed splits up to this many GiB are held in memory.
DEFAULT_PRELOAD_LIMIT_GB = 2.0


class SplitData:
    """One split of a cache, addressable by position ``0..n-1``."""

    def __init__(self, cache, split: str, root: Path = DEFAULT_ROOT, preload_limit_gb: float = DEFAULT_PRELOAD_LIMIT_GB,
                 workers: int = 0) -> None:
        from klas.data import load_split_tensors

        if split not in cache.splits:
            raise KlasError(f"cache {cache.path} has no {split!r} split (it has {', '.join(cache.splits)}); "
                            f"re-run klas cache with --split probe-train,score,eval")
        self.name = split
        self.labels = torch.from_numpy(np.asarray(cache.labels(split), dtype=np.int64).copy())
        self.n = len(self.labels)
        if self.n == 0:
            raise KlasError(f"split {split!r} of cache {cache.path} is empty")
        size = tuple(cache.manifest["data"]["preprocess"]["input_size"])
        self.input_size = size
        self.workers = workers
        nbytes = self.n * math.prod(size) * 4
        self.images: Tensor | None = None
        self.dataset = None
        if nbytes <= preload_limit_gb * 2**30:
            x, labels, _ = load_split_tensors(cache.source(root), cache.split(split), cache.transform())
            self.images = x
            self.labels = labels
        else:
            self.dataset = cache.dataset(split, root=root)

    @property
    def preloaded(self) -> bool:
        return self.images is not None

    def batches(self, positions: Sequence[int] | Tensor, batch_size: int, device: torch.device) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """``(images, labels, positions)`` batches over ``positions`` in the given order."""
        pos = torch.as_tensor(positions, dtype=torch.long)
        nb = pin_memory(device)
        if self.images is not None:
            for s in range(0, len(pos), batch_size):
                p = pos[s : s + batch_size]
                yield (self.images[p].to(device, non_blocking=nb), self.labels[p].to(device, non_blocking=nb), p)
            return
        loader = torch.utils.data.DataLoader(
            _Positions(self.dataset), batch_size=batch_size, sampler=pos.tolist(), num_workers=self.workers,
            pin_memory=nb, persistent_workers=False,
        )
        for x, y, p in loader:
            yield x.to(device, non_blocking=nb), y.to(device, non_blocking=nb), p

    def first(self, k: int) -> Tensor:
        """The first ``k`` images (for latency measurement)."""
        k = min(k, self.n)
        if self.images is not None:
            return self.images[:k]
        return torch.stack([self.dataset[i][0] for i in range(k)])


class _Positions(torch.utils.data.Dataset):
    def __init__(self, ds) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        x, y, _ = self.ds[i]
        return x, y, i


def epoch_positions(n: int, steps: int, global_batch: int, seed: int, epoch: int) -> Tensor:
    """The positions one epoch visits, ``steps * global_batch`` of them: concatenated seeded
    permutations of ``0..n-1`` (so every batch is full and each image is seen about equally often).
    Depends only on (seed, epoch), which makes resuming at an epoch boundary exact."""
    g = torch.Generator().manual_seed(epoch_seed(seed, epoch, 0))
    need = steps * global_batch
    chunks = [torch.randperm(n, generator=g) for _ in range(math.ceil(need / n))]
    return torch.cat(chunks)[:need]


def epoch_seed(seed: int, epoch: int, stream: int) -> int:
    """A 63-bit seed per (run seed, epoch, stream), stable across runs and platforms."""
    import hashlib

    h = hashlib.sha256(f"klas-train/{seed}/{epoch}/{stream}".encode()).digest()
    return int.from_bytes(h[:8], "little") & (2**63 - 1)
