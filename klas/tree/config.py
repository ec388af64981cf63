"""``TreeConfig``: every option of ``klas tree``, its documented default, validated once.

Fields marked ``recipe`` decide the trained stitch layers: they are recorded in ``tree.json`` and in
every checkpoint, and must match for ``--resume`` to continue one. The rest say how to run.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from klas.errors import KlasError
from klas.settings import Settings, flag, recipe_field
from klas.fs import DEFAULT_ROOT
from klas.stitch.init import DEFAULT_INIT_IMAGES, DEFAULT_RIDGE
from klas.stitch.layers import STITCH_KINDS
from klas.stitch.tree import MATCHES


#: How klas tree picks the trunk when ``--trunk`` is not given (:class:`TreeConfig`).
TRUNK_RULES: tuple[str, ...] = ("score", "floor")


@dataclass(frozen=True)
class TreeConfig(Settings):
    """Options of one ``klas tree`` run; every value is checked in ``__post_init__``.

    * ``models`` (None = every model of the cache): the models the tree joins, two or more; one of
      them is the trunk, each other one a branch.
    * ``trunk`` (None = chosen by ``trunk_rule``: "score", the best-scored model, :mod:`klas.tree.choose`;
      "floor", the best single model, whose classifier scores best on the score split, so the tree keeps
      the floor's own features whole), ``share_at`` (None = auto:
      ``points`` share points, the best-scored one per cost range) or a tuple of share points.
    * ``match`` ("relative": each branch joins at the trunk's relative depth; "score": at the
      representation with the lowest stitch score Γ from the trunk's share point).
    * ``layer`` ("linear" | "mlp" | "lora"), least-squares init on ``init_images`` probe-train images.
    * Training (Mai et al.): ``epochs`` (2) of final-feature matching (``ffm``: MSE of each branch's
      pre-logits features to its model's own, label-free), then ``task_epochs`` (0) of cross-entropy on
      the branches' logits; all branches of a tree train together on one pass of the trunk, models
      frozen. AdamW ``lr`` (3e-3), ``weight_decay`` (0.05), ``warmup`` (0.1) then cosine, ``batch_size`` (64),
      ``steps_per_epoch`` (None = one pass over probe-train).
    * ``branch_lr_scale`` (0.0): 0 keeps every model frozen, only the stitch layers train (Mai et al.);
      above 0 each branch's own blocks from its cut and its head train too, at ``branch_lr_scale`` x ``lr``,
      on a copy per tree (the trunk, the models' own outputs, floor and ceiling stay those of the frozen
      models; the tree then carries its branches' weights).
    * Scores: ``probe_epochs`` (10) for the per-block probes, ``temperature`` (1.0) of their softmax.
    * ``seed`` (0): every random choice derives from it.
    * ``resume`` / ``overwrite``; ``stop_after`` (None): return after this many epochs of this
      invocation, leaving a checkpoint to resume; ``eval_batch_size`` (256); ``latency`` (True),
      ``latency_batch`` (64), ``latency_repeats`` (5); ``device`` (None = CUDA when present); ``root``.
    """

    _what = "tree option"

    models: tuple[str, ...] | None = recipe_field(None)
    trunk: str | None = recipe_field(None)
    trunk_rule: str = recipe_field("score")
    share_at: tuple[int, ...] | None = recipe_field(None)
    points: int = recipe_field(3)
    match: str = recipe_field("relative")
    layer: str = recipe_field("linear")
    epochs: int = recipe_field(2)
    task_epochs: int = recipe_field(0)
    steps_per_epoch: int | None = recipe_field(None)
    batch_size: int = recipe_field(64)
    lr: float = recipe_field(3e-3)
    weight_decay: float = recipe_field(0.05)
    warmup: float = recipe_field(0.1)
    branch_lr_scale: float = recipe_field(0.0)
    init_images: int = recipe_field(DEFAULT_INIT_IMAGES)
    ridge: float = recipe_field(DEFAULT_RIDGE)
    probe_epochs: int = recipe_field(10)
    temperature: float = recipe_field(1.0)
    seed: int = recipe_field(0)
    resume: bool = False
    overwrite: bool = False
    stop_after: int | None = None
    eval_batch_size: int = 256
    latency: bool = True
    latency_batch: int = 64
    latency_repeats: int = 5
    device: str | None = None
    root: Path = DEFAULT_ROOT

    def __post_init__(self) -> None:
        for name in ("points", "batch_size", "init_images", "probe_epochs", "eval_batch_size", "latency_batch",
                     "latency_repeats"):
            self._int(name, 1)
        for name in ("epochs", "task_epochs"):
            self._int(name, 0)
        if self.epochs + self.task_epochs < 1:
            raise KlasError("--epochs plus --task-epochs must be at least 1: the stitch layers need training")
        for name in ("steps_per_epoch", "stop_after"):
            if getattr(self, name) is not None:
                self._int(name, 1)
        self._int("seed", None)
        for name, ok, rule in (("lr", lambda v: v > 0, "> 0"), ("weight_decay", lambda v: v >= 0, ">= 0"),
                               ("warmup", lambda v: 0 <= v < 1, "in [0, 1)"), ("ridge", lambda v: v >= 0, ">= 0"),
                               ("branch_lr_scale", lambda v: v >= 0, ">= 0"),
                               ("temperature", lambda v: v > 0, "> 0")):
            self._number(name, rule, ok)
        if self.models is not None:
            names = tuple(self.models)
            if len(names) < 2 or len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
                raise KlasError(f"--models must name two or more different cached models, got {','.join(map(str, names))!r}")
            object.__setattr__(self, "models", names)
        self._choice("layer", STITCH_KINDS)
        self._choice("match", MATCHES)
        self._choice("trunk_rule", TRUNK_RULES)
        if self.share_at is not None:
            shares = tuple(self.share_at)
            if not shares or any(isinstance(s, bool) or not isinstance(s, numbers.Integral) for s in shares):
                raise KlasError(f"--share-at must list block boundaries (integers) or be auto, got {self.share_at!r}")
            if len(set(shares)) != len(shares):
                raise KlasError(f"--share-at lists a share point twice: {','.join(map(str, shares))}")
            object.__setattr__(self, "share_at", tuple(sorted(int(s) for s in shares)))
        self._bool("resume", "overwrite", "latency")
        if self.resume and self.overwrite:
            raise KlasError("--resume continues a run and --overwrite starts it over; pass one of them")
        object.__setattr__(self, "root", Path(self.root))

    def recipe(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k in self.recipe_keys() for v in [getattr(self, k)]}

    @property
    def tunes_branches(self) -> bool:
        """Whether the branches' own blocks train with the stitch layers (``branch_lr_scale`` > 0)."""
        return self.branch_lr_scale > 0

    @property
    def total_epochs(self) -> int:
        return self.epochs + self.task_epochs

    def loss_at(self, epoch: int) -> dict[str, float]:
        """The loss of epoch ``epoch`` (1-based): ``ffm`` in the first ``epochs``, then ``ce``."""
        return {"ffm": 1.0} if epoch <= self.epochs else {"ce": 1.0}


def parse_models(text: str | None) -> tuple[str, ...] | None:
    """``--models``: ``a,b,c`` -> ``("a", "b", "c")``; nothing or ``all`` -> None (every cached model)."""
    if text is None or text.strip().lower() in ("", "all"):
        return None
    return tuple(p.strip() for p in text.split(",") if p.strip())


def parse_share_at(text: str | None) -> tuple[int, ...] | None:
    """``--share-at``: ``auto`` (or nothing) -> None; ``"2,4"`` -> ``(2, 4)``; else a one-line error."""
    if text is None or text.strip().lower() in ("", "auto"):
        return None
    try:
        return tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise KlasError(f"--share-at {text!r} is not a list of block boundaries; write e.g. --share-at 2,4 or auto") from None


__all__ = ["TRUNK_RULES", "TreeConfig", "parse_models", "parse_share_at"]
