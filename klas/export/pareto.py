"""Stage 4, ``klas export pareto``: the accuracy/cost Pareto fronts of a trained run.

Writes ``RUN/export/``: ``front.csv``, ``front.json``, ``front.png``, ``front.svg`` (accuracy vs GFLOPs)
and, when ``klas train`` measured latency, ``front-latency.*`` (accuracy vs measured ms); with
``models=True`` one standalone artifact per front model of the chosen axis under ``models/`` (see
:mod:`klas.export.artifact`), and per ``--best-under`` budget the single best network under it as
``best-under-<budget>/`` (:mod:`klas.export.best`). The directory is built under a temporary name and
moved into place, so an interrupted export leaves the previous one intact.
"""
from __future__ import annotations

import csv
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console
from rich.table import Table

from klas.errors import KlasError
from klas.fs import DEFAULT_ROOT, atomic_dir, read_json, write_json_atomic
from klas.config import AXES, format_budget
from klas.export.best import COST_KEYS, resolve_budget
from klas.export.best import best_under as pick_best
from klas.run import (
    EXPORT, RESULTS, TRAIN_MANIFEST, check_same_selection, read_selection, run_writer, selection_budget, selection_hash,
)
from klas.term import make_console
from klas.units import FLOPS_CONVENTION
from klas.metrics import is_finite, pareto_front
from klas.utils import sha256_json

__all__ = ["EXPORT", "FRONT_FILES", "FRONT_FORMAT", "ExportResult", "export_pareto", "pareto_front", "plot_front", "safe_name"]
FRONT_FORMAT = "klas.front/1"
X_LABEL = "GFLOPs (fvcore: 1 multiply-add = 1 FLOP)"
Y_LABEL = "top-1 accuracy on eval split (%)"
CSV_COLUMNS = ("id", "kind", "route", "src", "src_cut", "dst", "dst_cut", "gflops", "macs", "params",
               "acc_after", "acc_before", "latency_ms", "latency_pred_ms", "latency_batch", "latency_device", "artifact",
               "onnx")


def safe_name(identifier: str) -> str:
    """A directory name for a stitch id / anchor name: ``a:3->b:4`` -> ``a_3--b_4``."""
    name = identifier.replace("->", "--").replace(":", "_")
    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", name)


#: Files of each axis' front: ``front.*`` (GFLOPs) and ``front-latency.*`` (measured latency).
FRONT_FILES = {"gflops": "front", "latency": "front-latency"}


@dataclass
class ExportResult:
    """What ``export_pareto`` wrote; ``front`` are the front rows of ``axis`` (cheapest first), ``fronts``
    both axes' (``latency`` only when latency was measured), ``best`` one entry per ``--best-under``."""

    run_dir: Path
    out_dir: Path
    front: list[dict]
    points: int
    files: list[Path] = field(default_factory=list)
    models: dict[str, str] = field(default_factory=dict)  # id -> artifact dir (relative to out_dir)
    onnx: dict[str, str] = field(default_factory=dict)  # id -> "ok" or the error
    seconds: float = 0.0
    axis: str = "gflops"
    fronts: dict[str, list[dict]] = field(default_factory=dict)
    best: list[dict] = field(default_factory=list)  # budget, axis, row, artifact

    def table(self) -> Table:
        what = "measured latency" if self.axis == "latency" else FLOPS_CONVENTION
        t = Table(title=f"{self.run_dir.name}: Pareto front ({len(self.front)} of {self.points}), {what}")
        cols = [("id", "left"), ("kind", "left"), ("GFLOPs", "right"), ("top-1 %", "right"), ("latency ms", "right"),
                ("predicted ms", "right")]
        if self.models:
            cols.append(("artifact", "left"))
        for col, just in cols:
            t.add_column(col, justify=just, overflow="fold")
        for r in self.front:
            ms = [f"{r[k]:.2f}" if is_finite(r.get(k)) else "" for k in ("latency_ms", "latency_pred_ms")]
            cells = [r["id"], r["kind"], f"{r['gflops']:.4f}", f"{100 * r['acc_after']:.2f}", *ms]
            if self.models:
                art = self.models.get(r["id"], "")
                if r["id"] in self.onnx:
                    art += " (+onnx)" if self.onnx[r["id"]] == "ok" else " (onnx failed)"
                cells.append(art)
            t.add_row(*cells)
        return t

    def best_lines(self) -> list[str]:
        """One line per ``--best-under``: the network, its top-1, GFLOPs, measured ms, and where it went."""
        lines = []
        for b in self.best:
            r = b["row"]
            ms = f"{r['latency_ms']:.2f} ms (batch {r['latency_batch']})" if is_finite(r.get("latency_ms")) else "ms not measured"
            lines.append(f"best under {b['budget']}: {r['id']}, top-1 {100 * r['acc_after']:.2f}%, "
                         f"{r['gflops']:.4f} GFLOPs, {ms} -> {self.out_dir / b['artifact']}")
        return lines


