"""Reading P feature arrays of different widths as zero-padded (P, rows, Dmax) batches, never all at once.

The cache stores each model's pooled block features as float16 memory-mapped arrays; a probe's
features are usually a column slice of one, i.e. a non-contiguous read-only view. Everything here
reads a bounded number of rows at a time -- a chunk of consecutive rows, or one mini-batch of rows
picked by index -- so that memory stays flat in the number of samples N, and hands the pages it
mapped back to the OS page cache as it goes (:func:`release_pages`), so that the process's resident
set stays flat too.
"""
from __future__ import annotations

import mmap
from typing import Iterator, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from klas.errors import KlasError

__all__ = [
    "FeatureArray",
    "ROW_CHUNK",
    "check_features",
    "storage_dtype",
    "read_rows",
    "pad_rows",
    "gather_rows",
    "release_pages",
    "free_bytes",
    "check_fits",
    "iter_row_chunks",
    "moments",
    "standardise",
    "feature_mask",
]

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


def gather_rows(feats: Sequence[FeatureArray], idx: np.ndarray, dmax: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Rows ``idx`` (B,) of every probe's features, in that order, zero-padded to Dmax -> (P, B, Dmax).

    Reads only those B rows of each (possibly memory-mapped, strided) array: P*B*Dmax*itemsize bytes.
    """
    out = torch.zeros(len(feats), len(idx), dmax, device=device, dtype=dtype)
    for p, f in enumerate(feats):
        if isinstance(f, Tensor):
            rows = f.index_select(0, torch.as_tensor(idx, dtype=torch.int64, device=f.device))
        else:
            rows = torch.from_numpy(np.ascontiguousarray(f[idx]))  # fancy indexing copies just these rows
        out[p, :, : f.shape[1]] = rows.to(device=device, dtype=dtype)
    return out


def _mapping(f: FeatureArray) -> mmap.mmap | None:
    """The read-only mmap behind a np.memmap (or a view of one), else None."""
    obj = f
    while isinstance(obj, np.ndarray):
        if isinstance(obj, np.memmap) and getattr(obj, "_mmap", None) is not None:
            return obj._mmap if obj.mode == "r" else None  # never drop pages of a copy-on-write map
        obj = obj.base
    return None


def release_pages(feats: Sequence[FeatureArray]) -> None:
    """Unmap the pages read so far from read-only memmaps (MADV_DONTNEED); later reads fault them back in.

    The data stay in the OS page cache; only this process's resident set shrinks. Without this, a
    pass over a memory-mapped cache leaves every page it touched counted in the resident set, which
    then grows with N although nothing was copied. A no-op for in-memory arrays and tensors.
    """
    advice = getattr(mmap, "MADV_DONTNEED", None)
    if advice is None:
        return
    seen: set[int] = set()
    for f in feats:
        m = _mapping(f)
        if m is None or id(m) in seen:
            continue
        seen.add(id(m))
        try:
            m.madvise(advice)
        except (OSError, ValueError):  # closed map, or a platform that refuses the advice
            pass


def iter_row_chunks(n: int, chunk: int) -> Iterator[tuple[int, int]]:
    """(start, stop) pairs covering range(n) in steps of ``chunk``."""
    for start in range(0, n, chunk):
        yield start, min(n, start + chunk)


def _column_moments(f: FeatureArray, n: int, buf: Tensor, host: np.ndarray) -> tuple[Tensor, Tensor]:
    """Mean and population std per column of one (N, D) array -> two (D,) float64, one streamed pass.

    Rows are read ``len(buf)`` at a time into the caller's reusable buffers (host staging ``host``
    (chunk, >= D) in the array's dtype, ``buf`` (chunk, >= D) float64 on the device), so the pass
    allocates nothing per chunk and the heap cannot fragment with N. Each chunk's mean and centred
    sum of squares are exact two-pass values in float64; chunks are merged with Chan et al.'s
    pairwise update, so there is no E[x^2] - E[x]^2 cancellation.
    """
    d = int(f.shape[1])
    count, mean, m2 = 0, None, None
    for a, b in iter_row_chunks(n, buf.shape[0]):
        x = buf[: b - a, :d]  # (b - a, D) float64 view
        if isinstance(f, Tensor):
            x.copy_(f[a:b])
        else:
            np.copyto(host[: b - a, :d], f[a:b], casting="unsafe")
            x.copy_(torch.from_numpy(host[: b - a, :d]))
        c_mean = x.mean(0)
        c_m2 = x.sub_(c_mean).square_().sum(0)
        if mean is None:
            mean, m2 = c_mean, c_m2
        else:
            delta, total = c_mean - mean, count + (b - a)
            mean = mean + delta * ((b - a) / total)
            m2 = m2 + c_m2 + delta.square() * (count * (b - a) / total)
        count += b - a
        release_pages([f])
    return mean, (m2 / count).sqrt()


def moments(
    feats: Sequence[FeatureArray], device: torch.device, eps: float = 1e-6, chunk: int = ROW_CHUNK
) -> tuple[Tensor, Tensor]:
    """Per-probe, per-feature mean and std of P arrays (N, D_p), streamed -> two padded (P, Dmax) float32.

    Reads ``chunk`` rows of one probe at a time (float64 maths), so memory does not depend on N.
    Padded columns get mean 0 and std 1 so that standardised padding stays exactly 0; near-constant
    features (std < eps) get std 1 so they standardise to ~0 instead of blowing up.
    """
    n, dims = check_features(feats)
    mean = torch.zeros(len(dims), max(dims), dtype=torch.float64, device=device)
    std = torch.ones_like(mean)
    rows = max(1, min(n, chunk))
    buf = torch.empty(rows, max(dims), dtype=torch.float64, device=device)  # reused by every chunk of every probe
    host = np.empty((rows, max(dims)), dtype=np.float16 if storage_dtype(feats) == torch.float16 else np.float64)
    for p, f in enumerate(feats):
        m, s = _column_moments(f, n, buf, host)
        mean[p, : dims[p]] = m
        std[p, : dims[p]] = torch.where(s >= eps, s, torch.ones_like(s))
    return mean.float(), std.float()


def standardise(x: Tensor, mean: Tensor, inv_std: Tensor, dtype: torch.dtype) -> Tensor:
    """(x - mean) * inv_std per probe and column in float32, rounded once through ``dtype`` -> (P, B, Dmax) float32.

    x (P, B, Dmax) raw, mean and inv_std (P, Dmax). Rounding through the storage dtype (float16 for
    the cache) reproduces exactly what the trainer got when it standardised all features in place
    in that dtype; the re-rounding of N(0, 1) values is far below the cache's own float16 rounding.
    """
    z = (x.float() - mean[:, None]) * inv_std[:, None]
    return z if dtype == torch.float32 else z.to(dtype).float()


def feature_mask(dims: Sequence[int] | Tensor, dmax: int, device: torch.device) -> Tensor:
    """True where column d < dims[p] -> (P, Dmax) bool."""
    d = torch.as_tensor(dims, device=device).view(-1, 1)
    return torch.arange(dmax, device=device).view(1, -1) < d
