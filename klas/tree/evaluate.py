"""Evaluating a tree as a system, on the score split (for choosing settings) and the eval split (reported).

* **Fidelity** per branch: the mean cosine similarity between the branch's pre-logits features and
  its model's own on the same image, and the branch's top-1 (through its model's head) beside the
  model's own top-1.
* **Task accuracy** of the system: a linear classifier on the concatenated branch features, trained
  on probe-train with klas's probe trainer (:func:`klas.probes.train_probes`, all classifiers in one
  batched run, each exactly as if trained alone), measured on the score split (where settings are
  chosen) and on the eval split (what is reported), against the same classifier on the concatenated
  features of all models run separately (the ceiling) and on the best single model's own features
  (the floor; "best" = the single model whose classifier scores best on the score split;
  :mod:`klas.tree.gain`). Recovered gain = (tree - floor) / (ceiling - floor), per split.
* **Latency**: median ms of one forward pass over a batch (:func:`klas.train.evaluate.measure_latency`).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from klas import probes
from klas.train.data import SplitData
from klas.train.evaluate import measure_latency

Outputs = dict[str, dict[str, np.ndarray]]  # model -> {"logits": (N, C), "features": (N, D)} float32


#: The splits a tree's system is measured on: classifiers train on the first, settings are chosen on the
#: second, the third is reported.
SPLITS = ("probe-train", "score", "eval")
HELD_OUT = ("score", "eval")


@torch.no_grad()
def split_outputs(system: nn.Module, data: SplitData, *, batch_size: int, device: torch.device) -> Outputs:
    """``system.outputs(x)`` (a StitchTree or AllModels) over the whole split, in order, as float32 arrays."""
    parts: dict[str, dict[str, list]] = {}
    was = system.training
    system.eval()
    for x, _, _ in data.batches(range(data.n), batch_size, device):
        for name, (logits, feats) in system.outputs(x).items():
            d = parts.setdefault(name, {"logits": [], "features": []})
            d["logits"].append(logits.float().cpu())
            d["features"].append(feats.float().cpu())
    system.train(was)
    return {n: {k: torch.cat(v).numpy() for k, v in d.items()} for n, d in parts.items()}


def fidelity(tree: Outputs, own: Outputs, labels: np.ndarray, trunk: str | None = None) -> dict[str, dict]:
    """Per branch: mean cosine to the model's own features, branch top-1, model top-1, top-1 agreement.

    With ``trunk``, also what running the branch's model adds to the trunk's: ``added``, the images
    the trunk's model gets wrong and the branch's model right, and ``top1_added``, the branch's top-1 on
    them (None when there are none) -- the part of a model a tree must reproduce to recover its gain."""
    out: dict[str, dict] = {}
    trunk_wrong = None if trunk is None else own[trunk]["logits"].argmax(1) != labels
    for name, d in tree.items():
        a, b = torch.from_numpy(d["features"]), torch.from_numpy(own[name]["features"])
        cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1)
        pred, ref = d["logits"].argmax(1), own[name]["logits"].argmax(1)
        out[name] = {"cosine": float(cos.mean()), "top1": float(np.mean(pred == labels)),
                     "model_top1": float(np.mean(ref == labels)), "agreement": float(np.mean(pred == ref))}
        if trunk_wrong is not None and name != trunk:
            added = trunk_wrong & (ref == labels)
            out[name]["added"] = int(added.sum())
            out[name]["top1_added"] = float(np.mean(pred[added] == labels[added])) if added.any() else None
    return out


def concat(outputs: Outputs, names: Sequence[str]) -> np.ndarray:
    """The named models' features side by side (N, sum of widths)."""
    return np.concatenate([outputs[n]["features"] for n in names], axis=1)


def classifier_accuracy(train_feats: Mapping[str, np.ndarray], held_feats: Mapping[str, Mapping[str, np.ndarray]],
                        train_labels: np.ndarray, held_labels: Mapping[str, np.ndarray], num_classes: int, *, epochs: int,
                        seed: int, device: torch.device) -> dict[str, dict[str, float]]:
    """Top-1 of a linear classifier per named feature set, all trained together on probe-train
    (``train_feats[key]``), on every held-out split: ``{split: {key: top-1}}`` for ``held_feats[split][key]``.
    The probe trainer starts every classifier at zero and sums their losses, so each one is exactly
    what it would be trained alone: adding feature sets to the batch changes none of the others."""
    keys = list(train_feats)
    bank = probes.train_probes([train_feats[k] for k in keys], np.asarray(train_labels), num_classes, epochs=epochs,
                               seed=seed, device=device)
    out = {}
    for split, feats in held_feats.items():
        acc = bank.accuracy([feats[k] for k in keys], np.asarray(held_labels[split]))
        out[split] = {k: float(acc[i]) for i, k in enumerate(keys)}
    return out


def recovered_gain(tree: float, floor: float, ceiling: float) -> float:
    """(tree - floor) / (ceiling - floor); nan when running all models gains nothing over the floor."""
    return (tree - floor) / (ceiling - floor) if ceiling > floor else float("nan")


class _Features(nn.Module):
    """``forward`` = the system's outputs, for timing the same work that was evaluated."""

    def __init__(self, system: nn.Module) -> None:
        super().__init__()
        self.system = system

    def forward(self, x):
        return self.system.outputs(x)


def latency_ms(system: nn.Module, x: torch.Tensor, *, device: torch.device, repeats: int) -> float:
    """Median ms of ``system.outputs`` over the batch ``x``."""
    return measure_latency(_Features(system), x, device=device, repeats=repeats)


__all__ = ["HELD_OUT", "SPLITS", "Outputs", "classifier_accuracy", "concat", "fidelity", "latency_ms", "recovered_gain", "split_outputs"]
