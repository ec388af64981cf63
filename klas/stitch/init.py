"""Least-squares initialisation of stitch layers on live activations (SN-Net, Sec. 3.2).

For a stitch ``(a, src_cut) -> (b, dst_cut)`` let ``X`` be representation ``src_cut`` of ``a`` and ``Y``
representation ``dst_cut`` of ``b`` on the same images, every position (token / pixel) a sample. The
linear stitch is the ridge-regularised least-squares fit

    [W b] = argmin ||Y - X W^T - 1 b^T||^2 + lam ||W||^2,   lam = ridge * mean(diag(X^T X))

(the bias is not penalised; ``ridge`` is relative to the data's scale, :data:`DEFAULT_RIDGE` = 1e-4,
which only matters when ``X^T X`` is near-singular, e.g. fewer positions than channels).

All selected stitches are fitted in one pass over the probe images: each batch runs every anchor's
blocks once, the needed representations are flattened to ``(positions, channels)`` and the sums
``X^T X`` (shared by all stitches leaving the same representation) and ``X^T Y`` (per stitch) are
accumulated in float64; then each system is solved.

``mlp`` stitches get the same fit, routed through the ReLU: ``fc1 = (W, b + c)``, ``fc2 = (I, -c)``
with ``c = 6 * rms(W x + b)`` per output channel (from the same sums), so the MLP equals the linear
fit wherever a pre-activation stays above ``-c`` (essentially every probe sample) and training
starts from the least-squares solution rather than from noise. ``lora`` stitches get the fit as
their frozen weight, with a zero update (SN-Netv2).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import Tensor

from klas.stitch.layers import LinearStitch, LoRAStitch, MLPStitch
from klas.stitch.network import StitchNet

#: Relative ridge: lam = DEFAULT_RIDGE * mean(diag(X^T X)).
DEFAULT_RIDGE = 1e-4
#: Probe-train images used for the fit (as SN-Net).
DEFAULT_INIT_IMAGES = 100
#: MLP stitches: shift in units of the fitted output's per-channel RMS (see module docstring).
MLP_SHIFT_RMS = 6.0


def flatten_positions(h: Tensor, layout: str) -> Tensor:
    """A representation -> ``(batch * positions, channels)``; positions in row-major order."""
    if layout == "nchw":
        h = h.permute(0, 2, 3, 1)
    return h.reshape(-1, h.shape[-1])


@dataclass
class FitReport:
    """Per-stitch result of the fit: samples (positions) used and the fraction of variance explained."""

    samples: int
    r2: float


def solve_ridge(gram: Tensor, cross: Tensor, ridge: float = DEFAULT_RIDGE) -> tuple[Tensor, Tensor]:
    """Solve ``(G + lam P) [W^T; b^T] = C`` for the bias-augmented sums.

    ``gram`` = ``Xa^T Xa`` with ``Xa = [X, 1]`` (``(D+1, D+1)``), ``cross`` = ``Xa^T Y`` (``(D+1, E)``),
    ``P`` = identity on the weight rows, zero on the bias row. Returns ``W`` (E, D) and ``b`` (E,).
    """
    gram = gram.double()
    cross = cross.double()
    d = gram.shape[0] - 1
    lam = ridge * float(torch.diagonal(gram)[:d].mean()) if d else 0.0
    reg = gram.clone()
    idx = torch.arange(d, device=gram.device)
    reg[idx, idx] += lam
    try:
        sol = torch.linalg.solve(reg, cross)
    except RuntimeError:  # singular (ridge 0 on rank-deficient data): minimum-norm solution
        sol = torch.linalg.lstsq(reg.cpu(), cross.cpu(), driver="gelsd").solution.to(gram.device)
    return sol[:d].T.contiguous(), sol[d].contiguous()


@torch.no_grad()
def least_squares_init(
    net: StitchNet,
    batches: Iterable[Tensor],
    ids: Iterable[str] | None = None,
    ridge: float = DEFAULT_RIDGE,
) -> dict[str, FitReport]:
    """Fit every listed stitch layer (default: all) on the images in ``batches``, in one pass.

    ``batches`` yields image tensors already on the net's device. Returns a :class:`FitReport` per
    stitch. Anchor weights are not changed.
    """
    ids = list(net.stitch_ids if ids is None else ids)
    specs = [net.specs[i] for i in ids]
    needs: dict[str, set[int]] = {}
    for s in specs:
        needs.setdefault(s.src, set()).add(s.src_cut)
        needs.setdefault(s.dst, set()).add(s.dst_cut)
    grams: dict[tuple[str, int], Tensor] = {}
    crosses: dict[str, Tensor] = {}
    y_sq: dict[tuple[str, int], Tensor] = {}  # sum of squares and per-channel sums of each target
    y_sum: dict[tuple[str, int], Tensor] = {}
    count: dict[tuple[str, int], int] = {}
    was_training = net.training
    net.eval()
    for x in batches:
        reps = net.representations(x, needs)
        flat: dict[tuple[str, int], Tensor] = {}

        def get(key: tuple[str, int]) -> Tensor:
            if key not in flat:
                flat[key] = flatten_positions(reps[key], net.profiles[key[0]].reps[key[1]].layout).double()
            return flat[key]

        for s in specs:
            src_key, dst_key = (s.src, s.src_cut), (s.dst, s.dst_cut)
            xs = get(src_key)
            if src_key not in grams:
                grams[src_key] = torch.zeros(xs.shape[1] + 1, xs.shape[1] + 1, dtype=torch.float64, device=xs.device)
                count[src_key] = 0
            ys = get(dst_key)
            if ys.shape[0] != xs.shape[0]:
                raise RuntimeError(f"stitch {s.id}: {xs.shape[0]} source positions vs {ys.shape[0]} target positions")
            if s.id not in crosses:
                crosses[s.id] = torch.zeros(xs.shape[1] + 1, ys.shape[1], dtype=torch.float64, device=xs.device)
            crosses[s.id][:-1] += xs.T @ ys
            crosses[s.id][-1] += ys.sum(0)
            if dst_key not in y_sq:
                y_sq[dst_key] = torch.zeros((), dtype=torch.float64, device=ys.device)
                y_sum[dst_key] = torch.zeros(ys.shape[1], dtype=torch.float64, device=ys.device)
        for key in {(s.src, s.src_cut) for s in specs}:
            xs = flat[key]
            g = grams[key]
            g[:-1, :-1] += xs.T @ xs
            colsum = xs.sum(0)
            g[:-1, -1] += colsum
            g[-1, :-1] += colsum
            g[-1, -1] += xs.shape[0]
            count[key] += xs.shape[0]
        for key in {(s.dst, s.dst_cut) for s in specs}:
            ys = flat[key]
            y_sq[key] += (ys * ys).sum()
            y_sum[key] += ys.sum(0)
    net.train(was_training)

    reports: dict[str, FitReport] = {}
    for s in specs:
        src_key, dst_key = (s.src, s.src_cut), (s.dst, s.dst_cut)
        if src_key not in grams:
            raise ValueError("least_squares_init got no images")
        g, c, n = grams[src_key], crosses[s.id], count[src_key]
        w, b = solve_ridge(g, c, ridge)
        sol = torch.cat([w.T, b[None]], 0)  # (D+1, E)
        # residual sum of squares from the sums: ||Y||^2 - 2 tr(S^T C) + tr(S^T G S)
        fitted_sq = torch.einsum("ie,ij,je->e", sol, g, sol)  # per channel sum of (Xa s_e)^2
        rss = y_sq[dst_key] - 2 * (sol * c).sum() + fitted_sq.sum()
        tss = y_sq[dst_key] - (y_sum[dst_key] ** 2).sum() / n
        reports[s.id] = FitReport(samples=n, r2=float(1 - rss / tss) if tss > 0 else float("nan"))
        layer = net.stitch_layer(s.id)
        dtype = next(layer.parameters()).dtype
        if isinstance(layer, (LinearStitch, LoRAStitch)):
            layer.set_affine(w.to(dtype), b.to(dtype))
        elif isinstance(layer, MLPStitch):
            shift = MLP_SHIFT_RMS * (fitted_sq / n).clamp_min(0).sqrt()
            layer.set_affine(w.to(dtype), b.to(dtype), shift.to(dtype))
        else:  # pragma: no cover - make_stitch_layer only builds these kinds
            raise TypeError(f"cannot least-squares-initialise {type(layer).__name__}")
    return reports
