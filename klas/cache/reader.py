"""Read a finished cache: memory-mapped features, logits, labels, and the models it was made with."""
from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import numpy as np

from klas.cache.integrity import verify_files
from klas.errors import KlasError
from klas.fs import LOCK, MARKER, dir_kind
from klas.models import LoadedModel, Profile, load_model, parse_spec
from klas.utils import DEFAULT_ROOT, read_json

#: Manifest format; /2 added ``files`` (per-array size, mtime and sha256). /1 caches are refused.
FORMAT = "klas.cache/2"
MANIFEST = "manifest.json"
STATE = ".klas-cache-state.json"  # present while a cache is being written


def array_paths(splits, model_names) -> list[str]:
    """Every array of a cache, relative to its directory, in a fixed order."""
    paths = []
    for s in splits:
        paths += [f"{s}/ids.npy", f"{s}/labels.npy"]
        paths += [f"{s}/{m}/{f}" for m in model_names for f in ("features.npy", "logits.npy")]
    return paths


def recognise_cache(path: Path) -> str | None:
    """``"cache"`` for a cache directory written before klas marked its directories, else None.

    Such a directory holds a klas cache manifest (any ``klas.cache/N`` format) or the state file of a
    cache being written.
    """
    if (path / STATE).is_file():
        return "cache"
    try:
        fmt = json.loads((path / MANIFEST).read_text()).get("format", "")
    except (OSError, ValueError, AttributeError):
        return None
    return "cache" if isinstance(fmt, str) and fmt.startswith("klas.cache/") else None


