"""Latency on this device: profiles, the predictor, latency budgets, the refusals, and --best-under.

The profile tests use tiny random-init ViTs (tests/test_train.py's) measured at a batch of 2 with one
repeat; the search tests use tests/conftest.py's ``vit_cache`` (its profile was measured when it was
built, on one thread like every test here).
"""
from __future__ import annotations

import io
import json
import math
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

sys.path.insert(0, str(Path(__file__).parent))
from test_train import FAST, MODELS, FakeCache, fake, quiet, tiny_vit, write_selection  # noqa: E402,F401

from klas.cache import open_cache  # noqa: E402
from klas.config import SearchConfig  # noqa: E402
from klas.errors import KlasError  # noqa: E402
from klas.export.best import best_under, resolve_budget  # noqa: E402
from klas.models import device_identity  # noqa: E402
from klas.run import read_selection  # noqa: E402
from klas.stitch.candidates import anchors, enumerate_stitches  # noqa: E402
from klas.stitch.latency import (  # noqa: E402
    FILE, LatencyProfile, find_profile, measure_profile, read_profiles, stitch_key, write_profiles,
)
from klas.stitch.tree import tree_spec  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def measured():
    """A real profile of the two tiny ViTs, measured on this device (batch 2, one repeat)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        models = [tiny_vit(name) for name in MODELS]
        profile = measure_profile({m.name: m.adapter for m in models}, {m.name: m.profile for m in models}, batch=2,
                                  device=torch.device("cpu"), amp_dtype=None,
                                  identity=device_identity("cpu"), repeats=1, kinds=("linear", "mlp"))
    finally:
        torch.set_num_threads(n)
    return profile, {m.name: m.profile for m in models}


def test_the_prediction_is_exactly_the_sum_of_the_recorded_parts(measured, tmp_path):
    profile, profiles = measured
    write_profiles(tmp_path, "fp", [profile])
    doc = json.loads((tmp_path / FILE).read_text())["profiles"][0]  # the parts as recorded on disk
    again = read_profiles(tmp_path, "fp")[0]
    rec = doc["models"]
    # each model's parts, scaled by its whole forward pass over their sum
    f = {n: m["forward"] / math.fsum([m["stem"], *m["blocks"], m["head"]]) for n, m in rec.items()}
    pre = {n: [f[n] * v for v in (m["stem"], *m["blocks"])] for n, m in rec.items()}
    suf = {n: [f[n] * v for v in (*m["blocks"], m["head"])] for n, m in rec.items()}
    for c in enumerate_stitches(profiles, "both", "mlp"):
        parts = [*pre[c.src][:c.src_cut + 1],
                 doc["stitches"][stitch_key("mlp", profiles[c.src].reps[c.src_cut], profiles[c.dst].reps[c.dst_cut])],
                 *suf[c.dst][c.dst_cut:]]
        assert again.route_ms(profiles, c.src, c.src_cut, c.dst, c.dst_cut, "mlp") == math.fsum(parts)
        assert profile.route_ms(profiles, c.src, c.src_cut, c.dst, c.dst_cut, "mlp") == math.fsum(parts)
    for name in profiles:
        assert again.route_ms(profiles, name) == math.fsum([*pre[name], suf[name][-1]])
        assert again.route_ms(profiles, name) == pytest.approx(rec[name]["forward"], rel=1e-12)  # an anchor: its forward pass
    ti, sm = list(MODELS)
    spec = tree_spec(profiles, ti, 2)
    (branch, cut), = spec.branches
    tree = [*pre[ti], suf[ti][-1],
            doc["stitches"][stitch_key("linear", profiles[ti].reps[2], profiles[sm].reps[cut])],
            *suf[sm][cut:]]
    assert again.tree_ms(profiles, ti, 2, spec.branches, "linear") == math.fsum(tree)
    assert all(v > 0 for v in [*doc["stitches"].values(), *(x for m in rec.values() for x in m["blocks"])])


def test_a_profile_without_whole_forward_passes_is_re_measured(measured, tmp_path):
    """A klas.latency/1 file (parts only) would predict 5-10 % low: it is ignored, so the one-line fix of a
    latency budget ("measure one on this device with: klas cache --out ...") re-measures it."""
    profile, _ = measured
    write_profiles(tmp_path, "fp", [profile])
    doc = json.loads((tmp_path / FILE).read_text())
    doc["format"] = "klas.latency/1"
    for m in doc["profiles"][0]["models"].values():
        del m["forward"]
    (tmp_path / FILE).write_text(json.dumps(doc))
    assert read_profiles(tmp_path, "fp") == []
    with pytest.raises(KlasError, match="has no latency profile; measure one on this device with: klas cache --out"):
        find_profile(tmp_path, "fp", device_identity("cpu"), 2)


def test_profiles_of_another_device_or_batch_are_refused(measured, tmp_path):
    profile, _ = measured
    here = device_identity("cpu")
    write_profiles(tmp_path, "fp", [profile])
    assert find_profile(tmp_path, "fp", here, 2) is not None
    with pytest.raises(KlasError, match=r"covers batch 2, not --latency-batch 8; .*klas cache --out .* --latency-batch 8") as e:
        find_profile(tmp_path, "fp", here, 8)
    assert "\n" not in str(e.value)
    elsewhere = LatencyProfile({**here, "name": "Some Other CPU"}, 2, 1, profile.models, profile.stitches)
    write_profiles(tmp_path / "other", "fp", [elsewhere])
    with pytest.raises(KlasError, match=r"measured on cpu \"Some Other CPU\".*not on this device.*klas cache --out") as e:
        find_profile(tmp_path / "other", "fp", here, 2)
    assert "\n" not in str(e.value)
    more_threads = {**here, "threads": here["threads"] + 1}
    with pytest.raises(KlasError, match="not on this device"):
        find_profile(tmp_path, "fp", more_threads, 2)
    with pytest.raises(KlasError, match="has no latency profile"):
        find_profile(tmp_path, "another cache", here, 2)  # a profile of the cache before it was rebuilt


def _search(cache: Path, run: Path, **kw):
    from klas.search import search

    return search(cache, run, console=Console(file=io.StringIO()), progress=False, **{"probe_epochs": 1, "device": "cpu", **kw})


def test_a_latency_budget_selects_only_routes_under_it(vit_cache, tmp_path):
    cache = open_cache(vit_cache)
    profile = find_profile(vit_cache, cache.fingerprint, device_identity("cpu"), 1)
    stitches = enumerate_stitches(cache.profiles, "up", "linear")
    ms = sorted(profile.route_ms(cache.profiles, c.src, c.src_cut, c.dst, c.dst_cut) for c in stitches)
    budget = ms[len(ms) // 2]
    res = _search(vit_cache, tmp_path / "run", budget_ms=budget)
    sel = read_selection(res.run_dir)
    assert sel["axis"] == "latency" and sel["budget"]["value"] == budget and sel["budget"]["batch"] == 1
    assert sel["stitches"] and all(s["latency_ms"] <= budget for s in sel["stitches"])
    for s in sel["stitches"]:
        assert s["latency_ms"] == profile.route_ms(cache.profiles, s["src"], s["src_cut"], s["dst"], s["dst_cut"])
    over = [r for r in res.rows if r["latency_ms"] > budget]
    assert over and not any(r["selected"] for r in over)
    for a in anchors(cache.profiles):
        assert (a.src in [x["name"] for x in sel["anchors"]]) == (profile.route_ms(cache.profiles, a.src) <= budget)
    assert sel["inputs"] != _search(vit_cache, tmp_path / "gflops", budget=0.004).selection["inputs"]
    with pytest.raises(KlasError, match=r"--budget-ms .* is below the cheapest candidate, .* ms \(batch 1 on cpu"):
        _search(vit_cache, tmp_path / "low", budget_ms=ms[0] / 2)


def test_latency_budgets_need_this_devices_profile_before_any_work(vit_cache, tmp_path, no_probe_training):
    copy = tmp_path / "cache"
    shutil.copytree(vit_cache, copy)
    with pytest.raises(KlasError, match="covers batch 1, 64, not --latency-batch 8"):
        _search(copy, tmp_path / "r1", budget_ms=5.0, latency_batch=8)
    doc = json.loads((copy / FILE).read_text())
    for p in doc["profiles"]:
        p["device"]["name"] = "Some Other CPU"
    (copy / FILE).write_text(json.dumps(doc))
    with pytest.raises(KlasError, match=r"measured on cpu \"Some Other CPU\".*measure this device's with: klas cache --out"):
        _search(copy, tmp_path / "r2", budget_ms=5.0)
    (copy / FILE).unlink()
    with pytest.raises(KlasError, match="has no latency profile"):
        _search(copy, tmp_path / "r3", budget_ms=5.0)
    assert not any((tmp_path / r).exists() for r in ("r1", "r2", "r3"))
    with pytest.raises(KlasError, match="pass one of them"):
        SearchConfig(budget=1.0, budget_ms=5.0)


def test_check_predictor_times_every_network_beside_its_prediction_and_retests_it(vit_cache, tmp_path):
    from klas.train.latency import check_predictor
    run = _search(vit_cache, tmp_path / "run", budget=0.004).run_dir
    report = check_predictor(run, batch=1, repeats=1, device="cpu", limit=3, passes=2)
    assert len(report.measured) == 3 and set(report.measured) == set(report.predicted)
    assert len(report.retests) == 1 and set(report.retests[0]) == set(report.measured)
    assert all(m > 0 for m in report.measured.values()) and len(report.retest_changes()) == 3
    assert report.profile.startswith("batch 1 on cpu")
    with pytest.raises(KlasError, match="covers batch 1, 64, not .* 8"):
        check_predictor(run, batch=8, repeats=1, device="cpu")
    with pytest.raises(KlasError, match="passes must be at least 1"):
        check_predictor(run, batch=1, repeats=1, passes=0)


def _rows():
    def row(i, kind, gflops, ms, acc):
        return {"id": i, "kind": kind, "gflops": gflops, "latency_ms": ms, "acc_after": acc, "latency_batch": 1}
    return [row("a", "anchor", 1.0, 10.0, 0.60), row("b", "anchor", 4.0, 30.0, 0.80), row("s1", "stitch", 2.0, 25.0, 0.75),
            row("s2", "stitch", 3.0, 12.0, 0.70), row("s3", "stitch", 2.5, float("nan"), 0.79)]


def test_best_under_picks_the_most_accurate_network_under_the_budget():
    rows = _rows()
    pick = lambda text: best_under(rows, resolve_budget(text, rows))["id"]  # noqa: E731
    assert pick("2.0") == "s1" and pick("2.5") == "s3" and pick("100") == "b" and pick("1") == "a"
    assert pick("12ms") == "s2" and pick("26 ms") == "s1" and pick("9999ms") == "b"  # s3 was not timed
    assert pick("s1:ms") == "s1" and pick("a:gflops") == "a" and pick("b:ms") == "b"
    assert resolve_budget("12ms", rows).label == "12ms" and resolve_budget("0.01", rows).label == "0.01gflops"
    for text, msg in (("0.5", r"no network is under 0.5 GFLOPs; the cheapest is a at 1 GFLOPs"),
                      ("9ms", r"no network is under 9 ms; the cheapest is a at 10 ms"),
                      ("fast", r"--best-under 'fast' is not a budget"), ("-1", "is not a budget"),
                      ("nope:ms", r"'nope' is not a network of this run \(its anchors: a, b\)"),
                      ("s3:ms", "s3 has no measured latency")):
        with pytest.raises(KlasError, match=msg) as e:
            best_under(rows, resolve_budget(text, rows))
        assert "\n" not in str(e.value)


def test_train_records_predicted_and_measured_latency_and_export_answers(fake, tmp_path, measured, capsys):
    """klas train predicts every network from the cache's profile (batch 2 here) and times the networks on
    either front; export writes both fronts and the best network under a budget, which loads back."""
    from klas.export import export_pareto, load_stitched
    from klas.train import read_results, train_run

    profile, _ = measured
    run = tmp_path / "runs" / "r"
    write_selection(run, fake)
    write_profiles(fake.path, fake.fingerprint, [profile])
    res = train_run(run, console=quiet(), **{**FAST, "latency": "front", "latency_batch": 2, "latency_repeats": 1})
    rows = read_results(run)
    assert all(r["latency_pred_ms"] > 0 for r in rows)
    timed = [r for r in rows if r["latency_ms"] == r["latency_ms"]]
    assert timed and all(r["latency_ms"] > 0 and r["latency_batch"] == 2 for r in timed)
    manifest = json.loads((run / "train.json").read_text())
    lat = manifest["latency"]
    assert lat["mode"] == "front" and lat["measured"] == len(timed) and lat["profile"].startswith("batch 2 on cpu")
    assert lat["predictor_error"]["networks"] == len(timed) and lat["predictor_error"]["worst"] >= lat["predictor_error"]["median"]
    ev = manifest["evaluation"]
    assert set(ev["passes"]) == {"before", "after"} and all(p["ratio"] > 0 for p in ev["passes"].values())
    assert {"eval_before", "eval_after", "latency"} <= set(res.timings)
    res.phase_table()  # renders

    fastest = min(timed, key=lambda r: r["latency_ms"])
    budget = f"{fastest['latency_ms'] * 1.0001}ms"
    out = export_pareto(run, best_under=[budget, "1"], console=quiet())
    (ms, gf) = out.best
    assert ms["row"]["id"] == fastest["id"] or ms["row"]["acc_after"] >= fastest["acc_after"]
    assert gf["row"]["id"] == max(rows, key=lambda r: (r["acc_after"], -r["gflops"]))["id"]
    model = load_stitched(run / "export" / gf["artifact"])
    assert model.config["id"] == gf["row"]["id"] and (run / "export" / "front-latency.png").is_file()
    assert len(out.best_lines()) == 2 and all("top-1" in line for line in out.best_lines())
    before = sorted(p.name for p in (run / "export").iterdir())
    with pytest.raises(KlasError, match=r"no network is under 1e-09 GFLOPs; the cheapest is"):
        export_pareto(run, best_under=["1e-9"], console=quiet())
    assert sorted(p.name for p in (run / "export").iterdir()) == before  # nothing half-written
    from klas.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        main(["export", "pareto", str(run), "--best-under", "1e-9"])
    err = capsys.readouterr().err
    assert done.value.code == 2 and err.count("\n") == 1 and err.startswith("error: no network is under 1e-09 GFLOPs")


def test_cli_defaults_are_the_config_defaults():
    """klas cache and klas search read every default from CacheConfig / SearchConfig."""
    import dataclasses

    import typer

    from klas.cli import app
    from klas.config import CacheConfig

    for command, cls in (("cache", CacheConfig), ("search", SearchConfig)):
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        checked = 0
        for param in typer.main.get_command(app).commands[command].params:
            if param.name in defaults and param.name not in ("device",):
                want = defaults[param.name]
                if param.name == "latency_batch" and command == "cache":
                    want = ",".join(map(str, want))
                if param.name == "workers":
                    want = str(want)
                assert param.default == want, (command, param.name)
                checked += 1
        assert checked >= 8, command
