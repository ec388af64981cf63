"""Stage 3, ``klas train``: least-squares init and joint fine-tuning of the selected stitches."""
from klas.run import read_selection
from klas.train.loop import TrainResult, train_run
from klas.train.losses import LOSSES, parse_loss
from klas.train.results import read_results

__all__ = ["LOSSES", "TrainResult", "parse_loss", "read_results", "read_selection", "train_run"]