def plot_front(rows: list[dict], front: list[dict], out_base: Path, *, title: str,
               budget: float | None = None, cost: str = "gflops", x_label: str = X_LABEL) -> list[Path]:
    """``out_base``.png and .svg: every point, the front as a step line, anchors labelled, the budget.

    ``cost`` is the row key on the x axis (``gflops``, or ``latency_ms`` for the latency front; rows
    without a finite cost are left out) and ``budget`` a vertical line in that unit."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    rows = [r for r in rows if is_finite(r.get(cost))]
    stitches = [r for r in rows if r["kind"] == "stitch" and is_finite(r.get("acc_after"))]
    anchors = [r for r in rows if r["kind"] == "anchor" and is_finite(r.get("acc_after"))]
    fig, ax = plt.subplots(figsize=(8, 5.2), dpi=150)
    if any(is_finite(r.get("acc_before")) for r in stitches):
        ax.scatter([r[cost] for r in stitches], [100 * r["acc_before"] for r in stitches], s=14, marker="o",
                   facecolors="none", edgecolors="#b0b0b0", linewidths=0.8, zorder=1,
                   label="stitch before fine-tuning (LS init)")
    ax.scatter([r[cost] for r in stitches], [100 * r["acc_after"] for r in stitches], s=22, color="#4c72b0",
               alpha=0.85, zorder=3, label=f"stitch after fine-tuning ({len(stitches)})")
    ax.scatter([r[cost] for r in anchors], [100 * r["acc_after"] for r in anchors], s=90, marker="*",
               color="#dd8452", edgecolors="black", linewidths=0.6, zorder=5, label="anchor (single model)")
    for r in anchors:
        ax.annotate(r["id"], (r[cost], 100 * r["acc_after"]), xytext=(6, -12), textcoords="offset points",
                    fontsize=9, fontweight="bold", zorder=6)
    if front:
        xs = [r[cost] for r in front]
        ys = [100 * r["acc_after"] for r in front]
        ax.step(xs, ys, where="post", color="#c44e52", linewidth=1.8, zorder=4, label=f"Pareto front ({len(front)})")
        ax.scatter(xs, ys, s=36, facecolors="none", edgecolors="#c44e52", linewidths=1.4, zorder=4)
    if budget is not None:
        ax.axvline(budget, color="0.3", linestyle="--", linewidth=1.2, zorder=2,
                   label=f"budget {format_budget('latency' if cost == 'latency_ms' else 'gflops', budget)}")
    ax.set_xlabel(x_label)
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
    axis: str = "gflops",
    best_under: Sequence[str] = (),
    device: str | None = "cpu",
    root: Path | None = None,
    console: Console | None = None,
) -> ExportResult:
    """Compute and write the Pareto fronts of a trained run (accuracy after fine-tuning vs GFLOPs, and vs
    measured latency when ``klas train`` timed networks).

    * ``axis`` ("gflops" | "latency"): the front returned, printed and exported with ``models``.
    * ``models`` (False): also write every front model of ``axis`` as a standalone artifact
      (``models/<id>/``: ``model.safetensors`` + ``config.json``; load with :func:`klas.export.load_stitched`).
    * ``onnx`` (False): with ``models``, also ``model.onnx`` per model where torch's exporter manages
      (a failure is reported per model, it does not fail the export).
    * ``best_under`` (budgets such as ``"0.01"``, ``"12ms"``, ``"klas_vit_s:ms"``; :mod:`klas.export.best`):
      for each, the most accurate network under it, exported alone as ``best-under-<budget>/``. A budget
      below every network is refused, in one line naming the cheapest, before anything is written.
    * ``device`` ("cpu"): where models are rebuilt for export; ``root``: the klas cache root (demo
      weights); ``console``: where messages go.

    Returns an :class:`ExportResult` (``.table()`` renders the front, ``.best_lines()`` the picks).
    """
    from klas.train import read_results

    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    console = console or make_console(stderr=True)
    selection = read_selection(run_dir)
    if onnx and not models:
        raise KlasError("--onnx exports the front's models; pass --models too")
    if axis not in AXES:
        raise KlasError(f"unknown --axis {axis!r}; use one of {', '.join(AXES)}")
    if not (run_dir / RESULTS).is_file():
        what = "export models from" if models else "export a front of"
        raise KlasError(f"cannot {what} run {run_dir}: it is not trained yet (no {RESULTS}); run: klas train {run_dir}")
    rows = read_results(run_dir)
    if not rows:
        raise KlasError(f"{run_dir / RESULTS} is empty; rerun klas train {run_dir} --overwrite")
    train_info = _trained_on(run_dir, selection)
    fronts = {a: pareto_front(rows, cost=COST_KEYS[a]) for a in AXES}
    if not fronts["latency"]:
        del fronts["latency"]
        if axis == "latency":
            raise KlasError(f"run {run_dir} has no measured latency; train it with --latency front (or all), then export "
                            f"--axis latency")
    where = _latency_where(rows)
    picks = [(b, pick_best(rows, b, where if b.axis == "latency" else "")) for b in
             (resolve_budget(text, rows) for text in best_under)]
    result = ExportResult(run_dir, run_dir / EXPORT, fronts[axis], len(rows), axis=axis, fronts=fronts)
    wanted = [(r, f"models/{safe_name(r['id'])}") for r in fronts[axis]] if models else []
    wanted += [(r, f"best-under-{b.label}") for b, r in picks]
    with atomic_dir(run_dir / EXPORT, overwrite=True) as tmp:
        written, result.onnx = (_export_models(run_dir, selection, train_info, wanted, tmp, onnx, device, root or DEFAULT_ROOT,
                                               console) if wanted else ({}, {}))
        result.models = {r["id"]: d for r, d in wanted[:len(wanted) - len(picks)]}
        result.best = [{"budget": b.show(), "axis": b.axis, "row": r, "artifact": d}
                       for (b, r), (_, d) in zip(picks, wanted[len(wanted) - len(picks):])]
        for a, front in fronts.items():
            result.files += _write_front(run_dir, selection, train_info, rows, front, a, result.models if a == axis else {},
                                         result.onnx, tmp, where)
    result.files = [result.out_dir / p.name for p in result.files]
    result.seconds = time.perf_counter() - t0
    return result


def _latency_where(rows: list[dict]) -> str:
    """`` (measured, batch 1 on cpu)``: what a latency in this run's results means."""
    timed = [r for r in rows if is_finite(r.get("latency_ms"))]
    return f" (measured, batch {timed[0]['latency_batch']} on {timed[0]['latency_device']})" if timed else ""


