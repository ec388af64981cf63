"""``klas export tree RUN``: a Stitch Tree sweep's trade-off table, its picture and deployable trees.

Writes ``RUN/export/`` (built under a temporary name, then moved into place):

* ``tradeoff.csv`` / ``tradeoff.json``: per share point its cost (GFLOPs, fvcore convention), extra
  cost over the largest single model, the system's top-1, the recovered gain and each branch's
  fidelity; the floor (best single model) and the ceiling (all models separately) beside them;
* ``tradeoff.png`` / ``.svg``: recovered gain against cost, with floor (0 %) and ceiling (100 %), and
  ``tradeoff-latency.png`` / ``.svg`` the same against the measured latency (when it was measured);
* ``trees/s{share}/``: ``model.safetensors`` + ``config.json`` per tree. The weights are exactly what
  the tree runs: the trunk model whole (``m0.*``), each other branch model's blocks from its cut and
  its head (``m{i}.*``, its timm state-dict keys), each stitch module (``s{i}.*``).
  :func:`load_tree` rebuilds it without network access (timm ``pretrained=False``); as for
  :func:`klas.export.load_stitched`, the two files record each other's hash and a damaged or edited
  tree (a changed share point or cut, extra or missing tensors) is refused in one line.
"""
from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from klas.errors import KlasError
from klas.export.artifact import (
    _build, _create_kwargs, _load_layer, _load_part, _stitch_entry, _stitch_layer, check_cut, dry_run, read_artifact,
    rebuilding,
    used_state, write_artifact,
)
from klas.export.pareto import save_figure
from klas.fs import DEFAULT_ROOT, DirLock, atomic_dir, claim_dir, write_json_atomic
from klas.stitch.tree import StitchTree, TreeSpec
from klas.tree import read_manifest, tradeoff_table, trained_tree
from klas.units import FLOPS_CONVENTION

TREE_FORMAT = "klas.tree-model/1"
TRADEOFF_FORMAT = "klas.tradeoff/1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CSV_COLUMNS = ("system", "share", "gflops", "macs", "extra_cost", "acc", "recovered", "latency_ms", "latency_pred_ms",
               "fidelity", "artifact")
#: What re-creates a damaged or edited tree artifact.
REEXPORT = "re-export it with: klas export tree RUN"


def save_tree(tree: StitchTree, out_dir: Path, arch: dict[str, str], info: dict[str, Any] | None = None) -> Path:
    """Write ``tree`` to ``out_dir`` (``model.safetensors`` + ``config.json``, module docstring)."""
    spec = tree.spec
    tensors: dict[str, torch.Tensor] = {}
    models, stitches = [], []
    cuts = {spec.trunk: None, **dict(spec.branches)}
    for i, name in enumerate(spec.names):
        a = tree.adapter(name)
        role = "src" if name == spec.trunk else "dst"
        for k, v in used_state(a, role, cuts[name]).items():
            tensors[f"m{i}.{k}"] = v.detach().to("cpu").contiguous().clone()
        models.append({"name": name, "arch": arch[name], "create_kwargs": _create_kwargs(a), "family": a.family,
                       "num_blocks": a.num_blocks, "role": "trunk" if role == "src" else "branch", "cut": cuts[name]})
    for i, (name, _) in enumerate(spec.branches):
        layer = tree.stitch(name)
        for k, v in layer.state_dict().items():
            tensors[f"s{i}.{k}"] = v.detach().to("cpu").contiguous().clone()
        stitches.append({"branch": name, **_stitch_entry(layer)})
    config = {"format": TREE_FORMAT, "spec": spec.to_json(), "models": models, "stitches": stitches, **(info or {}),
              "weights": WEIGHTS, "tensors": len(tensors),
              "parameters": int(sum(t.numel() for t in tensors.values() if t.is_floating_point()))}
    out_dir = Path(out_dir)
    write_artifact(out_dir, TREE_FORMAT, config, tensors)
    return out_dir


def load_tree(path: Path | str, device: str | torch.device = "cpu") -> StitchTree:
    """Rebuild an exported tree (eval mode, no gradients): ``tree(images) -> {model: pre-logits features}``,
    ``tree.outputs(images) -> {model: (logits, features)}``; it carries the artifact's ``config`` dict.
    A damaged or edited tree is refused with one KlasError (module docstring)."""
    path = Path(path)
    config, tensors = read_artifact(path, TREE_FORMAT, "tree", REEXPORT)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        prefix, _, rest = k.partition(".")
        parts.setdefault(prefix, {})[rest] = v
    with rebuilding(path, REEXPORT):
        tree = _rebuild_tree(config, parts, path)
    tree = tree.to(device).eval()
    for p in tree.parameters():
        p.requires_grad_(False)
    tree.config = config
    dry_run(tree, config, path, REEXPORT)
    return tree


