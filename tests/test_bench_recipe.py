"""benchmarks/bench_recipe.py --quick on the in-memory FakeCache: plumbing, not results."""
from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_train import fake, write_selection  # noqa: E402,F401

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_recipe.py"

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_bench_recipe_quick(fake, tmp_path):
    main = runpy.run_path(str(SCRIPT), run_name="bench_recipe")["main"]
    run = tmp_path / "run"
    write_selection(run, fake)
    out = tmp_path / "recipe.json"
    report = main(["--run", str(run), "--quick", "--work", str(tmp_path / "work"), "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["complete"] and saved["winner"] == report["winner"] in saved["variants"]
    assert set(saved["variants"]) == {"frozen", "base", "ce+distill"} and saved["stitches"] == 4
    for v in saved["variants"].values():
        for split in ("score", "eval"):
            m = v[split]
            assert 0 <= m["mean_stitch"] <= 1 and 0 <= m["front_stitches"] <= 4 and len(m["anchors"]) == 2
            assert 0 <= m["hypervolume"] <= 1
    assert saved["variants"]["base"]["overrides"] == {} and saved["command"].startswith("python benchmarks/bench_recipe.py")
    # --add keeps the earlier variants (same run, same base) and adds the new one
    before = saved["variants"]
    main(["--run", str(run), "--quick", "--work", str(tmp_path / "work"), "--out", str(out), "--add",
          "--variants", "lr-1e-3"])
    added = json.loads(out.read_text())
    assert set(added["variants"]) == {"frozen", "base", "ce+distill", "lr-1e-3"}
    assert all(added["variants"][k] == before[k] for k in before)
    assert added["variants"]["lr-1e-3"]["overrides"] == {"lr": 1e-3}
