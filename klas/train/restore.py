"""The network a finished ``klas train`` evaluated, rebuilt from the run: the cache's models, the
final checkpoint's stitch layers and, after ``full_tune``, its fine-tuned anchors.

``klas export`` saves front members from it and the benchmarks evaluate it on other splits; both
get exactly the weights the run's "after" evaluation used (the checkpoint is written after the last
epoch, before that evaluation).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from klas.errors import KlasError
from klas.fs import DEFAULT_ROOT
from klas.run import RESULTS, check_same_selection, open_run_cache, read_selection, stitch_specs
from klas.stitch.network import StitchNet
from klas.train.checkpoint import checkpoint_path, load_checkpoint
from klas.train.results import results_metadata
from klas.utils import sha256_json


@dataclass
class TrainedRun:
    """``net`` (eval mode), the checkpoint it came from, the run's cache and each model's timm arch."""

    net: StitchNet
    checkpoint: dict
    cache: Any
    arch: dict[str, str]


def trained_net(run_dir: Path | str, ids: Iterable[str] | None = None, *, epochs_done: int | None = None,
                root: Path | None = None, device: str | torch.device = "cpu") -> TrainedRun:
    """Rebuild the trained networks ``ids`` (stitch ids / anchor names; None: all) of ``run_dir``.

    ``epochs_done`` (from ``train.json``) must match the checkpoint's epoch when given, so a checkpoint
    newer or older than the results is refused; so is a checkpoint of another training than the one
    ``results.parquet`` evaluated (:func:`check_checkpoint_of_results`).
    """
    run_dir = Path(run_dir)
    selection = read_selection(run_dir)
    ckpt_path = checkpoint_path(run_dir)
    ckpt = load_checkpoint(ckpt_path)
    check_same_selection(ckpt.get("selection_sha256"), selection, ckpt_path, f"rerun klas train {run_dir} --overwrite")
    check_checkpoint_of_results(run_dir, ckpt, selection["cache"].get("fingerprint"))
    if epochs_done is not None and int(ckpt["epoch"]) != int(epochs_done):
        raise KlasError(f"checkpoint {ckpt_path} is at epoch {ckpt['epoch']} but results.parquet is from epoch "
                        f"{epochs_done}; rerun klas train {run_dir} --resume")
    cache = open_run_cache(selection, run_dir)
    anchors = [a["name"] for a in selection["anchors"]]
    wanted = set(ids) if ids is not None else None
    specs = [s for s in stitch_specs(selection) if wanted is None or s.id in wanted]
    names = {n for n in anchors if wanted is None or n in wanted} | {n for s in specs for n in (s.src, s.dst)}
    dev = torch.device(device or "cpu")
    loaded = [m for m in cache.load_models(device=dev, root=root or DEFAULT_ROOT) if m.name in names]
    net = StitchNet.from_loaded(loaded, specs, kind=ckpt.get("layer") or ckpt["config"]["layer"]).to(dev)
    for s in specs:
        net.stitch_layer(s.id).load_state_dict(ckpt["stitch_states"][s.id])
    for name, state in (ckpt.get("anchor_states") or {}).items():  # full_tune: the fine-tuned anchors
        if name in names:
            net.adapter(name).load_state_dict(state)
    return TrainedRun(net.eval(), ckpt, cache, {m.name: m.spec.arch for m in loaded})


def check_checkpoint_of_results(run_dir: Path, ckpt: dict, cache_fingerprint: str | None) -> None:
    """Refuse a checkpoint that is not the one ``results.parquet`` was evaluated with: its weights hash
    must be the one the results record (results of an older klas: its training config, seed included,
    must hash to theirs), and the cache it records must be the selection's."""
    path = checkpoint_path(run_dir)
    fix = f"rerun klas train {run_dir} --overwrite"
    if ckpt.get("cache_fingerprint", cache_fingerprint) != cache_fingerprint:
        raise KlasError(f"checkpoint {path} was trained on another cache than the run's selection names; {fix}")
    if not (Path(run_dir) / RESULTS).is_file():
        return
    meta = results_metadata(run_dir)
    if "klas.checkpoint_sha256" in meta:
        same = ckpt.get("weights_sha256") == meta["klas.checkpoint_sha256"]
    else:
        same = "klas.config" not in meta or sha256_json(ckpt.get("config")) == meta["klas.config"]
    if not same:
        raise KlasError(f"checkpoint {path} is not the one {RESULTS} was evaluated with (its weights come from "
                        f"another training); restore that training's checkpoint, or {fix}")


__all__ = ["TrainedRun", "check_checkpoint_of_results", "trained_net"]