class Cache:
    """A complete cache directory (see docs/formats.md). Arrays are read zero-copy via np.memmap."""

    def __init__(self, path: Path, manifest: dict) -> None:
        self.path = Path(path)
        self.manifest = manifest

    def verify(self, full: bool = False) -> None:
        """Check every array against the manifest (size and mtime; sha256 when ``full`` or the mtime moved)."""
        files = self.manifest.get("files")
        if not isinstance(files, dict) or not all(isinstance(r, dict) and {"size", "mtime_ns", "sha256"} <= r.keys()
                                                  for r in files.values()):
            raise KlasError(f"manifest of cache {self.path} has no valid file list; re-run the klas cache command with --overwrite")
        verify_files(self.path, files, full=full)

    # -- identity -------------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def model_names(self) -> list[str]:
        return [m["name"] for m in self.manifest["models"]]

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["data"]["classes"])

    def model(self, name: str) -> dict:
        for m in self.manifest["models"]:
            if m["name"] == name:
                return m
        raise KlasError(f"model {name!r} is not in cache {self.path}; it has {', '.join(self.model_names)}")

    @cached_property
    def profiles(self) -> dict[str, Profile]:
        return {m["name"]: Profile.from_json(m["profile"]) for m in self.manifest["models"]}

    # -- arrays ---------------------------------------------------------------------------------
    def _split_dir(self, split: str) -> Path:
        if split not in self.manifest["splits"]:
            raise KlasError(
                f"split {split!r} is not in cache {self.path} (it has {', '.join(self.splits)}); "
                f"re-run klas cache with --split including {split}"
            )
        return self.path / split

    def _load(self, path: Path) -> np.ndarray:
        try:
            return np.load(path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise KlasError(f"cache file {path} is missing or damaged; re-run klas cache with --overwrite") from exc

    def ids(self, split: str) -> np.ndarray:
        return self._load(self._split_dir(split) / "ids.npy")

    def labels(self, split: str) -> np.ndarray:
        return self._load(self._split_dir(split) / "labels.npy")

    def features(self, split: str, model: str) -> np.ndarray:
        """(N, F) float16 memmap: every representation's pooled features side by side."""
        self.model(model)
        return self._load(self._split_dir(split) / model / "features.npy")

    def logits(self, split: str, model: str) -> np.ndarray:
        """(N, C) float16 memmap of the model's final logits."""
        self.model(model)
        return self._load(self._split_dir(split) / model / "logits.npy")

    def columns(self, model: str, rep: int, pool: str | None = None) -> slice:
        """Columns of representation ``rep`` in features.npy: one pool name, or all of them (None)."""
        cols = self.model(model)["columns"][rep]
        if pool is None:
            starts, stops = zip(*cols.values())
            return slice(min(starts), max(stops))
        if pool not in cols:
            raise KlasError(f"pool {pool!r} not cached for {model}; it has {', '.join(cols)}")
        return slice(*cols[pool])

    def rep_features(self, split: str, model: str, rep: int, pool: str | None = None) -> np.ndarray:
        """(N, width) view of one representation's pooled features (no copy)."""
        return self.features(split, model)[:, self.columns(model, rep, pool)]

    # -- what later stages rebuild ----------------------------------------------------------------
    def load_models(self, device="cpu", root: Path = DEFAULT_ROOT) -> list[LoadedModel]:
        """The cached models with the same weights (checked by hash), profiled at the cached input size."""
        shared = self.manifest["data"]["preprocess"]
        size = tuple(shared["input_size"])
        classes = len(self.classes) if len(self.classes) >= 2 else None
        out = []
        for m in self.manifest["models"]:
            loaded = load_model(parse_spec(m["spec"]), random_init=m["random_init"], root=root,
                                device=device, input_size=size, num_classes=classes)
            if loaded.weights_sha256 != m["weights_sha256"]:
                raise KlasError(
                    f"weights of {m['name']} changed since cache {self.path} was written; "
                    "re-run klas cache with --overwrite"
                )
            loaded.feed(shared, self.model_input(m["name"]))
            out.append(loaded)
        return out

    def model_input(self, name: str) -> dict:
        """What model ``name`` saw: the shared resolution, resize and crop, with its own mean and std.
        (Caches written before models had their own normalisation fed every model the shared one.)"""
        shared = self.manifest["data"]["preprocess"]
        seen = self.model(name).get("input")
        if seen is None:
            seen = {k: shared.get(k) for k in ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std")}
        return seen

    def source(self, root: Path = DEFAULT_ROOT):
        """The data source the cache was made from, checked against its fingerprint."""
        from klas.data import open_source

        data = self.manifest["data"]
        src = open_source(data["source"], root=root)
        if src.fingerprint != data["fingerprint"]:
            raise KlasError(
                f"data {data['source']} changed since cache {self.path} was written; "
                "re-run klas cache with --overwrite"
            )
        return src

    def split(self, name: str):
        from klas.data import Split

        return Split(name, np.asarray(self.ids(name)), np.asarray(self.labels(name)))

    def transform(self):
        from klas.data import build_transform

        return build_transform(self.manifest["data"]["preprocess"])

    def dataset(self, split: str, root: Path = DEFAULT_ROOT):
        """Torch dataset of (image tensor, label, id) for a split, with the cache's preprocessing."""
        from klas.data import SplitDataset

        return SplitDataset(self.source(root), self.split(split), self.transform())


def open_cache(path: Path | str, verify: bool = False) -> Cache:
    """Open a complete cache, or fail with a message saying how to make or finish it.

    Every array is checked against the manifest: cheaply (sizes and mtimes, hashing only files whose
    mtime changed) by default, by full sha256 with ``verify=True``. A changed file is refused.
    """
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        if (path / STATE).is_file():
            why = _state_error(path)
            if why:
                raise KlasError(f"cache {path} is unfinished: {why}")
            raise KlasError(f"cache {path} is incomplete (interrupted?); re-run the same klas cache command to finish it")
        kind = dir_kind(path, recognise_cache)
        if kind not in (None, "cache"):
            raise KlasError(f"{path} is a klas {kind} directory, not a cache; give a cache directory (klas cache "
                            f"--model A --model B --data DIR --out DIR writes one)")
        if kind == "cache" and any(p.name not in (MARKER, LOCK) for p in path.iterdir()):
            raise KlasError(f"cache {path} has lost its {MANIFEST} (its arrays cannot be checked without it); rebuild "
                            f"it: re-run the klas cache command that made it, with --overwrite")
        raise KlasError(f"no cache at {path}; create one with: klas cache --model A --model B --data DIR --out {path}")
    manifest = read_json(manifest_path, "cache manifest")
    fmt = manifest.get("format") if isinstance(manifest, dict) else None
    if fmt != FORMAT:
        older = isinstance(fmt, str) and fmt.startswith("klas.cache/")
        what = f"format {fmt} of an older klas, without file checksums" if older else f"not a {FORMAT} manifest"
        raise KlasError(f"{manifest_path} is {what}; re-run the klas cache command with --overwrite")
    cache = Cache(path, manifest)
    cache.verify(full=verify)
    return cache


def _state_error(path: Path) -> str | None:
    """The error a failed build recorded in its state file, if any."""
    try:
        state = json.loads((path / STATE).read_text())
    except (OSError, ValueError):
        return None
    return state.get("error") if isinstance(state, dict) else None
