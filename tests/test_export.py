"""klas export pareto: the front, its files and plot, standalone model artifacts and their round trip."""
from __future__ import annotations

import csv
import io
import json
import random
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).parent))
from test_train import FAST, MODELS, PAIRS, FakeCache, fake, quiet, tiny_vit, write_selection  # noqa: E402,F401

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

from klas.errors import KlasError  # noqa: E402
from klas.export import export_pareto, load_stitched, pareto_front  # noqa: E402
from klas.stitch.layers import lora_rank  # noqa: E402
from klas.stitch.network import StitchNet, StitchSpec, stitch_id, stitch_params  # noqa: E402
from klas.train import read_results, train_run  # noqa: E402
from klas.train.checkpoint import checkpoint_path, load_checkpoint  # noqa: E402


def P(i, c, a):
    return {"id": i, "gflops": c, "acc_after": a}


def ids(front):
    return [p["id"] for p in front]


def test_pareto_front_hand_made_cases():
    # a dominated point (b: costs more than a and is less accurate) goes; the rest form a staircase
    pts = [P("a", 1.0, 70), P("b", 2.0, 65), P("c", 2.0, 75), P("d", 3.0, 80), P("e", 0.5, 60)]
    assert ids(pareto_front(pts)) == ["e", "a", "c", "d"]
    # same accuracy at a higher cost is dominated (cheaper with >=); same cost, lower accuracy too
    assert ids(pareto_front([P("x", 1.0, 50), P("y", 2.0, 50), P("z", 1.0, 40)])) == ["x"]
    # exact duplicates dominate neither: both kept, ordered by id whatever the input order
    dup = [P("q", 1.0, 50), P("p", 1.0, 50), P("r", 2.0, 60)]
    assert ids(pareto_front(dup)) == ["p", "q", "r"]
    assert ids(pareto_front(dup[::-1])) == ["p", "q", "r"]
    # a more accurate point that is cheaper removes everything after it that is not better
    assert ids(pareto_front([P("big", 5.0, 60), P("small", 1.0, 90)])) == ["small"]
    # missing / NaN accuracies are ignored; empty input gives an empty front
    assert ids(pareto_front([P("n", 1.0, float("nan")), P("m", 2.0, 10), {"id": "o", "gflops": 0.1}])) == ["m"]
    assert pareto_front([]) == []
    # other column names
    assert ids(pareto_front([{"id": 1, "macs": 3, "acc": 2}, {"id": 2, "macs": 3, "acc": 1}], cost="macs", acc="acc")) == [1]


def test_pareto_front_matches_the_definition_on_random_points():
    rng = random.Random(0)
    for _ in range(200):
        pts = [P(f"s{k}", rng.choice([0.5, 1.0, 1.5, 2.0, 3.0]), rng.choice([10, 20, 30, 40])) for k in range(rng.randint(1, 12))]
        brute = [p for p in pts if not any(
            q is not p and q["gflops"] <= p["gflops"] and q["acc_after"] >= p["acc_after"]
            and (q["gflops"] < p["gflops"] or q["acc_after"] > p["acc_after"]) for q in pts)]
        front = pareto_front(pts)
        assert sorted(ids(front)) == sorted(ids(brute))
        shuffled = pts[:]
        rng.shuffle(shuffled)
        assert ids(pareto_front(shuffled)) == ids(front)  # deterministic order
        assert [p["gflops"] for p in front] == sorted(p["gflops"] for p in front)
        assert all(a["acc_after"] <= b["acc_after"] for a, b in zip(front, front[1:]))


@pytest.fixture
def trained(fake, tmp_path):
    run = tmp_path / "runs" / "demo"
    write_selection(run, fake, budget=0.0015)
    train_run(run, console=quiet(), **{**FAST, "latency": True, "latency_batch": 4, "latency_repeats": 1})
    return run


