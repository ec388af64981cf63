"""Bridged stitches: any representation onto any other (tokens / NHWC / NCHW, grids, prefix tokens),
with exact costs, on tiny random-init ViTs, a ResNet and a Swin."""
from __future__ import annotations

import pytest
import timm
import torch

from klas.models import LoadedModel, ModelSpec, adapt, data_config_of, profile_adapter
from klas.stitch.bridge import Bridge, BridgedStitch, prefix_plan
from klas.stitch.candidates import enumerate_stitches
from klas.stitch.init import least_squares_init
from klas.stitch.network import StitchedModel, StitchNet, StitchSpec, direct_stitch_macs, stitch_id, stitch_macs, stitch_params

SIZE = 32
ARCHS = {  # name: (timm arch, kwargs)
    "vit_cls": ("vit_tiny_patch16_224", dict(img_size=SIZE, patch_size=8, embed_dim=32, depth=2, num_heads=2)),  # 4x4 + cls
    "vit_reg": ("vit_tiny_patch16_224", dict(img_size=SIZE, patch_size=16, embed_dim=24, depth=2, num_heads=2, reg_tokens=2)),  # 2x2 + cls + 2 reg
    "vit_gap": ("vit_tiny_patch16_224", dict(img_size=SIZE, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                              class_token=False, global_pool="avg")),  # 4x4, no prefix
    "resnet": ("resnet18", {}),  # NCHW 8x8 .. 1x1
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=SIZE, window_size=2, embed_dim=16, depths=(1, 1), num_heads=(1, 1))),  # NHWC
}

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def loaded_models(archs: dict[str, tuple[str, dict]], size: int) -> dict[str, LoadedModel]:
    """Seeded random-init timm models (frozen, 10 classes) at ``size``, as klas loads them, keyed by alias."""
    out = {}
    for i, (name, (arch, kw)) in enumerate(archs.items()):
        torch.manual_seed(i)
        model = timm.create_model(arch, pretrained=False, num_classes=10, **kw).eval()
        model.klas_create_kwargs = kw  # what an exported artifact rebuilds it with
        for p in model.parameters():
            p.requires_grad_(False)
        adapter = adapt(model, arch)
        cfg = {**data_config_of(model), "input_size": [3, size, size]}
        out[name] = LoadedModel(ModelSpec(arch, alias=name), adapter, profile_adapter(adapter, (3, size, size)), "x", cfg)
    return out


@pytest.fixture(scope="module")
def models() -> dict[str, LoadedModel]:
    return loaded_models(ARCHS, SIZE)


def _spec(a: str, i: int, b: str, j: int) -> StitchSpec:
    return StitchSpec(stitch_id(a, i, b, j), a, i, b, j)


def test_every_pair_of_cuts_is_a_candidate(models):
    profiles = {n: m.profile for n, m in models.items()}
    cands = enumerate_stitches(profiles, "both")
    expected = sum(pa.num_blocks * pb.num_blocks for a, pa in profiles.items() for b, pb in profiles.items() if a != b)
    assert len(cands) == expected
    assert {(c.src, c.dst) for c in cands} == {(a, b) for a in profiles for b in profiles if a != b}


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_bridged_stitches_run_with_exact_costs(models, kind):
    x = torch.randn(2, 3, SIZE, SIZE)
    names = list(models)
    for a in names:
        for b in names:
            if a == b:
                continue
            ma, mb = models[a], models[b]
            i, j = (ma.profile.num_blocks + 1) // 2, mb.profile.num_blocks // 2
            net = StitchNet.from_loaded([ma, mb], [_spec(a, i, b, j)], kind)
            sid = _spec(a, i, b, j).id
            with torch.no_grad():
                h = net.stitch_layer(sid)(ma.adapter.run_blocks(ma.adapter.stem(x), 0, i))
                want = mb.adapter.run_blocks(mb.adapter.stem(x), 0, j)
                assert h.shape == want.shape, (a, b)
                assert net(x, sid).shape == (2, 10)
            direct = direct_stitch_macs(ma.adapter, i, mb.adapter, j, (3, SIZE, SIZE), kind)
            assert stitch_macs(ma.profile, i, mb.profile, j, kind) == direct, (a, b)
            layer_params = sum(p.numel() for p in net.stitch_layer(sid).parameters())
            rest = ma.profile.prefix_params(i) + mb.profile.suffix_params(j)
            assert stitch_params(ma.profile, i, mb.profile, j, kind) == rest + layer_params, (a, b)


