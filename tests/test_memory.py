"""klas.utils.peak_rss: the peak memory figures of benchmarks/bench_scorer.py and bench_search_scale.py."""
from __future__ import annotations

import gc
import time

import numpy as np
import pytest

from klas import utils

MB = 1 << 20


def _hold(mb: int, seen: list[int]):
    """A call that holds ``mb`` resident MiB for 50 ms and records the RSS it saw while holding them."""
    def fn():
        a = np.ones(mb * MB, dtype=np.uint8)  # written, so resident
        seen.append(utils._status_bytes("VmRSS"))
        time.sleep(0.05)  # long enough for the 1 ms poller
        return int(a[::4096].sum())
    return fn


def _measure(monkeypatch=None):
    gc.collect()  # no collection of earlier tests' garbage inside the call
    seen: list[int] = []
    peak, before, how = utils.peak_rss(_hold(200, seen))
    after = utils._status_bytes("VmRSS")
    assert seen[0] - after > 150 * MB  # the allocation was resident during the call and freed after it
    return peak, seen[0], how


def test_peak_rss_sees_a_temporary_allocation():
    peak, inside, how = _measure()
    assert how.startswith("VmHWM") and peak >= inside - 16 * MB  # the kernel's RSS counters sync lazily (< 1 MiB)


def test_peak_rss_falls_back_to_polling(monkeypatch):
    def refuse(self, *a, **k):
        raise PermissionError("clear_refs")
    monkeypatch.setattr(utils.Path, "write_text", refuse)
    peak, inside, how = _measure()
    assert how.startswith("VmRSS sampled") and peak >= inside - 16 * MB


def test_missing_field_is_a_klas_error():
    with pytest.raises(utils.KlasError, match="Linux only"):
        utils._status_bytes("NoSuchField")
