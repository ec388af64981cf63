"""Stage 3, ``klas train``: least-squares init and joint fine-tuning of the selected stitches.

* :class:`TrainConfig` (``klas.train.config``): every option, validated once;
* the training core (``klas.train.core``): :class:`Objective`, :func:`train_step`, :func:`fit`, reusable
  by any trainer (the quality benchmark, later ones);
* :func:`correct_per_image` / :func:`evaluate_all` (``klas.train.evaluate``): the grouped evaluator;
* :func:`train_run` (``klas.train.loop``): one run of ``klas train``, phase by phase;
* :func:`trained_net` (``klas.train.restore``): the network a finished run evaluated, rebuilt.
"""
from klas.run import read_selection
from klas.train.checkpoint import checkpoint_path, load_checkpoint
from klas.train.compare import compare_runs
from klas.train.config import TrainConfig
from klas.train.core import Objective, fit, init_stitches, make_optimizer, stitch_sequence, teacher_targets, train_step
from klas.train.data import SplitData, epoch_positions
from klas.train.evaluate import correct_per_image, evaluate_all
from klas.train.loop import TrainResult, train_run
from klas.train.losses import LOSSES, parse_loss
from klas.train.restore import TrainedRun, trained_net
from klas.train.results import read_results, results_selection

__all__ = [
    "LOSSES", "Objective", "SplitData", "TrainConfig", "TrainResult", "checkpoint_path", "compare_runs", "correct_per_image",
    "epoch_positions", "evaluate_all", "fit", "init_stitches", "load_checkpoint", "make_optimizer", "parse_loss",
    "read_results", "read_selection", "results_selection", "stitch_sequence", "teacher_targets", "train_run",
    "train_step", "TrainedRun", "trained_net",
]
