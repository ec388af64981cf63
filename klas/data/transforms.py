"""Model-specific preprocessing of a split: timm eval transforms, a Dataset, and an in-memory loader."""
from __future__ import annotations

from typing import Any, Callable

import torch
from PIL import Image

from klas.data.source import ImageSource
from klas.data.splits import Split
from klas.errors import KlasError

#: timm ``create_transform`` arguments taken from a data config; missing optional ones use timm's defaults.
_TRANSFORM_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


def build_transform(data_config: dict[str, Any]) -> Callable[[Image.Image], torch.Tensor]:
    """The eval transform a timm model expects: resize, centre crop, to tensor, normalise.

    ``data_config`` is a timm data config (``timm.data.resolve_data_config`` / ``resolve_model_data_config``):
    ``input_size``, ``mean`` and ``std`` are required; ``interpolation`` (default ``'bilinear'``),
    ``crop_pct`` (default 0.875) and ``crop_mode`` (default ``'center'``) follow timm's defaults.
    """
    from timm.data import create_transform

    missing = [k for k in ("input_size", "mean", "std") if data_config.get(k) is None]
    if missing:
        raise KlasError(f"model data config lacks {', '.join(missing)}; cannot build its preprocessing")
    kwargs = {k: data_config[k] for k in _TRANSFORM_KEYS if data_config.get(k) is not None}
    kwargs["input_size"] = tuple(kwargs["input_size"])
    return create_transform(**kwargs, is_training=False)


class SplitDataset(torch.utils.data.Dataset):
    """Item ``i`` of a split: ``(transform(image), label, sample id)``; images are decoded on access."""

    def __init__(self, source: ImageSource, split: Split, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.source, self.split, self.transform = source, split, transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        idx = int(self.split.ids[i])
        return self.transform(self.source.load(idx)), int(self.split.labels[i]), idx


def load_split_tensors(
    source: ImageSource, split: Split, transform: Callable[[Image.Image], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A whole split preprocessed into memory: x (N, C, H, W) float32, labels (N,) int64, ids (N,) int64.

    Meant for small sets (the digits zoo, tests); large folders should stream through :class:`SplitDataset`.
    """
    ds = SplitDataset(source, split, transform)
    if len(ds) == 0:
        raise KlasError(f"split {split.name!r} of {source.name!r} is empty; nothing to load")
    first = ds[0][0]
    x = torch.empty((len(ds), *first.shape), dtype=first.dtype)  # (N, C, H, W)
    x[0] = first
    for i in range(1, len(ds)):
        x[i] = ds[i][0]
    labels = torch.from_numpy(split.labels.astype("int64", copy=True))
    ids = torch.from_numpy(split.ids.astype("int64", copy=True))
    return x, labels, ids
