"""Does a selection strategy find good stitches? Ground truth over every candidate of a model family
against the selections of klas's scores (Γ, Θ alone, the least-squares residual), CKA, SN-Net and
random, at equal count K, all trained with ``klas train``'s default recipe and length.

:func:`run_family` does it for one family; ``benchmarks/bench_quality.py`` runs it for the benchmark
families (:data:`QUALITY_FAMILIES`: the ViT trio of equal depths, the ViT family of unequal depths and
widths, the ResNet pair, and a ViT with a ResNet stitched both ways through bridges), one after
another, and prints and plots the report.

For each family (trained on the built-in ``digits`` set) separately, each phase timed (:class:`Clock`):

1. **Cache.** ``klas.cache.build_cache`` on digits (the zoo's split, so eval images were never trained on).
2. **Search and signals.** ``klas.search.search`` with its default score writes a real run directory
   and selects K stitches; Γ and Θ of every candidate come from it, ``1 - CKA`` from
   ``klas.search.cka_distance`` and the least-squares residual ``1 - R²`` from
   ``klas.score.ls_residual`` (each stitch's own least-squares fit, R² on the score split).
3. **Equal counts.** Every strategy is brought to K (``klas.select.select(..., count=K)``): klas's bucket
   rule on each signal (τ moved), SN-Net's fixed configuration (widened or thinned evenly over
   FLOPs; none on bridged pairs) and random (``random_seeds``, three by default).
4. **One recipe and length for everything** (:func:`klas.quality.train.train_routes`): ``klas train``'s
   default, step for step (batch 64, AdamW lr 3e-3 on the stitch layers, the anchors fine-tuned at
   0.1x and sampled as routes, weight decay 0.05 on matrices, 10 % warm-up then cosine, CE,
   least-squares init on 100 images). Every network gets the steps ``klas train``'s 5 epochs give a
   selection of K stitches plus the A anchors, on average (``route_steps``; the demo's 22 + 3: 27), so
   a run over R routes takes R x route_steps steps.
5. **Ground truth, twice.** Training each of the ~100 candidates with its own fine-tuned anchors is ~100
   runs of the recipe, which 2 CPU cores cannot afford. The ground truth is **one joint run over every
   candidate plus the anchors**, (N + A) x route_steps steps: each candidate gets the same budget as in
   a selection's run and is trained the same way beside fine-tuned anchors (which see N stitches'
   gradients instead of K's). It runs once per ``gt_seeds`` (data order and least-squares images);
   the first is the reference every strategy is measured against, the second the **ceiling**
   (:func:`klas.quality.signals.ceiling`): how well the ground truth predicts itself.
6. **Selections.** Γ, Θ, CKA, SN-Net and random are always trained; another signal (the least-squares
   residual) only when its score-split in-range ρ is within ``train_margin`` of the best signal's.
   Each starts from the reference ground truth's least-squares init over fresh copies of the original
   anchors: (K + A) x route_steps steps.
7. **Evaluation** with the grouped evaluator (each anchor prefix once per batch, stitches resuming the
   same target block in one call): the original anchors and the reference ground truth on the score
   and eval splits, the other ground truth on eval, every selection on eval (klas's scores also on
   score, where the default is chosen).
8. **Γ variants** (:mod:`klas.quality.variants`), re-scored against the stored ground truth.

Metrics (accuracies are fractions on disk, percent on screen; costs in GFLOPs, fvcore convention:
one multiply-add = one FLOP; all from :mod:`klas.metrics`):

* **Front** of a strategy: ``klas.metrics.pareto_front`` over its K stitches plus its own jointly trained
  anchors (what ``klas export pareto`` of that run holds). *Stitches on front*: how many of its K.
* **Hypervolume** (normalised): with the front's step function f(x) = max accuracy of a network of
  cost <= x, ``HV = ∫_{x_lo}^{x_hi} max(0, f(x) - y_ref) dx / ((x_hi - x_lo) · (1 - y_ref))`` over the
  anchors' cost range, ``y_ref`` = the cheapest *original* anchor's accuracy (common to all
  strategies); "anchors only" = the original anchors. 95 % intervals: percentile bootstrap over eval
  images (the same resamples for all networks), also of each of klas's scores minus each baseline.
* **Best accuracy at budgets** ``x_lo + q (x_hi - x_lo)``, q = 0.25, 0.5, 0.75.
* **HV stitches**: the same integral for the K stitches alone, y_ref = 0.
* **Spearman** ρ of each signal against the ground truth, over all candidates and in the search's range.
* **Recovery**: share of klas's non-empty FLOPs buckets whose ground-truth best stitch a selection holds.
  The KLAS paper's numbers (Swin-Ti/B) are printed beside.

:func:`choose_default_score` picks ``klas search``'s default from the score split only. Seeded and
deterministic for a fixed thread count.
"""
from klas.quality.choose import RHO_MARGIN, choose_default_score
from klas.quality.config import QUALITY_FAMILIES, QualityConfig, QualityFamily
from klas.quality.family import ALWAYS_TRAINED, Clock, build_family_cache, run_family
from klas.quality.signals import bucket_winners, ceiling, competitive, rate, rate_signals
from klas.quality.summary import BUDGET_QUANTILES, KLAS_SCORES, PAPER_RECOVERY, FamilyData, gt_tag, summarise
from klas.quality.train import SCORE_STRATEGIES, SCORE_WORDS, ls_init_all, make_selections, train_routes
from klas.quality.variants import gamma_variants, rate_variants

__all__ = [
    "ALWAYS_TRAINED", "BUDGET_QUANTILES", "Clock", "FamilyData", "KLAS_SCORES", "PAPER_RECOVERY", "QUALITY_FAMILIES",
    "QualityConfig", "QualityFamily", "RHO_MARGIN", "SCORE_STRATEGIES", "SCORE_WORDS", "bucket_winners",
    "build_family_cache", "ceiling", "choose_default_score", "competitive", "gamma_variants", "gt_tag",
    "ls_init_all", "make_selections", "rate", "rate_signals", "rate_variants", "run_family", "summarise",
    "train_routes",
]
