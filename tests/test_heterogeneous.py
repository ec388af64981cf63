"""klas.heterogeneous (Mai et al.'s protocol) on a tiny quick configuration: random-init demo models,
40 images per split, 4 steps. Checks the protocol's bookkeeping, not its results."""
from __future__ import annotations

import io
import json
import runpy
from pathlib import Path

import pytest
import torch
from rich.console import Console

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


@pytest.fixture(scope="module")
def quick_cache(tmp_path_factory):
    """A real cache of the two random-init demo models, 40 digits images per split; (cache, root)."""
    root = tmp_path_factory.mktemp("hetero")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return build_family_cache(MODELS, root / "cache", QUICK, root, keep=False), root
    finally:
        torch.set_num_threads(n)


def test_protocol_on_a_tiny_quick_config(quick_cache):
    cache, root = quick_cache
    steps = []
    rep = run_protocol(cache, QUICK, root=root, say=lambda m: None, on_step=lambda: steps.append(1))
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


@pytest.mark.parametrize("loss", ["lfm", "ce"])
def test_protocol_training_is_klas_train_with_frozen_anchors(quick_cache, tmp_path, loss):
    """The protocol's training of a stitch (train_loss) is ``klas train --frozen --loss L --layer mlp`` of
    that stitch alone, for one epoch of the same steps: same least-squares start, batches and schedule."""
    from klas.heterogeneous import train_loss
    from klas.stitch.init import DEFAULT_RIDGE
    from klas.stitch.network import StitchNet, StitchSpec, stitch_id
    from klas.train import SplitData, init_stitches, load_checkpoint, checkpoint_path, teacher_targets, train_run

    cache, root = quick_cache
    a, b = MODELS
    spec = StitchSpec(stitch_id(a, 3, b, 4), a, 3, b, 4)
    prof = cache.profiles
    run = tmp_path / "run"
    run.mkdir()
    (run / "selection.json").write_text(json.dumps({
        "format": "klas.selection/1", "cache": {"path": str(cache.path), "fingerprint": cache.fingerprint},
        "budget_gflops": None, "buckets": 1, "layer": "mlp",
        "anchors": [{"name": n, "macs": prof[n].macs, "params": prof[n].params} for n in MODELS],
        "stitches": [{**spec.to_json(), "bucket": 0}]}))
    cfg = QUICK
    train_run(run, epochs=1, steps_per_epoch=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lrs[0], loss=loss,
              weight_decay=cfg.weight_decay, warmup=cfg.warmup, init_images=cfg.init_images, full_tune=False,
              layer="mlp", eval_batch_size=cfg.eval_batch_size, latency=False, root=root, seed=cfg.seed,
              console=Console(file=io.StringIO()), progress=False)
    ours = load_checkpoint(checkpoint_path(run))["stitch_states"][spec.id]

    models = {m.name: m for m in cache.load_models(root=root)}
    net = StitchNet({n: m.adapter for n, m in models.items()}, {n: m.profile for n, m in models.items()}, [spec], "mlp")
    train = SplitData(cache, "probe-train", root=root)
    init_stitches(net, train, images=cfg.init_images, ridge=DEFAULT_RIDGE, seed=cfg.seed,
                  batch_size=cfg.eval_batch_size, device=torch.device("cpu"))
    targets = teacher_targets(net, train, [b], {loss: 1.0}, batch_size=cfg.eval_batch_size, device=torch.device("cpu"))
    start = {k: v.clone() for k, v in net.stitch_layer(spec.id).state_dict().items()}
    train_loss(net, train, loss, cfg.lrs[0], targets, cfg, torch.device("cpu"))
    for k, v in net.stitch_layer(spec.id).state_dict().items():
        torch.testing.assert_close(v, ours[k], rtol=1e-4, atol=1e-5)
    assert any(not torch.allclose(v, start[k]) for k, v in ours.items())  # training moved it


def test_bench_script_quick_writes_json_and_table(tmp_path):
    main = runpy.run_path(str(SCRIPT), run_name="bench_heterogeneous")["main"]
    out = tmp_path / "h.json"
    report = main(["--quick", "--random-init", "--models", ",".join(MODELS), "--limit", "30", "--steps", "2",
                   "--work", str(tmp_path / "work"), "--root", str(tmp_path), "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["rows"] == json.loads(json.dumps(report["rows"])) and saved["command"].startswith("python benchmarks/")
    assert out.with_suffix(".png").stat().st_size > 10_000
