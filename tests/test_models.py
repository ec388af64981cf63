"""The adapter contract: stem + blocks + head == model(x), for every family and every cut point;
the same costs on a real device as on the meta device."""
from __future__ import annotations

import pytest
import timm
import torch

from klas.errors import KlasError
from klas.models import adapt, count_macs, load_model, parse_spec, profile_adapter

# Small members of each supported family, at a reduced input size so the suite stays fast on CPU.
FAMILIES = [
    ("deit_tiny_patch16_224", {"img_size": 64}, (3, 64, 64)),
    ("deit_tiny_distilled_patch16_224", {"img_size": 64}, (3, 64, 64)),
    ("deit3_small_patch16_224", {"img_size": 64}, (3, 64, 64)),
    # SigLIP: no cls token, attention-pool head (narrowed to stay fast)
    ("vit_base_patch16_siglip_224", {"img_size": 64, "embed_dim": 192, "num_heads": 3, "depth": 4}, (3, 64, 64)),
    ("swin_tiny_patch4_window7_224", {"img_size": 112, "window_size": 7}, (3, 112, 112)),
    ("resnet18", {}, (3, 64, 64)),
    ("resnet50", {}, (3, 64, 64)),
    ("convnext_atto", {}, (3, 64, 64)),
    # Eva with RoPE: DINOv3 (cls + 4 registers, dynamic image size), EVA-02 (cls); narrowed
    ("vit_small_patch16_dinov3", {"img_size": 32, "embed_dim": 48, "num_heads": 2, "depth": 3}, (3, 32, 32)),
    ("eva02_tiny_patch14_224", {"img_size": 28, "depth": 3}, (3, 28, 28)),
    ("vit_small_patch14_reg4_dinov2", {"img_size": 28, "embed_dim": 48, "num_heads": 2, "depth": 3}, (3, 28, 28)),
    ("vit_base_patch16_clip_224", {"img_size": 32, "embed_dim": 48, "num_heads": 2, "depth": 3}, (3, 32, 32)),
    ("swinv2_tiny_window8_256", {"img_size": 64, "window_size": 4, "embed_dim": 24, "depths": (1, 1, 2, 1),
                                 "num_heads": (1, 1, 1, 1)}, (3, 64, 64)),
    ("levit_128s", {"img_size": 64}, (3, 64, 64)),  # tokens without prefix
    ("levit_conv_128s", {"img_size": 64}, (3, 64, 64)),  # the same as NCHW maps
    ("efficientnet_b0", {}, (3, 64, 64)),
    ("mobilenetv3_small_050", {}, (3, 64, 64)),
    ("regnetx_002", {}, (3, 64, 64)),
]


@pytest.mark.parametrize("name,kwargs,size", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_adapter_reproduces_model_at_every_cut(name, kwargs, size):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, drop_path_rate=0.0, **kwargs).eval()
    adapter = adapt(model, name)
    x = torch.randn(2, *size)
    with torch.no_grad():
        ref = model(x)
        h = adapter.stem(x)
        reps = [h]
        for i in range(adapter.num_blocks):
            h = adapter.run_blocks(h, i, i + 1)
            reps.append(h)
        torch.testing.assert_close(adapter.head(reps[-1]), ref, rtol=1e-5, atol=1e-5)
        # prefix(a, ..i) + identity + suffix(a, i+1..) for every cut
        for cut, rep in enumerate(reps):
            out = adapter.head(adapter.run_blocks(rep.clone(), cut))
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    prof = profile_adapter(adapter, size)  # on CPU, parameters requiring grad
    assert all(p.requires_grad for p in model.parameters())  # profiling leaves the model as it was
    # the same counts as on the meta device, where no fused attention kernel runs
    with torch.device("meta"):
        meta = timm.create_model(name, pretrained=False, drop_path_rate=0.0, **kwargs).eval()
    assert profile_adapter(adapt(meta, name), size) == prof
    assert prof.num_blocks == adapter.num_blocks
    assert prof.params == sum(p.numel() for p in model.parameters())
    whole, _ = count_macs(model, torch.zeros(1, *size))  # the per-block costs partition the model's own count
    assert prof.macs == whole
    for rep, tensor in zip(prof.reps, reps):
        width, grid, prefix = adapter.shape_of(tensor)
        assert (rep.width, rep.grid, rep.num_prefix) == (width, grid, prefix)
    pooled = adapter.pool(reps[3])
    assert set(pooled) == set(adapter.pool_names)
    assert all(v.shape == (2, prof.reps[3].width) for v in pooled.values())


# Published fvcore figures (one multiply-add = one FLOP); klas must land within 1%.
ANCHORS = [
    ("deit_tiny_patch16_224", 1.26),
    ("deit_small_patch16_224", 4.61),
    ("deit_base_patch16_224", 17.58),
    ("swin_tiny_patch4_window7_224", 4.51),
    ("swin_small_patch4_window7_224", 8.77),
    ("swin_base_patch4_window7_224", 15.47),
    ("resnet18", 1.82),
    ("resnet50", 4.11),
    # the papers' multiply-adds, to their printed digits (EfficientNet, RegNet, LeViT, Swin V2)
    ("efficientnet_b0", 0.39),
    ("regnetx_002", 0.20),
    ("regnety_004", 0.40),
    ("levit_128s", 0.305),
    ("swinv2_tiny_window8_256", 5.9),
]


@pytest.mark.parametrize("name,gflops", ANCHORS, ids=[a[0] for a in ANCHORS])
def test_costs_match_published_gflops(name, gflops):
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False).eval()
    prof = profile_adapter(adapt(model, name), tuple(model.pretrained_cfg["input_size"]))
    printed = 0.5 * 10 ** -len(str(gflops).partition(".")[2])  # half a unit of the last printed digit
    assert abs(prof.macs / 1e9 - gflops) < max(0.01 * gflops, printed)
    # block costs partition the model's cost: stitch costs are sums of these
    assert prof.prefix_macs(4) + prof.suffix_macs(4) == prof.macs


def test_unsupported_architecture_is_a_one_line_error():
    model = timm.create_model("ghostnet_050", pretrained=False)
    with pytest.raises(KlasError, match="unsupported architecture.*ViT.*RegNet"):
        adapt(model, "ghostnet_050")


def test_unknown_model_name_suggests_close_timm_names():
    with pytest.raises(KlasError, match="did you mean.*deit_small_patch16_224"):
        parse_spec("deit_smal_patch16_224")


def test_missing_weights_file_is_named(tmp_path):
    with pytest.raises(KlasError, match="not found"):
        parse_spec(f"resnet18={tmp_path / 'nope.safetensors'}")


def test_local_weights_round_trip(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    src = timm.create_model("resnet18", pretrained=False, num_classes=7).eval()
    path = tmp_path / "r18.safetensors"
    save_file(src.state_dict(), str(path))
    loaded = load_model(f"resnet18={path}")
    assert loaded.adapter.num_classes == 7  # head size read from the file
    assert not loaded.adapter.training
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.adapter(x), src(x))


def test_random_init_is_seeded_and_eval():
    a = load_model("resnet18", random_init=True)
    b = load_model("resnet18", random_init=True)
    assert a.weights_sha256 == b.weights_sha256
    assert not a.adapter.training
    assert all(not p.requires_grad for p in a.adapter.parameters())
