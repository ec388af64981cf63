"""klas.zoo: timm registration of the demo family, the zoo index, a tiny training smoke run (CPU)."""
from __future__ import annotations

import shutil

import pytest
import timm
import torch
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from timm.models.vision_transformer import VisionTransformer

import klas.zoo
from klas.errors import KlasError
from klas.utils import sha256_file
from klas.zoo import DEMO_ARCHS, FAMILIES, ZOO_ARCHS, is_zoo_model, read_zoo, stale_models, train_zoo, zoo_dir


@pytest.mark.parametrize("arch", ZOO_ARCHS)
def test_zoo_arch_builds_and_classifies_digits(arch):
    model = timm.create_model(arch).eval()
    with torch.inference_mode():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    cfg = model.pretrained_cfg
    assert tuple(cfg["input_size"]) == (3, 32, 32) and cfg["num_classes"] == 10
    assert tuple(cfg["mean"]) == tuple(cfg["std"]) == (0.5, 0.5, 0.5)
    assert cfg["crop_pct"] == 1.0 and cfg["interpolation"] == "bilinear"
    assert not cfg.get("url") and not cfg.get("hf_hub_id")  # weights come from klas, never a hub
    assert timm.data.resolve_model_data_config(model)["input_size"] == (3, 32, 32)


def test_vit_family_is_a_deit_analogue():
    vits = [timm.create_model(a) for a in FAMILIES["vit"]]
    assert all(isinstance(m, VisionTransformer) and m.cls_token is not None for m in vits)
    depths = {len(m.blocks) for m in vits}
    assert len(depths) == 1 and depths.pop() >= 6  # equal depth, room to stitch
    widths = [m.embed_dim for m in vits]
    assert widths == sorted(widths) and len(set(widths)) == 3
    head_dims = {m.blocks[0].attn.head_dim for m in vits}
    assert len(head_dims) == 1  # heads scale with width
    params = [sum(p.numel() for p in m.parameters()) for m in vits]
    assert params == sorted(params)


def test_cnn_family_is_a_resnet_analogue():
    small, large = (timm.create_model(a) for a in FAMILIES["cnn"])
    assert isinstance(small, ResNet) and isinstance(large, ResNet)
    assert isinstance(small.layer1[0], BasicBlock) and isinstance(large.layer1[0], Bottleneck)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in large.parameters())


def test_is_zoo_model():
    assert all(is_zoo_model(a) for a in ZOO_ARCHS)
    assert is_zoo_model("klas_vit_ti.anytag")  # pretrained tags are stripped
    assert not is_zoo_model("vit_tiny_patch16_224") and not is_zoo_model("resnet18")


def test_read_zoo_before_training_is_empty(tmp_path):
    assert read_zoo(tmp_path) == {}
    assert stale_models(tmp_path) == list(DEMO_ARCHS)  # plain `klas zoo` trains the demo families only
    assert zoo_dir(tmp_path) == tmp_path / "zoo"


def test_read_zoo_corrupt_index(tmp_path):
    zoo_dir(tmp_path).mkdir()
    (zoo_dir(tmp_path) / "zoo.json").write_text("{not json")
    with pytest.raises(KlasError, match="zoo index .* unreadable"):
        read_zoo(tmp_path)


def test_unknown_zoo_model(tmp_path):
    with pytest.raises(KlasError, match="unknown zoo model 'klas_vit_xl'"):
        train_zoo(tmp_path, names=["klas_vit_xl"])


SMOKE = ["klas_resnet_s", "klas_vit_ti"]


def _smoke(root, names):
    """A few optimiser steps on 64 images per split: exercises the whole path in seconds."""
    return train_zoo(root, names=names, epochs=3, max_steps=2, limit=64, threads=1)


@pytest.fixture(scope="module")
def smoke_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    threads = torch.get_num_threads()
    _smoke(root, SMOKE)
    assert torch.get_num_threads() == threads  # restored after training
    return root


