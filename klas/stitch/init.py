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
from typing import Callable, Iterable

import torch
from torch import Tensor

from klas.stitch.bridge import BridgedStitch
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


def _views(net: StitchNet, s) -> tuple[tuple, tuple, Callable[[dict], Tensor], Callable[[dict], Tensor]]:
    """Keys and row extractors ``(x_key, y_key, x_of(reps), y_of(reps))`` of one stitch's fit.

    Plain stitches fit representation against representation, position by position; bridged ones
    fit the bridge's source rows against the target's rows (:class:`~klas.stitch.bridge.Bridge`), so
    the key of ``X`` also names the target grid and class row the rows were made for.
    """
    src_key, dst_key = (s.src, s.src_cut), (s.dst, s.dst_cut)
    layer = net.stitch_layer(s.id)
    if isinstance(layer, BridgedStitch):
        b = layer.bridge
        return ((*src_key, b.dst.grid, b.dst_cls), (*dst_key, "rows", b.dst_cls),
                lambda reps: b.rows(reps[src_key]).reshape(-1, b.src.width).double(),
                lambda reps: b.target_rows(reps[dst_key]).reshape(-1, b.dst.width).double())
    lay_a, lay_b = net.profiles[s.src].reps[s.src_cut].layout, net.profiles[s.dst].reps[s.dst_cut].layout
    return (src_key, dst_key, lambda reps: flatten_positions(reps[src_key], lay_a).double(),
            lambda reps: flatten_positions(reps[dst_key], lay_b).double())


@dataclass
class _Sums:
    """What one pass over images accumulates for a set of stitches (float64): ``grams[x_key]`` = Xa^T Xa,
    ``crosses[id]`` = Xa^T Y, per target key the sum of squares ``y_sq`` and per-channel sums ``y_sum``,
    samples ``count[x_key]``, bridged stitches' target prefix-token sums ``extra_sum[id]``, and ``images``."""

    grams: dict[tuple, Tensor]
    crosses: dict[str, Tensor]
    y_sq: dict[tuple, Tensor]
    y_sum: dict[tuple, Tensor]
    count: dict[tuple, int]
    extra_sum: dict[str, Tensor]
    images: int = 0


@torch.no_grad()
def _accumulate(net: StitchNet, batches: Iterable[Tensor], specs: list, views: dict) -> _Sums:
    """One pass over ``batches``: each anchor runs once per batch, every stitch's sums are added."""
    needs: dict[str, set[int]] = {}
    for s in specs:
        needs.setdefault(s.src, set()).add(s.src_cut)
        needs.setdefault(s.dst, set()).add(s.dst_cut)
    sums = _Sums({}, {}, {}, {}, {}, {})
    was_training = net.training
    net.eval()
    for x in batches:
        reps = net.representations(x, needs)
        flat: dict[tuple, Tensor] = {}
        for s in specs:
            xk, yk, x_of, y_of = views[s.id]
            xs = flat[xk] = flat[xk] if xk in flat else x_of(reps)
            ys = flat[yk] = flat[yk] if yk in flat else y_of(reps)
            if xk not in sums.grams:
                sums.grams[xk] = torch.zeros(xs.shape[1] + 1, xs.shape[1] + 1, dtype=torch.float64, device=xs.device)
                sums.count[xk] = 0
            if ys.shape[0] != xs.shape[0]:
                raise RuntimeError(f"stitch {s.id}: {xs.shape[0]} source positions vs {ys.shape[0]} target positions")
            if s.id not in sums.crosses:
                sums.crosses[s.id] = torch.zeros(xs.shape[1] + 1, ys.shape[1], dtype=torch.float64, device=xs.device)
            sums.crosses[s.id][:-1] += xs.T @ ys
            sums.crosses[s.id][-1] += ys.sum(0)
            if yk not in sums.y_sq:
                sums.y_sq[yk] = torch.zeros((), dtype=torch.float64, device=ys.device)
                sums.y_sum[yk] = torch.zeros(ys.shape[1], dtype=torch.float64, device=ys.device)
            layer = net.stitch_layer(s.id)
            extra = layer.bridge.target_extra(reps[(s.dst, s.dst_cut)]) if isinstance(layer, BridgedStitch) else None
            if extra is not None:
                sums.extra_sum[s.id] = sums.extra_sum.get(s.id, 0) + extra.double().sum(0)
        for key in {views[s.id][0] for s in specs}:
            xs = flat[key]
            g = sums.grams[key]
            g[:-1, :-1] += xs.T @ xs
            colsum = xs.sum(0)
            g[:-1, -1] += colsum
            g[-1, :-1] += colsum
            g[-1, -1] += xs.shape[0]
            sums.count[key] += xs.shape[0]
        for key in {views[s.id][1] for s in specs}:
            ys = flat[key]
            sums.y_sq[key] += (ys * ys).sum()
            sums.y_sum[key] += ys.sum(0)
        sums.images += x.shape[0]
    net.train(was_training)
    if not sums.grams:
        raise ValueError("least-squares fit got no images")
    return sums


