"""The least-squares stitch score: how much of the target's representation a linear map of the source's
explains, measured on the score split.

For a stitch ``(a, i) -> (b, j)``, ``klas train`` initialises the stitch layer with the ridge
least-squares fit of representation j of b on representation i of a (:mod:`klas.stitch.init`, every
position a sample; through a bridge when the layouts differ). The score is that fit's relative
residual on other images, ``1 - R²``: fitted on ``fit_images`` seeded probe-train images (the init's
problem, the init's size), R² measured on ``score_images`` seeded images of the score split. Lower
is better, like Γ (R² = 1: b's representation at j is a linear function of a's at i; ``1 - R²`` can
exceed 1 held out). All candidates are fitted in one pass over each set of images: every anchor runs
once per batch, ``X^T X`` is shared by the stitches leaving the same representation
(:func:`klas.stitch.init.least_squares_r2`).

Unlike Θ and CKA (cached pooled features) this runs the models, as ``klas train``'s init does; the
eval split is never read.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from klas.stitch.candidates import Candidate
from klas.stitch.init import DEFAULT_INIT_IMAGES, DEFAULT_RIDGE, least_squares_r2
from klas.stitch.network import StitchNet, StitchSpec
from klas.utils import DEFAULT_ROOT, resolve_device

#: Probe-train images each stitch is fitted on: ``klas train``'s least-squares init's number.
LS_FIT_IMAGES = DEFAULT_INIT_IMAGES
#: Score-split images the fit's R² is measured on.
LS_SCORE_IMAGES = 1024


def _images(cache, split: str, count: int, seed: int, batch_size: int, root: Path,
            device: torch.device) -> Iterator[torch.Tensor]:
    """Batches of ``count`` seeded images of ``split`` (all when it has fewer), in split order."""
    ds = cache.dataset(split, root=root)
    n = len(ds)
    pick = np.arange(n) if count >= n else np.sort(np.random.default_rng(seed).choice(n, size=count, replace=False))
    for s in range(0, len(pick), batch_size):
        yield torch.stack([ds[int(i)][0] for i in pick[s:s + batch_size]]).to(device)


def ls_residual(cache, stitches: Sequence[Candidate], *, seed: int = 0, fit_images: int = LS_FIT_IMAGES,
                score_images: int = LS_SCORE_IMAGES, ridge: float = DEFAULT_RIDGE, batch_size: int = 64,
                device: str | torch.device | None = None, root: Path = DEFAULT_ROOT) -> np.ndarray:
    """``1 - R²`` of every candidate's least-squares fit (module docstring), aligned with ``stitches``;
    nan where the target's representation is constant on the score images."""
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    specs = [StitchSpec(id=c.id, src=c.src, src_cut=c.src_cut, dst=c.dst, dst_cut=c.dst_cut) for c in stitches]
    net = StitchNet.from_loaded(cache.load_models(device=dev, root=root), specs).to(dev)
    r2 = least_squares_r2(net, _images(cache, "probe-train", fit_images, seed, batch_size, root, dev),
                          _images(cache, "score", score_images, seed + 1, batch_size, root, dev), ridge=ridge)
    return np.array([1.0 - r2[c.id] for c in stitches], dtype=np.float64)


__all__ = ["LS_FIT_IMAGES", "LS_SCORE_IMAGES", "ls_residual"]
