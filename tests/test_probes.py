"""Batched probe training: same maths as one probe at a time, converges, round-trips, fails clearly."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from klas.errors import KlasError
from klas.probes import ProbeBank, SoftmaxTargets, train_probes


@pytest.fixture(autouse=True)
def _one_thread():
    """These problems are tiny: hundreds of small steps run faster on one thread, and much faster
    than two OpenMP threads on a busy 2-core machine. Restored after each test."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _gaussian_classes(n: int, c: int, dims: list[int], snr: float, seed: int = 0):
    """P feature arrays (n, D_p) whose classes have separated means, with offsets/scales to standardise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    feats = []
    for d in dims:
        mu = rng.normal(size=(c, d)) * snr
        x = mu[y] + rng.normal(size=(n, d))
        feats.append((x * rng.uniform(0.5, 4.0, d) + rng.normal(size=d) * 3).astype(np.float32))
    return feats, y


def test_batched_equals_one_probe_at_a_time():
    dims = [3, 11, 6, 8]
    feats, y = _gaussian_classes(300, 5, dims, snr=0.7)
    kw = dict(epochs=4, batch_size=64, lr=3e-3, weight_decay=1e-2, seed=3, device="cpu", min_steps=0)
    bank = train_probes(feats, y, 5, **kw)
    for p, d in enumerate(dims):
        alone = train_probes([feats[p]], y, 5, **kw)
        torch.testing.assert_close(bank.weight[p, :d], alone.weight[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bank.bias[p], alone.bias[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bank.mean[p, :d], alone.mean[0])
        torch.testing.assert_close(bank.std[p, :d], alone.std[0])
        assert torch.all(bank.weight[p, d:] == 0), "padded weight rows must stay exactly 0"
        assert torch.all(bank.mean[p, d:] == 0) and torch.all(bank.std[p, d:] == 1)
    assert bank.dims.tolist() == dims and bank.dims.dtype == torch.int64


def test_separable_data_reaches_full_accuracy():
    feats, y = _gaussian_classes(2000, 10, [16, 48, 32], snr=3.0)
    bank = train_probes(feats, y, 10, seed=0, device="cpu")
    acc = bank.accuracy(feats, y)
    assert acc.shape == (3,) and acc.dtype == np.float64
    assert np.all(acc >= 0.995), acc


def test_float16_memmap_column_slices(tmp_path):
    """The cache hands over strided, read-only float16 memmap views; the trainer must take them as is."""
    feats, y = _gaussian_classes(500, 4, [7, 9], snr=4.0, seed=1)
    path = tmp_path / "feats.npy"
    full = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(500, 16))
    full[:, :7], full[:, 7:] = feats[0], feats[1]
    full.flush()
    mm = np.load(path, mmap_mode="r")
    views = [mm[:, :7], mm[:, 7:]]
    assert not views[1].flags["C_CONTIGUOUS"]
    bank = train_probes(views, y, 4, epochs=5, device="cpu")
    same = train_probes([np.ascontiguousarray(v) for v in views], y, 4, epochs=5, device="cpu")
    torch.testing.assert_close(bank.weight, same.weight, rtol=1e-6, atol=1e-7)
    assert np.all(bank.accuracy(views, y) > 0.95)


def test_deterministic_given_seed():
    feats, y = _gaussian_classes(200, 3, [5, 4], snr=0.5)
    a = train_probes(feats, y, 3, epochs=2, seed=7, device="cpu")
    b = train_probes(feats, y, 3, epochs=2, seed=7, device="cpu")
    c = train_probes(feats, y, 3, epochs=2, seed=8, device="cpu")
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert not torch.equal(a.weight, c.weight)


def test_one_hot_soft_targets_match_labels():
    feats, y = _gaussian_classes(256, 4, [6, 3], snr=0.8)
    onehot = np.eye(4, dtype=np.float32)[y]
    kw = dict(epochs=3, batch_size=50, seed=1, device="cpu")
    hard = train_probes(feats, y, 4, **kw)
    soft = train_probes(feats, onehot, 4, **kw)
    torch.testing.assert_close(hard.weight, soft.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hard.bias, soft.bias, rtol=1e-5, atol=1e-6)


def test_per_group_soft_targets_equal_separate_runs():
    """'model' mode: each model's probes fit that model's own softmax, still in one batched run."""
    feats, y = _gaussian_classes(300, 5, [4, 6, 5], snr=1.0)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 300, 5)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    kw = dict(epochs=3, batch_size=64, seed=2, device="cpu")
    bank = train_probes(feats, probs.astype(np.float32), 5, target_index=[0, 1, 1], **kw)
    for p, g in enumerate([0, 1, 1]):
        alone = train_probes([feats[p]], probs[g].astype(np.float32), 5, **kw)
        torch.testing.assert_close(bank.weight[p, : feats[p].shape[1]], alone.weight[0], rtol=1e-5, atol=1e-6)


def test_softmax_targets_stream_the_same_probabilities(tmp_path):
    """'model' mode from stored logits (float16 memmaps, as the cache holds them): same probes as the
    whole (G, N, C) softmax array, never materialised."""
    feats, _ = _gaussian_classes(300, 5, [4, 6, 5], snr=1.0)
    rng = np.random.default_rng(1)
    logits = []
    for g in range(2):
        mm = np.lib.format.open_memmap(tmp_path / f"logits{g}.npy", "w+", np.float16, (300, 5))
        mm[:] = rng.normal(size=(300, 5)) * 2
        logits.append(np.load(tmp_path / f"logits{g}.npy", mmap_mode="r"))
    probs = torch.softmax(torch.from_numpy(np.stack(logits).astype(np.float32)), dim=-1).numpy()
    kw = dict(epochs=2, batch_size=64, seed=3, device="cpu", target_index=[0, 1, 1])
    whole = train_probes(feats, probs, 5, **kw)
    streamed = train_probes(feats, SoftmaxTargets(logits), 5, **kw)
    torch.testing.assert_close(streamed.weight, whole.weight, rtol=0, atol=0)
    with pytest.raises(KlasError, match="softmax targets have shape"):
        train_probes(feats, SoftmaxTargets([a[:200] for a in logits]), 5, **kw)


def test_model_mode_learns_the_teacher():
    feats, _ = _gaussian_classes(1500, 6, [24], snr=0.0, seed=4)
    w = np.random.default_rng(5).normal(size=(24, 6))
    mu, sd = feats[0].mean(0), feats[0].std(0)
    z = 3 * ((feats[0] - mu) / sd) @ w / np.sqrt(24)
    probs = (np.exp(z - z.max(1, keepdims=True)) / np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True))
    bank = train_probes(feats, probs.astype(np.float32), 6, epochs=100, lr=1e-2, device="cpu")
    assert bank.accuracy(feats, probs.argmax(1))[0] > 0.97
    z = bank.logits(feats)[0]
    kl = (torch.as_tensor(probs) * (torch.log(torch.as_tensor(probs)) - torch.log_softmax(z.double(), -1))).sum(-1)
    assert float(kl.mean()) < 0.01  # matches the teacher's confidence, not only its argmax


def test_progress_reports_every_step():
    feats, y = _gaussian_classes(130, 3, [4], snr=1.0)
    calls = []
    def record(step: int, total: int) -> None:
        calls.append((step, total))

    train_probes(feats, y, 3, epochs=3, batch_size=50, min_steps=0, progress=record, device="cpu")
    assert calls == [(s, 9) for s in range(1, 10)]  # ceil(130 / 50) = 3 steps per epoch
    calls.clear()
    train_probes(feats, y, 3, epochs=3, batch_size=50, min_steps=10, progress=record, device="cpu")
    assert calls[-1] == (12, 12)  # raised to 4 epochs to reach at least 10 steps


def test_logits_accuracy_and_save_load(tmp_path):
    feats, y = _gaussian_classes(300, 4, [5, 9], snr=1.5)
    bank = train_probes(feats, y, 4, epochs=3, device="cpu")
    z = bank.logits(feats)
    assert z.shape == (2, 300, 4) and z.dtype == torch.float32
    x0 = (torch.as_tensor(feats[0]) - bank.mean[0, :5]) / bank.std[0, :5]
    torch.testing.assert_close(z[0], x0 @ bank.weight[0, :5] + bank.bias[0], rtol=1e-5, atol=1e-5)
    chunks = torch.cat(list(bank.iter_logits(feats, batch_size=37)), dim=1)
    torch.testing.assert_close(chunks, z)
    full = (z.argmax(-1) == torch.as_tensor(y)).double().mean(1).numpy()
    np.testing.assert_allclose(bank.accuracy(feats, y, batch_size=41), full)

    bank.save(tmp_path / "probes.safetensors")
    back = ProbeBank.load(tmp_path / "probes.safetensors", device="cpu")
    for k in ("weight", "bias", "mean", "std", "dims"):
        assert torch.equal(getattr(back, k), getattr(bank, k))
    torch.testing.assert_close(back.logits(feats), z)


def test_clear_errors(tmp_path):
    feats, y = _gaussian_classes(50, 3, [4, 5], snr=1.0)
    with pytest.raises(KlasError, match="number of samples"):
        train_probes([feats[0], feats[1][:40]], y, 3)
    with pytest.raises(KlasError, match=r"labels must lie in \[0, 3\)"):
        train_probes(feats, y + 1, 3)
    with pytest.raises(KlasError, match="probabilities"):
        train_probes(feats, np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32), 3)
    with pytest.raises(KlasError, match="target_index"):
        train_probes(feats, np.full((3, 50, 3), 1 / 3, dtype=np.float32), 3)
    with pytest.raises(KlasError, match="not found"):
        ProbeBank.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(KlasError, match="unreadable"):
        ProbeBank.load(tmp_path / "junk.safetensors")
    bank = train_probes(feats, y, 3, epochs=1, device="cpu")
    with pytest.raises(KlasError, match="expects width 5"):
        bank.logits([feats[0], feats[0]])


def test_refuses_when_training_does_not_fit(monkeypatch):
    """The check is on the working set (parameters, optimiser state, one batch), not on N."""
    import klas.probes._features as features

    feats, y = _gaussian_classes(50, 3, [4, 5], snr=1.0)
    monkeypatch.setattr(features, "free_bytes", lambda device: 1000)  # 2 * 50 * 5 * 4 bytes = 2000 needed
    with pytest.raises(KlasError, match="GiB is free"):
        train_probes(feats, y, 3, device="cpu")
    monkeypatch.setattr(features, "free_bytes", lambda device: None)
    train_probes(feats, y, 3, epochs=1, min_steps=0, device="cpu")


def _in_memory_reference(feats, targets, num_classes, *, epochs, batch_size, seed, target_index=None):
    """The trainer as it was before streaming (labels or per-group soft targets, default lr/wd, CPU):
    all features stacked into one padded (P, N, Dmax) tensor, two-pass float64 moments, standardised
    in place in the storage dtype, then the same seeded mini-batches. Kept to pin streaming to it."""
    import math

    from klas.optim import warmup_cosine, warmup_steps_of
    from klas.probes.train import WARMUP_FRACTION

    half = all(f.dtype == np.float16 for f in feats)
    dtype = torch.float16 if half else torch.float32
    dims, n = [f.shape[1] for f in feats], feats[0].shape[0]
    x = torch.zeros(len(feats), n, max(dims), dtype=dtype)
    for p, f in enumerate(feats):
        x[p, :, : dims[p]] = torch.from_numpy(np.ascontiguousarray(f)).to(dtype)
    real = torch.arange(max(dims))[None] < torch.tensor(dims)[:, None]  # (P, Dmax)
    mean = x.double().mean(1)
    std = (x.double() - mean[:, None]).square().mean(1).sqrt()
    std = torch.where(real & (std >= 1e-6), std, torch.ones_like(std)).float()
    mean = torch.where(real, mean, torch.zeros_like(mean)).float()
    x = ((x.float() - mean[:, None]) * std.reciprocal()[:, None]).to(dtype)
    mask = real.unsqueeze(-1).float()
    w = torch.zeros(len(feats), max(dims), num_classes, requires_grad=True)
    b = torch.zeros(len(feats), num_classes, requires_grad=True)
    opt = torch.optim.AdamW([{"params": [w], "weight_decay": 1e-4}, {"params": [b], "weight_decay": 0.0}], lr=3e-3)
    steps = math.ceil(n / batch_size)
    total = epochs * steps
    warm = warmup_steps_of(WARMUP_FRACTION, total)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, total, warm))
    gen = torch.Generator().manual_seed(seed)
    tgt = torch.as_tensor(targets)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            z = torch.baddbmm(b[:, None], x.index_select(1, idx).float(), w)  # (P, B, C)
            if tgt.ndim == 1:
                loss = F.cross_entropy(z.reshape(-1, num_classes), tgt[idx].repeat(len(feats)), reduction="sum") / len(idx)
            else:
                q = tgt.index_select(1, idx).float().index_select(0, torch.as_tensor(target_index))
                loss = -(q * F.log_softmax(z, -1)).sum() / len(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                w.mul_(mask)
    return w.detach(), b.detach(), mean, std


@pytest.mark.parametrize("half", [False, True])
def test_streamed_equals_in_memory_trainer(tmp_path, half):
    """Streaming from memmaps reproduces the all-in-memory trainer: same batches, same standardised
    values (bit-identical on CPU when written; the tolerance only leaves room for float noise)."""
    feats, y = _gaussian_classes(333, 6, [7, 12, 5], snr=1.0, seed=2)
    dtype = np.float16 if half else np.float32
    full = np.lib.format.open_memmap(tmp_path / "f.npy", mode="w+", dtype=dtype, shape=(333, 24))
    full[:, :7], full[:, 7:19], full[:, 19:] = feats
    full.flush()
    mm = np.load(tmp_path / "f.npy", mmap_mode="r")
    views = [mm[:, :7], mm[:, 7:19], mm[:, 19:]]
    kw = dict(epochs=3, batch_size=40, seed=5)
    ref = _in_memory_reference(views, y, 6, **kw)
    bank = train_probes(views, y, 6, device="cpu", min_steps=0, **kw)
    for got, want in zip((bank.weight, bank.bias, bank.mean, bank.std), ref):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)

    logits = np.random.default_rng(1).normal(size=(2, 333, 6)).astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    ref = _in_memory_reference(views, probs, 6, target_index=[1, 0, 1], **kw)
    bank = train_probes(views, probs, 6, target_index=[1, 0, 1], device="cpu", min_steps=0, **kw)
    torch.testing.assert_close(bank.weight, ref[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(bank.bias, ref[1], rtol=1e-6, atol=1e-7)


def test_streamed_moments_match_float64_over_many_chunks(tmp_path):
    from klas.probes._features import moments

    rng = np.random.default_rng(3)
    a = (rng.normal(size=(1001, 6)) * [1, 1e-3, 50, 1, 1, 1] + [0, 1e4, -7, 0, 3, 0]).astype(np.float32)
    a[:, 3] = 2.5  # constant: std falls back to 1
    mean, std = moments([a, a[:, :2]], torch.device("cpu"), chunk=64)  # 16 chunks merged
    ref = a.astype(np.float64)
    np.testing.assert_allclose(mean[0].numpy(), ref.mean(0), rtol=1e-6, atol=1e-6)
    want = ref.std(0)
    want[3] = 1.0
    np.testing.assert_allclose(std[0].numpy(), want, rtol=1e-6)
    assert mean.shape == std.shape == (2, 6)
    assert torch.all(mean[1, 2:] == 0) and torch.all(std[1, 2:] == 1)


def test_release_pages_keeps_data_and_spares_private_maps(tmp_path):
    from klas.probes._features import _mapping, gather_rows, release_pages

    full = np.lib.format.open_memmap(tmp_path / "f.npy", mode="w+", dtype=np.float16, shape=(64, 10))
    full[:] = np.arange(640, dtype=np.float16).reshape(64, 10)
    full.flush()
    ro = np.load(tmp_path / "f.npy", mmap_mode="r")[:, 2:7]
    cow = np.load(tmp_path / "f.npy", mmap_mode="c")
    assert _mapping(ro) is not None and _mapping(cow) is None and _mapping(np.zeros(3)) is None
    before = gather_rows([ro], np.array([5, 0, 63]), 8, torch.device("cpu"), torch.float32)
    release_pages([ro, cow, np.zeros(3), torch.zeros(2)])
    after = gather_rows([ro], np.array([5, 0, 63]), 8, torch.device("cpu"), torch.float32)
    assert torch.equal(before, after) and before.shape == (1, 3, 8)
    assert torch.all(after[0, :, 5:] == 0)
