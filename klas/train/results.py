"""``results.parquet``: one row per selected stitch and per anchor, written atomically."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from klas.errors import KlasError
from klas.fs import atomic_path
from klas.run import RESULTS

__all__ = ["RESULTS", "SCHEMA", "write_results", "read_results", "results_metadata", "results_selection"]

#: Column order and types (nullable where a value does not apply: anchors have no dst/dst_cut/theta/gamma).
SCHEMA = pa.schema([
    ("id", pa.string()),
    ("kind", pa.string()),  # "stitch" | "anchor"
    ("route", pa.string()),
    ("src", pa.string()),
    ("src_cut", pa.int64()),
    ("dst", pa.string()),
    ("dst_cut", pa.int64()),
    ("layer", pa.string()),  # stitch layer kind; null for anchors
    ("macs", pa.int64()),
    ("gflops", pa.float64()),  # macs / 1e9 (fvcore: one multiply-add = one FLOP)
    ("params", pa.int64()),
    ("acc_before", pa.float64()),  # top-1 (fraction) on the eval split after least-squares init, before fine-tuning
    ("acc_after", pa.float64()),  # top-1 (fraction) on the eval split after fine-tuning
    ("init_r2", pa.float64()),  # variance of the target representation explained by the LS fit
    ("latency_ms", pa.float64()),  # measured: median ms per forward pass of latency_batch images (NaN: not timed)
    ("latency_pred_ms", pa.float64()),  # predicted from the cache's latency profile (NaN: no profile for this device)
    ("latency_batch", pa.int64()),
    ("latency_device", pa.string()),
    ("bucket", pa.int64()),
    ("theta", pa.float64()),
    ("gamma", pa.float64()),
])


def write_results(run_dir: Path, rows: list[dict], metadata: dict[str, str] | None = None) -> Path:
    """Write ``rows`` to ``run_dir/results.parquet`` (atomically: readers see the old file or the whole new one)."""
    path = Path(run_dir) / RESULTS
    table = pa.Table.from_pylist([{k: r.get(k) for k in SCHEMA.names} for r in rows], schema=SCHEMA)
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **{k: str(v) for k, v in metadata.items()}})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def read_results(run_dir: Path) -> list[dict]:
    """Rows of ``run_dir/results.parquet``; a KlasError when the run has not been trained."""
    path = Path(run_dir) / RESULTS
    if not path.is_file():
        raise KlasError(f"run {run_dir} has no {RESULTS} (not trained yet); run: klas train {run_dir}")
    try:
        return pq.read_table(path).to_pylist()
    except Exception as exc:
        raise KlasError(f"{path} is unreadable ({exc.__class__.__name__}); rerun klas train {run_dir} --overwrite") from exc


def results_metadata(run_dir: Path) -> dict[str, str]:
    """The ``klas.*`` metadata of ``results.parquet``: what the results were made from (the config hash,
    selection hash, cache fingerprint and the final checkpoint's weights hash; older runs lack some)."""
    path = Path(run_dir) / RESULTS
    try:
        meta = pq.read_schema(path).metadata or {}
    except Exception as exc:
        raise KlasError(f"{path} is unreadable ({exc.__class__.__name__}); rerun klas train {run_dir} --overwrite") from exc
    return {k.decode(): v.decode() for k, v in meta.items() if k.startswith(b"klas.")}


def results_selection(run_dir: Path) -> str | None:
    """The selection hash ``results.parquet`` records (``klas.selection_sha256``), or None when it has none."""
    return results_metadata(run_dir).get("klas.selection_sha256")
