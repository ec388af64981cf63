"""One family's report from its per-image correctness bits: fronts, HV, recovery, Spearman, bootstrap CIs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from klas.metrics import front_summary, percentile_ci, recovery, spearman
from klas.quality.config import QualityConfig

#: KLAS (ICLR 2026): share of FLOPs buckets whose best stitch each method selects, Swin-Ti/B.
PAPER_RECOVERY = {"klas": 0.889, "snnet": 0.611, "cka": 0.055}
#: Budgets at which the best accuracy is reported: x_lo + q (x_hi - x_lo).
BUDGET_QUANTILES = (0.25, 0.5, 0.75)


@dataclass(frozen=True)
class FamilyData:
    """What a family's report is computed from: candidates, scores, selections and eval bits.

    ``bits[tag][id]``: per eval image, whether network ``id`` of ``tag`` was right; tags: ``original``
    (the anchors before any training), ``gt`` (every candidate and its anchors after the ground truth's
    joint run) and one per strategy (its stitches and its own jointly trained anchors)."""

    family: str
    models: Sequence[str]
    stitches: Sequence
    anchor_list: Sequence
    gamma: np.ndarray
    cka_dist: np.ndarray
    bucket: np.ndarray
    masks: Mapping[str, np.ndarray]
    notes: Mapping[str, dict]
    bits: Mapping[str, Mapping[str, np.ndarray]]

    @property
    def anchor_ids(self) -> list[str]:
        return [a.src for a in self.anchor_list]

    @property
    def gflops(self) -> dict[str, float]:
        return {c.id: c.macs / 1e9 for c in list(self.stitches) + list(self.anchor_list)}

    def span(self) -> tuple[float, float, list[float], str]:
        """(x_lo, x_hi, budgets, cheapest anchor): the HV range is the anchors' cost range."""
        g, ids = self.gflops, self.anchor_ids
        x_lo, x_hi = min(g[a] for a in ids), max(g[a] for a in ids)
        return x_lo, x_hi, [x_lo + q * (x_hi - x_lo) for q in BUDGET_QUANTILES], min(ids, key=lambda a: g[a])


def _points(ids: Sequence[str], bits: Mapping[str, np.ndarray], gflops: Mapping[str, float], idx=None) -> list[dict]:
    return [{"id": i, "gflops": gflops[i], "acc": float(bits[i].mean() if idx is None else bits[i][idx].mean())}
            for i in ids]


def _metrics(d: FamilyData, idx=None) -> dict:
    """Fronts, HV, best at budgets and recovery of the original anchors, the ground truth and every
    selection on the eval images ``idx`` (all when None). A strategy's front holds its own anchors."""
    x_lo, x_hi, budgets, cheapest = d.span()
    gflops, ids = d.gflops, d.anchor_ids
    original = _points(ids, d.bits["original"], gflops, idx)
    y_ref = next(p["acc"] for p in original if p["id"] == cheapest)
    gt_pts = _points([c.id for c in d.stitches], d.bits["gt"], gflops, idx)
    gt_acc = np.array([p["acc"] for p in gt_pts])
    res = {"y_ref": y_ref, "original": original, "gt_acc": gt_acc, "strategies": {}}
    res["anchors_only"] = front_summary(original, x_lo, x_hi, y_ref, budgets)
    res["ground_truth"] = front_summary(gt_pts + _points(ids, d.bits["gt"], gflops, idx), x_lo, x_hi, y_ref, budgets,
                                        gt_pts)
    for name, mask in d.masks.items():
        pts = _points([d.stitches[j].id for j in np.flatnonzero(mask)], d.bits[name], gflops, idx)
        own = _points(ids, d.bits[name], gflops, idx)
        m = front_summary(pts + own, x_lo, x_hi, y_ref, budgets, pts)
        m["stitches"], m["anchors"] = pts, own
        m["recovery"] = recovery(gt_acc, d.bucket, mask)
        res["strategies"][name] = m
    return res


def _bootstrap(d: FamilyData, rounds: int, seed: int) -> dict[str, list[float]]:
    """``{what: values}`` over ``rounds`` resamples of the eval images (the same for every network):
    HV (``hv:S``), HV of the stitches (``hvs:S``), recovery (``rec:S``) and klas minus each strategy."""
    rng = np.random.default_rng(seed)
    n_eval = len(next(iter(d.bits["original"].values())))
    boot: dict[str, list[float]] = {}

    def add(key: str, v: float) -> None:
        boot.setdefault(key, []).append(v)

    for _ in range(rounds):
        r = _metrics(d, rng.integers(0, n_eval, n_eval))
        for name, m in r["strategies"].items():
            add(f"hv:{name}", m["hypervolume"])
            add(f"hvs:{name}", m["hypervolume_stitches"])
            add(f"rec:{name}", m["recovery"]["rate"])
        for name in ("anchors_only", "ground_truth"):
            add(f"hv:{name}", r[name]["hypervolume"])
        add("hvs:ground_truth", r["ground_truth"]["hypervolume_stitches"])
        klas = r["strategies"]["klas"]
        for name in d.masks:
            if name != "klas":
                other = r["strategies"][name]
                add(f"hv:klas-minus-{name}", klas["hypervolume"] - other["hypervolume"])
                add(f"hvs:klas-minus-{name}", klas["hypervolume_stitches"] - other["hypervolume_stitches"])
    return boot


