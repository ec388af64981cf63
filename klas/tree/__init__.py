"""``klas tree``: a Stitch Tree (Mai et al., CVPR 2026) over the models of a cache, chosen with klas's
scores, trained with final-feature matching and evaluated as a system.

* :class:`TreeConfig` (``klas.tree.config``): every option, validated once;
* ``klas.tree.choose``: trunk ranking and share points from the probes' KL scores;
* ``klas.tree.fit``: training one tree (resumable); ``klas.tree.evaluate``: fidelity, task accuracy, latency;
* :func:`tree_run` (``klas.tree.run``): the whole stage; :func:`trained_tree`: a finished tree, rebuilt.
"""
from klas.tree.config import TreeConfig, parse_share_at
from klas.tree.run import MANIFEST, TreeResult, read_manifest, tradeoff_table, trained_tree, tree_run

__all__ = ["MANIFEST", "TreeConfig", "TreeResult", "parse_share_at", "read_manifest", "tradeoff_table", "trained_tree",
           "tree_run"]
