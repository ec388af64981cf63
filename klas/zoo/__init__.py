"""The demo model family, trained locally on CPU on the built-in digits set (no downloads).

Importing this package registers the architectures with timm (``timm.create_model("klas_vit_ti")``);
:func:`train_zoo` / :func:`zoo_weights` train them on the digits ``probe-train`` split and store
``<root>/zoo/<arch>.safetensors`` plus an index ``<root>/zoo/zoo.json`` (see :func:`read_zoo`).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterable

import torch
from rich.console import Console

from klas.errors import KlasError
from klas.fs import DirLock, ensure_writable_dir
from klas.models import register_weights_source
from klas.term import make_console
from klas.utils import DEFAULT_ROOT, read_json, sha256_file
from klas.zoo.models import arch_args  # importing klas.zoo.models registers the architectures with timm
from klas.zoo.train import Recipe

#: The demo families, smallest first (what ``klas zoo`` and ``make demo`` train).
FAMILIES: dict[str, tuple[str, ...]] = {
    "vit": ("klas_vit_ti", "klas_vit_s", "klas_vit_b"),
    "cnn": ("klas_resnet_s", "klas_resnet_l"),
}
#: Further families for the quality benchmark (``benchmarks/bench_quality.py``), trained only when named:
#: ``klas zoo --model klas_vit_d4 --model klas_vit_d8``. ``vit-depth``: unequal depths (4 / 6 / 8) and widths.
BENCH_FAMILIES: dict[str, tuple[str, ...]] = {
    "vit-depth": ("klas_vit_d4", "klas_vit_s", "klas_vit_d8"),
}
#: What ``klas zoo`` trains without ``--model``.
DEMO_ARCHS: tuple[str, ...] = tuple(a for members in FAMILIES.values() for a in members)
#: Every architecture the zoo knows (demo first).
ZOO_ARCHS: tuple[str, ...] = tuple(dict.fromkeys(
    a for members in (*FAMILIES.values(), *BENCH_FAMILIES.values()) for a in members))

#: Training recipe per model (see :class:`klas.zoo.train.Recipe`), chosen on the score split by
#: ``benchmarks/bench_zoo.py`` (3 seeds each; README, "The demo family"): 8 epochs without augmentation
#: left klas_vit_s anywhere between 83.5 and 88.0 % depending on the seed; 30 epochs with a random affine
#: warp per image (±3 px, ±10°, ±10 % scale) give 96.2 ± 0.1 %. An EMA of the weights did not help once
#: the images are augmented. The shipped weights (:mod:`klas.zoo.shipped`) were trained with these.
VIT_RECIPE = Recipe(epochs=30, batch_size=64, lr=1e-3, augment=1.0)
CNN_RECIPE = Recipe(epochs=20, batch_size=128, lr=1.5e-3, augment=1.0)
RECIPES: dict[str, Recipe] = {
    "klas_vit_ti": VIT_RECIPE,
    "klas_vit_s": VIT_RECIPE,
    "klas_vit_b": VIT_RECIPE,
    "klas_vit_d4": VIT_RECIPE,
    "klas_vit_d8": VIT_RECIPE,
    "klas_resnet_s": CNN_RECIPE,
    "klas_resnet_l": CNN_RECIPE,
}

#: Seed of the digits split the zoo trains on (probe-train) and reports on (eval).
SPLIT_SEED = 0

_INDEX = "zoo.json"


def is_zoo_model(arch: str) -> bool:
    """Whether ``arch`` (optionally ``arch.tag``) is one of klas's demo models."""
    return arch.split(".", 1)[0] in ZOO_ARCHS


def zoo_dir(root: Path = DEFAULT_ROOT) -> Path:
    """Where the zoo lives: ``root / "zoo"``."""
    return Path(root) / "zoo"


