"""The demo family's trained weights, shipped inside the package (``klas/zoo/shipped/``).

Training the zoo from scratch takes minutes and its result depends on the torch build and thread count
(float rounding), so klas ships the weights it publishes its figures with: ``shipped.json`` holds, per
model, the sha256 of ``<arch>.safetensors`` (float16), the recipe, the architecture arguments, the data
fingerprint, the eval top-1 measured on the shipped float16 weights, and the torch / timm versions and
thread count they were trained with.

:func:`install_shipped` verifies a file against its sha256, copies it into ``<root>/zoo`` and re-measures
its eval top-1 on this machine (a few seconds), so a machine that generates the digits or computes
differently is told so. :func:`ship` is the maintainers' step that writes the shipped set from a
trained zoo (``klas zoo --ship``).
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file, save_file

from klas.errors import KlasError
from klas.fs import atomic_path, read_json, write_json_atomic
from klas.utils import sha256_file

#: Where the shipped weights and their index live (package data).
SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"
SHIPPED_INDEX = "shipped.json"
#: What the shipped files hold: float16 halves the repository's size; eval top-1 is measured on them.
SHIPPED_DTYPE = torch.float16


def _dir(directory: Path | None) -> Path:
    return Path(directory) if directory is not None else SHIPPED_DIR


def read_shipped(directory: Path | None = None) -> dict[str, dict[str, Any]]:
    """The shipped index ``{arch: record}`` (of ``directory``, default :data:`SHIPPED_DIR`); ``{}`` when nothing is shipped."""
    path = _dir(directory) / SHIPPED_INDEX
    if not path.is_file():
        return {}
    return read_json(path, what="shipped zoo index")


def shipped_record(arch: str, arch_args: dict, recipe: dict, fingerprint: str,
                   directory: Path | None = None) -> dict[str, Any] | None:
    """The shipped record of ``arch`` when it was trained with exactly this architecture, recipe and data."""
    rec = read_shipped(directory).get(arch)
    if rec and rec.get("arch_args") == arch_args and rec.get("recipe") == recipe and rec.get("data_fingerprint") == fingerprint:
        return rec
    return None


def model_from_file(arch: str, path: Path) -> torch.nn.Module:
    """``arch`` with the weights of ``path`` (any float dtype; loaded into the model's float32), eval mode."""
    model = timm.create_model(arch, pretrained=False)
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def verify_shipped(arch: str, record: dict[str, Any], directory: Path | None = None) -> Path:
    """The shipped file of ``arch`` after checking its sha256 against the index."""
    path = _dir(directory) / record["weights"]
    if not path.is_file() or sha256_file(path) != record["sha256"]:
        raise KlasError(
            f"the shipped weights of {arch} ({path}) are missing or damaged (sha256 differs from {SHIPPED_INDEX}); "
            f"reinstall klas, or train them here with 'klas zoo --force --model {arch}'"
        )
    return path


def install_shipped(arch: str, record: dict[str, Any], target: Path, measure,
                    directory: Path | None = None) -> dict[str, Any]:
    """Copy the verified shipped weights of ``arch`` to ``target``; return its zoo record.

    ``measure(model) -> eval top-1`` re-measures the model here; the record keeps both that figure
    (``eval_acc``) and the one measured where the weights were made (``shipped_eval_acc``).
    """
    start = time.perf_counter()
    src = verify_shipped(arch, record, directory)
    with atomic_path(target) as tmp:
        shutil.copyfile(src, tmp)
        tmp.chmod(0o644)
    acc = measure(model_from_file(arch, target))
    return {**record, "source": "shipped", "eval_acc": round(acc, 6), "shipped_eval_acc": record["eval_acc"],
            "install_seconds": round(time.perf_counter() - start, 2), "installed_torch": torch.__version__}


def ship(index: dict[str, dict[str, Any]], zoo: Path, measure, directory: Path | None = None) -> dict[str, dict[str, Any]]:
    """Write the trained models of ``index`` (files in ``zoo``) as the shipped set, float16, with their
    eval top-1 re-measured on the float16 weights (``measure(model)``); return the new shipped index."""
    directory = _dir(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shipped = read_shipped(directory)
    for arch, rec in index.items():
        state = {k: (v.to(SHIPPED_DTYPE) if v.is_floating_point() else v) for k, v in load_file(str(zoo / rec["weights"])).items()}
        path = directory / rec["weights"]
        with atomic_path(path) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt"})
            tmp.chmod(0o644)
        keep = {k: v for k, v in rec.items() if k not in ("source", "shipped_eval_acc", "install_seconds", "installed_torch")}
        shipped[arch] = {**keep, "sha256": sha256_file(path), "dtype": str(SHIPPED_DTYPE).removeprefix("torch."),
                         "trained_eval_acc": rec["eval_acc"], "eval_acc": round(measure(model_from_file(arch, path)), 6)}
    write_json_atomic(directory / SHIPPED_INDEX, dict(sorted(shipped.items())))
    return shipped


__all__ = ["SHIPPED_DIR", "SHIPPED_DTYPE", "install_shipped", "model_from_file", "read_shipped", "ship",
           "shipped_record", "verify_shipped"]
