"""Turning P feature arrays of different widths into one zero-padded (P, n, Dmax) tensor.

The cache stores each model's pooled block features as float16 memory-mapped arrays; a probe's
features are usually a column slice of one, i.e. a non-contiguous read-only view. Everything here
reads them in row chunks so that no more than one chunk per probe is ever materialised off the
device, and nothing assumes the arrays fit in memory twice.
"""
from __future__ import annotations

from typing import Iterator, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from klas.errors import KlasError

FeatureArray = Union[np.ndarray, Tensor]

#: Rows read per probe per copy; keeps host-side staging to ~ROW_CHUNK * D * 4 bytes.
ROW_CHUNK = 8192


def check_features(feats: Sequence[FeatureArray], what: str = "features") -> tuple[int, list[int]]:
    """Validate P 2-D arrays sharing a row count; return (N, [D_p])."""
    if len(feats) == 0:
        raise KlasError(f"no {what} given: need at least one (N, D) array per probe")
    rows, dims = set(), []
    for i, f in enumerate(feats):
        if f.ndim != 2:
            raise KlasError(f"{what} #{i} has shape {tuple(f.shape)}; expected 2-D (samples, width)")
        if f.shape[1] == 0:
            raise KlasError(f"{what} #{i} has zero width")
        rows.add(int(f.shape[0]))
        dims.append(int(f.shape[1]))
    if len(rows) != 1:
        raise KlasError(f"{what} disagree on the number of samples ({sorted(rows)}); they must come from one cache")
    return rows.pop(), dims


def storage_dtype(feats: Sequence[FeatureArray]) -> torch.dtype:
    """float16 when every input is float16 (the cache format, half the memory), else float32."""
    half = all(
        (isinstance(f, Tensor) and f.dtype == torch.float16)
        or (isinstance(f, np.ndarray) and f.dtype == np.float16)
        for f in feats
    )
    return torch.float16 if half else torch.float32


def read_rows(f: FeatureArray, start: int, stop: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Rows [start, stop) of one feature array as a contiguous tensor on ``device`` -> (stop - start, D)."""
    if isinstance(f, Tensor):
        return f[start:stop].to(device=device, dtype=dtype)
    block = np.ascontiguousarray(f[start:stop])  # copies a (possibly strided, read-only) memmap view
    return torch.from_numpy(block).to(device=device, dtype=dtype)


def pad_rows(
    feats: Sequence[FeatureArray], start: int, stop: int, dmax: int, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """Rows [start, stop) of every probe's features, zero-padded to Dmax -> (P, stop - start, Dmax)."""
    out = torch.zeros(len(feats), stop - start, dmax, device=device, dtype=dtype)
    for p, f in enumerate(feats):
        out[p, :, : f.shape[1]] = read_rows(f, start, stop, device, dtype)
    return out


def free_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors on ``device`` (CUDA: driver's free; CPU: MemAvailable), None if unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_fits(nbytes: int, device: torch.device, what: str) -> None:
    """Refuse up front, with a one-line fix, instead of failing mid-way with an allocator error."""
    free = free_bytes(device)
    if free is not None and nbytes > free:
        raise KlasError(
            f"{what} need {nbytes / 2**30:.2f} GiB on {device} but only {free / 2**30:.2f} GiB is free; "
            "use fewer calibration samples or fewer models, or another --device"
        )


def stack_padded(feats: Sequence[FeatureArray], device: torch.device, dtype: torch.dtype) -> Tensor:
    """All rows of all probes in one zero-padded tensor -> (P, N, Dmax); costs P*N*Dmax*itemsize bytes on ``device``."""
    n, dims = check_features(feats)
    itemsize = torch.finfo(dtype).bits // 8
    check_fits(len(feats) * n * max(dims) * itemsize, device, "probe training features")
    out = torch.zeros(len(feats), n, max(dims), device=device, dtype=dtype)
    for p, f in enumerate(feats):
        for start in range(0, n, ROW_CHUNK):
            stop = min(n, start + ROW_CHUNK)
            out[p, start:stop, : dims[p]] = read_rows(f, start, stop, device, dtype)
    return out


def iter_row_chunks(n: int, chunk: int) -> Iterator[tuple[int, int]]:
    """(start, stop) pairs covering range(n) in steps of ``chunk``."""
    for start in range(0, n, chunk):
        yield start, min(n, start + chunk)


def moments(x: Tensor, dims: Sequence[int], eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Per-probe, per-feature mean and std of a padded (P, N, Dmax) tensor -> two (P, Dmax) float32.

    Two passes with float64 accumulation (no E[x^2] - E[x]^2 cancellation). Padded columns get
    mean 0 and std 1 so that standardised padding stays exactly 0; near-constant features
    (std < eps) get std 1 so they standardise to ~0 instead of blowing up.
    """
    p, n, dmax = x.shape
    rows = max(1, (1 << 23) // max(1, p * dmax))  # ~64 MiB of float64 per chunk
    total = torch.zeros(p, dmax, dtype=torch.float64, device=x.device)
    for a, b in iter_row_chunks(n, rows):
        total += x[:, a:b].double().sum(1)
    mean = total / n  # (P, Dmax)
    sq = torch.zeros_like(total)
    for a, b in iter_row_chunks(n, rows):
        sq += (x[:, a:b].double() - mean[:, None]).square().sum(1)
    std = (sq / n).sqrt()
    real = feature_mask(dims, dmax, x.device)  # (P, Dmax) bool
    std = torch.where(real & (std >= eps), std, torch.ones_like(std))
    mean = torch.where(real, mean, torch.zeros_like(mean))
    return mean.float(), std.float()


def standardise_(x: Tensor, mean: Tensor, std: Tensor) -> None:
    """In place, x <- (x - mean) / std per probe and column, a row chunk at a time (float32 maths); x (P, N, Dmax)."""
    p, n, dmax = x.shape
    rows = max(1, (1 << 24) // max(1, p * dmax))  # ~64 MiB of float32 per chunk
    inv = std.reciprocal()[:, None]  # (P, 1, Dmax)
    for a, b in iter_row_chunks(n, rows):
        x[:, a:b] = ((x[:, a:b].float() - mean[:, None]) * inv).to(x.dtype)


def feature_mask(dims: Sequence[int] | Tensor, dmax: int, device: torch.device) -> Tensor:
    """True where column d < dims[p] -> (P, Dmax) bool."""
    d = torch.as_tensor(dims, device=device).view(-1, 1)
    return torch.arange(dmax, device=device).view(1, -1) < d
