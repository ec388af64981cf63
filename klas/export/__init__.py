"""Stage 4, ``klas export pareto``: the Pareto front of a trained run, plots and standalone models;
``klas export tree``: a Stitch Tree sweep's trade-off table, picture and deployable trees."""
from klas.export.artifact import load_stitched, save_stitched
from klas.export.pareto import ExportResult, export_pareto, pareto_front, plot_front
from klas.export.reproduce import reproduce_artifacts
from klas.export.tree import TreeExport, export_tree, load_tree, save_tree

__all__ = ["ExportResult", "TreeExport", "export_pareto", "export_tree", "load_stitched", "load_tree", "pareto_front",
           "plot_front", "reproduce_artifacts", "save_stitched", "save_tree"]
