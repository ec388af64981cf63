"""Stage 3, ``klas train``: least-squares init, then SN-Net-style joint fine-tuning of the selected stitches.

1. Read ``RUN/selection.json``, open the cache it names (refused when gone or changed), rebuild the
   anchors from it and build one :class:`~klas.stitch.network.StitchNet` holding each anchor once.
2. Fit every linear stitch in one batched pass over ``init_images`` probe-train images
   (:func:`klas.stitch.init.least_squares_init`), then evaluate every stitch and anchor on the eval
   split ("before").
3. Fine-tune jointly: every step samples one network (``uniform``, or ``bucket``: a FLOPs bucket first,
   then a member, as SN-Netv2) and updates it on one batch; anchors stay frozen unless ``full_tune``
   (then they train too, at ``anchor_lr_scale`` x the learning rate, and, with ``anchor_routes``, are
   sampled as networks of their own, as SN-Net). The loss is ``loss`` (``first_loss`` in the first
   ``first_epochs``); ``distill`` matches the target's or the largest anchor's original logits, ``lfm``
   the target's representation at the stitch point on the same batch. AdamW,
   linear warm-up then cosine decay, per step. AMP (bf16, else fp16) on CUDA only.
4. Checkpoint after every epoch (``checkpoints/last.pt``, replaced atomically), evaluate ("after"),
   time each network, write ``results.parquet`` and then ``train.json`` (the run's manifest, last).

Training reads only the probe-train split and evaluation only the eval split. Every random choice
(stitch init, data order, stitch sampling) derives from ``seed``: the same inputs give the same
weights and accuracies (latency, a wall-clock measurement, is the exception).

Under ``torchrun`` (``WORLD_SIZE`` > 1) each rank takes its share of every global batch; all ranks
sample the same stitch each step and their gradients are averaged with ``all_reduce`` before the
update, which is what DDP does, without DDP's trouble with parameters a step does not use.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from klas.errors import KlasError
from klas.optim import AMP_CHOICES, grad_scaler, parse_amp, warmup_cosine, warmup_steps_of
from klas.run import (
    EXPORT, SELECTION, TRAIN_MANIFEST, discard, open_run_cache, read_selection, run_writer, stitch_specs,
)
from klas.stitch.network import StitchNet, StitchSpec, route_string
from klas.term import make_console
from klas.train.checkpoint import checkpoint_path, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from klas.train.config import INITS, SAMPLINGS, TrainConfig
from klas.train.core import (
    NonFiniteLoss, Objective, fit, init_stitches, largest_anchor, make_optimizer, sampled_routes, stitch_sequence,
    teacher_targets,
)
from klas.train.data import SplitData, epoch_positions
from klas.models import device_identity
from klas.train.evaluate import bare_throughput, evaluate_all, required_macs
from klas.train.latency import LatencyReport, predictions, time_networks, to_time
from klas.train.results import RESULTS, write_results
from klas.utils import (
    FLOPS_CONVENTION, dist_barrier, dist_rank_world, package_versions, resolve_device, seed_everything,
    sha256_json, write_json_atomic,
)

MANIFEST = TRAIN_MANIFEST
MANIFEST_FORMAT = "klas.train/1"
TRAIN_SPLIT = "probe-train"
EVAL_SPLIT = "eval"
AMPS = AMP_CHOICES
#: At most this many images in the bare forward the evaluator's throughput is compared with (one batch;
#: the check costs a few per cent of an evaluation pass).
BARE_BATCH = 64
#: Run facts recorded beside the recipe in ``train.json``'s config; a change only earns a note on resume.
ENVIRONMENT_KEYS = ("world_size", "device", "amp")


# -- result ----------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What ``train_run`` did; ``rows`` are the rows of ``results.parquet`` (empty while incomplete)."""

    run_dir: Path
    rows: list[dict]
    config: dict
    epochs_done: int
    complete: bool
    seconds: float
    history: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase (data, models, ls_init, ...)
    evaluation: dict | None = None  # the evaluator's throughput against a bare forward (train.json)
    latency: dict | None = None  # what was timed and the predictor's error (train.json)

    def phase_table(self) -> Table:
        """Where the run spent its time: seconds and share per phase; the evaluator's throughput ratio and
        the predictor's error in the caption."""
        total = sum(self.timings.values()) or 1.0
        notes = []
        if self.evaluation:
            notes.append("evaluator at " + ", ".join(f"{100 * p['ratio']:.0f}% ({k})" for k, p in self.evaluation["passes"].items())
                         + " of a bare forward's throughput (CPU time: "
                         + ", ".join(f"{100 * p['cpu_ratio']:.0f}%" for p in self.evaluation["passes"].values()) + ")")
        err = (self.latency or {}).get("predictor_error")
        if err:
            notes.append(f"latency predictor error: median {100 * err['median']:.1f}%, worst {100 * err['worst']:.1f}% "
                         f"over {err['networks']} timed networks")
        t = Table(title=f"{self.run_dir.name}: where the time went", caption="; ".join(notes) or None)
        for col in ("phase", "seconds", "share"):
            t.add_column(col, justify="left" if col == "phase" else "right")
        for k, v in self.timings.items():
            t.add_row(k, f"{v:.1f}", f"{100 * v / total:.1f}%")
        t.add_row("total", f"{total:.1f}", "100%")
        return t

    def table(self, limit: int | None = None) -> Table:
        """A rich table: stitches and anchors, cheapest first, with accuracy before/after."""
        t = Table(title=f"{self.run_dir.name}: top-1 on the eval split ({FLOPS_CONVENTION})")
        for col, just in (("id", "left"), ("kind", "left"), ("GFLOPs", "right"), ("acc before %", "right"),
                          ("acc after %", "right"), ("Δ", "right"), ("latency ms", "right")):
            t.add_column(col, justify=just, overflow="fold", min_width=24 if col == "id" else None)
        rows = sorted(self.rows, key=lambda r: (r["macs"], r["id"]))
        for r in rows[:limit]:
            lat = "" if r.get("latency_ms") is None or math.isnan(r["latency_ms"]) else f"{r['latency_ms']:.2f}"
            t.add_row(r["id"], r["kind"], f"{r['gflops']:.4f}", f"{100 * r['acc_before']:.2f}",
                      f"{100 * r['acc_after']:.2f}", f"{100 * (r['acc_after'] - r['acc_before']):+.2f}", lat)
        return t


