"""How long should ``klas tree`` train its stitch layers? A sweep of its training recipe over one cache,
every choice made on the score split, the eval split only reported (``benchmarks/bench_tree.py``).

The sweep is a sequence of **stages**, each varying one recipe field of
:class:`~klas.tree.config.TreeConfig` from the best setting so far (a coordinate search;
:data:`DEFAULT_STAGES`):

1. ``epochs`` of final-feature matching: 2, 8, 32;
2. ``task_epochs`` of the task loss after it: 0, 2, 8;
3. ``layer``: linear, mlp;
4. ``init_images`` of the least-squares init: 100, 1000.

Every variant is a real ``klas tree`` run (:func:`klas.tree.tree_run`) into its own run directory,
with the trunk and share points the base configuration chooses fixed for all of them (so variants
compare like with like), sharing one :func:`~klas.tree.prepare.prepare` (block scores, the frozen
models' own outputs). A finished run of the same recipe and cache found there is read back instead of
trained again, so an interrupted sweep continues. Each run keeps ``klas tree``'s schedule (warm-up,
then cosine over that run's own length), so every length is trained from the start, not read off a
longer run.

A variant's **score** is the mean over its share points of the system's top-1 on the score split
(the recovered gain is that, shifted and scaled by the same floor and ceiling); each stage keeps its
best-scoring value (a tie keeps the earlier, cheaper value).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from rich.console import Console

from klas.cache import open_cache
from klas.errors import KlasError
from klas.tree.config import TreeConfig
from klas.tree.gain import subset_gains
from klas.tree.prepare import prepare
from klas.tree.run import MANIFEST, choose_plan, tree_run
from klas.utils import resolve_device


#: Recipe fields a stage may vary: not the models, the trunk and share points (fixed for the whole sweep), nor
#: what the shared preparation depends on (scores, seed).
SWEEPABLE: tuple[str, ...] = tuple(k for k in TreeConfig.recipe_keys() if k not in (
    "models", "trunk", "trunk_rule", "share_at", "points", "probe_epochs", "temperature", "seed"))


@dataclass(frozen=True)
class Stage:
    """One stage of the sweep: the recipe field it varies and the values it tries, in order (cheapest first)."""

    field: str
    values: tuple

    def __post_init__(self) -> None:
        if self.field not in SWEEPABLE:
            raise KlasError(f"a sweep stage varies a stitch-training field of klas tree ({', '.join(SWEEPABLE)}), "
                            f"not {self.field!r}")
        if not self.values or len(set(self.values)) != len(self.values):
            raise KlasError(f"stage {self.field} needs distinct values, got {list(self.values)}")


DEFAULT_STAGES: tuple[Stage, ...] = (
    Stage("epochs", (2, 8, 32)), Stage("task_epochs", (0, 2, 8)), Stage("layer", ("linear", "mlp")),
    Stage("init_images", (100, 1000)),
)


def parse_stages(text: str) -> tuple[Stage, ...]:
    """``"epochs=2,8,32;layer=linear,mlp"`` -> stages; numbers become ints (or floats), the rest stay strings."""
    def value(v: str):
        for kind in (int, float):
            try:
                return kind(v)
            except ValueError:
                pass
        return v

    stages = []
    for part in (p.strip() for p in text.split(";") if p.strip()):
        field, eq, values = part.partition("=")
        if not eq:
            raise KlasError(f"stage {part!r} must read FIELD=v1,v2,... (e.g. epochs=2,8,32)")
        stages.append(Stage(field.strip().replace("-", "_"), tuple(value(v.strip()) for v in values.split(",") if v.strip())))
    if not stages:
        raise KlasError("give at least one stage, e.g. epochs=2,8,32")
    return tuple(stages)


def run_name(overrides: dict[str, Any]) -> str:
    """A variant's run directory name: its recipe overrides, sorted (``epochs-8_layer-mlp``)."""
    return "_".join(f"{k}-{v}" for k, v in sorted(overrides.items())) or "base"