def test_train_zoo_smoke_records_and_reuses(smoke_root):
    index = read_zoo(smoke_root)
    assert set(index) == set(SMOKE)
    for arch in SMOKE:
        rec = index[arch]
        path = zoo_dir(smoke_root) / rec["weights"]
        assert path.name == f"{arch}.safetensors" and sha256_file(path) == rec["sha256"]
        assert 0.0 <= rec["eval_acc"] <= 1.0
        assert rec["steps"] == 2 and rec["epochs"] == 3 and rec["recipe"]["max_steps"] == 2
        assert rec["params"] > 0 and rec["macs"] > 0 and rec["seconds"] > 0
        assert rec["data"] == "digits" and len(rec["data_fingerprint"]) == 64 and rec["threads"] == 1
        assert rec["train_images"] == rec["eval_images"] == 64 and rec["recipe"]["limit"] == 64
        # the saved weights load through timm's own pretrained mechanism
        model = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay={"file": str(path)}).eval()
        assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    # current records are reused, not retrained
    mtime = (zoo_dir(smoke_root) / "klas_vit_ti.safetensors").stat().st_mtime_ns
    assert _smoke(smoke_root, ["klas_vit_ti"]) == index
    assert (zoo_dir(smoke_root) / "klas_vit_ti.safetensors").stat().st_mtime_ns == mtime
    assert not list(zoo_dir(smoke_root).glob(".*tmp*"))  # no temp files left behind


