"""The run directory (``klas search`` -> ``klas train`` -> ``klas export``): its files, its selection, its owner.

One module owns the format (docs/formats.md): ``klas search`` writes through it, ``klas train`` and
``klas export`` read through it. The promises it keeps:

* **Owned.** :func:`claim_run` makes ``--run`` a directory klas created as a run (a marker file), and
  refuses a user's directory or a cache, ``--overwrite`` or not.
* **One writer.** :func:`run_writer` holds the run's :class:`~klas.fs.DirLock` while a stage writes
  it, after proving the directory writable, so a second process or a read-only place fails at once.
* **Consistent.** ``selection.json`` is written last by search; a new selection removes what later
  stages made from the old one (:func:`write_search`), and train and export refuse outputs whose
  recorded selection hash is not the current selection's (:func:`check_same_selection`).
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Callable, TypeVar

from klas.errors import KlasError
from klas.fs import DirLock, atomic_path, atomic_write, claim_dir, clear_dir, dir_kind, read_json, write_json_atomic
from klas.utils import sha256_json

__all__ = [
    "SELECTION", "SELECTION_FORMAT", "CANDIDATES", "PROBES", "PROBE_ACCURACY", "RESULTS", "TRAIN_MANIFEST",
    "CHECKPOINTS", "EXPORT", "SEARCH_FILES", "LATER_STAGES", "RUN_FLAG", "selection_hash", "claim_run",
    "run_writer", "read_selection", "check_same_selection", "resolve_cache_path", "open_run_cache",
    "stitch_specs", "discard", "write_search", "selection_budget",
]

SELECTION = "selection.json"  # what klas train reads; written last by klas search
SELECTION_FORMAT = "klas.selection/1"
CANDIDATES = "candidates.parquet"
PROBES = "probes.safetensors"
PROBE_ACCURACY = "probe_accuracy.csv"
RESULTS = "results.parquet"  # klas train
TRAIN_MANIFEST = "train.json"  # klas train, written last
CHECKPOINTS = "checkpoints"  # klas train: last.pt
EXPORT = "export"  # klas export pareto

#: What klas search writes; everything else in a run was made by a later stage from a selection.
SEARCH_FILES = (CANDIDATES, PROBES, PROBE_ACCURACY, SELECTION)
LATER_STAGES = (RESULTS, TRAIN_MANIFEST, CHECKPOINTS, EXPORT)

#: How messages name a run directory given as an argument (``klas train RUN``, ``klas export pareto RUN``).
RUN_FLAG = "run directory"

F = TypeVar("F", bound=Callable[..., Any])


def selection_hash(selection: dict) -> str:
    """The hash later stages record to say which selection they were made from (canonical JSON)."""
    return sha256_json(selection)


def _legacy_kind(path: Path) -> str | None:
    """Directories written before markers existed: a run by its search files, a cache by its manifest."""
    if (path / SELECTION).is_file() or (path / CANDIDATES).is_file():
        return "run"
    if (path / "manifest.json").is_file():
        return "cache"
    return None


def claim_run(run_dir: Path | str, flag: str = "--run") -> Path:
    """Make ``run_dir`` a writable run directory klas owns, or refuse in one line (see :func:`klas.fs.claim_dir`)."""
    return claim_dir(run_dir, "run", flag, legacy=_legacy_kind)


def run_writer(fn: F) -> F:
    """Decorate a stage whose first argument is a run directory: check it, claim it (writable, a run), lock it.

    Runs before any model is loaded: a missing or foreign run, a read-only place or a second writer
    ends in one line at once. Under torchrun only rank 0 takes the lock (all ranks write the same run).
    """

    @functools.wraps(fn)
    def wrapper(run_dir: Path | str, *args: Any, **kwargs: Any) -> Any:
        run_dir = Path(run_dir)
        read_selection(run_dir)
        claim_run(run_dir, RUN_FLAG)
        if int(os.environ.get("RANK", "0")) != 0:
            return fn(run_dir, *args, **kwargs)
        with DirLock(run_dir, RUN_FLAG):
            return fn(run_dir, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def read_selection(run_dir: Path | str) -> dict:
    """``run_dir/selection.json``, checked; a KlasError naming the fix when missing or malformed."""
    run_dir = Path(run_dir)
    path = run_dir / SELECTION
    create = f"create the run with: klas search CACHE --run {run_dir}"
    if not run_dir.exists():
        raise KlasError(f"there is no run directory {run_dir}; {create}")
    if not run_dir.is_dir():
        raise KlasError(f"{run_dir} is a file, not a run directory; {create}")
    if not path.is_file():
        kind = dir_kind(run_dir, _legacy_kind)
        if kind not in (None, "run"):
            raise KlasError(f"{run_dir} is a klas {kind} directory, not a run; give a run directory (klas search "
                            f"CACHE --run NAME writes one)")
        raise KlasError(f"run directory {run_dir} has no {SELECTION} (klas search has not finished there); {create}")
    sel = read_json(path, "selection")
    redo = f"search again: klas search CACHE --run {run_dir} --overwrite"
    if not isinstance(sel, dict) or sel.get("format") != SELECTION_FORMAT:
        raise KlasError(f"{path} is not a {SELECTION_FORMAT} file; {redo}")
    for key, kind in (("cache", dict), ("stitches", list), ("anchors", list)):
        if not isinstance(sel.get(key), kind):
            raise KlasError(f"{path} lacks a valid {key!r}; {redo}")
    entries_ok = (isinstance(sel["cache"].get("path"), str)
                  and all(isinstance(s, dict) for s in sel["stitches"])
                  and all(isinstance(a, dict) and isinstance(a.get("name"), str) for a in sel["anchors"]))
    if not entries_ok:
        raise KlasError(f"{path} has malformed cache, stitch or anchor entries; {redo}")
    return sel


def selection_budget(selection: dict) -> dict | None:
    """A selection's budget as ``{"axis": "gflops" | "latency", "value": ..., "unit": ...}`` (None without one).

    Selections written before latency budgets kept a GFLOPs budget as a number (``budget`` and again
    ``budget_gflops``); they read as a GFLOPs budget.
    """
    budget = selection.get("budget", selection.get("budget_gflops"))
    if isinstance(budget, dict):
        return budget
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        return {"axis": "gflops", "value": float(budget), "unit": "GFLOPs"}
    return None


def check_same_selection(recorded: str | None, selection: dict, what: Path, fix: str) -> None:
    """Refuse a later stage's output (``what``) whose recorded selection hash is not ``selection``'s."""
    if recorded != selection_hash(selection):
        raise KlasError(f"{what} was made from another selection than the run's {SELECTION} "
                        f"(the search was redone); {fix}")


def resolve_cache_path(selection: dict, run_dir: Path) -> Path:
    """The cache a selection names: as given (absolute, or relative to the working directory), else
    relative to an ancestor of the run directory (so a project moved as a whole still works)."""
    p = Path(selection["cache"]["path"])
    if p.is_absolute():
        return p
    for base in [Path.cwd(), *Path(run_dir).resolve().parents]:
        if (base / p / "manifest.json").is_file():
            return base / p
    return p


def open_run_cache(selection: dict, run_dir: Path, stage: str = "search"):
    """Open the cache a run's manifest names (``selection.json``, or a tree run's ``tree.json``), refusing
    when it is gone or its fingerprint changed; ``stage`` ("search" | "tree") is what made the run and
    decides the command the message gives to redo it."""
    from klas import cache as cache_mod

    path = resolve_cache_path(selection, run_dir)
    if stage == "tree":
        redo = f"rerun the tree on it: klas tree {path} --run {run_dir} --overwrite"
    else:
        redo = f"search again: klas search {path} --run {run_dir} --overwrite, then klas train {run_dir}"
    try:
        cache = cache_mod.open_cache(path)
    except KlasError as exc:
        raise KlasError(
            f"the cache this run was made from is gone or incomplete ({exc}); recreate it with the same "
            f"klas cache command, or {redo}"
        ) from None
    want = selection["cache"].get("fingerprint")
    if cache.fingerprint != want:
        raise KlasError(
            f"cache {path} changed since the {stage} (fingerprint {cache.fingerprint[:12]} != {str(want)[:12]}); {redo}"
        )
    return cache


def stitch_specs(selection: dict) -> list:
    """The selection's stitches as :class:`~klas.stitch.network.StitchSpec` (one-line error when malformed)."""
    from klas.stitch.network import StitchSpec

    return [StitchSpec.from_json(s) for s in selection["stitches"]]