def read_zoo(root: Path = DEFAULT_ROOT) -> dict[str, dict[str, Any]]:
    """The zoo index, ``{arch: record}``; ``{}`` before anything was trained.

    A record holds ``eval_acc`` (top-1 on the digits eval split, a fraction), ``params``, ``macs``
    (per 3x32x32 image, fvcore convention: one multiply-add = one FLOP), ``epochs``, ``steps``,
    ``seconds`` (training + evaluation wall time), ``seed``, ``sha256`` of the weights file,
    ``weights`` (file name in :func:`zoo_dir`), ``data`` / ``data_fingerprint`` / ``split_seed``,
    split sizes, ``arch_args`` (constructor arguments), the full ``recipe`` and the torch / timm versions.
    """
    path = zoo_dir(root) / _INDEX
    if not path.exists():
        return {}
    index = read_json(path, what="zoo index")
    if not isinstance(index, dict):
        raise KlasError(f"zoo index {path} is not a JSON object; delete it and rerun 'klas zoo'")
    return index


def _recipe_for(arch: str, **overrides: int | None) -> Recipe:
    """The default recipe of ``arch`` with the given non-None fields replaced."""
    return dataclasses.replace(RECIPES[arch], **{k: v for k, v in overrides.items() if v is not None})


def _is_current(arch: str, record: dict[str, Any] | None, recipe: Recipe, fingerprint: str, root: Path) -> bool:
    """A record counts only if it matches the architecture, recipe and data and its weights file is intact."""
    if (
        not record
        or record.get("arch_args") != arch_args(arch)
        or record.get("recipe") != recipe.to_json()
        or record.get("data_fingerprint") != fingerprint
    ):
        return False
    path = zoo_dir(root) / record.get("weights", "")
    return path.is_file() and sha256_file(path) == record.get("sha256")


def _check_names(names: Iterable[str] | None) -> list[str]:
    if names is None:
        return list(DEMO_ARCHS)
    names = [n.split(".", 1)[0] for n in names]
    unknown = [n for n in names if n not in ZOO_ARCHS]
    if unknown:
        raise KlasError(f"unknown zoo model {unknown[0]!r}; the zoo has {', '.join(ZOO_ARCHS)}")
    return list(dict.fromkeys(names))


def _digits_fingerprint() -> str:
    from klas.data.digits import DigitsConfig

    return DigitsConfig().fingerprint()


def stale_models(root: Path = DEFAULT_ROOT, names: Iterable[str] | None = None) -> list[str]:
    """The zoo models (of ``names``, default the demo families') that :func:`train_zoo` would (re)train with its defaults."""
    index, fingerprint = read_zoo(root), _digits_fingerprint()
    return [a for a in _check_names(names) if not _is_current(a, index.get(a), _recipe_for(a), fingerprint, Path(root))]


def train_zoo(
    root: Path = DEFAULT_ROOT,
    names: Iterable[str] | None = None,
    force: bool = False,
    console: Console | None = None,
    *,
    epochs: int | None = None,
    max_steps: int | None = None,
    limit: int | None = None,
    threads: int | None = None,
    shipped: bool = True,
) -> dict[str, dict[str, Any]]:
    """Install or train the zoo models that are missing or stale (``DEMO_ARCHS`` by default, any of
    ``ZOO_ARCHS`` when named); return the index.

    A model is (re)placed when ``force`` is set, its weights are missing or do not match their recorded
    sha256, or its recorded architecture / recipe / data fingerprint differ from the current ones. Then,
    unless ``force`` is set, ``shipped`` is False or the recipe is overridden, the weights klas ships for
    exactly this recipe (:mod:`klas.zoo.shipped`) are verified and installed (seconds); otherwise the
    model is trained (minutes), and with ``force`` its record says how far it lands from the shipped one.
    ``epochs``, ``max_steps`` and ``limit`` (images kept per split) override the recipe for quick smoke
    runs; the record keeps the recipe it was trained with, so a later default call replaces those models.

    ``threads`` sets torch's intra-op threads while training (restored afterwards); the default ``None``
    leaves torch's own choice. On a CPU shared with other busy processes, ``threads=1`` avoids
    oversubscription and was 2-4x faster in our measurements. The thread count changes float rounding,
    so same seed => same weights holds per machine, torch build and thread count (hence the shipped weights).
    """
    from klas.zoo.run import install_and_record, train_and_record
    from klas.zoo.shipped import shipped_record

    root = Path(root)
    install, train, compare = [], [], {}
    index = read_zoo(root)
    fingerprint = _digits_fingerprint()
    overridden = any(v is not None for v in (epochs, max_steps, limit))
    for arch in _check_names(names):
        recipe = _recipe_for(arch, epochs=epochs, max_steps=max_steps, limit=limit)
        if not force and _is_current(arch, index.get(arch), recipe, fingerprint, root):
            continue
        ship = shipped_record(arch, arch_args(arch), recipe.to_json(), fingerprint) if not overridden else None
        if ship is not None and shipped and not force:
            install.append((arch, ship))
        else:
            train.append((arch, recipe))
            if ship is not None:
                compare[arch] = ship
    if install or train:
        ensure_writable_dir(root, "--root")  # fail now, not after minutes of training
        ensure_writable_dir(zoo_dir(root), "--root")
        console = console or make_console(stderr=True)
        previous = torch.get_num_threads()
        if threads is not None:
            torch.set_num_threads(threads)
        try:
            with DirLock(zoo_dir(root), "--root"):  # one writer per zoo: a second one learns of it at once
                if install:
                    install_and_record(install, root, console)
                if train:
                    train_and_record(train, root=root, console=console, shipped=compare)
        finally:
            torch.set_num_threads(previous)
    return read_zoo(root)


