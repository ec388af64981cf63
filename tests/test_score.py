"""KL scorer against scipy and the per-pair loop; linear CKA against its definition and invariances."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import rel_entr, softmax

from klas.errors import KlasError
from klas.score import chunked, kl_matrix, kl_matrix_naive, linear_cka_matrix

#: Absolute floor of the float32 entropy-minus-cross identity (nats): it shows on near-identical
#: probes, whose KL is ~1e-7 while each term is ~1 nat per sample (see klas/score/kl.py).
KL_ATOL = 1e-5


def _logits(p: int = 6, n: int = 97, c: int = 23, seed: int = 0) -> torch.Tensor:
    """Probe logits with a shared signal, varied confidence and one near-duplicate probe -> (P, N, C)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, c, generator=g) * 3
    z = torch.stack([base * (0.3 + 0.4 * i) + torch.randn(n, c, generator=g) * (0.5 + 0.3 * i) for i in range(p)])
    z[1] = z[0] + 1e-3 * torch.randn(n, c, generator=g)
    return z


def _scipy_kl(z: torch.Tensor, temperature: float = 1.0) -> np.ndarray:
    probs = softmax(z.double().numpy() / temperature, axis=-1)  # (P, N, C)
    p = probs.shape[0]
    return np.array([[rel_entr(probs[s], probs[t]).sum(-1).mean() for t in range(p)] for s in range(p)])


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.5])
@pytest.mark.parametrize("chunk", [97, 10, 13])  # one chunk; chunk sizes that do not divide N
def test_kl_matches_scipy(temperature, chunk):
    z = _logits()
    ref = _scipy_kl(z, temperature)
    theta = kl_matrix(chunked(z, chunk), temperature, device="cpu")
    assert theta.dtype == torch.float64 and theta.shape == (6, 6) and theta.device.type == "cpu"
    off = ~np.eye(6, dtype=bool) & (ref > 1e-3)  # relative check where KL is not ~0
    np.testing.assert_allclose(theta.numpy()[off], ref[off], rtol=1e-5)
    np.testing.assert_allclose(theta.numpy(), ref, rtol=1e-5, atol=KL_ATOL)


def test_kl_equals_naive_loop_and_chunk_invariance():
    z = _logits(p=5, n=64, c=300, seed=1)  # 64*300 = 19,200 products: under and over one GEMM block
    naive = kl_matrix_naive(z)
    for chunk in (64, 7, 1, 200):
        torch.testing.assert_close(kl_matrix(chunked(z, chunk), device="cpu"), naive, rtol=1e-5, atol=KL_ATOL)
    big = _logits(p=4, n=150, c=500, seed=2)  # 75,000 products per probe: several GEMM blocks plus a remainder
    torch.testing.assert_close(kl_matrix([big], device="cpu"), kl_matrix_naive(big), rtol=1e-5, atol=KL_ATOL)


def test_kl_diagonal_zero_nonnegative_and_near_duplicates():
    z = _logits()
    theta = kl_matrix(chunked(z, 16), device="cpu")
    assert torch.all(theta.diagonal() == 0)
    assert torch.all(theta >= 0)
    ref = _scipy_kl(z)
    assert ref[0, 1] < 1e-6 and abs(float(theta[0, 1]) - ref[0, 1]) < KL_ATOL
    assert abs(float(theta[1, 0]) - ref[1, 0]) < KL_ATOL
    same = kl_matrix([z[:1].repeat(3, 1, 1)], device="cpu")  # identical probes: all pairs 0
    assert torch.all(same == 0)


def test_kl_accepts_half_and_generators():
    z = _logits(p=3, n=40, c=11)
    half = z.half()
    ref = kl_matrix_naive(half.float())
    got = kl_matrix((c for c in chunked(half, 9)), device="cpu")
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=KL_ATOL)


def test_kl_errors():
    z = _logits(p=3, n=10, c=5)
    with pytest.raises(KlasError, match="temperature"):
        kl_matrix([z], temperature=0)
    with pytest.raises(KlasError, match="disagree"):
        kl_matrix([z, z[:2]], device="cpu")
    with pytest.raises(KlasError, match="no score samples"):
        kl_matrix([], device="cpu")
    bad = z.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(KlasError, match="NaN"):
        kl_matrix([bad], device="cpu")


