"""Which score should ``klas search`` rank by? Chosen on the score split over the families, reported on eval.

:func:`choose_default_score` reads the family reports of :func:`klas.quality.run_family` (or their JSON):

1. **ρ first.** For every candidate score (Γ, Θ alone, the least-squares residual), the mean over the
   families of its score-split in-range Spearman ρ against the ground truth. The *leaders* are the
   scores within ``margin`` of the best mean.
2. **Then HV.** Among the leaders whose selection was trained on every family, the highest mean
   score-split hypervolume of that trained selection (its stitches and its own fine-tuned anchors,
   evaluated on the score split). Without such a leader: the best mean ρ. Exact ties keep the current
   default (:data:`klas.search.DEFAULT_SCORE`).

Only score-split numbers decide; the eval split's (mean in-range ρ, recovery and HV) are reported
beside them and never read by the rule.
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from klas.quality.summary import KLAS_SCORES
from klas.search import DEFAULT_SCORE

#: Candidates within this of the best mean score-split in-range ρ compete on score-split HV.
RHO_MARGIN = 0.05


def _mean(values: list[float | None]) -> float | None:
    """The mean when every value is a finite number, else None."""
    if not values or any(v is None or not math.isfinite(v) for v in values):
        return None
    return float(np.mean(values))


def _evidence(fams: list[dict], name: str) -> dict:
    """One score's numbers on each split, per family and averaged over the families."""
    def strategy(f: dict) -> dict:
        return f.get("strategies", {}).get(name, {})

    score = {"rho_in_range": [f["signals"][name]["score"]["rho_in_range"] for f in fams],
             "hypervolume": [f.get("score_split", {}).get("strategies", {}).get(name, {}).get("hypervolume")
                             for f in fams]}
    report = {"rho_in_range": [f["signals"][name]["eval"]["rho_in_range"] for f in fams],
              "recovery": [f["signals"][name]["eval"]["recovery"] for f in fams],
              "hypervolume": [strategy(f).get("hypervolume") for f in fams]}
    return {"families": [f["family"] for f in fams],
            "score": {**score, **{f"mean_{k}": _mean(v) for k, v in score.items()}},
            "eval": {**report, **{f"mean_{k}": _mean(v) for k, v in report.items()}}}


def choose_default_score(families: Mapping[str, dict], candidates: tuple[str, ...] = KLAS_SCORES,
                         margin: float = RHO_MARGIN) -> dict:
    """The score to make ``klas search``'s default, with the evidence (module docstring); ``{}`` when no
    family rated any candidate."""
    fams = [f for f in families.values() if "signals" in f]
    names = [n for n in candidates if fams and all(n in f["signals"] for f in fams)]
    if not names:
        return {}
    ev = {n: _evidence(fams, n) for n in names}
    rho = {n: ev[n]["score"]["mean_rho_in_range"] for n in names}
    rated = [n for n in names if rho[n] is not None]
    if not rated:
        return {}
    best = max(rho[n] for n in rated)
    leaders = [n for n in rated if rho[n] >= best - margin]
    hv = {n: ev[n]["score"]["mean_hypervolume"] for n in leaders}
    with_hv = [n for n in leaders if hv[n] is not None]
    if with_hv:
        chosen = max(with_hv, key=lambda n: (hv[n], n == DEFAULT_SCORE))
        why = (f"within {margin} of the best mean score-split in-range ρ ({best:+.3f}): {', '.join(leaders)}; of these "
               f"{chosen} has the highest mean score-split HV of its trained selection ({hv[chosen]:.3f})")
    else:
        chosen = max(rated, key=lambda n: (rho[n], n == DEFAULT_SCORE))
        why = f"{chosen} has the best mean score-split in-range ρ ({rho[chosen]:+.3f}); no leader was trained everywhere"
    return {"criterion": ("mean over the families of the score-split in-range Spearman ρ; the scores within "
                          f"{margin} of the best compete on the mean score-split HV of their trained selections; "
                          "the eval split is reported, never used"),
            "chosen": chosen, "current_default": DEFAULT_SCORE, "leaders": leaders, "why": why,
            "margin": margin, "evidence": ev}


__all__ = ["RHO_MARGIN", "choose_default_score"]
