"""klas tree: the Stitch Tree module against its routes run one by one, its exact cost, the choice of
share points, and the stage (train, resume, evaluate, export, load_tree) on a real tiny cache."""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from klas.errors import KlasError
from klas.stitch.layers import STITCH_KINDS
from klas.stitch.network import AnchorModel, StitchNet, stitch_macs
from klas.stitch.tree import StitchTree, check_share, direct_tree_macs, relative_cut, tree_cost, tree_spec

sys.path.insert(0, str(Path(__file__).parent))
from test_stitch_network import tiny, vit  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def three():
    """A ViT trunk candidate, a narrower ViT and a ResNet (a bridged branch): different architectures."""
    a, b = vit(0, 32, depth=4), vit(1, 48, depth=3)
    c = tiny("resnet18", 2, num_classes=10)
    return {m.name: m for m in (a, b, c)}


def _net(models, spec, kind="linear"):
    torch.manual_seed(0)
    return StitchNet({n: models[n].adapter for n in spec.names}, {n: models[n].profile for n in spec.names},
                     spec.stitch_specs(), kind=kind).eval()


def test_relative_cut_and_share_range(three):
    p = {n: m.profile for n, m in three.items()}
    assert [relative_cut(p["vit32"], s, p["resnet18"]) for s in (1, 2, 3)] == [2, 4, 6]  # 8 blocks vs 4
    assert [relative_cut(p["vit32"], s, p["vit48"]) for s in (1, 2, 3)] == [1, 2, 2]  # 3 blocks: never the last rep
    for bad in (0, 4, -1, True):
        with pytest.raises(KlasError, match=r"share point .* out of range for trunk vit32 \(4 blocks\): use a block boundary in 1\.\.3"):
            check_share("vit32", p["vit32"], bad)
    with pytest.raises(KlasError, match="trunk 'nope' is not among the models"):
        tree_spec(p, "nope", 1)


@pytest.mark.parametrize("trunk, share", [("vit32", 2), ("resnet18", 5), ("vit48", 1)])
def test_tree_outputs_equal_each_route_run_one_by_one(three, trunk, share):
    p = {n: m.profile for n, m in three.items()}
    spec = tree_spec(p, trunk, share)
    net = _net(three, spec)
    tree = StitchTree.from_net(net, spec).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = tree.outputs(x)
        feats = tree(x)
        assert set(out) == set(feats) == set(p)
        for s in spec.stitch_specs():  # trunk prefix -> stitch -> branch suffix, as its own StitchedModel
            logits, f = net.model(s.id).logits_and_features(x)
            assert torch.equal(out[s.dst][0], logits) and torch.equal(out[s.dst][1], f)
            assert torch.equal(feats[s.dst], f)
        own = AnchorModel(three[trunk].adapter).logits_and_features(x)  # the trunk's branch is the trunk model
        assert torch.equal(out[trunk][0], own[0]) and torch.equal(out[trunk][1], own[1])
        assert torch.equal(out[trunk][0], three[trunk].adapter.model(x))


@pytest.mark.parametrize("kind", STITCH_KINDS)
def test_tree_cost_is_the_sum_of_exact_parts_and_the_direct_count(three, kind):
    p = {n: m.profile for n, m in three.items()}
    for trunk, share in (("vit32", 1), ("vit32", 3), ("resnet18", 4)):
        spec = tree_spec(p, trunk, share)
        cost = tree_cost(p, spec, kind)
        pt = p[trunk]
        # each other branch = its binary stitch's cost without the trunk prefix, which the tree runs once
        parts = pt.prefix_macs(share) + pt.suffix_macs(share) + sum(
            stitch_macs(pt, share, p[m], c, kind) - pt.prefix_macs(share) for m, c in spec.branches)
        assert cost["macs"] == parts
        assert cost["all_separate_macs"] == sum(q.macs for q in p.values())
        assert cost["largest_macs"] == max(q.macs for q in p.values())
        tree = StitchTree.from_net(_net(three, spec, kind), spec)
        assert direct_tree_macs(tree, (3, 32, 32)) == cost["macs"]
        # parameters: exactly what the tree runs (whole trunk, each branch's blocks from its cut and head, stitches)
        used = sum(q.numel() for q in three[trunk].adapter.parameters())
        for m, c in spec.branches:
            a = three[m].adapter
            used += sum(q.numel() for mod in a.blocks[c:] + a.head_modules() for q in mod.parameters())
            used += sum(q.numel() for q in tree.stitch(m).parameters())
        assert cost["params"] == used