def _numpy_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA from the definition with explicit centring matrices."""
    n = x.shape[0]
    h = np.eye(n) - 1.0 / n
    kx, ky = h @ x @ x.T @ h, h @ y @ y.T @ h
    return float((kx * ky).sum() / np.sqrt((kx * kx).sum() * (ky * ky).sum()))


def test_cka_matches_numpy_and_invariances():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 12)) + 5.0
    rot, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    feats = [x, x @ rot, 7.5 * x - 2.0, x[:, :4] ** 2, rng.normal(size=(120, 20)).astype(np.float32)]
    cka = linear_cka_matrix(feats, device="cpu")
    assert cka.shape == (5, 5) and cka.dtype == torch.float64
    ref = np.array([[_numpy_cka(a, b) for b in feats] for a in feats])
    np.testing.assert_allclose(cka.numpy(), ref, rtol=1e-5, atol=KL_ATOL)
    np.testing.assert_allclose(cka.numpy()[:3, :3], 1.0, atol=1e-6)  # identical / rotated / scaled
    np.testing.assert_allclose(cka.numpy(), cka.numpy().T, atol=1e-12)
    assert 0 < cka[0, 4] < 0.5


def test_cka_subsample_is_seeded_and_handles_memmap_views(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "f.npy"
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(3000, 24))
    mm[:] = rng.normal(size=(3000, 24))
    mm.flush()
    mm = np.load(path, mmap_mode="r")
    feats = [mm[:, :8], mm[:, 8:], torch.from_numpy(np.asarray(mm[:, :8], dtype=np.float32))]
    a = linear_cka_matrix(feats, max_samples=500, seed=3, device="cpu")
    b = linear_cka_matrix(feats, max_samples=500, seed=3, device="cpu")
    assert torch.equal(a, b)
    np.testing.assert_allclose(float(a[0, 2]), 1.0, atol=1e-6)
    sub = np.sort(np.random.default_rng(3).choice(3000, 500, replace=False))
    ref = _numpy_cka(np.asarray(mm[sub, :8], np.float64), np.asarray(mm[sub, 8:], np.float64))
    np.testing.assert_allclose(float(a[0, 1]), ref, rtol=1e-4, atol=1e-6)


def test_cka_constant_features_score_zero():
    x = np.random.default_rng(0).normal(size=(50, 6))
    cka = linear_cka_matrix([x, np.ones((50, 3))], device="cpu")
    assert float(cka[0, 1]) == 0.0 and float(cka[1, 1]) == 0.0 and float(cka[0, 0]) == pytest.approx(1.0)


def test_ls_residual_is_the_held_out_fit_and_never_reads_eval(vit_cache, monkeypatch, one_thread):
    """``klas.score.ls_residual``: 1 - R² of each candidate's least-squares fit on seeded probe-train
    images, measured on seeded score images (klas.stitch.init.least_squares_r2 on those same images);
    deterministic, and the eval split is never opened."""
    from klas.cache import Cache, open_cache
    from klas.score import ls_residual
    from klas.score.ls import _images
    from klas.stitch.candidates import enumerate_stitches
    from klas.stitch.init import least_squares_r2
    from klas.stitch.network import StitchNet, StitchSpec

    cache = open_cache(vit_cache)
    stitches = enumerate_stitches(cache.profiles, "up", "linear")[::5]
    opened = []
    real = Cache.dataset
    monkeypatch.setattr(Cache, "dataset", lambda self, split, root=None: opened.append(split) or real(self, split, root=root))
    res = ls_residual(cache, stitches, seed=3, fit_images=20, score_images=30, root=vit_cache.parent)
    assert set(opened) == {"probe-train", "score"}
    assert res.shape == (len(stitches),) and np.isfinite(res).all() and (res >= 0).all()
    np.testing.assert_array_equal(res, ls_residual(cache, stitches, seed=3, fit_images=20, score_images=30,
                                                   root=vit_cache.parent))
    net = StitchNet.from_loaded(cache.load_models(root=vit_cache.parent),
                                [StitchSpec(c.id, c.src, c.src_cut, c.dst, c.dst_cut) for c in stitches])
    dev = torch.device("cpu")
    r2 = least_squares_r2(net, _images(cache, "probe-train", 20, 3, 64, vit_cache.parent, dev),
                          _images(cache, "score", 30, 4, 64, vit_cache.parent, dev))
    np.testing.assert_allclose(res, [1 - r2[c.id] for c in stitches], rtol=1e-9, atol=1e-12)
