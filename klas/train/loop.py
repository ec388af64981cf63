"""Stage 3, ``klas train``: least-squares init, then SN-Net-style joint fine-tuning of the selected stitches.

1. Read ``RUN/selection.json``, open the cache it names (refused when gone or changed), rebuild the
   anchors from it and build one :class:`~klas.stitch.network.StitchNet` holding each anchor once.
2. Fit every linear stitch in one batched pass over ``init_images`` probe-train images
   (:func:`klas.stitch.init.least_squares_init`), then evaluate every stitch and anchor on the eval
   split ("before").
3. Fine-tune jointly: every step samples one stitch (``uniform``, or ``bucket``: a FLOPs bucket first,
   then a stitch in it, as SN-Netv2) and updates its stitch layer on one batch; anchors stay frozen
   unless ``full_tune`` (then they train too, at ``anchor_lr_scale`` x the learning rate). AdamW,
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
from klas.run import (
    EXPORT, SELECTION, TRAIN_MANIFEST, discard, open_run_cache, read_selection, run_writer, stitch_specs,
)
from klas.stitch.init import DEFAULT_INIT_IMAGES, DEFAULT_RIDGE, least_squares_init
from klas.stitch.layers import STITCH_KINDS
from klas.stitch.network import StitchNet, StitchSpec, route_string
from klas.train.checkpoint import checkpoint_path, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from klas.train.data import DEFAULT_PRELOAD_LIMIT_GB, SplitData, epoch_positions, epoch_seed
from klas.train.evaluate import autocast, evaluate_all, measure_latency
from klas.train.losses import loss_string, needs_teacher, parse_loss, stitch_loss
from klas.train.results import RESULTS, write_results
from klas.utils import (
    DEFAULT_ROOT, FLOPS_CONVENTION, dist_barrier, dist_rank_world, package_versions, read_json, resolve_device,
    seed_everything, sha256_json, write_json_atomic,
)

MANIFEST = TRAIN_MANIFEST
MANIFEST_FORMAT = "klas.train/1"
TRAIN_SPLIT = "probe-train"
EVAL_SPLIT = "eval"
SAMPLINGS = ("uniform", "bucket")
INITS = ("ls", "random")
AMPS = ("auto", "bf16", "fp16", "off")
#: Options that must match for ``resume`` to continue a checkpoint.
RESUME_KEYS = ("epochs", "steps_per_epoch", "batch_size", "lr", "weight_decay", "warmup", "loss", "sampling",
               "full_tune", "anchor_lr_scale", "layer", "init", "init_images", "ridge", "temperature", "seed")


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


# -- helpers ---------------------------------------------------------------------------------------


def _amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp not in AMPS:
        raise KlasError(f"unknown --amp {amp!r}; use one of {', '.join(AMPS)}")
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if amp == "bf16" else torch.float16


def _lr_factor(step: int, total: int, warmup_steps: int) -> float:
    """Linear warm-up over ``warmup_steps`` then cosine decay to 0 at ``total``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / span))


def _buckets_of(specs: list[StitchSpec], num_buckets: int) -> list[int]:
    """Each stitch's FLOPs bucket: the selection's, else equal-width MAC bins over the selected range."""
    if all(s.bucket is not None for s in specs):
        return [int(s.bucket) for s in specs]
    macs = [s.macs or 0 for s in specs]
    lo, hi = min(macs), max(macs)
    if hi == lo:
        return [0] * len(specs)
    return [min(num_buckets - 1, int((m - lo) / (hi - lo) * num_buckets)) for m in macs]


def _stitch_sequence(n: int, steps: int, sampling: str, buckets: list[int], seed: int, epoch: int) -> list[int]:
    """Which stitch each step of an epoch trains (indices into the selection), from (seed, epoch) only."""
    g = torch.Generator().manual_seed(epoch_seed(seed, epoch, 1))
    if sampling == "uniform":
        return torch.randint(n, (steps,), generator=g).tolist()
    groups: dict[int, list[int]] = {}
    for i, b in enumerate(buckets):
        groups.setdefault(b, []).append(i)
    keys = sorted(groups)
    out = []
    for _ in range(steps):
        members = groups[keys[int(torch.randint(len(keys), (1,), generator=g))]]
        out.append(members[int(torch.randint(len(members), (1,), generator=g))])
    return out


