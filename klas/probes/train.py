"""Train all P linear probes at once: one baddbmm per step over a (P, B, Dmax) padded batch.

Recipe (defaults of :func:`train_probes`). Chosen on synthetic Gaussian-class features (1,500
samples x 10 classes and 10,000 x 100, widths 64-768, a hard, a medium and an easy probe each):
held-out accuracy within ~1-4 points and held-out NLL within ~0.1-0.2 nats of the best of
sklearn's LogisticRegression over C in {0.01, 0.1, 1}; lr 1e-3 under-converged, 1e-2 overfit
the hard probes.

* features standardised per probe and column with mean/std fitted on the training features
  (float64, one streamed pass), so one learning rate suits every block of every model; each
  mini-batch is standardised in float32 and rounded once through the storage dtype (float16 for
  the cache: the re-rounding of N(0, 1) values is far below the cache's own float16 rounding of
  the raw features), exactly the values the earlier all-in-memory trainer used;
* weights and biases start at exactly 0: the problem is convex, and zero init makes each probe's
  trajectory independent of the others, so batching cannot change the result;
* AdamW (betas 0.9/0.999), lr 3e-3, weight decay 1e-4 on weights only (not biases), 5% linear
  warm-up then cosine decay to 0, batch 256, 10 epochs but at least 300 optimizer steps (a
  small calibration set, e.g. 1,500 images, would otherwise stop after ~60 steps, before the
  probes' confidence -- which the KL criterion compares -- has converged; Adam moves each weight
  by at most ~lr per step); one seeded permutation per epoch, shared by all probes;
* loss = sum over probes of each probe's mean cross-entropy, so each probe's gradient is exactly
  what it would get trained alone (AdamW is element-wise, so its update is too).

Padded weight rows see exactly-zero inputs, hence exactly-zero gradients and updates; they are
also re-masked after every step so they are 0 by construction, not only by arithmetic.

Streaming: features are never held whole. Every step gathers its B rows (the same seeded
permutation as before) from the given arrays -- typically the cache's memory-mapped float16
views -- pads them to Dmax, standardises and runs the batched step, so results are those of
the earlier in-memory trainer while memory is flat in N: weights, gradients and AdamW state
4*P*(Dmax+1)*C*4 bytes plus one step's working set ~P*B*(3*Dmax+5*C)*4. Soft targets are read
the same way, B rows per step, from whatever (G, N, C) array the caller holds.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from klas.errors import KlasError
from klas.optim import warmup_cosine, warmup_steps_of
from klas.probes._features import (
    ROW_CHUNK,
    FeatureArray,
    check_features,
    check_fits,
    feature_mask,
    gather_rows,
    iter_row_chunks,
    moments,
    release_pages,
    standardise,
    storage_dtype,
)
from klas.probes.bank import ProbeBank
from klas.utils import resolve_device

DEFAULT_EPOCHS = 10
DEFAULT_BATCH_SIZE = 256
DEFAULT_LR = 3e-3
DEFAULT_WEIGHT_DECAY = 1e-4
DEFAULT_MIN_STEPS = 300
WARMUP_FRACTION = 0.05
__all__ = [
    "SoftmaxTargets",
    "train_probes",
    "training_bytes",
    "DEFAULT_EPOCHS",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_LR",
    "DEFAULT_WEIGHT_DECAY",
    "DEFAULT_MIN_STEPS",
]


class SoftmaxTargets:
    """Soft targets (G, N, C) read as the softmax of G stored logit arrays, one batch of rows at a time.

    ``logits``: G arrays (N, C) each, e.g. the cache's memory-mapped float16 logits of G models. Row
    ``i`` of group ``g`` is ``softmax(float32(logits[g][i]))``, exactly what a whole-array softmax
    gives, so "model" probe targets never hold (G, N, C) probabilities in memory.
    """

    def __init__(self, logits: Sequence[np.ndarray]) -> None:
        if not logits:
            raise KlasError("SoftmaxTargets needs at least one logits array")
        shapes = {tuple(a.shape) for a in logits}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise KlasError(f"SoftmaxTargets needs (N, C) logits of one shape, got {sorted(shapes)}")
        self.arrays = list(logits)
        self.shape = (len(self.arrays), *self.arrays[0].shape)
        self.ndim = 3

    def rows(self, idx: np.ndarray) -> Tensor:
        """(G, B, C) float32 probabilities of rows ``idx``."""
        z = np.stack([np.asarray(a[idx], dtype=np.float32) for a in self.arrays])
        return torch.softmax(torch.from_numpy(z), dim=-1)


def train_probes(
    feats: Sequence[FeatureArray],
    targets: np.ndarray | Tensor,
    num_classes: int,
    *,
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = DEFAULT_LR,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: Callable[[int, int], None] | None = None,
    target_index: Sequence[int] | Tensor | None = None,
    min_steps: int = DEFAULT_MIN_STEPS,
) -> ProbeBank:
    """Train P linear probes (feature -> class logits) together and return them as a :class:`ProbeBank`.

    ``targets`` picks the mode: (N,) int labels -> cross-entropy ("labels" mode); (N, C)
    probabilities -> soft cross-entropy shared by all probes; (G, N, C) probabilities (an array or
    :class:`SoftmaxTargets`, streamed from stored logits) with
    ``target_index`` (P,) naming each probe's row in G -> soft cross-entropy per group ("model"
    mode, each model's probes fitting that model's own softmax; G == P needs no index).
    Runs ``max(epochs, ceil(min_steps / steps_per_epoch))`` epochs (``min_steps=0``: exactly
    ``epochs``). Deterministic given ``seed`` on one device.
    """
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    n, dims = check_features(feats, "probe features")
    _check_hparams(epochs, batch_size, lr, weight_decay, num_classes)
    tgt, groups = _prepare_targets(targets, n, num_classes, len(dims), target_index, dev)
    p, dmax = len(dims), max(dims)
    check_fits(training_bytes(p, dmax, num_classes, min(batch_size, n)), dev, "probe training (weights, optimiser state, one batch)")

    mean, std = moments(feats, dev)  # (P, Dmax) each, one streamed pass
    inv_std, dtype = std.reciprocal(), storage_dtype(feats)
    mask = feature_mask(dims, dmax, dev).unsqueeze(-1).float()  # (P, Dmax, 1)
    weight = torch.zeros(p, dmax, num_classes, device=dev, requires_grad=True)  # (P, Dmax, C)
    bias = torch.zeros(p, num_classes, device=dev, requires_grad=True)  # (P, C)
    opt = torch.optim.AdamW(
        [{"params": [weight], "weight_decay": weight_decay}, {"params": [bias], "weight_decay": 0.0}], lr=lr
    )
    steps_per_epoch = math.ceil(n / batch_size)
    epochs = max(epochs, math.ceil(max(0, min_steps) / steps_per_epoch))
    total = epochs * steps_per_epoch
    warm = warmup_steps_of(WARMUP_FRACTION, total)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, total, warm))

    gen = torch.Generator().manual_seed(seed)
    mapped = [*feats, *_mapped_targets(tgt)]  # what release_pages may trim
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)  # (N,) shared by all probes, on the CPU
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]  # (B,)
            xb = standardise(gather_rows(feats, idx.numpy(), dmax, dev, torch.float32), mean, inv_std, dtype)
            logits = torch.baddbmm(bias[:, None], xb, weight)  # (P, B, C)
            loss = _loss(logits, _batch_targets(tgt, idx, dev), groups)
            release_pages(mapped)  # unmap this batch's pages before backward and AdamW peak
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                weight.mul_(mask)
            step += 1
            if progress is not None:
                progress(step, total)

    return ProbeBank(
        weight=weight.detach(),
        bias=bias.detach(),
        mean=mean,
        std=std,
        dims=torch.tensor(dims, dtype=torch.int64, device=dev),
    )


def _mapped_targets(tgt: object) -> list[np.ndarray]:
    """The target arrays a step reads from disk (their pages are released like the features')."""
    if isinstance(tgt, SoftmaxTargets):
        return list(tgt.arrays)
    return [tgt] if isinstance(tgt, np.ndarray) else []


def training_bytes(num_probes: int, dmax: int, num_classes: int, batch: int) -> int:
    """Device bytes the trainer needs, independent of N: parameters, their gradients and two AdamW
    moments (4*P*(Dmax+1)*C float32), plus one step's batch (raw and standardised, P*B*Dmax each)
    and logits-sized tensors (logits, log-softmax, their gradients, soft targets: ~5*P*B*C)."""
    params = 4 * num_probes * (dmax + 1) * num_classes
    step = num_probes * batch * (3 * dmax + 5 * num_classes)
    return 4 * (params + step)


def _batch_targets(tgt: "Tensor | np.ndarray | SoftmaxTargets", idx: Tensor, dev: torch.device) -> Tensor:
    """This step's targets: labels (B,) int64, or probabilities (G, B, C) float32, on ``dev``."""
    if isinstance(tgt, Tensor) and tgt.dtype == torch.int64:  # labels, kept whole on the device (8 bytes a row)
        return tgt.index_select(0, idx.to(tgt.device))
    if isinstance(tgt, SoftmaxTargets):
        rows = tgt.rows(idx.numpy())
    elif isinstance(tgt, Tensor):
        rows = tgt.index_select(1, idx.to(tgt.device))
    else:
        rows = torch.from_numpy(np.ascontiguousarray(tgt[:, idx.numpy()]))
    return rows.to(device=dev).float()


def _loss(logits: Tensor, tgt: Tensor, groups: Tensor | None) -> Tensor:
    """Sum over probes of each probe's batch-mean (soft) cross-entropy; logits (P, B, C), tgt (B,) or (G, B, C)."""
    p, b, c = logits.shape
    if tgt.dtype == torch.int64:  # hard labels (B,)
        y = tgt.repeat(p)  # (P*B,) probe-major, matching logits.reshape
        return F.cross_entropy(logits.reshape(p * b, c), y, reduction="sum") / b
    q = tgt  # (G, B, C)
    if groups is not None:
        q = q.index_select(0, groups)  # (P, B, C)
    return -(q * F.log_softmax(logits, dim=-1)).sum() / b


def _check_hparams(epochs: int, batch_size: int, lr: float, weight_decay: float, num_classes: int) -> None:
    if epochs < 1 or batch_size < 1:
        raise KlasError(f"probe training needs epochs >= 1 and batch size >= 1 (got {epochs}, {batch_size})")
    if not (lr > 0 and weight_decay >= 0):
        raise KlasError(f"probe learning rate must be > 0 and weight decay >= 0 (got {lr}, {weight_decay})")
    if num_classes < 2:
        raise KlasError(f"probes need at least 2 classes (got {num_classes})")


def _prepare_targets(
    targets: np.ndarray | Tensor,
    n: int,
    num_classes: int,
    num_probes: int,
    target_index: Sequence[int] | Tensor | None,
    dev: torch.device,
) -> tuple[Tensor | np.ndarray, Tensor | None]:
    """Validate targets; return (labels (N,) int64 on ``dev`` | probabilities (G, N, C) left where
    the caller holds them, read B rows per step; group index (P,) or None)."""
    if isinstance(targets, SoftmaxTargets):
        if targets.shape[1:] != (n, num_classes):
            raise KlasError(f"softmax targets have shape {targets.shape}; expected (groups, {n}, {num_classes})")
        return targets, _prepare_groups(target_index, targets.shape[0], num_probes, dev)
    t = targets if isinstance(targets, Tensor) else np.asarray(targets)
    if t.ndim == 1:
        t = t if isinstance(t, Tensor) else torch.from_numpy(np.array(t))  # a small writable copy
        return _prepare_labels(t, n, num_classes, dev), None
    if t.ndim == 2:
        t = t[None]  # (1, N, C): one target distribution for every probe
        if target_index is not None:
            raise KlasError("target_index only applies to per-group (G, N, C) soft targets")
        target_index = [0] * num_probes
    if t.ndim != 3 or t.shape[1] != n or t.shape[2] != num_classes:
        raise KlasError(
            f"targets have shape {tuple(t.shape)}; expected ({n},) labels, ({n}, {num_classes}) "
            f"or (groups, {n}, {num_classes}) probabilities"
        )
    groups = _prepare_groups(target_index, t.shape[0], num_probes, dev)
    _check_probs(t)
    return t, groups


def _prepare_labels(t: Tensor, n: int, num_classes: int, dev: torch.device) -> Tensor:
    if t.numel() != n:
        raise KlasError(f"got {t.numel()} labels for {n} feature rows")
    if t.is_floating_point():
        raise KlasError("1-D targets must be integer class labels")
    t = t.long()
    if n and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        raise KlasError(f"labels must lie in [0, {num_classes}); got range [{int(t.min())}, {int(t.max())}]")
    return t.to(dev)


def _prepare_groups(index: Sequence[int] | Tensor | None, g: int, num_probes: int, dev: torch.device) -> Tensor | None:
    if index is None:
        if g != num_probes:
            raise KlasError(f"{g} target groups for {num_probes} probes: pass target_index (probe -> group)")
        return None
    idx = torch.as_tensor(index, dtype=torch.int64).view(-1)
    if idx.numel() != num_probes or (idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= g)):
        raise KlasError(f"target_index must give one group in [0, {g}) for each of the {num_probes} probes")
    return idx.to(dev)


def _check_probs(t: Tensor | np.ndarray) -> None:
    """Soft targets (G, N, C) must be distributions: checked ROW_CHUNK rows at a time, as the trainer reads them."""
    floating = t.is_floating_point() if isinstance(t, Tensor) else np.issubdtype(t.dtype, np.floating)
    if not floating:
        raise KlasError("2-D/3-D targets must be probabilities (float)")
    for a, b in iter_row_chunks(int(t.shape[1]), ROW_CHUNK):
        q = t[:, a:b] if isinstance(t, Tensor) else torch.from_numpy(np.ascontiguousarray(t[:, a:b]))
        q = q.float()  # (G, b - a, C)
        sums = q.sum(-1)
        if not bool(torch.isfinite(sums).all()) or bool((q < 0).any()) or float((sums - 1).abs().max()) > 1e-2:
            raise KlasError("soft targets must be probabilities (non-negative rows summing to 1), e.g. a softmax, not logits")
    if isinstance(t, np.ndarray):
        release_pages([t])