def _strategy(name: str, m: dict, note: dict, boot: dict, joint: dict) -> dict:
    ci = lambda key: percentile_ci(boot[key])  # noqa: E731
    out = {
        **note,
        "selected": [p["id"] for p in m["stitches"]],
        "accuracy": {p["id"]: p["acc"] for p in m["stitches"]},
        "anchor_accuracy": {p["id"]: p["acc"] for p in m["anchors"]},
        "front": m["front"],
        "hypervolume": m["hypervolume"], "hypervolume_ci95": ci(f"hv:{name}"),
        "best_at_budget": m["best_at_budget"],
        "hypervolume_stitches": m["hypervolume_stitches"], "hypervolume_stitches_ci95": ci(f"hvs:{name}"),
        "best_stitch_at_budget": m["best_stitch_at_budget"],
        "recovery": dict(m["recovery"]), "recovery_ci95": ci(f"rec:{name}"),
        **joint,
        "paper_recovery": PAPER_RECOVERY.get(name.split("-")[0]),
    }
    if name != "klas":
        out["klas_minus_this_hypervolume_ci95"] = ci(f"hv:klas-minus-{name}")
        out["klas_minus_this_hypervolume_stitches_ci95"] = ci(f"hvs:klas-minus-{name}")
    return out


def _random_mean(strategies: dict, budgets: int) -> dict | None:
    rand = [n for n in strategies if n.startswith("random-")]
    if not rand:
        return None

    def mean(key, q=None):
        return float(np.mean([strategies[n][key] if q is None else strategies[n][key][q] for n in rand]))

    return {"count": strategies[rand[0]]["count"], "hypervolume": mean("hypervolume"),
            "best_at_budget": [mean("best_at_budget", q) for q in range(budgets)],
            "hypervolume_stitches": mean("hypervolume_stitches"),
            "best_stitch_at_budget": [mean("best_stitch_at_budget", q) for q in range(budgets)],
            "recovery": {"rate": float(np.mean([strategies[n]["recovery"]["rate"] for n in rand]))}, "of": rand}


def _spearman(d: FamilyData, gt_acc: np.ndarray) -> dict:
    r = d.bucket >= 0
    return {"neg_gamma_vs_gt": spearman(-d.gamma, gt_acc), "cka_similarity_vs_gt": spearman(-d.cka_dist, gt_acc),
            "neg_gamma_vs_gt_in_range": spearman(-d.gamma[r], gt_acc[r]),
            "cka_similarity_vs_gt_in_range": spearman(-d.cka_dist[r], gt_acc[r])}


def summarise(d: FamilyData, cfg: QualityConfig, joint: Mapping[str, dict], gt_score_acc: np.ndarray) -> dict:
    """One family's JSON-ready report: per strategy its selection, front, HV, recovery (with bootstrap
    CIs); the ground truth per candidate on both splits. ``joint[name]``: each run's steps and loss."""
    x_lo, x_hi, budgets, cheapest = d.span()
    full = _metrics(d)
    boot = _bootstrap(d, cfg.bootstrap, cfg.seed)
    strategies = {n: _strategy(n, m, d.notes[n], boot, joint[n]) for n, m in full["strategies"].items()}
    rand = _random_mean(strategies, len(budgets))
    if rand:
        strategies["random (mean)"] = rand
    gt, in_range, gt_acc = full["ground_truth"], d.bucket >= 0, full["gt_acc"]
    ci = lambda key: percentile_ci(boot[key])  # noqa: E731
    return {
        "family": d.family, "models": list(d.models),
        "anchors": full["original"],
        "ground_truth_anchors": _points(d.anchor_ids, d.bits["gt"], d.gflops),
        "range_gflops": [x_lo, x_hi], "y_ref": full["y_ref"], "y_ref_from": cheapest, "budgets_gflops": budgets,
        "num_candidates": len(d.stitches), "num_in_range": int(in_range.sum()),
        "buckets": cfg.buckets, "nonempty_buckets": int(len(np.unique(d.bucket[in_range]))),
        "K": int(d.masks["klas"].sum()), "eval_images": len(next(iter(d.bits["original"].values()))),
        "ground_truth": [
            {"id": c.id, "route": c.route, "gflops": c.macs / 1e9, "acc": float(a), "acc_score": float(s),
             "gamma": float(g), "cka_distance": float(k), "bucket": int(b)}
            for c, a, s, g, k, b in zip(d.stitches, gt_acc, gt_score_acc, d.gamma, d.cka_dist, d.bucket)
        ],
        "ground_truth_run": joint["gt"],
        "ground_truth_front": gt["front"],
        "ground_truth_hypervolume": gt["hypervolume"], "ground_truth_hypervolume_ci95": ci("hv:ground_truth"),
        "ground_truth_best_at_budget": gt["best_at_budget"],
        "ground_truth_hypervolume_stitches": gt["hypervolume_stitches"],
        "ground_truth_hypervolume_stitches_ci95": ci("hvs:ground_truth"),
        "ground_truth_best_stitch_at_budget": gt["best_stitch_at_budget"],
        "anchors_only_hypervolume": full["anchors_only"]["hypervolume"],
        "anchors_only_hypervolume_ci95": ci("hv:anchors_only"),
        "anchors_only_best_at_budget": full["anchors_only"]["best_at_budget"],
        "spearman": _spearman(d, gt_acc),
        "spearman_score_split": _spearman(d, gt_score_acc),
        "strategies": strategies,
    }


__all__ = ["BUDGET_QUANTILES", "FamilyData", "PAPER_RECOVERY", "summarise"]
