"""Mai et al.'s stitching protocol as a benchmark: how should a stitch between two *different* models be
trained, for how long, and at which depth does it work? ``benchmarks/bench_heterogeneous.py`` runs it,
prints and plots.

For a pair of models A and B (by default the demo's ``klas_vit_s`` and ``klas_resnet_l``: a ViT and a
ResNet of similar cost; or two trainings of one architecture, named by aliases) and a cache of them
(:func:`klas.quality.build_family_cache`):

1. **Stitch points.** Each named depth ``f`` (``shallow`` 1/6, ``middle`` 1/2, ``deep`` 5/6 of the blocks;
   Mai et al. stitch ViT-L at layers 2 / 10-14 / 22 of 24) gives every model the cut
   ``round(f * n_blocks)`` (kept within ``1 .. n-1``): representation r leaves block r-1, and the stitch
   ``(src, r_src) -> (dst, r_dst)`` resumes dst at block r_dst (``docs/formats.md``). At every depth:
   the cross-model stitches A -> B and B -> A, and the **self-stitch controls** A -> A and B -> B (a
   model stitched to itself at the same point, through the same kind of stitch layer). With frozen
   anchors a second copy of the model (an alias) computes exactly what the anchor does, so the control
   uses the anchor itself.
2. **Same start.** Every stitch gets ``klas train``'s least-squares init on the same ``init_images``
   probe-train images, once; each loss trains a copy of that state (``acc_start``: its accuracy).
3. **Training as Mai et al.: anchors frozen, only the stitch layers train** (their stitch: a 2-layer
   MLP, ``layer="mlp"``). Each loss trains all stitches on the same batches in the same order (every
   step trains every stitch on one batch; Adam acts per parameter, so this equals training each
   stitch alone) with the training core (:func:`klas.train.core.fit`): ``lfm`` (match the target's
   representation at the stitch point), ``ce`` (the task loss, Mai et al.'s TLT), ``ffm`` (match the
   target's final pre-logits features) and ``ffm->ce`` (``ffm`` for the first ``first_fraction`` of the
   steps, then ``ce``).
4. **Lengths.** Every loss is measured after each of ``lengths`` AdamW steps (150, 1,500, 5,000). With
   the ``constant`` schedule (the default: linear warm-up over 10 % of the shortest length, then a
   constant lr) the first L steps of a run do not depend on how long it goes on, so one run per loss
   is read off at every length (and ``ffm->ce`` of length L continues the ``ffm`` run from step
   ``first_fraction * L``, optimiser state included); with ``cosine`` (warm-up, then cosine to 0 at the
   run's end) every length is a run of its own.
5. **Choosing on score, reporting on eval.** With several learning rates (``lrs``), each (loss, length)
   keeps the one with the best mean score-split accuracy over its stitches. The training length is
   where the score-split curves flatten, and Mai et al.'s three claims are tested at that length
   (:mod:`klas.heterogeneous.claims`); only eval numbers are reported as results. Accuracy is also
   reported **relative to the target alone** (stitch / target model, eval).

Accuracies are fractions; costs GFLOPs, fvcore convention (one multiply-add = one FLOP), from
:func:`klas.stitch.network.stitch_macs`. Seeded and deterministic for a fixed thread count.
"""
from klas.heterogeneous.claims import assess
from klas.heterogeneous.config import (
    DEPTHS, LOSSES, PAPER, SCHEDULES, HeteroConfig, cut_at, protocol_stitches, stages_of, total_steps,
)
from klas.heterogeneous.protocol import cell, run_protocol, summarise, tag_of, train_loss

__all__ = ["DEPTHS", "LOSSES", "PAPER", "SCHEDULES", "HeteroConfig", "assess", "cell", "cut_at", "protocol_stitches",
           "run_protocol", "stages_of", "summarise", "tag_of", "total_steps", "train_loss"]
