"""The paths klas takes on a GPU, exercised on the CPU (issue 21): mixed precision through torch's CPU
autocast in ``klas cache`` and ``klas train``, DataLoader worker processes over an ImageFolder of
JPEGs, the pinned-memory path, and the attention-kernel guard under every SDPA backend.
"""
from __future__ import annotations

import io
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from rich.console import Console
from torch.nn.attention import SDPBackend, sdpa_kernel

import klas.optim
import klas.train.data
from klas.cache import build_cache, open_cache
from klas.cache.compare import BF16_TOLERANCE, feature_agreement, recompute
from klas.data import DigitsConfig, generate_digits, make_loader, pin_memory
from klas.errors import KlasError
from klas.models import adapt, count_macs, profile_adapter
from klas.optim import autocast_supports, parse_amp
from klas.train import SplitData, compare_runs, train_run
from klas.train.checkpoint import checkpoint_path, load_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from test_train import FAST, fake, quiet, write_selection  # noqa: E402,F401

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
VIT = "klas_vit_ti"


# -- --amp on a CPU ---------------------------------------------------------------------------------------------


def test_amp_words_on_cpu(monkeypatch):
    assert autocast_supports("cpu", torch.bfloat16)
    assert not autocast_supports("cpu", torch.float64)  # torch warns and turns autocast off: not supported
    assert parse_amp("bf16", "cpu") is torch.bfloat16
    if autocast_supports("cpu", torch.float16):
        assert parse_amp("fp16", "cpu") is torch.float16
    assert parse_amp("auto", "cpu") is parse_amp("off", "cpu") is parse_amp(None, "cpu") is None
    with pytest.raises(KlasError, match="unknown --amp 'fp8'"):
        parse_amp("fp8", "cpu")
    monkeypatch.setattr(klas.optim, "autocast_supports", lambda kind, dtype: False)  # an older torch
    with pytest.raises(KlasError, match=r"^--amp fp16: torch \S+ has no fp16 autocast on cpu; use --amp off"):
        parse_amp("fp16", "cpu")
    assert parse_amp("fp16", "cuda") is torch.float16  # CUDA needs no probe


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> Path:
    """An ImageFolder of 48 JPEGs (3 digit classes, 32 px): real decoding in every loader process."""
    root = tmp_path_factory.mktemp("jpegs")
    images, labels, _ = generate_digits(DigitsConfig(variants=1))
    for c in range(3):
        (root / str(c)).mkdir()
        for k, i in enumerate(np.flatnonzero(labels == c)[:16]):
            Image.fromarray(images[i]).save(root / str(c) / f"{k:02d}.jpg", quality=90)
    return root


def test_cache_in_bf16_on_cpu_through_loader_processes(jpegs, tmp_path):
    kw = dict(random_init=True, batch_size=8, device="cpu", amp="bf16", progress=False, root=tmp_path / "root",
              console=Console(file=io.StringIO()))
    build_cache([VIT], str(jpegs), tmp_path / "w0", workers=0, **kw)
    build_cache([VIT], str(jpegs), tmp_path / "w2", workers=2, **kw)
    arrays = [{p.relative_to(d): np.load(p) for p in sorted(d.rglob("*.npy"))} for d in (tmp_path / "w0", tmp_path / "w2")]
    assert arrays[0].keys() == arrays[1].keys() and len(arrays[0]) == 3 * 4
    for key in arrays[0]:  # worker processes change how fast images arrive, never the bytes
        np.testing.assert_array_equal(arrays[0][key], arrays[1][key], err_msg=str(key))
    cache = open_cache(tmp_path / "w2")
    assert cache.manifest["amp"] == "bf16" and cache.manifest["loader"] == {"workers": 2, "pin_memory": False}
    rows = range(8)  # the first batch of the eval split
    full = feature_agreement(cache, "eval", rows, recompute(cache, "eval", rows, root=tmp_path / "root"))[VIT]
    same = feature_agreement(cache, "eval", rows, recompute(cache, "eval", rows, amp="bf16", batch_size=8,
                                                           root=tmp_path / "root"))[VIT]
    assert 2e-3 < full["features"] <= BF16_TOLERANCE  # bf16 really ran, and stays close to float32
    assert same["features"] <= 2**-11 and same["logits"] <= 2**-11  # what it ran: only float16 storage differs


def test_feature_agreement_catches_misplaced_rows(vit_cache):
    cache = open_cache(vit_cache)
    reference = recompute(cache, "eval", range(1, 9), root=vit_cache.parent)
    right = feature_agreement(cache, "eval", range(1, 9), reference)
    wrong = feature_agreement(cache, "eval", range(0, 8), reference)  # each stored row against its neighbour's
    for name in cache.model_names:
        assert right[name]["features"] <= 2**-11 and right[name]["logits"] <= 2**-11  # float32 cache: storage only
        assert wrong[name]["features"] > 10 * BF16_TOLERANCE or wrong[name]["logits"] > 10 * BF16_TOLERANCE