def ship_zoo(root: Path = DEFAULT_ROOT, names: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
    """Maintainers: write the trained zoo models of ``root`` (``names``, default the demo families) as the
    weights klas ships (``klas/zoo/shipped/``, float16, eval top-1 measured on them); return that index."""
    from klas.zoo.run import _eval_split
    from klas.zoo.shipped import ship
    from klas.zoo.train import accuracy

    index, wanted = read_zoo(root), _check_names(names)
    fingerprint = _digits_fingerprint()
    stale = [a for a in wanted if not _is_current(a, index.get(a), _recipe_for(a), fingerprint, Path(root))]
    if stale:
        raise KlasError(f"zoo model {stale[0]} in {zoo_dir(root)} is missing or not trained with the current recipe; "
                        f"run 'klas zoo --force --model {stale[0]}' first")

    def measure_on(arch: str):
        x, y = _eval_split(arch, Path(root))
        return lambda model: accuracy(model, x, y)

    out = {}
    for arch in wanted:
        out.update(ship({arch: index[arch]}, zoo_dir(root), measure_on(arch)))
    return out


def train_named(specs: Iterable[str], root: Path = DEFAULT_ROOT, console: Console | None = None) -> list[str]:
    """Train the zoo models that ``--model`` specs (``[ALIAS:]NAME[=path]``) name without a weights file and that are
    missing or stale, before any timed work (a spec with a file, or not a zoo model, needs nothing); returns them."""
    from klas.models.load import parse_spec

    archs = [s.arch for s in map(parse_spec, specs) if s.path is None and is_zoo_model(s.arch)]
    stale = stale_models(root, archs) if archs else []
    if stale:
        (console or Console(stderr=True)).print(f"installing zoo models {', '.join(stale)} first")
        train_zoo(root, stale, console=console)
    return stale


def zoo_weights(arch: str, root: Path = DEFAULT_ROOT, console: Console | None = None) -> Path:
    """Path of ``arch``'s ``.safetensors`` weights, training that model first if it is missing or stale."""
    (arch,) = _check_names([arch])
    index = train_zoo(root, names=[arch], console=console)
    return zoo_dir(root) / index[arch]["weights"]


def _weights_source(arch: str, root: Path) -> Path | None:
    """klas.models' local weights source for the demo family (trains a missing or stale model first)."""
    return zoo_weights(arch, root=root) if is_zoo_model(arch) else None


register_weights_source(_weights_source)

__all__ = [
    "BENCH_FAMILIES", "DEMO_ARCHS", "FAMILIES", "ZOO_ARCHS", "RECIPES", "SPLIT_SEED",
    "is_zoo_model", "zoo_dir", "read_zoo", "ship_zoo", "stale_models", "train_named", "train_zoo", "zoo_weights",
]
