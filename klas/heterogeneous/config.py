"""The protocol's settings (:class:`HeteroConfig`) and its stitch points; torch-free."""
from __future__ import annotations

import math
from dataclasses import dataclass

from klas.errors import KlasError
from klas.stitch.layers import STITCH_KINDS
from klas.stitch.network import StitchSpec, stitch_id
from klas.train.losses import parse_loss

#: Named stitch depths as fractions of a model's blocks (Mai et al.: layers 2, 10-14 and 22 of 24).
DEPTHS: dict[str, float] = {"shallow": 1 / 6, "middle": 1 / 2, "deep": 5 / 6}
#: Training objectives the protocol knows: a loss string of ``klas train``, or ``first->second`` (two stages).
LOSSES: tuple[str, ...] = ("lfm", "ce", "ffm", "ffm->ce")
#: How the learning rate moves over a run (both start with the same linear warm-up).
SCHEDULES: tuple[str, ...] = ("constant", "cosine")
#: What Mai et al. (CVPR 2026) report, for the README and the printed table.
PAPER = ("Mai et al. (CVPR 2026), ViT-L foundation models, 2-layer MLP stitch, both models frozen: at layer 2 on "
         "fMoW, task-loss training 25.1 % vs FFM 51.7 %; deep cross-model stitches can beat both models; "
         "cross-model stitches beat self-stitch controls by about 2.3-2.6 points")


@dataclass(frozen=True)
class HeteroConfig:
    """One run of the protocol (``benchmarks/bench_heterogeneous.py``); validated on creation.

    ``lengths``: the training lengths (steps) measured, shortest first. ``schedule``: ``constant`` (warm-up
    over ``warmup`` of the shortest length, then a constant lr: a run's first L steps do not depend on
    its length, so one run per loss gives every length, read off on the way) or ``cosine`` (warm-up over
    ``warmup`` of each length, then cosine to 0 at its end: one run per length). ``flat_tol``: a loss's
    curve has flattened at the shortest length whose score-split accuracy is within this of its best
    length's; the training length is the longest of these (:func:`klas.heterogeneous.claims.choose_length`)."""

    models: tuple[str, str] = ("klas_vit_s", "klas_resnet_l")
    depths: tuple[str, ...] = ("shallow", "middle", "deep")
    losses: tuple[str, ...] = ("ce", "ffm", "ffm->ce")
    self_controls: bool = True
    layer: str = "mlp"
    lengths: tuple[int, ...] = (150, 1500, 5000)
    schedule: str = "constant"
    first_fraction: float = 0.5  # ffm->ce: share of the steps trained with ffm
    batch_size: int = 32
    # lr 3e-4: best mean score-split accuracy for ce, ffm and ffm->ce in a pilot over 1e-4 / 3e-4 / 1e-3
    # (30 steps, shallow and deep, on the demo family before the shipped one;
    # benchmarks/results/heterogeneous-lr-pilot.json)
    lrs: tuple[float, ...] = (3e-4,)
    weight_decay: float = 0.05
    warmup: float = 0.1
    flat_tol: float = 0.01
    init_images: int = 100
    limit: int | None = None  # images per split of the cache (None: all of digits)
    score_limit: int | None = 1000  # score-split images used for choosing (None: all)
    eval_batch_size: int = 128
    chunk_images: int = 256
    seed: int = 0
    random_init: bool = False  # untrained models (tests only)

    def __post_init__(self) -> None:
        if len(self.models) != 2 or self.models[0] == self.models[1]:
            raise KlasError(f"the protocol needs two different models, got {list(self.models)}")
        bad = [d for d in self.depths if d not in DEPTHS]
        if bad or not self.depths:
            raise KlasError(f"unknown depth(s) {bad}; use some of {', '.join(DEPTHS)}")
        if not self.losses:
            raise KlasError(f"give at least one loss, e.g. {', '.join(LOSSES)}")
        for loss in self.losses:
            for part in loss.split("->"):
                parse_loss(part)
        if self.layer not in STITCH_KINDS:
            raise KlasError(f"unknown stitch layer {self.layer!r}; use one of {', '.join(STITCH_KINDS)}")
        if self.schedule not in SCHEDULES:
            raise KlasError(f"unknown schedule {self.schedule!r}; use one of {', '.join(SCHEDULES)}")
        lengths = tuple(self.lengths)
        if not lengths or any(isinstance(n, bool) or not isinstance(n, int) or n < 2 for n in lengths) \
                or list(lengths) != sorted(set(lengths)):
            raise KlasError(f"lengths must be increasing step counts >= 2, got {list(lengths)}")
        object.__setattr__(self, "lengths", lengths)
        if self.batch_size < 1 or self.init_images < 1 or not self.lrs:
            raise KlasError("batch_size, init_images and at least one lr must be positive")
        if not all(lr > 0 and math.isfinite(lr) for lr in self.lrs) or not 0 < self.first_fraction < 1:
            raise KlasError(f"lrs must be > 0 and first_fraction in (0, 1), got {self.lrs}, {self.first_fraction}")
        if not 0 <= self.flat_tol < 1:
            raise KlasError(f"flat_tol must be in [0, 1), got {self.flat_tol}")