def test_auto_share_points_take_the_best_score_per_cost_bucket():
    from klas.tree.choose import auto_shares

    rows = [{"share": s, "macs": m, "score": g} for s, m, g in
            [(1, 100, 5.0), (2, 110, 1.0), (3, 150, 9.0), (4, 160, 2.0), (5, 190, 3.0), (6, 200, 0.5)]]
    assert auto_shares(rows, 3) == [2, 4, 6]  # buckets [100,133), [133,167), [167,200]
    assert auto_shares(rows, 6) == [1, 2, 3, 4, 5, 6]
    assert auto_shares(rows, 1) == [6]


def test_fidelity_counts_what_a_branch_adds_to_the_trunk():
    """added: the images the trunk's model gets wrong and the branch's model right; top1_added: the branch there."""
    from klas.tree.evaluate import fidelity

    def outs(pred):
        logits = np.full((6, 3), -1.0, dtype=np.float32)
        logits[np.arange(6), pred] = 1.0
        return {"logits": logits, "features": logits.copy()}

    labels = np.array([0, 1, 2, 0, 1, 2])
    own = {"t": outs([1, 2, 2, 0, 1, 2]), "m": outs([0, 1, 0, 0, 1, 2])}  # t wrong on 0, 1; m right on both
    tree = {"t": own["t"], "m": outs([0, 0, 2, 0, 1, 2])}  # the branch right on image 0 only of those two
    fid = fidelity(tree, own, labels, trunk="t")
    assert fid["m"]["added"] == 2 and fid["m"]["top1_added"] == 0.5 and "added" not in fid["t"]
    assert fid["m"]["top1"] == pytest.approx(5 / 6) and fid["m"]["model_top1"] == pytest.approx(5 / 6)
    assert "added" not in fidelity(tree, own, labels)["m"]  # no trunk given: nothing to add to
    none = fidelity(tree, {"t": own["t"], "m": own["t"]}, labels, trunk="t")["m"]
    assert none["added"] == 0 and none["top1_added"] is None


# -- the stage on a real tiny cache -------------------------------------------------------------------

FAST = dict(epochs=1, task_epochs=1, probe_epochs=1, latency=False, init_images=40, eval_batch_size=64)


MODELS = ["klas_vit_ti", "klas_resnet_s", "b"]  # b: a second klas_vit_ti, other weights (an alias)


@pytest.fixture(scope="module")
def tree_cache(tmp_path_factory):
    """A real klas cache of three random-init demo models, 100 digits per split: a ViT, a ResNet and a second
    ViT of the first one's architecture with other weights (Mai et al.'s same-architecture case)."""
    from klas.cache import build_cache

    root = tmp_path_factory.mktemp("tree")
    build_cache(["klas_vit_ti", "klas_resnet_s", "b:klas_vit_ti"], "digits", root / "c", limit=100, random_init=True,
                root=root, console=Console(file=io.StringIO()), progress=False)
    return root / "c"


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


def _run(cache, run, **kw):
    from klas.tree import tree_run

    return tree_run(cache, run, console=quiet(), progress=False, root=cache.parent, **{**FAST, **kw})


def _stitch_states(run: Path) -> dict:
    out = {}
    for f in sorted((run / "checkpoints").glob("s*.pt")):
        out[f.name] = torch.load(f, weights_only=True)["stitch_states"]
    return out


def _same_states(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].keys() == b[k].keys()
        for sid in a[k]:
            for name, t in a[k][sid].items():
                assert torch.equal(t, b[k][sid][name]), (k, sid, name)


@pytest.fixture(scope="module")
def finished(tree_cache, tmp_path_factory):
    """A three-model tree: trunk klas_resnet_s, a branch into each ViT."""
    run = tmp_path_factory.mktemp("runs") / "t"
    return _run(tree_cache, run, trunk="klas_resnet_s", share_at=(2, 5))


@pytest.fixture(scope="module")
def pair(tree_cache, tmp_path_factory):
    """A two-model tree over two of the cache's three models (--models)."""
    run = tmp_path_factory.mktemp("runs") / "pair"
    return _run(tree_cache, run, models=("klas_vit_ti", "klas_resnet_s"), trunk="klas_vit_ti", share_at=(3,))


