"""Pre-flight compatibility report: per model pair, how their representations are bridged and at what cost.

Computed from the profiles alone (no images, no compute), so ``klas cache`` and ``klas search`` can
show it before any work: a user sees that a ViT -> ResNet stitch resamples 4x4 tokens to 8x8 maps
and drops the class token, not a shape error mid-run.
"""
from __future__ import annotations

from typing import Mapping

from rich.table import Table

from klas.models import Profile, Rep
from klas.stitch.bridge import needs_bridge, prefix_plan, resample_mode, stitch_module_macs, stitch_module_params
from klas.stitch.candidates import model_pairs


def _grids(reps: list[Rep]) -> str:
    seen = list(dict.fromkeys(f"{r.grid[0]}x{r.grid[1]}" for r in reps))
    return ",".join(seen)


def _prefix_text(src: Rep, dst: Rep) -> str:
    plan = prefix_plan(src, dst)
    parts = [f"cls <- {plan['cls']}"] if plan["cls"] else []
    if plan["learned"]:
        parts.append(f"{plan['learned']} learned")
    if plan["dropped"]:
        parts.append(f"{plan['dropped']} dropped")
    return ", ".join(parts) or "none"


def pair_report(a: str, pa: Profile, b: str, pb: Profile, layer: str = "linear") -> dict:
    """How stitches ``a -> b`` (every cut pair) are bridged: layouts, grids, resampling, prefix tokens,
    how many cut pairs need a bridge, and the stitch module's MACs / parameters over the cuts
    (the bridge's resampling costs zero MACs by klas's convention; its learned tokens are parameters)."""
    src_reps, dst_reps = list(pa.reps[1:]), list(pb.reps[:-1])
    pairs = [(ra, rb) for ra in src_reps for rb in dst_reps]
    bridged = [(ra, rb) for ra, rb in pairs if needs_bridge(ra, rb)]
    modes = sorted({resample_mode(ra.grid, rb.grid) for ra, rb in bridged} - {"none"})
    macs = [stitch_module_macs(layer, ra, rb) for ra, rb in pairs]
    params = [stitch_module_params(layer, ra, rb) for ra, rb in pairs]
    return {
        "src": a, "dst": b,
        "layout": f"{src_reps[0].layout} -> {dst_reps[0].layout}",
        "grids": f"{_grids(src_reps)} -> {_grids(dst_reps)}",
        "resample": ",".join(modes) or "none",
        "prefix": _prefix_text(src_reps[-1], dst_reps[0]) if bridged else "as is",
        "bridged": len(bridged), "cuts": len(pairs),
        "stitch_macs": [min(macs), max(macs)], "stitch_params": [min(params), max(params)],
    }


def compatibility_report(profiles: Mapping[str, Profile], direction: str = "both", layer: str = "linear") -> list[dict]:
    """:func:`pair_report` for every ordered model pair of ``direction``."""
    return [pair_report(a, profiles[a], b, profiles[b], layer) for a, b in model_pairs(profiles, direction)]


def report_table(rows: list[dict]) -> Table:
    """The report as a rich table (klas prints it to stderr)."""
    table = Table(title="stitch compatibility (bridges)", caption="bridge resampling counted as 0 MACs (fvcore convention)")
    for col in ("pair", "layout", "grids", "resample", "prefix tokens", "bridged cuts", "layer MMACs"):
        table.add_column(col, justify="right" if col in ("bridged cuts", "layer MMACs") else "left")
    for r in rows:
        lo, hi = (m / 1e6 for m in r["stitch_macs"])
        table.add_row(f"{r['src']} -> {r['dst']}", r["layout"], r["grids"], r["resample"], r["prefix"],
                      f"{r['bridged']}/{r['cuts']}", f"{lo:.3f}-{hi:.3f}")
    return table
