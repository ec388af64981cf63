"""klas.search on a real cache (tests/conftest.py's ``vit_cache``: two random-init demo ViTs, 100 digits
per split): the run files it writes, the budget, determinism, every strategy, the ``--json`` document and
one-line refusals naming the flag. Probes train for one epoch, so each search takes about a second.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from rich.console import Console

from klas.errors import KlasError
from klas.fs import MARKER
from klas.run import CANDIDATES, PROBE_ACCURACY, SEARCH_FILES, SELECTION, SELECTION_FORMAT, read_selection
from klas.search import STRATEGIES, SearchResult, search

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

#: GFLOPs between the two anchors (klas_vit_ti ~0.0015, klas_vit_s ~0.0054): only the cheap one fits.
BUDGET = 0.004

#: Keys of every stitch entry in selection.json (docs/formats.md), which ``klas search --json`` prints.
STITCH_KEYS = {"id", "src", "src_cut", "dst", "dst_cut", "route", "macs", "params", "theta", "gamma", "bucket"}


def run_search(cache: Path, run: Path, **kw) -> SearchResult:
    kw = {"probe_epochs": 1, "device": "cpu", "console": Console(file=io.StringIO()), **kw}
    return search(cache, run, progress=False, **kw)


@pytest.fixture(scope="module")
def default_run(vit_cache, tmp_path_factory) -> SearchResult:
    """One search with the default settings, shared by the tests that only read it (one thread, like the rest)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_search(vit_cache, tmp_path_factory.mktemp("runs") / "default")
    finally:
        torch.set_num_threads(n)


def test_search_writes_the_run_files(default_run):
    run = default_run.run_dir
    assert all((run / name).is_file() for name in SEARCH_FILES) and (run / MARKER).is_file()
    sel = read_selection(run)
    assert sel == default_run.selection and sel["format"] == SELECTION_FORMAT
    rows = pq.read_table(run / CANDIDATES).to_pylist()
    stitches = [r for r in rows if r["kind"] == "stitch"]
    assert len(stitches) == sel["num_candidates"] == 6 * 6  # ti -> s (direction up), 6 x 6 cut pairs
    assert {r["src"] for r in rows if r["kind"] == "anchor"} == {"klas_vit_ti", "klas_vit_s"}
    assert [s["id"] for s in sel["stitches"]] == [r["id"] for r in rows if r["selected"] and r["kind"] == "stitch"]
    assert all(r["gamma"] > 0 and r["theta"] >= 0 for r in stitches)
    lines = (run / PROBE_ACCURACY).read_text().splitlines()
    assert lines[0] == "model,representation,block,probe_top1_score_split" and len(lines) == 1 + 2 * 7
    assert set(default_run.probe_accuracy) == {"klas_vit_ti", "klas_vit_s"}
    assert all(len(v) == 7 and all(0 <= a <= 1 for a in v) for v in default_run.probe_accuracy.values())
    macs = [r["macs"] for r in default_run.selected]
    assert macs == sorted(macs) and len(default_run.selected) == len(sel["stitches"]) + len(sel["anchors"])


def test_the_same_inputs_give_the_same_bytes(vit_cache, default_run, tmp_path):
    again = run_search(vit_cache, tmp_path / "again")
    for name in (SELECTION, CANDIDATES):
        assert (again.run_dir / name).read_bytes() == (default_run.run_dir / name).read_bytes(), name