def cut_at(num_blocks: int, fraction: float) -> int:
    """The representation at ``fraction`` of a model's depth: ``round(fraction * n)`` within ``1 .. n-1``."""
    return min(num_blocks - 1, max(1, int(round(fraction * num_blocks))))


def protocol_stitches(profiles, cfg: HeteroConfig) -> list[dict]:
    """Every (depth, kind, stitch) of the protocol: cross A->B, B->A and, with ``self_controls``, A->A, B->B."""
    a, b = cfg.models
    pairs = [(a, b, "cross"), (b, a, "cross")] + ([(a, a, "self"), (b, b, "self")] if cfg.self_controls else [])
    out = []
    for depth in cfg.depths:
        cuts = {m: cut_at(profiles[m].num_blocks, DEPTHS[depth]) for m in (a, b)}
        for src, dst, kind in pairs:
            spec = StitchSpec(stitch_id(src, cuts[src], dst, cuts[dst]), src, cuts[src], dst, cuts[dst])
            out.append({"depth": depth, "kind": kind, "spec": spec})
    return out


def stages_of(loss: str, steps: int, first_fraction: float) -> list[tuple[dict[str, float], int]]:
    """``(weights, steps)`` per stage: one stage, or two for ``first->second`` (the first ``first_fraction``
    of the steps, at least one step each)."""
    parts = loss.split("->")
    if len(parts) == 1:
        return [(parse_loss(loss), steps)]
    first = max(1, min(steps - 1, int(round(first_fraction * steps))))
    return [(parse_loss(parts[0]), first), (parse_loss(parts[1]), steps - first)]


def total_steps(cfg: HeteroConfig) -> int:
    """Training steps the protocol runs (each trains every stitch on one batch), per lr: what the progress bar counts."""
    if cfg.schedule == "cosine":
        return len(cfg.losses) * sum(cfg.lengths)
    longest, steps = cfg.lengths[-1], 0
    firsts: dict[str, set[int]] = {}
    for loss in cfg.losses:
        parts = loss.split("->")
        if len(parts) == 1:
            firsts.setdefault(loss, set()).add(longest)
        else:
            split = {n: stages_of(loss, n, cfg.first_fraction)[0][1] for n in cfg.lengths}
            firsts.setdefault(parts[0], set()).update(split.values())
            steps += sum(n - split[n] for n in cfg.lengths)
    return steps + sum(max(v) for v in firsts.values())


__all__ = ["DEPTHS", "LOSSES", "PAPER", "SCHEDULES", "HeteroConfig", "cut_at", "protocol_stitches", "stages_of",
           "total_steps"]
