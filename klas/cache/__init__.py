"""Stage 1: per-block pooled features and logits of k models on the calibration splits."""
from klas.cache.reader import Cache, open_cache
from klas.cache.writer import CacheSummary, build_cache, check_cache, feature_columns, pooled_forward

__all__ = ["Cache", "CacheSummary", "build_cache", "check_cache", "feature_columns", "open_cache", "pooled_forward"]