def test_the_json_document_is_the_selection(default_run):
    """``klas search --json`` prints ``result.selection``: plain JSON, equal to selection.json on disk."""
    doc = json.loads(json.dumps(default_run.selection, allow_nan=False))
    assert doc == json.loads((default_run.run_dir / SELECTION).read_text())
    assert {"format", "cache", "inputs", "strategy", "axis", "budget", "num_candidates", "anchors", "stitches",
            "anchor_pairs", "versions"} <= set(doc)
    assert doc["axis"] == "gflops" and doc["budget"] is None and "budget_gflops" not in doc  # the budget under one key
    assert doc["stitches"] and all(set(s) == STITCH_KEYS for s in doc["stitches"])
    assert all(set(a) == {"name", "macs", "params"} for a in doc["anchors"])
    assert {(p["src"], p["dst"]) for p in doc["anchor_pairs"]} == {("klas_vit_ti", "klas_vit_s"), ("klas_vit_s", "klas_vit_ti")}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_selects_within_the_budget(vit_cache, tmp_path, strategy):
    result = run_search(vit_cache, tmp_path / strategy, strategy=strategy, budget=BUDGET)
    sel = result.selection
    assert sel["strategy"] == strategy and sel["budget"] == {"axis": "gflops", "value": BUDGET, "unit": "GFLOPs"}
    assert sel["stitches"], f"{strategy} selected nothing"
    assert all(s["macs"] <= BUDGET * 1e9 for s in sel["stitches"])
    assert [a["name"] for a in sel["anchors"]] == ["klas_vit_ti"]  # klas_vit_s costs more than the budget
    over = [r for r in result.rows if r["macs"] > BUDGET * 1e9]
    assert over and not any(r["selected"] for r in over)
    assert all(r["strategy"] == strategy for r in result.rows)


@pytest.mark.parametrize("settings, flag", [
    ({"strategy": "best"}, "--strategy"),
    ({"buckets": 0}, "--buckets"),
    ({"tau": 1.0}, "--tau"),
    ({"budget": -1.0}, "--budget"),
    ({"budget": 1e-9}, "--budget"),
    ({"temperature": 0.0}, "--temperature"),
    ({"probe_epochs": 0}, "--probe-epochs"),
    ({"direction": "down"}, "--direction"),
    ({"probe_target": "teacher"}, "--probe-target"),
    ({"layer": "conv"}, "stitch layer"),
    ({"score": "cka"}, "--score"),
    ({"score": "gamma", "strategy": "snnet"}, "--score gamma ranks klas"),
])
def test_bad_settings_name_their_flag_before_any_work(vit_cache, tmp_path, no_probe_training, settings, flag):
    with pytest.raises(KlasError, match=flag) as err:
        run_search(vit_cache, tmp_path / "run", **settings)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


def test_the_default_score_is_theta_alone_and_gamma_is_the_papers(vit_cache, default_run, tmp_path):
    """The default (``--score theta``, chosen by benchmarks/bench_quality.py): the bucket rule applied to Θ,
    recorded in selection.json and its inputs hash; ``--score gamma`` (the paper's Γ) is the same probes and
    Θ ranked by Γ, and its inputs hash is what every run had before Θ became the default."""
    from klas.select import select
    from klas.stitch.candidates import anchors, enumerate_stitches
    from klas.cache import open_cache

    said = io.StringIO()
    res = run_search(vit_cache, tmp_path / "gamma", score="gamma", console=Console(file=said, width=200))
    assert "klas ranks the candidates by Γ = Θ / Σ (the paper's) (--score gamma)" in said.getvalue()
    paper, sel = read_selection(res.run_dir), read_selection(default_run.run_dir)
    assert sel["score"] == "theta" and "score" not in paper and sel["inputs"] != paper["inputs"]
    rows = {r["id"]: r for r in default_run.rows}
    assert ({r["id"]: r["theta"] for r in res.rows if r["kind"] == "stitch"}
            == {k: r["theta"] for k, r in rows.items() if r["kind"] == "stitch"})
    cache = open_cache(vit_cache)
    stitches = enumerate_stitches(cache.profiles, "up", "linear")
    theta = torch.tensor([rows[c.id]["theta"] for c in stitches]).numpy()
    keep, _ = select("klas", stitches, anchors(cache.profiles), cache.profiles, gamma=theta, cka_distance=None,
                     budget_macs=None, buckets=20, tau=0.05, seed=0)
    assert {c.id for c, k in zip(stitches, keep) if k} == {s["id"] for s in sel["stitches"]}
    assert {s["id"] for s in sel["stitches"]} != {s["id"] for s in paper["stitches"]}  # Θ and Γ rank differently here
