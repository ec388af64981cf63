"""How close a cache's stored features are to the same models recomputed elsewhere.

``klas cache --amp bf16`` on a GPU stores features computed in bfloat16; :func:`recompute` runs the
cache's own models (same weights, checked by hash; same preprocessing) over some rows of a split on
another device or in another precision, and :func:`feature_agreement` measures how far the stored
rows are from that reference, per model: the worst relative error ``||stored - ref|| / ||ref||`` over
its representations (each pooled column block of ``features.npy``) and its logits.

:data:`BF16_TOLERANCE` is what the bf16 cache is held to against full precision. bfloat16 keeps 8
significant bits (a relative rounding error of at most 2^-9 = 0.2 % per matmul input); each block
adds errors of that order to its output, and they accumulate over 12-24 blocks to around 1 %; the
float16 storage adds 0.05 %. 5 % leaves room for that and still fails a real fault (another
normalisation, a block run twice or skipped, rows written in another order), which moves features by
tens of percent or more.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from klas.cache.reader import Cache
from klas.cache.writer import pooled_forward
from klas.fs import DEFAULT_ROOT
from klas.optim import autocast, parse_amp
from klas.utils import resolve_device

#: Worst relative error bf16 cache features may have against full precision (module docstring).
BF16_TOLERANCE = 0.05


def recompute(cache: Cache, split: str, rows: Sequence[int], *, device: str | torch.device | None = "cpu",
              amp: str | None = None, batch_size: int = 64, root: Path = DEFAULT_ROOT) -> dict[str, dict[str, np.ndarray]]:
    """``{model: {"features": (len(rows), F), "logits": (len(rows), C)}}`` in float32: rows ``rows`` of
    ``split`` run through the cache's models on ``device`` with ``--amp`` word ``amp`` (None: full precision)."""
    dev = resolve_device(device) if not isinstance(device, torch.device) else device
    dtype = parse_amp(amp, dev)
    models = cache.load_models(device=dev, root=root)
    data = torch.utils.data.Subset(cache.dataset(split, root=root), list(rows))
    out: dict[str, dict[str, list]] = {m.name: {"features": [], "logits": []} for m in models}
    for x, _, _ in torch.utils.data.DataLoader(data, batch_size=batch_size):
        x = x.to(dev)
        for m in models:
            with autocast(dev, dtype):
                f, lg = pooled_forward(m.adapter, x)
            out[m.name]["features"].append(f.cpu().numpy())
            out[m.name]["logits"].append(lg.cpu().numpy())
    return {name: {k: np.concatenate(v).astype(np.float32) for k, v in d.items()} for name, d in out.items()}


def _relative_error(stored: np.ndarray, ref: np.ndarray) -> float:
    ref64 = ref.astype(np.float64)
    scale = float(np.linalg.norm(ref64))
    return float(np.linalg.norm(stored.astype(np.float64) - ref64)) / max(scale, 1e-30)


def feature_agreement(cache: Cache, split: str, rows: Sequence[int],
                      reference: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, float]]:
    """Per model of ``reference`` (:func:`recompute`'s result for the same ``rows``): ``features``, the worst
    relative error over its representations and pools, and ``logits``, the relative error of its logits."""
    rows = list(rows)
    report = {}
    for name, ref in reference.items():
        stored = np.asarray(cache.features(split, name)[rows], dtype=np.float32)
        worst = max(_relative_error(stored[:, a:b], ref["features"][:, a:b])
                    for entry in cache.model(name)["columns"] for a, b in entry.values())
        logits = np.asarray(cache.logits(split, name)[rows], dtype=np.float32)
        report[name] = {"features": worst, "logits": _relative_error(logits, ref["logits"])}
    return report


__all__ = ["BF16_TOLERANCE", "feature_agreement", "recompute"]