def test_train_zoo_is_deterministic_and_retrains_damaged_weights(smoke_root, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(smoke_root, copy)
    (zoo_dir(copy) / "klas_resnet_s.safetensors").write_bytes(b"damaged")
    retrained = _smoke(copy, ["klas_resnet_s"])["klas_resnet_s"]
    # same seed, same machine => same weights
    assert retrained["sha256"] == read_zoo(smoke_root)["klas_resnet_s"]["sha256"]
    assert sha256_file(zoo_dir(copy) / "klas_resnet_s.safetensors") == retrained["sha256"]


def test_pretrained_true_uses_zoo_weights(smoke_root, monkeypatch):
    path = zoo_dir(smoke_root) / read_zoo(smoke_root)["klas_resnet_s"]["weights"]
    monkeypatch.setattr(klas.zoo, "zoo_weights", lambda arch, **kw: path)
    model = timm.create_model("klas_resnet_s", pretrained=True)
    from safetensors.torch import load_file

    assert torch.equal(model.state_dict()["fc.weight"], load_file(str(path))["fc.weight"])


def test_stale_records_are_detected(smoke_root):
    from klas.zoo import _is_current, _recipe_for
    from klas.data.digits import DigitsConfig

    rec = read_zoo(smoke_root)["klas_vit_ti"]
    recipe = _recipe_for("klas_vit_ti", epochs=3, max_steps=2, limit=64)
    fp = DigitsConfig().fingerprint()
    assert _is_current("klas_vit_ti", rec, recipe, fp, smoke_root)
    assert not _is_current("klas_vit_ti", {**rec, "arch_args": {**rec["arch_args"], "embed_dim": 1}}, recipe, fp, smoke_root)
    assert not _is_current("klas_vit_ti", rec, _recipe_for("klas_vit_ti"), fp, smoke_root)  # default recipe
    assert not _is_current("klas_vit_ti", rec, recipe, "0" * 64, smoke_root)  # other data
    assert stale_models(smoke_root, ["klas_vit_ti"]) == ["klas_vit_ti"]  # smoke weights are not the real ones


def test_bench_family_has_unequal_depths_and_widths_and_is_not_trained_by_default():
    from klas.zoo import BENCH_FAMILIES

    models = [timm.create_model(a) for a in BENCH_FAMILIES["vit-depth"]]
    depths, widths = [len(m.blocks) for m in models], [m.embed_dim for m in models]
    assert depths == sorted(depths) and len(set(depths)) == 3 and widths == sorted(widths) and len(set(widths)) == 3
    assert set(BENCH_FAMILIES["vit-depth"]) <= set(ZOO_ARCHS)
    assert {"klas_vit_d4", "klas_vit_d8"}.isdisjoint(DEMO_ARCHS)  # `klas zoo` / `make demo` do not train them


def test_cli_zoo_trains_the_demo_families_or_the_named_models(tmp_path, monkeypatch, capsys):
    from klas.cli import main

    calls = []
    monkeypatch.setattr(klas.zoo, "train_zoo", lambda **kw: calls.append(kw) or {})
    for argv in (["zoo", "--root", str(tmp_path)], ["zoo", "--root", str(tmp_path), "--model", "klas_vit_d4", "-m", "klas_vit_d8"]):
        with pytest.raises(SystemExit) as done:
            main(argv)
        assert done.value.code == 0
    assert calls[0]["names"] is None and calls[1]["names"] == ["klas_vit_d4", "klas_vit_d8"]


# --- shipped weights -----------------------------------------------------------------------------------

def _ship_smoke(smoke_root, directory):
    """Ship the smoke models as if they were the real ones (records as the default recipe's)."""
    from klas.zoo.run import _eval_split
    from klas.zoo.shipped import ship
    from klas.zoo.train import accuracy

    index = read_zoo(smoke_root)
    shipped = {}
    for arch in SMOKE:
        x, y = _eval_split(arch, smoke_root)
        shipped = ship({arch: index[arch]}, zoo_dir(smoke_root), lambda m: accuracy(m, x, y), directory=directory)
    return shipped


def test_ship_writes_verified_float16_weights_and_install_restores_them(smoke_root, tmp_path):
    from safetensors.torch import load_file

    from klas.zoo.run import _eval_split
    from klas.zoo.shipped import install_shipped, read_shipped
    from klas.zoo.train import accuracy

    shipped = _ship_smoke(smoke_root, tmp_path / "shipped")
    assert read_shipped(tmp_path / "shipped") == shipped and set(shipped) == set(SMOKE)
    for arch, rec in shipped.items():
        path = tmp_path / "shipped" / rec["weights"]
        assert sha256_file(path) == rec["sha256"] and rec["dtype"] == "float16"
        assert all(v.dtype == torch.float16 for v in load_file(str(path)).values() if v.is_floating_point())
        assert rec["trained_eval_acc"] == read_zoo(smoke_root)[arch]["eval_acc"]
        x, y = _eval_split(arch, smoke_root)
        target = tmp_path / "root" / "zoo" / rec["weights"]
        installed = install_shipped(arch, rec, target, lambda m: accuracy(m, x, y), directory=tmp_path / "shipped")
        assert sha256_file(target) == rec["sha256"] and installed["source"] == "shipped"
        assert installed["eval_acc"] == installed["shipped_eval_acc"] == rec["eval_acc"]  # same machine: exact


def test_damaged_shipped_weights_are_refused_with_the_fix(smoke_root, tmp_path):
    from klas.zoo.shipped import verify_shipped

    shipped = _ship_smoke(smoke_root, tmp_path)
    (tmp_path / shipped["klas_vit_ti"]["weights"]).write_bytes(b"damaged")
    with pytest.raises(KlasError, match=r"shipped weights of klas_vit_ti .* damaged .*klas zoo --force --model klas_vit_ti"):
        verify_shipped("klas_vit_ti", shipped["klas_vit_ti"], tmp_path)


def test_train_zoo_installs_shipped_weights_for_the_current_recipe_and_force_retrains(smoke_root, tmp_path, monkeypatch):
    """The decision train_zoo makes: shipped weights for exactly the default recipe are installed,
    --force (or another recipe) trains; the shipped index is matched on recipe, architecture and data."""
    import klas.zoo.run as run
    from klas.zoo import RECIPES
    from klas.zoo.shipped import read_shipped

    shipped = _ship_smoke(smoke_root, tmp_path / "shipped")
    # pretend the smoke recipe is the default one
    smoke_recipe = {a: klas.zoo._recipe_for(a, epochs=3, max_steps=2, limit=64) for a in SMOKE}
    monkeypatch.setattr(klas.zoo, "RECIPES", {**RECIPES, **smoke_recipe})
    monkeypatch.setattr(klas.zoo.shipped, "SHIPPED_DIR", tmp_path / "shipped")
    installed, trained = [], []
    monkeypatch.setattr(run, "install_and_record", lambda todo, root, console: installed.extend(a for a, _ in todo))
    monkeypatch.setattr(run, "train_and_record", lambda todo, root, console, shipped: trained.append((todo, shipped)))
    train_zoo(tmp_path / "root", names=SMOKE)
    assert installed == SMOKE and not trained
    train_zoo(tmp_path / "root", names=["klas_vit_ti"], force=True)
    assert [a for a, _ in trained[0][0]] == ["klas_vit_ti"] and trained[0][1] == {"klas_vit_ti": shipped["klas_vit_ti"]}
    assert read_shipped() == shipped


def test_retrained_model_is_compared_with_the_shipped_one(smoke_root, tmp_path, monkeypatch):
    from klas.zoo.run import compare_with_shipped

    shipped = _ship_smoke(smoke_root, tmp_path)
    rec = read_zoo(smoke_root)["klas_resnet_s"]
    monkeypatch.setattr(klas.zoo.shipped, "SHIPPED_DIR", tmp_path)
    d = compare_with_shipped("klas_resnet_s", rec, shipped["klas_resnet_s"], smoke_root)
    # the same weights up to float16 rounding: (nearly) the same predictions
    assert d["agreement"] > 0.95 and abs(d["eval_delta"]) <= 2 / 64
