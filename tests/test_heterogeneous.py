"""klas.heterogeneous (Mai et al.'s protocol) on a tiny quick configuration: random-init demo models,
40 images per split, 4 steps. Checks the protocol's bookkeeping, not its results."""
from __future__ import annotations

import io
import json
import runpy
from pathlib import Path

import pytest

from klas.errors import KlasError
from klas.heterogeneous import DEPTHS, HeteroConfig, _stages, cell, cut_at, run_protocol
from klas.quality import build_family_cache

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_heterogeneous.py"
MODELS = ("klas_vit_ti", "klas_resnet_s")
QUICK = HeteroConfig(models=MODELS, steps=4, batch_size=8, lrs=(1e-3, 1e-2), init_images=16, limit=40,
                     score_limit=None, eval_batch_size=40, random_init=True)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_config_is_validated_and_stages_split_the_steps():
    for kwargs, msg in ((dict(models=("a", "a")), "two different models"), (dict(depths=("top",)), "unknown depth"),
                        (dict(losses=("ce->xent",)), "unknown loss 'xent'"), (dict(layer="conv"), "stitch layer"),
                        (dict(steps=1), "steps"), (dict(lrs=(0.0,)), "lrs"), (dict(first_fraction=1.0), "first_fraction")):
        with pytest.raises(KlasError, match=msg):
            HeteroConfig(**kwargs)
    assert _stages("ffm->ce", 10, 0.5) == [({"ffm": 1.0}, 5), ({"ce": 1.0}, 5)]
    assert _stages("lfm", 10, 0.5) == [({"lfm": 1.0}, 10)]
    assert [cut_at(6, f) for f in DEPTHS.values()] == [1, 3, 5]
    assert [cut_at(16, f) for f in DEPTHS.values()] == [3, 8, 13]


def test_protocol_on_a_tiny_quick_config(tmp_path):
    cache = build_family_cache(MODELS, tmp_path / "cache", QUICK, tmp_path, keep=False)
    steps = []
    rep = run_protocol(cache, QUICK, root=tmp_path, say=lambda m: None, on_step=lambda: steps.append(1))
    assert len(steps) == len(QUICK.losses) * len(QUICK.lrs) * QUICK.steps
    assert rep["cuts"] == {"shallow": {"klas_vit_ti": 1, "klas_resnet_s": 1}, "middle": {"klas_vit_ti": 3, "klas_resnet_s": 4},
                           "deep": {"klas_vit_ti": 5, "klas_resnet_s": 7}}
    assert all(rep["anchors_unchanged"].values())  # only the stitch layers trained
    rows = rep["rows"]
    assert len(rows) == len(DEPTHS) * 4 * len(QUICK.losses)
    kinds = {(r["src"], r["dst"]): r["kind"] for r in rows}
    assert kinds == {(MODELS[0], MODELS[1]): "cross", (MODELS[1], MODELS[0]): "cross",
                     (MODELS[0], MODELS[0]): "self", (MODELS[1], MODELS[1]): "self"}
    for r in rows:
        target = rep["anchors"][r["dst"]]["eval"]
        assert r["relative_to_target"] == pytest.approx(r["acc"] / target)
        assert r["lr"] == rep["chosen_lr"][r["loss"]] and r["lr"] in QUICK.lrs
        assert r["acc_start"] == cell(rep, r["id"], "ce")["acc_start"]  # every loss starts from the same state
        assert (r["src_cut"], r["dst_cut"]) == (rep["cuts"][r["depth"]][r["src"]], rep["cuts"][r["depth"]][r["dst"]])
        if r["kind"] == "self":  # least squares makes a self-stitch the identity: it starts as the model
            assert r["src_cut"] == r["dst_cut"] and r["init_r2"] == pytest.approx(1.0, abs=1e-4)
            assert r["acc_start"] == pytest.approx(rep["anchors"][r["dst"]]["eval"], abs=1.5 / 40)
    for loss, lr in rep["chosen_lr"].items():  # chosen on the score split
        assert rep["score_by_lr"][f"{loss}@{lr:g}"] == max(rep["score_by_lr"][f"{loss}@{x:g}"] for x in QUICK.lrs)
    assert rep["chosen_on"] == "score" and rep["split_sizes"]["eval"] == 40
    json.dumps(rep)  # JSON-ready


def test_bench_script_quick_writes_json_and_table(tmp_path):
    main = runpy.run_path(str(SCRIPT), run_name="bench_heterogeneous")["main"]
    out = tmp_path / "h.json"
    report = main(["--quick", "--random-init", "--models", ",".join(MODELS), "--limit", "30", "--steps", "2",
                   "--work", str(tmp_path / "work"), "--root", str(tmp_path), "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["rows"] == json.loads(json.dumps(report["rows"])) and saved["command"].startswith("python benchmarks/")
    assert out.with_suffix(".png").stat().st_size > 10_000