# -- one run, phase by phase -----------------------------------------------------------------------


class _Timer:
    """Seconds per phase (``TrainResult.timings``): ``lap(name)`` books the time since the last lap."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.mark = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self.mark
        self.mark = now


@dataclass
class RunContext:
    """A prepared run: checked inputs, the resolved config, device, data and (when resuming) the checkpoint."""

    run_dir: Path
    cfg: TrainConfig  # resolved: steps_per_epoch, layer and loss filled in
    selection: dict
    specs: list[StitchSpec]
    sel_hash: str
    ckpt: dict | None
    cache: Any
    rank: int
    world: int
    device: torch.device
    amp_dtype: torch.dtype | None
    train_data: SplitData
    eval_data: SplitData
    config: dict  # train.json's config: the recipe plus ENVIRONMENT_KEYS
    console: Console
    progress: bool
    timer: _Timer = field(default_factory=_Timer)
    eval_seconds: dict[str, tuple[float, float]] = field(default_factory=dict)  # (wall, CPU) seconds per pass

    @property
    def ckpt_path(self) -> Path:
        return checkpoint_path(self.run_dir)

    def say(self, *args, **kwargs) -> None:
        if self.rank == 0:
            self.console.print(*args, **kwargs)


@dataclass
class Trainer:
    """What the epochs train with: the stitchable network, its objectives (``first``: the first stage's,
    None without one), optimiser state, and the networks steps sample from with their buckets."""

    net: StitchNet
    objective: Objective
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    routes: list[str]
    buckets: list[int]
    first: Objective | None = None

    def objective_at(self, epoch: int, first_epochs: int) -> Objective:
        return self.first if epoch <= first_epochs and self.first is not None else self.objective

    def routes_for(self, objective: Objective) -> tuple[list[str], list[int]]:
        """The networks (and buckets) steps sample from under ``objective``: all routes, or only the
        stitches when it gives anchors no term (``lfm`` alone), so no step is spent on nothing."""
        if objective.trains_anchors:
            return self.routes, self.buckets
        keep = [k for k, r in enumerate(self.routes) if not self.net.is_anchor(r)]
        return [self.routes[k] for k in keep], [self.buckets[k] for k in keep]

    @property
    def trained_params(self) -> list[torch.nn.Parameter]:
        return [p for g in self.opt.param_groups for p in g["params"]]


@dataclass
class RunState:
    """What a checkpoint carries forward besides weights: accuracies before training, LS fit R², history;
    and the content hash of the last checkpoint's weights (what the results will record)."""

    before: dict[str, float]
    fit_r2: dict[str, float]
    history: list[dict]
    epoch_done: int
    checkpoint_sha256: str | None = None


