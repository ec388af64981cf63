"""What a calibration data set looks like to the rest of klas, and how a ``--data`` argument is opened."""
from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

from PIL import Image

from klas.config import SPLITS  # noqa: F401  the three disjoint splits every data set is cut into, re-exported
from klas.errors import KlasError
from klas.utils import DEFAULT_ROOT

# (see :func:`klas.data.make_splits`) ``probe-train`` fits probes / trains stitches, ``score`` ranks
# candidates, ``eval`` is only reported.


@runtime_checkable
class ImageSource(Protocol):
    """One labelled image set, all splits together; sample ids are ``range(len(source))``.

    A source may also carry ``groups``: an int64 array, one entry per sample, naming the original the
    sample was derived from. :func:`klas.data.make_splits` keeps each group inside one split so no
    original leaks between splits (the digits set uses it; folders treat every file as its own group).
    """

    name: str  # "digits" or the directory path
    classes: list[str]  # sorted class names; label ``i`` is ``classes[i]``
    fingerprint: str  # hex sha256 identifying the exact content

    def __len__(self) -> int: ...

    def label(self, idx: int) -> int: ...

    def load(self, idx: int) -> Image.Image: ...  # RGB


def open_source(data: str, root: Path = DEFAULT_ROOT) -> ImageSource:
    """Open ``--data``: a built-in digits set by name (``"digits"``, ``"digits-hard"``: the keys of
    :data:`klas.data.digits.DIGITS_SETS`), anything else an ImageFolder-style directory.

    ``root`` is the klas cache root; the digits sets cache their generated images under ``root/data``.
    """
    from klas.data.digits import DIGITS_SETS, DigitsSource

    name = str(data)
    if name in DIGITS_SETS:
        return DigitsSource(root=root, config=DIGITS_SETS[name], name=name)
    if name.startswith("digits") and not Path(name).exists():
        raise KlasError(f"unknown digits set {name!r}: the built-in sets are {', '.join(DIGITS_SETS)}; "
                        "anything else must be an ImageFolder directory")
    from klas.data.folder import FolderSource

    return FolderSource(data)
