"""Whether two finished training runs are the same training: ``klas train --resume`` after an
interrupt must end exactly where the uninterrupted run ends.

:func:`compare_runs` compares what each run's final checkpoint holds (the stitch layers, the
fine-tuned anchors, the optimiser state) tensor by tensor, and each run's evaluated accuracies.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import torch

from klas.train.checkpoint import checkpoint_path, load_checkpoint
from klas.train.results import read_results

#: The checkpoint entries that make up the trained state.
TRAINED_STATE = ("stitch_states", "anchor_states", "optimizer")


def _tensors(value: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    """Every leaf of a nested checkpoint entry as (dotted name, value)."""
    if isinstance(value, dict):
        for k in sorted(value, key=str):
            yield from _tensors(value[k], f"{prefix}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _tensors(v, f"{prefix}.{i}")
    else:
        yield prefix, value


def _difference(a: Any, b: Any) -> float:
    """0.0 for equal leaves; the largest absolute difference of two same-shaped tensors; inf otherwise."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return float("inf")
        if torch.equal(a, b):
            return 0.0
        return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
    return 0.0 if a == b else float("inf")


def compare_runs(run_a: Path | str, run_b: Path | str) -> dict[str, Any]:
    """How two trained runs differ: ``identical`` (every trained tensor and every accuracy equal),
    ``max_abs_diff`` over the trained tensors, ``tensors`` compared, up to five ``differing`` names,
    and ``results_equal`` (the same ids with the same accuracies before and after training)."""
    ca, cb = (load_checkpoint(checkpoint_path(Path(r))) for r in (run_a, run_b))
    left = dict(leaf for key in TRAINED_STATE for leaf in _tensors(ca.get(key), key))
    right = dict(leaf for key in TRAINED_STATE for leaf in _tensors(cb.get(key), key))
    diffs = {name: (_difference(left[name], right[name]) if name in left and name in right else float("inf"))
             for name in sorted(set(left) | set(right))}
    differing = [name for name, d in diffs.items() if d != 0.0]
    rows = [[(r["id"], r["acc_before"], r["acc_after"]) for r in read_results(Path(run))] for run in (run_a, run_b)]
    results_equal = rows[0] == rows[1]
    return {
        "identical": not differing and results_equal and ca.get("epoch") == cb.get("epoch"),
        "max_abs_diff": max(diffs.values(), default=0.0),
        "tensors": len(diffs),
        "differing": differing[:5],
        "results_equal": results_equal,
    }


__all__ = ["TRAINED_STATE", "compare_runs"]
