"""klas.heterogeneous (Mai et al.'s protocol) on a tiny quick configuration: random-init demo models,
40 images per split, 2 and 4 steps. Checks the protocol's bookkeeping (lengths read off one run, choices on
the score split, the claims' rules), not its results."""
from __future__ import annotations

import dataclasses
import io
import json
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from klas.errors import KlasError
from klas.heterogeneous import DEPTHS, HeteroConfig, cell, cut_at, run_protocol, stages_of, total_steps
from klas.quality import build_family_cache

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_heterogeneous.py"
MODELS = ("klas_vit_ti", "klas_resnet_s")
QUICK = HeteroConfig(models=MODELS, lengths=(2, 4), batch_size=8, lrs=(1e-3, 1e-2), init_images=16, limit=40,
                     score_limit=None, eval_batch_size=40, random_init=True)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_config_is_validated_and_stages_split_the_steps():
    for kwargs, msg in ((dict(models=("a", "a")), "two different models"), (dict(depths=("top",)), "unknown depth"),
                        (dict(losses=("ce->xent",)), "unknown loss 'xent'"), (dict(layer="conv"), "stitch layer"),
                        (dict(lengths=(1,)), "lengths"), (dict(lengths=(8, 4)), "increasing"),
                        (dict(schedule="step"), "unknown schedule"), (dict(lrs=(0.0,)), "lrs"),
                        (dict(first_fraction=1.0), "first_fraction"), (dict(losses=()), "at least one loss")):
        with pytest.raises(KlasError, match=msg):
            HeteroConfig(**kwargs)
    assert stages_of("ffm->ce", 10, 0.5) == [({"ffm": 1.0}, 5), ({"ce": 1.0}, 5)]
    assert stages_of("lfm", 10, 0.5) == [({"lfm": 1.0}, 10)]
    # constant schedule: ce and ffm run to the longest length once; ffm->ce continues ffm's run at 1, 2 (of 2, 4)
    assert total_steps(QUICK) == 4 + 4 + (1 + 2)
    assert total_steps(HeteroConfig(lengths=(2, 4), schedule="cosine")) == 3 * (2 + 4)
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
    assert len(steps) == len(QUICK.lrs) * total_steps(QUICK)
    assert rep["cuts"] == {"shallow": {"klas_vit_ti": 1, "klas_resnet_s": 1}, "middle": {"klas_vit_ti": 3, "klas_resnet_s": 4},
                           "deep": {"klas_vit_ti": 5, "klas_resnet_s": 7}}
    assert all(rep["anchors_unchanged"].values())  # only the stitch layers trained
    rows = rep["rows"]
    assert len(rows) == len(DEPTHS) * 4 * len(QUICK.losses) * len(QUICK.lengths)
    kinds = {(r["src"], r["dst"]): r["kind"] for r in rows}
    assert kinds == {(MODELS[0], MODELS[1]): "cross", (MODELS[1], MODELS[0]): "cross",
                     (MODELS[0], MODELS[0]): "self", (MODELS[1], MODELS[1]): "self"}
    for r in rows:
        target = rep["anchors"][r["dst"]]["eval"]
        assert r["relative_to_target"] == pytest.approx(r["acc"] / target)
        assert r["lr"] == rep["chosen_lr"][f"{r['loss']}@{r['steps']}"] and r["lr"] in QUICK.lrs
        assert r["acc_start"] == cell(rep, r["id"], "ce", 2)["acc_start"]  # every loss starts from the same state
        assert (r["src_cut"], r["dst_cut"]) == (rep["cuts"][r["depth"]][r["src"]], rep["cuts"][r["depth"]][r["dst"]])
        if r["kind"] == "self":  # least squares makes a self-stitch the identity: it starts as the model
            assert r["src_cut"] == r["dst_cut"] and r["init_r2"] == pytest.approx(1.0, abs=1e-4)
            assert r["acc_start"] == pytest.approx(rep["anchors"][r["dst"]]["eval"], abs=1.5 / 40)
    for key, lr in rep["chosen_lr"].items():  # chosen on the score split, per loss and length
        loss, n = key.rsplit("@", 1)
        assert rep["score_by_lr"][f"{loss}@{lr:g}@{n}"] == max(rep["score_by_lr"][f"{loss}@{x:g}@{n}"] for x in QUICK.lrs)
    assert rep["chosen_on"] == "score" and rep["split_sizes"]["eval"] == 40
    for loss in QUICK.losses:  # the curves: mean over the cross stitches, per length
        for n in QUICK.lengths:
            cross = [r for r in rows if r["kind"] == "cross" and r["loss"] == loss and r["steps"] == n]
            assert rep["curves"][loss][str(n)]["score"] == pytest.approx(np.mean([r["acc_score"] for r in cross]))
    assert rep["length"]["chosen"] in QUICK.lengths and [c["status"] for c in rep["claims"]]
    json.dumps(rep)  # JSON-ready


