"""What every settings dataclass of klas shares (``TrainConfig``, ``TreeConfig``): recipe fields, checks
that fail with one line naming the flag, and validated copies. Torch-free.

A settings class is a frozen dataclass deriving from :class:`Settings`; its ``__post_init__`` calls the
checks once. Fields made with :func:`recipe_field` decide the trained weights: they are recorded, hashed
and compared on ``--resume`` (:meth:`Settings.recipe_keys`).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable

from klas.errors import KlasError


def recipe_field(default: Any) -> Any:
    """A dataclass field that belongs to the recipe (decides the trained weights)."""
    return dataclasses.field(default=default, metadata={"recipe": True})


def flag(name: str) -> str:
    """The CLI flag of a field: ``weight_decay`` -> ``--weight-decay``."""
    return "--" + name.replace("_", "-")


class Settings:
    """Checks and copies for a frozen settings dataclass (mixin; the dataclass supplies the fields)."""

    _what = "option"  # "unknown training option(s) ..." in with_overrides

    def _int(self, name: str, minimum: int | None, unit: str = "") -> None:
        v = getattr(self, name)
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or (minimum is not None and v < minimum):
            what = ("a whole number" if minimum is None else "a positive whole number" if minimum == 1
                    else f"a whole number >= {minimum}")
            raise KlasError(f"{flag(name)} must be {what}{unit}, got {v!r}")
        object.__setattr__(self, name, int(v))

    def _number(self, name: str, rule: str, ok: Callable[[float], bool]) -> None:
        v = getattr(self, name)
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or not ok(v):
            raise KlasError(f"{flag(name)} must be a finite number {rule}, got {v!r}")

    def _choice(self, name: str, choices: tuple[str, ...]) -> None:
        v = getattr(self, name)
        if v not in choices:
            raise KlasError(f"unknown {flag(name)} {v!r}; use one of {', '.join(choices)}")

    def _bool(self, *names: str) -> None:
        for name in names:
            if not isinstance(getattr(self, name), bool):
                raise KlasError(f"{flag(name)} must be true or false, got {getattr(self, name)!r}")

    @classmethod
    def recipe_keys(cls) -> tuple[str, ...]:
        """Fields that decide the trained weights: recorded, hashed, and compared on ``--resume``."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("recipe"))

    def with_overrides(self, **overrides: Any):
        """A copy with some fields replaced (validated again); unknown names are a KlasError."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise KlasError(f"unknown {self._what}(s) {', '.join(unknown)}; {type(self).__name__} has "
                            f"{', '.join(sorted(names))}")
        return dataclasses.replace(self, **overrides)


__all__ = ["Settings", "flag", "recipe_field"]
