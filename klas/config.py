"""Settings of ``klas cache`` and ``klas search`` (:class:`CacheConfig`, :class:`SearchConfig`) and the
words their options accept, torch-free: the CLI builds them, and reads every default from them, before
torch is imported.

Each class is the one place its defaults live; it checks every value once, in ``__post_init__``, and a
bad value is a one-line :class:`~klas.errors.KlasError` naming the flag. ``build_cache`` and ``search``
take one (keyword overrides build it: ``search(cache, run, budget=3.0)``).

The vocabularies live here so that the checks need no torch; the modules that act on them
(:mod:`klas.optim`, :mod:`klas.stitch`, :mod:`klas.select`, :mod:`klas.data`) import them from here.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from klas.errors import KlasError
from klas.fs import DEFAULT_ROOT
from klas.settings import Settings
from klas.units import gflops_to_macs

#: Words every ``--amp`` option accepts.
AMP_CHOICES: tuple[str, ...] = ("auto", "bf16", "fp16", "off")
#: The three splits of a cache.
SPLITS: tuple[str, ...] = ("probe-train", "score", "eval")
#: Selection strategies (:mod:`klas.select`).
STRATEGIES: tuple[str, ...] = ("klas", "snnet", "random", "cka")
#: Which model pairs are stitched: cheaper -> more expensive, or every ordered pair.
DIRECTIONS: tuple[str, ...] = ("up", "both")
#: Stitch layer kinds (:mod:`klas.stitch.layers`).
STITCH_KINDS: tuple[str, ...] = ("linear", "mlp", "lora")
#: What the probes learn: the labels, or each model's own softmax (label-free).
PROBE_TARGETS: tuple[str, ...] = ("labels", "model")
#: What ``strategy="klas"`` ranks by: the paper's Γ = Θ / Σ, or Θ alone (``--score``).
SCORES: tuple[str, ...] = ("gamma", "theta")
#: What ``strategy="klas"`` ranks by when no score is given (the one place this default lives; ``klas
#: search`` prints the score it ranks by). ``benchmarks/bench_quality.py`` chooses it on the score split:
#: over the vit, vit-depth, cnn and hetero families, Θ alone (mean in-range ρ +0.80 vs Γ's +0.58; README
#: "Does it work?"), so the default departs from the paper's Γ, which ``--score gamma`` keeps.
DEFAULT_SCORE = "theta"
#: How ``klas search`` names each score when it says what it ranks by.
SCORE_TEXT = {"gamma": "Γ = Θ / Σ (the paper's)", "theta": "Θ alone"}
#: The two cost axes of budgets, buckets and fronts: GFLOPs (fvcore convention) or measured milliseconds.
AXES: tuple[str, ...] = ("gflops", "latency")
#: Batch sizes ``klas cache`` profiles latency at, by default.
CACHE_LATENCY_BATCHES: tuple[int, ...] = (1, 64)
#: The batch a latency budget, a predicted and a measured latency are for, by default (one image: deployment).
DEFAULT_LATENCY_BATCH = 1
#: Repeats of every latency measurement (the median is kept), after one warm-up.
DEFAULT_LATENCY_REPEATS = 5


def parse_batches(text: str | None, flag: str = "--latency-batch") -> tuple[int, ...]:
    """``"1,64"`` -> ``(1, 64)``; ``"off"`` or ``""`` -> ``()``; else a one-line error naming ``flag``."""
    if text is None or str(text).strip().lower() in ("", "off", "none"):
        return ()
    try:
        sizes = tuple(int(p) for p in str(text).split(",") if p.strip())
    except ValueError:
        sizes = ()
    if not sizes or any(s < 1 for s in sizes):
        raise KlasError(f"{flag} {text!r} is not a list of batch sizes; write e.g. {flag} 1,64 (or off)")
    return tuple(sorted(set(sizes)))


_BUDGET = re.compile(r"\s*(?P<value>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(?P<unit>ms|gflops)?\s*", re.IGNORECASE)


def parse_budget(text: str, flag: str = "--best-under") -> tuple[str, float]:
    """``"0.01"`` -> ``("gflops", 0.01)`` (fvcore convention); ``"12ms"`` -> ``("latency", 12.0)``; else a one-line error."""
    m = _BUDGET.fullmatch(str(text))
    value = float(m["value"]) if m else math.nan
    if not m or not math.isfinite(value) or value <= 0:
        raise KlasError(f"{flag} {text!r} is not a budget; write GFLOPs as a number (e.g. {flag} 0.01) "
                        f"or milliseconds with ms (e.g. {flag} 12ms)")
    return ("latency" if (m["unit"] or "").lower() == "ms" else "gflops"), value


def format_budget(axis: str, value: float) -> str:
    """``0.01 GFLOPs`` or ``12 ms``: a budget as klas prints it."""
    return f"{value:g} ms" if axis == "latency" else f"{value:g} GFLOPs"


class _Checks(Settings):
    """Checks the two configs share."""

    def _batches(self, name: str, allow_empty: bool) -> None:
        v = getattr(self, name)
        v = (v,) if isinstance(v, int) and not isinstance(v, bool) else v
        ok = isinstance(v, (tuple, list)) and all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in v)
        if not ok or (not v and not allow_empty):
            raise KlasError(f"{'--' + name.replace('_', '-')} must list positive batch sizes, got {getattr(self, name)!r}")
        object.__setattr__(self, name, tuple(sorted(set(int(b) for b in v))))

    def _optional_positive(self, name: str, unit: str) -> None:
        if getattr(self, name) is not None:
            self._number(name, f"> 0 ({unit})", lambda v: v > 0)


@dataclass(frozen=True)
class CacheConfig(_Checks):
    """Options of ``klas cache`` (the models, the data and ``--out`` are its arguments).

    * ``splits`` (None = all three), ``limit`` (None: every image; else at most N per split), ``seed`` (0)
      of the split assignment, ``random_init`` (False: pretrained or given weights), ``preprocess``
      (None, or keys overriding the first model's timm data config, e.g. ``{"input_size": [3, 224, 224]}``).
    * ``batch_size`` (64), ``workers`` ("auto" or a number of DataLoader processes), ``device`` (None =
      CUDA when present), ``amp`` ("off"; see :func:`klas.optim.parse_amp`).
    * ``latency_batch`` ((1, 64); () = no latency profile): the batch sizes the per-block latency profile
      is measured at on this device (:mod:`klas.stitch.latency`); ``latency_repeats`` (5).
    * ``overwrite`` (False), ``verify`` (False: sha256 of every file of a complete cache), ``root``.
    """

    _what = "cache option"

    splits: tuple[str, ...] | None = None
    limit: int | None = None
    random_init: bool = False
    batch_size: int = 64
    workers: int | str = "auto"
    device: str | None = None
    amp: str = "off"
    preprocess: dict | None = None
    latency_batch: tuple[int, ...] = CACHE_LATENCY_BATCHES
    latency_repeats: int = DEFAULT_LATENCY_REPEATS
    overwrite: bool = False
    verify: bool = False
    seed: int = 0
    root: Path = DEFAULT_ROOT

    def __post_init__(self) -> None:
        if self.splits is not None:
            splits = tuple(dict.fromkeys(self.splits))
            if not splits:
                raise KlasError(f"--split is empty; give one or more of {', '.join(SPLITS)}, comma-separated")
            bad = [s for s in splits if s not in SPLITS]
            if bad:
                raise KlasError(f"unknown split {', '.join(map(repr, bad))}; choose from {', '.join(SPLITS)}")
            object.__setattr__(self, "splits", splits)
        self._int("batch_size", 1)
        if self.limit is not None:
            self._int("limit", 1, " of images per split")
        size = (self.preprocess or {}).get("input_size")
        if size is not None and not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in size):
            raise KlasError(f"--input-size must be a positive whole number of pixels, got {list(size)[-1]!r}")
        workers = str(self.workers).strip().lower()
        if workers == "auto" or (workers.isdigit() and not isinstance(self.workers, bool)):
            object.__setattr__(self, "workers", "auto" if workers == "auto" else int(workers))
        else:
            raise KlasError(f"--workers must be 'auto' or a whole number >= 0, got {self.workers!r}")
        self._choice("amp", AMP_CHOICES)
        self._batches("latency_batch", allow_empty=True)
        self._int("latency_repeats", 1)
        self._int("seed", None)
        self._bool("random_init", "overwrite", "verify")
        object.__setattr__(self, "root", Path(self.root))

    @property
    def split_list(self) -> list[str]:
        """The splits to cache, in order (all three when ``splits`` is None)."""
        return list(SPLITS if self.splits is None else self.splits)


@dataclass(frozen=True)
class SearchConfig(_Checks):
    """Options of ``klas search`` (the cache and ``--run`` are its arguments).

    * ``budget`` (None, GFLOPs, fvcore convention) or ``budget_ms`` (None, milliseconds per batch of
      ``latency_batch`` (1) images on this device, predicted from the cache's latency profile): only
      stitches at or under it are kept, and the buckets split that axis. At most one of the two.
    * ``strategy`` ("klas"), ``buckets`` (20), ``tau`` (0.05), ``direction`` ("up"), ``score`` (DEFAULT_SCORE).
    * ``probe_target`` ("labels"), ``temperature`` (1.0), ``probe_epochs`` (10), ``layer`` ("linear"),
      ``seed`` (0), ``device`` (None = CUDA when present), ``overwrite`` (False).
    """

    _what = "search option"

    budget: float | None = None
    budget_ms: float | None = None
    latency_batch: int = DEFAULT_LATENCY_BATCH
    strategy: str = "klas"
    buckets: int = 20
    tau: float = 0.05
    direction: str = "up"
    probe_target: str = "labels"
    temperature: float = 1.0
    probe_epochs: int = 10
    layer: str = "linear"
    score: str = DEFAULT_SCORE
    seed: int = 0
    device: str | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        self._choice("strategy", STRATEGIES)
        self._choice("score", SCORES)
        if self.score != DEFAULT_SCORE and self.strategy != "klas":
            raise KlasError(f"--score {self.score} ranks klas's selection; drop it or use --strategy klas (not {self.strategy})")
        self._int("buckets", 1)
        self._number("tau", "in [0, 1)", lambda v: 0 <= v < 1)
        self._optional_positive("budget", "GFLOPs")
        self._optional_positive("budget_ms", "milliseconds")
        if self.budget is not None and self.budget_ms is not None:
            raise KlasError("--budget (GFLOPs) and --budget-ms (milliseconds) are two budgets; pass one of them")
        self._int("latency_batch", 1)
        self._number("temperature", "> 0", lambda v: v > 0)
        self._int("probe_epochs", 1)
        self._choice("direction", DIRECTIONS)
        self._choice("probe_target", PROBE_TARGETS)
        if self.layer not in STITCH_KINDS:
            raise KlasError(f"unknown stitch layer {self.layer!r}; use one of {', '.join(STITCH_KINDS)}")
        self._int("seed", None)
        self._bool("overwrite")

    @property
    def axis(self) -> str:
        """The cost axis the buckets split (and the budget is on): ``latency`` with ``budget_ms``, else ``gflops``."""
        return "latency" if self.budget_ms is not None else "gflops"

    @property
    def budget_macs(self) -> float | None:
        """``budget`` in multiply-adds (the unit of every stored cost); None without a GFLOPs budget."""
        return gflops_to_macs(self.budget)

    def inputs(self, cache_fingerprint: str, latency_device: dict | None = None) -> dict[str, Any]:
        """What the run's ``inputs`` hash covers: the cache and the settings that decide the selection.

        Settings added after the first release enter only when they differ from the old behaviour, so
        runs made before them keep their hash (``--score theta``; a latency budget with its batch and device).
        """
        inputs: dict[str, Any] = {
            "cache": cache_fingerprint, "budget": self.budget, "strategy": self.strategy, "buckets": self.buckets,
            "tau": self.tau, "direction": self.direction, "probe_target": self.probe_target,
            "temperature": self.temperature, "probe_epochs": self.probe_epochs, "layer": self.layer, "seed": self.seed,
        }
        if self.score != "gamma":
            inputs["score"] = self.score
        if self.budget_ms is not None:
            inputs.update(budget_ms=self.budget_ms, latency_batch=self.latency_batch, latency_device=latency_device)
        return inputs


__all__ = [
    "AMP_CHOICES", "AXES", "CACHE_LATENCY_BATCHES", "DEFAULT_LATENCY_BATCH", "DEFAULT_LATENCY_REPEATS", "DIRECTIONS",
    "DEFAULT_SCORE", "PROBE_TARGETS", "SCORE_TEXT", "SCORES", "SPLITS", "STITCH_KINDS", "STRATEGIES", "CacheConfig", "SearchConfig", "format_budget",
    "parse_batches", "parse_budget",
]
