"""Process-wide settings the ``klas`` command makes for itself (a library caller decides its own).

:func:`keep_freed_memory`: glibc hands every freed block over 32 MB straight back to the kernel and
maps it again on the next allocation. A batch of 224-px activations is that large, so each forward
pass paid page faults for its own tensors: evaluating 42 networks at 224 px on CPU spent 37 % of its
CPU time in the kernel (222 million minor page faults). Raising glibc's mmap and trim thresholds to
1 GiB keeps freed blocks in the process for reuse: a bare DeiT-S forward over 256 images at batch 256
went from 24.4 s to 17.6 s wall here (kernel time 9.0 s to 0.2 s), and that ``klas train`` run from
1,256 s to 659 s (README, "Where klas train spends its time"). The cost: freed memory stays with the
process until it exits (that run's peak 10.3 GB instead of 9.8 GB).
"""
from __future__ import annotations

import ctypes
import platform

#: glibc's mallopt parameters (malloc.h) and the threshold klas sets them to.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
THRESHOLD = 1 << 30


def keep_freed_memory(threshold: int = THRESHOLD) -> bool:
    """Raise glibc's mmap and trim thresholds to ``threshold`` bytes; False where the C library is not
    glibc or refuses (nothing changed then)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, threshold))


__all__ = ["THRESHOLD", "keep_freed_memory"]