# -- klas train in bf16 / fp16 on a CPU --------------------------------------------------------------------------


def test_train_in_bf16_on_cpu_resumes_exactly(fake, tmp_path):
    runs = {k: tmp_path / k for k in ("straight", "resumed", "fp32")}
    for run in runs.values():
        write_selection(run, fake)
    bf16 = {**FAST, "amp": "bf16"}
    train_run(runs["straight"], console=quiet(), **bf16)
    assert not train_run(runs["resumed"], console=quiet(), stop_after=1, **bf16).complete
    train_run(runs["resumed"], console=quiet(), resume=True, **bf16)
    assert json.loads((runs["straight"] / "train.json").read_text())["config"]["amp"] == "bfloat16"
    same = compare_runs(runs["straight"], runs["resumed"])
    assert same["identical"] and same["max_abs_diff"] == 0.0 and same["tensors"] > 10
    train_run(runs["fp32"], console=quiet(), **FAST)  # FAST: amp auto = full precision on a CPU
    other = compare_runs(runs["straight"], runs["fp32"])
    assert not other["identical"] and 0 < other["max_abs_diff"] < float("inf") and other["differing"]


def test_train_in_fp16_on_cpu_scales_the_loss(fake, tmp_path):
    if not autocast_supports("cpu", torch.float16):
        pytest.skip(f"torch {torch.__version__} has no fp16 autocast on CPU (klas refuses --amp fp16 there)")
    write_selection(tmp_path / "run", fake)
    res = train_run(tmp_path / "run", console=quiet(), **{**FAST, "epochs": 1, "amp": "fp16"})
    assert res.complete and all(0 <= r["acc_after"] <= 1 for r in res.rows)
    scaler = load_checkpoint(checkpoint_path(tmp_path / "run"))["scaler"]
    assert scaler["scale"] > 0  # an enabled GradScaler on the CPU (a disabled one saves {})


# -- loader processes and pinned memory ---------------------------------------------------------------------------


def test_streamed_batches_through_workers_and_pinning_equal_the_preloaded(fake, monkeypatch):
    cpu = torch.device("cpu")
    preloaded, streamed = SplitData(fake, "eval"), SplitData(fake, "eval", preload_limit_gb=0, workers=2)
    assert preloaded.preloaded and not streamed.preloaded
    order = torch.randperm(preloaded.n, generator=torch.Generator().manual_seed(0))
    want = list(preloaded.batches(order, 32, cpu))
    got = {"workers": list(streamed.batches(order, 32, cpu))}
    assert pin_memory("cuda") and not pin_memory(cpu)
    monkeypatch.setattr(klas.train.data, "pin_memory", lambda device: True)  # the CUDA path: pinned, non-blocking
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: no accelerator here, so pinning is skipped
        got["pinned"] = list(streamed.batches(order, 32, cpu))
    for how, batches in got.items():
        assert len(batches) == len(want), how
        for a, b in zip(want, batches):
            assert all(torch.equal(u, v) for u, v in zip(a, b)), how
    loader = make_loader(fake.dataset("eval"), [[0, 1]], 0, torch.device("cuda"))
    assert loader.pin_memory  # what klas cache asks for when its batches go to a GPU


# -- the attention-kernel guard under each SDPA backend ------------------------------------------------------------

BACKENDS = [b for b in (getattr(SDPBackend, n, None) for n in
                        ("MATH", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "OVERRIDEABLE")) if b is not None]


def _runs_on_cpu(backend) -> bool:
    q = torch.randn(1, 2, 5, 8)
    try:
        with sdpa_kernel(backend):
            F.scaled_dot_product_attention(q, q, q)
        return True
    except RuntimeError:
        return False


@pytest.mark.parametrize("backend", BACKENDS, ids=[b.name for b in BACKENDS])
def test_costs_do_not_depend_on_the_attention_backend(backend):
    torch.manual_seed(0)
    kwargs = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs).eval()
    adapter = adapt(model, "vit_tiny_patch16_224")
    base = profile_adapter(adapter, (3, 32, 32))
    q, k, v = torch.randn(1, 3, 17, 8), torch.randn(1, 3, 5, 8), torch.randn(1, 3, 5, 8)
    expected = 3 * 17 * 5 * (8 + 8)
    with sdpa_kernel(backend):  # a user's global choice, as on a GPU: klas counts with the math kernel anyway
        assert profile_adapter(adapter, (3, 32, 32)) == base
        assert count_macs(F.scaled_dot_product_attention, q, k, v)[0] == expected
        if _runs_on_cpu(backend):  # the backend's own kernel: counted the same, or refused, never left out
            try:
                assert count_macs(F.scaled_dot_product_attention, q, k, v, plain_attention=False)[0] == expected
            except KlasError as exc:
                assert "cannot count the MACs of attention kernel" in str(exc)
    assert _runs_on_cpu(SDPBackend.MATH) and _runs_on_cpu(SDPBackend.FLASH_ATTENTION)  # CPU flash exists
