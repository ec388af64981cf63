"""klas: find good stitched networks between pretrained vision models (KLAS, ICLR 2026)."""
from klas.errors import KlasError

__version__ = "0.1.0"
__all__ = ["KlasError", "__version__", "load_tree"]

#: Public names served from the stages on first use, so ``import klas`` stays torch-free (the CLI's
#: ``--help`` relies on it); ``klas.load_tree`` is :func:`klas.export.load_tree`.
_LAZY = {"load_tree": "klas.export.tree"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'klas' has no attribute {name!r}")
