"""``klas cache``: run k models once over the calibration splits and store what every block sees.

Storage: one ``(N, F)`` float16 ``.npy`` per split and model, opened with ``np.lib.format.open_memmap``.
We measured Arrow IPC against .npy memmaps (``python benchmarks/bench_storage.py``, 20k x 1536
float16): both open zero-copy; a full read took 0.09 s (npy) vs 0.10 s (Arrow), one
representation's columns 0.011 s vs 0.026 s, writing in row batches 0.095 s vs 0.074 s, all small
next to the forward passes. The deciding difference: an IPC file is written front to back, while a
preallocated .npy can be written at any row. That makes the cache resumable (finished batches are
simply skipped) and lets torchrun ranks write disjoint batches of one file with no merge step.

Atomicity: ``manifest.json`` is written last, atomically (:mod:`klas.fs`); until then a state file marks the
directory as partial and per-rank progress files list the finished batches. A batch's rows are
flushed before it is recorded as finished, so a kill at any moment loses at most the batch in flight.
Batches are fixed by (split, batch size), so every image is computed in the same batch whether the
run was interrupted, resumed or sharded; the result is identical to an uninterrupted run. Progress
files are replaced atomically, and a damaged one counts as "no batches done" (they are recomputed).

Safety: ``--out`` must be new, empty or a klas cache (:func:`klas.fs.claim_dir`); ``--overwrite``
clears only such a directory (:func:`klas.fs.clear_dir`), never a user's. Rank 0 holds a
:class:`klas.fs.DirLock` on it for the whole build. A batch with NaN or inf in any model's float16
features or logits stops the build with the model's name, recorded in the state file. The manifest
records every array's size, mtime and sha256 (:mod:`klas.cache.integrity`); ``open_cache`` checks them.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from klas.cache.integrity import VERIFIED, record_files
from klas.cache.reader import FORMAT, MANIFEST, STATE, Cache, array_paths, open_cache, recognise_cache
from klas.errors import KlasError
from klas.fs import (
    LOCK, MARKER, DirLock, DiskFull, allocate, atomic_path, check_free_space, claim_dir, clear_dir, ensure_writable_dir,
    format_bytes, write_json_atomic,
)
from klas.config import STITCH_KINDS, CacheConfig
from klas.models import (
    LoadedModel, ModelSpec, Profile, check_random_init, describe_device, device_identity, load_model, parse_spec,
)
from klas.optim import AMP_DTYPES, autocast, parse_amp
from klas.stitch.latency import measure_profile, measure_steps, missing_batches, write_profiles
from klas.term import make_console
from klas.utils import DEFAULT_ROOT, dist_barrier, dist_rank_world, package_versions, resolve_device, sha256_json

PROGRESS_DIR = ".progress"


@dataclass
class CacheSummary:
    """What ``build_cache`` did, for the CLI's table."""

    path: Path
    rows: list[dict] = field(default_factory=list)  # per model: name, blocks, gflops, images, bytes
    images: int = 0  # images run through the models in this call (0 when already complete)
    seconds: float = 0.0
    status: str = "written"  # "written" | "resumed" | "up to date" | "up to date, verified" | "verified" | "shard"
    latency: list[dict] = field(default_factory=list)  # latency profiles measured in this call: batch, device, seconds


def feature_columns(loaded: LoadedModel) -> list[dict[str, list[int]]]:
    """Column ranges of every (representation, pool) in features.npy, in write order."""
    cols, start = [], 0
    for rep in loaded.profile.reps:
        entry = {}
        for pool in loaded.adapter.pool_names:
            entry[pool] = [start, start + rep.width]
            start += rep.width
        cols.append(entry)
    return cols


