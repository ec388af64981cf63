"""Why the cache stores .npy memmaps and not Arrow IPC: read and write cost of both, in one run.

A cache matrix is (N, F) float16. The search reads it whole (probes) or in row chunks (scoring);
the writer appends row batches. We time, for both formats: writing in row batches, a zero-copy
memory-mapped open plus a full read (sum), and a read of one representation's columns.

    python benchmarks/bench_storage.py [--rows 20000 --cols 1536]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).parent / "results" / "storage.json"


def _time(fn, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--cols", type=int, default=1536)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    data = rng.standard_normal((args.rows, args.cols)).astype(np.float16)
    cols = slice(args.cols // 3, args.cols // 3 + 128)
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        npy, arrow = Path(tmp) / "f.npy", Path(tmp) / "f.arrow"

        def write_npy():
            mm = np.lib.format.open_memmap(npy, "w+", np.float16, data.shape)
            for s in range(0, args.rows, args.batch):
                mm[s : s + args.batch] = data[s : s + args.batch]
            mm.flush()

        schema = pa.schema([("f", pa.list_(pa.float16(), args.cols))])

        def write_arrow():
            with pa.OSFile(str(arrow), "wb") as sink, pa.ipc.new_file(sink, schema) as w:
                for s in range(0, args.rows, args.batch):
                    chunk = data[s : s + args.batch]
                    arr = pa.FixedSizeListArray.from_arrays(pa.array(chunk.reshape(-1)), args.cols)
                    w.write_batch(pa.record_batch([arr], schema=schema))

        def read_npy():
            return float(np.load(npy, mmap_mode="r").sum(dtype=np.float32))

        def read_arrow():
            with pa.memory_map(str(arrow)) as src:
                table = pa.ipc.open_file(src).read_all()
                col = table.column("f").combine_chunks()
                return float(col.values.to_numpy(zero_copy_only=True).reshape(-1, args.cols).sum(dtype=np.float32))

        def cols_npy():
            return float(np.load(npy, mmap_mode="r")[:, cols].sum(dtype=np.float32))

        def cols_arrow():
            with pa.memory_map(str(arrow)) as src:
                table = pa.ipc.open_file(src).read_all()
                col = table.column("f").combine_chunks()
                return float(col.values.to_numpy(zero_copy_only=True).reshape(-1, args.cols)[:, cols].sum(dtype=np.float32))

        res["write_npy_s"], res["write_arrow_s"] = _time(write_npy, 3), _time(write_arrow, 3)
        assert abs(read_npy() - read_arrow()) < 1e-3 * abs(read_npy()) + 1
        res["read_npy_s"], res["read_arrow_s"] = _time(read_npy), _time(read_arrow)
        res["cols_npy_s"], res["cols_arrow_s"] = _time(cols_npy), _time(cols_arrow)
    res.update(rows=args.rows, cols=args.cols, batch=args.batch, command="python " + " ".join(sys.argv))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=2) + "\n")
    table = Table(title=f"(N={args.rows}, F={args.cols}) float16, row batches of {args.batch}; best of runs, seconds")
    for c in ("operation", ".npy memmap", "Arrow IPC (mmap)", "npy / arrow"):
        table.add_column(c, justify="right")
    for op in ("write", "read", "cols"):
        a, b = res[f"{op}_npy_s"], res[f"{op}_arrow_s"]
        table.add_row({"write": "write in row batches", "read": "open + full read", "cols": "open + 128 columns"}[op],
                      f"{a:.4f}", f"{b:.4f}", f"{a / b:.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()
