"""Benchmark the batched KL scorer (klas.score.kl_matrix) on synthetic probe logits.

    python benchmarks/bench_scorer.py [--quick] [--device auto|cpu|cuda]

For P = k*(n+1) probes (k models of n blocks plus the stem), N score samples and C classes:

(a) speed-up of the batched scorer over the straightforward per-pair loop (kl_matrix_naive). The
    loop is timed on a subset of pairs and extrapolated: log-softmax cost scales with P, the
    per-pair cost with P^2 (the full loop would take many minutes at P = 150);
(b) the scorer's achieved GFLOP/s, counting only its GEMM, 2*P^2*N*C flops (hardware convention,
    one multiply-add = 2 flops; klas reports model costs in the fvcore convention, 1 MAC = 1 FLOP),
    against a plain torch.matmul of the same per-chunk shape (P, n*C) @ (n*C, P) repeated N/n times;
(c) the scorer's peak memory at N = 10,000 and 40,000, each in a fresh subprocess. CPU: resident
    set high-water mark (VmHWM, reset through /proc/self/clear_refs) minus resident set before
    the call, i.e. everything the call touched, allocator caching included; CUDA:
    torch.cuda.max_memory_allocated above the allocation before the call.

Synthetic logits: one pre-generated (P, n, C) chunk, replayed until N samples have been streamed
(generation excluded from timing). Ratios are only meaningful within one run on one machine.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import Tensor

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from klas.score import kl_matrix, kl_matrix_naive  # noqa: E402
from klas.utils import machine_info, peak_rss, resolve_device, write_json_atomic  # noqa: E402

CONFIGS = [(3, 12), (6, 24)]  # (k models, n blocks): P = k * (n + 1) = 39 and 150
NUM_CLASSES = 1000
CHUNK_BYTES = 1 << 26  # one (P, n_chunk, C) float32 chunk of logits is ~64 MiB


def chunk_rows(num_probes: int, num_classes: int) -> int:
    """Samples per chunk so that one float32 logit chunk is ~CHUNK_BYTES."""
    return max(1, CHUNK_BYTES // (4 * num_probes * num_classes))


def synthetic_chunk(num_probes: int, rows: int, num_classes: int, device: torch.device, seed: int = 0) -> Tensor:
    """Probe-like logits: a shared class signal at per-probe confidence plus per-probe noise -> (P, rows, C)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    base = torch.randn(rows, num_classes, generator=g) * 2.0
    scale = torch.linspace(0.2, 2.0, num_probes).view(-1, 1, 1)
    z = base * scale + torch.randn(num_probes, rows, num_classes, generator=g)
    return z.to(device)


def stream(chunk: Tensor, total: int) -> Iterator[Tensor]:
    """Replay ``chunk`` until ``total`` samples were yielded, the last one cut to size."""
    done = 0
    while done < total:
        take = min(chunk.shape[1], total - done)
        yield chunk if take == chunk.shape[1] else chunk[:, :take]
        done += take


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> tuple[float, object]:
    """Best wall time of ``repeats`` calls (after the caller warmed up) and the last result."""
    best, out = math.inf, None
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


def bench_naive(chunk: Tensor, total: int, num_probes: int, subset: int, device: torch.device) -> dict:
    """Time kl_matrix_naive on ``subset`` probes (all subset^2 pairs) at full N; extrapolate to P probes."""
    reps = math.ceil(total / chunk.shape[1])
    logits = torch.cat([chunk[:subset]] * reps, dim=1)[:, :total].contiguous()  # (m, N, C)
    pairs = [(s, t) for s in range(subset) for t in range(subset)]
    kl_matrix_naive(logits[:, :64], pairs=pairs)  # warm-up
    t_prep, _ = timed(lambda: kl_matrix_naive(logits, pairs=[]), device, 1)
    t_all, theta = timed(lambda: kl_matrix_naive(logits, pairs=pairs), device, 1)
    per_pair = max(t_all - t_prep, 1e-9) / len(pairs)
    estimate = t_prep * num_probes / subset + per_pair * num_probes**2
    del logits
    return {
        "timed_pairs": len(pairs),
        "timed_probes": subset,
        "timed_s": t_all,
        "log_softmax_s_per_probe": t_prep / subset,
        "per_pair_s": per_pair,
        "full_loop_s_extrapolated": estimate,
        "theta_subset": theta,
    }


def bench_matmul(num_probes: int, rows: int, num_classes: int, total: int, device: torch.device, repeats: int) -> float:
    """Seconds for a plain torch.matmul of the scorer's per-chunk GEMM shape, repeated to cover N samples."""
    a = torch.randn(num_probes, rows * num_classes, device=device)
    b = torch.randn(num_probes, rows * num_classes, device=device)
    full, last = divmod(total, rows)

    def run() -> None:
        for _ in range(full):
            torch.matmul(a, b.T)
        if last:
            torch.matmul(a[:, : last * num_classes], b[:, : last * num_classes].T)

    torch.matmul(a, b.T)  # warm-up
    t, _ = timed(run, device, repeats)
    return t