@torch.inference_mode()
def pooled_forward(adapter, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (B, 3, H, W) -> pooled features of every representation (B, F) and logits (B, C)."""
    h = adapter.stem(x)
    parts = list(adapter.pool(h).values())
    for block in adapter.blocks:
        h = block(h)
        parts.extend(adapter.pool(h).values())
    logits = adapter.head(h)
    return torch.cat([p.float() for p in parts], dim=1), logits.float()


@dataclass
class _Job:
    """What the forward passes of one ``build_cache`` call share."""

    out: Path
    source: Any
    loaded: list[LoadedModel]
    transform: Callable
    device: torch.device
    amp: str | None
    batch_size: int
    workers: int
    rank: int
    world: int

    def autocast(self):
        return autocast(self.device, AMP_DTYPES.get(self.amp))


#: Older formats whose caches of the same configuration are rebuilt without --overwrite (derived data only).
UPGRADES = ("klas.cache/1",)


#: Caches of klas.cache/2 written before each model had its own normalisation (every model saw the
#: first model's mean and std): where that differs from what a model sees now, they are rebuilt.
SHARED_NORMALISATION = "klas.cache/2, one normalisation"


def _fingerprint(loaded: list[LoadedModel], data: dict, splits: Sequence[str], amp: str | None, fmt: str = FORMAT,
                 inputs: Sequence[dict] = ()) -> str:
    """The configuration's hash; ``inputs`` (what each model sees) only counts where a model's
    normalisation differs from the shared one, so caches of models that agree keep their fingerprint."""
    shared = data["preprocess"]
    own = {m.name: [i["mean"], i["std"]] for m, i in zip(loaded, inputs)
           if fmt == FORMAT and [i["mean"], i["std"]] != [list(shared["mean"]), list(shared["std"])]}
    return sha256_json({
        "format": FORMAT if fmt == SHARED_NORMALISATION else fmt,
        "models": [[str(m.spec), m.weights_sha256] for m in loaded],
        "data": {k: data[k] for k in ("fingerprint", "seed", "fractions", "limit", "preprocess")},
        "splits": list(splits),
        "amp": amp,
        **({"normalisation": own} if own else {}),
    })


def _check_models(models: Sequence[str], random_init: bool = False) -> list[ModelSpec]:
    """Refuse bad ``--model`` arguments before anything is loaded or written: one message naming the value."""
    if not models:
        raise KlasError("no models given; pass --model NAME at least once")
    specs = [parse_spec(m) for m in models]
    check_random_init(specs, random_init)
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        twice = max(names, key=names.count)
        raise KlasError(f"two models named {twice}; give one an alias: --model {twice} --model other:{twice}=weights.pth")
    return specs


def _device(device: str | None, amp: str | None, rank: int, world: int) -> tuple[torch.device, str | None]:
    """The device this rank computes on and the mixed precision it uses ("bf16" | "fp16" | None).

    ``amp`` takes klas's one ``--amp`` vocabulary (:func:`klas.optim.parse_amp`); the resolved name
    is what the cache's fingerprint records.
    """
    dev = resolve_device(device)
    if world > 1 and dev.type == "cuda":
        dev = torch.device("cuda", rank % torch.cuda.device_count())
    dtype = parse_amp(amp, dev)
    return dev, {v: k for k, v in AMP_DTYPES.items()}.get(dtype)


def _check_root(root: Path, data: str, specs: Sequence[ModelSpec], random_init: bool) -> None:
    """Fail at once when this build must write under --root (digits images, demo weights) and cannot."""
    from klas.data.digits import DIGITS_SETS, digits_cache_path
    from klas.zoo import is_zoo_model, stale_models, zoo_dir

    zoo = [s.arch for s in specs if s.path is None and is_zoo_model(s.arch)] if not random_init else []
    if str(data) in DIGITS_SETS and not digits_cache_path(root, DIGITS_SETS[str(data)]).is_file():
        ensure_writable_dir(root, "--root")
    if zoo and stale_models(root, zoo):
        ensure_writable_dir(root, "--root")
        ensure_writable_dir(zoo_dir(root), "--root")


def _load_models(specs, preprocess, random_init, root, dev, seed, num_classes) -> tuple[list[LoadedModel], dict, list[dict]]:
    """Load every model at the shared input size and let each normalise the shared pixels for itself.

    The shared preprocessing (resolution, resize, crop, and the normalisation of the images every
    model is fed) is the first model's timm data config, overridden by ``preprocess``; each model
    converts those images to its own mean and std (:meth:`LoadedModel.feed`). Returns the models, the
    shared config and what each model sees.
    """
    kw = dict(random_init=random_init, root=root, device=dev, seed=seed, num_classes=num_classes)
    first = load_model(specs[0], **kw)
    config = {**first.data_config, **(preprocess or {})}
    size = tuple(config["input_size"])
    if size != tuple(first.data_config["input_size"]):
        first = load_model(specs[0], input_size=size, **kw)
    loaded = [first, *(load_model(s, input_size=size, **kw) for s in specs[1:])]
    return loaded, config, [m.feed(config) for m in loaded]


def _read_dict(path: Path) -> dict | None:
    """A JSON object from ``path``, or None when it is unreadable or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _existing(out: Path, fingerprints: dict[str, str], batch_size: int) -> tuple[str, str]:
    """What ``out`` holds: ("empty" | "up to date" | "resumed" | "other", why "other" needs --overwrite).

    ``fingerprints`` maps each format to this configuration's fingerprint in it; a cache of the same
    configuration in an older format counts as "empty" (rebuilt in the current format).
    """
    manifest, state = out / MANIFEST, out / STATE
    fingerprint = fingerprints[FORMAT]
    if manifest.is_file():
        old = _read_dict(manifest)
        if old is None:
            return "other", f"{out} holds an unreadable cache manifest; pass --overwrite to rebuild the cache"
        if old.get("format") != FORMAT and old.get("fingerprint") == fingerprints.get(old.get("format")):
            return "empty", ""
        if old.get("fingerprint") == fingerprints[SHARED_NORMALISATION] != fingerprint:
            return "empty", ""  # these models, fed one normalisation by an older klas: rebuilt with their own
        if old.get("format") != FORMAT:
            return "other", (f"{out} holds a cache in format {old.get('format')} of an older klas, without file "
                             f"checksums; pass --overwrite to rebuild it as {FORMAT}")
        if old.get("fingerprint") == fingerprint:
            return "up to date", ""
        return "other", (f"{out} holds a cache of another configuration (models, weights, data or splits differ); "
                         "choose another --out or pass --overwrite")
    if state.is_file():
        old = _read_dict(state) or {}
        if old.get("fingerprint") == fingerprint and old.get("batch_size") == batch_size:
            return ("resumed" if old.get("ready") else "empty"), ""
        what = "batch size" if old.get("fingerprint") == fingerprint else "configuration"
        return "other", (f"{out} holds a partial cache of another {what}; re-run the original command to finish it "
                         "or pass --overwrite to start again")
    leftovers = sorted(p.name for p in out.iterdir() if p.name not in (MARKER, LOCK, VERIFIED))
    if leftovers:
        return "other", f"{out} holds files of an unfinished klas cache ({leftovers[0]}); pass --overwrite to clear them"
    return "empty", ""


def _prepare_dir(out: Path, fingerprints: dict[str, str], batch_size: int, overwrite: bool) -> str:
    """Decide between "written" (cleared for a fresh start), "resumed" and "up to date".

    Another configuration's files are refused unless --overwrite; even then only a directory klas
    owns is cleared (:func:`klas.fs.clear_dir`).
    """
    kind, why = _existing(out, fingerprints, batch_size)
    if kind in ("up to date", "resumed") and not overwrite:
        return kind
    if kind == "other" and not overwrite:
        raise KlasError(why)
    (out / MANIFEST).unlink(missing_ok=True)  # first: a half-cleared directory must never look complete
    clear_dir(out, "cache")
    return "written"


def _write_state(out: Path, fingerprint: str, batch_size: int, ready: bool, error: str | None = None) -> None:
    """The state file of an unfinished cache; ``ready`` once every array file exists at full size."""
    state = {"fingerprint": fingerprint, "batch_size": batch_size, "ready": ready}
    write_json_atomic(out / STATE, {**state, **({"error": error} if error else {})})


def _fail(job: _Job, message: str) -> None:
    """Record why the build stopped in the state file (rank 0; open_cache shows it), then raise it."""
    state = _read_dict(job.out / STATE) if job.rank == 0 else None
    if state is not None:
        write_json_atomic(job.out / STATE, {**state, "error": message})
    raise KlasError(message)


def _non_finite(model: str, split: str, amp: str | None) -> str:
    why = ("its weights hold NaN/inf, or its activations overflow float16 under --amp fp16: check the weights "
           "or use --amp bf16" if amp == "fp16" else
           "its weights hold NaN/inf, or its activations exceed float16's range (65504) that the cache stores: "
           "check the weights file")
    return f"model {model} gives NaN or inf features or logits on split {split}; {why}"


_PROGRESS_NAME = re.compile(r"(?P<split>.+)\.rank(?P<rank>\d+)\.npy")


def _read_progress(path: Path) -> list[int]:
    """Finished batch numbers in one progress file; a missing or damaged file counts as none done."""
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return []
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        return []
    return [int(b) for b in arr]


def _done_batches(out: Path, split: str) -> set[int]:
    done: set[int] = set()
    for f in (out / PROGRESS_DIR).glob(f"{split}.rank*.npy"):
        m = _PROGRESS_NAME.fullmatch(f.name)
        if m and m["split"] == split:
            done.update(_read_progress(f))
    return done


def _save_progress(out: Path, split: str, rank: int, done: list[int]) -> None:
    """Replace this rank's progress file atomically (the temporary name starts with '.': no glob sees it)."""
    with atomic_path(out / PROGRESS_DIR / f"{split}.rank{rank}.npy") as tmp:
        np.save(tmp, np.asarray(sorted(done), dtype=np.int64))


def _create_files(out: Path, splits: dict, loaded: list[LoadedModel], widths: list[int]) -> None:
    """Every array at full size, its disk blocks allocated (:func:`klas.fs.allocate`): rows are later
    written through memory maps, which must never meet a full disk (SIGBUS)."""
    for name, split in splits.items():
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        for file, values in (("ids.npy", split.ids), ("labels.npy", split.labels)):
            with atomic_path(d / file) as tmp:
                np.save(tmp, values.astype(np.int64))
        for m, width in zip(loaded, widths):
            (d / m.name).mkdir(exist_ok=True)
            n = len(split.ids)
            for file, shape in (("features.npy", (n, width)), ("logits.npy", (n, m.adapter.num_classes))):
                np.lib.format.open_memmap(d / m.name / file, "w+", np.float16, shape).flush()
                allocate(d / m.name / file)


def _progress(console: Console, enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description:<22}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("images"),
        TextColumn("[cyan]{task.fields[ips]:>7.0f} img/s"),
        TimeElapsedColumn(),
        console=console,
        disable=not enabled,
    )