def _check_outputs(run_dir: Path, cfg: TrainConfig, sel_hash: str) -> dict | None:
    """The checkpoint to resume (None when starting), refusing to clobber earlier output unasked."""
    ckpt_path = checkpoint_path(run_dir)
    if cfg.resume:
        ckpt = load_checkpoint(ckpt_path)
        if ckpt.get("selection_sha256") != sel_hash:
            raise KlasError(
                f"checkpoint {ckpt_path} was trained on another selection than {run_dir / SELECTION}; "
                f"train without --resume and with --overwrite to start over"
            )
        return ckpt
    if (ckpt_path.is_file() or (run_dir / RESULTS).is_file()) and not cfg.overwrite:
        raise KlasError(f"run {run_dir} already has training output; pass --resume to continue it or --overwrite to start over")
    return None


def _devices(cfg: TrainConfig) -> tuple[int, int, torch.device, torch.dtype | None]:
    """(rank, world, device, autocast dtype); under torchrun each rank takes its own GPU."""
    rank, world = dist_rank_world()
    dev = resolve_device(cfg.device)
    if dev.type == "cuda" and world > 1 and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
    return rank, world, dev, parse_amp(cfg.amp, dev)


def _check_resume_config(ckpt: dict | None, config: dict, ckpt_path: Path) -> list[str]:
    """A resumed checkpoint must have the same recipe; returns what changed in the environment (for a note)."""
    if ckpt is None:
        return []
    old = ckpt.get("config", {})
    diff = [f"{k}={old.get(k)!r} (now {config[k]!r})" for k in TrainConfig.recipe_keys() if old.get(k) != config[k]]
    if diff:
        raise KlasError(f"checkpoint {ckpt_path} was made with other options: {'; '.join(diff)}; "
                        f"resume with the same options, or pass --overwrite without --resume to start over")
    return [f"{k} {old.get(k)} -> {config[k]}" for k in ENVIRONMENT_KEYS if old.get(k) != config[k]]


def prepare_run(run_dir: Path, cfg: TrainConfig, console: Console, progress: bool) -> RunContext:
    """Check the run directory, selection, checkpoint and cache; set up the device and the data."""
    selection = read_selection(run_dir)
    specs = stitch_specs(selection)
    if not specs:
        raise KlasError(f"selection {run_dir / SELECTION} has no stitches; search again with a larger --budget")
    sel_hash = sha256_json(selection)
    ckpt = _check_outputs(run_dir, cfg, sel_hash)
    cache = open_run_cache(selection, run_dir)
    rank, world, dev, amp_dtype = _devices(cfg)
    timer = _Timer()
    steps = cfg.steps_per_epoch or math.ceil(len(cache.labels(TRAIN_SPLIT)) / (cfg.batch_size * world))
    cfg = cfg.resolved(steps_per_epoch=steps, layer=cfg.layer or selection.get("layer") or "linear")
    config = {**cfg.recipe(), "world_size": world, "device": str(dev),
              "amp": str(amp_dtype).removeprefix("torch.") if amp_dtype else "off"}
    moved = _check_resume_config(ckpt, config, checkpoint_path(run_dir))  # before loading the data: fail at once
    data = {split: SplitData(cache, split, root=cfg.root, preload_limit_gb=cfg.preload_limit_gb, workers=cfg.workers)
            for split in (TRAIN_SPLIT, EVAL_SPLIT)}
    timer.lap("data")
    ctx = RunContext(run_dir, cfg, selection, specs, sel_hash, ckpt, cache, rank, world, dev, amp_dtype,
                     data[TRAIN_SPLIT], data[EVAL_SPLIT], config, console, progress, timer)
    if moved:
        ctx.say(f"[yellow]note:[/] resuming with {', '.join(moved)}; results may differ from an uninterrupted run")
    return ctx


