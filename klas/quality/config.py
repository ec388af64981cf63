"""``QualityConfig``: sizes of one quality run; the training recipe is ``klas train``'s (TrainConfig defaults)."""
from __future__ import annotations

from dataclasses import dataclass

from klas.errors import KlasError
from klas.train import TrainConfig

_RECIPE = TrainConfig()


@dataclass(frozen=True)
class QualityConfig:
    """Sizes and recipe of one quality run (``benchmarks/bench_quality.py``; ``--quick`` shrinks them).

    The recipe fields default to ``klas train``'s (:class:`klas.train.TrainConfig`): batch 64, AdamW at
    lr 3e-3 on the stitch layers and 0.1x that on the anchors (fine-tuned, sampled as routes), weight
    decay 0.05 on matrices, 10 % warm-up then cosine, CE, least-squares init on 100 images. Scaled down
    is the length: every network (a stitch or an anchor) gets ``route_steps`` steps on average, i.e. a
    run over R routes takes R * route_steps steps (``klas train``'s 5 epochs of digits give a 22-stitch
    selection plus 3 anchors 675 / 25 = 27 each).
    """

    limit: int | None = None  # images per split (probe-train, score, eval); None: the whole digits splits
    eval_limit: int | None = None  # ground truth / selections evaluated on the first N images of score and eval
    route_steps: int = 24  # steps per route (stitch or anchor) on average, in every training run
    batch_size: int = _RECIPE.batch_size
    lr: float = _RECIPE.lr
    anchor_lr_scale: float = _RECIPE.anchor_lr_scale
    weight_decay: float = _RECIPE.weight_decay
    warmup: float = _RECIPE.warmup
    init_images: int = _RECIPE.init_images
    buckets: int = 20
    tau: float = 0.05
    probe_epochs: int = 10
    random_seeds: tuple[int, ...] = (0, 1, 2)
    seed: int = 0
    eval_batch_size: int = 128
    eval_chunk_images: int = 512
    bootstrap: int = 500
    variants: bool = True  # also score every Γ variant (klas.quality.variants) against the ground truth
    random_init: bool = False  # untrained models (tests / development only)

    def __post_init__(self) -> None:
        for name in ("route_steps", "batch_size", "init_images", "buckets", "probe_epochs", "eval_batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise KlasError(f"quality config {name} must be a positive integer, got {v!r}")
        for name in ("limit", "eval_limit"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise KlasError(f"quality config {name} must be a positive integer or None, got {v!r}")


__all__ = ["QualityConfig"]
