"""Per-block linear probes (block feature -> class logits), all trained in one batched computation."""
from klas.probes._features import FeatureArray, check_features
from klas.probes.bank import ProbeBank
from klas.probes.train import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_EPOCHS,
    DEFAULT_LR,
    DEFAULT_MIN_STEPS,
    DEFAULT_WEIGHT_DECAY,
    SoftmaxTargets,
    train_probes,
)

__all__ = [
    "FeatureArray",
    "check_features",
    "ProbeBank",
    "SoftmaxTargets",
    "train_probes",
    "DEFAULT_EPOCHS",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_LR",
    "DEFAULT_MIN_STEPS",
    "DEFAULT_WEIGHT_DECAY",
]