def build_trainer(ctx: RunContext) -> Trainer:
    """Load the anchors, build the stitchable network, the teacher targets and the optimiser."""
    cfg = ctx.cfg
    seed_everything(cfg.seed)
    used = list(dict.fromkeys([a["name"] for a in ctx.selection["anchors"]] + [n for s in ctx.specs for n in (s.src, s.dst)]))
    missing = [n for n in used if n not in ctx.cache.model_names]
    if missing:
        raise KlasError(f"selection names models {missing} that cache {ctx.cache.path} does not hold; search again: "
                        f"klas search {ctx.cache.path} --run {ctx.run_dir} --overwrite")
    ctx.say(f"loading {len(used)} models from {ctx.cache.path} ...")
    models = [m for m in ctx.cache.load_models(device=ctx.device, root=cfg.root) if m.name in used]
    net = StitchNet.from_loaded(models, ctx.specs, kind=cfg.layer).to(ctx.device)
    ctx.timer.lap("models")
    anchors = [a["name"] for a in ctx.selection["anchors"]] if cfg.anchor_routes else []
    routes, buckets = sampled_routes([s.id for s in ctx.specs],
                                     _buckets_of(ctx.specs, int(ctx.selection.get("buckets") or 20)), anchors)
    teacher = largest_anchor(net) if cfg.teacher == "largest" else None
    names = {s.dst for s in ctx.specs} | set(anchors) | ({teacher} if teacher else set())
    every_term = {**(cfg.first_loss_weights if cfg.first_epochs else {}), **cfg.loss_weights}  # what any epoch reads
    targets = teacher_targets(net, ctx.train_data, sorted(names), every_term,
                              batch_size=cfg.eval_batch_size, device=ctx.device, amp_dtype=ctx.amp_dtype)
    opt = make_optimizer(net, cfg.lr, cfg.weight_decay, full_tune=cfg.full_tune, anchor_lr_scale=cfg.anchor_lr_scale)
    scaler = grad_scaler(ctx.device, ctx.amp_dtype)
    ctx.timer.lap("teacher_targets")
    objective = Objective(cfg.loss_weights, cfg.temperature, targets, teacher)
    first = Objective(cfg.first_loss_weights, cfg.temperature, targets, teacher) if cfg.first_epochs else None
    return Trainer(net, objective, opt, scaler, routes, buckets, first)


def _buckets_of(specs: list[StitchSpec], num_buckets: int) -> list[int]:
    """Each stitch's FLOPs bucket: the selection's, else equal-width MAC bins over the selected range."""
    if all(s.bucket is not None for s in specs):
        return [int(s.bucket) for s in specs]
    macs = [s.macs or 0 for s in specs]
    lo, hi = min(macs), max(macs)
    if hi == lo:
        return [0] * len(specs)
    return [min(num_buckets - 1, int((m - lo) / (hi - lo) * num_buckets)) for m in macs]


def eval_ids(ctx: RunContext) -> list[str]:
    """The networks evaluated and reported: every selected stitch, then every anchor."""
    return [s.id for s in ctx.specs] + [a["name"] for a in ctx.selection["anchors"]]


def start_or_resume(ctx: RunContext, tr: Trainer) -> RunState:
    """A fresh run: least-squares init, the "before" evaluation and a first checkpoint (epoch 0).
    A resumed one: weights, optimiser, scaler and RNG states back from the checkpoint."""
    cfg, net = ctx.cfg, tr.net
    if ctx.ckpt is not None:
        ckpt = ctx.ckpt
        for sid, sd in ckpt["stitch_states"].items():
            net.stitch_layer(sid).load_state_dict(sd)
        if cfg.full_tune:
            for name, sd in ckpt["anchor_states"].items():
                net.adapter(name).load_state_dict(sd)
        tr.opt.load_state_dict(ckpt["optimizer"])
        tr.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        state = RunState(ckpt["before"], ckpt.get("fit_r2", {}), list(ckpt.get("history", [])), int(ckpt["epoch"]),
                         ckpt.get("weights_sha256"))
        ctx.say(f"resuming {ctx.run_dir} at epoch {state.epoch_done}/{cfg.epochs}")
        return state
    fit_r2: dict[str, float] = {}
    if cfg.init == "ls":
        ctx.say(f"least-squares init of {len(ctx.specs)} {cfg.layer} stitches on "
                f"{min(cfg.init_images, ctx.train_data.n)} probe-train images ...")
        fit_r2 = init_stitches(net, ctx.train_data, images=cfg.init_images, ridge=cfg.ridge, seed=cfg.seed,
                               batch_size=cfg.eval_batch_size, device=ctx.device)
        ctx.timer.lap("ls_init")
    if ctx.world > 1:
        _broadcast_module(net.stitch_layers)
    if ctx.rank == 0:  # outputs of an earlier training (and the front exported from it) are now stale
        discard(ctx.run_dir, (RESULTS, MANIFEST, EXPORT))
    before = evaluate_run(ctx, net, "before")
    ctx.timer.lap("eval_before")
    state = RunState(before, fit_r2, [], 0)
    save_state(ctx, tr, state)
    return state


