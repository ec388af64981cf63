"""The gain a Stitch Tree can recover, measured without training one: the floor and the ceiling of every
pair (or other subset) of a cache's models, exactly as ``klas tree`` measures them.

The models run once over probe-train, score and eval (their pre-logits features: what a tree's
branches give). For a subset S of the models:

* its **floor** is the best single model of S: a linear classifier on one model's features, the model
  whose classifier scores best on the score split (chosen off the eval split);
* its **ceiling** is the same kind of classifier on the features of every model of S side by side
  (each model run separately);
* its **gain** = ceiling - floor, on the score split and on the eval split (the reported one).

Every classifier is klas's probe trainer with ``klas tree``'s settings (``probe_epochs``, ``seed``;
:func:`klas.tree.evaluate.classifier_accuracy`), and ``klas tree`` takes its floor and ceiling from
:func:`reference` too; the probe trainer makes each classifier independent of those trained beside it,
so the numbers here equal ``klas tree``'s over the same models (``tests/test_tree.py`` checks it). A
tree is worth building over a subset whose gain is large enough to measure.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from klas.cache import open_cache
from klas.errors import KlasError
from klas.stitch.tree import AllModels
from klas.train.data import SplitData
from klas.tree.config import TreeConfig
from klas.tree.evaluate import HELD_OUT, SPLITS, Outputs, classifier_accuracy, split_outputs
from klas.units import FLOPS_CONVENTION
from klas.utils import resolve_device


def single_key(name: str) -> str:
    return f"single:{name}"


def concat_key(names: Sequence[str]) -> str:
    return "concat:" + "+".join(names)


def default_subsets(names: Sequence[str]) -> list[tuple[str, ...]]:
    """Every pair of ``names`` and, with three or more, all of them together."""
    pairs = [tuple(p) for p in itertools.combinations(names, 2)]
    return pairs + ([tuple(names)] if len(names) > 2 else [])


def tree_models(cache, cfg: TreeConfig) -> list[str]:
    """The models a run joins: ``cfg.models`` (checked against the cache) or every cached model."""
    names = cache.model_names
    if cfg.models is None:
        return list(names)
    missing = [m for m in cfg.models if m not in names]
    if missing:
        raise KlasError(f"--models names {', '.join(missing)}, not in cache {cache.path} (it has {', '.join(names)})")
    return list(cfg.models)


def model_outputs(models: Mapping, names: Sequence[str], data: Mapping[str, SplitData], *, batch_size: int,
                  device: torch.device) -> dict[str, Outputs]:
    """Each named model run on its own over every split of ``data``: ``{split: {model: logits, features}}``."""
    everyone = AllModels({n: models[n].adapter for n in names})
    return {s: split_outputs(everyone, d, batch_size=batch_size, device=device) for s, d in data.items()}


def reference_sets(own: Mapping[str, Outputs], subsets: Sequence[Sequence[str]]) -> dict[str, dict[str, np.ndarray]]:
    """Per split, the feature sets floors and ceilings need: each model alone, each subset side by side."""
    names = list(dict.fromkeys(n for s in subsets for n in s))
    out = {}
    for split, outputs in own.items():
        sets = {single_key(n): outputs[n]["features"] for n in names}
        for s in subsets:
            if len(s) > 1:
                sets[concat_key(s)] = np.concatenate([outputs[n]["features"] for n in s], axis=1)
        out[split] = sets
    return out


def floor_of(acc: Mapping[str, Mapping[str, float]], subset: Sequence[str]) -> str:
    """The best single model of ``subset``: its classifier's top-1 on the score split (ties: the later name)."""
    return max(subset, key=lambda n: (acc["score"][single_key(n)], n))


def floor_model(own: Mapping[str, Outputs], data: Mapping[str, SplitData], names: Sequence[str], num_classes: int,
                cfg: TreeConfig, device: torch.device) -> str:
    """The floor of ``names`` (:func:`floor_of`) from the models' own outputs, with ``cfg``'s classifier settings:
    the model ``klas tree`` reports as its floor."""
    sets = reference_sets({s: own[s] for s in SPLITS}, [[n] for n in names])
    acc = classifier_accuracy(sets["probe-train"], {"score": sets["score"]}, data["probe-train"].labels.numpy(),
                              {"score": data["score"].labels.numpy()}, num_classes, epochs=cfg.probe_epochs,
                              seed=cfg.seed, device=device)
    return floor_of(acc, names)


def reference(acc: Mapping[str, Mapping[str, float]], subset: Sequence[str], profiles: Mapping) -> dict:
    """Floor, ceiling and gain of ``subset`` from the classifiers' top-1 (``acc[split][key]``, module docstring)."""
    floor = floor_of(acc, subset)
    ceil = concat_key(subset) if len(subset) > 1 else single_key(subset[0])
    largest = max(profiles[n].macs for n in subset)
    macs = sum(profiles[n].macs for n in subset)
    row = {"models": list(subset), "floor": {"model": floor, "macs": profiles[floor].macs},
           "ceiling": {"models": list(subset), "macs": macs, "extra_cost": macs / largest - 1},
           "largest": {"model": max(subset, key=lambda n: profiles[n].macs), "macs": largest}, "gain": {}}
    for split in HELD_OUT:
        row["floor"][split] = acc[split][single_key(floor)]
        row["ceiling"][split] = acc[split][ceil]
        row["gain"][split] = row["ceiling"][split] - row["floor"][split]
    return row


