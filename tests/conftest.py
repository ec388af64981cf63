"""Shared test fixtures."""
from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist's workers start with COLUMNS=80 and LINES=24 (execnet's terminal emulation); klas's
    # output (its consoles, and the klas commands tests run) must see the environment a user's shell has.
    os.environ.pop("COLUMNS", None)
    os.environ.pop("LINES", None)


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared CPU they make timings erratic."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def vit_cache(tmp_path_factory):
    """A real klas cache, built once per session: two random-init demo ViTs over 100 digits per split.

    Searches on it train their probes in about a second (tests/test_run.py, tests/test_search.py).
    Tests must not write into it.
    """
    import io

    from rich.console import Console

    from klas.cache import build_cache

    root = tmp_path_factory.mktemp("klas")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        build_cache(["klas_vit_ti", "klas_vit_s"], "digits", root / "c", limit=100, random_init=True, root=root,
                    console=Console(file=io.StringIO()), progress=False)
    finally:
        torch.set_num_threads(n)
    return root / "c"


@pytest.fixture
def no_probe_training(monkeypatch):
    """Fail the test if ``klas.search.search`` reaches the long work (probe training)."""
    import klas.probes

    def refuse(*a, **k):
        raise AssertionError("search trained probes before refusing")

    monkeypatch.setattr(klas.probes, "train_probes", refuse)
