"""The ``klas`` command line: a thin shell that parses, calls the library, and prints.

Every command maps to one library function; bad input raises :class:`klas.KlasError`, printed here as
one line on stderr with exit status 2, and so is every usage error click finds while parsing.

Importing this module must stay cheap (``klas --help`` answers at once): torch, timm and every stage
are imported inside the command bodies; constants come from torch-free modules (``klas.fs``,
``klas.units``). ``tests/test_cli.py`` checks that ``import klas.cli`` does not import torch.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from klas.config import DEFAULT_LATENCY_BATCH, CacheConfig, SearchConfig, format_budget, parse_batches, parse_budget
from klas.errors import KlasError
from klas.fs import DEFAULT_ROOT, DiskFull, format_bytes, is_disk_full
from klas.process import keep_freed_memory
from klas.term import make_console
from klas.units import FLOPS_CONVENTION, GFLOPS_NOTE, macs_to_gflops

try:  # typer >= 0.22 carries its own copy of click
    from typer._click import exceptions as click_errors
except ImportError:  # older typer runs on click itself
    from click import exceptions as click_errors

__all__ = ["app", "main"]

app = typer.Typer(
    name="klas",
    help=(
        "Find good stitched networks between pretrained vision models (KLAS). "
        "Pipeline: klas cache -> klas search -> klas train -> klas export pareto; klas tree -> klas export tree. " + GFLOPS_NOTE
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
export_app = typer.Typer(help="Export results of a trained run.", no_args_is_help=True)
app.add_typer(export_app, name="export")

out = make_console()
err = make_console(stderr=True)


@app.command()
def zoo(
    root: Path = typer.Option(DEFAULT_ROOT, help="Where klas keeps its files; weights go to ROOT/zoo."),
    force: bool = typer.Option(False, "--force", help="Retrain from scratch instead of installing the shipped weights (minutes); reports how far the retrained models land from the shipped ones."),
    model: Optional[List[str]] = typer.Option(None, "--model", "-m", help="Only these zoo models (repeatable), e.g. the quality benchmark's klas_vit_d4 / klas_vit_d8; default: the demo families."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads while training (the shipped weights were trained with 1)."),
    ship: bool = typer.Option(False, "--ship", help="Maintainers: write the trained models of ROOT/zoo into the package as the shipped weights."),
) -> None:
    """Install the demo model family's shipped weights (verified by sha256, seconds), or train it on CPU (--force)."""
    from klas.zoo import ship_zoo, train_zoo

    info = train_zoo(root=root, names=model or None, force=force, console=err, threads=threads)
    if ship:
        shipped = ship_zoo(root=root, names=model or None)
        err.print(f"shipped: {', '.join(shipped)} (klas/zoo/shipped/)")
    table = Table(title=f"demo model family ({root / 'zoo'})", caption=FLOPS_CONVENTION)
    for col in ("model", "family", "params", "GFLOPs", "eval top-1", "weights", "train s"):
        table.add_column(col, justify="left" if col in ("model", "family", "weights") else "right")
    for name, row in info.items():
        source = row.get("source", "trained")
        if "vs_shipped" in row:
            source += f" ({100 * row['vs_shipped']['eval_delta']:+.2f} vs shipped)"
        table.add_row(
            name, row.get("family", ""), f"{row['params'] / 1e6:.2f}M", f"{row['macs'] / 1e9:.4f}",
            f"{100 * row['eval_acc']:.2f}%", source, f"{row['seconds']:.0f}",
        )
    out.print(table)


_CACHE = CacheConfig()  # every default of klas cache
_SEARCH = SearchConfig()  # every default of klas search


def _batches_text(batches) -> str:
    return ",".join(map(str, batches)) or "off"


