"""``checkpoints/last.pt``: everything needed to continue a training run exactly.

The file is only ever replaced atomically (written to a temporary name in the same directory, synced,
then ``os.replace``d), so an interrupted run (Ctrl-C, a crash, a killed job) leaves the previous
checkpoint intact.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from klas.errors import KlasError
from klas.fs import atomic_write
from klas.utils import sha256_state_dict

FORMAT = "klas.checkpoint/1"
LAST = "last.pt"


def checkpoint_path(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints" / LAST


def rng_state() -> dict[str, Any]:
    """Global RNG states, in types ``torch.load(weights_only=True)`` accepts."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(np.asarray(keys).astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def weights_sha256(stitch_states: dict[str, dict[str, torch.Tensor]],
                   anchor_states: dict[str, dict[str, torch.Tensor]] | None = None) -> str:
    """The content hash of a checkpoint's weights: every stitch layer's and (after ``full_tune``) every
    anchor's tensors, by name, dtype, shape and bytes (:func:`klas.utils.sha256_state_dict`).

    Two trainings that differ in anything that moves a weight (seed, recipe, data) differ here; later
    stages record it to prove which checkpoint their numbers came from.
    """
    flat = {f"stitch/{sid}/{k}": v for sid, state in stitch_states.items() for k, v in state.items()}
    flat.update({f"anchor/{name}/{k}": v for name, state in (anchor_states or {}).items() for k, v in state.items()})
    return sha256_state_dict(flat)


def save_checkpoint(path: Path, data: dict[str, Any]) -> str:
    """Write ``data`` (plus the format tag and ``weights_sha256``, its weights' content hash) to ``path``
    atomically; returns that hash."""
    digest = weights_sha256(data["stitch_states"], data.get("anchor_states"))
    with atomic_write(path, "wb") as fh:
        torch.save({"format": FORMAT, **data, "weights_sha256": digest}, fh)
    return digest


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, with one-line errors; weights that do not
    hash to the ``weights_sha256`` it records (a damaged or edited file) are refused."""
    path = Path(path)
    if not path.is_file():
        raise KlasError(f"no checkpoint at {path}; train without --resume first")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise KlasError(f"checkpoint {path} is unreadable ({exc.__class__.__name__}); delete it and train again") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise KlasError(f"{path} is not a klas training checkpoint ({FORMAT}); delete it and train again")
    recorded = data.get("weights_sha256")
    if recorded is not None:
        try:
            ok = weights_sha256(data["stitch_states"], data.get("anchor_states")) == recorded
        except (KeyError, TypeError, AttributeError, RuntimeError):
            ok = False
        if not ok:
            raise KlasError(f"checkpoint {path} is damaged: its weights do not match the hash it records; "
                            f"delete it and train again")
    return data
