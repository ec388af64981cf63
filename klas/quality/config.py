"""``QualityConfig``: sizes of one quality run (the training recipe is ``klas train``'s, TrainConfig defaults),
and the benchmark's model families (:data:`QUALITY_FAMILIES`)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from klas.errors import KlasError
from klas.stitch.candidates import DIRECTIONS
from klas.train import TrainConfig
from klas.zoo import BENCH_FAMILIES, FAMILIES

_RECIPE = TrainConfig()


@dataclass(frozen=True)
class QualityFamily:
    """The models of one benchmark family, which pairs are stitched (``klas search --direction``) and how
    long its runs train: ``length`` times ``klas train``'s default length (:meth:`QualityConfig.steps_per_route`).
    A family whose ground truth does not beat its original anchors at ``klas train``'s length is lengthened
    (a run that short compares networks nobody would keep)."""

    models: tuple[str, ...]
    direction: str = "up"
    length: int = 1

    def __post_init__(self) -> None:
        if len(self.models) < 2:
            raise KlasError(f"a quality family needs at least two models, got {list(self.models)}")
        if self.direction not in DIRECTIONS:
            raise KlasError(f"unknown direction {self.direction!r}; use one of {', '.join(DIRECTIONS)}")
        if not isinstance(self.length, int) or self.length < 1:
            raise KlasError(f"a quality family's length must be a positive integer (x klas train's), got {self.length!r}")


#: The families ``benchmarks/bench_quality.py`` runs by default, one after another: the demo ViT trio,
#: ViTs of unequal depths and widths, the ResNet pair, and a ViT and a ResNet stitched both ways
#: through bridges (the heterogeneous pair the README advertises). The demo trio trains twice ``klas
#: train``'s length, and so does the ResNet pair: at 1x their ground truths' fronts did not beat the
#: original anchors (HV 0.230 vs 0.278; 0 vs 0), 2026-12-03 (README, "Does it work?").
QUALITY_FAMILIES: dict[str, QualityFamily] = {
    "vit": QualityFamily(FAMILIES["vit"], length=2),
    "vit-depth": QualityFamily(BENCH_FAMILIES["vit-depth"]),
    "cnn": QualityFamily(FAMILIES["cnn"], length=2),
    "hetero": QualityFamily(("klas_vit_s", "klas_resnet_l"), "both"),
}


@dataclass(frozen=True)
class QualityConfig:
    """Sizes and recipe of one quality run (``benchmarks/bench_quality.py``; ``--quick`` shrinks them).

    The recipe fields default to ``klas train``'s (:class:`klas.train.TrainConfig`): batch 64, AdamW at
    lr 3e-3 on the stitch layers and 0.1x that on the anchors (fine-tuned, sampled as routes), weight
    decay 0.05 on matrices, 10 % warm-up then cosine, CE, least-squares init on 100 images. So is the
    length: with ``route_steps=None`` every network (a stitch or an anchor) gets, on average, the steps
    ``klas train``'s ``epochs`` give a selection of the family's K stitches plus its A anchors
    (:meth:`steps_per_route`; the demo's 22 + 3 on all of digits: 5 x 135 / 25 = 27), and a run over R
    routes takes R times that. ``gt_seeds``: the ground truth is trained once per seed (data order and
    least-squares images), the first is the reference, the second measures the ceiling.
    """

    limit: int | None = None  # images per split (probe-train, score, eval); None: the whole digits splits
    eval_limit: int | None = None  # ground truth / selections evaluated on the first N images of score and eval
    route_steps: int | None = None  # steps per route on average; None: klas train's epochs at K (steps_per_route)
    epochs: int = _RECIPE.epochs
    batch_size: int = _RECIPE.batch_size
    lr: float = _RECIPE.lr
    anchor_lr_scale: float = _RECIPE.anchor_lr_scale
    weight_decay: float = _RECIPE.weight_decay
    warmup: float = _RECIPE.warmup
    init_images: int = _RECIPE.init_images
    buckets: int = 20
    tau: float = 0.05
    probe_epochs: int = 10
    gt_seeds: tuple[int, ...] = (0, 1)
    random_seeds: tuple[int, ...] = (0, 1, 2)
    train_margin: float = 0.05  # a signal within this of the best score-split in-range ρ is trained too
    ls_score_images: int = 1024  # score-split images the least-squares signal's R² is measured on
    seed: int = 0
    eval_batch_size: int = 128
    eval_chunk_images: int = 512
    bootstrap: int = 500
    variants: bool = True  # also score every Γ variant (klas.quality.variants) against the ground truth
    random_init: bool = False  # untrained models (tests / development only)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "init_images", "buckets", "probe_epochs", "eval_batch_size",
                     "ls_score_images"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise KlasError(f"quality config {name} must be a positive integer, got {v!r}")
        for name in ("limit", "eval_limit", "route_steps"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise KlasError(f"quality config {name} must be a positive integer or None, got {v!r}")
        if not self.gt_seeds or len(set(self.gt_seeds)) != len(self.gt_seeds):
            raise KlasError(f"quality config gt_seeds must be distinct seeds, at least one, got {self.gt_seeds!r}")
        if not self.random_seeds:
            raise KlasError("quality config random_seeds must hold at least one seed")
        if not (self.train_margin >= 0 and math.isfinite(self.train_margin)):
            raise KlasError(f"quality config train_margin must be >= 0, got {self.train_margin!r}")

    def steps_per_route(self, train_images: int, k: int, anchors: int, length: int = 1) -> int:
        """``route_steps``, or when None ``length`` times what ``klas train``'s defaults give a selection of
        ``k`` stitches and ``anchors`` anchors: ``epochs * ceil(train_images / batch_size)`` steps over
        k + anchors routes, rounded (at least 1)."""
        if self.route_steps is not None:
            return self.route_steps
        total = length * self.epochs * math.ceil(train_images / self.batch_size)
        return max(1, round(total / max(1, k + anchors)))


__all__ = ["QUALITY_FAMILIES", "QualityConfig", "QualityFamily"]
