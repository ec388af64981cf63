"""Stage 1: per-block pooled features and logits of k models on the calibration splits.

This stage turns ``--model`` names into models, so it is where the demo family joins in: importing
:mod:`klas.zoo` registers its timm names and its local weights with :mod:`klas.models`, which itself
knows nothing of the zoo.
"""
import klas.zoo  # noqa: F401  the demo family: timm names + weights source
from klas.cache.reader import Cache, open_cache
from klas.cache.writer import (
    CacheSummary, build_cache, check_cache, feature_columns, measure_cache_latency, pooled_forward,
)

__all__ = ["Cache", "CacheSummary", "build_cache", "check_cache", "feature_columns", "measure_cache_latency", "open_cache",
           "pooled_forward"]
