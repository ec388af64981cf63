"""Stitch layers, stitched networks, least-squares init and stitch costs on tiny random-init models."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from klas.errors import KlasError
from klas.models import LoadedModel, ModelSpec, adapt, count_macs, data_config_of, profile_adapter
from klas.stitch.init import DEFAULT_RIDGE, flatten_positions, least_squares_init, least_squares_r2, solve_ridge
from klas.stitch.layers import STITCH_KINDS, make_stitch_layer, stitch_layer_macs, stitch_layer_params
from klas.stitch.network import (
    StitchedModel, StitchNet, StitchSpec, direct_stitch_macs, stitch_id, stitch_macs, stitch_params,
)


def tiny(arch: str, seed: int, size: int = 32, **kwargs) -> LoadedModel:
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, drop_rate=0.0, drop_path_rate=0.0, **kwargs).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    adapter = adapt(model, arch)
    cfg = {**data_config_of(model), "input_size": [3, size, size]}
    return LoadedModel(ModelSpec(arch), adapter, profile_adapter(adapter, (3, size, size)), "x", cfg)


def vit(name_seed: int, dim: int, depth: int = 4) -> LoadedModel:
    m = tiny("vit_tiny_patch16_224", name_seed, img_size=32, patch_size=8, embed_dim=dim, depth=depth,
             num_heads=2, num_classes=10)
    m.spec = ModelSpec(f"vit{dim}")  # distinct names for two models of the same arch
    return m


def spec(a: LoadedModel, i: int, b: LoadedModel, j: int) -> StitchSpec:
    return StitchSpec(stitch_id(a.name, i, b.name, j), a.name, i, b.name, j)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def pair():
    return vit(0, 32), vit(1, 48, depth=3)


def test_stitch_layer_shapes_and_costs():
    for layout, shape in (("tokens", (2, 5, 6)), ("nhwc", (2, 3, 3, 6)), ("nchw", (2, 6, 3, 3))):
        for kind in STITCH_KINDS:
            layer = make_stitch_layer(kind, 6, 4, layout)
            out = layer(torch.randn(*shape))
            exp = list(shape)
            exp[1 if layout == "nchw" else -1] = 4
            assert list(out.shape) == exp
            positions = int(np.prod(shape)) // 6
            macs, _ = count_macs(layer, torch.randn(*shape))
            assert macs == 2 * stitch_layer_macs(kind, 6, 4, positions // 2)  # batch of 2
            assert sum(p.numel() for p in layer.parameters()) == stitch_layer_params(kind, 6, 4)
    # the NCHW linear stitch is a 1x1 convolution
    layer = make_stitch_layer("linear", 6, 4, "nchw")
    x = torch.randn(2, 6, 3, 3)
    ref = torch.nn.functional.conv2d(x, layer.proj.weight[:, :, None, None], layer.proj.bias)
    torch.testing.assert_close(layer(x), ref)
    with pytest.raises(KlasError, match="unknown stitch layer kind"):
        make_stitch_layer("conv", 6, 4, "tokens")


@pytest.mark.parametrize("kind", STITCH_KINDS)
def test_stitch_cost_equals_direct_mac_count(pair, kind):
    a, b = pair
    x = torch.randn(1, 3, 32, 32)
    for i, j in [(1, 0), (2, 1), (4, 2), (3, 0)]:
        layer = make_stitch_layer(kind, a.profile.reps[i].width, b.profile.reps[j].width, "tokens")
        model = StitchedModel(a.adapter, i, layer, b.adapter, j).eval()
        direct, out = count_macs(model, x)
        assert out.shape == (1, 10)
        assert stitch_macs(a.profile, i, b.profile, j, kind) == direct
        assert direct_stitch_macs(a.adapter, i, b.adapter, j, (3, 32, 32), kind) == direct
        # params: exactly the modules the stitched network runs
        used = sum(p.numel() for p in a.adapter.parameters()) - sum(
            p.numel() for blk in a.adapter.blocks[i:] for p in blk.parameters()) - sum(
            p.numel() for m in a.adapter.head_modules() for p in m.parameters())
        used += sum(p.numel() for blk in b.adapter.blocks[j:] for p in blk.parameters())
        used += sum(p.numel() for m in b.adapter.head_modules() for p in m.parameters())
        used += sum(p.numel() for p in layer.parameters())
        assert stitch_params(a.profile, i, b.profile, j, kind) == used


def test_stitched_model_runs_the_documented_blocks(pair):
    a, b = pair
    x = torch.randn(2, 3, 32, 32)
    layer = make_stitch_layer("linear", 32, 48, "tokens")
    model = StitchedModel(a.adapter, 2, layer, b.adapter, 1)
    with torch.no_grad():
        h = a.adapter.run_blocks(a.adapter.stem(x), 0, 2)  # blocks 0, 1
        ref = b.adapter.head(b.adapter.run_blocks(layer(h), 1))  # blocks 1, 2 + head
        torch.testing.assert_close(model(x), ref)
        torch.testing.assert_close(model.pre_logits(x), b.adapter.pre_logits(b.adapter.run_blocks(layer(h), 1)))
    with pytest.raises(KlasError, match="src_cut"):
        StitchedModel(a.adapter, 0, layer, b.adapter, 1)
    with pytest.raises(KlasError, match="dst_cut"):
        StitchedModel(a.adapter, 1, layer, b.adapter, 3)  # target would run no block


def test_stitchnet_shares_anchor_weights(pair):
    a, b = pair
    specs = [spec(a, i, b, j) for i in range(1, 5) for j in range(0, 3)]  # 12 stitches
    specs += [spec(b, i, a, j) for i in range(1, 4) for j in range(0, 4)]  # 12 more, other direction
    net = StitchNet.from_loaded([a, b], specs, kind="linear")
    anchors = sum(p.numel() for p in a.adapter.parameters()) + sum(p.numel() for p in b.adapter.parameters())
    layers = sum(stitch_layer_params("linear", net.profiles[s.src].reps[s.src_cut].width,
                                     net.profiles[s.dst].reps[s.dst_cut].width) for s in specs)
    # each anchor parameter is stored once, however many stitches use it
    assert sum(p.numel() for p in net.parameters()) == anchors + layers
    assert len(list(net.stitch_layers)) == 24
    anchor_ptrs = {p.data_ptr() for p in net.anchors.parameters()}
    for sid in net.stitch_ids:
        m = net.model(sid)
        assert {p.data_ptr() for p in m.src.parameters()} <= anchor_ptrs
        assert m.dst.blocks[-1] is net.adapter(net.specs[sid].dst).blocks[-1]
    # forward by id == the StitchedModel view == logits_all (shared prefixes)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        every = net.logits_all(x)
        assert set(every) == set(net.stitch_ids) | {a.name, b.name}
        for sid in net.stitch_ids[::5] + [a.name, b.name]:
            torch.testing.assert_close(every[sid], net(x, sid))
        torch.testing.assert_close(net(x, a.name), a.adapter(x))


def test_stitchnet_rejects_bad_stitches(pair):
    a, b = pair
    with pytest.raises(KlasError, match="not among the anchors"):
        StitchNet.from_loaded([a], [spec(a, 1, b, 0)])
    with pytest.raises(KlasError, match="dst_cut=3"):
        StitchNet.from_loaded([a, b], [spec(a, 1, b, 3)])
    with pytest.raises(KlasError, match="duplicate"):
        StitchNet.from_loaded([a, b], [spec(a, 1, b, 0), spec(a, 1, b, 0)])
    other = tiny("vit_tiny_patch16_224", 3, img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=10)
    other.spec = ModelSpec("vit_p4")
    net = StitchNet.from_loaded([a, other], [spec(a, 1, other, 0)])  # grids differ: bridged, not refused
    assert type(net.stitch_layer(spec(a, 1, other, 0).id)).__name__ == "BridgedStitch"


def _lstsq_reference(x: np.ndarray, y: np.ndarray, ridge: float) -> np.ndarray:
    """numpy.linalg.lstsq on the bias-augmented system with the same ridge rows appended."""
    n, d = x.shape
    xa = np.concatenate([x, np.ones((n, 1))], 1)
    if ridge:
        lam = ridge * np.mean(np.diag(x.T @ x))
        xa = np.concatenate([xa, np.concatenate([np.sqrt(lam) * np.eye(d), np.zeros((d, 1))], 1)], 0)
        y = np.concatenate([y, np.zeros((d, y.shape[1]))], 0)
    return np.linalg.lstsq(xa, y, rcond=None)[0]  # (d+1, e)


def test_solve_ridge_matches_numpy_lstsq():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 7)) * np.array([1, 2, 3, 0.1, 5, 1, 1])
    y = x @ rng.normal(size=(7, 3)) + rng.normal(size=3) + 0.1 * rng.normal(size=(200, 3))
    xa = np.concatenate([x, np.ones((200, 1))], 1)
    for ridge in (0.0, DEFAULT_RIDGE, 0.5):
        w, b = solve_ridge(torch.from_numpy(xa.T @ xa), torch.from_numpy(xa.T @ y), ridge)
        ref = _lstsq_reference(x, y, ridge)
        np.testing.assert_allclose(w.numpy(), ref[:7].T, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(b.numpy(), ref[7], rtol=1e-8, atol=1e-10)


def _live_pairs(net, x, sid):
    s = net.specs[sid]
    reps = net.representations(x, {s.src: [s.src_cut], s.dst: [s.dst_cut]})
    lay_a = net.profiles[s.src].reps[s.src_cut].layout
    lay_b = net.profiles[s.dst].reps[s.dst_cut].layout
    return (flatten_positions(reps[(s.src, s.src_cut)], lay_a).double().numpy(),
            flatten_positions(reps[(s.dst, s.dst_cut)], lay_b).double().numpy())


@pytest.mark.parametrize("ridge", [0.0, DEFAULT_RIDGE])
def test_least_squares_init_all_stitches_in_one_pass_matches_lstsq(pair, ridge):
    a, b = pair
    specs = [spec(a, 2, b, 1), spec(a, 4, b, 0), spec(b, 3, a, 2), spec(a, 2, b, 2)]
    net = StitchNet.from_loaded([a, b], specs)
    torch.manual_seed(5)
    images = torch.randn(12, 3, 32, 32)  # 12 images x 17 tokens = 204 samples > 49 unknowns
    reports = least_squares_init(net, [images[:5], images[5:]], ridge=ridge)  # two batches
    assert set(reports) == set(net.stitch_ids)
    for sid in net.stitch_ids:
        x, y = _live_pairs(net, images, sid)
        ref = _lstsq_reference(x, y, ridge)
        layer = net.stitch_layer(sid).proj
        np.testing.assert_allclose(layer.weight.detach().double().numpy(), ref[:-1].T, rtol=2e-4, atol=2e-5)
        np.testing.assert_allclose(layer.bias.detach().double().numpy(), ref[-1], rtol=2e-4, atol=2e-5)
        fit = x @ ref[:-1] + ref[-1]
        r2 = 1 - ((y - fit) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
        assert reports[sid].samples == 12 * 17
        assert reports[sid].r2 == pytest.approx(r2, abs=1e-6)



def test_least_squares_r2_is_the_fit_measured_on_other_images(pair):
    """R² on held-out images of the fit on other images (the ``ls`` stitch score), every stitch in one
    pass, nothing in the net changed; on the fit's own images it is least_squares_init's R²."""
    a, b = pair
    specs = [spec(a, 2, b, 1), spec(b, 3, a, 2), spec(a, 4, b, 0)]
    net = StitchNet.from_loaded([a, b], specs)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    torch.manual_seed(6)
    fit, test = torch.randn(12, 3, 32, 32), torch.randn(7, 3, 32, 32)
    r2 = least_squares_r2(net, [fit[:5], fit[5:]], [test[:3], test[3:]], ridge=DEFAULT_RIDGE)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    for sid in net.stitch_ids:
        ref = _lstsq_reference(*_live_pairs(net, fit, sid), DEFAULT_RIDGE)
        x, y = _live_pairs(net, test, sid)
        pred = x @ ref[:-1] + ref[-1]
        assert r2[sid] == pytest.approx(1 - ((y - pred) ** 2).sum() / ((y - y.mean(0)) ** 2).sum(), abs=1e-6)
    same = least_squares_r2(net, [fit], [fit], ridge=DEFAULT_RIDGE)
    reports = least_squares_init(net, [fit], ridge=DEFAULT_RIDGE)
    assert all(same[i] == pytest.approx(reports[i].r2, abs=1e-9) for i in net.stitch_ids)



def _assert_same_maps(net, ref, images, tol):
    """Every stitch layer of ``net`` maps its source representation as ``ref``'s layer does."""
    with torch.no_grad():
        for sid in net.stitch_ids:
            s = net.specs[sid]
            h = net.representations(images, {s.src: [s.src_cut]})[(s.src, s.src_cut)]
            torch.testing.assert_close(net.stitch_layer(sid)(h), ref.stitch_layer(sid)(h), rtol=tol, atol=tol)

