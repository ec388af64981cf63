"""Calibration data: the built-in ``digits`` set or an ImageFolder directory, split three ways.

``open_source`` opens ``--data``, ``make_splits`` cuts it into probe-train / score / eval, and
``build_transform`` + ``SplitDataset`` / ``load_split_tensors`` preprocess a split for one timm model.
"""
from klas.data.digits import DigitsConfig, DigitsSource, generate_digits
from klas.data.folder import IMG_EXTENSIONS, FolderSource
from klas.data.loading import make_loader, pin_memory, resolve_workers
from klas.data.source import SPLITS, ImageSource, open_source
from klas.data.splits import Split, make_splits
from klas.data.transforms import SplitDataset, build_transform, load_split_tensors

__all__ = [
    "SPLITS",
    "ImageSource",
    "open_source",
    "Split",
    "make_splits",
    "build_transform",
    "SplitDataset",
    "load_split_tensors",
    "make_loader",
    "pin_memory",
    "resolve_workers",
    "DigitsConfig",
    "DigitsSource",
    "generate_digits",
    "FolderSource",
    "IMG_EXTENSIONS",
]
