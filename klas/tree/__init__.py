"""``klas tree``: a Stitch Tree (Mai et al., CVPR 2026) over the models of a cache, chosen with klas's
scores, trained with final-feature matching and evaluated as a system.

* :class:`TreeConfig` (``klas.tree.config``): every option, validated once;
* ``klas.tree.choose``: trunk ranking and share points from the probes' KL scores;
* ``klas.tree.fit``: training one tree (resumable); ``klas.tree.evaluate``: fidelity, task accuracy, latency;
* ``klas.tree.gain``: the floor, ceiling and gain of every pair (or subset) of the models, no tree trained
  (:func:`subset_gains`, ``klas tree CACHE --gain-only``);
* :func:`tree_run` (``klas.tree.run``): the whole stage; :func:`trained_tree`: a finished tree, rebuilt.
"""
from klas.tree.config import TreeConfig, parse_models, parse_share_at
from klas.tree.gain import GainReport, subset_gains
from klas.tree.run import MANIFEST, TreeResult, read_manifest, tradeoff_table, trained_tree, tree_run

__all__ = ["MANIFEST", "GainReport", "TreeConfig", "TreeResult", "parse_models", "parse_share_at", "read_manifest",
           "subset_gains", "tradeoff_table", "trained_tree", "tree_run"]