def test_least_squares_init_nchw_and_mlp():
    a = tiny("resnet18", 0, size=64, num_classes=10)
    b = tiny("resnet18", 1, size=64, num_classes=10)
    b.spec = ModelSpec("resnet18_b")
    specs = [spec(a, 2, b, 1), spec(a, 3, b, 4)]  # layer1 -> layer1 (64 ch, 16x16), layer2 -> layer2 (128 ch, 8x8)
    torch.manual_seed(0)
    images = torch.randn(8, 3, 64, 64)
    for s in specs:  # costs of NCHW stitches (1x1 conv layer) match a direct count too
        for kind in STITCH_KINDS:
            assert stitch_macs(a.profile, s.src_cut, b.profile, s.dst_cut, kind) == \
                direct_stitch_macs(a.adapter, s.src_cut, b.adapter, s.dst_cut, (3, 64, 64), kind)
    lin = StitchNet.from_loaded([a, b], specs, kind="linear")
    lin.train()  # stitch layers train; anchors (batch norm here) must stay in eval mode
    assert lin.stitch_layer(lin.stitch_ids[0]).training and not a.adapter.training and not b.adapter.model.bn1.training
    least_squares_init(lin, [images], ridge=DEFAULT_RIDGE)
    for sid in lin.stitch_ids:
        x, y = _live_pairs(lin, images, sid)
        ref = _lstsq_reference(x, y, DEFAULT_RIDGE)
        np.testing.assert_allclose(lin.stitch_layer(sid).proj.weight.detach().double().numpy(), ref[:-1].T, rtol=1e-3, atol=1e-4)
    # the MLP stitch starts as the same affine map on the probe data (shift keeps the ReLU open)
    mlp = StitchNet.from_loaded([a, b], specs, kind="mlp")
    least_squares_init(mlp, [images], ridge=DEFAULT_RIDGE)
    _assert_same_maps(mlp, lin, images, tol=1e-3)
    # the LoRA stitch starts at the same fit, frozen, with a zero update; only the update and bias train
    lora = StitchNet.from_loaded([a, b], specs, kind="lora")
    least_squares_init(lora, [images], ridge=DEFAULT_RIDGE)
    _assert_same_maps(lora, lin, images, tol=1e-5)
    layer = lora.stitch_layer(lora.stitch_ids[0])
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"proj.bias", "down.weight", "up.weight"}
