"""Train a list of zoo models one after another and record each in zoo.json as soon as it is done."""
from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import timm
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from safetensors.torch import save_file
from torch import Tensor

from klas.data import load_split_tensors, make_splits, open_source
from klas.data.transforms import build_transform
from klas.fs import atomic_path, write_json_atomic
from klas.utils import sha256_file
from klas.zoo.models import arch_args
from klas.zoo.train import Recipe, TrainResult, train_model


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("epoch {task.fields[epoch]}/{task.fields[epochs]}  loss {task.fields[loss]:.3f}"),
        TimeElapsedColumn(),
        console=console,
    )


def _family(arch: str) -> str:
    from klas.zoo import BENCH_FAMILIES, FAMILIES

    return next(f for f, members in (*FAMILIES.items(), *BENCH_FAMILIES.items()) if arch in members)


def _cost(arch: str, state: dict[str, Tensor], input_size: tuple[int, ...]) -> tuple[int, int]:
    """Parameters and MACs (one multiply-add = one FLOP) of one image through the trained model."""
    from klas.models.profile import count_macs

    model = timm.create_model(arch, pretrained=False).eval()
    model.load_state_dict(state)
    with torch.inference_mode():
        macs, _ = count_macs(model, torch.zeros(1, *input_size))
    return sum(p.numel() for p in model.parameters()), int(macs)


def _save_weights(state: dict[str, Tensor], path: Path) -> str:
    """Write safetensors atomically (:func:`klas.fs.atomic_path`); return the file's sha256."""
    with atomic_path(path) as tmp:
        # one metadata key only: safetensors writes a multi-key metadata map in random order (unstable sha256)
        save_file(state, str(tmp), metadata={"format": "pt"})
        os.chmod(tmp, 0o644)  # safetensors creates the file owner-only; weights are meant to be shared
    return sha256_file(path)


def _record(arch: str, recipe: Recipe, result: TrainResult, sha: str, weights: str,
            source: Any, sizes: dict[str, int], cost: tuple[int, int]) -> dict[str, Any]:
    from klas.zoo import SPLIT_SEED

    params, macs = cost
    return {
        "arch": arch,
        "family": _family(arch),
        "eval_acc": round(result.eval_acc, 6),
        "params": params,
        "macs": macs,
        "epochs": recipe.epochs,
        "steps": result.steps,
        "seconds": round(result.seconds, 2),
        "seed": recipe.seed,
        "sha256": sha,
        "weights": weights,
        "data": source.name,
        "data_fingerprint": source.fingerprint,
        "split_seed": SPLIT_SEED,
        "train_images": sizes["probe-train"],
        "eval_images": sizes["eval"],
        "arch_args": arch_args(arch),
        "recipe": recipe.to_json(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),  # float rounding (hence the weights) depends on it
    }


def train_and_record(todo: list[tuple[str, Recipe]], root: Path, console: Console) -> None:
    """Train each (arch, recipe) in turn; weights and the zoo.json entry are written after each model."""
    from klas.zoo import SPLIT_SEED, read_zoo, zoo_dir

    source = open_source("digits", root)
    tensors: dict[tuple, tuple[Tensor, ...]] = {}  # (limit, data config) -> preprocessed train/eval splits
    with _progress(console) as progress:
        for arch, recipe in todo:
            cfg = timm.create_model(arch, pretrained=False).pretrained_cfg
            splits = make_splits(source, seed=SPLIT_SEED, limit=recipe.limit)
            key = (recipe.limit, *(repr(cfg.get(k)) for k in ("input_size", "interpolation", "mean", "std", "crop_pct")))
            if key not in tensors:
                transform = build_transform(cfg)
                x_tr, y_tr, _ = load_split_tensors(source, splits["probe-train"], transform)
                x_ev, y_ev, _ = load_split_tensors(source, splits["eval"], transform)
                tensors[key] = (x_tr, y_tr, x_ev, y_ev)
            x_tr, y_tr, x_ev, y_ev = tensors[key]
            result = train_model(arch, (x_tr, y_tr), (x_ev, y_ev), recipe, progress=progress)
            weights = f"{arch}.safetensors"
            sha = _save_weights(result.state_dict, zoo_dir(root) / weights)
            sizes = {name: len(split) for name, split in splits.items()}
            record = _record(arch, recipe, result, sha, weights, source, sizes,
                             _cost(arch, result.state_dict, tuple(cfg["input_size"])))
            index = read_zoo(root)
            index[arch] = record
            write_json_atomic(zoo_dir(root) / "zoo.json", index)
            progress.console.print(
                f"{arch}: eval top-1 {100 * result.eval_acc:.1f}%  {record['params'] / 1e6:.2f}M params  "
                f"{record['macs'] / 1e6:.1f}M MACs  {result.seconds:.0f}s"
            )