def _write_front(run_dir: Path, selection: dict, train_info: dict, rows: list[dict], front: list[dict], axis: str,
                 artifacts: dict[str, str], onnx: dict[str, str], out: Path, where: str) -> list[Path]:
    """One axis' front as ``<name>.csv``, ``<name>.json``, ``<name>.png`` and ``<name>.svg`` (``FRONT_FILES``)."""
    name = FRONT_FILES[axis]
    front = [dict(r, artifact=artifacts.get(r["id"]), onnx=onnx.get(r["id"]) if r["id"] in artifacts else None)
             for r in front]
    _write_csv(out / f"{name}.csv", front)
    budget = selection_budget(selection)
    write_json_atomic(out / f"{name}.json", {
        "format": FRONT_FORMAT,
        "run": run_dir.name,
        "selection_sha256": selection_hash(selection),
        "budget": budget,
        "axis": axis, "cost": COST_KEYS[axis], "flops": FLOPS_CONVENTION,
        "latency": where.strip(" ()") or None,
        "accuracy": "acc_after: top-1 on the eval split after fine-tuning, a fraction in [0, 1]",
        "points": len(rows),
        "front": [{k: _json_safe(r.get(k)) for k in CSV_COLUMNS} for r in front],
        "train": {k: train_info.get(k) for k in ("config", "epochs_done")} if train_info else None,
    })
    line = budget["value"] if budget and budget["axis"] == axis else None
    label = X_LABEL if axis == "gflops" else f"latency, ms per forward pass{where}"
    title = f"{run_dir.name}: {len(front)} of {len(rows)} networks on the {'latency ' if axis == 'latency' else ''}Pareto front"
    plot_front(rows, front, out / name, title=title, budget=line, cost=COST_KEYS[axis], x_label=label)
    return [out / f"{name}.{ext}" for ext in ("csv", "json", "png", "svg")]


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