@app.command()
def cache(
    model: Optional[List[str]] = typer.Option(None, "--model", "-m", help="timm name (pretrained), NAME=weights.safetensors|.pth, or a demo model (klas_vit_ti, ...); ALIAS:NAME[=weights] names it ALIAS (one architecture twice). Repeat for k models."),
    data: Optional[str] = typer.Option(None, "--data", help="An ImageFolder directory (one sub-folder per class) or a built-in digits set: 'digits' (the demo's), 'digits-hard'."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Cache directory (default: cache/<models joined by +>); new, empty or a klas cache. Alone (no --model, --data): add this device's latency profile to that cache."),
    split: str = typer.Option(",".join(_CACHE.split_list), help="Comma-separated splits to cache."),
    limit: Optional[int] = typer.Option(_CACHE.limit, help="Keep at most N images per split."),
    random_init: bool = typer.Option(_CACHE.random_init, "--random-init", help="Untrained, seeded weights (no download)."),
    batch_size: int = typer.Option(_CACHE.batch_size, "--batch-size"),
    workers: str = typer.Option(str(_CACHE.workers), "--workers", help="DataLoader worker processes: auto (min(8, CPUs) on CUDA, 0 on CPU) or a number."),
    device: str = typer.Option("auto", help="auto (CUDA when available), cpu, cuda, cuda:N."),
    amp: str = typer.Option(_CACHE.amp, help="Mixed precision: off, auto (CUDA: bf16 where supported, else fp16; CPU: off), bf16, fp16 (on CPU too, through torch's CPU autocast)."),
    input_size: Optional[int] = typer.Option(None, "--input-size", help="One image size (square) for all models; ViTs, Eva and Swin are resized to it (position embeddings resampled)."),
    latency_batch: str = typer.Option(_batches_text(_CACHE.latency_batch), "--latency-batch", help="Batch sizes of this device's per-block latency profile (stem, blocks, head, every stitch module shape; median of repeats), for klas search --budget-ms and the latency front; off: none."),
    overwrite: bool = typer.Option(_CACHE.overwrite, "--overwrite", help="Replace a klas cache of another configuration (never a directory klas did not create)."),
    verify: bool = typer.Option(_CACHE.verify, "--verify", help="Check every file of a finished cache by sha256; alone with --out, only check."),
    seed: int = typer.Option(_CACHE.seed, help="Seed of the split assignment."),
    root: Path = typer.Option(_CACHE.root, help="Where klas keeps generated data and demo weights."),
) -> None:
    """Run k models once over the calibration images; store per-block pooled features and logits, and this
    device's per-block latency profile."""
    from klas.cache import build_cache, check_cache, measure_cache_latency

    batches = parse_batches(latency_batch)
    if verify and not model and data is None:
        if out_dir is None:
            raise KlasError("--verify alone checks an existing cache: pass --out CACHE_DIR")
        return _print_cache(check_cache(out_dir))
    if not model and data is None and out_dir is not None:
        return _print_cache(measure_cache_latency(out_dir, CacheConfig(latency_batch=batches, device=device, root=root),
                                                  console=err))
    if data is None:
        raise KlasError("no data given; pass --data DIR (an ImageFolder directory) or --data digits")
    model = model or []
    target = out_dir or root / "+".join(m.split("=")[0].split(":")[0] for m in model)  # names: alias or arch
    config = CacheConfig(
        splits=tuple(s.strip() for s in split.split(",") if s.strip()), limit=limit, random_init=random_init,
        batch_size=batch_size, workers=workers, device=device, amp=amp,
        preprocess={"input_size": [3, input_size, input_size]} if input_size is not None else None,
        latency_batch=batches, overwrite=overwrite, verify=verify, seed=seed, root=root,
    )
    summary = build_cache(model, data, target, config, console=err, on_loaded=_print_compatibility)
    if summary.status != "shard":
        _print_cache(summary)


def _print_compatibility(profiles) -> None:
    """The pre-flight stitch compatibility report (to stderr), for two or more models."""
    from klas.stitch.report import compatibility_report, report_table

    if len(profiles) > 1:
        err.print(report_table(compatibility_report(profiles)))


def _print_cache(summary) -> None:
    """The per-model table of a cache (and the throughput when images were computed)."""
    table = Table(title=f"cache {summary.path} ({summary.status})", caption=FLOPS_CONVENTION)
    for col in ("model", "blocks", "GFLOPs", "images", "written"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for row in summary.rows:
        table.add_row(row["model"], str(row["blocks"]), f"{row['gflops']:.4f}", str(row["images"]), format_bytes(row["bytes"]))
    out.print(table)
    if summary.images:
        out.print(f"{summary.images} images through {len(summary.rows)} models in {summary.seconds:.1f} s")
    for p in summary.latency:
        out.print(f"latency profile: batch {p['batch']} on {p['device']}, measured in {p['seconds']:.1f} s "
                  f"({summary.path / 'latency.json'})")


def _gflops(macs: float) -> str:
    return f"{macs_to_gflops(macs):.4f}"


@app.command("search")
def search_cmd(
    cache_dir: Path = typer.Argument(..., help="A cache directory written by klas cache."),
    budget: Optional[float] = typer.Option(_SEARCH.budget, "--budget", help="Keep stitches costing at most this many GFLOPs (fvcore: 1 multiply-add = 1 FLOP)."),
    budget_ms: Optional[float] = typer.Option(_SEARCH.budget_ms, "--budget-ms", help="Keep stitches whose latency on this device, predicted from the cache's latency profile, is at most this many ms per batch of --latency-batch images; the buckets then split predicted latency."),
    latency_batch: int = typer.Option(_SEARCH.latency_batch, "--latency-batch", help="The batch size --budget-ms is for (one the cache profiled)."),
    strategy: str = typer.Option(_SEARCH.strategy, help="klas (KL probes, the default), snnet (SN-Net's fixed pairs), random, or cka."),
    buckets: int = typer.Option(_SEARCH.buckets, help="Equal-width cost buckets between the cheapest candidate and the largest anchor (GFLOPs, or ms with --budget-ms)."),
    tau: float = typer.Option(_SEARCH.tau, help="Also keep stitches within (1+tau) of a bucket's best score; in [0, 1)."),
    direction: str = typer.Option(_SEARCH.direction, help="up: cheaper model -> more expensive one; both: every ordered pair."),
    probe_target: str = typer.Option(_SEARCH.probe_target, "--probe-target", help="labels (cross-entropy) or model (the model's own softmax: label-free)."),
    temperature: float = typer.Option(_SEARCH.temperature, help="Softmax temperature T of the probe distributions."),
    probe_epochs: int = typer.Option(_SEARCH.probe_epochs, "--probe-epochs"),
    score: str = typer.Option(_SEARCH.score, help="What klas ranks by: gamma (Θ/Σ, the paper's) or theta (Θ alone); klas search prints the score it used."),
    run: Optional[Path] = typer.Option(None, "--run", help="Run directory (default: cache/runs/<cache>-<strategy>)."),
    seed: int = typer.Option(_SEARCH.seed),
    device: str = typer.Option("auto", help="auto (CUDA when available), cpu, cuda, cuda:N."),
    overwrite: bool = typer.Option(_SEARCH.overwrite, "--overwrite", help="Replace a run made with other inputs."),
    as_json: bool = typer.Option(False, "--json", help="Print the selection as JSON on stdout (tables go to stderr)."),
) -> None:
    """Train per-block probes, score every binary stitch by KL, and select the ones worth training."""
    from klas.search import search

    config = SearchConfig(
        budget=budget, budget_ms=budget_ms, latency_batch=latency_batch, strategy=strategy, buckets=buckets, tau=tau,
        direction=direction, probe_target=probe_target, temperature=temperature, probe_epochs=probe_epochs,
        score=score, seed=seed, device=device, overwrite=overwrite,
    )
    result = search(cache_dir, run, config, console=err)
    show = err if as_json else out
    if probe_target == "labels":
        show.print(_probe_table(result.probe_accuracy))
    if result.anchor_pairs:
        pairs = Table(title="anchor pairs: KL(final softmax a || b) on the score split")
        for col in ("from", "to", "KL"):
            pairs.add_column(col, justify="right" if col == "KL" else "left")
        for p in result.anchor_pairs:
            pairs.add_row(p["src"], p["dst"], f"{p['kl']:.4f}")
        show.print(pairs)
    show.print(_selection_table(result, config))
    show.print(f"run directory: {result.run_dir}  (next: klas train {result.run_dir})  [{result.seconds:.1f} s]")
    if as_json:
        print(json.dumps(result.selection, indent=2))


def _selection_table(result, config: SearchConfig) -> Table:
    """The selected stitches and anchors, cheapest first (with the predicted ms under a latency budget)."""
    sel, latency = result.selection, config.axis == "latency"
    budget = sel.get("budget")
    title = (f"{len(sel['stitches'])} of {sel['num_candidates']} stitches selected by {config.strategy}"
             + (f" under {format_budget(budget['axis'], budget['value'])}" if budget else "")
             + (f" (predicted, batch {budget['batch']})" if latency else ""))
    table = Table(title=title, caption=f"{FLOPS_CONVENTION}. Γ = Θ(a_i, b_j) / Θ(b_j, b_j+1), lower is better."
                  + (" Selected by Θ alone (--score theta)." if config.score == "theta" else "")
                  + (" ms: predicted from the cache's latency profile on this device." if latency else ""))
    for col in ("route", "GFLOPs", *(("ms",) if latency else ()), "params", "Θ", "Γ", "bucket"):
        table.add_column(col, justify="left" if col == "route" else "right")
    for r in result.selected:
        anchor = r["kind"] == "anchor"
        table.add_row(
            f"[bold]{r['route']}[/] (anchor)" if anchor else r["route"], _gflops(r["macs"]),
            *((f"{r['latency_ms']:.2f}",) if latency else ()),
            f"{r['params'] / 1e6:.2f}M", "" if anchor else f"{r['theta']:.4f}", "" if anchor else f"{r['gamma']:.3f}",
            "" if anchor else str(r["bucket"]),
        )
    return table


def _probe_table(acc: dict[str, list[float]]) -> Table:
    width = max(len(v) for v in acc.values())
    table = Table(title="probe top-1 (%) on the score split, by representation (0 = stem, r = after block r-1)")
    table.add_column("model")
    for r in range(width):
        table.add_column(str(r), justify="right")
    for name, row in acc.items():
        table.add_row(name, *[f"{100 * a:.0f}" for a in row], *[""] * (width - len(row)))
    return table


@app.command("train")
def train_cmd(
    run_dir: Path = typer.Argument(..., help="A run directory written by klas search."),
    epochs: int = typer.Option(5, help="Passes over the probe-train split."),
    steps_per_epoch: Optional[int] = typer.Option(None, "--steps-per-epoch", help="Default: one pass over the split."),
    batch_size: int = typer.Option(64, "--batch-size"),
    lr: float = typer.Option(3e-3, help="AdamW learning rate of the stitch layers; anchors get 0.1x (cosine schedule, warm-up)."),
    weight_decay: float = typer.Option(0.05, "--weight-decay"),
    loss: str = typer.Option("ce", help="ce (labels), distill (KL to the teacher's logits), ffm (final feature matching), lfm (match the target's own representation at the stitch point); combine as ce=1,distill=1."),
    teacher: str = typer.Option("target", help="Whose logits distill matches: target (each network's own target model) or largest (the largest anchor, as SN-Net)."),
    first_loss: str = typer.Option("ffm", "--first-loss", help="The first stage's loss (same spelling as --loss), used for --first-epochs."),
    first_epochs: int = typer.Option(0, "--first-epochs", help="Two stages (Mai et al.): the first N epochs train with --first-loss, then --loss."),
    sampling: str = typer.Option("uniform", help="uniform over networks, or bucket: a FLOPs bucket first (SN-Netv2)."),
    full_tune: bool = typer.Option(True, "--full-tune/--frozen", help="Train the anchors too, at 0.1x the learning rate (SN-Net); --frozen: stitch layers only."),
    anchor_routes: Optional[bool] = typer.Option(None, "--anchor-routes/--no-anchor-routes", help="Sample the anchors as networks too (SN-Net); default: on with --full-tune."),
    layer: Optional[str] = typer.Option(None, help="Stitch layer: linear, mlp or lora (default: what the search costed, linear)."),
    init: str = typer.Option("ls", help="ls: least squares on probe-train activations; random."),
    init_images: int = typer.Option(100, "--init-images", help="Probe-train images for the least-squares init."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint exactly."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Discard earlier training of this run."),
    amp: str = typer.Option("auto", help="auto (bf16 on CUDA, off on CPU), bf16, fp16 (on CPU too, through torch's CPU autocast), off."),
    latency: str = typer.Option("front", "--latency", help="Which networks to time on this device: front (the anchors and the networks on the GFLOPs front or the predicted-latency front), all, off. Predicted ms (the cache's latency profile) are recorded for all."),
    latency_batch: int = typer.Option(DEFAULT_LATENCY_BATCH, "--latency-batch", help="Images per timed forward pass."),
    device: str = typer.Option("auto", help="auto (CUDA when available), cpu, cuda, cuda:N."),
    seed: int = typer.Option(0),
    root: Path = typer.Option(DEFAULT_ROOT, help="Where klas keeps generated data and demo weights."),
) -> None:
    """Build the selected stitches, fine-tune them jointly (SN-Net style) and evaluate every one."""
    from klas.train import TrainConfig, train_run

    config = TrainConfig(
        epochs=epochs, steps_per_epoch=steps_per_epoch, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
        loss=loss, teacher=teacher, first_loss=first_loss, first_epochs=first_epochs, sampling=sampling, full_tune=full_tune,
        anchor_routes=anchor_routes, layer=layer, init=init, init_images=init_images, resume=resume,
        overwrite=overwrite, amp=amp, latency=latency, latency_batch=latency_batch, device=device, seed=seed, root=root,
    )
    result = train_run(run_dir, config, console=err)
    out.print(result.table())
    if result.complete:
        out.print(result.phase_table())
    out.print(f"results: {result.run_dir / 'results.parquet'}  (next: klas export pareto {result.run_dir})  "
              f"[{result.seconds:.0f} s]")


@export_app.command("pareto")
def export_pareto_cmd(
    run_dir: Path = typer.Argument(..., help="A run directory trained by klas train."),
    models: bool = typer.Option(False, "--models", help="Write every front model (of --axis) as a standalone artifact (safetensors + config.json)."),
    onnx: bool = typer.Option(False, "--onnx", help="With --models, also write ONNX where torch can export it."),
    axis: str = typer.Option("gflops", "--axis", help="The front to print and export with --models: gflops, or latency (measured by klas train). Both fronts' files and pictures are written."),
    best_under: Optional[List[str]] = typer.Option(None, "--best-under", help="Print and export (export/best-under-BUDGET/) the most accurate network under a budget: GFLOPs (0.01), ms (12ms, measured latency), or an anchor's cost (klas_vit_s:ms, klas_vit_s:gflops). Repeatable."),
    root: Path = typer.Option(DEFAULT_ROOT, help="Where klas keeps demo weights."),
) -> None:
    """The accuracy Pareto fronts over GFLOPs and measured latency: tables, front*.csv/json/png/svg, deployable models."""
    from klas.export import export_pareto

    result = export_pareto(run_dir, models=models, onnx=onnx, axis=axis, best_under=best_under or (), root=root,
                           console=err)
    out.print(result.table())
    name = "front-latency" if axis == "latency" else "front"
    out.print(f"picture: {result.out_dir / (name + '.png')}  table: {result.out_dir / (name + '.csv')}"
              + ("" if "latency" not in result.fronts or axis == "latency"
                 else f"  latency front: {result.out_dir / 'front-latency.png'}"))
    for line in result.best_lines():
        out.print(line, soft_wrap=True, highlight=False)


@app.command("tree")
def tree_cmd(
    cache_dir: Path = typer.Argument(..., help="A cache directory written by klas cache (two or more models)."),
    models: str = typer.Option("all", "--models", help="The models the tree joins, m1,m2,... (two or more) or all (every cached model)."),
    gain_only: bool = typer.Option(False, "--gain-only", help="Train no tree: print the floor, ceiling and gain of every pair of the models (and of all of them)."),
    trunk: Optional[str] = typer.Option(None, "--trunk", help="The model whose early blocks run once (default: chosen by --trunk-rule)."),
    trunk_rule: str = typer.Option("score", "--trunk-rule", help="Without --trunk: score (the best-scored model) or floor (the best single model, kept whole)."),
    share_at: str = typer.Option("auto", "--share-at", help="Share points (trunk block boundaries) s1,s2,... or auto (the best-scored per cost range)."),
    points: int = typer.Option(3, "--points", help="How many share points auto picks."),
    match: str = typer.Option("relative", help="Where branches join: relative (same relative depth) or score (lowest stitch score Γ)."),
    layer: str = typer.Option("linear", help="Stitch layer: linear, mlp or lora."),
    epochs: int = typer.Option(2, help="Epochs of final-feature matching (ffm, label-free; Mai et al.)."),
    task_epochs: int = typer.Option(0, "--task-epochs", help="Epochs of the task loss (ce) after ffm."),
    steps_per_epoch: Optional[int] = typer.Option(None, "--steps-per-epoch", help="Default: one pass over probe-train."),
    batch_size: int = typer.Option(64, "--batch-size"),
    lr: float = typer.Option(3e-3, help="AdamW learning rate of the stitch layers (warm-up, cosine)."),
    branch_lr_scale: float = typer.Option(0.0, "--branch-lr-scale", help="0: models frozen, only the stitch layers train (Mai et al.); e.g. 0.1: each branch's own blocks and head train too, at this x --lr."),
    init_images: int = typer.Option(100, "--init-images", help="Probe-train images for the least-squares init."),
    probe_epochs: int = typer.Option(10, "--probe-epochs", help="Epochs of the per-block probes and of the linear classifiers."),
    run: Optional[Path] = typer.Option(None, "--run", help="Run directory (default: cache/runs/<cache>-tree)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run exactly."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Discard earlier output of this run."),
    latency: bool = typer.Option(True, "--latency/--no-latency", help="Measure the latency of every system."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch intra-op threads (default: torch's choice)."),
    device: str = typer.Option("auto", help="auto (CUDA when available), cpu, cuda, cuda:N."),
    seed: int = typer.Option(0),
    root: Path = typer.Option(DEFAULT_ROOT, help="Where klas keeps generated data and demo weights."),
) -> None:
    """Stitch Tree: one trunk run once, a branch per model; choose, train and evaluate a sweep of share points."""
    from klas.tree import TreeConfig, parse_models, parse_share_at, subset_gains, tree_run

    config = TreeConfig(
        models=parse_models(models), trunk=trunk, trunk_rule=trunk_rule, share_at=parse_share_at(share_at), points=points, match=match, layer=layer, epochs=epochs,
        task_epochs=task_epochs, steps_per_epoch=steps_per_epoch, batch_size=batch_size, lr=lr,
        branch_lr_scale=branch_lr_scale, init_images=init_images,
        probe_epochs=probe_epochs, resume=resume, overwrite=overwrite, latency=latency, device=device, seed=seed, root=root,
    )
    if gain_only:
        with _threads(threads):
            gains = subset_gains(cache_dir, config, console=err)
        out.print(gains.table())
        return
    with _threads(threads):
        result = tree_run(cache_dir, run, config, console=err)
    if result.complete:
        out.print(result.table())
        out.print(f"run directory: {result.run_dir}  (next: klas export tree {result.run_dir})  [{result.seconds:.0f} s]")


class _threads:
    """``--threads N``: torch's intra-op threads inside the block, restored after."""

    def __init__(self, n: Optional[int]) -> None:
        if n is not None and n < 1:
            raise KlasError(f"--threads must be a positive integer, got {n}")
        self.n, self.old = n, None

    def __enter__(self) -> None:
        if self.n is not None:
            import torch

            self.old = torch.get_num_threads()
            torch.set_num_threads(self.n)

    def __exit__(self, *exc) -> None:
        if self.old is not None:
            import torch

            torch.set_num_threads(self.old)


@export_app.command("tree")
def export_tree_cmd(
    run_dir: Path = typer.Argument(..., help="A run directory written by klas tree."),
    root: Path = typer.Option(DEFAULT_ROOT, help="Where klas keeps demo weights."),
) -> None:
    """A Stitch Tree sweep's trade-off table, tradeoff.csv/json/png/svg and deployable trees (klas.load_tree)."""
    from klas.export import export_tree

    result = export_tree(run_dir, root=root, console=err)
    out.print(result.table())
    out.print(f"picture: {result.out_dir / 'tradeoff.png'}  table: {result.out_dir / 'tradeoff.csv'}  "
              f"trees: {', '.join(str(result.out_dir / a) for a in result.artifacts.values())}")


def _command_path(argv: list[str]) -> str:
    """``klas`` plus the (sub)command names that lead ``argv``: where its ``--help`` is."""
    cmd, path = typer.main.get_command(app), ["klas"]
    for word in argv:
        sub = getattr(cmd, "commands", {}).get(word)
        if sub is None:
            break
        cmd, path = sub, [*path, word]
    return " ".join(path)


def _usage_error(exc: click_errors.UsageError, argv: list[str]) -> str:
    """click's message as one line, with where to look: ``<message>; see klas COMMAND --help``."""
    message = " ".join(exc.format_message().split()).rstrip(".")
    where = exc.ctx.command_path if exc.ctx is not None else _command_path(argv)
    return f"{message}; see {where} --help"


def _fail(message: str) -> None:
    """``error: <message>`` as one line on stderr (no markup read from the message), exit status 2."""
    from rich.markup import escape

    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(KlasError.exit_code)


def _continue_hint(argv: list[str]) -> str:
    """How to finish a command that stopped part-way (Ctrl-C, a full disk): klas train and klas tree
    continue from their checkpoints with --resume (never with --overwrite, which starts over); klas cache
    continues by itself; the other stages simply run again."""
    command = next((a for a in argv if not a.startswith("-")), "")
    if command in ("train", "tree"):
        how = "in place of --overwrite" if "--overwrite" in argv else "added"
        return f"re-run the same command with --resume {how} to continue"
    if command == "cache":
        return "re-run the same command to continue where it stopped"
    return "re-run the same command"


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: KlasError and usage errors -> one line on stderr, exit 2; a full disk
    (:class:`klas.fs.DiskFull`, or an ENOSPC no klas writer caught) too, with how to continue."""
    args = sys.argv[1:] if argv is None else argv
    keep_freed_memory()  # klas/process.py: 224-px batches no longer page-fault on every forward pass
    try:
        rc = app(args=argv, prog_name="klas", standalone_mode=False)
    except getattr(click_errors, "NoArgsIsHelpError", ()) as exc:  # bare ``klas``, ``klas export``: help, exit 0
        typer.echo(exc.ctx.get_help())
        rc = 0
    except click_errors.UsageError as exc:  # a bad value, an unknown option, a missing argument
        _fail(_usage_error(exc, args))
    except click_errors.ClickException as exc:
        _fail(" ".join(exc.format_message().split()))
    except DiskFull as exc:
        _fail(str(exc.with_fix(f"free some space there, then {_continue_hint(args)}")))
    except KlasError as exc:
        _fail(str(exc))
    except OSError as exc:  # a write outside klas's atomic writers (a directory, a plot)
        if not is_disk_full(exc):
            raise
        _fail(str(DiskFull(exc.filename or "the output", "more space", f"free some space there, then {_continue_hint(args)}")))
    except (KeyboardInterrupt, typer.Abort, click_errors.Abort if hasattr(click_errors, "Abort") else typer.Abort):
        rc = 130
    if rc == 130:  # Ctrl-C (typer turns it into exit status 130)
        err.print(f"[yellow]interrupted[/]: finished work is kept; {_continue_hint(args)}", soft_wrap=True)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
