"""The ``klas`` command line: a thin shell that parses, calls the library, and prints.

Every command maps to one library function; bad input raises :class:`klas.KlasError`, printed here as
one line on stderr with exit status 2.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from klas.errors import KlasError
from klas.utils import DEFAULT_ROOT, FLOPS_CONVENTION

GFLOPS_NOTE = "GFLOPs follow the fvcore convention of the stitching literature: one multiply-add = one FLOP."

app = typer.Typer(
    name="klas",
    help=(
        "Find good stitched networks between pretrained vision models (KLAS). "
        "Pipeline: klas cache -> klas search -> klas train -> klas export pareto. " + GFLOPS_NOTE
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
export_app = typer.Typer(help="Export results of a trained run.", no_args_is_help=True)
app.add_typer(export_app, name="export")

out = Console()
err = Console(stderr=True)


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@app.command()
def zoo(
    root: Path = typer.Option(DEFAULT_ROOT, help="Where klas keeps its files; weights go to ROOT/zoo."),
    force: bool = typer.Option(False, "--force", help="Retrain even when weights exist."),
) -> None:
    """Train (or reuse) the demo model family on the built-in digits data, on CPU."""
    from klas.zoo import train_zoo

    info = train_zoo(root=root, force=force, console=err)
    table = Table(title=f"demo model family ({root / 'zoo'})", caption=FLOPS_CONVENTION)
    for col in ("model", "family", "params", "GFLOPs", "eval top-1", "train s"):
        table.add_column(col, justify="left" if col in ("model", "family") else "right")
    for name, row in info.items():
        table.add_row(
            name, row.get("family", ""), f"{row['params'] / 1e6:.2f}M", f"{row['macs'] / 1e9:.4f}",
            f"{100 * row['eval_acc']:.2f}%", f"{row['seconds']:.0f}",
        )
    out.print(table)


@app.command()
def cache(
    model: List[str] = typer.Option(..., "--model", "-m", help="timm name (pretrained), NAME=weights.safetensors|.pth, or a demo model (klas_vit_ti, ...). Repeat for k models."),
    data: str = typer.Option(..., "--data", help="An ImageFolder directory (one sub-folder per class) or 'digits'."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Cache directory [default: cache/<models joined by +>]."),
    split: str = typer.Option("probe-train,score,eval", help="Comma-separated splits to cache."),
    limit: Optional[int] = typer.Option(None, help="Keep at most N images per split."),
    random_init: bool = typer.Option(False, "--random-init", help="Untrained, seeded weights (no download)."),
    batch_size: int = typer.Option(64, "--batch-size"),
    workers: int = typer.Option(0, "--workers", help="DataLoader worker processes."),
    device: str = typer.Option("auto", help="auto (CUDA when available), cpu, cuda, cuda:N."),
    amp: Optional[str] = typer.Option(None, help="Mixed precision on CUDA: bf16 or fp16."),
    input_size: Optional[int] = typer.Option(None, "--input-size", help="Override the shared preprocessing's image size (square)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a cache of another configuration."),
    seed: int = typer.Option(0, help="Seed of the split assignment."),
    root: Path = typer.Option(DEFAULT_ROOT, help="Where klas keeps generated data and demo weights."),
) -> None:
    """Run k models once over the calibration images; store per-block pooled features and logits."""
    from klas.cache import build_cache

    target = out_dir or root / "+".join(m.split("=")[0] for m in model)
    pre = {"input_size": [3, input_size, input_size]} if input_size else None
    summary = build_cache(
        model, data, target, splits=[s.strip() for s in split.split(",") if s.strip()], limit=limit,
        random_init=random_init, batch_size=batch_size, workers=workers, device=device, amp=amp,
        overwrite=overwrite, seed=seed, root=root, preprocess=pre, console=err,
    )
    if summary.status == "shard":
        return
    table = Table(title=f"cache {summary.path} ({summary.status})", caption=FLOPS_CONVENTION)
    for col in ("model", "blocks", "GFLOPs", "images", "written"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for row in summary.rows:
        table.add_row(row["model"], str(row["blocks"]), f"{row['gflops']:.4f}", str(row["images"]), _bytes(row["bytes"]))
    out.print(table)
    if summary.images:
        out.print(f"{summary.images} images through {len(summary.rows)} models in {summary.seconds:.1f} s")


def main() -> None:
    """Console-script entry point: KlasError -> one line on stderr, exit 2."""
    try:
        app()
    except KlasError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(KlasError.exit_code)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]: finished work is kept; re-run the same command to continue")
        sys.exit(130)


if __name__ == "__main__":
    main()
