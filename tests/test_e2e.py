"""The demo path end to end, through the CLI a user types: zoo -> cache -> search -> train -> export.

Uses the real demo family as ``make demo`` does: ``klas zoo`` installs the shipped weights (verified,
seconds; training them is covered by tests/test_zoo.py on tiny runs), so this is also the check that the
family spans an accuracy range worth stitching over.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from klas.zoo import FAMILIES, read_zoo

pytestmark = pytest.mark.slow
VIT = list(FAMILIES["vit"])


def klas(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "klas", *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("root")


@pytest.fixture(scope="module")
def zoo(root):
    done = klas("zoo", "--root", str(root))
    assert "shipped weights verified" in done.stderr  # installed, not trained
    index = read_zoo(root)
    assert all(index[a]["source"] == "shipped" and index[a]["eval_acc"] == index[a]["shipped_eval_acc"] for a in index)
    return index


# Each larger model must stand above the next smaller one (a ladder worth stitching along). On digits the
# family saturates near 97 %: the shipped steps are Ti -> S +2.0, S -> B +0.8, ResNet-S -> L +0.6 points,
# against a seed std of 0.1-0.3 points (benchmarks/bench_zoo.py) and an eval sampling std of ~0.3 points.
MIN_STEP = 0.005


def test_demo_family_is_a_clear_ladder(zoo):
    for family, members in FAMILIES.items():
        accs = [zoo[name]["eval_acc"] for name in members]
        assert all(b - a >= MIN_STEP for a, b in zip(accs, accs[1:])), (family, accs)
        macs = [zoo[name]["macs"] for name in members]
        assert macs == sorted(macs)


def test_pipeline_end_to_end(zoo, root, tmp_path):
    cache, run = tmp_path / "cache", tmp_path / "run"
    models = [a for name in VIT for a in ("--model", name)]
    klas("cache", *models, "--data", "digits", "--limit", "400", "--out", str(cache), "--root", str(root))
    budget = "0.012"
    first = klas("search", str(cache), "--budget", budget, "--run", str(run), "--json")
    selection = json.loads(first.stdout)
    assert selection["stitches"], "the demo budget must leave stitches to train"
    assert all(s["macs"] <= float(budget) * 1e9 for s in selection["stitches"])
    assert "GFLOPs" in first.stderr and "fvcore" in first.stderr
    # the same inputs give the same selection, byte for byte
    before = (run / "selection.json").read_bytes()
    klas("search", str(cache), "--budget", budget, "--run", str(run))
    assert (run / "selection.json").read_bytes() == before
    cands = pq.read_table(run / "candidates.parquet").to_pylist()
    assert sum(c["kind"] == "stitch" for c in cands) == 3 * 6 * 6  # 3 pairs x 6 src cuts x 6 dst cuts

    klas("train", str(run), "--epochs", "1", "--steps-per-epoch", "30")
    results = pq.read_table(run / "results.parquet").to_pylist()
    anchors = {r["id"]: r for r in results if r["kind"] == "anchor"}
    for name in VIT:  # the original anchors score what the zoo measured on the whole eval split
        if name in anchors:  # ("after" is the jointly fine-tuned anchor: the default recipe trains anchors too)
            assert abs(anchors[name]["acc_before"] - zoo[name]["eval_acc"]) < 0.07  # 400 of the eval images: ~3 sigma
    stitched = [r for r in results if r["kind"] == "stitch"]
    assert len(stitched) == len(selection["stitches"])
    assert max(r["acc_after"] for r in stitched) > 0.5  # trained stitches classify digits, not chance (0.1)

    done = klas("export", "pareto", str(run), "--models")
    front = json.loads((run / "export" / "front.json").read_text())
    assert front and (run / "export" / "front.png").stat().st_size > 10_000
    assert "front.png" in done.stdout
    from klas.export import load_stitched

    model_dir = next((run / "export" / "models").iterdir())
    model = load_stitched(model_dir)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
