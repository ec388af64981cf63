"""klas.utils.peak_rss: the peak memory figures of benchmarks/bench_scorer.py and bench_search_scale.py."""
from __future__ import annotations

import time

import numpy as np
import pytest

from klas import utils

MB = 1 << 20


def _hold(mb: int):
    def fn():
        a = np.ones(mb * MB, dtype=np.uint8)  # touched: resident
        time.sleep(0.05)  # long enough for the 1 ms poller
        return int(a[::4096].sum())
    return fn


def test_peak_rss_sees_a_temporary_allocation():
    peak, before, how = utils.peak_rss(_hold(200))
    assert peak - before > 150 * MB and how.startswith("VmHWM")


def test_peak_rss_falls_back_to_polling(monkeypatch):
    def refuse(self, *a, **k):
        raise PermissionError("clear_refs")
    monkeypatch.setattr(utils.Path, "write_text", refuse)
    peak, before, how = utils.peak_rss(_hold(200))
    assert how.startswith("VmRSS sampled") and peak - before > 150 * MB


def test_missing_field_is_a_klas_error():
    with pytest.raises(utils.KlasError, match="Linux only"):
        utils._status_bytes("NoSuchField")
