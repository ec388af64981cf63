"""Does an exported model score what its run evaluated? ``klas export pareto --models`` promises that
each artifact computes exactly the network ``klas train`` evaluated (``tests/test_export.py``);
:func:`reproduce_artifacts` checks it on a real run: every artifact of ``RUN/export/models`` is loaded
with :func:`~klas.export.load_stitched` and evaluated on the run's eval split, on a given device,
with the run's own mixed precision and evaluation batch size, and its number of correct images is
compared with the one ``results.parquet`` records.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from klas.errors import KlasError
from klas.export.artifact import load_stitched
from klas.fs import DEFAULT_ROOT, read_json
from klas.optim import AMP_DTYPES, autocast
from klas.run import EXPORT, TRAIN_MANIFEST, open_run_cache, read_selection
from klas.train import SplitData, TrainConfig, read_results
from klas.train.data import DEFAULT_PRELOAD_LIMIT_GB
from klas.utils import resolve_device


def run_amp(run_dir: Path) -> torch.dtype | None:
    """The autocast dtype a trained run evaluated with (its ``train.json``)."""
    word = (read_json(Path(run_dir) / TRAIN_MANIFEST, "training manifest").get("config") or {}).get("amp", "off")
    dtypes = {str(d).removeprefix("torch."): d for d in AMP_DTYPES.values()}
    if word != "off" and word not in dtypes:
        raise KlasError(f"{Path(run_dir) / TRAIN_MANIFEST} records an unknown amp {word!r}; rerun klas train")
    return dtypes.get(word)


@torch.no_grad()
def _correct(model: torch.nn.Module, data: SplitData, batch_size: int, device: torch.device,
             amp_dtype: torch.dtype | None) -> int:
    correct = 0
    for x, y, _ in data.batches(range(data.n), batch_size, device):
        with autocast(device, amp_dtype):
            correct += int((model(x).argmax(1) == y).sum())
    return correct


def reproduce_artifacts(run_dir: Path | str, *, device: str | torch.device | None = "cpu",
                        batch_size: int = TrainConfig.eval_batch_size, root: Path = DEFAULT_ROOT,
                        workers: int = 0, preload_limit_gb: float = DEFAULT_PRELOAD_LIMIT_GB) -> list[dict[str, Any]]:
    """One row per exported model of ``run_dir``: ``id``, ``images``, ``recorded`` and ``measured``
    correct images on the eval split, ``accuracy`` (measured, a fraction) and ``reproduced`` (equal counts).
    ``batch_size`` should be the run's evaluation batch size (batches decide low-precision rounding);
    ``workers`` and ``preload_limit_gb`` say how the eval images are read (:class:`~klas.train.SplitData`)."""
    run_dir = Path(run_dir)
    index = run_dir / EXPORT / "models" / "index.json"
    if not index.is_file():
        raise KlasError(f"run {run_dir} has no exported models ({index} is missing); run: klas export pareto {run_dir} --models")
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    amp_dtype = run_amp(run_dir)
    cache = open_run_cache(read_selection(run_dir), run_dir)
    data = SplitData(cache, "eval", root=root, preload_limit_gb=preload_limit_gb, workers=workers)
    recorded = {r["id"]: r["acc_after"] for r in read_results(run_dir)}
    rows = []
    for entry in read_json(index, "exported models index")["models"]:
        model = load_stitched(run_dir / EXPORT / entry["dir"], device=dev)
        measured = _correct(model, data, batch_size, dev, amp_dtype)
        want = round(recorded[entry["id"]] * data.n)
        rows.append({"id": entry["id"], "images": data.n, "recorded": want, "measured": measured,
                     "accuracy": measured / data.n, "reproduced": measured == want})
    return rows


__all__ = ["reproduce_artifacts", "run_amp"]
