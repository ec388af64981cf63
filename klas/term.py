"""Consoles for klas's output: rich tables that survive a log file.

Piped or redirected (not a terminal), rich lays tables out for 80 columns, squeezing every model name to
``klas_vi…``. :func:`make_console` gives such a stream a wide layout instead (:data:`LOG_WIDTH` columns, or
``$COLUMNS`` when set), so ``klas ... > log.txt`` keeps whole names; a terminal keeps its own width.
Tables take only the width they need, so short tables look the same either way. Torch-free.
"""
from __future__ import annotations

import os
from typing import IO, Any

from rich.console import Console

#: Layout width for output that is not a terminal (a file, a pipe, CI logs) when ``$COLUMNS`` is unset.
LOG_WIDTH = 200


def make_console(*, stderr: bool = False, file: IO[str] | None = None, **kwargs: Any) -> Console:
    """A rich Console on stdout (or stderr, or ``file``) that is wide when it does not write to a terminal."""
    console = Console(stderr=stderr, file=file, **kwargs)
    if "width" not in kwargs and not console.is_terminal and not os.environ.get("COLUMNS"):
        console.width = LOG_WIDTH
    return console


__all__ = ["LOG_WIDTH", "make_console"]
