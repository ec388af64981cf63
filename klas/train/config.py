"""``TrainConfig``: every option of ``klas train``, its documented default, validated once.

The CLI maps its flags one to one onto the fields (``--weight-decay`` -> ``weight_decay``). Fields
marked ``recipe`` decide the trained weights: they are recorded in ``train.json``'s ``config`` (with
``steps_per_epoch``, ``layer`` and ``loss`` resolved), hashed into ``results.parquet``'s metadata, and
must match for ``--resume`` to continue a checkpoint. The rest say how to run (device, I/O, timing).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from klas.config import DEFAULT_LATENCY_BATCH, DEFAULT_LATENCY_REPEATS
from klas.errors import KlasError
from klas.settings import Settings, flag, recipe_field
from klas.fs import DEFAULT_ROOT
from klas.optim import AMP_CHOICES
from klas.stitch.init import DEFAULT_INIT_IMAGES, DEFAULT_RIDGE
from klas.stitch.layers import STITCH_KINDS
from klas.train.data import DEFAULT_PRELOAD_LIMIT_GB
from klas.train.losses import loss_string, parse_loss

SAMPLINGS = ("uniform", "bucket")
#: ``--latency``: which networks klas train times.
LATENCY_MODES = ("front", "all", "off")
#: Images per evaluation batch (klas.train.evaluate streams each anchor through it once).
EVAL_BATCH_SIZE = 256
INITS = ("ls", "random")
TEACHERS = ("target", "largest")


@dataclass(frozen=True)
class TrainConfig(Settings):
    """Options of one training run (``klas train``); every value is checked in ``__post_init__``.

    * ``epochs`` (5): passes over the probe-train split; ``steps_per_epoch`` (None = ceil(N / global batch)).
    * ``batch_size`` (64, per process), ``lr`` (3e-3, AdamW, for stitch layers), ``weight_decay`` (0.05, on
      weight matrices only), ``warmup`` (0.1: fraction of all steps in linear warm-up, then cosine to 0).
    * ``loss`` ("ce"): ``ce``, ``distill`` (KL to a teacher's logits, label-free), ``ffm``
      (MSE to the target model's pre-logits features, label-free), ``lfm`` (MSE between the stitch
      module's output and the target model's own representation at the stitch point, label-free) or
      weighted sums like ``"ce=1,ffm=0.5"``. ``lfm`` compares with the target's representation under the
      net's *current* weights, computed on the same batch and treated as a constant: with frozen anchors
      that is the original model; with ``full_tune`` it is the prefix the target's own suffix is being
      trained on (what the stitch must imitate for that suffix), whereas a frozen copy would pull the
      stitch towards inputs the fine-tuned suffix no longer sees (and would cost a second copy of
      every target plus a second prefix pass). An anchor has no stitch point, hence no ``lfm`` term.
    * ``teacher`` ("target" | "largest"): whose logits ``distill`` matches: each network's own target
      model, or the largest anchor (most MACs) for every network, as SN-Net distils from a stronger
      model. Teachers keep their original weights (their logits are computed once, before training).
    * ``first_loss`` ("ffm") and ``first_epochs`` (0): two stages (Mai et al.: FFM, then the task loss):
      the first ``first_epochs`` epochs train with ``first_loss`` (any ``loss`` spelling, e.g. ``lfm``),
      the rest with ``loss`` (one learning-rate schedule over all epochs). In a stage whose loss gives
      anchors no term (``lfm`` alone) the anchors are not sampled as routes.
    * ``sampling`` ("uniform" | "bucket"): which network each step trains.
    * ``full_tune`` (True): also fine-tune the anchors, at ``anchor_lr_scale`` (0.1) x ``lr`` (SN-Net);
      False trains the stitch layers alone (``--frozen``).
    * ``anchor_routes`` (None = ``full_tune``): the anchors are sampled as routes too (SN-Net: each step
      trains one network drawn from the stitches and the anchors; with ``bucket`` sampling each anchor
      is a bucket of its own). Needs ``full_tune`` (frozen anchors have nothing to train).
    * ``layer`` (None = the selection's, else "linear"): stitch layer kind, "linear", "mlp" or "lora".
    * ``init`` ("ls" | "random"), ``init_images`` (100) and ``ridge`` (1e-4, relative) for the least-squares fit.
    * ``temperature`` (1.0) for ``distill``; ``seed`` (0): every random choice derives from it.
    * ``resume`` (False): continue ``checkpoints/last.pt`` (same selection and recipe required);
      ``overwrite`` (False): start over although a checkpoint exists; ``stop_after`` (None): return after
      this many epochs of this invocation, leaving a checkpoint to resume.
    * ``eval_batch_size`` (EVAL_BATCH_SIZE); ``latency`` ("front": time the networks on the GFLOPs front or
      on the predicted-latency front; "all"; "off"; True / False read as "front" / "off"),
      ``latency_batch`` (1 image), ``latency_repeats`` (5): median ms of that many timed runs, after a
      shared warm-up of the models used (:func:`klas.models.warm_up`), on the device and under the cache's ``--amp`` (the dtype its latency profile
      was measured in, :mod:`klas.stitch.latency`), with the profile's prediction beside it.
    * ``amp`` ("auto": bf16, else fp16, on CUDA, off on CPU; "bf16" / "fp16" on CPU too, through torch's
      CPU autocast; see :func:`klas.optim.parse_amp`),
      ``device`` (None = CUDA when present), ``root`` (klas cache root, for demo weights and data),
      ``preload_limit_gb`` (2.0), ``workers`` (0, DataLoader workers when a split is streamed).
    """

    _what = "training option"

    epochs: int = recipe_field(5)
    steps_per_epoch: int | None = recipe_field(None)
    batch_size: int = recipe_field(64)
    lr: float = recipe_field(3e-3)  # bench_recipe: 3e-3 beat 1e-3 on the score split (HV 0.333 vs 0.308)
    weight_decay: float = recipe_field(0.05)
    warmup: float = recipe_field(0.1)
    loss: str = recipe_field("ce")
    teacher: str = recipe_field("target")
    first_loss: str = recipe_field("ffm")
    first_epochs: int = recipe_field(0)
    sampling: str = recipe_field("uniform")
    # Defaults from benchmarks/bench_recipe.py on the demo ViT family (README "Which training recipe?"):
    # frozen anchors put 0 of 22 stitches on the front, joint training with anchor routes 6.
    full_tune: bool = recipe_field(True)
    anchor_lr_scale: float = recipe_field(0.1)
    anchor_routes: bool | None = recipe_field(None)
    layer: str | None = recipe_field(None)
    init: str = recipe_field("ls")
    init_images: int = recipe_field(DEFAULT_INIT_IMAGES)
    ridge: float = recipe_field(DEFAULT_RIDGE)
    temperature: float = recipe_field(1.0)
    seed: int = recipe_field(0)
    resume: bool = False
    overwrite: bool = False
    stop_after: int | None = None
    eval_batch_size: int = EVAL_BATCH_SIZE
    latency: str = "front"
    latency_batch: int = DEFAULT_LATENCY_BATCH
    latency_repeats: int = DEFAULT_LATENCY_REPEATS
    amp: str = "auto"
    device: str | None = None
    root: Path = DEFAULT_ROOT
    preload_limit_gb: float = DEFAULT_PRELOAD_LIMIT_GB
    workers: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "init_images", "eval_batch_size", "latency_batch", "latency_repeats"):
            self._int(name, minimum=1)
        for name in ("steps_per_epoch", "stop_after"):
            if getattr(self, name) is not None:
                self._int(name, minimum=1)
        self._int("seed", minimum=None)
        self._int("first_epochs", minimum=0)
        if self.first_epochs >= self.epochs:
            raise KlasError(f"--first-epochs ({self.first_epochs}) must be below --epochs ({self.epochs}): "
                            f"the epochs after them train with --loss")
        self._int("workers", minimum=0)
        self._number("lr", "> 0", lambda v: v > 0)
        self._number("weight_decay", ">= 0", lambda v: v >= 0)
        self._number("warmup", "in [0, 1)", lambda v: 0 <= v < 1)
        self._number("anchor_lr_scale", "> 0", lambda v: v > 0)
        self._number("temperature", "> 0", lambda v: v > 0)
        self._number("ridge", ">= 0", lambda v: v >= 0)
        self._number("preload_limit_gb", ">= 0", lambda v: v >= 0)
        self._choice("sampling", SAMPLINGS)
        self._choice("init", INITS)
        self._choice("teacher", TEACHERS)
        self._choice("amp", AMP_CHOICES)
        if self.layer is not None:
            self._choice("layer", STITCH_KINDS)
        if isinstance(self.latency, bool):
            object.__setattr__(self, "latency", "front" if self.latency else "off")
        self._choice("latency", LATENCY_MODES)
        self._bool("full_tune", "resume", "overwrite", *(("anchor_routes",) if self.anchor_routes is not None else ()))
        if self.anchor_routes and not self.full_tune:
            raise KlasError("--anchor-routes trains the anchors as routes of their own; it needs --full-tune")
        parse_loss(self.loss)  # a KlasError naming the bad term
        parse_loss(self.first_loss, flag="--first-loss")
        object.__setattr__(self, "root", Path(self.root))

    # -- derived ----------------------------------------------------------------------------------
    @property
    def loss_weights(self) -> dict[str, float]:
        """``loss`` parsed (:func:`klas.train.losses.parse_loss`)."""
        return parse_loss(self.loss)

    @property
    def routes_anchors(self) -> bool:
        """Whether the anchors are sampled as routes (``anchor_routes``, by default ``full_tune``)."""
        return self.full_tune if self.anchor_routes is None else self.anchor_routes

    @property
    def first_loss_weights(self) -> dict[str, float]:
        """``first_loss`` parsed."""
        return parse_loss(self.first_loss, flag="--first-loss")

    def loss_weights_at(self, epoch: int) -> dict[str, float]:
        """The loss of epoch ``epoch`` (1-based): ``first_loss`` in the first ``first_epochs``, else ``loss``."""
        return self.first_loss_weights if epoch <= self.first_epochs else self.loss_weights

    def resolved(self, *, steps_per_epoch: int, layer: str) -> "TrainConfig":
        """This config with the run's defaults filled in and the loss spelled canonically."""
        return dataclasses.replace(self, steps_per_epoch=steps_per_epoch, layer=layer,
                                   loss=loss_string(self.loss_weights), first_loss=loss_string(self.first_loss_weights),
                                   anchor_routes=self.routes_anchors)

    def recipe(self) -> dict[str, Any]:
        """The ``recipe`` fields as a dict (call on a :meth:`resolved` config for the manifest)."""
        return {k: getattr(self, k) for k in self.recipe_keys()}


__all__ = ["EVAL_BATCH_SIZE", "INITS", "LATENCY_MODES", "SAMPLINGS", "TEACHERS", "TrainConfig"]