def evaluate_run(ctx: RunContext, net: StitchNet, what: str) -> dict[str, float]:
    """Accuracy of every reported network on the eval split, with a progress bar on rank 0; the seconds
    it took go to ``ctx.eval_seconds[what]``."""
    ids = eval_ids(ctx)
    t0, c0 = time.perf_counter(), time.process_time()
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=ctx.console, disable=not ctx.progress or ctx.rank != 0, transient=True) as bar:
        task = bar.add_task(f"evaluating ({what}): {len(ids)} networks", total=ctx.eval_data.n // ctx.world)
        acc = evaluate_all(net, ctx.eval_data, ids, batch_size=ctx.cfg.eval_batch_size, device=ctx.device,
                           amp_dtype=ctx.amp_dtype, rank=ctx.rank, world=ctx.world,
                           on_batch=lambda n: bar.advance(task, n))
    ctx.eval_seconds[what] = (time.perf_counter() - t0, time.process_time() - c0)
    return acc


def evaluator_throughput(ctx: RunContext, net: StitchNet) -> dict[str, Any]:
    """How close the evaluator came to the device's throughput (``train.json``'s ``evaluation``): the
    MACs it had to compute (:func:`klas.train.evaluate.required_macs`) per second of each pass, against a
    bare batched forward of the same models on one eval batch (at most BARE_BATCH images), timed now; per
    wall-clock second (``ratio``) and per CPU second of this process (``cpu_ratio``: steadier on a
    busy machine; on CUDA the wall-clock ratio is the one that counts)."""
    ids = eval_ids(ctx)
    per_image = required_macs(net, ids)
    x = ctx.eval_data.first(min(ctx.cfg.eval_batch_size, BARE_BATCH))
    bare = bare_throughput(net, ids, x, device=ctx.device, amp_dtype=ctx.amp_dtype)
    work = per_image * (ctx.eval_data.n // ctx.world)
    passes = {what: {"seconds": round(wall, 3), "cpu_seconds": round(cpu, 3), "macs_per_s": work / wall,
                     "ratio": work / wall / bare["macs_per_s"], "cpu_ratio": work / cpu / bare["macs_per_cpu_s"]}
              for what, (wall, cpu) in ctx.eval_seconds.items()}
    return {"required_gmacs_per_image": per_image / 1e9, "images": ctx.eval_data.n // ctx.world,
            "batch_size": ctx.cfg.eval_batch_size, "bare_batch": int(x.shape[0]), **{f"bare_{k}": v for k, v in bare.items()},
            "passes": passes,
            "note": "ratio = (required MACs / pass seconds) / (bare forward MACs / second); fvcore MACs"}


def save_state(ctx: RunContext, tr: Trainer, state: RunState) -> None:
    """``checkpoints/last.pt`` after ``state.epoch_done`` epochs (rank 0 writes, all ranks wait)."""
    if ctx.rank == 0:
        state.checkpoint_sha256 = save_checkpoint(ctx.ckpt_path, checkpoint_state(ctx, tr, state))
    dist_barrier()


def checkpoint_state(ctx: RunContext, tr: Trainer, state: RunState) -> dict:
    """Everything a resume needs (:mod:`klas.train.checkpoint`)."""
    def cpu(sd):
        return {k: v.detach().cpu().clone() for k, v in sd.items()}

    net, config = tr.net, ctx.config
    return {
        "selection_sha256": ctx.sel_hash,
        "cache_fingerprint": ctx.cache.fingerprint,
        "config": config,
        "epoch": state.epoch_done,
        "stitch_states": {sid: cpu(net.stitch_layer(sid).state_dict()) for sid in net.stitch_ids},
        "anchor_states": {n: cpu(net.adapter(n).state_dict()) for n in net.anchor_names} if ctx.cfg.full_tune else {},
        "optimizer": tr.opt.state_dict(),
        "scheduler": {"kind": "warmup-cosine", "step": state.epoch_done * config["steps_per_epoch"],
                      "total": config["epochs"] * config["steps_per_epoch"], "warmup": config["warmup"]},
        "scaler": tr.scaler.state_dict(),
        "rng": rng_state(),
        "before": dict(state.before),
        "fit_r2": dict(state.fit_r2),
        "history": list(state.history),
        "layer": net.kind,
    }


_COLUMNS = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} steps/s"),
            TextColumn("[dim]{task.fields[stitch]}"), TimeElapsedColumn())


