"""Costs on the path users run (``load_model`` on a real device) against published fvcore figures.

fvcore, which the published figures come from, counts one FLOP per multiply-add of every matmul and
convolution, and also 5 per element of every affine LayerNorm; klas counts the matmuls and
convolutions only. So klas lands a fraction of a percent under the published ViT figures, and for
DeiT the gap is exactly the LayerNorm term (checked below).
"""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

from klas.models import adapt, count_macs, load_model, profile_adapter
from klas.stitch.network import stitch_macs, stitch_params

DEIT = ("deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224")

# Published fvcore GFLOPs (one multiply-add = one FLOP) of one member per family, measured on the
# real device (tests/test_models.py checks all of its ANCHORS on the meta device, and that both
# devices give the same counts for every family).
REAL_ANCHORS = [
    ("deit_tiny_patch16_224", 1.26),
    ("deit_small_patch16_224", 4.61),
    ("deit_base_patch16_224", 17.58),
    ("swin_tiny_patch4_window7_224", 4.51),
    ("resnet18", 1.82),
]


@pytest.fixture(scope="module")
def real_profiles():
    """Profiles as ``klas cache`` makes them: random weights, CPU, the models' own 224x224 input."""
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            cache[name] = load_model(name, random_init=True, device="cpu").profile
        return cache[name]

    return get


@pytest.mark.parametrize("name,gflops", REAL_ANCHORS, ids=[a[0] for a in REAL_ANCHORS])
def test_real_device_costs_match_published_gflops(real_profiles, name, gflops):
    prof = real_profiles(name)
    assert abs(prof.macs / 1e9 - gflops) / gflops < 0.01


def _paired_windows(depth: int, kernel: int = 2, stride: int = 1) -> list[tuple[int, int]]:
    """SN-Net's paired stitching: (front block j, end block k) pairs within each sliding window of
    ``kernel`` blocks, in first-seen order (ziplab/SN-Net, stitching_deit/utils.py)."""
    pairs: list[tuple[int, int]] = []
    for start in range(0, depth, stride):
        window = range(start, min(start + kernel, depth))
        pairs += [(j, k) for j in window for k in window if (j, k) not in pairs]
    return pairs


def _snnet_routes(depth: int = 12) -> list[tuple]:
    """SN-Net's cfg_id order: the anchors Ti, S, B, then Ti->S and S->B over the paired windows."""
    ti, s, b = DEIT
    routes: list[tuple] = [(ti,), (s,), (b,)]
    for front, end in ((ti, s), (s, b)):
        routes += [(front, j, end, k) for j, k in _paired_windows(depth)]
    return routes


def _layernorm_flops(width: int, tokens: int, norms: int) -> int:
    """fvcore's count for ``norms`` affine LayerNorms over (tokens, width): 5 per element."""
    return 5 * width * tokens * norms


def test_stitch_costs_match_snnet_published_routes(real_profiles):
    rows = list(csv.DictReader(
        (line for line in (Path(__file__).parent / "data" / "snnet_deit_costs.tsv").open() if not line.startswith("#")),
        delimiter="\t",
    ))
    routes = _snnet_routes()
    assert [int(r["cfg_id"]) for r in rows] == list(range(len(routes))) == list(range(71))
    for row, route in zip(rows, routes):
        flops, params = int(row["flops"]), int(row["params"])
        if len(route) == 1:
            prof = real_profiles(route[0])
            macs, ours_params, lns = prof.macs, prof.params, _layernorm_flops(prof.reps[-1].width, 197, 25)
        else:
            # SN-Net runs front blocks 0..j (klas: representation j+1), a Linear(C_front, C_end) on
            # all 197 tokens, then end blocks k..11 (klas: from representation k) and the end's head.
            front, j, end, k = route
            pa, pb = real_profiles(front), real_profiles(end)
            macs = stitch_macs(pa, j + 1, pb, k, "linear")
            ours_params = stitch_params(pa, j + 1, pb, k, "linear")
            # Two LayerNorms per block; no final norm: SN-Net's stitched forward ends in the end
            # model's forward_head, which leaves out timm's self.norm (its anchors keep it).
            lns = (_layernorm_flops(pa.reps[0].width, 197, 2 * (j + 1))
                   + _layernorm_flops(pb.reps[0].width, 197, 2 * (12 - k)))
            # SN-Net's get_model_size leaves out the front's cls token and position embedding
            ours_params -= pa.reps[0].width * 198
        assert abs(macs - flops) / flops < 0.01, (row["cfg_id"], route, macs, flops)
        assert macs + lns == flops, (row["cfg_id"], route)  # the whole gap is fvcore's LayerNorm term
        assert ours_params == params, (row["cfg_id"], route)


def test_siglip_attention_pool_head_is_counted():
    # SigLIP: no cls token, an attention-pool head whose query is a view of a trainable parameter
    d, heads, grid, classes = 192, 3, 4, 10
    model = timm.create_model("vit_base_patch16_siglip_224", pretrained=False, img_size=16 * grid,
                              embed_dim=d, num_heads=heads, depth=2, num_classes=classes).eval()
    prof = profile_adapter(adapt(model, "vit_base_patch16_siglip_224"), (3, 16 * grid, 16 * grid))
    n = grid * grid
    pool = d * d + n * d * 2 * d + 2 * n * d + d * d + 2 * 4 * d * d  # q, kv, q@k + a@v, proj, mlp
    assert prof.reps[-1].num_prefix == 0 and prof.reps[-1].tokens == n
    assert prof.head_macs == pool + d * classes
    assert prof.params == sum(p.numel() for p in model.parameters())


def test_fused_cpu_attention_kernel_is_counted():
    # The device's own kernel (on CPU: _scaled_dot_product_flash_attention_for_cpu) counts the same
    # as the math backend klas profiles with.
    q, k, v = torch.randn(1, 3, 17, 8), torch.randn(1, 3, 5, 8), torch.randn(1, 3, 5, 4)
    expected = 3 * 17 * 5 * (8 + 4)
    assert count_macs(F.scaled_dot_product_attention, q, k, v)[0] == expected
    assert count_macs(F.scaled_dot_product_attention, q, k, v, plain_attention=False)[0] == expected
    with torch.inference_mode():  # where the composite op reaches the counter undecomposed
        assert count_macs(F.scaled_dot_product_attention, q, k, v)[0] == expected
        assert count_macs(F.scaled_dot_product_attention, q, k, v, plain_attention=False)[0] == expected


def test_multihead_attention_fast_path_is_counted_or_refused():
    from klas.errors import KlasError

    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True).eval()
    x = torch.randn(1, 5, 16)
    with torch.no_grad():
        assert count_macs(mha, x, x, x)[0] == 4 * 5 * 16 * 16 + 2 * 5 * 5 * 16  # in/out proj + attention
        with pytest.raises(KlasError, match="_native_multi_head_attention"):  # fused kernel, no formula
            count_macs(mha, x, x, x, plain_attention=False)
    assert torch.backends.mha.get_fastpath_enabled()  # restored
