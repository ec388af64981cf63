"""Does a selection strategy find good stitches? Ground truth over every candidate of a model family
against the selections of ``klas``, ``snnet``, ``cka`` and ``random``, at equal count, all trained with
``klas train``'s default recipe (anchors fine-tuned and sampled as routes).

:func:`run_family` does it for one family; ``benchmarks/bench_quality.py`` runs it for the benchmark
families (``klas.zoo.FAMILIES`` and ``klas.zoo.BENCH_FAMILIES``: the ViT trio of equal depths, the ViT
family of unequal depths and widths, the ResNet pair) and prints and plots the report.

For each family (trained on the built-in ``digits`` set) separately:

1. **Cache.** ``klas.cache.build_cache`` on digits (the zoo's split, so eval images were never trained on).
2. **Search.** ``klas.search.search(strategy="klas")`` writes a real run directory; Γ of every
   candidate comes from it, ``1 - CKA`` from ``klas.search.cka_distance``. Every strategy's selection
   is made by ``klas.select.select`` on the same candidates, buckets and scores, i.e. what ``klas search
   --strategy S`` writes (``tests/test_bench_quality.py`` checks). Only probe-train and score are read.
3. **Equal counts.** K = the number ``klas`` selects with its bucket rule (B buckets, τ); ``cka`` (the
   same rule with τ moved), ``snnet`` (its fixed configuration, widened or thinned evenly over FLOPs)
   and ``random`` (seeds 0, 1, 2) are brought to exactly K (``klas.select.select(..., count=K)``).
4. **One recipe for everything** (:func:`klas.quality.train.train_routes`): ``klas train``'s default,
   step for step (TrainConfig defaults: batch 64, AdamW lr 3e-3 on the stitch layers, the anchors
   fine-tuned at 0.1x, weight decay 0.05 on matrices, 10 % warm-up then cosine, CE, least-squares
   init on the same 100 images), where each step trains one network drawn uniformly from the run's
   stitches *and* its anchors (SN-Net). Scaled down is only the length: a run over R routes takes
   ``R * route_steps`` steps (default 24 per route; ``klas train``'s 5 epochs of digits give a 22-stitch
   selection plus 3 anchors 27 per route), so every stitch of every run gets the same budget on average.
5. **Ground truth.** Training each of the ~100 candidates with its own fine-tuned anchors (what
   ``klas train`` would do for a selection of one) is ~100 runs of the recipe, which 2 CPU cores cannot
   afford. The ground truth is instead **one joint run over every candidate plus the anchors**, the
   recipe above with (N + A) * route_steps steps: each candidate gets the same per-stitch budget as in
   the selections' runs and is trained in the same way, beside fine-tuned anchors. What differs: the
   shared anchors see N stitches' gradients instead of K's. Every candidate is evaluated on the score
   split (to choose Γ variants on) and the eval split (to report), and both are stored per candidate.
6. **Selections.** Each strategy's K stitches start from the ground truth's least-squares init, over
   fresh copies of the original anchors, and are trained by the same recipe: (K + A) * route_steps steps.
7. **Evaluation** on the eval split (the first ``eval_limit`` images when set): every candidate (ground
   truth), the original anchors, and every strategy's stitches with its own jointly trained anchors.
8. **Γ variants** (:mod:`klas.quality.variants`): probe pooling, temperature, probe length, Θ's direction,
   Σ: each re-scored against the stored ground truth (ρ, recovery), on score and on eval.

Metrics (accuracies are fractions on disk, percent on screen; costs in GFLOPs, fvcore convention:
one multiply-add = one FLOP; all from :mod:`klas.metrics`):

* **Front** of a strategy: ``klas.metrics.pareto_front`` over its K stitches plus its own jointly trained
  anchors (what ``klas export pareto`` of that run holds).
* **Hypervolume** (normalised): with the front's step function f(x) = max accuracy of a network of
  cost <= x, ``HV = ∫_{x_lo}^{x_hi} max(0, f(x) - y_ref) dx / ((x_hi - x_lo) · (1 - y_ref))`` over the
  anchors' cost range, ``y_ref`` = the cheapest *original* anchor's accuracy (common to all
  strategies); "anchors only" = the original anchors. 95 % intervals: percentile bootstrap over eval
  images (the same resamples for all networks).
* **Best accuracy at budgets** ``x_lo + q (x_hi - x_lo)``, q = 0.25, 0.5, 0.75.
* **HV stitches**: the same integral for the K stitches alone, y_ref = 0.
* **Spearman** ρ over all candidates (and those in the search's range) between ground-truth accuracy
  and ``-Γ`` resp. CKA similarity.
* **Recovery**: share of klas's non-empty FLOPs buckets whose ground-truth best stitch the strategy
  selected. The KLAS paper's numbers (Swin-Ti/B) are printed beside.

Nothing is chosen on the eval split. Seeded and deterministic for a fixed thread count.
"""
from klas.quality.config import QualityConfig
from klas.quality.family import build_family_cache, run_family
from klas.quality.summary import BUDGET_QUANTILES, PAPER_RECOVERY, FamilyData, summarise
from klas.quality.train import ls_init_all, make_selections, route_steps_of, train_routes
from klas.quality.variants import gamma_variants, rate_variants

__all__ = [
    "BUDGET_QUANTILES", "PAPER_RECOVERY", "FamilyData", "QualityConfig", "build_family_cache", "gamma_variants",
    "ls_init_all", "make_selections", "rate_variants", "route_steps_of", "run_family", "summarise", "train_routes",
]