def build_cache(
    models: Sequence[str],
    data: str,
    out: Path | str,
    config: CacheConfig | None = None,
    *,
    console: Console | None = None,
    progress: bool = True,
    on_loaded: Callable[[dict[str, Profile]], None] | None = None,
    **overrides: Any,
) -> CacheSummary:
    """Cache per-block pooled features and logits of ``models`` on ``data``; see docs/formats.md.

    ``config`` holds the options (:class:`~klas.config.CacheConfig`, its defaults when None); keyword
    ``overrides`` replace single fields (``build_cache(models, "digits", out, limit=100)``).
    ``preprocess`` overrides keys of the first model's timm data config (e.g. ``{"input_size": [3, 64, 64]}``);
    all models see the same pixels (resolution, resize, crop), each normalised with its own mean and
    std (recorded per model as ``input`` in the manifest). A model without a classifier gets a seeded
    linear head for the data's classes (``added_head``). Resumes a partial cache of the same configuration.
    ``workers``: DataLoader processes, ``"auto"`` (see :func:`klas.data.resolve_workers`) or a number.
    ``verify``: when the cache is already complete, check every file's sha256 (not only sizes and mtimes).
    ``latency_batch``: the batch sizes this device's latency profile is measured at (``latency.json``,
    :mod:`klas.stitch.latency`), also for a cache that is already complete; () measures none.
    ``on_loaded(profiles)``: called once on rank 0 when every model is loaded and profiled, before any
    image is computed (the CLI prints the stitch compatibility report there).

    ``out`` must be new, empty or a klas cache directory; ``overwrite`` only ever clears a klas cache.
    Everything that can be refused (arguments, --out, --root, a second writer) is refused before any
    model is loaded.
    """
    from klas.data import resolve_workers

    start = time.perf_counter()
    cfg = (config or CacheConfig()).with_overrides(**overrides) if overrides else (config or CacheConfig())
    out = Path(out)
    specs = _check_models(models, cfg.random_init)
    rank, world = dist_rank_world()
    dev, amp = _device(cfg.device, cfg.amp, rank, world)
    req = _Request(specs, str(data), out, cfg, resolve_workers(cfg.workers, dev), dev, amp, on_loaded)
    with ExitStack() as stack:
        if rank == 0:
            claim_dir(out, "cache", "--out", legacy=recognise_cache)
            stack.enter_context(DirLock(out, "--out"))  # held for the whole build: one writer per cache
            _check_root(cfg.root, req.data, specs, cfg.random_init)
        summary = _build(req, console or make_console(stderr=True), progress and rank == 0)
    summary.seconds = time.perf_counter() - start
    return summary