def _r2(sol: Tensor, sums: _Sums, view: tuple, sid: str) -> tuple[float, Tensor]:
    """R² of the bias-augmented solution ``sol`` (D+1, E) on the images ``sums`` came from, and the
    per-channel sums of squares of the fitted values. From the sums alone:
    RSS = ||Y||^2 - 2 tr(S^T C) + tr(S^T G S), TSS = ||Y||^2 - ||sum Y||^2 / n."""
    xk, yk = view[0], view[1]
    g, c, n = sums.grams[xk], sums.crosses[sid], sums.count[xk]
    fitted_sq = torch.einsum("ie,ij,je->e", sol, g, sol)  # per channel sum of (Xa s_e)^2
    rss = sums.y_sq[yk] - 2 * (sol * c).sum() + fitted_sq.sum()
    tss = sums.y_sq[yk] - (sums.y_sum[yk] ** 2).sum() / n
    return (float(1 - rss / tss) if tss > 0 else float("nan")), fitted_sq


def least_squares_init(
    net: StitchNet,
    batches: Iterable[Tensor],
    ids: Iterable[str] | None = None,
    ridge: float = DEFAULT_RIDGE,
) -> dict[str, FitReport]:
    """Fit every listed stitch layer (default: all) on the images in ``batches``, in one pass.

    ``batches`` yields image tensors already on the net's device. Returns a :class:`FitReport` per
    stitch. Anchor weights are not changed. A bridged stitch is fitted on the bridged source rows,
    and its learned prefix tokens are set to the target's mean values there.
    """
    specs = [net.specs[i] for i in (net.stitch_ids if ids is None else ids)]
    views = {s.id: _views(net, s) for s in specs}
    sums = _accumulate(net, batches, specs, views)
    return {s.id: _solve_one(net, s, views[s.id], sums, ridge) for s in specs}


def least_squares_r2(
    net: StitchNet,
    fit_batches: Iterable[Tensor],
    test_batches: Iterable[Tensor],
    ids: Iterable[str] | None = None,
    ridge: float = DEFAULT_RIDGE,
) -> dict[str, float]:
    """R² on ``test_batches`` of each listed stitch's least-squares fit on ``fit_batches`` (the same
    ridge problem :func:`least_squares_init` solves), every stitch in one pass over each set of images.
    Nothing in ``net`` changes. 1 = the target's representation is a linear map of the source's;
    held out, R² can fall below 0."""
    specs = [net.specs[i] for i in (net.stitch_ids if ids is None else ids)]
    views = {s.id: _views(net, s) for s in specs}
    fit, test = _accumulate(net, fit_batches, specs, views), _accumulate(net, test_batches, specs, views)
    out = {}
    for s in specs:
        w, b = solve_ridge(fit.grams[views[s.id][0]], fit.crosses[s.id], ridge)
        out[s.id] = _r2(torch.cat([w.T, b[None]], 0), test, views[s.id], s.id)[0]
    return out


def _solve_one(net: StitchNet, s, view: tuple, sums: _Sums, ridge: float) -> FitReport:
    """Solve one stitch's system from the accumulated sums and set its layer (and learned tokens)."""
    w, b = solve_ridge(sums.grams[view[0]], sums.crosses[s.id], ridge)
    r2, fitted_sq = _r2(torch.cat([w.T, b[None]], 0), sums, view, s.id)
    n = sums.count[view[0]]
    extra_sum = sums.extra_sum.get(s.id)
    report = FitReport(samples=n, r2=r2)
    layer = net.stitch_layer(s.id)
    if isinstance(layer, BridgedStitch):
        if extra_sum is not None:
            layer.bridge.extra.data.copy_((extra_sum / sums.images).to(layer.bridge.extra.dtype))
        layer = layer.layer
    dtype = next(layer.parameters()).dtype
    if isinstance(layer, (LinearStitch, LoRAStitch)):
        layer.set_affine(w.to(dtype), b.to(dtype))
    elif isinstance(layer, MLPStitch):
        shift = MLP_SHIFT_RMS * (fitted_sq / n).clamp_min(0).sqrt()
        layer.set_affine(w.to(dtype), b.to(dtype), shift.to(dtype))
    else:  # pragma: no cover - make_stitch_layer only builds these kinds
        raise TypeError(f"cannot least-squares-initialise {type(layer).__name__}")
    return report