def _rebuild_tree(config: dict[str, Any], parts: dict[str, dict[str, torch.Tensor]], path: Path) -> StitchTree:
    try:
        spec = TreeSpec.from_json(config["spec"])
    except KlasError:
        raise KlasError(f"{path / CONFIG} holds a malformed tree spec {config['spec']!r}; {REEXPORT}") from None
    models, stitches = config["models"], config["stitches"]
    expected = {f"m{i}" for i in range(len(models))} | {f"s{i}" for i in range(len(stitches))}
    cuts = {spec.trunk: None, **dict(spec.branches)}
    if (set(parts) - expected or [m["name"] for m in models] != spec.names
            or [(e["role"], e["cut"]) for e in models] != [("trunk" if n == spec.trunk else "branch", cuts[n])
                                                          for n in spec.names]
            or [e["branch"] for e in stitches] != [m for m, _ in spec.branches]):
        raise KlasError(f"{path / CONFIG} does not describe one tree (its spec, models, stitches and tensors "
                        f"disagree); {REEXPORT}")
    adapters = {}
    for i, entry in enumerate(models):
        a = _build(entry)
        trunk = entry["role"] == "trunk"
        check_cut(entry, a, "whole" if trunk else "dst", path, REEXPORT)
        _load_part(a, parts.get(f"m{i}", {}), "src" if trunk else "dst", entry["cut"], path, REEXPORT)
        adapters[entry["name"]] = a
    if not 1 <= spec.share <= adapters[spec.trunk].num_blocks - 1:
        raise KlasError(f"{path / CONFIG} records share point {spec.share} outside trunk {spec.trunk}'s "
                        f"1..{adapters[spec.trunk].num_blocks - 1}; {REEXPORT}")
    layers = {}
    for i, entry in enumerate(stitches):
        layer = _stitch_layer(entry, path)
        _load_layer(layer, parts.get(f"s{i}", {}), path, REEXPORT)
        layers[entry["branch"]] = layer
    return StitchTree(spec, adapters, layers)


@dataclass
class TreeExport:
    """What ``export_tree`` wrote."""

    run_dir: Path
    out_dir: Path
    manifest: dict
    files: list[Path] = field(default_factory=list)
    artifacts: dict[int, str] = field(default_factory=dict)
    seconds: float = 0.0

    def table(self) -> Table:
        return tradeoff_table(self.manifest, title=f"{self.run_dir.name}: Stitch Tree trade-off")


def tradeoff_rows(manifest: dict) -> list[dict]:
    """The table's rows: every tree (cheapest first), then the floor and the ceiling."""
    ref = manifest["reference"]
    rows = []
    for r in sorted(manifest["trees"], key=lambda r: r["macs"]):
        fid = {n: {k: f[k] for k in ("cosine", "top1", "model_top1")} for n, f in r["fidelity"].items()}
        rows.append({"system": f"tree s={r['share']}", "share": r["share"], "gflops": r["gflops"], "macs": r["macs"],
                     "extra_cost": r["extra_cost"], "acc": r["acc"], "recovered": r["recovered"],
                     "latency_ms": r.get("latency_ms"), "latency_pred_ms": r.get("latency_pred_ms"), "fidelity": fid,
                     "spec": r["spec"]})
    for key, name in (("floor", f"floor: {ref['floor']['model']}"), ("ceiling", "ceiling: all models separately")):
        v = ref[key]
        rows.append({"system": name, "share": None, "gflops": v["macs"] / 1e9, "macs": v["macs"], "extra_cost": v["extra_cost"],
                     "acc": v["acc"], "recovered": 0.0 if key == "floor" else 1.0, "latency_ms": v.get("latency_ms"),
                     "latency_pred_ms": v.get("latency_pred_ms"),
                     "fidelity": None})
    return rows


