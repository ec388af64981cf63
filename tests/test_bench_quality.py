"""benchmarks/bench_quality.py end to end on a tiny random-init run, its agreement with the library, and
the pure parts of klas.quality (the ceiling, the signals a run trains, the default-score choice).

The metrics and the exact-count selection rules are tested in tests/test_metrics.py and
tests/test_select.py; the end-to-end test checks plumbing, not results: untrained models, 30 images per
split, 2 steps per route, on a ViT and a ResNet stitched both ways through bridges (so SN-Net, which
has no bridges, has nothing to train).
"""
from __future__ import annotations

import copy
import io
import json
import runpy
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from klas.errors import KlasError
from klas.quality import QualityConfig, QualityFamily, bucket_winners, ceiling, choose_default_score, competitive, rate
from klas.search import DEFAULT_SCORE, search
from klas.train import train_run

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_quality.py"

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_bench_quality_quick_random_init_agrees_with_klas(tmp_path):
    main = runpy.run_path(str(SCRIPT), run_name="bench_quality")["main"]
    out = tmp_path / "q.json"
    report = main(["--quick", "--random-init", "--models", "klas_vit_ti,klas_resnet_s", "--direction", "both",
                   "--limit", "30", "--route-steps", "2", "--batch-size", "8", "--buckets", "6", "--bootstrap", "10",
                   "--work", str(tmp_path / "work"), "--out", str(out)])
    cfg = report["config"]
    assert out.is_file() and out.with_suffix(".png").stat().st_size > 10_000
    fam = json.loads(out.read_text())["families"]["custom"]
    k, a, n = fam["K"], 2, fam["num_candidates"]
    assert fam["direction"] == "both" and n == len(fam["ground_truth"]) == 2 * 6 * 8 and fam["eval_images"] == 30
    assert {"gamma", "theta", "cka", "random-0", "random-1", "random-2", "random (mean)"} <= set(fam["strategies"])
    assert "snnet" not in fam["strategies"] and "SN-Net" in fam["not_trained"]["snnet"]  # no bridges in SN-Net
    assert ("ls" in fam["strategies"]) == ("ls" in competitive(fam["signals"], cfg["train_margin"]))
    for name, s in fam["strategies"].items():
        assert s["count"] == k and 0.0 <= s["hypervolume"] <= 1.0 and 0.0 <= s["recovery"]["rate"] <= 1.0
        assert len(s["best_at_budget"]) == 3
        if "selected" in s:
            assert len(set(s["selected"])) == k and s["run"]["steps"] == (k + a) * cfg["route_steps"]
    for seed, run in fam["ground_truth_runs"].items():  # every candidate + 2 anchors, once per seed
        assert run["steps"] == (n + a) * cfg["route_steps"] and run["seed"] == int(seed)
    assert set(fam["ceiling"]) == {"1"} and set(fam["ceiling"]["1"]) >= {"rho", "rho_in_range", "recovery_winners"}
    assert all(set(g["acc_by_seed"]) == {"0", "1"} and 0 <= g["acc_score"] <= 1 for g in fam["ground_truth"])
    assert set(fam["signals"]) == {"gamma", "theta", "ls", "cka"} and set(fam["signals"]["ls"]) == {"score", "eval"}
    assert set(fam["score_split"]["strategies"]) == {"gamma", "theta", "ls"} & set(fam["strategies"])
    assert set(fam["differences"]["gamma"]) == {"cka", "random-0", "random-1", "random-2", "random"}
    assert fam["ground_truth_beats_anchors"] == (fam["ground_truth_hypervolume"] > fam["anchors_only_hypervolume"])
    assert len(fam["warnings"]) == (not fam["ground_truth_beats_anchors"])
    phases = fam["seconds"]
    assert {"search: probes, Θ, Γ", "ground truth seed 1: train", "gamma: eval", "variants"} <= set(phases)
    assert phases["total"] >= sum(v for key, v in phases.items() if key != "total") * 0.99
    assert fam["variants"]["default_matches_search_max_rel_diff"] < 1e-3  # the variants' default is klas search's Γ
    assert report["default_score"]["chosen"] in {"gamma", "theta", "ls"}

    # the selections are what klas search writes for each strategy (at its own count; K moves τ / the window)
    cache = tmp_path / "work" / "custom" / "cache"
    for strategy, score in (("klas", "theta"), ("cka", "gamma")):
        res = search(cache, tmp_path / f"run-{strategy}", strategy=strategy, buckets=cfg["buckets"],
                     **({"score": score} if strategy == "klas" else {}),
                     tau=cfg["tau"], direction="both", seed=cfg["seed"], console=Console(file=io.StringIO()),
                     progress=False)
        own = {s["id"] for s in res.selection["stitches"]}
        chosen = set(fam["strategies"][score if strategy == "klas" else "cka"]["selected"])
        assert len(own) == fam["strategies"][score if strategy == "klas" else "cka"]["count_own_rule"]
        assert own <= chosen if len(own) <= k else chosen <= own
        if strategy == "cka":
            rows = {r["id"]: r for r in res.rows if r["kind"] == "stitch"}
            assert all(g["cka"] == pytest.approx(rows[g["id"]]["cka_distance"], abs=1e-9) for g in fam["ground_truth"])

    # the training is klas train's default recipe (anchors fine-tuned and sampled as routes): same LS init,
    # schedule, sampling and data order, only shorter
    res = train_run(tmp_path / "work" / "custom" / "run-klas", epochs=1, steps_per_epoch=(k + a) * cfg["route_steps"],
                    batch_size=cfg["batch_size"], init_images=cfg["init_images"], eval_batch_size=cfg["eval_batch_size"],
                    latency=False, seed=cfg["seed"], overwrite=True, console=Console(file=io.StringIO()), progress=False)
    assert res.config["full_tune"] and res.config["anchor_routes"] and res.config["lr"] == cfg["lr"]
    ours = {**fam["strategies"][DEFAULT_SCORE]["accuracy"], **fam["strategies"][DEFAULT_SCORE]["anchor_accuracy"]}
    assert len(res.rows) == len(ours)
    for row in res.rows:
        assert row["acc_after"] == pytest.approx(ours[row["id"]], abs=1.5 / 30), row["id"]

    # --replot draws the picture and writes the README tables again from the JSON alone
    table = out.with_suffix(".md").read_text()
    assert "| custom (K = " in table and "ceiling (ground truth seed 1" in table and "Default score chosen" in table
    out.with_suffix(".png").unlink()
    out.with_suffix(".md").unlink()
    again = main(["--replot", str(out)])
    assert out.with_suffix(".png").stat().st_size > 10_000 and out.with_suffix(".md").read_text() == table
    assert again["default_score"] == report["default_score"]