@dataclass
class _Request:
    """The checked arguments of one ``build_cache`` call."""

    specs: list[ModelSpec]
    data: str
    out: Path
    cfg: CacheConfig
    workers: int
    device: torch.device
    amp: str | None
    on_loaded: Callable[[dict[str, Profile]], None] | None = None


def _build(req: _Request, console: Console, progress: bool) -> CacheSummary:
    """build_cache after its checks: load, decide, compute this rank's batches, finish and profile (rank 0)."""
    from klas.data import build_transform, make_splits, open_source

    rank, world = dist_rank_world()
    out, cfg = req.out, req.cfg
    source = open_source(req.data, root=cfg.root)
    split_defs = {k: v for k, v in make_splits(source, seed=cfg.seed, limit=cfg.limit).items() if k in cfg.split_list}
    classes = len(source.classes) if len(source.classes) >= 2 else None
    loaded, config, inputs = _load_models(req.specs, cfg.preprocess, cfg.random_init, cfg.root, req.device, cfg.seed, classes)
    if req.on_loaded is not None and rank == 0:
        req.on_loaded({m.name: m.profile for m in loaded})
    columns = [feature_columns(m) for m in loaded]
    widths = [cols[-1][list(cols[-1])[-1]][1] for cols in columns]
    data_info = {
        "source": source.name,
        "fingerprint": source.fingerprint,
        "classes": list(source.classes),
        "preprocess": config,
        "seed": cfg.seed,
        "fractions": [0.6, 0.2, 0.2],
        "limit": cfg.limit,
    }
    fingerprints = {fmt: _fingerprint(loaded, data_info, cfg.split_list, req.amp, fmt, inputs)
                    for fmt in (FORMAT, SHARED_NORMALISATION, *UPGRADES)}
    fingerprint = fingerprints[FORMAT]
    if rank == 0:
        status = _prepare_dir(out, fingerprints, cfg.batch_size, cfg.overwrite)
        _start_files(out, status, fingerprint, cfg.batch_size, split_defs, loaded, widths)
    dist_barrier()
    if rank != 0:
        status = "up to date" if (out / MANIFEST).is_file() else "shard"
    if status == "up to date":
        if rank != 0:
            return CacheSummary(out, status="shard")
        summary = _summary(open_cache(out, verify=cfg.verify), 0, 0.0, "up to date, verified" if cfg.verify else status)
    else:
        job = _Job(out, source, loaded, build_transform(config), req.device, req.amp, cfg.batch_size, req.workers, rank, world)
        images = _compute(job, split_defs, console, progress)
        dist_barrier()
        if rank != 0:
            return CacheSummary(out, images=images, status="shard")
        _finish(job, split_defs, fingerprint, data_info, widths, columns, cfg.random_init, inputs)
        summary = _summary(open_cache(out), images, 0.0, status)
    summary.latency = profile_latency(out, fingerprint, loaded, cfg, req.device, req.amp, console, progress)
    return summary


