"""Pairwise KL between the predictive distributions of P probes, all pairs from one GEMM per chunk.

theta[s, t] = mean_x KL(P_s(x) || P_t(x)) with P = softmax(logits / T). Because

    KL(p_s || p_t) = sum_c p_s log p_s - sum_c p_s log p_t,

stacking every probe's probabilities as rows of A (P, n*C) and log-probabilities as rows of L
(P, n*C) gives all cross terms as G = A @ L^T (P, P), and the entropy terms as its diagonal
(G[s, s] is exactly the row sum of p_s * log p_s), so theta = (diag(G)[:, None] - G) / N.

Precision: a chunk's products are summed in float32 in GEMM blocks of ``GEMM_BLOCK`` products
(one ``bmm`` over the blocks) and the blocks, then the chunks, are reduced in float64. What is
left is float32 rounding inside a block: entropy and cross term are each ~1 nat per sample, so
their difference carries an absolute error of ~1e-6 (at most ~1e-5) nats. It only shows on
near-identical probes (KL ~1e-7); relative error is ~1e-7 wherever KL > 1e-3. Smaller blocks
shrink it roughly in proportion but cost ~25% speed at 39 probes on CPU. Tiny negatives are
clamped to 0, and the diagonal is exactly 0 by construction.

Memory: two float32 work buffers the size of the largest chunk (P*n*C*4 bytes each), reused for
every chunk, plus a (P, P) float64 accumulator; nothing grows with the number of samples.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from klas.errors import KlasError
from klas.utils import resolve_device

#: Products summed in float32 inside one GEMM block before the float64 reduction.
GEMM_BLOCK = 1 << 15


def kl_matrix(
    chunks: Iterable[Tensor],
    temperature: float = 1.0,
    device: str | torch.device | None = None,
) -> Tensor:
    """Mean pairwise KL(P_s || P_t) over all samples of a stream of (P, n_chunk, C) logit chunks -> (P, P) float64 CPU.

    ``device=None`` runs on CUDA when present, else CPU; chunks may live anywhere and be any float dtype.
    """
    _check_temperature(temperature)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    work = _Workspace(dev)
    acc: Tensor | None = None  # (P, P) float64: sum over samples of sum_c p_s log p_t
    shape: tuple[int, int] | None = None
    total = 0
    with _full_precision_matmul():
        for z in chunks:
            shape = _check_chunk(z, shape)
            if z.shape[1] == 0:
                continue
            probs, logp = work.softmax(z, temperature)  # (P, n, C) each, reused buffers
            gram = blocked_cross_gram(probs.view(z.shape[0], -1), logp.view(z.shape[0], -1))  # (P, P)
            acc = gram if acc is None else acc.add_(gram)
            total += int(z.shape[1])
    if acc is None:
        raise KlasError("no score samples: the KL criterion needs at least one sample's probe logits")
    theta = (acc.diagonal()[:, None] - acc) / total  # (P, P)
    if not bool(torch.isfinite(theta).all()):
        raise KlasError(
            "probe logits contain NaN or inf (non-finite cached features, or probe training diverged); "
            "check the cache with klas cache --verify --out CACHE, then re-run klas search with --overwrite"
        )
    return theta.clamp_min_(0.0).cpu()


def blocked_cross_gram(a: Tensor, b: Tensor, block: int | None = None) -> Tensor:
    """a @ b.T for (P, K) float32 operands, float32 within K-blocks of ``block``, float64 across -> (P, P) float64.

    One ``bmm`` over the K-blocks (strided views, no copies) plus one ``mm`` for the remainder.
    """
    block = GEMM_BLOCK if block is None else block
    p, k = a.shape
    nb = k // block
    out = torch.zeros(p, b.shape[0], dtype=torch.float64, device=a.device)
    if nb:
        a_blk = a[:, : nb * block].view(p, nb, block).transpose(0, 1)  # (nb, P, block)
        b_blk = b[:, : nb * block].view(b.shape[0], nb, block).permute(1, 2, 0)  # (nb, block, P)
        out += torch.bmm(a_blk, b_blk).sum(0, dtype=torch.float64)  # (nb, P, P) -> (P, P)
    if nb * block < k:
        out += (a[:, nb * block :] @ b[:, nb * block :].T).double()
    return out


def kl_matrix_naive(
    logits: Tensor,
    temperature: float = 1.0,
    pairs: Iterable[tuple[int, int]] | None = None,
) -> Tensor:
    """The straightforward reference: log-softmax once, then one elementwise KL per (s, t) pair -> (P, P) float64 CPU.

    ``pairs`` restricts the loop to those pairs (the rest is NaN); the benchmark uses it to time a
    subset of a loop that would take minutes.
    """
    _check_temperature(temperature)
    if logits.ndim != 3:
        raise KlasError(f"logits have shape {tuple(logits.shape)}; expected (probes, samples, classes)")
    num = logits.shape[0]
    logp = F.log_softmax(logits.float() / temperature, dim=-1)  # (P, N, C)
    probs = logp.exp()
    todo = [(s, t) for s in range(num) for t in range(num)] if pairs is None else list(pairs)
    theta = torch.full((num, num), float("nan"), dtype=torch.float64)
    for s, t in todo:
        kl = (probs[s] * (logp[s] - logp[t])).sum(-1)  # (N,)
        theta[s, t] = float(kl.mean())
    return theta.clamp_min(0.0)


class _Workspace:
    """Two flat float32 buffers reused across chunks: fresh multi-MB tensors per chunk cost page faults."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.a = torch.empty(0, device=device)
        self.b = torch.empty(0, device=device)

    def softmax(self, z: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
        """Chunk logits (P, n, C) -> (probabilities, log-probabilities), each (P, n, C) float32 views."""
        numel = z.numel()
        if self.a.numel() < numel:
            self.a = self.b = None  # drop the old pair before allocating the larger one
            self.a = torch.empty(numel, device=self.device)
            self.b = torch.empty(numel, device=self.device)
        scaled = self.a[:numel].view(z.shape)
        logp = self.b[:numel].view(z.shape)
        if temperature == 1.0 and z.dtype == torch.float32 and z.device == self.device and z.is_contiguous():
            src = z
        else:
            src = scaled.copy_(z)  # casts and moves without a temporary
            if temperature != 1.0:
                src.div_(temperature)
        torch.log_softmax(src, dim=-1, out=logp)
        probs = torch.exp(logp, out=scaled)
        return probs, logp


@contextmanager
def _full_precision_matmul() -> Iterator[None]:
    """Keep float32 GEMMs in full float32 (no TF32/bf16), whatever the caller set globally."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def _check_chunk(z: Tensor, shape: tuple[int, int] | None) -> tuple[int, int]:
    if not isinstance(z, Tensor) or z.ndim != 3:
        got = tuple(z.shape) if hasattr(z, "shape") else type(z).__name__
        raise KlasError(f"score chunk has shape {got}; expected (probes, samples, classes) logits")
    now = (int(z.shape[0]), int(z.shape[2]))
    if shape is not None and now != shape:
        raise KlasError(f"score chunks disagree: (probes, classes) {now} after {shape}")
    if not z.is_floating_point():
        raise KlasError(f"score chunk has dtype {z.dtype}; expected float logits")
    return now


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise KlasError(f"temperature must be > 0 (got {temperature})")


def chunked(logits: Tensor, chunk: int) -> Sequence[Tensor]:
    """Split (P, N, C) logits along samples into (P, <=chunk, C) views; convenience for tests and benchmarks."""
    return list(logits.split(max(1, int(chunk)), dim=1))
