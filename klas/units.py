"""How klas states costs: the convention shown beside every GFLOPs figure and the one GFLOPs <-> MACs
conversion (torch-free)."""
from __future__ import annotations

__all__ = ["FLOPS_CONVENTION", "GFLOPS_NOTE", "MACS_PER_GFLOP", "gflops_to_macs", "macs_to_gflops"]

#: Stated next to every cost figure klas shows.
FLOPS_CONVENTION = "GFLOPs: fvcore convention, one multiply-add = one FLOP"

#: The same, as a sentence for help texts.
GFLOPS_NOTE = "GFLOPs follow the fvcore convention of the stitching literature: one multiply-add = one FLOP."

#: Multiply-adds per GFLOP (fvcore: one multiply-add = one FLOP).
MACS_PER_GFLOP = 1e9


def gflops_to_macs(gflops: float | None) -> float | None:
    """A cost in GFLOPs (fvcore convention) as multiply-adds, the unit every stored cost is in; None stays None."""
    return None if gflops is None else gflops * MACS_PER_GFLOP


def macs_to_gflops(macs: float | None) -> float | None:
    """Multiply-adds as GFLOPs (fvcore convention); None stays None."""
    return None if macs is None else macs / MACS_PER_GFLOP