def run_epoch(ctx: RunContext, tr: Trainer, epoch: int) -> dict:
    """One epoch of joint fine-tuning (each step one sampled network on this rank's share of a global
    batch, gradients averaged over ranks); returns its history record."""
    cfg, steps, world = ctx.cfg, ctx.cfg.steps_per_epoch, ctx.world
    total = cfg.epochs * steps
    warm = warmup_steps_of(cfg.warmup, total)
    positions = epoch_positions(ctx.train_data.n, steps, cfg.batch_size * world, cfg.seed, epoch)
    positions = positions.view(steps, world, cfg.batch_size)[:, ctx.rank].reshape(-1)
    objective = tr.objective_at(epoch, cfg.first_epochs)
    ids, buckets = tr.routes_for(objective)
    sequence = [ids[i] for i in stitch_sequence(len(ids), steps, cfg.sampling, buckets, cfg.seed, epoch)]
    sync = (lambda: _all_reduce_grads(tr.trained_params, world)) if world > 1 else None
    t0 = time.perf_counter()
    losses: list[float] = []
    running = [0.0]  # sum of losses so far, for the bar
    with Progress(*_COLUMNS, console=ctx.console, disable=not ctx.progress or ctx.rank != 0, transient=True) as bar:
        task = bar.add_task(f"epoch {epoch}/{cfg.epochs}", total=steps, loss="-", rate="-", stitch="")

        def on_step(k: int, sid: str, loss: float) -> None:
            losses.append(loss)
            running[0] += loss
            rate = (k + 1) / max(time.perf_counter() - t0, 1e-9)
            bar.update(task, advance=1, loss=f"{running[0] / len(losses):.4f}", rate=f"{rate:.1f}", stitch=sid)

        try:
            fit(tr.net, ctx.train_data, sequence, objective, tr.opt, tr.scaler, positions=positions,
                batch_size=cfg.batch_size, device=ctx.device, schedule=lambda s: warmup_cosine(s, total, warm),
                start_step=(epoch - 1) * steps, amp_dtype=ctx.amp_dtype, sync_grads=sync, on_step=on_step)
        except NonFiniteLoss as exc:
            raise KlasError(f"loss became {exc.value} at epoch {epoch} step {len(losses) + 1} (network {exc.ids}); "
                            f"lower --lr (now {cfg.lr:g}) and train again with --overwrite") from None
    seconds = time.perf_counter() - t0
    return {"epoch": epoch, "loss": running[0] / max(len(losses), 1), "steps": steps, "seconds": seconds,
            "steps_per_s": steps / max(seconds, 1e-9), "lr_end": tr.opt.param_groups[0]["lr"]}


def train_epochs(ctx: RunContext, tr: Trainer, state: RunState) -> None:
    """The remaining epochs (at most ``stop_after`` of them), a checkpoint after each."""
    cfg = ctx.cfg
    ctx.timer.lap("setup")
    ran = 0
    try:
        for epoch in range(state.epoch_done + 1, cfg.epochs + 1):
            if cfg.stop_after is not None and ran >= cfg.stop_after:
                break
            record = run_epoch(ctx, tr, epoch)
            state.history.append(record)
            ctx.say(f"epoch {epoch}/{cfg.epochs}: loss {record['loss']:.4f}, {record['steps']} steps in "
                    f"{record['seconds']:.1f} s ({record['steps_per_s']:.1f} steps/s)")
            state.epoch_done = epoch
            save_state(ctx, tr, state)
            ran += 1
    except KeyboardInterrupt:
        ctx.say(f"[yellow]interrupted[/]: {ctx.ckpt_path} holds epoch {state.epoch_done}; continue with --resume")
        raise


