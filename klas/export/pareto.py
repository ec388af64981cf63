"""Stage 4, ``klas export pareto``: the accuracy/cost Pareto front of a trained run.

Writes ``RUN/export/``: ``front.csv``, ``front.json``, ``front.png``, ``front.svg`` and, with
``models=True``, one standalone artifact per front model under ``models/`` (see
:mod:`klas.export.artifact`). The directory is built under a temporary name and moved into place,
so an interrupted export leaves the previous one intact.
"""
from __future__ import annotations

import csv
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from klas.errors import KlasError
from klas.fs import DEFAULT_ROOT, atomic_dir, read_json, write_json_atomic
from klas.run import (
    EXPORT, RESULTS, TRAIN_MANIFEST, check_same_selection, read_selection, run_writer, selection_hash,
)
from klas.term import make_console
from klas.units import FLOPS_CONVENTION
from klas.metrics import is_finite, pareto_front
from klas.utils import sha256_json

__all__ = ["EXPORT", "FRONT_FORMAT", "ExportResult", "export_pareto", "pareto_front", "plot_front", "safe_name"]
FRONT_FORMAT = "klas.front/1"
X_LABEL = "GFLOPs (fvcore: 1 multiply-add = 1 FLOP)"
Y_LABEL = "top-1 accuracy on eval split (%)"
CSV_COLUMNS = ("id", "kind", "route", "src", "src_cut", "dst", "dst_cut", "gflops", "macs", "params",
               "acc_after", "acc_before", "latency_ms", "latency_batch", "latency_device", "artifact", "onnx")


def safe_name(identifier: str) -> str:
    """A directory name for a stitch id / anchor name: ``a:3->b:4`` -> ``a_3--b_4``."""
    name = identifier.replace("->", "--").replace(":", "_")
    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", name)


@dataclass
class ExportResult:
    """What ``export_pareto`` wrote; ``front`` are the front rows (cheapest first)."""

    run_dir: Path
    out_dir: Path
    front: list[dict]
    points: int
    files: list[Path] = field(default_factory=list)
    models: dict[str, str] = field(default_factory=dict)  # id -> artifact dir (relative to out_dir)
    onnx: dict[str, str] = field(default_factory=dict)  # id -> "ok" or the error
    seconds: float = 0.0

    def table(self) -> Table:
        t = Table(title=f"{self.run_dir.name}: Pareto front ({len(self.front)} of {self.points}), {FLOPS_CONVENTION}")
        cols = [("id", "left"), ("kind", "left"), ("GFLOPs", "right"), ("top-1 %", "right"), ("latency ms", "right")]
        if self.models:
            cols.append(("artifact", "left"))
        for col, just in cols:
            t.add_column(col, justify=just, overflow="fold")
        for r in self.front:
            lat = f"{r['latency_ms']:.2f}" if is_finite(r.get("latency_ms")) else ""
            cells = [r["id"], r["kind"], f"{r['gflops']:.4f}", f"{100 * r['acc_after']:.2f}", lat]
            if self.models:
                art = self.models.get(r["id"], "")
                if r["id"] in self.onnx:
                    art += " (+onnx)" if self.onnx[r["id"]] == "ok" else " (onnx failed)"
                cells.append(art)
            t.add_row(*cells)
        return t