def _check_sweep(result, profiles, names, trunk, shares):
    m = result.manifest
    assert result.complete and json.loads((result.run_dir / "tree.json").read_text())["trees"] == json.loads(
        json.dumps(m["trees"]))
    assert m["trunk"] == trunk and m["models"] == names and [r["share"] for r in m["trees"]] == shares
    p = {n: profiles[n] for n in names}
    ref = m["reference"]
    for r in m["trees"]:
        spec = tree_spec(p, trunk, r["share"])
        assert r["macs"] == tree_cost(p, spec)["macs"] and r["gflops"] == r["macs"] / 1e9
        assert r["spec"] == spec.to_json() and set(r["fidelity"]) == set(names)
        assert r["extra_cost"] == pytest.approx(r["macs"] / max(q.macs for q in p.values()) - 1)
        for n in names:
            fid = r["fidelity"][n]
            assert -1 <= fid["cosine"] <= 1 and 0 <= fid["top1"] <= 1
        assert r["fidelity"][trunk]["cosine"] == pytest.approx(1.0)  # the trunk's branch is the model
        assert "added" not in r["fidelity"][trunk]
        for n in set(names) - {trunk}:
            fid = r["fidelity"][n]
            assert fid["added"] >= 0 and (fid["top1_added"] is None) == (fid["added"] == 0)
        for acc, rec, key in (("acc", "recovered", "acc"), ("acc_score", "recovered_score", "acc_score")):
            gain = ref["ceiling"][key] - ref["floor"][key]
            if gain > 0:
                assert r[rec] == pytest.approx((r[acc] - ref["floor"][key]) / gain)
            else:  # running all models gains nothing over the floor: no gain to recover
                assert r[rec] != r[rec]
        assert [h["loss_kind"] for h in r["history"]] == ["ffm", "ce"]
    assert ref["ceiling"]["macs"] == sum(q.macs for q in p.values()) and ref["ceiling"]["models"] == names
    # the floor: the single model whose classifier scores best on the score split (not on eval)
    assert ref["floor"]["model"] == max(names, key=lambda n: (ref["singles"][n]["acc_score"], n))
    assert ref["floor"]["acc"] == ref["singles"][ref["floor"]["model"]]["acc"]


def test_tree_run_writes_a_complete_sweep(finished, pair, tree_cache):
    from klas.cache import open_cache

    p = open_cache(tree_cache).profiles
    _check_sweep(finished, p, MODELS, "klas_resnet_s", [2, 5])
    for r in finished.manifest["trees"]:  # one branch per other model, each at the trunk's relative depth
        assert [(b["model"], b["cut"]) for b in r["spec"]["branches"]] == [
            (n, relative_cut(p["klas_resnet_s"], r["share"], p[n])) for n in ("klas_vit_ti", "b")]
    _check_sweep(pair, p, ["klas_vit_ti", "klas_resnet_s"], "klas_vit_ti", [3])


def test_gain_only_equals_the_trees_floor_and_ceiling(finished, pair, tree_cache, monkeypatch):
    """klas tree --gain-only: every pair and all three models, with the numbers klas tree reports for them."""
    import klas.cli
    from klas.tree import TreeConfig, subset_gains

    report = subset_gains(tree_cache, TreeConfig(**{**FAST, "root": tree_cache.parent}), console=quiet())
    by = {tuple(r["models"]): r for r in report.rows}
    assert set(by) == {("klas_vit_ti", "klas_resnet_s"), ("klas_vit_ti", "b"), ("klas_resnet_s", "b"), tuple(MODELS)}
    for run, key in ((finished, tuple(MODELS)), (pair, ("klas_vit_ti", "klas_resnet_s"))):
        ref, row = run.manifest["reference"], by[key]
        assert row["floor"]["model"] == ref["floor"]["model"]
        assert (row["floor"]["eval"], row["floor"]["score"]) == (ref["floor"]["acc"], ref["floor"]["acc_score"])
        assert (row["ceiling"]["eval"], row["ceiling"]["score"]) == (ref["ceiling"]["acc"], ref["ceiling"]["acc_score"])
        assert row["gain"]["eval"] == ref["ceiling"]["acc"] - ref["floor"]["acc"]
    assert [r["gain"]["eval"] for r in report.rows] == sorted((r["gain"]["eval"] for r in report.rows), reverse=True)
    printed = quiet()
    monkeypatch.setattr(klas.cli, "out", printed)
    with pytest.raises(SystemExit) as done:
        klas.cli.main(["tree", str(tree_cache), "--gain-only", "--models", "klas_vit_ti,b", "--probe-epochs", "1", "--root",
              str(tree_cache.parent), "--device", "cpu"])
    assert done.value.code == 0
    out = printed.file.getvalue()
    row = by[("klas_vit_ti", "b")]
    assert "klas_vit_ti + b" in out and f"{100 * row['ceiling']['eval']:.2f} ({100 * row['ceiling']['score']:.2f})" in out
    assert "klas_resnet_s" not in out


