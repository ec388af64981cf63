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

from klas.data import DigitsConfig, DigitsSource, load_split_tensors, make_splits, open_source
from klas.data.transforms import build_transform
from klas.fs import atomic_path, write_json_atomic
from klas.utils import sha256_file
from klas.zoo.models import arch_args
from klas.zoo.shipped import install_shipped, model_from_file
from klas.zoo.train import Recipe, TrainResult, accuracy, train_model


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
        "source": "trained",
    }


_TENSORS: dict[tuple, dict[str, tuple[Tensor, Tensor]]] = {}  # (root, limit, data config) -> split tensors


def zoo_split_tensors(arch: str, root: Path, limit: int | None = None,
                      data: DigitsConfig = DigitsConfig()) -> dict[str, tuple[Tensor, Tensor]]:
    """The digits splits as ``arch`` sees them, ``{split: (x (N, 3, 32, 32) float32, y (N,) int64)}``, for
    probe-train (training), score and eval; preprocessed once per data config and kept in memory.
    ``data`` is the generator's configuration: the default is the built-in set every klas command uses
    (``--data digits``); another generates the digits with other parameters (a study of the task's
    difficulty, ``benchmarks/bench_zoo.py --data``)."""
    from klas.zoo import SPLIT_SEED

    cfg = timm.create_model(arch, pretrained=False).pretrained_cfg
    key = (str(root), limit, data.fingerprint(),
           *(repr(cfg.get(k)) for k in ("input_size", "interpolation", "mean", "std", "crop_pct")))
    if key not in _TENSORS:
        source = DigitsSource(root, data)
        splits = make_splits(source, seed=SPLIT_SEED, limit=limit)
        transform = build_transform(cfg)
        _TENSORS[key] = {name: load_split_tensors(source, split, transform)[:2] for name, split in splits.items()}
    return _TENSORS[key]


def _eval_split(arch: str, root: Path) -> tuple[Tensor, Tensor]:
    return zoo_split_tensors(arch, root)["eval"]


def _write_record(root: Path, arch: str, record: dict[str, Any]) -> None:
    from klas.zoo import read_zoo, zoo_dir

    index = read_zoo(root)
    index[arch] = record
    write_json_atomic(zoo_dir(root) / "zoo.json", index)


def install_and_record(todo: list[tuple[str, dict[str, Any]]], root: Path, console: Console) -> None:
    """Install each (arch, shipped record): verify, copy into the zoo, re-measure eval top-1, record."""
    from klas.zoo import zoo_dir

    for arch, shipped in todo:
        x, y = _eval_split(arch, root)
        record = install_shipped(arch, shipped, zoo_dir(root) / shipped["weights"], lambda m: accuracy(m, x, y))
        _write_record(root, arch, record)
        here, there = 100 * record["eval_acc"], 100 * record["shipped_eval_acc"]
        note = "" if here == there else (
            f"  [yellow]({there:.2f}% where it was made, torch {record['torch']}: this machine generates the digits "
            f"or computes slightly differently)[/]")
        console.print(f"{arch}: shipped weights verified (sha256) and installed, eval top-1 {here:.2f}%{note}")


def compare_with_shipped(arch: str, record: dict[str, Any], shipped: dict[str, Any], root: Path) -> dict[str, Any]:
    """How far a retrained model lands from the shipped one: eval top-1 difference and prediction agreement."""
    from klas.zoo import zoo_dir
    from klas.zoo.shipped import verify_shipped

    x, y = _eval_split(arch, root)
    with torch.inference_mode():
        ours = model_from_file(arch, zoo_dir(root) / record["weights"])(x).argmax(1)
        theirs = model_from_file(arch, verify_shipped(arch, shipped))(x).argmax(1)
    return {"shipped_eval_acc": shipped["eval_acc"], "eval_delta": round(record["eval_acc"] - shipped["eval_acc"], 6),
            "agreement": round(float((ours == theirs).float().mean()), 6)}


def train_and_record(todo: list[tuple[str, Recipe]], root: Path, console: Console,
                     shipped: dict[str, dict[str, Any]] | None = None) -> None:
    """Train each (arch, recipe) in turn; weights and the zoo.json entry are written after each model.

    For a model in ``shipped`` (its shipped record, same recipe), the record also says how far the
    retrained model lands from the shipped one (:func:`compare_with_shipped`).
    """
    from klas.zoo import SPLIT_SEED, zoo_dir

    source = open_source("digits", root)
    with _progress(console) as progress:
        for arch, recipe in todo:
            splits = make_splits(source, seed=SPLIT_SEED, limit=recipe.limit)
            data = zoo_split_tensors(arch, root, limit=recipe.limit)
            cfg = timm.create_model(arch, pretrained=False).pretrained_cfg
            result = train_model(arch, data["probe-train"], data["eval"], recipe, progress=progress)
            weights = f"{arch}.safetensors"
            sha = _save_weights(result.state_dict, zoo_dir(root) / weights)
            sizes = {name: len(split) for name, split in splits.items()}
            record = _record(arch, recipe, result, sha, weights, source, sizes,
                             _cost(arch, result.state_dict, tuple(cfg["input_size"])))
            vs = ""
            if shipped and arch in shipped:
                record["vs_shipped"] = compare_with_shipped(arch, record, shipped[arch], root)
                d = record["vs_shipped"]
                vs = (f"  vs shipped {100 * d['shipped_eval_acc']:.2f}%: {100 * d['eval_delta']:+.2f} points, "
                      f"{100 * d['agreement']:.1f}% same predictions")
            _write_record(root, arch, record)
            progress.console.print(
                f"{arch}: eval top-1 {100 * result.eval_acc:.2f}%  {record['params'] / 1e6:.2f}M params  "
                f"{record['macs'] / 1e6:.1f}M MACs  {result.seconds:.0f}s{vs}"
            )
