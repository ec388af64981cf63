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
from klas.run import check_same_selection, open_run_cache, read_selection, stitch_specs
from klas.stitch.network import StitchNet
from klas.train.checkpoint import checkpoint_path, load_checkpoint


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
    newer or older than the results is refused.
    """
    run_dir = Path(run_dir)
    selection = read_selection(run_dir)
    ckpt_path = checkpoint_path(run_dir)
    ckpt = load_checkpoint(ckpt_path)
    check_same_selection(ckpt.get("selection_sha256"), selection, ckpt_path, f"rerun klas train {run_dir} --overwrite")
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


__all__ = ["TrainedRun", "trained_net"]