def test_resume_continues_exactly_and_runs_are_deterministic(finished, tree_cache, tmp_path):
    run = tmp_path / "r"
    first = _run(tree_cache, run, trunk="klas_resnet_s", share_at=(2, 5), stop_after=1)
    assert not first.complete and not (run / "tree.json").exists()
    with pytest.raises(KlasError, match="already has tree output; pass --resume"):
        _run(tree_cache, run, trunk="klas_resnet_s", share_at=(2, 5))
    done = _run(tree_cache, run, trunk="klas_resnet_s", share_at=(2, 5), resume=True)
    assert done.complete
    _same_states(_stitch_states(run), _stitch_states(finished.run_dir))
    for a, b in zip(done.manifest["trees"], finished.manifest["trees"]):
        assert (a["acc"], a["fidelity"], a["fit_r2"]) == (b["acc"], b["fidelity"], b["fit_r2"])
    with pytest.raises(KlasError, match="other options or another tree"):
        _run(tree_cache, run, trunk="klas_resnet_s", share_at=(2, 5), resume=True, lr=1e-3)


def test_export_and_load_tree_round_trip(finished):
    import klas
    from klas.export import export_tree
    from klas.tree import trained_tree

    result = export_tree(finished.run_dir, root=finished.run_dir.parent.parent, console=quiet())
    for name in ("tradeoff.csv", "tradeoff.json", "tradeoff.png", "tradeoff.svg"):
        assert (result.out_dir / name).is_file()
    rows = json.loads((result.out_dir / "tradeoff.json").read_text())["rows"]
    assert [r["system"] for r in rows][-2:] == ["floor: " + finished.manifest["reference"]["floor"]["model"],
                                                "ceiling: all models separately"]
    x = torch.randn(4, 3, 32, 32)
    for share, rel in result.artifacts.items():
        tree = klas.load_tree(result.out_dir / rel)
        evaluated, _, _ = trained_tree(finished.run_dir, share, root=finished.run_dir.parent.parent)
        with torch.no_grad():
            got, want = tree.outputs(x), evaluated.outputs(x)
            assert got.keys() == want.keys()
            for n in got:
                assert torch.equal(got[n][0], want[n][0]) and torch.equal(got[n][1], want[n][1])
            assert all(torch.equal(tree(x)[n], want[n][1]) for n in got)
        assert not any(p.requires_grad for p in tree.parameters())
        assert tree.config["gflops"] == next(r["gflops"] for r in finished.manifest["trees"] if r["share"] == share)
    with pytest.raises(KlasError, match="is not an exported klas tree"):
        klas.load_tree(result.out_dir)


def test_trunk_rule_floor_takes_the_reported_floor_model(finished, tree_cache):
    from klas.cache import open_cache
    from klas.tree import TreeConfig
    from klas.tree.prepare import prepare
    from klas.tree.run import choose_plan

    cache = open_cache(tree_cache)
    cfg = TreeConfig(**{**FAST, "root": tree_cache.parent, "trunk_rule": "floor", "share_at": (2,)})
    prepared = prepare(cache, cfg, torch.device("cpu"), console=quiet(), progress=False)
    plan = choose_plan(cache, cfg, prepared, torch.device("cpu"))
    assert plan.trunk == finished.manifest["reference"]["floor"]["model"]
    assert [s.share for s in plan.specs] == [2] and plan.scores.theta.shape == finished.plan.scores.theta.shape