def test_steps_per_route_is_klas_train_length():
    """The demo's selection (22 stitches + 3 anchors) on all 8626 probe-train images: klas train's 5 epochs
    of 135 batches of 64 are 675 steps, 27 per route; a given route_steps wins."""
    cfg = QualityConfig()
    assert cfg.steps_per_route(8626, 22, 3) == 27
    assert cfg.steps_per_route(8626, 33, 2) == round(675 / 35)
    assert QualityConfig(route_steps=5).steps_per_route(8626, 22, 3) == 5
    assert cfg.steps_per_route(8626, 21, 3, length=2) == round(2 * 675 / 24)  # a lengthened family
    assert QualityConfig(route_steps=5).steps_per_route(8626, 22, 3, length=2) == 5
    with pytest.raises(KlasError, match="length must be a positive integer"):
        QualityFamily(("a", "b"), length=0)


def test_ceiling_rates_a_second_ground_truth_like_a_signal():
    bucket = np.array([0, 0, 0, 1, 1, -1, 2, 2])
    ref = np.array([0.5, 0.9, 0.7, 0.6, 0.2, 0.99, 0.3, 0.4])
    assert list(bucket_winners(ref, bucket)) == [False, True, False, True, False, False, False, True]
    same = ceiling(ref, ref, bucket, 3)
    assert same["rho"] == pytest.approx(1) and same["rho_in_range"] == pytest.approx(1)
    assert same["recovery_winners"] == 1 and same["recovery"] == 1
    flipped = ref.copy()
    flipped[[3, 4]] = flipped[[4, 3]]  # seed 1 disagrees on bucket 1's winner
    c = ceiling(ref, flipped, bucket, 3)
    assert c["recovery_winners"] == pytest.approx(2 / 3) and c["rho_in_range"] < 1
    # a signal is rated the same way (lower = better): -accuracy of the reference is a perfect signal
    r = rate(1 - ref, ref, bucket, 3)
    assert r["rho"] == pytest.approx(1) and r["recovery"] == 1 and r["count"] == 3


def _fam(name: str, rho: dict, hv: dict, eval_rho: dict) -> dict:
    return {"family": name,
            "signals": {s: {"score": {"rho_in_range": rho[s]}, "eval": {"rho_in_range": eval_rho[s], "recovery": 0.5}}
                        for s in rho},
            "score_split": {"strategies": {s: {"hypervolume": v} for s, v in hv.items()}},
            "strategies": {s: {"hypervolume": 0.3} for s in hv}}


def test_default_score_is_chosen_on_the_score_split_only():
    """ρ first (mean over families), then HV among the scores within the margin; eval never decides."""
    fams = {"a": _fam("a", {"gamma": 0.30, "theta": 0.80, "ls": 0.78}, {"gamma": 0.5, "theta": 0.40, "ls": 0.45},
                      {"gamma": 0.9, "theta": 0.1, "ls": 0.1}),
            "b": _fam("b", {"gamma": 0.20, "theta": 0.70, "ls": 0.69}, {"gamma": 0.5, "theta": 0.41, "ls": 0.44},
                      {"gamma": 0.9, "theta": 0.1, "ls": 0.1})}
    choice = choose_default_score(fams)
    assert choice["leaders"] == ["theta", "ls"] and choice["chosen"] == "ls"  # Γ trails on ρ; ls wins HV among leaders
    flipped = copy.deepcopy(fams)
    for f in flipped.values():  # eval numbers reversed: the choice stands
        for s in f["signals"].values():
            s["eval"]["rho_in_range"] = -s["eval"]["rho_in_range"]
        for s in f["strategies"].values():
            s["hypervolume"] = 1.0
    assert choose_default_score(flipped)["chosen"] == "ls"
    del fams["b"]["score_split"]["strategies"]["ls"]  # ls untrained somewhere: only theta has HV everywhere
    assert choose_default_score(fams)["chosen"] == "theta"
