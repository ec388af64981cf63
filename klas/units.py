"""How klas states costs: the convention shown beside every GFLOPs figure (torch-free)."""
from __future__ import annotations

__all__ = ["FLOPS_CONVENTION", "GFLOPS_NOTE"]

#: Stated next to every cost figure klas shows.
FLOPS_CONVENTION = "GFLOPs: fvcore convention, one multiply-add = one FLOP"

#: The same, as a sentence for help texts.
GFLOPS_NOTE = "GFLOPs follow the fvcore convention of the stitching literature: one multiply-add = one FLOP."
