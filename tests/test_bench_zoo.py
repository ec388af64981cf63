"""benchmarks/bench_zoo.py on a tiny budget: recipe and data variants reach the training, rows say which."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from klas.data import DigitsConfig
from klas.zoo.run import zoo_split_tensors

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_zoo.py"

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _main():
    """The script as an importable module (its process pool pickles the worker functions by module name)."""
    if "bench_zoo" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_zoo", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_zoo"] = module
        spec.loader.exec_module(module)
    return sys.modules["bench_zoo"].main


def test_bench_zoo_trains_each_data_variant_on_its_own_images(tmp_path, capsys):
    out = tmp_path / "zoo.json"
    _main()(["--models", "klas_vit_ti,klas_vit_s", "--seeds", "0", "--jobs", "1", "--root", str(tmp_path),
             "--out", str(out), "--variant", "tiny:max_steps=2,limit=40", "--data", "default:",
             "--data", "hard:rotation=30,scale=0.6/1.1"])
    report = json.loads(out.read_text())
    saved = report["rows"]
    assert report["commands"] == [report["command"]]
    # the ladder: klas_vit_s (also in the vit-depth benchmark family) against klas_vit_ti, per data variant
    ladder = [line for line in capsys.readouterr().out.splitlines() if "klas_vit_s" in line and " / " in line]
    assert len(ladder) == 2, ladder
    rows = {r["data"]: r for r in saved if r["model"] == "klas_vit_ti"}
    assert set(rows) == {"default", "hard"} and len(saved) == 4
    hard = DigitsConfig(rotation=30.0, scale=(0.6, 1.1))
    assert rows["hard"]["data_fields"] == {"rotation": 30.0, "scale": [0.6, 1.1]}
    assert rows["hard"]["data_fingerprint"] == hard.fingerprint()
    assert rows["default"]["data_fingerprint"] == DigitsConfig().fingerprint() != hard.fingerprint()
    for r in rows.values():
        assert r["variant"] == "tiny" and r["steps"] == 2 and 0 <= r["eval_acc"] <= 1
    # the variant trains and measures on the images the generator makes with its fields, not the built-in set
    x_hard = zoo_split_tensors("klas_vit_ti", tmp_path, limit=40, data=hard)["eval"][0]
    x_default = zoo_split_tensors("klas_vit_ti", tmp_path, limit=40)["eval"][0]
    assert x_hard.shape == x_default.shape == (40, 3, 32, 32) and not torch.equal(x_hard, x_default)


@pytest.mark.parametrize("data, message", [
    ("x:rotaton=3", "unknown digits field 'rotaton'"),
    ("x:scale=0.6", "scale takes a pair, e.g. scale=0.6/1.1"),
    ("x:variants=many", "variants='many' is not a whole number"),
    ("x:scale=0.6/big", "scale='0.6/big' is not a pair of numbers lo/hi"),
])
def test_bench_zoo_refuses_a_bad_data_variant_before_training(tmp_path, data, message):
    with pytest.raises(SystemExit, match=message):
        _main()(["--models", "klas_vit_ti", "--seeds", "0", "--root", str(tmp_path), "--out", str(tmp_path / "z.json"),
                 "--data", data])
    assert not (tmp_path / "z.json").exists()