def test_prefix_tokens(models):
    vc, vr, vg = (models[n].profile.reps[1] for n in ("vit_cls", "vit_reg", "vit_gap"))
    assert prefix_plan(vc, vr) == {"cls": "source cls", "learned": 2, "dropped": 0}
    assert prefix_plan(vg, vr) == {"cls": "mean of patches", "learned": 2, "dropped": 0}
    assert prefix_plan(vr, vg) == {"cls": None, "learned": 0, "dropped": 3}
    h = torch.randn(2, 1 + 16, 32)
    rows = Bridge(vc, vr).rows(h)  # cls row + 4x4 area-pooled to 2x2
    assert rows.shape == (2, 1 + 4, 32)
    torch.testing.assert_close(rows[:, 0], h[:, 0])
    torch.testing.assert_close(rows[:, 1], h[:, 1:].reshape(2, 4, 4, 32)[:, :2, :2].mean((1, 2)))
    hg = torch.randn(2, 16, 32)
    torch.testing.assert_close(Bridge(vg, vr).rows(hg)[:, 0], hg.mean(1))
    bridge = Bridge(vc, vr)
    out = bridge.assemble(torch.randn(2, 5, 24))
    assert out.shape == (2, 1 + 2 + 4, 24) and torch.equal(out[:, 1:3], torch.zeros(2, 2, 24))
    up = Bridge(vr, vc).rows(torch.randn(2, 3 + 4, 24))  # 2x2 -> 4x4: bilinear
    assert Bridge(vr, vc).mode == "bilinear" and up.shape == (2, 17, 24)


def test_least_squares_init_across_bridges(models):
    specs = [_spec("vit_cls", 1, "vit_reg", 1), _spec("resnet", 3, "vit_cls", 1), _spec("vit_gap", 2, "swin", 1)]
    net = StitchNet.from_loaded(models.values(), specs, "linear")
    torch.manual_seed(0)
    batches = [torch.randn(4, 3, SIZE, SIZE) for _ in range(3)]
    reports = least_squares_init(net, batches, ridge=1e-4)
    for s in specs:
        layer = net.stitch_layer(s.id)
        assert isinstance(layer, BridgedStitch)
        rows, target = [], []
        with torch.no_grad():
            for x in batches:
                reps = net.representations(x, {s.src: [s.src_cut], s.dst: [s.dst_cut]})
                rows.append(layer.layer(layer.bridge.rows(reps[(s.src, s.src_cut)])))
                target.append(layer.bridge.target_rows(reps[(s.dst, s.dst_cut)]))
        y, t = torch.cat(rows).double(), torch.cat(target).double()
        r2 = 1 - ((t - y) ** 2).sum() / ((t - t.reshape(-1, t.shape[-1]).mean(0)) ** 2).sum()
        assert reports[s.id].r2 == pytest.approx(float(r2), abs=1e-3)
    # learned register tokens start at the target's own mean values there
    reg = net.stitch_layer(specs[0].id).bridge
    with torch.no_grad():
        mean = torch.cat([net.representations(x, {"vit_reg": [1]})[("vit_reg", 1)][:, 1:3] for x in batches]).mean(0)
    torch.testing.assert_close(reg.extra.data, mean)
    assert isinstance(net.model(specs[0].id), StitchedModel)


def test_bridged_stitch_exports_and_reloads(models, tmp_path):
    from klas.export.artifact import load_stitched, save_stitched

    s = _spec("vit_cls", 1, "vit_reg", 1)
    net = StitchNet.from_loaded(models.values(), [s], "linear")
    with torch.no_grad():
        net.stitch_layer(s.id).bridge.extra.normal_()
    model = net.model(s.id)
    save_stitched(model, tmp_path / "m", src_arch="vit_tiny_patch16_224", dst_arch="vit_tiny_patch16_224")
    back = load_stitched(tmp_path / "m")
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x))


def test_compatibility_report(models):
    import io

    from rich.console import Console

    from klas.stitch.report import compatibility_report, report_table

    profiles = {n: m.profile for n, m in models.items()}
    rows = {(r["src"], r["dst"]): r for r in compatibility_report(profiles, "both")}
    assert len(rows) == 5 * 4
    r = rows[("vit_cls", "resnet")]
    assert r["layout"] == "tokens -> nchw" and r["grids"] == "4x4 -> 8x8,4x4,2x2,1x1"
    assert r["resample"] == "area,bilinear" and r["prefix"] == "1 dropped" and r["bridged"] == r["cuts"] == 2 * 8
    assert rows[("vit_gap", "vit_reg")]["prefix"] == "cls <- mean of patches, 2 learned"
    same = rows[("vit_cls", "vit_gap")]  # same grid and layout, prefix differs: still bridged
    assert same["resample"] == "none" and same["prefix"] == "1 dropped"
    lo, hi = r["stitch_macs"]
    assert lo == min(stitch_macs(profiles["vit_cls"], i, profiles["resnet"], j) - profiles["vit_cls"].prefix_macs(i)
                     - profiles["resnet"].suffix_macs(j) for i in (1, 2) for j in range(8))
    text = io.StringIO()
    Console(file=text, width=200).print(report_table(list(rows.values())))
    assert "vit_cls -> resnet" in text.getvalue()


def test_learned_prefix_tokens_get_no_weight_decay(models):
    from klas.train.core import make_optimizer

    net = StitchNet.from_loaded(models.values(), [_spec("vit_cls", 1, "vit_reg", 1)], "linear")
    opt = make_optimizer(net, 1e-3, 0.05)
    extra = net.stitch_layer(_spec("vit_cls", 1, "vit_reg", 1).id).bridge.extra
    group = next(g for g in opt.param_groups if any(p is extra for p in g["params"]))
    assert group["weight_decay"] == 0.0