def plot_front(rows: list[dict], front: list[dict], out_base: Path, *, title: str,
               budget_gflops: float | None = None) -> list[Path]:
    """``out_base``.png and .svg: every point, the front as a step line, anchors labelled, the budget."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    stitches = [r for r in rows if r["kind"] == "stitch" and is_finite(r.get("acc_after"))]
    anchors = [r for r in rows if r["kind"] == "anchor" and is_finite(r.get("acc_after"))]
    fig, ax = plt.subplots(figsize=(8, 5.2), dpi=150)
    if any(is_finite(r.get("acc_before")) for r in stitches):
        ax.scatter([r["gflops"] for r in stitches], [100 * r["acc_before"] for r in stitches], s=14, marker="o",
                   facecolors="none", edgecolors="#b0b0b0", linewidths=0.8, zorder=1,
                   label="stitch before fine-tuning (LS init)")
    ax.scatter([r["gflops"] for r in stitches], [100 * r["acc_after"] for r in stitches], s=22, color="#4c72b0",
               alpha=0.85, zorder=3, label=f"stitch after fine-tuning ({len(stitches)})")
    ax.scatter([r["gflops"] for r in anchors], [100 * r["acc_after"] for r in anchors], s=90, marker="*",
               color="#dd8452", edgecolors="black", linewidths=0.6, zorder=5, label="anchor (single model)")
    for r in anchors:
        ax.annotate(r["id"], (r["gflops"], 100 * r["acc_after"]), xytext=(6, -12), textcoords="offset points",
                    fontsize=9, fontweight="bold", zorder=6)
    if front:
        xs = [r["gflops"] for r in front]
        ys = [100 * r["acc_after"] for r in front]
        ax.step(xs, ys, where="post", color="#c44e52", linewidth=1.8, zorder=4, label=f"Pareto front ({len(front)})")
        ax.scatter(xs, ys, s=36, facecolors="none", edgecolors="#c44e52", linewidths=1.4, zorder=4)
    if budget_gflops is not None:
        ax.axvline(budget_gflops, color="0.3", linestyle="--", linewidth=1.2, zorder=2,
                   label=f"budget {budget_gflops:g} GFLOPs")
    ax.set_xlabel(X_LABEL)
    ax.set_ylabel(Y_LABEL)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8, framealpha=0.9)
    return save_figure(fig, out_base)


def save_figure(fig, out_base: Path) -> list[Path]:
    """``out_base``.png and .svg of a matplotlib figure (laid out tightly), then the figure is closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    paths = [out_base.with_suffix(f".{ext}") for ext in ("png", "svg")]
    for p in paths:
        fig.savefig(p)
    plt.close(fig)
    return paths


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(CSV_COLUMNS), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None or (isinstance(r.get(k), float) and math.isnan(r[k])) else r[k])
                        for k in CSV_COLUMNS})


