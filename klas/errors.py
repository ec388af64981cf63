"""The one error type users see: a one-line message naming the problem and the fix.

The CLI turns a :class:`KlasError` into ``error: <message>`` on stderr and exit status 2, with no
traceback. Library callers can catch it like any exception.
"""
from __future__ import annotations


class KlasError(Exception):
    """Bad input or state the user can fix; ``str(err)`` is the whole one-line message."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        if message.startswith("Caught ") and "\nOriginal Traceback" in message:
            # torch re-raises an error of a DataLoader worker as this type with the worker's whole
            # traceback as the message: keep the original one line (the traceback's last line)
            message = message.rstrip().splitlines()[-1].partition(": ")[2] or message
        super().__init__(" ".join(message.split()))
