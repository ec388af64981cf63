"""Models of different families in one run: cache -> search -> train -> export -> load_stitched.

Three tiny random-init models, each of another family and preprocessing:

* ``klas_t_eva``: timm's ``Eva`` as DINOv3 builds it (cls + 4 registers, RoPE in every block, no
  absolute position embedding), ImageNet mean/std, no classifier (timm's ``num_classes=0``);
* ``klas_t_vit``: a ViT with a cls token and 2 registers, CLIP's mean/std, native 48 px (so the
  shared 32 px resizes its position embedding), no classifier;
* ``mobilenetv3_small_050``: a CNN (NCHW maps), ImageNet mean/std, 1000 classes.

The run feeds every model the same 32 px pixels, each normalised for itself.
"""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import timm
import torch
from rich.console import Console
from timm.models import register_model

from klas.cache import build_cache, open_cache
from klas.data import build_transform
from klas.export import export_pareto, load_stitched
from klas.models import load_model
from klas.search import search
from klas.train import read_results, train_run, trained_net

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

CLIP = dict(mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711))
IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


@register_model
def klas_t_eva(pretrained: bool = False, **kwargs):
    kwargs = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2, **kwargs}
    kwargs["pretrained_cfg_overlay"] = {**(kwargs.get("pretrained_cfg_overlay") or {}), "input_size": (3, 32, 32), **IMAGENET}
    return timm.models.eva.vit_small_patch16_dinov3(pretrained=False, **kwargs)


@register_model
def klas_t_vit(pretrained: bool = False, **kwargs):
    kwargs = {"img_size": 48, "patch_size": 8, "embed_dim": 24, "depth": 3, "num_heads": 2, "reg_tokens": 2,
              "num_classes": 0, **kwargs}
    kwargs["pretrained_cfg_overlay"] = {**(kwargs.get("pretrained_cfg_overlay") or {}), "input_size": (3, 48, 48), **CLIP}
    return timm.models.vision_transformer.vit_tiny_patch16_224(pretrained=False, **kwargs)


MODELS = ["klas_t_eva", "klas_t_vit", "mobilenetv3_small_050"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    quiet = Console(file=io.StringIO())
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        build_cache(MODELS, "digits", root / "cache", limit=48, random_init=True, root=root, batch_size=16,
                    preprocess={"input_size": [3, 32, 32]}, console=quiet, progress=False)
        search(root / "cache", root / "run", direction="both", probe_epochs=2, device="cpu", console=quiet, progress=False)
        train_run(root / "run", console=quiet, progress=False, epochs=1, steps_per_epoch=3, batch_size=8,
                  init_images=16, latency=False, device="cpu", root=root)
    finally:
        torch.set_num_threads(n)
    return root


def test_each_model_saw_its_own_normalisation(run):
    cache = open_cache(run / "cache")
    shared = cache.manifest["data"]["preprocess"]
    assert shared["input_size"] == [3, 32, 32] and shared["mean"] == list(IMAGENET["mean"])  # the first model's
    seen = {m["name"]: m["input"] for m in cache.manifest["models"]}
    assert seen["klas_t_vit"]["mean"] == list(CLIP["mean"]) and seen["klas_t_vit"]["std"] == list(CLIP["std"])
    assert seen["klas_t_eva"]["mean"] == list(IMAGENET["mean"])
    assert all(s["input_size"] == [3, 32, 32] for s in seen.values())
    heads = {m["name"]: (m["added_head"], m["num_classes"]) for m in cache.manifest["models"]}
    assert heads == {"klas_t_eva": (True, 10), "klas_t_vit": (True, 10), "mobilenetv3_small_050": (False, 1000)}
    # the cached logits are what the plain timm model gives on pixels normalised with CLIP's mean/std
    plain = load_model("klas_t_vit", random_init=True, root=run, input_size=(3, 32, 32), num_classes=10)
    split = cache.split("eval")
    src = cache.source(run)
    own = build_transform(cache.model_input("klas_t_vit"))
    x = torch.stack([own(src.load(int(i))) for i in split.ids[:8]])
    with torch.no_grad():
        ref = plain.adapter.model(x)
    cached = torch.from_numpy(np.asarray(cache.logits("eval", "klas_t_vit")[:8], dtype=np.float32))
    torch.testing.assert_close(cached, ref, rtol=2e-3, atol=2e-3)  # float16 storage
    assert plain.profile.reps[0].grid == (4, 4) and plain.profile.reps[0].num_prefix == 3  # resized: 48 -> 32 px


def test_search_enumerates_every_ordered_pair_of_families(run):
    import pyarrow.parquet as pq

    cands = [c for c in pq.read_table(run / "run" / "candidates.parquet").to_pylist() if c["kind"] == "stitch"]
    pairs = {(c["src"], c["dst"]) for c in cands}
    assert pairs == {(a, b) for a in MODELS for b in MODELS if a != b}
    blocks = {"klas_t_eva": 3, "klas_t_vit": 3, "mobilenetv3_small_050": 12}
    assert len(cands) == sum(blocks[a] * blocks[b] for a, b in pairs)  # every cut pair (each side runs a block)
    assert all(np.isfinite(c["gamma"]) and c["macs"] > 0 for c in cands)  # every one scored and costed


def test_trained_networks_export_and_reload_exactly(run):
    import pyarrow as pa
    import pyarrow.parquet as pq

    results = read_results(run / "run")
    assert any(r["kind"] == "stitch" for r in results)
    table = pq.read_table(run / "run" / "results.parquet")  # every network on the front, to export them all
    rows = sorted(table.to_pylist(), key=lambda r: r["macs"])
    for rank, r in enumerate(rows):
        r["acc_after"] = 0.1 + 0.01 * rank
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), run / "run" / "results.parquet")
    res = export_pareto(run / "run", models=True, root=run, console=Console(file=io.StringIO()))
    net = trained_net(run / "run", list(res.models), root=run).net
    torch.manual_seed(0)
    x = torch.randn(3, 3, 32, 32)  # pixels normalised with the artifact's data_config (the shared one)
    families = set()
    for rid, rel in res.models.items():
        model = load_stitched(res.out_dir / rel)
        cfg = json.loads((res.out_dir / rel / "config.json").read_text())
        families |= {cfg["src"]["family"], *([cfg["dst"]["family"]] if cfg["dst"] else [])}
        with torch.no_grad():
            torch.testing.assert_close(model(x), net(x, rid), rtol=0, atol=0)
    assert families == {"eva", "vit", "mobilenetv3"}