def discard(run_dir: Path | str, names: tuple[str, ...]) -> None:
    """Delete the entries ``names`` of a claimed run (files or directories), through :func:`klas.fs.clear_dir`."""
    run_dir = Path(run_dir)
    if any((run_dir / n).exists() for n in names):
        clear_dir(run_dir, "run", keep=tuple(p.name for p in run_dir.iterdir() if p.name not in names))


def _old_selection_hash(run_dir: Path) -> str | None:
    try:
        return selection_hash(read_json(run_dir / SELECTION, "selection"))
    except KlasError:
        return None


def write_search(run_dir: Path, rows: list[dict], bank: Any, probe_accuracy: dict[str, list[float]],
                 selection: dict) -> None:
    """Write klas search's files into a claimed run; ``selection.json``, what the next stage reads, last.

    When the run holds output of later stages made from another selection, ``selection.json`` goes
    first and those outputs (:data:`LATER_STAGES`) are deleted with :func:`klas.fs.clear_dir`, so nothing stale survives and an
    interruption leaves a run that is recognisably unfinished.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    run_dir = Path(run_dir)
    stale = any((run_dir / name).exists() for name in LATER_STAGES)
    if stale and _old_selection_hash(run_dir) != selection_hash(selection):
        (run_dir / SELECTION).unlink(missing_ok=True)
        discard(run_dir, LATER_STAGES)
    with atomic_path(run_dir / CANDIDATES) as tmp:
        pq.write_table(pa.Table.from_pylist(rows), tmp)
    bank.save(run_dir / PROBES)  # atomic itself
    lines = ["model,representation,block,probe_top1_score_split"]
    for m, accs in probe_accuracy.items():
        lines += [f"{m},{r},{'stem' if r == 0 else r - 1},{a:.6f}" for r, a in enumerate(accs)]
    with atomic_write(run_dir / PROBE_ACCURACY) as fh:
        fh.write("\n".join(lines) + "\n")
    write_json_atomic(run_dir / SELECTION, selection)