@dataclass
class GainReport:
    """Floor, ceiling and gain of each subset (``rows``, largest eval gain first) and how they were measured."""

    cache: Path
    rows: list[dict]
    settings: dict
    split_sizes: dict[str, int]
    seconds: float = 0.0
    singles: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"cache": str(self.cache), "rows": self.rows, "singles": self.singles, "settings": self.settings,
                "split_sizes": self.split_sizes, "accuracy_unit": "fraction", "flops": FLOPS_CONVENTION,
                "seconds": self.seconds}

    @classmethod
    def from_json(cls, d: dict) -> "GainReport":
        return cls(Path(d["cache"]), d["rows"], d["settings"], d["split_sizes"], d.get("seconds", 0.0), d.get("singles", {}))

    def table(self) -> Table:
        t = Table(title=f"{self.cache.name}: the gain a tree can recover (linear classifier on pre-logits features)",
                  caption="floor: the best single model (its classifier, chosen on the score split); ceiling: the "
                          "models' features side by side (each model run separately); gain = ceiling - floor, "
                          f"top-1 points on eval (score). extra: the ceiling's cost over the subset's largest model. "
                          f"{FLOPS_CONVENTION}.")
        for col in ("models", "floor", "floor %", "ceiling %", "gain", "ceiling GFLOPs", "extra"):
            t.add_column(col, justify="left" if col in ("models", "floor") else "right", overflow="fold")
        for r in self.rows:
            f, c, g = r["floor"], r["ceiling"], r["gain"]
            t.add_row(" + ".join(r["models"]), f["model"], f"{100 * f['eval']:.2f} ({100 * f['score']:.2f})",
                      f"{100 * c['eval']:.2f} ({100 * c['score']:.2f})",
                      f"{100 * g['eval']:+.2f} ({100 * g['score']:+.2f})", f"{c['macs'] / 1e9:.4f}",
                      f"{100 * c['extra_cost']:+.1f}%")
        return t


def subset_gains(cache_path: Path | str, config: TreeConfig | None = None, subsets: Sequence[Sequence[str]] | None = None,
                 *, console: Console | None = None, prepared=None) -> GainReport:
    """Floor, ceiling and gain (module docstring) of each of ``subsets`` (default :func:`default_subsets` of
    ``config.models`` or of every cached model), with ``config``'s classifier settings (``probe_epochs``,
    ``seed``), batch size, device and root: the numbers ``klas tree`` would report as its floor and ceiling.
    ``prepared`` (:func:`klas.tree.prepare.prepare` for ``config``): reuse its model outputs."""
    t0 = time.perf_counter()
    cfg = config or TreeConfig()
    cache = open_cache(cache_path)
    missing = [s for s in SPLITS if s not in cache.splits]
    if missing:
        raise KlasError(f"cache {cache.path} lacks split {', '.join(missing)}; re-run klas cache with --split "
                        f"probe-train,score,eval")
    names = tree_models(cache, cfg)
    if len(names) < 2:
        raise KlasError(f"cache {cache.path} has {len(names)} model; a gain needs two or more: cache more --model")
    subsets = [tuple(s) for s in subsets] if subsets is not None else default_subsets(names)
    for s in subsets:
        if len(s) < 1 or len(set(s)) != len(s) or any(n not in names for n in s):
            raise KlasError(f"subset {'+'.join(s)} must name different models among {', '.join(names)}")
    device = resolve_device(cfg.device)
    if prepared is not None:
        prepared.check(cache, cfg, device)
        data, own = prepared.data, prepared.own
    else:
        used = list(dict.fromkeys(n for s in subsets for n in s))
        (console or Console(stderr=True)).print(f"running {len(used)} models on {', '.join(SPLITS)} ...")
        data = {s: SplitData(cache, s, root=cfg.root) for s in SPLITS}
        models = {m.name: m for m in cache.load_models(device=device, root=cfg.root) if m.name in used}
        own = model_outputs(models, used, data, batch_size=cfg.eval_batch_size, device=device)
    sets = reference_sets(own, subsets)
    acc = classifier_accuracy(sets["probe-train"], {s: sets[s] for s in HELD_OUT}, data["probe-train"].labels.numpy(),
                              {s: data[s].labels.numpy() for s in HELD_OUT}, len(cache.classes),
                              epochs=cfg.probe_epochs, seed=cfg.seed, device=device)
    rows = sorted((reference(acc, s, cache.profiles) for s in subsets), key=lambda r: (-r["gain"]["eval"], r["models"]))
    singles = {n: {s: acc[s][single_key(n)] for s in HELD_OUT} for n in dict.fromkeys(n for s in subsets for n in s)}
    return GainReport(cache.path, rows, {"probe_epochs": cfg.probe_epochs, "seed": cfg.seed, "classifier": "klas.probes"},
                      {s: d.n for s, d in data.items()}, time.perf_counter() - t0, singles)


__all__ = ["GainReport", "concat_key", "default_subsets", "floor_model", "floor_of", "model_outputs", "reference", "reference_sets", "single_key",
           "subset_gains", "tree_models"]