def test_anchor_artifact_normalises_for_its_own_model(run):
    """load_stitched models take the data_config's pixels; a CLIP-normalised model converts them itself."""
    res = export_pareto(run / "run", models=True, root=run, console=Console(file=io.StringIO()))
    path = res.out_dir / res.models["klas_t_vit"]
    model = load_stitched(path)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["src"]["create_kwargs"]["img_size"] == [32, 32]
    assert cfg["src"]["input_norm"]["own"] == {k: list(v) for k, v in CLIP.items()}
    shared = cfg["data_config"]
    own = {**shared, **cfg["src"]["input_norm"]["own"]}
    digits = open_cache(run / "cache")
    src = digits.source(run)
    images = [src.load(int(i)) for i in digits.split("eval").ids[:4]]
    x_shared = torch.stack([build_transform(shared)(im) for im in images])
    x_own = torch.stack([build_transform(own)(im) for im in images])
    with torch.no_grad():
        torch.testing.assert_close(model(x_shared), model.adapter.model(x_own), rtol=1e-4, atol=1e-4)


def test_cache_of_one_shared_normalisation_is_rebuilt(tmp_path, monkeypatch):
    """A cache an earlier klas wrote (every model fed the first one's mean/std, no per-model ``input``)
    of models whose normalisations differ is rebuilt by the same command, without --overwrite."""
    from klas.models import LoadedModel

    quiet = Console(file=io.StringIO())
    args = dict(limit=10, random_init=True, root=tmp_path, batch_size=10, progress=False, console=quiet,
                splits=["eval"], preprocess={"input_size": [3, 32, 32]})
    models = ["klas_t_eva", "klas_t_vit"]
    feed = LoadedModel.feed
    with monkeypatch.context() as m:  # what klas did before: one normalisation for all
        m.setattr(LoadedModel, "feed", lambda self, shared, own=None: feed(self, shared, shared))
        build_cache(models, "digits", tmp_path / "c", **args)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    for entry in manifest["models"]:
        del entry["input"], entry["added_head"]
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(manifest))
    old = open_cache(tmp_path / "c")
    assert old.model_input("klas_t_vit")["mean"] == list(IMAGENET["mean"])  # read as what it was: shared
    assert build_cache(models, "digits", tmp_path / "c", **args).status == "written"
    new = open_cache(tmp_path / "c")
    assert new.fingerprint != old.fingerprint and new.model_input("klas_t_vit")["mean"] == list(CLIP["mean"])
    assert build_cache(models, "digits", tmp_path / "c", **args).status == "up to date"
