"""Deterministic, disjoint, stratified probe-train / score / eval splits of an :class:`ImageSource`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from klas.data.source import SPLITS, ImageSource
from klas.errors import KlasError


@dataclass(frozen=True, eq=False)
class Split:
    """One split: sorted int64 sample ids into the source and their int64 labels (read-only arrays)."""

    name: str
    ids: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        for field in ("ids", "labels"):
            arr = np.array(getattr(self, field), dtype=np.int64)  # own read-only copy; the caller's array stays as is
            arr.setflags(write=False)
            object.__setattr__(self, field, arr)

    def __len__(self) -> int:
        return len(self.ids)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Split):
            return NotImplemented
        return (
            self.name == other.name
            and np.array_equal(self.ids, other.ids)
            and np.array_equal(self.labels, other.labels)
        )

    __hash__ = None  # mutable-looking content; never used as a key


def _check_fractions(fractions: Sequence[float]) -> tuple[float, ...]:
    fr = tuple(float(f) for f in fractions)
    if len(fr) != len(SPLITS) or any(not f > 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
        raise KlasError(
            f"split fractions {fractions!r} are invalid; give {len(SPLITS)} positive numbers for "
            f"{', '.join(SPLITS)} that sum to 1, e.g. (0.6, 0.2, 0.2)"
        )
    return fr


def _allocate(n: int, fractions: tuple[float, ...]) -> np.ndarray:
    """Split ``n`` items by ``fractions`` (largest remainder), giving every split at least one when n allows."""
    ideal = np.asarray(fractions) * n
    counts = np.floor(ideal).astype(np.int64)
    order = np.argsort(-(ideal - counts), kind="stable")  # biggest remainders first, ties by split order
    counts[order[: n - counts.sum()]] += 1
    if n >= len(counts):
        for i in np.flatnonzero(counts == 0):
            counts[np.argmax(counts)] -= 1
            counts[i] = 1
    return counts


def _min_per_class(fractions: tuple[float, ...]) -> int:
    """Smallest group count per class for which every split gets one."""
    n = 1
    while (_allocate(n, fractions) == 0).any():
        n += 1
    return n


def _source_labels_groups(source: ImageSource) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample labels and groups (each sample its own group when the source has none)."""
    labels = getattr(source, "labels", None)
    if labels is None or len(labels) != len(source):
        labels = [source.label(i) for i in range(len(source))]
    labels = np.asarray(labels, dtype=np.int64)
    groups = getattr(source, "groups", None)
    groups = np.arange(len(labels), dtype=np.int64) if groups is None else np.asarray(groups, dtype=np.int64)
    return labels, groups


def _balanced_head(ids: np.ndarray, labels: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    """First ``limit`` ids of a seeded shuffle that deals the classes out round-robin (class-balanced)."""
    perm = rng.permutation(len(ids))
    ids, labels = ids[perm], labels[perm]
    rank = np.empty(len(ids), dtype=np.int64)  # position of each sample within its class after the shuffle
    for c in np.unique(labels):
        where = np.flatnonzero(labels == c)
        rank[where] = np.arange(len(where))
    class_order = rng.permutation(int(labels.max()) + 1)  # which class deals first in each round
    order = np.lexsort((class_order[labels], rank))
    return np.sort(ids[order[:limit]])


def make_splits(
    source: ImageSource,
    seed: int = 0,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    limit: int | None = None,
) -> dict[str, Split]:
    """Cut ``source`` into the :data:`SPLITS` (``probe-train``, ``score``, ``eval``), deterministically.

    Stratified: within each class the groups (the original scan for digits, each file for folders) are
    shuffled with ``seed`` and dealt out by ``fractions`` (default 60/20/20), so the splits are disjoint,
    cover the source, keep every group whole and hold every class. A class too small to appear in all
    three splits raises :class:`KlasError`.

    ``limit`` (``--limit N``) then keeps N ids of each split, chosen by a seeded shuffle that deals classes
    round-robin, so a limited split stays class-balanced; it must be at least the number of classes.
    Returns ``{name: Split}`` in :data:`SPLITS` order with ids sorted ascending.
    """
    fractions = _check_fractions(fractions)
    labels, groups = _source_labels_groups(source)
    uniq_groups, first, group_index = np.unique(groups, return_index=True, return_inverse=True)
    group_labels = labels[first]
    if not np.array_equal(group_labels[group_index], labels):
        raise KlasError(f"data set {source.name!r} has a group with mixed labels; its samples cannot be split")

    rng = np.random.default_rng([seed, 0])
    group_split = np.empty(len(uniq_groups), dtype=np.int64)
    for c in range(len(source.classes)):
        members = rng.permutation(np.flatnonzero(group_labels == c))
        bounds = np.cumsum(_allocate(len(members), fractions))[:-1]
        for s, part in enumerate(np.split(members, bounds)):
            group_split[part] = s
    sample_split = group_split[group_index]

    _check_label_sets(source, labels, sample_split, fractions)

    if limit is not None and limit < len(source.classes):
        raise KlasError(
            f"--limit {limit} is smaller than the number of classes ({len(source.classes)}); "
            f"use --limit {len(source.classes)} or more so every split keeps every class"
        )
    limit_rng = np.random.default_rng([seed, 1])
    out: dict[str, Split] = {}
    for s, name in enumerate(SPLITS):
        ids = np.flatnonzero(sample_split == s).astype(np.int64)
        if limit is not None and limit < len(ids):
            ids = _balanced_head(ids, labels[ids], limit, limit_rng)
        out[name] = Split(name=name, ids=ids, labels=labels[ids])
    return out


def _check_label_sets(
    source: ImageSource, labels: np.ndarray, sample_split: np.ndarray, fractions: tuple[float, ...]
) -> None:
    """Every class must be present in every split; name the first class that is not and what it needs."""
    for c, cls in enumerate(source.classes):
        present = {int(s) for s in np.unique(sample_split[labels == c])}
        if len(present) < len(SPLITS):
            n = int((labels == c).sum())
            missing = ", ".join(SPLITS[s] for s in range(len(SPLITS)) if s not in present)
            raise KlasError(
                f"class {cls!r} has {n} image(s), too few to appear in every split (missing from {missing}); "
                f"give it at least {_min_per_class(fractions)} images or remove it"
            )