def test_export_front_files(trained):
    res = export_pareto(trained, console=quiet())
    out = trained / "export"
    assert [p.name for p in res.files] == [f"{name}.{ext}" for name in ("front", "front-latency")
                                           for ext in ("csv", "json", "png", "svg")]
    assert all(p.is_file() and p.stat().st_size > 0 for p in res.files)
    assert not (out / "models").exists()
    rows = read_results(trained)
    expected = pareto_front(rows)
    assert ids(res.front) == ids(expected) and len(expected) >= 1
    with open(out / "front.csv") as fh:
        got = list(csv.DictReader(fh))
    assert [r["id"] for r in got] == ids(expected)
    assert [float(r["acc_after"]) for r in got] == [r["acc_after"] for r in expected]
    data = json.loads((out / "front.json").read_text())
    assert data["budget"] == {"axis": "gflops", "value": 0.0015, "unit": "GFLOPs"} and data["points"] == len(rows) == 6
    assert [r["id"] for r in data["front"]] == ids(expected)
    assert (out / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = (out / "front.svg").read_text()
    assert "GFLOPs (fvcore: 1 multiply-add = 1 FLOP)" in svg or "GFLOPs" in svg
    res.table()  # renders
    # the latency front: accuracy against the latency klas train measured (the networks it timed)
    timed = [r for r in rows if r["latency_ms"] == r["latency_ms"]]
    assert timed and ids(res.fronts["latency"]) == ids(pareto_front(timed, cost="latency_ms"))
    lat = json.loads((out / "front-latency.json").read_text())
    assert lat["axis"] == "latency" and lat["cost"] == "latency_ms" and [r["id"] for r in lat["front"]] == ids(res.fronts["latency"])


def _in_run_net(fake, run: Path) -> StitchNet:
    """The trained StitchNet as train_run left it: cache models + the final checkpoint."""
    sel = json.loads((run / "selection.json").read_text())
    ckpt = load_checkpoint(checkpoint_path(run))
    net = StitchNet.from_loaded(fake.load_models(), [StitchSpec.from_json(s) for s in sel["stitches"]], kind=ckpt["layer"])
    for sid, state in ckpt["stitch_states"].items():
        net.stitch_layer(sid).load_state_dict(state)
    for name, state in ckpt["anchor_states"].items():
        net.adapter(name).load_state_dict(state)
    return net.eval()


def _all_on_front(run: Path) -> None:
    """Make every network a front member (distinct costs, accuracy rising with cost) to export them all."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(run / "results.parquet")
    rows = table.to_pylist()
    for rank, r in enumerate(sorted(rows, key=lambda r: r["macs"])):
        r["acc_after"] = 0.1 + 0.01 * rank
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), run / "results.parquet")


def test_export_models_round_trip(fake, trained):
    _all_on_front(trained)
    res = export_pareto(trained, models=True, console=quiet())
    assert set(res.models) == {stitch_id(*p) for p in PAIRS} | set(MODELS)
    net = _in_run_net(fake, trained)
    torch.manual_seed(0)
    x = torch.randn(5, 3, 32, 32)
    prof = {n: tiny_vit(n).profile for n in MODELS}
    for rid, rel in res.models.items():
        path = res.out_dir / rel
        model = load_stitched(path)
        assert not model.training
        with torch.no_grad():
            torch.testing.assert_close(model(x), net(x, rid), rtol=0, atol=0)
        cfg = json.loads((path / "config.json").read_text())
        with safe_open(str(path / "model.safetensors"), "pt") as fh:
            keys = list(fh.keys())
            saved = sum(fh.get_tensor(k).numel() for k in keys)
        if rid in MODELS:
            assert cfg["kind"] == "anchor" and cfg["src"]["arch"] == rid
            assert saved == prof[rid].params  # the whole model, nothing else
            continue
        s = net.specs[rid]
        assert cfg["kind"] == "stitch" and (cfg["src"]["cut"], cfg["dst"]["cut"]) == (s.src_cut, s.dst_cut)
        assert cfg["src"]["arch"] == s.src and cfg["dst"]["arch"] == s.dst and cfg["route"] == read_route(trained, rid)
        assert cfg["data_config"]["input_size"] == [3, 32, 32] and cfg["num_classes"] == 10
        # exactly the blocks it runs: a's stem + blocks 0..src_cut-1, the layer, b's blocks dst_cut.. + head
        assert saved == stitch_params(prof[s.src], s.src_cut, prof[s.dst], s.dst_cut, "linear")
        src_blocks = {int(k.split(".")[2]) for k in keys if k.startswith("src.blocks.")}
        dst_blocks = {int(k.split(".")[2]) for k in keys if k.startswith("dst.blocks.")}
        assert src_blocks == set(range(s.src_cut)) and dst_blocks == set(range(s.dst_cut, 4))
        assert not any(k.startswith(("src.head", "src.norm.", "dst.patch_embed", "dst.cls_token", "dst.pos_embed")) for k in keys)
    index = json.loads((res.out_dir / "models" / "index.json").read_text())
    assert len(index["models"]) == len(res.models)


def read_route(run: Path, rid: str) -> str:
    return next(r["route"] for r in read_results(run) if r["id"] == rid)


@pytest.mark.parametrize("opts", [dict(), dict(anchor_routes=False), dict(layer="lora", teacher="largest",
                                                                       loss="ce=1,distill=1")],
                         ids=["anchor-routes", "no-anchor-routes", "lora-distill"])
def test_export_full_tuned_run_is_exactly_the_evaluated_network(fake, tmp_path, opts):
    """After joint training (anchors tuned, and sampled as routes by default) every artifact, anchor or
    stitch, computes what the run evaluated: the same logits as the trained net, the same eval accuracy."""
    from klas.train import SplitData, trained_net

    run = tmp_path / "ft"
    write_selection(run, fake, pairs=PAIRS[:2])
    train_run(run, console=quiet(), **{**FAST, "full_tune": True, "epochs": 1, **opts})
    evaluated = {r["id"]: r["acc_after"] for r in read_results(run)}
    _all_on_front(run)
    res = export_pareto(run, models=True, console=quiet())
    assert set(res.models) == set(evaluated)
    net = _in_run_net(fake, run)
    assert trained_net(run).net.state_dict().keys() == net.state_dict().keys()
    x = torch.randn(3, 3, 32, 32)
    eval_data = SplitData(fake, "eval")
    for rid, rel in res.models.items():
        model = load_stitched(res.out_dir / rel)
        assert model.config["full_tune"] is True
        with torch.no_grad():
            torch.testing.assert_close(model(x), net(x, rid), rtol=0, atol=0)
            correct = sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb, _ in eval_data.batches(range(eval_data.n), 64, torch.device("cpu")))
        assert correct / eval_data.n == evaluated[rid], rid
    if opts.get("layer") == "lora":  # the rank is recorded; an artifact of another rank is refused, not mis-built
        rid, rel = next((r, p) for r, p in res.models.items() if "->" in r)
        cfg_path = res.out_dir / rel / "config.json"
        cfg = json.loads(cfg_path.read_text())
        assert cfg["stitch"]["rank"] == lora_rank(cfg["stitch"]["in_width"], cfg["stitch"]["out_width"])
        cfg["stitch"]["rank"] += 1
        cfg_path.write_text(json.dumps(cfg))
        with pytest.raises(KlasError, match="config.json was edited after export"):  # the safetensors record its hash
            load_stitched(res.out_dir / rel)
        from safetensors.torch import load_file, save_file

        weights = res.out_dir / rel / "model.safetensors"  # as an artifact of a klas before hashes: the rank is checked
        save_file(load_file(str(weights)), str(weights), metadata={"format": "klas.stitched/1"})
        with pytest.raises(KlasError, match="LoRA stitch of rank"):
            load_stitched(res.out_dir / rel)
    # and the tuned anchors differ from the cached originals
    original = {m.name: m.adapter for m in fake.load_models()}
    with torch.no_grad():
        assert not torch.equal(original[list(MODELS)[0]](x), net(x, list(MODELS)[0]))


def test_export_onnx_never_fails_the_export(trained):
    res = export_pareto(trained, models=True, onnx=True, console=quiet())
    assert set(res.onnx) == set(res.models)
    for rid, status in res.onnx.items():
        onnx_file = res.out_dir / res.models[rid] / "model.onnx"
        assert status == "ok" and onnx_file.is_file() or status.startswith("failed:")


def test_export_refusals(fake, tmp_path, trained):
    untrained = tmp_path / "untrained"
    write_selection(untrained, fake)
    with pytest.raises(KlasError, match="not trained yet"):
        export_pareto(untrained, models=True, console=quiet())
    with pytest.raises(KlasError, match="not trained yet"):
        export_pareto(untrained, console=quiet())
    assert not (untrained / "export").exists()
    with pytest.raises(KlasError, match="no run directory"):
        export_pareto(tmp_path / "missing", console=quiet())
    with pytest.raises(KlasError, match="pass --models too"):
        export_pareto(trained, onnx=True, console=quiet())
    with pytest.raises(KlasError, match="not an exported klas model"):
        load_stitched(tmp_path)
    # the cache changed after training: models cannot be rebuilt from it, the front still can
    fake.registry[str(fake.path)] = FakeCache(fake.path, fingerprint="fp-2")
    with pytest.raises(KlasError, match="changed since the search"):
        export_pareto(trained, models=True, console=quiet())
    assert export_pareto(trained, console=quiet()).front


def test_export_refuses_training_of_another_selection(fake, trained):
    """The search was redone (other stitches) but the old training is still there: no stale front."""
    res = export_pareto(trained, console=quiet())
    front_before = (res.out_dir / "front.csv").read_bytes()
    write_selection(trained, fake, pairs=PAIRS[:2], budget=0.0015)
    for models in (False, True):
        with pytest.raises(KlasError, match="made from another selection .*rerun klas train .* --overwrite"):
            export_pareto(trained, models=models, console=quiet())
    assert (res.out_dir / "front.csv").read_bytes() == front_before  # the old export is left as it was
    train_run(trained, console=quiet(), overwrite=True, **FAST)
    assert not (trained / "export").exists()  # retraining removes the front of the earlier training
    assert len(export_pareto(trained, console=quiet()).front) >= 1


def test_damaged_run_files_are_one_line_errors(fake, trained):
    files = {name: (trained / name).read_bytes() for name in ("results.parquet", "train.json")}
    ckpt = checkpoint_path(trained)
    files_ckpt = ckpt.read_bytes()
    cases = [("results.parquet", b"PAR1 not really", "results.parquet is unreadable"),
             ("train.json", b"[1, 2]", "is not a klas training manifest"),
             ("train.json", b"{\"selection_sha256\": \"x\"", "training manifest .* is unreadable")]
    for name, data, msg in cases:
        (trained / name).write_bytes(data)
        with pytest.raises(KlasError, match=msg):
            export_pareto(trained, console=quiet())
        (trained / name).write_bytes(files[name])
    ckpt.write_bytes(files_ckpt[: len(files_ckpt) // 2])  # a torn or foreign checkpoint
    with pytest.raises(KlasError, match="checkpoint .* is unreadable"):
        export_pareto(trained, models=True, console=quiet())
    with pytest.raises(KlasError, match="checkpoint .* is unreadable"):
        train_run(trained, console=quiet(), resume=True, **FAST)
    ckpt.write_bytes(files_ckpt)
    assert export_pareto(trained, models=True, console=quiet()).models