def plot_tradeoff(manifest: dict, out_base: Path, title: str, axis: str = "gflops") -> list[Path]:
    """``out_base``.png / .svg: recovered gain (%) against GFLOPs, or with ``axis="latency"`` against the
    measured ms per batch, floor and ceiling drawn."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    ref = manifest["reference"]
    trees = sorted(manifest["trees"], key=lambda r: r["macs"])

    def x_of(r: dict) -> float:
        return (r.get("latency_ms") if axis == "latency" else r["macs"] / 1e9) or float("nan")

    fig, ax = plt.subplots(figsize=(8, 5.2), dpi=150)
    ax.axhline(0, color="#dd8452", linestyle="--", linewidth=1.2,
               label=f"floor: {ref['floor']['model']} alone ({100 * ref['floor']['acc']:.2f}%)")
    ax.axhline(100, color="#55a868", linestyle="--", linewidth=1.2,
               label=f"ceiling: all models separately ({100 * ref['ceiling']['acc']:.2f}%)")
    ax.scatter([x_of(ref["floor"])], [0], s=90, marker="*", color="#dd8452", edgecolors="black", zorder=5)
    ax.scatter([x_of(ref["ceiling"])], [100], s=90, marker="*", color="#55a868", edgecolors="black", zorder=5)
    xs = [x_of(r) for r in trees]
    ys = [100 * r["recovered"] if r["recovered"] is not None and math.isfinite(r["recovered"]) else float("nan") for r in trees]
    ax.plot(xs, ys, "-o", color="#4c72b0", zorder=4, label="Stitch Tree (trunk " + manifest["trunk"] + ")")
    for r, x, y in zip(trees, xs, ys):
        ax.annotate(f"s={r['share']} ({100 * r['acc']:.1f}%)", (x, y), xytext=(6, -12), textcoords="offset points", fontsize=8)
    latency = manifest.get("latency") or {}
    ax.set_xlabel("GFLOPs (fvcore: 1 multiply-add = 1 FLOP)" if axis == "gflops" else
                  f"latency, ms per forward pass of {latency.get('batch')} images on {latency.get('device')} (measured)")
    ax.set_ylabel("recovered gain (%) = (tree - floor) / (ceiling - floor)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8, framealpha=0.9)
    return save_figure(fig, out_base)


def _csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(CSV_COLUMNS), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else json.dumps(r[k]) if k == "fidelity" else r[k]) for k in CSV_COLUMNS})


def export_tree(run_dir: Path | str, *, root: Path | None = None, device: str = "cpu",
                console: Console | None = None) -> TreeExport:
    """Write ``RUN/export/`` for a finished ``klas tree`` run (module docstring)."""
    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    claim_dir(run_dir, "tree", "run directory")
    result = TreeExport(run_dir, run_dir / "export", manifest)
    with DirLock(run_dir, "run directory"), atomic_dir(run_dir / "export", overwrite=True) as tmp:
        rows = tradeoff_rows(manifest)
        loaded: dict = {}
        for r in manifest["trees"]:
            tree, row, arch = trained_tree(run_dir, r["share"], root=root or DEFAULT_ROOT, device=device, loaded=loaded)
            rel = f"trees/s{r['share']}"
            info = {"share": r["share"], "macs": row["macs"], "gflops": row["gflops"], "flops": FLOPS_CONVENTION,
                    "accuracy": {"system_top1": row["acc"], "recovered": row["recovered"], "split": "eval",
                                 "fidelity": row["fidelity"]}, "data_config": manifest["data_config"],
                    "run": run_dir.name, "cache_fingerprint": manifest["cache"]["fingerprint"],
                    "made_from": {"cache_fingerprint": manifest["cache"]["fingerprint"],
                                  "tree_config_sha256": manifest.get("config_sha256"),
                                  "seed": manifest["config"].get("seed"),
                                  "checkpoint_sha256": row.get("checkpoint_sha256")}}
            save_tree(tree, tmp / rel, arch, info)
            result.artifacts[r["share"]] = rel
        for row in rows:
            row["artifact"] = result.artifacts.get(row["share"])
        _csv(tmp / "tradeoff.csv", rows)
        write_json_atomic(tmp / "tradeoff.json", {"format": TRADEOFF_FORMAT, "run": run_dir.name, "trunk": manifest["trunk"],
                                                   "flops": FLOPS_CONVENTION, "accuracy_unit": "fraction", "rows": rows})
        plot_tradeoff(manifest, tmp / "tradeoff", f"{run_dir.name}: Stitch Tree, recovered gain vs cost")
        timed = all(r.get("latency_ms") is not None for r in manifest["trees"])
        if timed:
            plot_tradeoff(manifest, tmp / "tradeoff-latency", f"{run_dir.name}: Stitch Tree, recovered gain vs latency",
                          axis="latency")
    names = ["tradeoff.csv", "tradeoff.json", "tradeoff.png", "tradeoff.svg"]
    result.files = [result.out_dir / n for n in names + (["tradeoff-latency.png", "tradeoff-latency.svg"] if timed else [])]
    result.seconds = time.perf_counter() - t0
    return result


__all__ = ["TreeExport", "export_tree", "load_tree", "plot_tradeoff", "save_tree", "tradeoff_rows"]
