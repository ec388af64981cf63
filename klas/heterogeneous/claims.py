"""From the protocol's rows to its answers: the length curves, the training length (chosen on the score
split) and Mai et al.'s three claims at that length, each reproduced or not, with its numbers (eval split).

* **Curves**: per loss and length, the mean top-1 over the cross-model stitches (both directions, every
  depth) on the score split and on the eval split; also per depth.
* **Length**: where the curves flatten: per loss, the shortest length whose score-split mean is within
  ``flat_tol`` of that loss's best length; the chosen length is the longest of these.
* **The claim loss**: at that length, the loss with the best score-split mean over cross stitches.
* **Claim 1**, FFM first beats the task loss at shallow points: on every shallow cross stitch, the
  FFM-first loss (``ffm->ce``, else ``ffm``) beats ``ce`` (Mai et al., layer 2 on fMoW: 51.7 % vs 25.1 %).
* **Claim 2**, a cross-model stitch beats both models: the cross stitch (any depth, direction and loss)
  with the best score-split top-1 beats both models alone on eval.
* **Claim 3**, cross-model beats self-stitch: with the claim loss, at every depth and for each target
  model, the cross stitch into it against the model stitched to itself at the same point; reproduced
  when the mean difference is positive (Mai et al.: +2.3 to +2.6 points).
"""
from __future__ import annotations

import numpy as np

from klas.heterogeneous.config import HeteroConfig

REPRODUCED, NOT_REPRODUCED, NOT_TESTED = "reproduced", "not reproduced", "not tested"


def curves(rows: list[dict], cfg: HeteroConfig) -> dict:
    """``{loss: {length: {"score", "eval", "by_depth": {depth: {"score", "eval"}}}}}`` over cross stitches."""
    out: dict = {}
    for loss in cfg.losses:
        for n in cfg.lengths:
            cross = [r for r in rows if r["kind"] == "cross" and r["loss"] == loss and r["steps"] == n]
            out.setdefault(loss, {})[str(n)] = {
                "score": float(np.mean([r["acc_score"] for r in cross])), "eval": float(np.mean([r["acc"] for r in cross])),
                "by_depth": {d: {k: float(np.mean([r[src] for r in cross if r["depth"] == d]))
                                 for k, src in (("score", "acc_score"), ("eval", "acc"))} for d in cfg.depths},
            }
    return out


def choose_length(curve: dict, cfg: HeteroConfig) -> dict:
    """Where the curves flatten (module docstring): per loss, the shortest length within ``flat_tol`` of that
    loss's best length on the score split; the chosen length is the longest of these, so every loss has
    reached its plateau there."""
    best = {loss: max(c[str(n)]["score"] for n in cfg.lengths) for loss, c in curve.items()}
    per_loss = {loss: next(n for n in cfg.lengths if c[str(n)]["score"] >= best[loss] - cfg.flat_tol)
                for loss, c in curve.items()}
    return {"chosen": max(per_loss.values()), "per_loss": per_loss, "best_score": best,
            "rule": f"per loss the shortest length within {100 * cfg.flat_tol:g} points of its best (score split); "
                    f"the longest of these"}


def _at(rows: list[dict], n: int, **match) -> list[dict]:
    return [r for r in rows if r["steps"] == n and all(r[k] == v for k, v in match.items())]


