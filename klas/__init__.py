"""klas: find good stitched networks between pretrained vision models (KLAS, ICLR 2026)."""
from klas.errors import KlasError

__version__ = "0.1.0"
__all__ = ["KlasError", "__version__"]
