"""Model aliases: two trainings of one architecture cached, enumerated and rebuilt under their own names."""
from __future__ import annotations

import io

import pytest
import timm
import torch
from rich.console import Console
from safetensors.torch import save_file

from klas.cache import build_cache, open_cache
from klas.errors import KlasError
from klas.models import parse_spec
from klas.stitch.candidates import enumerate_stitches


def test_alias_syntax_round_trips(tmp_path):
    w = tmp_path / "w.safetensors"
    save_file(timm.create_model("resnet18", pretrained=False).state_dict(), str(w))
    spec = parse_spec(f"b:resnet18={w}")
    assert (spec.name, spec.arch, spec.path, spec.alias) == ("b", "resnet18", w, "b")
    assert parse_spec(str(spec)) == spec
    assert parse_spec("resnet18").name == "resnet18" and str(parse_spec("mine:resnet18")) == "mine:resnet18"
    with pytest.raises(KlasError, match="alias"):
        parse_spec("a/b:resnet18")


def test_same_architecture_twice_under_aliases(tmp_path):
    root = tmp_path
    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = timm.create_model("resnet18", pretrained=False, num_classes=10)
        paths.append(root / f"r{seed}.safetensors")
        save_file(model.state_dict(), str(paths[-1]))
    models = [f"resnet18={paths[0]}", f"other:resnet18={paths[1]}"]
    build_cache(models, "digits", root / "c", root=root, limit=16, batch_size=8, progress=False,
                preprocess={"input_size": [3, 32, 32]}, console=Console(file=io.StringIO()))
    cache = open_cache(root / "c")
    assert cache.model_names == ["resnet18", "other"]
    entry = {m["name"]: m for m in cache.manifest["models"]}
    assert entry["other"]["arch"] == "resnet18" and entry["other"]["spec"].startswith("other:resnet18=")
    assert entry["other"]["weights_sha256"] != entry["resnet18"]["weights_sha256"]
    loaded = cache.load_models(root=root)
    assert [m.name for m in loaded] == ["resnet18", "other"]
    stitches = enumerate_stitches(cache.profiles, "both")
    assert {(c.src, c.dst) for c in stitches} == {("resnet18", "other"), ("other", "resnet18")}