def test_constant_schedule_reads_a_shorter_length_off_a_longer_run(quick_cache):
    """Under the constant schedule, length 2 read off a run to 4 (ffm->ce continuing ffm's run) is exactly a run
    of length 2 alone; under cosine, a length of a sweep is exactly its own run."""
    cache, root = quick_cache
    for schedule in ("constant", "cosine"):
        cfg = dataclasses.replace(QUICK, lrs=(1e-2,), losses=("ffm", "ffm->ce"), schedule=schedule, self_controls=False)
        both = run_protocol(cache, cfg, root=root, say=lambda m: None)
        alone = run_protocol(cache, dataclasses.replace(cfg, lengths=(2,)), root=root, say=lambda m: None)
        keys = ("acc", "acc_score", "loss_first", "loss_last")
        assert [tuple(r[k] for k in keys) for r in both["rows"] if r["steps"] == 2] == \
               [tuple(r[k] for k in keys) for r in alone["rows"]]
        assert all(r["loss_last"] != r["loss_first"] for r in both["rows"])


def _rows(cells: dict) -> list[dict]:
    """Synthetic protocol rows: ``cells[(depth, src, dst, loss, steps)] = (eval, score)`` top-1."""
    return [{"depth": d, "kind": "self" if s == t else "cross", "id": f"{s}:{d}->{t}", "src": s, "dst": t, "loss": loss,
             "steps": n, "acc": v[0], "acc_score": v[1]} for (d, s, t, loss, n), v in cells.items()]


def test_length_choice_and_the_claims_follow_their_rules():
    from klas.heterogeneous.claims import NOT_REPRODUCED, REPRODUCED, assess, choose_length

    cfg = HeteroConfig(models=("a", "b"), depths=("shallow", "deep"), losses=("ce", "ffm->ce"), lengths=(10, 100, 1000),
                       flat_tol=0.01)
    cells = {}
    curve = {10: 0.50, 100: 0.695, 1000: 0.70}  # flattens at 100: within 1 point of the best (score)
    for d in ("shallow", "deep"):
        for s, t in (("a", "b"), ("b", "a"), ("a", "a"), ("b", "b")):
            for loss, bonus in (("ce", 0.0), ("ffm->ce", 0.05)):
                for n, v in curve.items():
                    acc = v + bonus + (0.02 if s != t else 0.0) + (0.2 if (d, s, t) == ("deep", "b", "a") else 0.0)
                    cells[(d, s, t, loss, n)] = (acc, acc)
    rep = {"rows": _rows(cells), "anchors": {"a": {"eval": 0.8}, "b": {"eval": 0.9}}}
    out = assess(rep, cfg)
    assert out["length"]["chosen"] == 100 and out["claim_loss"] == "ffm->ce"
    ffm, both, cross = out["claims"]
    assert ffm["status"] == REPRODUCED and ffm["mean_difference"] == pytest.approx(0.05)
    assert both["status"] == REPRODUCED and both["numbers"]["stitch"] == "b:deep->a"  # 0.695+0.05+0.02+0.2 > 0.9
    assert cross["status"] == REPRODUCED and cross["mean_difference"] == pytest.approx((3 * 0.02 + 0.22) / 4)
    for k in list(cells):  # the task loss ahead at one shallow stitch: claim 1 fails; best stitch below 0.9: claim 2 fails
        if k[0] == "shallow" and k[1:3] == ("a", "b") and k[3] == "ce":
            cells[k] = (0.99, 0.0)
        if k[:3] == ("deep", "b", "a"):
            cells[k] = (cells[k][0] - 0.2, cells[k][1] - 0.2)
    out = assess({**rep, "rows": _rows(cells)}, cfg)
    assert [c["status"] for c in out["claims"]] == [NOT_REPRODUCED, NOT_REPRODUCED, REPRODUCED]
    # losses flattening at different lengths: the longest of their flattening points
    two = {"ce": {"10": {"score": 0.9}, "100": {"score": 0.5}, "1000": {"score": 0.5}},
           "ffm->ce": {"10": {"score": 0.1}, "100": {"score": 0.5}, "1000": {"score": 0.7}}}
    length = choose_length(two, cfg)
    assert length["per_loss"] == {"ce": 10, "ffm->ce": 1000} and length["chosen"] == 1000


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
    train_run(run, epochs=1, steps_per_epoch=cfg.lengths[-1], batch_size=cfg.batch_size, lr=cfg.lrs[0], loss=loss,
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
    report = main(["--quick", "--random-init", "--pair", ",".join(MODELS), "--pair", "klas_vit_ti,b:klas_vit_ti",
                   "--limit", "30", "--lengths", "2,3", "--no-self", "--work", str(tmp_path / "work"), "--root",
                   str(tmp_path), "--out", str(out)])
    saved = json.loads(out.read_text())
    assert [p["models"] for p in saved["pairs"]] == [list(MODELS), ["klas_vit_ti", "b"]]  # b: the same architecture
    assert saved["pairs"][1]["model_specs"] == ["klas_vit_ti", "b:klas_vit_ti"]
    assert saved["pairs"][0]["rows"] == json.loads(json.dumps(report["pairs"][0]["rows"]))
    assert saved["command"].startswith("python benchmarks/")
    assert all(len(p["claims"]) == 3 and p["length"]["chosen"] in (2, 3) for p in saved["pairs"])
    assert out.with_suffix(".png").stat().st_size > 10_000