def measure_memory(num_probes: int, total: int, num_classes: int, rows: int, device: str) -> dict:
    """Run the scorer in a fresh interpreter and return its peak memory above the pre-call level."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_memory-probe",
           json.dumps([num_probes, total, num_classes, rows, device])]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _memory_probe(args: list) -> None:
    """Child process body for measure_memory: print one JSON line."""
    num_probes, total, num_classes, rows, device = args
    dev = resolve_device(device)
    chunk = synthetic_chunk(num_probes, rows, num_classes, dev)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        before = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        kl_matrix(stream(chunk, total), device=dev)
        peak = torch.cuda.max_memory_allocated(dev) - before
        how = "torch.cuda.max_memory_allocated minus allocated before the call"
    else:
        peak, before, how = peak_rss(lambda: kl_matrix(stream(chunk, total), device=dev))
        peak -= before
        how += " minus VmRSS before the call"
    print(json.dumps({"peak_bytes": int(peak), "method": how}))


def run_config(k: int, n: int, total: int, mem_totals: tuple[int, int], subset: int, repeats: int, dev: torch.device) -> dict:
    """All measurements for one (k, n) configuration."""
    num_probes = k * (n + 1)
    rows = chunk_rows(num_probes, NUM_CLASSES)
    chunk = synthetic_chunk(num_probes, rows, NUM_CLASSES, dev)
    kl_matrix(stream(chunk, rows), device=dev)  # warm-up: one chunk
    t_batched, theta = timed(lambda: kl_matrix(stream(chunk, total), device=dev), dev, repeats)

    naive = bench_naive(chunk, total, num_probes, subset, dev)
    agree = float((naive.pop("theta_subset") - theta[:subset, :subset]).abs().max())

    flops = 2.0 * num_probes**2 * total * NUM_CLASSES
    t_mm = bench_matmul(num_probes, rows, NUM_CLASSES, total, dev, repeats)
    del chunk
    mem = {str(m): measure_memory(num_probes, m, NUM_CLASSES, rows, str(dev)) for m in mem_totals}
    return {
        "k": k, "n": n, "P": num_probes, "N": total, "C": NUM_CLASSES, "chunk_samples": rows,
        "batched_s": t_batched,
        "naive": naive,
        "speedup": naive["full_loop_s_extrapolated"] / t_batched,
        "max_abs_diff_vs_naive_on_timed_pairs": agree,
        "gemm_flops": flops,
        "scorer_gflops": flops / t_batched / 1e9,
        "matmul_s": t_mm,
        "matmul_gflops": flops / t_mm / 1e9,
        "scorer_over_matmul": (flops / t_batched) / (flops / t_mm),
        "work_buffers_bytes": 2 * num_probes * rows * NUM_CLASSES * 4,
        "peak_memory": mem,
    }


def print_tables(results: list[dict], info: dict, quick: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 140))  # keep the table whole in logs and CI
    t = Table(title=f"KL scorer on {info['device']} ({info['cpu_count']} CPUs, torch {info['torch_version']}){' [quick]' if quick else ''}")
    for col in ("k, n", "P", "N", "C", "chunk", "batched s", "naive s (extrap.)", "speed-up",
                "scorer GFLOP/s", "matmul GFLOP/s", "scorer / matmul"):
        t.add_column(col, justify="right")
    for r in results:
        t.add_row(f"{r['k']}, {r['n']}", str(r["P"]), f"{r['N']:,}", f"{r['C']:,}", str(r["chunk_samples"]),
                  f"{r['batched_s']:.2f}", f"{r['naive']['full_loop_s_extrapolated']:.0f}", f"{r['speedup']:.0f}x",
                  f"{r['scorer_gflops']:.1f}", f"{r['matmul_gflops']:.1f}", f"{r['scorer_over_matmul']:.2f}")
    console.print(t)
    m = Table(title="Scorer peak memory above the pre-call level (MiB)")
    m.add_column("P", justify="right")
    totals = list(results[0]["peak_memory"])
    for n in totals:
        m.add_column(f"N = {int(n):,}", justify="right")
    m.add_column("2 work buffers", justify="right")
    for r in results:
        m.add_row(str(r["P"]), *[f"{r['peak_memory'][n]['peak_bytes'] / 2**20:.0f}" for n in totals],
                  f"{r['work_buffers_bytes'] / 2**20:.0f}")
    console.print(m)
    first = results[0]
    console.print(
        f"naive loop: timed {first['naive']['timed_pairs']} pairs of {first['naive']['timed_probes']} probes at full N "
        "per config and extrapolated (log-softmax x P, pairs x P^2), since the full loop takes minutes.\n"
        "GFLOP/s count only the scorer's GEMM, 2*P^2*N*C (hardware convention: 1 multiply-add = 2 flops; "
        "klas's model costs use the fvcore convention, 1 multiply-add = 1 FLOP).\n"
        f"memory: {first['peak_memory'][totals[0]]['method']}; each N in a fresh process. "
        f"Max |batched - naive| on the timed pairs: {max(r['max_abs_diff_vs_naive_on_timed_pairs'] for r in results):.1e} nats."
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="N = 2,000 (memory: 2,000 vs 8,000), one repeat, 3-probe naive subset")
    ap.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:N]")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "scorer.json"))
    ap.add_argument("--_memory-probe", dest="memory_probe", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_probe is not None:
        _memory_probe(json.loads(args.memory_probe))
        return

    dev = resolve_device(args.device)
    total, mem_totals = (2_000, (2_000, 8_000)) if args.quick else (10_000, (10_000, 40_000))
    subset, repeats = (3, 1) if args.quick else (6, 2)
    info = machine_info(dev)
    started = time.perf_counter()
    results = [run_config(k, n, total, mem_totals, subset, repeats, dev) for k, n in CONFIGS]
    print_tables(results, info, args.quick)
    report = {
        "command": " ".join(["python", "benchmarks/bench_scorer.py", *sys.argv[1:]]),
        "quick": args.quick,
        "machine": info,
        "flops_convention": "hardware: 2 flops per multiply-add; scorer GEMM = 2*P^2*N*C",
        "results": results,
        "wall_s": time.perf_counter() - started,
    }
    write_json_atomic(Path(args.out), report)
    print(f"wrote {args.out} ({report['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
