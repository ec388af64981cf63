"""klas.run: who may write a run directory, and that a new selection never sits beside stale training.

One real cache (two random-init demo ViTs over 100 digits per split, tests/conftest.py's ``vit_cache``);
searches train their probes for one epoch, so each takes about a second.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
from rich.console import Console

from klas.errors import KlasError
from klas.fs import MARKER, DirLock
from klas.run import LATER_STAGES, SELECTION, read_selection
from klas.search import search

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


def run_search(vit_cache: Path, run: Path, **kw):
    return search(vit_cache, run, probe_epochs=1, device="cpu", console=quiet(), progress=False, **kw)


def fake_training(run: Path) -> None:
    """What klas train and klas export leave in a run (contents do not matter here)."""
    (run / "results.parquet").write_bytes(b"old results")
    (run / "train.json").write_text("{}")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.pt").write_bytes(b"old checkpoint")
    (run / "export").mkdir()
    (run / "export" / "front.csv").write_text("id\n")


def test_a_new_selection_removes_the_runs_training_and_export(vit_cache, tmp_path):
    run = tmp_path / "run"
    run_search(vit_cache, run)
    assert (run / MARKER).is_file()
    first = (run / SELECTION).read_bytes()
    fake_training(run)
    (run / "notes.txt").write_text("mine")
    run_search(vit_cache, run)  # the same inputs give the same selection: training stays valid
    assert (run / SELECTION).read_bytes() == first
    assert all((run / name).exists() for name in LATER_STAGES)
    with pytest.raises(KlasError, match="other inputs; pass --run NAME for a new run or --overwrite"):
        run_search(vit_cache, run, buckets=3)
    assert (run / SELECTION).read_bytes() == first and (run / "results.parquet").is_file()
    run_search(vit_cache, run, buckets=3, overwrite=True)
    assert read_selection(run)["buckets"] == 3
    assert not any((run / name).exists() for name in LATER_STAGES)
    assert (run / "notes.txt").read_text() == "mine"  # only the stale stages went
    for name in ("candidates.parquet", "probes.safetensors", "probe_accuracy.csv"):
        assert (run / name).is_file()


def test_search_refuses_a_directory_it_did_not_make(vit_cache, tmp_path, no_probe_training):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(KlasError, match="klas did not create"):
            run_search(vit_cache, mine, overwrite=overwrite)
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.tex"]
    with pytest.raises(KlasError, match="is a klas cache directory, not a run"):
        run_search(vit_cache, vit_cache, overwrite=True)
    assert not (vit_cache / SELECTION).exists()
    torn = tmp_path / "torn"
    torn.mkdir()
    (torn / SELECTION).write_text('{"format": "klas.sel')  # a run whose selection.json was damaged
    with pytest.raises(KlasError, match="unreadable selection.json; pass --overwrite"):
        run_search(vit_cache, torn)


def test_search_fails_before_the_long_work_when_it_cannot_write(vit_cache, tmp_path, no_probe_training):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(KlasError, match="is a file, not a directory"):
        run_search(vit_cache, afile)
    with pytest.raises(KlasError, match="cannot write to --run .*a file is in the way"):
        run_search(vit_cache, afile / "run")
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            with pytest.raises(KlasError, match="cannot write to --run"):
                run_search(vit_cache, ro / "run")
        finally:
            ro.chmod(0o755)


def test_one_writer_per_run(vit_cache, tmp_path, no_probe_training):
    from klas.export import export_pareto
    from klas.train import train_run

    run = tmp_path / "run"
    run.mkdir()
    (run / MARKER).write_text(json.dumps({"kind": "run"}))
    (run / SELECTION).write_text(json.dumps({"format": "klas.selection/1", "cache": {"path": str(vit_cache)},
                                             "stitches": [], "anchors": []}))
    with DirLock(run, "--run"):  # another process (a second open file description conflicts the same way)
        for stage in (lambda: run_search(vit_cache, run, overwrite=True),
                      lambda: train_run(run, console=quiet(), progress=False),
                      lambda: export_pareto(run, console=quiet())):
            with pytest.raises(KlasError, match=f"another klas process \\(pid {os.getpid()}\\) is writing"):
                stage()


def test_run_arguments_that_are_not_runs(tmp_path):
    from klas.export import export_pareto
    from klas.train import train_run

    (tmp_path / "afile").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / SELECTION).write_text('{"format": "klas.selection/1", "cache": "c", "stitches": [], "anchors": []}')
    (tmp_path / "listy").mkdir()
    (tmp_path / "listy" / SELECTION).write_text("[]")
    (tmp_path / "garbled").mkdir()
    (tmp_path / "garbled" / SELECTION).write_bytes(b"\xff\x00{")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / SELECTION).write_text(json.dumps({"format": "klas.selection/1", "cache": {"path": "c"},
                                                          "stitches": ["a"], "anchors": []}))
    cases = {"nowhere": "there is no run directory", "afile": "is a file, not a run directory",
             "empty": "has no selection.json \\(klas search has not finished there\\)",
             "broken": "lacks a valid 'cache'", "listy": "is not a klas.selection/1 file",
             "garbled": "unreadable", "odd": "malformed cache, stitch or anchor entries"}
    for name, msg in cases.items():
        for stage in (lambda p: train_run(p, console=quiet(), progress=False), lambda p: export_pareto(p, console=quiet())):
            with pytest.raises(KlasError, match=msg):
                stage(tmp_path / name)
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == []


def test_a_budget_below_every_candidate_is_refused_before_probe_training(vit_cache, tmp_path, no_probe_training):
    with pytest.raises(KlasError, match="below the cheapest candidate"):
        run_search(vit_cache, tmp_path / "run", budget=1e-9)
    assert not (tmp_path / "run").exists()


def test_train_and_export_name_a_cache_given_as_the_run(vit_cache):
    from klas.export import export_pareto
    from klas.train import train_run

    for stage in (lambda p: train_run(p, console=quiet(), progress=False), lambda p: export_pareto(p, console=quiet())):
        with pytest.raises(KlasError, match="is a klas cache directory, not a run"):
            stage(vit_cache)
