"""Stage 4, ``klas export pareto``: the Pareto front of a trained run, plots and standalone models."""
from klas.export.artifact import load_stitched, save_stitched
from klas.export.pareto import ExportResult, export_pareto, pareto_front, plot_front

__all__ = ["ExportResult", "export_pareto", "load_stitched", "pareto_front", "plot_front", "save_stitched"]
