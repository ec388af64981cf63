"""``klas export pareto RUN --best-under BUDGET``: the single most accurate network under a budget.

A budget is GFLOPs (``0.01``, fvcore convention), milliseconds (``12ms``: the latency ``klas train``
measured, per batch of its ``--latency-batch`` on its device), or what a network of the run (an anchor,
say) costs on either axis (``klas_vit_s:ms``, ``klas_vit_s:gflops``). Among the networks at or under it (on the
latency axis: those whose latency was measured), the one with the highest top-1 after fine-tuning
wins; ties go to the cheaper, then to the smaller id. A budget below every network is a one-line error
naming the cheapest.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from klas.config import format_budget, parse_budget
from klas.errors import KlasError
from klas.metrics import is_finite

#: The results column each axis reads.
COST_KEYS = {"gflops": "gflops", "latency": "latency_ms"}


@dataclass(frozen=True)
class Budget:
    """A parsed ``--best-under``: the axis, the value in its unit, the text given, and a directory-safe label."""

    axis: str
    value: float
    text: str

    @property
    def label(self) -> str:
        """``12ms`` / ``0.01gflops`` / ``klas_vit_s-ms``: part of the artifact's directory name."""
        return re.sub(r"[^A-Za-z0-9_.\-]+", "-", self.text.strip().replace(" ", "")).strip("-") + (
            "" if self.text.strip().lower().endswith(("ms", "gflops")) else "gflops")

    def show(self) -> str:
        return format_budget(self.axis, self.value)


def resolve_budget(text: str, rows: list[dict]) -> Budget:
    """``--best-under`` text -> :class:`Budget`; ``ID:ms`` / ``ID:gflops`` take that network's cost in the run."""
    name, sep, unit = str(text).strip().rpartition(":")
    if sep and unit.lower() in ("ms", "gflops", "latency_ms"):
        axis = "latency" if unit.lower() in ("ms", "latency_ms") else "gflops"
        ref = next((r for r in rows if r["id"] == name), None)
        if ref is None:
            names = ", ".join(r["id"] for r in rows if r["kind"] == "anchor")
            raise KlasError(f"--best-under {text}: {name!r} is not a network of this run (its anchors: {names})")
        value = ref.get(COST_KEYS[axis])
        if not is_finite(value):
            raise KlasError(f"--best-under {text}: {name} has no measured latency; train with --latency all")
        return Budget(axis, float(value), str(text))
    axis, value = parse_budget(text)
    return Budget(axis, value, str(text))


def best_under(rows: list[dict], budget: Budget, where: str = "") -> dict:
    """The most accurate network costing at most ``budget`` on its axis (see the module docstring)."""
    key = COST_KEYS[budget.axis]
    costed = [r for r in rows if is_finite(r.get(key)) and is_finite(r.get("acc_after"))]
    if not costed:
        raise KlasError(f"no network of this run has a measured latency; train it with --latency front (or all) "
                        f"before --best-under {budget.text}")
    under = [r for r in costed if r[key] <= budget.value]
    if not under:
        cheapest = min(costed, key=lambda r: (r[key], r["id"]))
        raise KlasError(f"no network is under {budget.show()}{where}; the cheapest is {cheapest['id']} at "
                        f"{format_budget(budget.axis, cheapest[key])}: raise --best-under to at least that")
    return min(under, key=lambda r: (-r["acc_after"], r[key], r["id"]))


__all__ = ["Budget", "COST_KEYS", "best_under", "resolve_budget"]