def variant_row(manifest: dict, overrides: dict[str, Any]) -> dict:
    """One variant's numbers from its ``tree.json``: per share point and the means over share points."""
    shares = []
    for r in sorted(manifest["trees"], key=lambda r: r["share"]):
        shares.append({
            "share": r["share"], "extra_cost": r["extra_cost"], "acc": r["acc"], "acc_score": r["acc_score"],
            "recovered": r["recovered"], "recovered_score": r["recovered_score"],
            "cosine": {n: f["cosine"] for n, f in r["fidelity"].items() if n != manifest["trunk"]},
            "top1_added": {n: f.get("top1_added") for n, f in r["fidelity"].items() if n != manifest["trunk"]},
            "train_seconds": sum(h["seconds"] for h in r["history"]), "steps": sum(h["steps"] for h in r["history"]),
        })
    mean = lambda k: float(np.mean([s[k] for s in shares]))  # noqa: E731
    return {"overrides": dict(overrides), "recipe": manifest["config"], "shares": shares, "mean_score": mean("acc_score"),
            "mean_eval": mean("acc"), "mean_recovered_score": mean("recovered_score"), "mean_recovered": mean("recovered"),
            "train_seconds": float(sum(s["train_seconds"] for s in shares)), "steps": int(sum(s["steps"] for s in shares))}


def _finished(run_dir: Path, cfg: TreeConfig, fingerprint: str) -> dict | None:
    """The manifest of a finished run of exactly this recipe over this cache, if ``run_dir`` holds one."""
    path = run_dir / MANIFEST
    if not path.is_file():
        return None
    m = json.loads(path.read_text())
    ok = m.get("config") == cfg.recipe() and m.get("cache", {}).get("fingerprint") == fingerprint
    return m if ok and all("acc_score" in r for r in m.get("trees", [])) else None


def tree_sweep(cache_path: Path | str, work: Path | str, base: TreeConfig | None = None,
               stages: Sequence[Stage] = DEFAULT_STAGES, *, console: Console | None = None, progress: bool = True,
               say: Callable[[str], None] | None = None) -> dict:
    """The sweep (module docstring) over ``cache_path``, run directories under ``work``; returns its JSON-ready
    report: the models' gains, the fixed trunk and share points, every variant's numbers, each stage's choice
    and the chosen recipe."""
    t0 = time.perf_counter()
    console = console or Console(stderr=True)
    say = say or (lambda m: console.print(m, markup=False, highlight=False))
    base = (base or TreeConfig()).with_overrides(latency=False, resume=False, overwrite=True)
    cache = open_cache(cache_path)
    device = resolve_device(base.device)
    prepared = prepare(cache, base, device, console=console, progress=progress)
    gains = subset_gains(cache.path, base, console=console, prepared=prepared)
    plan = choose_plan(cache, base, prepared, device)
    fixed = base.with_overrides(trunk=plan.trunk, share_at=tuple(s.share for s in plan.specs))
    say(f"trunk {plan.trunk}, share points {list(fixed.share_at)}; models {', '.join(prepared.names)} "
        f"({time.perf_counter() - t0:.0f} s to prepare)")
    variants: dict[str, dict] = {}
    chosen: dict[str, Any] = {}
    record = []
    for stage in stages:
        names = []
        for v in stage.values:
            over = {**chosen, stage.field: v}
            name = run_name(over)
            names.append(name)
            if name in variants:
                continue
            cfg = fixed.with_overrides(**over)
            manifest = _finished(Path(work) / name, cfg, cache.fingerprint)
            if manifest is None:
                manifest = tree_run(cache.path, Path(work) / name, cfg, console=console, progress=progress,
                                    prepared=prepared).manifest
            variants[name] = variant_row(manifest, over)
            r = variants[name]
            say(f"  {name}: score {100 * r['mean_score']:.2f} %, eval {100 * r['mean_eval']:.2f} % (recovered "
                f"{100 * r['mean_recovered']:.1f} %), {r['steps']} steps, {r['train_seconds']:.0f} s")
        best = max(range(len(names)), key=lambda i: (variants[names[i]]["mean_score"], -i))
        chosen = dict(variants[names[best]]["overrides"])
        record.append({"field": stage.field, "values": list(stage.values), "runs": names, "chosen": stage.values[best]})
        say(f"stage {stage.field}: chose {stage.values[best]!r} on the score split")
    final = variants[run_name(chosen)]
    return {"models": prepared.names, "trunk": plan.trunk, "shares": list(fixed.share_at), "gains": gains.to_json(),
            "base": {k: (list(v) if isinstance(v, tuple) else v) for k, v in base.recipe().items()},
            "stages": record, "variants": variants, "chosen": chosen, "final": final,
            "chosen_on": "score (mean system top-1 over share points)", "reported_on": "eval",
            "split_sizes": {s: d.n for s, d in prepared.data.items()}, "seconds": time.perf_counter() - t0}


__all__ = ["DEFAULT_STAGES", "SWEEPABLE", "Stage", "parse_stages", "run_name", "tree_sweep", "variant_row"]
