"""What every ``klas tree`` run over one cache computes before training, once: the block scores, the splits
and the models' own outputs on them.

:func:`prepare` computes them for a :class:`~klas.tree.config.TreeConfig`; ``tree_run(..., prepared=p)``
and :func:`klas.tree.gain.subset_gains` reuse them, so a sweep of training recipes
(:mod:`klas.tree.sweep`) scores the blocks and runs the frozen models once instead of once per run.
They depend only on :func:`shared_settings` of the config (the models, the scoring and classifier
settings, the root and the device); a run with other such settings refuses them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from klas.errors import KlasError
from klas.train.data import SplitData
from klas.tree.choose import Scores, block_scores
from klas.tree.config import TreeConfig
from klas.tree.evaluate import SPLITS
from klas.tree.gain import model_outputs, tree_models


def shared_settings(cache, cfg: TreeConfig, device: torch.device) -> dict[str, Any]:
    """What the prepared pieces depend on."""
    return {"cache": cache.fingerprint, "models": tree_models(cache, cfg), "probe_epochs": cfg.probe_epochs,
            "temperature": cfg.temperature, "seed": cfg.seed, "root": str(cfg.root), "device": str(device),
            "eval_batch_size": cfg.eval_batch_size}


@dataclass
class Prepared:
    """Block scores (:func:`klas.tree.choose.block_scores`), ``data`` per split, the loaded ``models`` (frozen)
    and ``own``: each model's logits and pre-logits features on every split (:func:`klas.tree.gain.model_outputs`)."""

    settings: dict[str, Any]
    scores: Scores
    data: dict[str, SplitData]
    models: dict
    own: dict

    @property
    def names(self) -> list[str]:
        return list(self.settings["models"])

    def check(self, cache, cfg: TreeConfig, device: torch.device) -> None:
        """Refuse to serve a run whose shared settings differ (its scores or outputs would be others)."""
        want = shared_settings(cache, cfg, device)
        if want != self.settings:
            diff = ", ".join(k for k in want if want[k] != self.settings.get(k))
            raise KlasError(f"prepared tree inputs were made with other {diff}; prepare them again for this run")


def score_blocks(cache, cfg: TreeConfig, device: torch.device, console: Console, progress: bool) -> Scores:
    """:func:`klas.tree.choose.block_scores` of the run's models, with a progress bar."""
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, disable=not progress, transient=True) as bar:
        task = bar.add_task("scoring: probes for every block", total=None)
        return block_scores(cache, probe_epochs=cfg.probe_epochs, temperature=cfg.temperature, seed=cfg.seed,
                            device=device, progress=lambda s, t: bar.update(task, completed=s, total=t),
                            names=tree_models(cache, cfg))


def prepare(cache, cfg: TreeConfig, device: torch.device, *, console: Console | None = None, progress: bool = True,
            scores: Scores | None = None) -> Prepared:
    """Score the blocks (unless ``scores`` are given), load the models and run them over every split."""
    console = console or Console(stderr=True)
    names = tree_models(cache, cfg)
    if len(names) < 2:
        raise KlasError(f"cache {cache.path} has {len(names)} model; a stitch tree needs two or more: re-run klas cache "
                        f"with more --model")
    scores = scores if scores is not None else score_blocks(cache, cfg, device, console, progress)
    data = {s: SplitData(cache, s, root=cfg.root) for s in SPLITS}
    models = {m.name: m for m in cache.load_models(device=device, root=cfg.root) if m.name in names}
    console.print(f"running the {len(models)} models on {', '.join(SPLITS)} ...")
    own = model_outputs(models, names, data, batch_size=cfg.eval_batch_size, device=device)
    return Prepared(shared_settings(cache, cfg, device), scores, data, models, own)


__all__ = ["Prepared", "prepare", "score_blocks", "shared_settings"]
