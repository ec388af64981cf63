"""Linear CKA between every pair of P feature sets (the ``--strategy cka`` baseline).

CKA(X, Y) = <Kx, Ky>_F / (||Kx||_F ||Ky||_F) with Kx = Xc Xc^T the Gram matrix of column-centred
features on a shared, seeded subsample of m rows. Flattening each probe's Gram into a row of
S (P, m*m) gives every pair's HSIC from one GEMM, H = S S^T, whatever the widths.

Why Grams rather than the feature-space form ||Yc^T Xc||_F^2: that one needs a D_s x D_t product
per pair, 2*m*(sum_p D_p)^2 flops in all (~1.6e12 for 39 probes of width ~500 at m = 4096),
while Grams cost 2*m^2*sum_p D_p + 2*P^2*m^2 (~3.5e11) and the pairing is a single dense GEMM.
Grams are m x m, so S is never materialised: rows of the Grams are built ``block`` at a time
for all probes (P*block*m*4 bytes, <= ~256 MiB) and H is accumulated in float64 across blocks.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from klas.errors import KlasError
from klas.probes import FeatureArray, check_features
from klas.score.kl import blocked_cross_gram, _full_precision_matmul
from klas.utils import resolve_device

#: Bytes allowed for one block of Gram rows for all probes.
GRAM_BLOCK_BYTES = 1 << 28


def linear_cka_matrix(
    feats: Sequence[FeatureArray],
    max_samples: int = 4096,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> Tensor:
    """Linear CKA of every pair of P feature arrays (N, D_p) on a seeded subsample of <= max_samples rows -> (P, P) float64 CPU.

    Symmetric, 1 on the diagonal; a probe whose features are constant on the subsample gets 0.
    """
    n, _ = check_features(feats, "CKA features")
    if max_samples < 2:
        raise KlasError(f"CKA needs max_samples >= 2 (got {max_samples})")
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    rows = subsample_rows(n, max_samples, seed)
    xs = [centred_rows(f, rows, dev) for f in feats]  # P x (m, D_p) float32
    with _full_precision_matmul():
        hsic = gram_inner_products(xs)  # (P, P) float64
    hsic = (hsic + hsic.T) / 2  # symmetric in exact arithmetic; float32 GEMM blocks differ in the last bits
    norms = hsic.diagonal().clamp_min(0).sqrt()  # (P,)
    denom = norms[:, None] * norms[None, :]
    cka = torch.where(denom > 0, hsic / denom.clamp_min(1e-300), torch.zeros_like(hsic))
    return cka.clamp_(-1.0, 1.0).cpu()


def subsample_rows(n: int, max_samples: int, seed: int) -> np.ndarray:
    """Sorted row indices: all of range(n), or a seeded subset of ``max_samples`` (sorted for memmap reads)."""
    if n <= max_samples:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_samples, replace=False))


def centred_rows(f: FeatureArray, rows: np.ndarray, device: torch.device) -> Tensor:
    """Selected rows of one feature array, column-centred (mean in float64) -> (m, D) float32 on ``device``."""
    if isinstance(f, Tensor):
        x = f[torch.as_tensor(rows, device=f.device)].to(device=device, dtype=torch.float64)
    else:
        x = torch.from_numpy(np.asarray(f[rows], dtype=np.float64)).to(device)
    return (x - x.mean(0, keepdim=True)).float()


def gram_inner_products(xs: Sequence[Tensor]) -> Tensor:
    """<Kx_s, Kx_t>_F for all pairs, Kx = x x^T, building Gram rows a block at a time -> (P, P) float64."""
    num, m = len(xs), int(xs[0].shape[0])
    block = max(1, min(m, GRAM_BLOCK_BYTES // (4 * num * m)))
    out = torch.zeros(num, num, dtype=torch.float64, device=xs[0].device)
    grams = torch.empty(num, block, m, device=xs[0].device)  # reused: (P, block, m)
    for start in range(0, m, block):
        b = min(block, m - start)
        rows = grams[:, :b]  # (P, b, m); each rows[p] is contiguous, and so is the flat view
        for p, x in enumerate(xs):
            torch.mm(x[start : start + b], x.T, out=rows[p])  # (b, m) rows of probe p's Gram
        flat = rows.reshape(num, b * m)  # (P, b*m)
        out += blocked_cross_gram(flat, flat)
    return out
