"""``klas cache``: run k models once over the calibration splits and store what every block sees.

Storage: one ``(N, F)`` float16 ``.npy`` per split and model, opened with ``np.lib.format.open_memmap``.
We measured Arrow IPC against .npy memmaps (``python benchmarks/bench_storage.py``, 20k x 1536
float16): both open zero-copy; a full read took 0.09 s (npy) vs 0.10 s (Arrow), one
representation's columns 0.011 s vs 0.026 s, writing in row batches 0.095 s vs 0.074 s, all small
next to the forward passes. The deciding difference: an IPC file is written front to back, while a
preallocated .npy can be written at any row. That makes the cache resumable (finished batches are
simply skipped) and lets torchrun ranks write disjoint batches of one file with no merge step.

Atomicity: ``manifest.json`` is written last, with ``os.replace``; until then a state file marks the
directory as partial and per-rank progress files list the finished batches. A batch's rows are
flushed before it is recorded as finished, so a kill at any moment loses at most the batch in flight.
Batches are fixed by (split, batch size), so every image is computed in the same batch whether the
run was interrupted, resumed or sharded; the result is identical to an uninterrupted run.
"""
from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from klas.cache.reader import FORMAT, MANIFEST, STATE, Cache, open_cache
from klas.errors import KlasError
from klas.models import LoadedModel, load_model, parse_spec
from klas.utils import (
    DEFAULT_ROOT,
    check_free_space,
    dist_barrier,
    dist_rank_world,
    package_versions,
    read_json,
    resolve_device,
    sha256_json,
    write_json_atomic,
)

PROGRESS_DIR = ".progress"
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class CacheSummary:
    """What ``build_cache`` did, for the CLI's table."""

    path: Path
    rows: list[dict] = field(default_factory=list)  # per model: name, blocks, gflops, images, bytes
    images: int = 0  # images run through the models in this call (0 when already complete)
    seconds: float = 0.0
    status: str = "written"  # "written" | "resumed" | "up to date"


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


def _fingerprint(loaded: list[LoadedModel], data: dict, splits: Sequence[str], amp: str | None) -> str:
    return sha256_json({
        "format": FORMAT,
        "models": [[str(m.spec), m.weights_sha256] for m in loaded],
        "data": {k: data[k] for k in ("fingerprint", "seed", "fractions", "limit", "preprocess")},
        "splits": list(splits),
        "amp": amp,
    })


def _prepare_dir(out: Path, fingerprint: str, batch_size: int, overwrite: bool) -> str:
    """Decide between fresh / resume / up to date; refuse another configuration's files."""
    manifest, state = out / MANIFEST, out / STATE
    if manifest.is_file():
        old = read_json(manifest, "cache manifest").get("fingerprint")
        if old == fingerprint and not overwrite:
            return "up to date"
        if not overwrite:
            raise KlasError(
                f"{out} holds a cache of another configuration (models, weights, data or splits differ); "
                "choose another --out or pass --overwrite"
            )
    elif state.is_file():
        old = read_json(state, "cache state")
        if old.get("fingerprint") == fingerprint and old.get("batch_size") == batch_size and not overwrite:
            return "resumed"
        if not overwrite:
            what = "batch size" if old.get("fingerprint") == fingerprint else "configuration"
            raise KlasError(
                f"{out} holds a partial cache of another {what}; re-run the original command to finish it "
                "or pass --overwrite to start again"
            )
    elif out.exists() and any(out.iterdir()) and not overwrite:
        raise KlasError(f"{out} exists and is not a klas cache; choose another --out or pass --overwrite")
    if out.exists():
        shutil.rmtree(out)
    return "written"


def _done_batches(out: Path, split: str) -> set[int]:
    done: set[int] = set()
    for f in (out / PROGRESS_DIR).glob(f"{split}.rank*.npy"):
        done.update(int(b) for b in np.load(f))
    return done


def _save_progress(out: Path, split: str, rank: int, done: list[int]) -> None:
    path = out / PROGRESS_DIR / f"{split}.rank{rank}.npy"
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, np.asarray(sorted(done), dtype=np.int64))
    tmp.replace(path)


