"""``make gpu-check`` (benchmarks/bench_gpu.py) end to end on the CPU with ``--small``, and the export check
it relies on (:func:`klas.export.reproduce_artifacts`)."""
from __future__ import annotations

import json
import runpy
import shutil
import sys
from pathlib import Path

import pytest
import torch

import klas.export.reproduce as reproduce
from klas.export import export_pareto, reproduce_artifacts

sys.path.insert(0, str(Path(__file__).parent))
from test_train import FAST, fake, quiet, write_selection  # noqa: E402,F401
from klas.train import train_run  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"
CHECKS = {"costs", "bf16 features", "resume", "export"}

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def bench():
    return runpy.run_path(str(SCRIPT), run_name="bench_gpu")


def test_gpu_check_runs_every_stage_on_cpu(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    status = bench()["main"](["--device", "cpu", "--small", "--out", str(out), "--work", str(tmp_path / "work")])
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert status == 0 and report["passed"] and "all checks passed" in printed
    assert set(report["checks"]) == CHECKS and all(c["passed"] for c in report["checks"].values())
    for name in CHECKS:
        assert name in printed
    assert printed.count("pass") >= len(CHECKS)
    m = report["measurements"]
    assert m["cache"]["images"] == 200 and m["cache"]["workers"] == 2 and m["cache"]["ratio"] > 0
    assert m["search"]["selected_stitches"] > 0 and m["search"]["scorer"][0]["scorer_gflops"] > 0
    assert m["train"]["steps"] == 6 and m["train"]["steps_per_s"] > 0 and m["train"]["peak_memory_bytes"] > 0
    assert m["export"]["models"] >= 1 and m["tree"]["trees"] >= 1
    assert report["checks"]["resume"]["identical"] and report["checks"]["bf16 features"]["tolerance"] == 0.05
    assert report["machine"]["device"] == "cpu" and report["small"] and report["command"].startswith("python benchmarks/bench_gpu.py")
    assert {"cache", "search", "train", "train_resumed", "export", "tree"} <= set(report["timings_s"])


def test_gpu_check_exit_status_follows_the_checks(tmp_path, monkeypatch, capsys):
    ns = bench()
    main = ns["main"]

    def failing(env, plan, report):
        report["checks"]["resume"] = {"passed": False, "detail": "max |difference| 1e-3"}

    main.__globals__["run_all"] = failing
    assert main(["--device", "cpu", "--small", "--out", str(tmp_path / "a.json")]) == 1
    assert "FAIL" in capsys.readouterr().out and not json.loads((tmp_path / "a.json").read_text())["passed"]

    def broken(env, plan, report):
        raise RuntimeError("CUDA error: out of memory")

    main.__globals__["run_all"] = broken
    assert main(["--device", "cpu", "--small", "--out", str(tmp_path / "b.json")]) == 1
    saved = json.loads((tmp_path / "b.json").read_text())
    assert saved["error"] == "RuntimeError: CUDA error: out of memory" and not saved["passed"]
    results = SCRIPT.parent / "results" / "gpu.json"
    before = results.stat().st_mtime_ns if results.exists() else None
    assert main(["--device", "cpu", "--small"]) == 1
    assert (results.stat().st_mtime_ns if results.exists() else None) == before  # --small writes only to --out


class _Shifted(torch.nn.Module):
    """Another network: the artifact's logits moved by one class."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).roll(1, dims=1)


def test_reproduce_artifacts_finds_a_changed_model(fake, tmp_path, monkeypatch):
    run = tmp_path / "run"
    write_selection(run, fake)
    train_run(run, console=quiet(), **FAST)
    res = export_pareto(run, models=True, console=quiet())
    rows = reproduce_artifacts(run)
    assert {r["id"] for r in rows} == set(res.models) and all(r["reproduced"] and r["images"] == 100 for r in rows)
    real = reproduce.load_stitched
    monkeypatch.setattr(reproduce, "load_stitched", lambda path, device="cpu": _Shifted(real(path, device)))
    changed = reproduce_artifacts(run)
    assert not all(r["reproduced"] for r in changed)
    assert all(r["reproduced"] == (r["measured"] == r["recorded"]) for r in changed)


def test_resume_check_tells_a_changed_resume_from_the_device(fake, tmp_path, monkeypatch):
    from klas.train.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint

    ns = bench()
    runs = {k: tmp_path / k for k in ("straight", "resumed", "repeat")}
    for run in runs.values():
        write_selection(run, fake)
    opts = {**FAST, "console": quiet()}
    clock = ns["Clock"](torch.device("cpu"))
    assert ns["resume_check"](clock, runs, opts)["passed"]

    def forgetful(run, **kw):  # a resume that loses the optimiser's moments
        if kw.get("resume"):
            ckpt = load_checkpoint(checkpoint_path(run))
            for state in ckpt["optimizer"]["state"].values():
                state["exp_avg"].zero_()
            save_checkpoint(checkpoint_path(run), {k: v for k, v in ckpt.items() if k != "format"})
        return train_run(run, **kw)

    for run in runs.values():
        shutil.rmtree(run)
        write_selection(run, fake)
    ns["resume_check"].__globals__["train_run"] = forgetful
    result = ns["resume_check"](clock, runs, opts)
    assert not result["passed"] and not result["identical"] and result["repeat"]["identical"]
    assert "resuming changed the training" in result["detail"] and "train_repeat" in clock.seconds