def profile_latency(out: Path, fingerprint: str, loaded: Sequence[LoadedModel], cfg: CacheConfig, device: torch.device,
                    amp: str | None, console: Console, progress: bool) -> list[dict]:
    """Measure this device's latency profile at every batch of ``cfg.latency_batch`` that ``out/latency.json``
    lacks (:mod:`klas.stitch.latency`; other devices' profiles are kept); returns what was measured."""
    identity = device_identity(device, amp)
    todo = missing_batches(out, fingerprint, identity, cfg.latency_batch)
    if not todo:
        return []
    models = {m.name: m.adapter for m in loaded}
    profiles = {m.name: m.profile for m in loaded}
    steps = measure_steps(profiles, STITCH_KINDS)
    done = []
    with Progress(TextColumn("[bold]{task.description:<22}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, disable=not progress, transient=True) as bar:
        for batch in todo:
            task = bar.add_task(f"latency, batch {batch}", total=steps)
            done.append(measure_profile(models, profiles, batch=batch, device=device, amp_dtype=AMP_DTYPES.get(amp),
                                        identity=identity, repeats=cfg.latency_repeats, kinds=STITCH_KINDS, seed=cfg.seed,
                                        on_step=lambda k, n, t=task: bar.update(t, completed=k)))
    write_profiles(out, fingerprint, done)
    return [{"batch": p.batch, "device": describe_device(p.device), "seconds": p.seconds} for p in done]


def _start_files(out, status, fingerprint, batch_size, split_defs, loaded, widths) -> None:
    """Rank 0, before any batch: preallocate a fresh cache (after a disk-space check) or reopen a partial one."""
    if status == "resumed":
        _write_state(out, fingerprint, batch_size, ready=True)  # forgets an error recorded by the last attempt
        for rel in array_paths(split_defs, [m.name for m in loaded]):  # files of an older klas may be sparse
            if (out / rel).is_file():
                allocate(out / rel)
    if status != "written":
        return
    per_row = sum(2 * (w + m.adapter.num_classes) for m, w in zip(loaded, widths)) + 16
    need = int(1.05 * per_row * sum(len(s.ids) for s in split_defs.values())) + (1 << 20)
    check_free_space(out, need)
    _write_state(out, fingerprint, batch_size, ready=False)
    try:
        _create_files(out, split_defs, loaded, widths)
    except DiskFull as exc:  # the disk filled after the check: name what the whole cache needs
        raise DiskFull(out, format_bytes(need)) from exc
    (out / PROGRESS_DIR).mkdir(parents=True, exist_ok=True)
    _write_state(out, fingerprint, batch_size, ready=True)


def _compute(job: _Job, split_defs: dict, console: Console, progress: bool) -> int:
    """Run this rank's unfinished batches of every split; returns the number of images computed."""
    plan = {}
    for name, split in split_defs.items():
        nb = math.ceil(len(split.ids) / job.batch_size)
        done = _done_batches(job.out, name)
        plan[name] = [b for b in range(nb) if b % job.world == job.rank and b not in done]
    bs = job.batch_size
    todo = sum(min(bs * (b + 1), len(split_defs[s].ids)) - bs * b for s, batches in plan.items() for b in batches)
    model_seconds = [0.0] * len(job.loaded)
    images = 0
    with _progress(console, progress) as bar:
        tasks = [bar.add_task(m.name, total=todo, ips=0.0) for m in job.loaded]
        for name, batches in plan.items():
            if batches:
                images += _run_split(job, name, split_defs[name], batches, bar, tasks, model_seconds)
    return images


def _open_rw(path: Path) -> np.ndarray:
    """A preallocated array of an unfinished cache, opened for writing rows."""
    try:
        return np.load(path, mmap_mode="r+")
    except (OSError, ValueError) as exc:
        raise KlasError(
            f"cache file {path} of the unfinished cache is missing or damaged ({exc.__class__.__name__}); "
            "re-run the klas cache command with --overwrite"
        ) from None


def _run_split(job: _Job, name: str, split, batches: list[int], bar, tasks, model_seconds) -> int:
    """Run the models over this rank's pending batches of one split, writing rows as they come."""
    from klas.data import SplitDataset, make_loader

    n, bs = len(split.ids), job.batch_size
    feats = [_open_rw(job.out / name / m.name / "features.npy") for m in job.loaded]
    logits = [_open_rw(job.out / name / m.name / "logits.npy") for m in job.loaded]
    sampler = [list(range(b * bs, min(n, (b + 1) * bs))) for b in batches]
    loader = make_loader(SplitDataset(job.source, split, job.transform), sampler, job.workers, job.device)
    done = _read_progress(job.out / PROGRESS_DIR / f"{name}.rank{job.rank}.npy")
    images = 0
    for b, (x, _, _) in zip(batches, loader):
        rows = slice(b * bs, b * bs + x.shape[0])
        x = x.to(job.device, non_blocking=True)
        for k, m in enumerate(job.loaded):
            t0 = time.perf_counter()
            with job.autocast():
                f, lg = pooled_forward(m.adapter, x)
            f16, lg16 = f.cpu().numpy().astype(np.float16), lg.cpu().numpy().astype(np.float16)
            if not (np.isfinite(f16).all() and np.isfinite(lg16).all()):
                _fail(job, _non_finite(m.name, name, job.amp))
            feats[k][rows], logits[k][rows] = f16, lg16
            model_seconds[k] += time.perf_counter() - t0
            bar.update(tasks[k], advance=x.shape[0], ips=bar.tasks[k].completed / max(model_seconds[k], 1e-9))
        for arr in feats + logits:
            arr.flush()
        done.append(b)
        _save_progress(job.out, name, job.rank, done)
        images += x.shape[0]
    return images


def _manifest_models(job: _Job, widths: list[int], columns: list, random_init: bool, inputs: list[dict]) -> list[dict]:
    return [
        {
            "name": m.name,
            "spec": str(m.spec),
            "arch": m.spec.arch,
            "weights": str(m.spec.path) if m.spec.path else None,
            "random_init": random_init,
            "weights_sha256": m.weights_sha256,
            "family": m.adapter.family,
            "num_classes": m.adapter.num_classes,
            "added_head": bool(getattr(m.adapter.model, "klas_added_head", False)),
            "input": seen,  # what the model saw: the shared resolution, resize and crop, its own mean and std
            "pool_names": list(m.adapter.pool_names),
            "feature_dim": w,
            "profile": m.profile.to_json(),
            "columns": cols,
        }
        for m, w, cols, seen in zip(job.loaded, widths, columns, inputs)
    ]


def _finish(job: _Job, split_defs: dict, fingerprint: str, data_info: dict, widths, columns, random_init, inputs) -> None:
    """Rank 0, after every rank's batches: check none is missing, checksum the arrays, write the manifest last."""
    out = job.out
    missing = {s: math.ceil(len(d.ids) / job.batch_size) - len(_done_batches(out, s)) for s, d in split_defs.items()}
    if any(missing.values()):
        raise KlasError(f"cache {out} is still missing batches {missing}; re-run the same command to finish it")
    manifest = {
        "format": FORMAT,
        "fingerprint": fingerprint,
        "models": _manifest_models(job, widths, columns, random_init, inputs),
        "data": data_info,
        "splits": {s: {"n": int(len(d.ids))} for s, d in split_defs.items()},
        "amp": job.amp,
        "batch_size": job.batch_size,
        "loader": {"workers": job.workers, "pin_memory": job.device.type == "cuda"},  # speed only, not the bytes
        "files": record_files(out, array_paths(split_defs, [m.name for m in job.loaded])),
        "versions": package_versions(),
    }
    write_json_atomic(out / MANIFEST, manifest)
    (out / STATE).unlink(missing_ok=True)
    (out / VERIFIED).unlink(missing_ok=True)
    shutil.rmtree(out / PROGRESS_DIR, ignore_errors=True)


def measure_cache_latency(path: Path | str, config: CacheConfig | None = None, *, console: Console | None = None,
                          progress: bool = True, **overrides: Any) -> CacheSummary:
    """``klas cache --out PATH`` alone: add this device's latency profile to a finished cache, at every batch
    of ``latency_batch`` it lacks, under the cache's own ``--amp`` (the models are loaded from the cache)."""
    start = time.perf_counter()
    cfg = (config or CacheConfig()).with_overrides(**overrides) if overrides else (config or CacheConfig())
    if not cfg.latency_batch:
        raise KlasError("--latency-batch off measures nothing; give the batch sizes to profile, e.g. --latency-batch 1,64")
    cache = open_cache(path)
    with DirLock(cache.path, "--out"):
        dev, amp = _device(cfg.device, cache.manifest.get("amp") or "off", 0, 1)
        loaded = cache.load_models(device=dev, root=cfg.root)
        summary = _summary(cache, 0, 0.0, "up to date")
        summary.latency = profile_latency(cache.path, cache.fingerprint, loaded, cfg, dev, amp,
                                          console or make_console(stderr=True), progress)
    summary.seconds = time.perf_counter() - start
    return summary


def check_cache(path: Path | str) -> CacheSummary:
    """``klas cache --verify --out PATH`` alone: check every array of a finished cache by full sha256."""
    start = time.perf_counter()
    cache = open_cache(path, verify=True)
    return _summary(cache, 0, time.perf_counter() - start, "verified")


def _summary(cache: Cache, images: int, seconds: float, status: str) -> CacheSummary:
    rows = []
    for name in cache.model_names:
        nbytes = sum(
            (cache.path / s / name / f).stat().st_size for s in cache.splits for f in ("features.npy", "logits.npy")
        )
        prof = cache.profiles[name]
        rows.append({
            "model": name,
            "blocks": prof.num_blocks,
            "gflops": prof.macs / 1e9,
            "images": sum(cache.manifest["splits"][s]["n"] for s in cache.splits),
            "bytes": nbytes,
        })
    return CacheSummary(cache.path, rows, images, seconds, status)