def _create_files(out: Path, splits: dict, loaded: list[LoadedModel], widths: list[int]) -> None:
    for name, split in splits.items():
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        np.save(d / "ids.npy", split.ids.astype(np.int64))
        np.save(d / "labels.npy", split.labels.astype(np.int64))
        for m, width in zip(loaded, widths):
            (d / m.name).mkdir(exist_ok=True)
            n = len(split.ids)
            np.lib.format.open_memmap(d / m.name / "features.npy", "w+", np.float16, (n, width)).flush()
            np.lib.format.open_memmap(d / m.name / "logits.npy", "w+", np.float16, (n, m.adapter.num_classes)).flush()


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
    *,
    splits: Sequence[str] | None = None,
    limit: int | None = None,
    random_init: bool = False,
    batch_size: int = 64,
    workers: int = 0,
    device: str | None = None,
    amp: str | None = None,
    overwrite: bool = False,
    seed: int = 0,
    root: Path = DEFAULT_ROOT,
    preprocess: dict | None = None,
    console: Console | None = None,
    progress: bool = True,
) -> CacheSummary:
    """Cache per-block pooled features and logits of ``models`` on ``data``; see docs/formats.md.

    ``preprocess`` overrides keys of the first model's timm data config (e.g. ``{"input_size": [3, 64, 64]}``);
    all models see the same preprocessed pixels. Resumes a partial cache of the same configuration.
    """
    from klas.data import SPLITS, build_transform, make_splits, open_source

    console = console or Console(stderr=True)
    start = time.perf_counter()
    out = Path(out)
    splits = list(splits or SPLITS)
    bad = [s for s in splits if s not in SPLITS]
    if bad or not splits:
        raise KlasError(f"unknown split {', '.join(bad) or '(none)'}; choose from {', '.join(SPLITS)}")
    if not models:
        raise KlasError("no models given; pass --model NAME at least once")
    specs = [parse_spec(m) for m in models]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise KlasError(f"model {max(names, key=names.count)} given twice; each --model must be a different architecture")
    if batch_size < 1 or workers < 0 or (limit is not None and limit < 1):
        raise KlasError("--batch-size and --limit must be positive and --workers non-negative")
    rank, world = dist_rank_world()
    dev = resolve_device(device)
    if world > 1 and dev.type == "cuda":
        dev = torch.device("cuda", rank % torch.cuda.device_count())
    if amp is not None:
        if amp not in AMP_DTYPES:
            raise KlasError(f"unknown --amp {amp!r}; use bf16 or fp16")
        if dev.type != "cuda":
            raise KlasError("--amp needs a CUDA device; drop --amp on CPU")

    source = open_source(data, root=root)
    split_defs = {k: v for k, v in make_splits(source, seed=seed, limit=limit).items() if k in splits}

    first = load_model(specs[0], random_init=random_init, root=root, device=dev, seed=seed)
    config = {**first.data_config, **(preprocess or {})}
    size = tuple(config["input_size"])
    if size != tuple(first.data_config["input_size"]):
        first = load_model(specs[0], random_init=random_init, root=root, device=dev, seed=seed, input_size=size)
    loaded = [first] + [
        load_model(s, random_init=random_init, root=root, device=dev, seed=seed, input_size=size) for s in specs[1:]
    ]
    columns = [feature_columns(m) for m in loaded]
    widths = [cols[-1][list(cols[-1])[-1]][1] for cols in columns]

    data_info = {
        "source": source.name,
        "fingerprint": source.fingerprint,
        "classes": list(source.classes),
        "preprocess": config,
        "seed": seed,
        "fractions": [0.6, 0.2, 0.2],
        "limit": limit,
    }
    fingerprint = _fingerprint(loaded, data_info, splits, amp)

    status = _prepare_dir(out, fingerprint, batch_size, overwrite) if rank == 0 else None
    if rank == 0 and status == "written":
        per_row = sum(2 * (w + m.adapter.num_classes) for m, w in zip(loaded, widths)) + 16
        check_free_space(out, int(1.05 * per_row * sum(len(s.ids) for s in split_defs.values())) + (1 << 20))
        _create_files(out, split_defs, loaded, widths)
        (out / PROGRESS_DIR).mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / STATE, {"fingerprint": fingerprint, "batch_size": batch_size})
    dist_barrier()
    if status == "up to date":
        return _summary(open_cache(out), 0, time.perf_counter() - start, status)

    transform = build_transform(config)
    autocast = torch.autocast("cuda", dtype=AMP_DTYPES[amp]) if amp else torch.autocast("cpu", enabled=False)
    plan = {}
    for name, split in split_defs.items():
        nb = math.ceil(len(split.ids) / batch_size)
        done = _done_batches(out, name)
        plan[name] = [b for b in range(nb) if b % world == rank and b not in done]
    todo = sum(min(batch_size * (b + 1), len(split_defs[s].ids)) - batch_size * b for s, bs in plan.items() for b in bs)
    model_seconds = [0.0] * len(loaded)
    images = 0
    with _progress(console, progress and rank == 0) as bar:
        tasks = [bar.add_task(m.name, total=todo, ips=0.0) for m in loaded]
        for name, batches in plan.items():
            if not batches:
                continue
            images += _run_split(out, source, name, split_defs[name], batches, batch_size, workers, transform, loaded,
                                 dev, autocast, rank, bar, tasks, model_seconds)
    dist_barrier()
    if rank != 0:
        return CacheSummary(out, images=images, seconds=time.perf_counter() - start, status="shard")
    missing = {s: math.ceil(len(d.ids) / batch_size) - len(_done_batches(out, s)) for s, d in split_defs.items()}
    if any(missing.values()):
        raise KlasError(f"cache {out} is still missing batches {missing}; re-run the same command to finish it")
    manifest = {
        "format": FORMAT,
        "fingerprint": fingerprint,
        "models": [
            {
                "name": m.name,
                "spec": str(m.spec),
                "arch": m.spec.arch,
                "weights": str(m.spec.path) if m.spec.path else None,
                "random_init": random_init,
                "weights_sha256": m.weights_sha256,
                "family": m.adapter.family,
                "num_classes": m.adapter.num_classes,
                "pool_names": list(m.adapter.pool_names),
                "feature_dim": w,
                "profile": m.profile.to_json(),
                "columns": cols,
            }
            for m, w, cols in zip(loaded, widths, columns)
        ],
        "data": data_info,
        "splits": {s: {"n": int(len(d.ids))} for s, d in split_defs.items()},
        "amp": amp,
        "batch_size": batch_size,
        "versions": package_versions(),
    }
    write_json_atomic(out / MANIFEST, manifest)
    (out / STATE).unlink(missing_ok=True)
    shutil.rmtree(out / PROGRESS_DIR, ignore_errors=True)
    return _summary(open_cache(out), images, time.perf_counter() - start, status)