def measure_latencies(ctx: RunContext, net: StitchNet, after: dict[str, float]) -> LatencyReport:
    """Predicted ms of every reported network (the cache's profile for this device and batch) and measured
    ms of those ``--latency`` names (rank 0 only; nothing timed with ``--latency off``)."""
    cfg, ids = ctx.cfg, eval_ids(ctx)
    if ctx.rank != 0:
        return LatencyReport()
    batch = min(cfg.latency_batch, ctx.eval_data.n)
    predicted, profile, _ = predictions(net, ids, ctx.cache, ctx.device, batch)
    chosen = to_time(cfg.latency, ids, {i: net.macs(i) for i in ids}, after, predicted, net.anchor_names)
    x = ctx.eval_data.first(batch)
    with Progress(*_COLUMNS[:3], console=ctx.console, disable=not ctx.progress, transient=True) as bar:
        task = bar.add_task(f"timing {len(chosen)} networks", total=len(chosen), loss="", rate="", stitch="")
        measured, warm = time_networks(net, chosen, x, device=ctx.device, amp=ctx.cache.manifest.get("amp"),
                                       repeats=cfg.latency_repeats, on_done=lambda i: bar.advance(task))
    return LatencyReport(measured, predicted, profile, device_identity(ctx.device, ctx.cache.manifest.get("amp")), warm)


def result_rows(ctx: RunContext, net: StitchNet, state: RunState, after: dict[str, float],
                report: LatencyReport) -> list[dict]:
    """The rows of ``results.parquet`` (:data:`klas.train.results.SCHEMA`): stitches, then anchors."""
    before, nan = state.before, float("nan")
    lat, pred = report.measured, report.predicted
    on = ctx.cfg.latency != "off" or bool(pred)
    timing = {"latency_batch": min(ctx.cfg.latency_batch, ctx.eval_data.n) if on else None,
              "latency_device": str(ctx.device) if on else None}
    rows = []
    for s in ctx.specs:
        rows.append({
            "id": s.id, "kind": "stitch",
            "route": route_string(s.src, s.src_cut, s.dst, s.dst_cut, net.profiles[s.dst].num_blocks),
            "src": s.src, "src_cut": s.src_cut, "dst": s.dst, "dst_cut": s.dst_cut, "layer": ctx.cfg.layer,
            "macs": net.macs(s.id), "gflops": net.macs(s.id) / 1e9, "params": net.params(s.id),
            "acc_before": before[s.id], "acc_after": after[s.id], "init_r2": state.fit_r2.get(s.id, nan),
            "latency_ms": lat.get(s.id, nan), "latency_pred_ms": pred.get(s.id, nan), **timing, "bucket": s.bucket,
            "theta": s.theta, "gamma": s.gamma,
        })
    for name in (a["name"] for a in ctx.selection["anchors"]):
        n = net.profiles[name].num_blocks
        rows.append({
            "id": name, "kind": "anchor", "route": route_string(name, n, None, None, None), "src": name, "src_cut": n,
            "dst": None, "dst_cut": None, "layer": None, "macs": net.macs(name), "gflops": net.macs(name) / 1e9,
            "params": net.params(name), "acc_before": before[name], "acc_after": after[name], "init_r2": nan,
            "latency_ms": lat.get(name, nan), "latency_pred_ms": pred.get(name, nan), **timing, "bucket": -1,
            "theta": nan, "gamma": nan,
        })
    return rows


