"""lfm (Mai et al.'s local feature matching): the loss on a known case, and across bridges, where the
least-squares init is exactly its minimiser, for every stitch layer kind (tiny random-init timm models)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from test_bridge import loaded_models  # noqa: E402

from klas.models import LoadedModel  # noqa: E402
from klas.stitch.bridge import BridgedStitch  # noqa: E402
from klas.stitch.init import least_squares_init  # noqa: E402
from klas.stitch.network import StitchNet, StitchSpec, stitch_id  # noqa: E402
from klas.train import Objective, parse_loss, train_step  # noqa: E402
from klas.train.forward import group_outputs, match_needs, needs_of, target_groups  # noqa: E402
from klas.train.losses import stitch_loss  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SIZE = 32
ARCHS = {  # a ViT with a cls token (4x4 tokens) and a ResNet (NCHW 8x8 .. 1x1)
    "vit": ("vit_tiny_patch16_224", dict(img_size=SIZE, patch_size=8, embed_dim=32, depth=3, num_heads=2)),
    "cnn": ("resnet18", {}),
}
#: (src, src_cut, dst, dst_cut): ViT tokens -> CNN map (grid 4x4 -> 8x8, cls dropped) and
#: CNN map -> ViT tokens (8x8 -> 4x4 by area pooling, cls = mean of the source's positions).
BRIDGED = [("vit", 1, "cnn", 1), ("cnn", 1, "vit", 2)]


@pytest.fixture(scope="module")
def models() -> dict[str, LoadedModel]:
    return loaded_models(ARCHS, SIZE)


def _net(models, pairs, kind: str) -> StitchNet:
    specs = [StitchSpec(stitch_id(*p), *p) for p in pairs]
    return StitchNet({n: m.adapter for n, m in models.items()}, {n: m.profile for n, m in models.items()}, specs, kind)


def test_lfm_value_and_gradient_on_a_known_case():
    stitched = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]], requires_grad=True)  # (B=1, T=2, C=2)
    target = torch.tensor([[[0.0, 2.0], [5.0, 4.0]]], requires_grad=True)
    logits = torch.zeros(1, 10)
    total, parts = stitch_loss({"lfm": 2.0}, logits, stitched=stitched, target_rep=target)
    assert parts["lfm"] == pytest.approx((1 + 0 + 4 + 0) / 4)  # mean squared difference
    assert float(total.detach()) == pytest.approx(2 * 1.25)  # times its weight
    total.backward()
    torch.testing.assert_close(stitched.grad, 2.0 * 2 * (stitched - target).detach() / 4)
    assert target.grad is None  # the target representation is a constant
    # an anchor has no stitch point: no lfm term, so lfm alone leaves nothing to learn
    total, parts = stitch_loss({"lfm": 1.0, "ce": 1.0}, torch.randn(2, 10), torch.tensor([1, 2]))
    assert set(parts) == {"ce"}
    assert Objective(parse_loss("lfm")).wants_match and not Objective(parse_loss("lfm")).trains_anchors
    assert Objective(parse_loss("lfm=1,ce=1")).trains_anchors and not Objective(parse_loss("ffm")).wants_match


def _lfm_and_grads(net: StitchNet, sid: str, x: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    """lfm of stitch ``sid`` on ``x`` as the training core computes it, and its gradients."""
    layer = net.stitch_layer(sid)
    layer.zero_grad(set_to_none=True)
    reps = net.representations(x, {**needs_of([(net, [sid])]), **match_needs(net, [sid])})
    (group,) = target_groups(net, [sid], 0, len(x))
    (out,) = group_outputs(net, group, reps, match=True)
    s = net.specs[sid]
    direct = net.adapter(s.dst).run_blocks(net.adapter(s.dst).stem(x), 0, s.dst_cut)
    torch.testing.assert_close(out.target_rep, direct)  # the target's own representation at dst_cut
    assert out.stitched.shape == direct.shape
    loss = Objective(parse_loss("lfm"))(out.logits, None, None, None, s.dst, out.stitched, out.target_rep)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.requires_grad}
    layer.zero_grad(set_to_none=True)
    return float(loss.detach()), grads


@pytest.mark.parametrize("kind", ["linear", "mlp", "lora"])
@pytest.mark.parametrize("pair", BRIDGED, ids=["vit->cnn", "cnn->vit"])
def test_least_squares_init_minimises_lfm_across_bridges(models, pair, kind):
    """Least squares fits the bridge's rows to the target's rows, i.e. it solves lfm's problem: at the
    fit, lfm's gradient vanishes on the fitting images (every kind, both bridge directions), while a
    perturbed layer has a clearly non-zero gradient and a higher lfm."""
    torch.manual_seed(0)
    x = torch.randn(24, 3, SIZE, SIZE)
    net = _net(models, [pair], kind)
    sid = net.stitch_ids[0]
    assert isinstance(net.stitch_layer(sid), BridgedStitch)
    report = least_squares_init(net, [x[:12], x[12:]], ridge=0.0)[sid]
    fitted, grads = _lfm_and_grads(net, sid, x)
    with torch.no_grad():
        for p in net.stitch_layer(sid).parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    moved, moved_grads = _lfm_and_grads(net, sid, x)
    assert moved > fitted * 1.001
    for name, g in grads.items():
        assert g.norm() <= 1e-4 * max(1.0, float(moved_grads[name].norm())), (name, float(g.norm()))
    # R^2 of the fit and lfm agree: lfm = (1 - R^2) * the target rows' variance (no learned tokens here)
    layer = net.stitch_layer(sid)
    s = net.specs[sid]
    rows = layer.bridge.target_rows(net.adapter(s.dst).run_blocks(net.adapter(s.dst).stem(x), 0, s.dst_cut))
    var = float(((rows - rows.reshape(-1, rows.shape[-1]).mean(0)) ** 2).mean())
    if kind != "mlp":  # the MLP equals the fit only where its shifted ReLU passes (almost everywhere)
        assert fitted == pytest.approx((1 - report.r2) * var, rel=1e-3)


@pytest.mark.parametrize("kind", ["linear", "mlp", "lora"])
def test_training_steps_with_lfm_lower_it_across_bridges(models, kind):
    """A few train_step calls with lfm alone (anchors frozen) lower lfm for both bridge directions,
    change only the stitch layers, and a single-id step equals the same step through the grouped path."""
    torch.manual_seed(1)
    x = torch.randn(16, 3, SIZE, SIZE)
    batch = (x, torch.zeros(16, dtype=torch.long), torch.arange(16))
    nets = [_net(models, BRIDGED, kind) for _ in range(2)]
    for net in nets:
        net.load_state_dict(nets[0].state_dict())
    anchors = {k: v.clone() for k, v in nets[0].anchors.state_dict().items()}
    start = {sid: _lfm_and_grads(nets[0], sid, x)[0] for sid in nets[0].stitch_ids}
    objective = Objective(parse_loss("lfm"))
    opts = [torch.optim.Adam(net.stitch_layers.parameters(), lr=3e-3) for net in nets]
    for _ in range(5):
        for sid in nets[0].stitch_ids:
            train_step(nets[0], batch, sid, objective, opts[0])  # one network per step, as klas train
            train_step(nets[1], batch, [sid], objective, opts[1])  # the same, given as a list
    for sid in nets[0].stitch_ids:
        assert _lfm_and_grads(nets[0], sid, x)[0] < start[sid]
    for k, v in nets[0].state_dict().items():
        torch.testing.assert_close(v, nets[1].state_dict()[k])
    for k, v in nets[0].anchors.state_dict().items():
        assert torch.equal(v, anchors[k])


def test_lfm_needs_the_target_at_the_stitch_point(models):
    net = _net(models, BRIDGED + [("vit", 2, "cnn", 1)], "linear")
    assert match_needs(net, net.stitch_ids + ["vit"]) == {"cnn": {1}, "vit": {2}}
    assert F.mse_loss(torch.ones(2), torch.zeros(2)) == 1.0  # the reduction lfm uses: a mean over elements