def _run_split(out, source, name, split, batches, batch_size, workers, transform, loaded, dev, autocast, rank, bar,
               tasks, model_seconds) -> int:
    """Run the models over this rank's pending batches of one split, writing rows as they come."""
    from klas.data import SplitDataset

    n = len(split.ids)
    feats = [np.load(out / name / m.name / "features.npy", mmap_mode="r+") for m in loaded]
    logits = [np.load(out / name / m.name / "logits.npy", mmap_mode="r+") for m in loaded]
    sampler = [list(range(b * batch_size, min(n, (b + 1) * batch_size))) for b in batches]
    loader = torch.utils.data.DataLoader(
        SplitDataset(source, split, transform), batch_sampler=sampler, num_workers=workers
    )
    own = out / PROGRESS_DIR / f"{name}.rank{rank}.npy"
    done = [int(b) for b in np.load(own)] if own.is_file() else []
    images = 0
    for b, (x, _, _) in zip(batches, loader):
        rows = slice(b * batch_size, b * batch_size + x.shape[0])
        x = x.to(dev, non_blocking=True)
        for k, m in enumerate(loaded):
            t0 = time.perf_counter()
            with autocast:
                f, lg = pooled_forward(m.adapter, x)
            feats[k][rows] = f.cpu().numpy().astype(np.float16)
            logits[k][rows] = lg.cpu().numpy().astype(np.float16)
            model_seconds[k] += time.perf_counter() - t0
            bar.update(tasks[k], advance=x.shape[0], ips=bar.tasks[k].completed / max(model_seconds[k], 1e-9))
        for arr in feats + logits:
            arr.flush()
        done.append(b)
        _save_progress(out, name, rank, done)
        images += x.shape[0]
    return images


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