def write_outputs(ctx: RunContext, rows: list[dict], state: RunState, seconds: float, report: LatencyReport,
                  evaluation: dict | None) -> None:
    """``results.parquet``, then ``train.json`` (the manifest, last); rank 0 writes."""
    if ctx.rank == 0:
        made_from = {"klas.config": sha256_json(ctx.config), "klas.selection_sha256": ctx.sel_hash,
                     "klas.cache_fingerprint": ctx.cache.fingerprint,
                     **({"klas.checkpoint_sha256": state.checkpoint_sha256} if state.checkpoint_sha256 else {})}
        write_results(ctx.run_dir, rows, {**made_from, "klas.accuracy_unit": "fraction", "klas.flops": FLOPS_CONVENTION})
        write_json_atomic(ctx.run_dir / MANIFEST, {
            "format": MANIFEST_FORMAT, "selection_sha256": ctx.sel_hash,
            "cache": {"path": str(ctx.cache.path), "fingerprint": ctx.cache.fingerprint},
            "config": ctx.config, "epochs_done": state.epoch_done,
            "checkpoint": str(ctx.ckpt_path.relative_to(ctx.run_dir)), "checkpoint_sha256": state.checkpoint_sha256,
            "train_split": TRAIN_SPLIT, "train_images": ctx.train_data.n,
            "eval_split": EVAL_SPLIT, "eval_images": ctx.eval_data.n,
            "data_config": ctx.cache.manifest["data"]["preprocess"], "history": state.history, "seconds": seconds,
            "timings_s": {k: round(v, 3) for k, v in ctx.timer.seconds.items()},
            "evaluation": evaluation,
            "latency": _latency_manifest(ctx, rows, report),
            "accuracy_unit": "fraction", "flops": FLOPS_CONVENTION, "versions": package_versions(),
        })
    dist_barrier()


def _latency_manifest(ctx: RunContext, rows: list[dict], report: LatencyReport) -> dict | None:
    """``train.json``'s ``latency``: what was timed, how, and the predictor's error on it."""
    cfg = ctx.cfg
    if cfg.latency == "off" and not report.predicted:
        return None
    return {"mode": cfg.latency, "batch": rows[0]["latency_batch"], "device": report.device,
            "dtype": (report.device or {}).get("dtype"), "repeats": cfg.latency_repeats,
            "statistic": "median ms per forward pass of one batch (after a shared warm-up of the models used)",
            "measured": len(report.measured), "networks": len(rows), "warmup_s": round(report.warmup_seconds, 3),
            "profile": report.profile, "predictor_error": report.summary()}


def _all_reduce_grads(params: list[torch.nn.Parameter], world: int) -> None:
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def _broadcast_module(module: torch.nn.Module) -> None:
    import torch.distributed as dist

    for t in module.state_dict().values():
        dist.broadcast(t, 0)


# -- the entry point -------------------------------------------------------------------------------


@run_writer
def train_run(run_dir: Path | str, config: TrainConfig | None = None, *, console: Console | None = None,
              progress: bool = True, **overrides: Any) -> TrainResult:
    """Train the stitches selected in ``run_dir`` (see the module docstring) and write its results.

    ``config`` holds the options (:class:`~klas.train.config.TrainConfig`, its defaults when None);
    keyword ``overrides`` replace single fields (``train_run(run, epochs=2)``). ``console`` receives
    messages, ``progress`` shows progress bars. Returns a :class:`TrainResult` (``.table()`` renders it).
    """
    t_start = time.perf_counter()
    cfg = (config or TrainConfig()).with_overrides(**overrides) if overrides else (config or TrainConfig())
    run_dir = Path(run_dir)
    ctx = prepare_run(run_dir, cfg, console or make_console(stderr=True), progress)
    tr = build_trainer(ctx)
    state = start_or_resume(ctx, tr)
    train_epochs(ctx, tr, state)
    if state.epoch_done < ctx.cfg.epochs:
        ctx.say(f"stopped after epoch {state.epoch_done}/{ctx.cfg.epochs}; continue with --resume")
        return TrainResult(run_dir, [], ctx.config, state.epoch_done, False, time.perf_counter() - t_start, state.history)
    ctx.timer.lap("train")
    after = evaluate_run(ctx, tr.net, "after")
    ctx.timer.lap("eval_after")
    report = measure_latencies(ctx, tr.net, after)
    ctx.timer.lap("latency")
    evaluation = evaluator_throughput(ctx, tr.net) if ctx.rank == 0 else None
    ctx.timer.lap("throughput_check")
    rows = result_rows(ctx, tr.net, state, after, report)
    seconds = time.perf_counter() - t_start
    write_outputs(ctx, rows, state, seconds, report, evaluation)
    return TrainResult(run_dir, rows, ctx.config, state.epoch_done, True, seconds, state.history, ctx.timer.seconds,
                       evaluation, _latency_manifest(ctx, rows, report))


__all__ = [
    "EVAL_SPLIT", "INITS", "MANIFEST", "RunContext", "RunState", "SAMPLINGS", "TRAIN_SPLIT",
    "TrainConfig", "TrainResult", "Trainer", "build_trainer", "prepare_run", "start_or_resume", "train_epochs",
    "train_run",
]
