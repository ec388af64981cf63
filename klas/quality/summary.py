"""One family's report from its per-image correctness bits: fronts, HV, recovery, ρ, the ceiling, bootstrap CIs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from klas.metrics import front_summary, percentile_ci, recovery
from klas.quality.config import QualityConfig
from klas.quality.signals import ceiling, mean_range

#: KLAS (ICLR 2026): share of FLOPs buckets whose best stitch each method selects, Swin-Ti/B.
PAPER_RECOVERY = {"gamma": 0.889, "snnet": 0.611, "cka": 0.055}
#: Budgets at which the best accuracy is reported: x_lo + q (x_hi - x_lo).
BUDGET_QUANTILES = (0.25, 0.5, 0.75)
#: klas's candidate default scores (a trained selection each); the other strategies are baselines.
KLAS_SCORES = ("gamma", "theta", "ls")


def gt_tag(seed: int) -> str:
    """The bits tag of the ground truth trained with ``seed``."""
    return f"gt:{seed}"


@dataclass(frozen=True)
class FamilyData:
    """What a family's report is computed from: candidates, signals, selections and per-image bits.

    ``bits[split][tag][id]``: per image of ``split`` ("eval", "score"), whether network ``id`` of
    ``tag`` was right; tags: ``original`` (the anchors before any training), ``gt:<seed>`` (every
    candidate and its anchors after the ground truth's joint run with that seed; on the score split
    only the first seed's) and one per trained strategy (its stitches and its own jointly trained
    anchors; on the score split only klas's scores, :data:`KLAS_SCORES`)."""

    family: str
    models: Sequence[str]
    direction: str
    stitches: Sequence
    anchor_list: Sequence
    scores: Mapping[str, np.ndarray]
    bucket: np.ndarray
    k: int
    masks: Mapping[str, np.ndarray]
    notes: Mapping[str, dict]
    bits: Mapping[str, Mapping[str, Mapping[str, np.ndarray]]]
    gt_seeds: Sequence[int]

    @property
    def anchor_ids(self) -> list[str]:
        return [a.src for a in self.anchor_list]

    @property
    def gflops(self) -> dict[str, float]:
        return {c.id: c.macs / 1e9 for c in list(self.stitches) + list(self.anchor_list)}

    @property
    def reference(self) -> str:
        """The tag of the reference ground truth (the first seed's)."""
        return gt_tag(self.gt_seeds[0])

    def span(self) -> tuple[float, float, list[float], str]:
        """(x_lo, x_hi, budgets, cheapest anchor): the HV range is the anchors' cost range."""
        g, ids = self.gflops, self.anchor_ids
        x_lo, x_hi = min(g[a] for a in ids), max(g[a] for a in ids)
        return x_lo, x_hi, [x_lo + q * (x_hi - x_lo) for q in BUDGET_QUANTILES], min(ids, key=lambda a: g[a])


class _Bits:
    """One split's bits as a matrix (one row per (tag, id)), so any resample's accuracies are one product."""

    def __init__(self, bits: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        self.rows = [(tag, i) for tag, d in bits.items() for i in d]
        self.matrix = np.stack([bits[t][i] for t, i in self.rows]).astype(np.float32)
        self.n = self.matrix.shape[1]

    def acc(self, weights: np.ndarray | None = None) -> dict[str, dict[str, float]]:
        """``{tag: {id: accuracy}}``, on every image once, or weighted by ``weights`` (counts summing to n)."""
        vals = self.matrix.mean(1) if weights is None else self.matrix @ weights / self.n
        out: dict[str, dict[str, float]] = {}
        for (tag, i), v in zip(self.rows, vals):
            out.setdefault(tag, {})[i] = float(v)
        return out


def _points(ids: Sequence[str], acc: Mapping[str, float], gflops: Mapping[str, float]) -> list[dict]:
    return [{"id": i, "gflops": gflops[i], "acc": acc[i]} for i in ids]


def _metrics(d: FamilyData, acc: Mapping[str, Mapping[str, float]]) -> dict:
    """Fronts, HV, best at budgets, stitches on front and recovery of the original anchors, the reference
    ground truth and every strategy in ``acc`` (one split's accuracies). A strategy's front holds its
    own anchors; HV is above the cheapest original anchor's accuracy on the same images."""
    x_lo, x_hi, budgets, cheapest = d.span()
    gflops, ids, ref = d.gflops, d.anchor_ids, d.reference
    original = _points(ids, acc["original"], gflops)
    y_ref = acc["original"][cheapest]
    gt_pts = _points([c.id for c in d.stitches], acc[ref], gflops)
    gt_acc = np.array([p["acc"] for p in gt_pts])
    res = {"y_ref": y_ref, "original": original, "gt_acc": gt_acc, "strategies": {},
           "anchors_only": front_summary(original, x_lo, x_hi, y_ref, budgets),
           "ground_truth": front_summary(gt_pts + _points(ids, acc[ref], gflops), x_lo, x_hi, y_ref, budgets, gt_pts)}
    for name, mask in d.masks.items():
        if name not in acc:
            continue
        pts = _points([d.stitches[j].id for j in np.flatnonzero(mask)], acc[name], gflops)
        own = _points(ids, acc[name], gflops)
        m = front_summary(pts + own, x_lo, x_hi, y_ref, budgets, pts)
        on_front = {p["id"] for p in m["front"]}
        m["stitches"], m["anchors"] = pts, own
        m["stitches_on_front"] = sum(p["id"] in on_front for p in pts)
        m["recovery"] = recovery(gt_acc, d.bucket, mask)
        res["strategies"][name] = m
    return res


def _baselines(d: FamilyData) -> list[str]:
    """What klas's scores are compared with: every other trained strategy, and ``random`` (the seeds' mean)."""
    others = [n for n in d.masks if n not in KLAS_SCORES]
    return others + (["random"] if any(n.startswith("random-") for n in others) else [])


def _hv_of(r: dict, name: str, key: str) -> float:
    if name == "random":
        return float(np.mean([m[key] for n, m in r["strategies"].items() if n.startswith("random-")]))
    return r["strategies"][name][key]


def _bootstrap(d: FamilyData, bits: _Bits, rounds: int, seed: int) -> dict[str, list[float]]:
    """``{what: values}`` over ``rounds`` resamples of the eval images (the same for every network):
    HV (``hv:S``), HV of the stitches (``hvs:S``), recovery (``rec:S``) and each of klas's scores minus
    each baseline (``hv:S-B``, ``hvs:S-B``)."""
    rng = np.random.default_rng(seed)
    boot: dict[str, list[float]] = {}

    def add(key: str, v: float) -> None:
        boot.setdefault(key, []).append(v)

    pairs = [(s, b) for s in KLAS_SCORES if s in d.masks for b in _baselines(d)]
    for _ in range(rounds):
        r = _metrics(d, bits.acc(np.bincount(rng.integers(0, bits.n, bits.n), minlength=bits.n).astype(np.float32)))
        for name, m in r["strategies"].items():
            add(f"hv:{name}", m["hypervolume"])
            add(f"hvs:{name}", m["hypervolume_stitches"])
            add(f"rec:{name}", m["recovery"]["rate"])
        for name in ("anchors_only", "ground_truth"):
            add(f"hv:{name}", r[name]["hypervolume"])
        add("hvs:ground_truth", r["ground_truth"]["hypervolume_stitches"])
        for s, b in pairs:
            for key, what in (("hv", "hypervolume"), ("hvs", "hypervolume_stitches")):
                add(f"{key}:{s}-{b}", _hv_of(r, s, what) - _hv_of(r, b, what))
    return boot


def _strategy(name: str, m: dict, note: dict, boot: dict, run: dict, ratings: Mapping[str, dict] | None,
              score_split: dict | None) -> dict:
    ci = lambda key: percentile_ci(boot.get(key, []))  # noqa: E731
    out = {
        **note,
        "selected": [p["id"] for p in m["stitches"]],
        "accuracy": {p["id"]: p["acc"] for p in m["stitches"]},
        "anchor_accuracy": {p["id"]: p["acc"] for p in m["anchors"]},
        "front": m["front"], "stitches_on_front": m["stitches_on_front"],
        "hypervolume": m["hypervolume"], "hypervolume_ci95": ci(f"hv:{name}"),
        "best_at_budget": m["best_at_budget"],
        "hypervolume_stitches": m["hypervolume_stitches"], "hypervolume_stitches_ci95": ci(f"hvs:{name}"),
        "best_stitch_at_budget": m["best_stitch_at_budget"],
        "recovery": {k: v for k, v in m["recovery"].items() if k != "per_bucket"}, "recovery_ci95": ci(f"rec:{name}"),
        "run": run,
        "paper_recovery": PAPER_RECOVERY.get(name),
    }
    if ratings is not None:  # a signal's own ranking quality (eval split)
        out["rho"], out["rho_in_range"] = ratings["eval"]["rho"], ratings["eval"]["rho_in_range"]
    if score_split is not None:
        out["score_split"] = score_split
    return out


def _random_mean(strategies: dict, budgets: int) -> dict | None:
    rand = [n for n in strategies if n.startswith("random-")]
    if not rand:
        return None

    def stat(key, q=None):
        return mean_range([strategies[n][key] if q is None else strategies[n][key][q] for n in rand])

    rec = mean_range([strategies[n]["recovery"]["rate"] for n in rand])
    out = {"count": strategies[rand[0]]["count"], "of": rand, "recovery": {"rate": rec["mean"]},
           "recovery_range": [rec["min"], rec["max"]]}
    for key in ("hypervolume", "hypervolume_stitches", "stitches_on_front"):
        s = stat(key)
        out[key], out[f"{key}_range"] = s["mean"], [s["min"], s["max"]]
    for key in ("best_at_budget", "best_stitch_at_budget"):
        out[key] = [stat(key, q)["mean"] for q in range(budgets)]
    return out


def _differences(d: FamilyData, full: dict, boot: dict) -> dict:
    """Each of klas's scores minus each baseline: HV and HV stitches, with 95 % bootstrap intervals."""
    out: dict[str, dict] = {}
    for s in KLAS_SCORES:
        if s not in d.masks:
            continue
        for b in _baselines(d):
            out.setdefault(s, {})[b] = {
                "hypervolume": _hv_of(full, s, "hypervolume") - _hv_of(full, b, "hypervolume"),
                "hypervolume_ci95": percentile_ci(boot.get(f"hv:{s}-{b}", [])),
                "hypervolume_stitches": (_hv_of(full, s, "hypervolume_stitches")
                                         - _hv_of(full, b, "hypervolume_stitches")),
                "hypervolume_stitches_ci95": percentile_ci(boot.get(f"hvs:{s}-{b}", [])),
            }
    return out


def _score_split(d: FamilyData) -> dict:
    """HV on the score split (no intervals) of the original anchors, the reference ground truth and each
    strategy evaluated there: what the default score is chosen on."""
    if "score" not in d.bits or d.reference not in d.bits["score"]:
        return {}
    full = _metrics(d, _Bits(d.bits["score"]).acc())
    out = {"anchors_only_hypervolume": full["anchors_only"]["hypervolume"],
           "ground_truth_hypervolume": full["ground_truth"]["hypervolume"], "strategies": {}}
    for name, m in full["strategies"].items():
        out["strategies"][name] = {"hypervolume": m["hypervolume"], "hypervolume_stitches": m["hypervolume_stitches"]}
    return out


def summarise(d: FamilyData, cfg: QualityConfig, runs: Mapping[str, dict], ratings: Mapping[str, dict],
              gt_score_acc: np.ndarray) -> dict:
    """One family's JSON-ready report (eval split unless said otherwise). ``runs[tag]``: each training
    run's steps and loss; ``ratings``: every signal against the reference ground truth on both splits
    (:func:`klas.quality.signals.rate_signals`); ``gt_score_acc``: the reference ground truth's score-split
    accuracy per candidate."""
    x_lo, x_hi, budgets, cheapest = d.span()
    bits = _Bits(d.bits["eval"])
    acc = bits.acc()
    full = _metrics(d, acc)
    boot = _bootstrap(d, bits, cfg.bootstrap, cfg.seed)
    score_split = _score_split(d)
    strategies = {n: _strategy(n, m, d.notes[n], boot, runs[n], ratings.get(n),
                               score_split.get("strategies", {}).get(n))
                  for n, m in full["strategies"].items()}
    rand = _random_mean(strategies, len(budgets))
    if rand:
        strategies["random (mean)"] = rand
    gt, gt_acc = full["ground_truth"], full["gt_acc"]
    ci = lambda key: percentile_ci(boot[key])  # noqa: E731
    seeds_acc = {s: np.array([acc[gt_tag(s)][c.id] for c in d.stitches]) for s in d.gt_seeds}
    gt_hv, anchors_hv = gt["hypervolume"], full["anchors_only"]["hypervolume"]
    warnings = [] if gt_hv > anchors_hv else [
        f"{d.family}: the ground truth's front (HV {gt_hv:.3f}) does not beat the original anchors' (HV "
        f"{anchors_hv:.3f}): the stitches are not trained to a useful length; lengthen the runs (--route-steps)"]
    return {
        "family": d.family, "models": list(d.models), "direction": d.direction,
        "anchors": full["original"],
        "ground_truth_anchors": _points(d.anchor_ids, acc[d.reference], d.gflops),
        "range_gflops": [x_lo, x_hi], "y_ref": full["y_ref"], "y_ref_from": cheapest, "budgets_gflops": budgets,
        "num_candidates": len(d.stitches), "num_in_range": int((d.bucket >= 0).sum()),
        "buckets": cfg.buckets, "nonempty_buckets": int(len(np.unique(d.bucket[d.bucket >= 0]))),
        "K": d.k, "eval_images": bits.n, "gt_seeds": list(d.gt_seeds),
        "ground_truth": [
            {"id": c.id, "route": c.route, "gflops": c.macs / 1e9, "bucket": int(b), "acc": float(a),
             "acc_score": float(sc), "acc_by_seed": {str(s): float(seeds_acc[s][j]) for s in d.gt_seeds},
             **{name: float(v[j]) for name, v in d.scores.items()}}
            for j, (c, a, sc, b) in enumerate(zip(d.stitches, gt_acc, gt_score_acc, d.bucket))
        ],
        "ground_truth_runs": {str(s): runs[gt_tag(s)] for s in d.gt_seeds},
        "ground_truth_front": gt["front"],
        "ground_truth_hypervolume": gt_hv, "ground_truth_hypervolume_ci95": ci("hv:ground_truth"),
        "ground_truth_hypervolume_by_seed": {str(s): _metrics(d, {**acc, d.reference: acc[gt_tag(s)]})[
            "ground_truth"]["hypervolume"] for s in d.gt_seeds},
        "ground_truth_best_at_budget": gt["best_at_budget"],
        "ground_truth_hypervolume_stitches": gt["hypervolume_stitches"],
        "ground_truth_hypervolume_stitches_ci95": ci("hvs:ground_truth"),
        "ground_truth_best_stitch_at_budget": gt["best_stitch_at_budget"],
        "ground_truth_stitches_on_front": sum(p["id"] not in d.anchor_ids for p in gt["front"]),
        "anchors_only_hypervolume": anchors_hv, "anchors_only_hypervolume_ci95": ci("hv:anchors_only"),
        "anchors_only_best_at_budget": full["anchors_only"]["best_at_budget"],
        "ground_truth_beats_anchors": bool(gt_hv > anchors_hv), "warnings": warnings,
        "ceiling": {str(s): ceiling(gt_acc, seeds_acc[s], d.bucket, d.k) for s in d.gt_seeds[1:]},
        "signals": {n: dict(r) for n, r in ratings.items()},
        "strategies": strategies,
        "differences": _differences(d, full, boot),
        "score_split": score_split,
    }


__all__ = ["BUDGET_QUANTILES", "FamilyData", "KLAS_SCORES", "PAPER_RECOVERY", "gt_tag", "summarise"]