def _export_models(run_dir, selection, train_info, wanted, out_dir, onnx, device, root, console):
    """Rebuild the ``wanted`` networks (row, directory relative to ``out_dir``) from the cache + final
    checkpoint and save each one; ``models/index.json`` lists those under ``models/``."""
    import torch

    from klas.export.artifact import export_onnx, save_stitched
    from klas.train import trained_net

    done = train_info.get("epochs_done")
    trained = trained_net(run_dir, list(dict.fromkeys(r["id"] for r, _ in wanted)), epochs_done=done, root=root,
                          device=device)
    net, ckpt, cache, arch = trained.net, trained.checkpoint, trained.cache, trained.arch
    made_from = {"selection_sha256": selection_hash(selection), "cache_fingerprint": cache.fingerprint,
                 "train_config_sha256": sha256_json(ckpt["config"]), "seed": ckpt["config"].get("seed"),
                 "checkpoint_sha256": ckpt.get("weights_sha256")}
    data_config = cache.manifest["data"]["preprocess"]
    size = tuple(data_config["input_size"])
    artifacts, onnx_status = {}, {}
    for r, rel in wanted:
        rid = r["id"]
        info = {
            "id": rid, "route": r["route"], "data_config": data_config,
            "accuracy": {"top1": r["acc_after"], "top1_before_finetune": r.get("acc_before"), "split": "eval", "unit": "fraction"},
            "macs": r["macs"], "gflops": r["gflops"], "params_run": r["params"], "flops": FLOPS_CONVENTION,
            "latency": {"ms": _json_safe(r.get("latency_ms")), "predicted_ms": _json_safe(r.get("latency_pred_ms")),
                        "batch": r.get("latency_batch"), "device": r.get("latency_device")},
            "run": run_dir.name, "cache_fingerprint": cache.fingerprint, "full_tune": bool(ckpt["config"].get("full_tune")),
            "made_from": made_from,
        }
        model = net.model(rid)
        if r["kind"] == "stitch":
            s = net.specs[rid]
            save_stitched(model, out_dir / rel, src_arch=arch[s.src], dst_arch=arch[s.dst], info=info)
        else:
            save_stitched(model, out_dir / rel, src_arch=arch[rid], info=info)
        artifacts[rid] = rel
        if onnx and rel.startswith("models/"):
            try:
                export_onnx(model.cpu(), torch.zeros(1, *size), out_dir / rel / "model.onnx")
                onnx_status[rid] = "ok"
            except Exception as exc:
                onnx_status[rid] = f"failed: {exc}"
                console.print(f"[yellow]onnx export of {rid} failed[/]: {exc}")
    listed = [(r["id"], rel) for r, rel in wanted if rel.startswith("models/")]
    if listed:
        (out_dir / "models" / "index.json").write_text(json.dumps(
            {"format": "klas.models/1", "models": [{"id": k, "dir": v, "onnx": onnx_status.get(k)} for k, v in listed]},
            indent=2) + "\n")
    return artifacts, onnx_status