def claim_ffm_first(rows: list[dict], cfg: HeteroConfig, n: int) -> dict:
    first = next((x for x in ("ffm->ce", "ffm") if x in cfg.losses), None)
    out = {"claim": "FFM first beats the task loss at shallow stitch points", "paper": "layer 2, fMoW: 51.7 % vs 25.1 %"}
    if first is None or "ce" not in cfg.losses or "shallow" not in cfg.depths:
        return {**out, "status": NOT_TESTED, "detail": "needs the losses ce and ffm->ce (or ffm) and the shallow depth"}
    per = {}
    for r in _at(rows, n, depth="shallow", kind="cross", loss="ce"):
        other = _at(rows, n, id=r["id"], loss=first)[0]
        per[r["id"]] = {"ce": r["acc"], first: other["acc"]}
    wins = sum(v[first] > v["ce"] for v in per.values())
    diff = float(np.mean([v[first] - v["ce"] for v in per.values()]))
    ok = wins == len(per)
    return {**out, "status": REPRODUCED if ok else NOT_REPRODUCED, "numbers": per, "mean_difference": diff,
            "detail": f"{first} beats ce on {wins} of {len(per)} shallow cross stitches, by {100 * diff:+.1f} points "
                      f"on average (eval)"}


def claim_beats_both(rows: list[dict], anchors: dict, n: int) -> dict:
    out = {"claim": "a cross-model stitch beats both models", "paper": "deep cross-model stitches can beat both"}
    cross = _at(rows, n, kind="cross")
    top = max(anchors[m]["eval"] for m in anchors)
    pick = max(cross, key=lambda r: (r["acc_score"], -cross.index(r)))
    count = sum(r["acc"] > top for r in cross)
    ok = pick["acc"] > top
    return {**out, "status": REPRODUCED if ok else NOT_REPRODUCED,
            "numbers": {"stitch": pick["id"], "loss": pick["loss"], "acc": pick["acc"], "acc_score": pick["acc_score"],
                        "models": {m: anchors[m]["eval"] for m in anchors}, "cross_rows_beating_both": count,
                        "cross_rows": len(cross)},
            "detail": f"best cross stitch on score: {pick['id']} ({pick['loss']}) {100 * pick['acc']:.2f} % vs the better "
                      f"model {100 * top:.2f} % (eval); {count} of {len(cross)} cross (stitch, loss) rows beat both on eval"}


def claim_cross_beats_self(rows: list[dict], cfg: HeteroConfig, loss: str, n: int) -> dict:
    out = {"claim": "cross-model stitches beat self-stitch controls", "paper": "+2.3 to +2.6 points"}
    if not cfg.self_controls:
        return {**out, "status": NOT_TESTED, "detail": "needs the self-stitch controls"}
    per = {}
    for r in _at(rows, n, kind="cross", loss=loss):
        self_row = _at(rows, n, kind="self", loss=loss, depth=r["depth"], dst=r["dst"])[0]
        per[r["id"]] = {"cross": r["acc"], "self": self_row["acc"], "self_id": self_row["id"]}
    diffs = [v["cross"] - v["self"] for v in per.values()]
    mean = float(np.mean(diffs))
    return {**out, "status": REPRODUCED if mean > 0 else NOT_REPRODUCED, "loss": loss, "numbers": per,
            "mean_difference": mean,
            "detail": f"with {loss}: cross minus self {100 * mean:+.2f} points on average (eval); cross ahead in "
                      f"{sum(d > 0 for d in diffs)} of {len(diffs)} (depth, target) pairs"}


def assess(rep: dict, cfg: HeteroConfig) -> dict:
    """``curves``, ``length`` (the chosen length), ``claim_loss`` and ``claims`` of a report (module docstring)."""
    rows = rep["rows"]
    curve = curves(rows, cfg)
    length = choose_length(curve, cfg)
    n = length["chosen"]
    loss = max(cfg.losses, key=lambda x: (curve[x][str(n)]["score"], -cfg.losses.index(x)))
    claims = [claim_ffm_first(rows, cfg, n), claim_beats_both(rows, rep["anchors"], n),
              claim_cross_beats_self(rows, cfg, loss, n)]
    return {"curves": curve, "length": length, "claim_loss": loss, "claims": claims}


__all__ = ["NOT_REPRODUCED", "NOT_TESTED", "REPRODUCED", "assess", "choose_length", "claim_beats_both",
           "claim_cross_beats_self", "claim_ffm_first", "curves"]