def test_tuned_branches_train_their_own_blocks_and_leave_the_models_alone(pair, tree_cache, tmp_path):
    """--branch-lr-scale: each branch's blocks from its cut and its head train, on the tree's own copy of the
    model; its blocks before the cut, the trunk, the floor and the ceiling stay the frozen models'. Resume is
    exact, and what export writes runs the tuned weights."""
    import klas
    from klas.cache import open_cache
    from klas.export import export_tree
    from klas.tree import trained_tree

    kw = dict(models=("klas_vit_ti", "klas_resnet_s"), trunk="klas_vit_ti", share_at=(3,), branch_lr_scale=0.5)
    run = tmp_path / "tuned"
    assert not _run(tree_cache, run, stop_after=1, **kw).complete
    done = _run(tree_cache, run, resume=True, **kw)
    straight = _run(tree_cache, tmp_path / "straight", **kw)
    ckpt, want = (torch.load(r / "checkpoints" / "s3.pt", weights_only=True) for r in (run, straight.run_dir))
    assert set(ckpt["anchor_states"]) == {"klas_resnet_s"} and ckpt["weights_sha256"] == want["weights_sha256"]
    assert ckpt["weights_sha256"] == done.manifest["trees"][0]["checkpoint_sha256"]

    root = tree_cache.parent
    models = {m.name: m.adapter for m in open_cache(tree_cache).load_models(root=root)}
    tree, row, _ = trained_tree(run, 3, root=root)
    cut = dict(tree.spec.branches)["klas_resnet_s"]
    branch, model = tree.adapter("klas_resnet_s"), models["klas_resnet_s"]

    def same(a, b):
        return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))

    assert all(same(x, y) for x, y in zip(branch.blocks[:cut], model.blocks[:cut]))
    assert not all(same(x, y) for x, y in zip(branch.blocks[cut:], model.blocks[cut:]))
    assert same(tree.adapter("klas_vit_ti"), models["klas_vit_ti"])
    frozen = pair.manifest
    assert done.manifest["reference"] == frozen["reference"]  # floor and ceiling: the models themselves
    assert row["fidelity"]["klas_resnet_s"] != frozen["trees"][0]["fidelity"]["klas_resnet_s"]

    result = export_tree(run, root=root, console=quiet())
    exported = klas.load_tree(result.out_dir / result.artifacts[3])
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        got, want = exported(x), tree.eval()(x)
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in got)


def test_cli_tree_defaults_are_the_config_defaults():
    import dataclasses

    import typer

    from klas.cli import app
    from klas.tree import TreeConfig

    defaults = {f.name: f.default for f in dataclasses.fields(TreeConfig)}
    cmd = typer.main.get_command(app).commands["tree"]
    checked = 0
    for param in cmd.params:  # models and share_at are parsed from words (all, auto); device and root resolved
        if param.name in defaults and param.name not in ("models", "share_at", "device", "root"):
            assert param.default == defaults[param.name], param.name
            checked += 1
    assert checked >= 15


@pytest.mark.parametrize("argv, message", [
    (["--trunk", "klas_vit_b"], r"trunk 'klas_vit_b' is not in cache .* \(it has klas_vit_ti, klas_resnet_s, b\)"),
    (["--models", "klas_vit_ti,b", "--trunk", "klas_resnet_s"], r"trunk 'klas_resnet_s' is not in --models \(it has klas_vit_ti, b\)"),
    (["--models", "klas_vit_ti,nope"], r"--models names nope, not in cache"),
    (["--models", "b"], r"--models must name two or more different cached models"),
    (["--trunk", "klas_vit_ti", "--share-at", "6"], r"share point 6 is out of range for trunk klas_vit_ti \(6 blocks\)"),
    (["--trunk", "klas_vit_ti", "--share-at", "0,2"], r"share point 0 is out of range"),
    (["--share-at", "two"], r"--share-at 'two' is not a list of block boundaries"),
    (["--epochs", "0"], r"--epochs plus --task-epochs must be at least 1"),
    (["--layer", "conv"], r"unknown --layer 'conv'"),
    (["--trunk-rule", "best"], r"unknown --trunk-rule 'best'"),
    (["--branch-lr-scale", "-1"], r"--branch-lr-scale must be a finite number >= 0"),
    (["--resume"], r"has nothing to resume"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(capsys, tree_cache, tmp_path, argv, message):
    import re

    from klas.cli import main

    run = tmp_path / "run"
    with pytest.raises(SystemExit) as done:
        main(["tree", str(tree_cache), "--run", str(run), "--root", str(tree_cache.parent), *argv])
    out, err = capsys.readouterr()
    assert done.value.code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and re.search(message, err), err
    assert not run.exists()


def test_export_tree_of_an_unfinished_run_is_refused(capsys, tmp_path):
    from klas.cli import main

    with pytest.raises(SystemExit) as done:
        main(["export", "tree", str(tmp_path / "none")])
    err = capsys.readouterr().err
    assert done.value.code == 2 and err.startswith("error: there is no tree run") and err.count("\n") == 1
