"""klas.utils.peak_rss: the peak memory figures of benchmarks/bench_scorer.py and bench_search_scale.py."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from klas import utils

MB = 1 << 20


# Measured in a fresh interpreter: what a process's allocator returns to the kernel after a free depends on
# what ran in it before (a test process under pytest-xdist has run other files' tests), and peak_rss is
# meant for a benchmark's own process.
_SCRIPT = """
import json, sys, time
import numpy as np
from klas import utils
MB = 1 << 20
if sys.argv[1] == "poll":  # /proc/self/clear_refs refused: peak_rss must fall back to polling VmRSS
    def refuse(self, *a, **k):
        raise PermissionError("clear_refs")
    utils.Path.write_text = refuse
seen = []
def fn():
    a = np.ones(200 * MB, dtype=np.uint8)  # written, so resident
    seen.append(utils._status_bytes("VmRSS"))
    time.sleep(0.05)  # long enough for the 1 ms poller
    return int(a[::4096].sum())
peak, before, how = utils.peak_rss(fn)
print(json.dumps({"peak": peak, "inside": seen[0], "after": utils._status_bytes("VmRSS"), "how": how}))
"""


def _measure(mode: str) -> tuple[int, int, str]:
    done = subprocess.run([sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True, check=True)
    r = json.loads(done.stdout)
    assert r["inside"] - r["after"] > 150 * MB  # the allocation was resident during the call and freed after it
    return r["peak"], r["inside"], r["how"]


def test_peak_rss_sees_a_temporary_allocation():
    peak, inside, how = _measure("hwm")
    assert how.startswith("VmHWM") and peak >= inside - 16 * MB  # the kernel's RSS counters sync lazily (< 1 MiB)


def test_peak_rss_falls_back_to_polling():
    peak, inside, how = _measure("poll")
    assert how.startswith("VmRSS sampled") and peak >= inside - 16 * MB


def test_missing_field_is_a_klas_error():
    with pytest.raises(utils.KlasError, match="Linux only"):
        utils._status_bytes("NoSuchField")