def _param_groups(net: StitchNet, lr: float, weight_decay: float, full_tune: bool, anchor_lr_scale: float) -> list[dict]:
    """AdamW groups: weight decay on matrices only (not biases / norms); anchors at a lower lr."""
    groups = []
    sources = [("stitch", net.stitch_layers, lr)]
    if full_tune:
        sources.append(("anchor", net.anchors, lr * anchor_lr_scale))
    for name, module, base in sources:
        params = [p for p in module.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        other = [p for p in params if p.ndim < 2]
        groups.append({"params": decay, "weight_decay": weight_decay, "base_lr": base, "lr": base, "name": f"{name}_decay"})
        groups.append({"params": other, "weight_decay": 0.0, "base_lr": base, "lr": base, "name": f"{name}_no_decay"})
    return [g for g in groups if g["params"]]


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


@torch.no_grad()
def _teacher_targets(net: StitchNet, data: SplitData, names: list[str], want_logits: bool, want_feats: bool,
                     batch_size: int, device: torch.device, amp_dtype) -> dict[str, dict[str, torch.Tensor]]:
    """Each target model's own logits / pre-logits features on every training image (original weights)."""
    out: dict[str, dict[str, torch.Tensor]] = {n: {} for n in names}
    if not names:
        return out
    for x, _, p in data.batches(range(data.n), batch_size, device):
        for n in names:
            a = net.adapter(n)
            with autocast(device, amp_dtype):
                h = a.run_blocks(a.stem(x))
                parts = {}
                if want_logits:
                    parts["logits"] = a.head(h)
                if want_feats:
                    parts["features"] = a.pre_logits(h)
            for k, v in parts.items():
                if k not in out[n]:
                    out[n][k] = torch.empty((data.n, v.shape[1]), dtype=torch.float32)
                out[n][k][p] = v.float().cpu()
    return out


# -- the entry point -------------------------------------------------------------------------------


@run_writer
def train_run(
    run_dir: Path | str,
    *,
    epochs: int = 5,
    steps_per_epoch: int | None = None,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    warmup: float = 0.1,
    loss: str = "ce",
    temperature: float = 1.0,
    sampling: str = "uniform",
    full_tune: bool = False,
    anchor_lr_scale: float = 0.1,
    layer: str | None = None,
    init: str = "ls",
    init_images: int = DEFAULT_INIT_IMAGES,
    ridge: float = DEFAULT_RIDGE,
    resume: bool = False,
    overwrite: bool = False,
    stop_after: int | None = None,
    eval_batch_size: int = 256,
    latency: bool = True,
    latency_batch: int = 64,
    latency_repeats: int = 5,
    amp: str = "auto",
    device: str | None = None,
    seed: int = 0,
    root: Path = DEFAULT_ROOT,
    preload_limit_gb: float = DEFAULT_PRELOAD_LIMIT_GB,
    workers: int = 0,
    console: Console | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train the stitches selected in ``run_dir`` (see the module docstring) and write its results.

    Options (CLI flags of ``klas train`` map one to one):

    * ``epochs`` (5): passes over the probe-train split; ``steps_per_epoch`` (None = ceil(N / global batch)).
    * ``batch_size`` (64, per process), ``lr`` (1e-3, AdamW, for stitch layers), ``weight_decay`` (0.05, on
      weight matrices only), ``warmup`` (0.1: fraction of all steps in linear warm-up, then cosine to 0).
    * ``loss`` ("ce"): ``ce``, ``distill`` (KL to the target model's own logits, label-free), ``ffm``
      (MSE to its pre-logits features, label-free) or weighted sums like ``"ce=1,ffm=0.5"``;
      ``temperature`` (1.0) for ``distill``.
    * ``sampling`` ("uniform" | "bucket"): which stitch each step trains.
    * ``full_tune`` (False): also fine-tune the anchors, at ``anchor_lr_scale`` (0.1) x ``lr``.
    * ``layer`` (None = the selection's, "linear"): stitch layer kind, "linear" or "mlp".
    * ``init`` ("ls" | "random"), ``init_images`` (100) and ``ridge`` (1e-4, relative) for the least-squares fit.
    * ``resume`` (False): continue ``checkpoints/last.pt`` (same selection and options required);
      ``overwrite`` (False): start over although a checkpoint exists; ``stop_after`` (None): return after
      this many epochs of this invocation, leaving a checkpoint to resume.
    * ``eval_batch_size`` (256); ``latency`` (True), ``latency_batch`` (64), ``latency_repeats`` (5).
    * ``amp`` ("auto": bf16, else fp16, on CUDA; never on CPU), ``device`` (None = CUDA when present),
      ``seed`` (0), ``root`` (klas cache root, for demo weights and data), ``preload_limit_gb`` (2.0),
      ``workers`` (0, DataLoader workers when a split is streamed), ``console``, ``progress`` (True).

    Returns a :class:`TrainResult` (``.table()`` renders it).
    """
    t_start = time.perf_counter()
    run_dir = Path(run_dir)
    console = console or Console(stderr=True)

    # -- validate everything before touching anything ---------------------------------------------
    selection = read_selection(run_dir)
    specs = stitch_specs(selection)
    if not specs:
        raise KlasError(f"selection {run_dir / SELECTION} has no stitches; search again with a larger --budget")
    weights = parse_loss(loss)
    layer = layer or selection.get("layer") or "linear"
    checks = [
        (layer in STITCH_KINDS, f"unknown --layer {layer!r}; use one of {', '.join(STITCH_KINDS)}"),
        (sampling in SAMPLINGS, f"unknown --sampling {sampling!r}; use one of {', '.join(SAMPLINGS)}"),
        (init in INITS, f"unknown --init {init!r}; use one of {', '.join(INITS)}"),
        (isinstance(epochs, int) and epochs >= 1, f"--epochs must be a positive integer, got {epochs!r}"),
        (steps_per_epoch is None or steps_per_epoch >= 1, f"--steps-per-epoch must be positive, got {steps_per_epoch!r}"),
        (batch_size >= 1, f"--batch-size must be positive, got {batch_size!r}"),
        (eval_batch_size >= 1, f"--eval-batch-size must be positive, got {eval_batch_size!r}"),
        (latency_batch >= 1, f"--latency-batch must be positive, got {latency_batch!r}"),
        (lr > 0 and math.isfinite(lr), f"--lr must be a positive number, got {lr!r}"),
        (0 <= weight_decay < math.inf, f"--weight-decay must be a number >= 0, got {weight_decay!r}"),
        (0 <= warmup < 1, f"--warmup must lie in [0, 1), got {warmup!r}"),
        (0 < anchor_lr_scale < math.inf, f"--anchor-lr-scale must be a positive number, got {anchor_lr_scale!r}"),
        (0 < temperature < math.inf, f"--temperature must be a positive number, got {temperature!r}"),
        (init_images >= 1, f"--init-images must be positive, got {init_images!r}"),
        (0 <= ridge < math.inf, f"--ridge must be a number >= 0, got {ridge!r}"),
        (preload_limit_gb >= 0, f"--preload-limit-gb must be >= 0, got {preload_limit_gb!r}"),
        (workers >= 0, f"--workers must be >= 0, got {workers!r}"),
        (stop_after is None or stop_after >= 1, f"--stop-after must be positive, got {stop_after!r}"),
        (latency_repeats >= 1, "--latency-repeats must be positive"),
    ]
    for ok, message in checks:
        if not ok:
            raise KlasError(message)
    ckpt_path = checkpoint_path(run_dir)
    ckpt = None
    sel_hash = sha256_json(selection)
    if resume:
        ckpt = load_checkpoint(ckpt_path)
        if ckpt.get("selection_sha256") != sel_hash:
            raise KlasError(
                f"checkpoint {ckpt_path} was trained on another selection than {run_dir / SELECTION}; "
                f"train without --resume and with --overwrite to start over"
            )
    elif (ckpt_path.is_file() or (run_dir / RESULTS).is_file()) and not overwrite:
        raise KlasError(f"run {run_dir} already has training output; pass --resume to continue it or --overwrite to start over")

    cache = open_run_cache(selection, run_dir)
    rank, world = dist_rank_world()
    dev = resolve_device(device)
    if dev.type == "cuda" and world > 1 and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
    amp_dtype = _amp_dtype(amp, dev)
    say = console.print if rank == 0 else (lambda *a, **k: None)

    timings: dict[str, float] = {}
    mark = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        timings[name] = timings.get(name, 0.0) + now - mark
        mark = now

    train_data = SplitData(cache, TRAIN_SPLIT, root=root, preload_limit_gb=preload_limit_gb, workers=workers)
    eval_data = SplitData(cache, EVAL_SPLIT, root=root, preload_limit_gb=preload_limit_gb, workers=workers)
    lap("data")
    global_batch = batch_size * world
    steps = steps_per_epoch or math.ceil(train_data.n / global_batch)
    config: dict[str, Any] = {
        "epochs": epochs, "steps_per_epoch": steps, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
        "warmup": warmup, "loss": loss_string(weights), "sampling": sampling, "full_tune": bool(full_tune),
        "anchor_lr_scale": anchor_lr_scale, "layer": layer, "init": init, "init_images": init_images,
        "ridge": ridge, "temperature": temperature, "seed": seed,
        "world_size": world, "device": str(dev), "amp": str(amp_dtype).removeprefix("torch.") if amp_dtype else "off",
    }
    if ckpt is not None:
        old = ckpt.get("config", {})
        diff = [f"{k}={old.get(k)!r} (now {config[k]!r})" for k in RESUME_KEYS if old.get(k) != config[k]]
        if diff:
            raise KlasError(f"checkpoint {ckpt_path} was made with other options: {'; '.join(diff)}; "
                            f"resume with the same options, or pass --overwrite without --resume to start over")
        moved = [f"{k} {old.get(k)} -> {config[k]}" for k in ("world_size", "device", "amp") if old.get(k) != config[k]]
        if moved:
            say(f"[yellow]note:[/] resuming with {', '.join(moved)}; results may differ from an uninterrupted run")

    # -- build ------------------------------------------------------------------------------------
    seed_everything(seed)
    used = list(dict.fromkeys([a["name"] for a in selection["anchors"]] + [n for s in specs for n in (s.src, s.dst)]))
    missing = [n for n in used if n not in cache.model_names]
    if missing:
        raise KlasError(f"selection names models {missing} that cache {cache.path} does not hold; rerun klas search")
    say(f"loading {len(used)} models from {cache.path} ...")
    models = [m for m in cache.load_models(device=dev, root=root) if m.name in used]
    net = StitchNet.from_loaded(models, specs, kind=layer).to(dev)
    anchor_ids = [a["name"] for a in selection["anchors"]]
    stitch_ids = [s.id for s in specs]
    eval_ids = stitch_ids + anchor_ids
    data_config = cache.manifest["data"]["preprocess"]

    lap("models")
    want_logits, want_feats = needs_teacher(weights)
    dst_names = sorted({s.dst for s in specs})
    teacher = _teacher_targets(net, train_data, dst_names if (want_logits or want_feats) else [], want_logits,
                               want_feats, eval_batch_size, dev, amp_dtype)

    if full_tune:
        for p in net.anchors.parameters():
            p.requires_grad_(True)
    groups = _param_groups(net, lr, weight_decay, full_tune, anchor_lr_scale)
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    trained_params = [p for g in groups for p in g["params"]]
    total_steps = epochs * steps
    warmup_steps = max(1, round(warmup * total_steps)) if warmup > 0 else 0
    buckets = _buckets_of(specs, int(selection.get("buckets") or 20))

    lap("teacher_targets")
    fit_r2: dict[str, float] = {}
    if ckpt is None:
        if init == "ls":
            g = torch.Generator().manual_seed(epoch_seed(seed, 0, 2))
            pos = torch.randperm(train_data.n, generator=g)[: min(init_images, train_data.n)].sort().values
            say(f"least-squares init of {len(specs)} {layer} stitches on {len(pos)} probe-train images ...")
            reports = least_squares_init(net, (x for x, _, _ in train_data.batches(pos, eval_batch_size, dev)), ridge=ridge)
            fit_r2 = {k: v.r2 for k, v in reports.items()}
            lap("ls_init")
        if world > 1:
            _broadcast_module(net.stitch_layers)
        if rank == 0:  # outputs of an earlier training (and the front exported from it) are now stale
            discard(run_dir, (RESULTS, MANIFEST, EXPORT))
        before = _evaluate(net, eval_data, eval_ids, eval_batch_size, dev, amp_dtype, rank, world, console,
                           progress, "evaluating (before)")
        lap("eval_before")
        epoch_done, history = 0, []
        state = _state(net, opt, scaler, config, sel_hash, 0, before, fit_r2, history, full_tune)
        if rank == 0:
            save_checkpoint(ckpt_path, state)
        dist_barrier()
    else:
        before, fit_r2, history = ckpt["before"], ckpt.get("fit_r2", {}), list(ckpt.get("history", []))
        epoch_done = int(ckpt["epoch"])
        for sid, sd in ckpt["stitch_states"].items():
            net.stitch_layer(sid).load_state_dict(sd)
        if full_tune:
            for name, sd in ckpt["anchor_states"].items():
                net.adapter(name).load_state_dict(sd)
        opt.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        say(f"resuming {run_dir} at epoch {epoch_done}/{epochs}")

    # -- train ------------------------------------------------------------------------------------
    lap("setup")
    ran = 0
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} steps/s"),
               TextColumn("[dim]{task.fields[stitch]}"), TimeElapsedColumn())
    try:
        for epoch in range(epoch_done + 1, epochs + 1):
            if stop_after is not None and ran >= stop_after:
                break
            net.train()
            positions = epoch_positions(train_data.n, steps, global_batch, seed, epoch)
            positions = positions.view(steps, world, batch_size)[:, rank].reshape(-1)
            sequence = _stitch_sequence(len(specs), steps, sampling, buckets, seed, epoch)
            batches = train_data.batches(positions, batch_size, dev)
            t0 = time.perf_counter()
            loss_sum, loss_n = 0.0, 0
            with Progress(*columns, console=console, disable=not progress or rank != 0, transient=True) as bar:
                task = bar.add_task(f"epoch {epoch}/{epochs}", total=steps, loss="-", rate="-", stitch="")
                for k in range(steps):
                    step = (epoch - 1) * steps + k
                    factor = _lr_factor(step, total_steps, warmup_steps)
                    for grp in opt.param_groups:
                        grp["lr"] = grp["base_lr"] * factor
                    spec = specs[sequence[k]]
                    x, y, p = next(batches)
                    model = net.model(spec.id)
                    with autocast(dev, amp_dtype):
                        if want_feats:
                            logits, feats = model.logits_and_features(x)
                        else:
                            logits, feats = model(x), None
                    t = teacher.get(spec.dst, {})
                    total, _ = stitch_loss(
                        weights, logits, y, feats,
                        t["logits"][p].to(dev) if "logits" in t else None,
                        t["features"][p].to(dev) if "features" in t else None,
                        temperature,
                    )
                    if not torch.isfinite(total):
                        raise KlasError(f"loss became {float(total)} at epoch {epoch} step {k + 1} (stitch {spec.id}); "
                                        f"lower --lr (now {lr:g}) and train again with --overwrite")
                    scaler.scale(total).backward()
                    if world > 1:
                        _all_reduce_grads(trained_params, world)
                    scaler.step(opt)
                    scaler.update()
                    opt.zero_grad(set_to_none=True)
                    loss_sum += float(total.detach())
                    loss_n += 1
                    rate = (k + 1) / max(time.perf_counter() - t0, 1e-9)
                    bar.update(task, advance=1, loss=f"{loss_sum / loss_n:.4f}", rate=f"{rate:.1f}", stitch=spec.id)
            seconds = time.perf_counter() - t0
            record = {"epoch": epoch, "loss": loss_sum / max(loss_n, 1), "steps": steps, "seconds": seconds,
                      "steps_per_s": steps / max(seconds, 1e-9), "lr_end": opt.param_groups[0]["lr"]}
            history.append(record)
            say(f"epoch {epoch}/{epochs}: loss {record['loss']:.4f}, {steps} steps in {seconds:.1f} s "
                f"({record['steps_per_s']:.1f} steps/s)")
            state = _state(net, opt, scaler, config, sel_hash, epoch, before, fit_r2, history, full_tune)
            if rank == 0:
                save_checkpoint(ckpt_path, state)
            dist_barrier()
            epoch_done = epoch
            ran += 1
    except KeyboardInterrupt:
        say(f"[yellow]interrupted[/]: {ckpt_path} holds epoch {epoch_done}; continue with --resume")
        raise

    if epoch_done < epochs:
        say(f"stopped after epoch {epoch_done}/{epochs}; continue with --resume")
        return TrainResult(run_dir, [], config, epoch_done, False, time.perf_counter() - t_start, history)

    # -- evaluate, time, write --------------------------------------------------------------------
    lap("train")
    after = _evaluate(net, eval_data, eval_ids, eval_batch_size, dev, amp_dtype, rank, world, console, progress,
                      "evaluating (after)")
    lap("eval_after")
    lat: dict[str, float] = {}
    lat_batch = min(latency_batch, eval_data.n) if latency else None
    lat_device = str(dev) if latency else None
    if latency and rank == 0:
        x = eval_data.first(latency_batch)
        with Progress(*columns[:3], console=console, disable=not progress, transient=True) as bar:
            task = bar.add_task("timing", total=len(eval_ids), loss="", rate="", stitch="")
            for i in eval_ids:
                lat[i] = measure_latency(net.model(i), x, device=dev, amp_dtype=amp_dtype, repeats=latency_repeats)
                bar.advance(task)
    lap("latency")
    rows = []
    for s in specs:
        n_b = net.profiles[s.dst].num_blocks
        rows.append({
            "id": s.id, "kind": "stitch", "route": route_string(s.src, s.src_cut, s.dst, s.dst_cut, n_b),
            "src": s.src, "src_cut": s.src_cut, "dst": s.dst, "dst_cut": s.dst_cut, "layer": layer,
            "macs": net.macs(s.id), "gflops": net.macs(s.id) / 1e9, "params": net.params(s.id),
            "acc_before": before[s.id], "acc_after": after[s.id], "init_r2": fit_r2.get(s.id, float("nan")),
            "latency_ms": lat.get(s.id, float("nan")), "latency_batch": lat_batch, "latency_device": lat_device,
            "bucket": s.bucket, "theta": s.theta, "gamma": s.gamma,
        })
    for name in anchor_ids:
        n = net.profiles[name].num_blocks
        rows.append({
            "id": name, "kind": "anchor", "route": route_string(name, n, None, None, None), "src": name, "src_cut": n,
            "dst": None, "dst_cut": None, "layer": None, "macs": net.macs(name), "gflops": net.macs(name) / 1e9,
            "params": net.params(name), "acc_before": before[name], "acc_after": after[name], "init_r2": float("nan"),
            "latency_ms": lat.get(name, float("nan")), "latency_batch": lat_batch, "latency_device": lat_device, "bucket": -1, "theta": float("nan"), "gamma": float("nan"),
        })
    seconds = time.perf_counter() - t_start
    if rank == 0:
        write_results(run_dir, rows, {"klas.config": sha256_json(config), "klas.selection_sha256": sel_hash,
                                      "klas.accuracy_unit": "fraction", "klas.flops": FLOPS_CONVENTION})
        write_json_atomic(run_dir / MANIFEST, {
            "format": MANIFEST_FORMAT, "selection_sha256": sel_hash, "cache": {"path": str(cache.path), "fingerprint": cache.fingerprint},
            "config": config, "epochs_done": epoch_done, "checkpoint": str(ckpt_path.relative_to(run_dir)),
            "train_split": TRAIN_SPLIT, "train_images": train_data.n, "eval_split": EVAL_SPLIT, "eval_images": eval_data.n,
            "data_config": data_config, "history": history, "seconds": seconds,
            "timings_s": {k: round(v, 3) for k, v in timings.items()},
            "latency": {"batch": lat_batch, "device": lat_device, "repeats": latency_repeats,
                        "statistic": "median ms per forward pass of one batch"} if latency else None,
            "accuracy_unit": "fraction", "flops": FLOPS_CONVENTION, "versions": package_versions(),
        })
    dist_barrier()
    return TrainResult(run_dir, rows, config, epoch_done, True, seconds, history, timings)


def _evaluate(net, data, ids, batch_size, dev, amp_dtype, rank, world, console, progress, what) -> dict[str, float]:
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, disable=not progress or rank != 0, transient=True) as bar:
        task = bar.add_task(f"{what}: {len(ids)} networks", total=data.n // world)
        return evaluate_all(net, data, ids, batch_size=batch_size, device=dev, amp_dtype=amp_dtype, rank=rank,
                            world=world, on_batch=lambda n: bar.advance(task, n))


def _state(net: StitchNet, opt, scaler, config, sel_hash, epoch, before, fit_r2, history, full_tune) -> dict:
    def cpu(sd):
        return {k: v.detach().cpu().clone() for k, v in sd.items()}

    return {
        "selection_sha256": sel_hash,
        "config": config,
        "epoch": epoch,
        "stitch_states": {sid: cpu(net.stitch_layer(sid).state_dict()) for sid in net.stitch_ids},
        "anchor_states": {n: cpu(net.adapter(n).state_dict()) for n in net.anchor_names} if full_tune else {},
        "optimizer": opt.state_dict(),
        "scheduler": {"kind": "warmup-cosine", "step": epoch * config["steps_per_epoch"],
                      "total": config["epochs"] * config["steps_per_epoch"], "warmup": config["warmup"]},
        "scaler": scaler.state_dict(),
        "rng": rng_state(),
        "before": dict(before),
        "fit_r2": dict(fit_r2),
        "history": list(history),
        "layer": net.kind,
    }