def _json_safe(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


@run_writer
def export_pareto(
    run_dir: Path | str,
    *,
    models: bool = False,
    onnx: bool = False,
    device: str | None = "cpu",
    root: Path | None = None,
    console: Console | None = None,
) -> ExportResult:
    """Compute and write the Pareto front of a trained run (accuracy after fine-tuning vs GFLOPs).

    * ``models`` (False): also write every front model as a standalone artifact (``models/<id>/``:
      ``model.safetensors`` + ``config.json``; load with :func:`klas.export.load_stitched`).
    * ``onnx`` (False): with ``models``, also ``model.onnx`` per model where torch's exporter manages
      (a failure is reported per model, it does not fail the export).
    * ``device`` ("cpu"): where models are rebuilt for export; ``root``: the klas cache root (demo
      weights); ``console``: where messages go.

    Returns an :class:`ExportResult` (``.table()`` renders the front).
    """
    from klas.train import read_results

    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    console = console or make_console(stderr=True)
    selection = read_selection(run_dir)
    if onnx and not models:
        raise KlasError("--onnx exports the front's models; pass --models too")
    if not (run_dir / RESULTS).is_file():
        what = "export models from" if models else "export a front of"
        raise KlasError(f"cannot {what} run {run_dir}: it is not trained yet (no {RESULTS}); run: klas train {run_dir}")
    rows = read_results(run_dir)
    if not rows:
        raise KlasError(f"{run_dir / RESULTS} is empty; rerun klas train {run_dir} --overwrite")
    train_info = _trained_on(run_dir, selection)
    front = pareto_front(rows)
    budget = selection.get("budget_gflops")
    result = ExportResult(run_dir, run_dir / EXPORT, front, len(rows))

    with atomic_dir(run_dir / EXPORT, overwrite=True) as tmp:
        if models:
            result.models, result.onnx = _export_models(run_dir, selection, train_info, front, tmp, onnx, device,
                                                        root or DEFAULT_ROOT, console)
        for r in front:
            r["artifact"] = result.models.get(r["id"])
            r["onnx"] = result.onnx.get(r["id"])
        _write_csv(tmp / "front.csv", front)
        write_json_atomic(tmp / "front.json", {
            "format": FRONT_FORMAT,
            "run": run_dir.name,
            "selection_sha256": selection_hash(selection),
            "budget_gflops": budget,
            "cost": "gflops", "flops": FLOPS_CONVENTION,
            "accuracy": "acc_after: top-1 on the eval split after fine-tuning, a fraction in [0, 1]",
            "points": len(rows),
            "front": [{k: _json_safe(r.get(k)) for k in CSV_COLUMNS} for r in front],
            "train": {k: train_info.get(k) for k in ("config", "epochs_done")} if train_info else None,
        })
        title = f"{run_dir.name}: {len(front)} of {len(rows)} networks on the Pareto front"
        plot_front(rows, front, tmp / "front", title=title, budget_gflops=budget)
    result.files = [result.out_dir / n for n in ("front.csv", "front.json", "front.png", "front.svg")]
    result.seconds = time.perf_counter() - t0
    return result


def _trained_on(run_dir: Path, selection: dict) -> dict:
    """The training manifest (``{}`` when absent), after checking that results and manifest belong to ``selection``."""
    from klas.train import results_selection

    fix = f"rerun klas train {run_dir} --overwrite"
    check_same_selection(results_selection(run_dir), selection, run_dir / RESULTS, fix)
    path = run_dir / TRAIN_MANIFEST
    if not path.is_file():
        return {}
    info = read_json(path, "training manifest")
    if not isinstance(info, dict):
        raise KlasError(f"{path} is not a klas training manifest; {fix}")
    check_same_selection(info.get("selection_sha256"), selection, path, fix)
    return info


def _export_models(run_dir, selection, train_info, front, out_dir, onnx, device, root, console):
    """Rebuild the front's networks from the cache + final checkpoint and save each one."""
    import torch

    from klas.export.artifact import export_onnx, save_stitched
    from klas.train import trained_net

    done = train_info.get("epochs_done")
    trained = trained_net(run_dir, [r["id"] for r in front], epochs_done=done, root=root, device=device)
    net, ckpt, cache, arch = trained.net, trained.checkpoint, trained.cache, trained.arch
    made_from = {"selection_sha256": selection_hash(selection), "cache_fingerprint": cache.fingerprint,
                 "train_config_sha256": sha256_json(ckpt["config"]), "seed": ckpt["config"].get("seed"),
                 "checkpoint_sha256": ckpt.get("weights_sha256")}
    data_config = cache.manifest["data"]["preprocess"]
    size = tuple(data_config["input_size"])
    models_dir = out_dir / "models"
    artifacts, onnx_status = {}, {}
    for r in front:
        rid = r["id"]
        rel = f"models/{safe_name(rid)}"
        info = {
            "id": rid, "route": r["route"], "data_config": data_config,
            "accuracy": {"top1": r["acc_after"], "top1_before_finetune": r.get("acc_before"), "split": "eval", "unit": "fraction"},
            "macs": r["macs"], "gflops": r["gflops"], "params_run": r["params"], "flops": FLOPS_CONVENTION,
            "run": run_dir.name, "cache_fingerprint": cache.fingerprint, "full_tune": bool(ckpt["config"].get("full_tune")),
            "made_from": made_from,
        }
        model = net.model(rid)
        if r["kind"] == "stitch":
            s = net.specs[rid]
            save_stitched(model, models_dir / safe_name(rid), src_arch=arch[s.src], dst_arch=arch[s.dst], info=info)
        else:
            save_stitched(model, models_dir / safe_name(rid), src_arch=arch[rid], info=info)
        artifacts[rid] = rel
        if onnx:
            try:
                export_onnx(model.cpu(), torch.zeros(1, *size), models_dir / safe_name(rid) / "model.onnx")
                onnx_status[rid] = "ok"
            except Exception as exc:
                onnx_status[rid] = f"failed: {exc}"
                console.print(f"[yellow]onnx export of {rid} failed[/]: {exc}")
    (models_dir / "index.json").write_text(json.dumps(
        {"format": "klas.models/1", "models": [{"id": k, "dir": v, "onnx": onnx_status.get(k)} for k, v in artifacts.items()]},
        indent=2) + "\n")
    return artifacts, onnx_status
