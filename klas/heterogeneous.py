"""Mai et al.'s stitching protocol as a benchmark: how should a stitch between two *different* models be
trained, and at which depth does it work? ``benchmarks/bench_heterogeneous.py`` runs it, prints and plots.

For a pair of models A and B (the demo's ``klas_vit_s`` and ``klas_resnet_l`` by default: a ViT and a
ResNet of similar cost, trained on the built-in ``digits`` set) and a cache of them
(:func:`klas.quality.build_family_cache`):

1. **Stitch points.** Each named depth ``f`` (``shallow`` 1/6, ``middle`` 1/2, ``deep`` 5/6 of the blocks;
   Mai et al. stitch ViT-L at layers 2 / 10-14 / 22 of 24) gives every model the cut
   ``round(f * n_blocks)`` (kept within ``1 .. n-1``): representation r leaves block r-1, and the stitch
   ``(src, r_src) -> (dst, r_dst)`` resumes dst at block r_dst (``docs/formats.md``). At every depth:
   the cross-model stitches A -> B and B -> A, and the **self-stitch controls** A -> A and B -> B (a
   model stitched to itself at the same point, through the same kind of stitch layer). With frozen
   anchors a second copy of the model (an alias) computes exactly what the anchor does, so the control
   uses the anchor itself.
2. **Same start.** Every stitch gets ``klas train``'s least-squares init on the same ``init_images``
   probe-train images, once; each loss trains a copy of that state (``acc_start``: its eval accuracy).
3. **Training as Mai et al.: anchors frozen, only the stitch layers train** (their stitch: a 2-layer
   MLP, ``layer="mlp"``). Each loss trains all stitches for ``steps`` AdamW steps on the same batches
   in the same order (every step trains every stitch on one batch; Adam acts per parameter, so this
   equals training each stitch alone), warm-up then cosine, with the training core
   (:func:`klas.train.core.fit`): ``lfm`` (match the target's representation at the stitch point),
   ``ce`` (the task loss, Mai et al.'s TLT), ``ffm`` (match the target's final pre-logits features) and
   ``ffm->ce`` (``ffm`` for the first ``first_fraction`` of the steps, then ``ce``, one schedule).
4. **Choosing on score, reporting on eval.** With several learning rates (``lrs``), each loss keeps the
   one with the best mean score-split accuracy over its stitches; only that lr's eval numbers are the
   result (with one lr the score split is not read). Accuracy is also reported **relative to the target alone** (stitch / target model, eval).

Accuracies are fractions; costs GFLOPs, fvcore convention (one multiply-add = one FLOP), from
:func:`klas.stitch.network.stitch_macs`. Seeded and deterministic for a fixed thread count.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from klas.errors import KlasError
from klas.optim import warmup_cosine, warmup_steps_of
from klas.stitch.init import DEFAULT_RIDGE
from klas.stitch.layers import STITCH_KINDS
from klas.stitch.network import StitchNet, StitchSpec, stitch_id, stitch_macs
from klas.train import (
    Objective, SplitData, correct_per_image, epoch_positions, fit, init_stitches, make_optimizer, parse_loss,
    teacher_targets,
)
from klas.utils import DEFAULT_ROOT, resolve_device, seed_everything, sha256_state_dict

#: Named stitch depths as fractions of a model's blocks (Mai et al.: layers 2, 10-14 and 22 of 24).
DEPTHS: dict[str, float] = {"shallow": 1 / 6, "middle": 1 / 2, "deep": 5 / 6}
#: Training objectives compared: a loss string of ``klas train``, or ``first->second`` (two stages).
LOSSES: tuple[str, ...] = ("lfm", "ce", "ffm", "ffm->ce")
#: What Mai et al. (CVPR 2026) report, for the README and the printed table.
PAPER = ("Mai et al. (CVPR 2026), ViT-L foundation models, 2-layer MLP stitch, both models frozen: at layer 2 on "
         "fMoW, task-loss training 25.1 % vs FFM 51.7 %; deep cross-model stitches can beat both models; "
         "cross-model stitches beat self-stitch controls by about 2.3-2.6 points")


@dataclass(frozen=True)
class HeteroConfig:
    """One run of the protocol (``benchmarks/bench_heterogeneous.py``); validated on creation."""

    models: tuple[str, str] = ("klas_vit_s", "klas_resnet_l")
    depths: tuple[str, ...] = ("shallow", "middle", "deep")
    losses: tuple[str, ...] = LOSSES
    self_controls: bool = True
    layer: str = "mlp"
    steps: int = 150
    first_fraction: float = 0.5  # ffm->ce: share of the steps trained with ffm
    batch_size: int = 32
    # lr 3e-4: best mean score-split accuracy for ce, ffm and ffm->ce in a pilot over 1e-4 / 3e-4 / 1e-3
    # (30 steps, shallow and deep; benchmarks/results/heterogeneous-lr-pilot.json); one lr: nothing to choose
    lrs: tuple[float, ...] = (3e-4,)
    weight_decay: float = 0.05
    warmup: float = 0.1
    init_images: int = 100
    limit: int | None = None  # images per split of the cache (None: all of digits)
    score_limit: int | None = 1000  # score-split images used for choosing the lr (None: all)
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
        for loss in self.losses:
            for part in loss.split("->"):
                parse_loss(part)
        if self.layer not in STITCH_KINDS:
            raise KlasError(f"unknown stitch layer {self.layer!r}; use one of {', '.join(STITCH_KINDS)}")
        if self.steps < 2 or self.batch_size < 1 or self.init_images < 1 or not self.lrs:
            raise KlasError("steps (>= 2), batch_size, init_images and at least one lr must be positive")
        if not all(lr > 0 and math.isfinite(lr) for lr in self.lrs) or not 0 < self.first_fraction < 1:
            raise KlasError(f"lrs must be > 0 and first_fraction in (0, 1), got {self.lrs}, {self.first_fraction}")


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


def _stages(loss: str, steps: int, first_fraction: float) -> list[tuple[dict[str, float], int]]:
    """``(weights, steps)`` per stage: one stage, or two for ``first->second``."""
    parts = loss.split("->")
    if len(parts) == 1:
        return [(parse_loss(loss), steps)]
    first = max(1, min(steps - 1, int(round(first_fraction * steps))))
    return [(parse_loss(parts[0]), first), (parse_loss(parts[1]), steps - first)]


def train_loss(net: StitchNet, train: SplitData, loss: str, lr: float, targets, cfg: HeteroConfig,
               dev: torch.device, on_step: Callable[[], None] | None = None) -> list[float]:
    """``cfg.steps`` steps of every stitch of ``net`` (stitch layers only) under ``loss``; per-step losses
    (each the mean over the stitches). ``on_step()`` after every step."""
    steps, warm = cfg.steps, warmup_steps_of(cfg.warmup, cfg.steps)
    opt = make_optimizer(net, lr, cfg.weight_decay)  # stitch layers only: the anchors stay frozen
    positions = epoch_positions(train.n, steps, cfg.batch_size, cfg.seed, 1)
    losses: list[float] = []
    done = 0
    for weights, n in _stages(loss, steps, cfg.first_fraction):
        objective = Objective(weights, 1.0, targets)
        losses += fit(net, train, [net.stitch_ids] * n, objective, opt,
                      positions=positions[done * cfg.batch_size:(done + n) * cfg.batch_size],
                      batch_size=cfg.batch_size, device=dev, schedule=lambda s: warmup_cosine(s, steps, warm),
                      start_step=done, chunk_images=cfg.chunk_images,
                      on_step=(lambda k, ids, value: on_step()) if on_step else None)
        done += n
    return losses


def _accuracies(nets: dict, data: SplitData, cfg: HeteroConfig, dev, positions=None) -> dict[str, dict[str, float]]:
    bits = correct_per_image(nets, data, batch_size=cfg.eval_batch_size, device=dev, chunk_images=cfg.chunk_images,
                             positions=positions)
    return {tag: {i: float(v.mean()) for i, v in d.items()} for tag, d in bits.items()}


def _score_positions(n: int, cfg: HeteroConfig) -> list[int] | None:
    if cfg.score_limit is None or cfg.score_limit >= n:
        return None
    g = torch.Generator().manual_seed(cfg.seed)
    return torch.randperm(n, generator=g)[: cfg.score_limit].sort().values.tolist()


def run_protocol(cache, cfg: HeteroConfig, *, root=DEFAULT_ROOT, device: str | None = None,
                 say: Callable[[str], None] = print, on_step: Callable[[], None] | None = None) -> dict:
    """The whole protocol on ``cache`` (which must hold ``cfg.models`` and the three digits-style splits);
    returns its JSON-ready report (:func:`summarise`). ``on_step()`` is called after every training step
    (``len(cfg.losses) * len(cfg.lrs) * cfg.steps`` of them)."""
    dev = resolve_device(device)
    missing = [m for m in cfg.models if m not in cache.model_names]
    if missing:
        raise KlasError(f"cache {cache.path} does not hold {missing}; build it with these models")
    times: dict[str, float] = {}
    t = time.perf_counter()
    seed_everything(cfg.seed)
    loaded = {m.name: m for m in cache.load_models(device=dev, root=root) if m.name in cfg.models}
    adapters, profiles = {n: m.adapter for n, m in loaded.items()}, {n: m.profile for n, m in loaded.items()}
    anchors_sha = {n: sha256_state_dict(a.state_dict()) for n, a in adapters.items()}
    plan = protocol_stitches(profiles, cfg)
    specs = [p["spec"] for p in plan]
    data = {s: SplitData(cache, s, root=root) for s in ("probe-train", "score", "eval")}
    start = StitchNet(adapters, profiles, specs, cfg.layer).to(dev)
    r2 = init_stitches(start, data["probe-train"], images=cfg.init_images, ridge=DEFAULT_RIDGE, seed=cfg.seed,
                       batch_size=cfg.eval_batch_size, device=dev)
    start_state = {k: v.detach().clone() for k, v in start.stitch_layers.state_dict().items()}
    wants = {k: 1.0 for loss in cfg.losses for part in loss.split("->") for k in parse_loss(part)}
    targets = teacher_targets(start, data["probe-train"], list(cfg.models), wants, batch_size=cfg.eval_batch_size,
                              device=dev)
    times["setup"] = time.perf_counter() - t
    say(f"{len(specs)} stitches ({', '.join(cfg.depths)}; {cfg.layer}), least squares on {cfg.init_images} images; "
        f"{len(cfg.losses)} losses x {len(cfg.lrs)} lr x {cfg.steps} steps ({times['setup']:.0f} s)")
    nets: dict[str, tuple[StitchNet, list[str]]] = {"start": (start, start.stitch_ids + list(cfg.models))}
    curves: dict[str, list[float]] = {}
    t = time.perf_counter()
    for loss in cfg.losses:
        for lr in cfg.lrs:
            net = StitchNet(adapters, profiles, specs, cfg.layer).to(dev)
            net.stitch_layers.load_state_dict(start_state)
            tag = f"{loss}@{lr:g}"
            curves[tag] = train_loss(net, data["probe-train"], loss, lr, targets, cfg, dev, on_step)
            nets[tag] = (net, net.stitch_ids)
            say(f"  {tag}: loss {curves[tag][0]:.4f} -> {curves[tag][-1]:.4f} ({time.perf_counter() - t:.0f} s)")
    times["train"] = time.perf_counter() - t
    t = time.perf_counter()
    score = _accuracies(nets, data["score"], cfg, dev, _score_positions(data["score"].n, cfg)) if len(cfg.lrs) > 1 else None
    evals = _accuracies(nets, data["eval"], cfg, dev)
    times["evaluate"] = time.perf_counter() - t
    unchanged = {n: sha256_state_dict(a.state_dict()) == anchors_sha[n] for n, a in adapters.items()}
    return summarise(cfg, plan, profiles, r2, curves, score, evals, unchanged, times,
                     {s: d.n for s, d in data.items()})


def _choose(cfg: HeteroConfig, score: dict, ids: list[str]) -> dict[str, float]:
    """Per loss, the lr with the best mean score-split accuracy over its stitches (the first on a tie)."""
    if score is None:
        return {loss: cfg.lrs[0] for loss in cfg.losses}
    return {loss: max(cfg.lrs, key=lambda lr: (np.mean([score[f"{loss}@{lr:g}"][i] for i in ids]), -cfg.lrs.index(lr)))
            for loss in cfg.losses}


def summarise(cfg: HeteroConfig, plan, profiles, r2, curves, score, evals, unchanged, times, split_sizes) -> dict:
    """The JSON-ready report: anchors, stitch points, one row per (stitch, loss) at its chosen lr."""
    a, b = cfg.models
    ids = [p["spec"].id for p in plan]
    chosen = _choose(cfg, score, ids)
    anchors = {m: {"gflops": profiles[m].macs / 1e9, "blocks": profiles[m].num_blocks,
                   "eval": evals["start"][m], "score": score["start"][m] if score else None} for m in cfg.models}
    rows = []
    for p in plan:
        s = p["spec"]
        target = anchors[s.dst]["eval"]
        for loss in cfg.losses:
            tag = f"{loss}@{chosen[loss]:g}"
            acc = evals[tag][s.id]
            rows.append({
                "depth": p["depth"], "kind": p["kind"], "id": s.id, "src": s.src, "src_cut": s.src_cut,
                "dst": s.dst, "dst_cut": s.dst_cut, "loss": loss, "lr": chosen[loss],
                "gflops": stitch_macs(profiles[s.src], s.src_cut, profiles[s.dst], s.dst_cut, cfg.layer) / 1e9,
                "init_r2": r2[s.id], "acc_start": evals["start"][s.id], "acc_score": score[tag][s.id] if score else None,
                "acc": acc, "relative_to_target": acc / target if target > 0 else float("nan"),
                "beats_both": bool(acc > max(anchors[a]["eval"], anchors[b]["eval"])),
                "loss_first": curves[tag][0], "loss_last": curves[tag][-1],
            })
    return {
        "config": {**asdict(cfg), "models": list(cfg.models)}, "models": list(cfg.models), "anchors": anchors,
        "cuts": {d: {m: cut_at(profiles[m].num_blocks, DEPTHS[d]) for m in cfg.models} for d in cfg.depths},
        "chosen_lr": chosen, "chosen_on": "score" if score else "fixed in the config (one lr)", "reported_on": "eval",
        "split_sizes": split_sizes,
        "score_images": 0 if score is None else min(cfg.score_limit or split_sizes["score"], split_sizes["score"]),
        "anchors_unchanged": unchanged, "rows": rows,
        "score_by_lr": {tag: float(np.mean([score[tag][i] for i in ids])) for tag in curves} if score else {},
        "seconds": times, "paper": PAPER,
    }


def cell(report: dict, stitch: str, loss: str) -> dict:
    """The row of ``stitch`` trained with ``loss``."""
    return next(r for r in report["rows"] if r["id"] == stitch and r["loss"] == loss)


__all__ = ["DEPTHS", "LOSSES", "PAPER", "HeteroConfig", "cell", "cut_at", "protocol_stitches", "run_protocol",
           "summarise", "train_loss"]
