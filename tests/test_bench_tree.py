"""benchmarks/bench_tree.py (klas.tree.sweep) in its quick mode: random-init models, 40 digits per split, two
stages of two values, 3 steps per epoch. Checks the sweep's bookkeeping (choices on the score split, each
variant a real klas tree run, an interrupted sweep read back), not its results."""
from __future__ import annotations

import json
import runpy
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_tree.py"

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_bench_tree_quick_chooses_on_score_and_reads_finished_runs_back(tmp_path, monkeypatch):
    import klas.tree.sweep as sweep

    main = runpy.run_path(str(SCRIPT), run_name="bench_tree")["main"]
    out, work = tmp_path / "t.json", tmp_path / "work"
    argv = ["--quick", "--random-init", "--limit", "40", "--work", str(work), "--root", str(tmp_path), "--out", str(out)]
    rep = main(argv)
    assert json.loads(out.read_text())["command"].startswith("python benchmarks/bench_tree.py")
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert [s["field"] for s in rep["stages"]] == ["epochs", "layer"]
    for k, st in enumerate(rep["stages"]):
        scores = [rep["variants"][n]["mean_score"] for n in st["runs"]]
        assert st["chosen"] == st["values"][scores.index(max(scores))]  # on the score split; a tie keeps the first
        for n, v in zip(st["runs"], st["values"]):  # each stage varies one field from the choices before it
            want = {s["field"]: s["chosen"] for s in rep["stages"][:k]} | {st["field"]: v}
            assert rep["variants"][n]["overrides"] == want
    for name, v in rep["variants"].items():  # every variant is the klas tree run in its directory
        m = json.loads((work / "runs" / name / "tree.json").read_text())
        assert v["recipe"] == m["config"] and m["config"]["trunk"] == rep["trunk"] and m["config"]["share_at"] == rep["shares"]
        assert all(m["config"][k] == x for k, x in v["overrides"].items())
        assert v["mean_score"] == pytest.approx(np.mean([r["acc_score"] for r in m["trees"]]))
        assert v["mean_eval"] == pytest.approx(np.mean([r["acc"] for r in m["trees"]]))
    assert rep["final"] == rep["variants"][sweep.run_name(rep["chosen"])]
    assert [tuple(r["models"]) for r in rep["gains"]["rows"]] == [("klas_vit_ti", "b")]

    def refuse(*a, **k):
        raise AssertionError("a finished variant was trained again")

    monkeypatch.setattr(sweep, "tree_run", refuse)
    again = main(argv + ["--keep-cache"])
    assert json.dumps(again["variants"]) == json.dumps(rep["variants"]) and again["chosen"] == rep["chosen"]


def test_sweep_stages_are_parsed_and_checked():
    from klas.errors import KlasError
    from klas.tree.sweep import Stage, parse_stages

    assert parse_stages("epochs=2,8; layer=linear,mlp;lr=1e-3") == (
        Stage("epochs", (2, 8)), Stage("layer", ("linear", "mlp")), Stage("lr", (1e-3,)))
    for text, msg in (("trunk=a,b", "stitch-training field"), ("seed=0,1", "stitch-training field"),
                      ("epochs", "FIELD=v1,v2"), ("epochs=2,2", "distinct values"), ("", "at least one stage")):
        with pytest.raises(KlasError, match=msg):
            parse_stages(text)
