"""klas train: LS init -> before/after evaluation -> joint fine-tuning, checkpoints, resume, refusals.

Most tests run against ``FakeCache``: an in-memory stand-in with the reader's interface (two tiny
random-init ViTs, 400 synthetic 32x32 images in three splits), so they take seconds. One test builds
a real cache with ``klas.cache.build_cache`` and the demo architectures.
"""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import timm
import torch
from PIL import Image
from rich.console import Console

import klas.cache
from klas.data import Split
from klas.errors import KlasError
from klas.models import LoadedModel, ModelSpec, adapt, data_config_of, profile_adapter
from klas.stitch.network import StitchNet, stitch_id, stitch_macs, stitch_params
from klas.train import parse_loss, read_results, train_run
from klas.train.checkpoint import checkpoint_path, load_checkpoint
from klas.train.core import stitch_sequence as _stitch_sequence
from klas.utils import sha256_state_dict

# Two small ViTs with the same token grid (4x4 patches of 8 px + cls) and different widths. The timm
# names are real architectures (so exported artifacts rebuild by name); the overrides travel along as
# ``klas_create_kwargs``.
MODELS = {"vit_tiny_patch16_224": (32, 0), "vit_small_patch16_224": (48, 1)}
TI, SM = list(MODELS)
PAIRS = [(TI, 1, SM, 1), (TI, 2, SM, 2), (TI, 3, SM, 1), (SM, 2, TI, 3)]


def tiny_vit(name: str) -> LoadedModel:
    dim, seed = MODELS[name]
    kwargs = dict(img_size=32, patch_size=8, embed_dim=dim, depth=4, num_heads=2)
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=10, drop_rate=0.0, drop_path_rate=0.0, **kwargs).eval()
    model.klas_create_kwargs = kwargs
    for p in model.parameters():
        p.requires_grad_(False)
    adapter = adapt(model, name)
    return LoadedModel(ModelSpec(name), adapter, profile_adapter(adapter, (3, 32, 32)),
                       sha256_state_dict(model.state_dict()), data_config_of(model))


class _Source:
    name = "synthetic"
    classes = [str(i) for i in range(10)]
    fingerprint = "synthetic-1"

    def __init__(self, n: int = 400) -> None:
        rng = np.random.default_rng(0)
        self.labels = rng.integers(0, 10, n)
        prototypes = rng.random((10, 32, 32, 3))
        img = 0.6 * prototypes[self.labels] + 0.4 * rng.random((n, 32, 32, 3))
        self.images = (img * 255).astype(np.uint8)

    def __len__(self) -> int:
        return len(self.labels)

    def label(self, i: int) -> int:
        return int(self.labels[i])

    def load(self, i: int) -> Image.Image:
        return Image.fromarray(self.images[i])


class FakeCache:
    """What ``klas.cache.open_cache`` returns, in memory: splits 200 / 100 / 100."""

    splits = ["probe-train", "score", "eval"]

    def __init__(self, path: Path, fingerprint: str = "fp-1", permute_train_labels: bool = False) -> None:
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.src = _Source()
        self.model_names = list(MODELS)
        self.manifest = {"fingerprint": fingerprint,
                         "data": {"preprocess": {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3}}}
        idx = np.arange(400)
        self._ids = {"probe-train": idx[:200], "score": idx[200:300], "eval": idx[300:]}
        self._labels = {k: self.src.labels[v].copy() for k, v in self._ids.items()}
        if permute_train_labels:
            self._labels["probe-train"] = np.random.default_rng(1).permutation(self._labels["probe-train"])

    def labels(self, split):
        return self._labels[split]

    def split(self, name):
        return Split(name, self._ids[name].copy(), self._labels[name].copy())

    def source(self, root=None):
        return self.src

    def transform(self):
        from torchvision import transforms as T

        return T.Compose([T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])

    def dataset(self, split, root=None):
        from klas.data import SplitDataset

        return SplitDataset(self.src, self.split(split), self.transform())

    def load_models(self, device="cpu", root=None):
        return [tiny_vit(n) for n in self.model_names]


def write_selection(run: Path, cache: FakeCache, pairs=PAIRS, budget: float | None = 0.01) -> dict:
    prof = {n: tiny_vit(n).profile for n in MODELS}
    stitches = [{
        "id": stitch_id(a, i, b, j), "src": a, "src_cut": i, "dst": b, "dst_cut": j, "route": "",
        "macs": stitch_macs(prof[a], i, prof[b], j), "params": stitch_params(prof[a], i, prof[b], j),
        "theta": 0.1 * k, "gamma": 0.2 * k, "bucket": 0 if a == TI else 1,
    } for k, (a, i, b, j) in enumerate(pairs)]
    sel = {"format": "klas.selection/1", "cache": {"path": str(cache.path), "fingerprint": cache.fingerprint},
           "strategy": "klas", "budget_gflops": budget, "buckets": 2, "layer": "linear", "seed": 0,
           "anchors": [{"name": n, "macs": prof[n].macs, "params": prof[n].params} for n in MODELS],
           "stitches": stitches}
    run.mkdir(parents=True, exist_ok=True)
    (run / "selection.json").write_text(json.dumps(sel))
    return sel


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A FakeCache served by ``klas.cache.open_cache`` for its own path; a KlasError for any other."""
    caches: dict[str, FakeCache] = {}

    def open_cache(path):
        if str(path) not in caches:
            raise KlasError(f"no cache at {path}")
        return caches[str(path)]

    monkeypatch.setattr(klas.cache, "open_cache", open_cache)
    cache = FakeCache(tmp_path / "cache")
    caches[str(cache.path)] = cache
    cache.registry = caches
    return cache


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


FAST = dict(epochs=2, batch_size=32, latency=False, eval_batch_size=100, progress=False, full_tune=False)


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_parse_loss():
    assert parse_loss("ce") == {"ce": 1.0}
    assert parse_loss("ce=1,ffm=0.5") == {"ce": 1.0, "ffm": 0.5}
    assert parse_loss(" distill + ffm=2 ") == {"distill": 1.0, "ffm": 2.0}
    assert parse_loss("ce=0,distill") == {"distill": 1.0}
    for bad, msg in (("xent", "unknown loss"), ("ce=abc", "not a number"), ("ce=-1", "non-negative"),
                     ("ce=0", "no positive weight"), ("", "empty"), ("ce,ce=2", "twice")):
        with pytest.raises(KlasError, match=msg):
            parse_loss(bad)


def test_train_writes_results_and_is_deterministic(fake, tmp_path):
    write_selection(tmp_path / "r1", fake)
    write_selection(tmp_path / "r2", fake)
    anchors_before = {m.name: sha256_state_dict(m.adapter.state_dict()) for m in fake.load_models()}
    res = train_run(tmp_path / "r1", console=quiet(), **FAST)
    assert res.complete and res.epochs_done == 2 and len(res.history) == 2
    table = pq.read_table(tmp_path / "r1" / "results.parquet")
    for col in ("id", "kind", "route", "src", "src_cut", "dst", "dst_cut", "macs", "gflops", "params", "acc_before",
                "acc_after", "latency_ms", "latency_batch", "latency_device", "bucket", "theta", "gamma"):
        assert col in table.column_names
    rows = {r["id"]: r for r in read_results(tmp_path / "r1")}
    assert set(rows) == {stitch_id(*p) for p in PAIRS} | set(MODELS)
    prof = {n: tiny_vit(n).profile for n in MODELS}
    for a, i, b, j in PAIRS:
        r = rows[stitch_id(a, i, b, j)]
        assert r["kind"] == "stitch" and r["macs"] == stitch_macs(prof[a], i, prof[b], j)
        assert r["route"] == f"{a}[0..{i - 1}] -> {b}[{j}..3]"
        assert 0 <= r["acc_before"] <= 1 and 0 <= r["acc_after"] <= 1 and np.isfinite(r["init_r2"])
    for n in MODELS:
        assert rows[n]["kind"] == "anchor" and rows[n]["macs"] == prof[n].macs and rows[n]["dst"] is None
        assert rows[n]["acc_before"] == rows[n]["acc_after"]  # frozen anchors
    manifest = json.loads((tmp_path / "r1" / "train.json").read_text())
    assert manifest["epochs_done"] == 2 and manifest["config"]["loss"] == "ce=1"
    # stitch layers moved away from their LS init; the anchors did not move
    ckpt = load_checkpoint(checkpoint_path(tmp_path / "r1"))
    assert ckpt["epoch"] == 2 and ckpt["anchor_states"] == {}
    # same inputs -> same weights and accuracies
    res2 = train_run(tmp_path / "r2", console=quiet(), **FAST)
    assert [(r["id"], r["acc_before"], r["acc_after"]) for r in res.rows] == \
           [(r["id"], r["acc_before"], r["acc_after"]) for r in res2.rows]
    ckpt2 = load_checkpoint(checkpoint_path(tmp_path / "r2"))
    for sid, state in ckpt["stitch_states"].items():
        for k, v in state.items():
            assert torch.equal(v, ckpt2["stitch_states"][sid][k])
    assert {m.name: sha256_state_dict(m.adapter.state_dict()) for m in fake.load_models()} == anchors_before


def _states_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict):
            _states_equal(a[k], b[k])
        elif isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


@pytest.mark.parametrize("opts", [
    dict(loss="ce", full_tune=False),
    dict(loss="ce=1,distill=0.5,ffm=0.5", sampling="bucket", full_tune=True),
    dict(loss="ce=1,distill=1", teacher="largest", first_epochs=1, full_tune=True, layer="lora"),
    dict(loss="ce=1,lfm=1", first_loss="lfm", first_epochs=1, full_tune=True, layer="mlp"),
], ids=["frozen-ce", "full-tune-bucket-mixed-loss", "two-stage-largest-teacher-lora", "two-stage-lfm-mlp"])
def test_resume_continues_exactly(fake, tmp_path, opts):
    write_selection(tmp_path / "straight", fake)
    write_selection(tmp_path / "split", fake)
    train_run(tmp_path / "straight", console=quiet(), **{**FAST, **opts})
    part = train_run(tmp_path / "split", console=quiet(), stop_after=1, **{**FAST, **opts})
    assert not part.complete and part.epochs_done == 1 and not (tmp_path / "split" / "results.parquet").exists()
    assert load_checkpoint(checkpoint_path(tmp_path / "split"))["epoch"] == 1
    done = train_run(tmp_path / "split", console=quiet(), resume=True, **{**FAST, **opts})
    assert done.complete
    a = load_checkpoint(checkpoint_path(tmp_path / "straight"))
    b = load_checkpoint(checkpoint_path(tmp_path / "split"))
    _states_equal(a["stitch_states"], b["stitch_states"])
    _states_equal(a["anchor_states"], b["anchor_states"])
    _states_equal(a["optimizer"]["state"], b["optimizer"]["state"])
    if opts.get("full_tune"):
        assert a["anchor_states"]  # anchors were trained and saved
    ra = read_results(tmp_path / "straight")
    rb = read_results(tmp_path / "split")
    assert [(r["id"], r["acc_before"], r["acc_after"]) for r in ra] == [(r["id"], r["acc_before"], r["acc_after"]) for r in rb]


def test_checkpoint_from_another_selection_is_refused(fake, tmp_path):
    run = tmp_path / "run"
    write_selection(run, fake)
    train_run(run, console=quiet(), stop_after=1, **FAST)
    before = digest(checkpoint_path(run))
    write_selection(run, fake, pairs=PAIRS[:2])  # the search was redone with other results
    with pytest.raises(KlasError, match="another selection"):
        train_run(run, console=quiet(), resume=True, **FAST)
    assert digest(checkpoint_path(run)) == before
    write_selection(run, fake)
    with pytest.raises(KlasError, match="other options: lr"):
        train_run(run, console=quiet(), resume=True, **{**FAST, "lr": 0.5})
    with pytest.raises(KlasError, match="--resume to continue it or --overwrite"):
        train_run(run, console=quiet(), **FAST)
    assert digest(checkpoint_path(run)) == before
    res = train_run(run, console=quiet(), overwrite=True, **FAST)  # explicit start over
    assert res.complete


def test_bad_inputs_are_one_line_errors_and_write_nothing(fake, tmp_path):
    with pytest.raises(KlasError, match="no run directory"):
        train_run(tmp_path / "nowhere", console=quiet(), **FAST)
    run = tmp_path / "run"
    write_selection(run, fake)
    with pytest.raises(KlasError, match="no checkpoint"):
        train_run(run, console=quiet(), resume=True, **FAST)
    for kwargs, msg in ((dict(loss="mse"), "unknown loss"), (dict(sampling="greedy"), "--sampling"),
                        (dict(layer="conv"), "--layer"), (dict(epochs=0), "--epochs"), (dict(lr=-1.0), "--lr"),
                        (dict(lr=float("inf")), "--lr"), (dict(weight_decay=float("nan")), "--weight-decay"),
                        (dict(weight_decay=-1.0), "--weight-decay"), (dict(warmup=1.0), "--warmup"),
                        (dict(temperature=float("nan")), "--temperature"), (dict(ridge=float("inf")), "--ridge"),
                        (dict(batch_size=0), "--batch-size"), (dict(eval_batch_size=0), "--eval-batch-size")):
        with pytest.raises(KlasError, match=msg):
            train_run(run, console=quiet(), **{**FAST, **kwargs})
    # the cache changed since the search
    fake.registry[str(fake.path)] = FakeCache(fake.path, fingerprint="fp-2")
    with pytest.raises(KlasError, match="changed since the search"):
        train_run(run, console=quiet(), **FAST)
    # the cache is gone
    del fake.registry[str(fake.path)]
    with pytest.raises(KlasError, match="gone"):
        train_run(run, console=quiet(), **FAST)
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith(".")) == ["selection.json"]


def test_distillation_and_feature_matching_do_not_read_labels(fake, tmp_path):
    """distill / ffm / lfm learn from the target model's own outputs: scrambling the train labels changes nothing."""
    opts = dict(FAST, loss="distill=1,ffm=0.5,lfm=1", epochs=1)
    write_selection(tmp_path / "a", fake)
    train_run(tmp_path / "a", console=quiet(), **opts)
    scrambled = FakeCache(tmp_path / "cache2", permute_train_labels=True)
    fake.registry[str(scrambled.path)] = scrambled
    write_selection(tmp_path / "b", scrambled)
    train_run(tmp_path / "b", console=quiet(), **opts)
    a = load_checkpoint(checkpoint_path(tmp_path / "a"))["stitch_states"]
    b = load_checkpoint(checkpoint_path(tmp_path / "b"))["stitch_states"]
    _states_equal(a, b)
    # ...whereas cross-entropy does read them
    write_selection(tmp_path / "c", fake)
    write_selection(tmp_path / "d", scrambled)
    train_run(tmp_path / "c", console=quiet(), **{**opts, "loss": "ce"})
    train_run(tmp_path / "d", console=quiet(), **{**opts, "loss": "ce"})
    c = load_checkpoint(checkpoint_path(tmp_path / "c"))["stitch_states"]
    d = load_checkpoint(checkpoint_path(tmp_path / "d"))["stitch_states"]
    assert any(not torch.equal(c[s][k], d[s][k]) for s in c for k in c[s])


def test_bucket_sampling_draws_buckets_uniformly():
    buckets = [0, 0, 0, 1]  # three stitches share bucket 0, one is alone in bucket 1
    seq = _stitch_sequence(4, 4000, "bucket", buckets, seed=0, epoch=1)
    share = seq.count(3) / len(seq)
    assert 0.45 < share < 0.55  # half of the steps go to the lone bucket-1 stitch
    uni = _stitch_sequence(4, 4000, "uniform", buckets, seed=0, epoch=1)
    assert 0.2 < uni.count(3) / len(uni) < 0.3
    assert seq == _stitch_sequence(4, 4000, "bucket", buckets, seed=0, epoch=1)  # seeded


def _real_cache_available() -> bool:
    try:
        from klas.zoo import is_zoo_model  # noqa: F401  (load_model needs it)
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _real_cache_available(), reason="klas.zoo (demo architectures) not importable yet")
def test_train_on_a_real_cache(tmp_path, monkeypatch):
    """The real cache reader, the demo ViT architectures (random init) and digits, end to end."""
    from klas.cache import build_cache, open_cache

    monkeypatch.chdir(tmp_path)
    build_cache(["klas_vit_ti", "klas_vit_s"], "digits", "cache/c", limit=200, random_init=True,
                root=Path("cache"), console=quiet(), progress=False)
    cache = open_cache("cache/c")
    prof = cache.profiles
    pairs = [("klas_vit_ti", 3, "klas_vit_s", 3), ("klas_vit_ti", 5, "klas_vit_s", 2)]
    sel = {"format": "klas.selection/1", "cache": {"path": "cache/c", "fingerprint": cache.fingerprint},
           "budget_gflops": None, "buckets": 2, "layer": "linear",
           "anchors": [{"name": n, "macs": prof[n].macs, "params": prof[n].params} for n in cache.model_names],
           "stitches": [{"id": stitch_id(*p), "src": p[0], "src_cut": p[1], "dst": p[2], "dst_cut": p[3], "bucket": k}
                        for k, p in enumerate(pairs)]}
    run = Path("cache/runs/r")
    run.mkdir(parents=True)
    (run / "selection.json").write_text(json.dumps(sel))
    res = train_run(run, epochs=1, batch_size=16, root=Path("cache"), console=quiet(), progress=False,
                    latency_batch=8, latency_repeats=2)
    rows = {r["id"]: r for r in res.rows}
    assert set(rows) == {stitch_id(*p) for p in pairs} | set(cache.model_names)
    assert rows[stitch_id(*pairs[0])]["latency_batch"] == 8 and rows["klas_vit_ti"]["latency_ms"] > 0
    shutil.rmtree("cache/c")
    with pytest.raises(KlasError, match="gone"):
        train_run(run, epochs=1, resume=True, root=Path("cache"), console=quiet(), progress=False)


DDP_SCRIPT = r'''
import io, os, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
import klas.cache
from test_train import FakeCache, quiet
cache = FakeCache(Path({cache!r}))
klas.cache.open_cache = lambda p: cache
from klas.train import train_run
train_run(Path({run!r}), epochs=1, batch_size=16, latency=False, progress=False, console=quiet(),
          loss="ce=1,ffm=0.5", full_tune=True)
'''


def test_torchrun_two_processes_match_one_process_with_the_global_batch(fake, tmp_path):
    """Under torchrun (gloo, 2 ranks x 16 images) training equals one process with batch 32, up to float rounding."""
    import os
    import subprocess

    for run in ("one", "two"):
        write_selection(tmp_path / run, fake)
    train_run(tmp_path / "one", epochs=1, batch_size=32, latency=False, progress=False, console=quiet(),
              loss="ce=1,ffm=0.5", full_tune=True)
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent), cache=str(fake.path), run=str(tmp_path / "two")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = load_checkpoint(checkpoint_path(tmp_path / "one"))
    b = load_checkpoint(checkpoint_path(tmp_path / "two"))
    assert b["config"]["world_size"] == 2 and b["config"]["batch_size"] == 16
    for group in ("stitch_states", "anchor_states"):
        for name, state in a[group].items():
            for k, v in state.items():
                torch.testing.assert_close(b[group][name][k], v, rtol=1e-4, atol=1e-5)
    assert [r["acc_after"] for r in read_results(tmp_path / "one")] == [r["acc_after"] for r in read_results(tmp_path / "two")]


def test_train_config_validates_once_and_names_the_flag():
    from klas.train import TrainConfig

    for kwargs, msg in ((dict(weight_decay=float("nan")), r"--weight-decay must be a finite number >= 0, got nan"),
                        (dict(lr=float("inf")), r"--lr must be a finite number > 0, got inf"),
                        (dict(warmup=1.0), r"--warmup .* in \[0, 1\)"), (dict(epochs=1.5), "--epochs"),
                        (dict(steps_per_epoch=0), "--steps-per-epoch"), (dict(amp="fp32"), "--amp"),
                        (dict(sampling="greedy"), "--sampling"), (dict(loss="mse"), "unknown loss"),
                        (dict(full_tune="yes"), "--full-tune"), (dict(teacher="biggest"), "--teacher"),
                        (dict(anchor_routes=True, full_tune=False), "--anchor-routes .* needs --full-tune"),
                        (dict(anchor_routes="yes", full_tune=True), "--anchor-routes"),
                        (dict(first_epochs=5, epochs=5), r"--first-epochs \(5\) must be below --epochs \(5\)"),
                        (dict(first_epochs=-1), "--first-epochs"), (dict(layer="conv"), "--layer"),
                        (dict(first_loss="xent"), r"unknown loss 'xent' in --first-loss"),
                        (dict(first_loss="lfm=0"), "--first-loss 'lfm=0' has no positive weight"),
                        (dict(loss="lfm=-1"), "loss weight for lfm must be a non-negative")):
        with pytest.raises(KlasError, match=msg):
            TrainConfig(**kwargs)
    with pytest.raises(KlasError, match="unknown training option"):
        TrainConfig().with_overrides(epoch=3)
    cfg = TrainConfig(loss="ffm=0.5+ce", first_loss="lfm+ffm=2", first_epochs=1).resolved(steps_per_epoch=7, layer="linear")
    assert cfg.loss == "ce=1,ffm=0.5" and cfg.first_loss == "ffm=2,lfm=1" and cfg.steps_per_epoch == 7
    assert cfg.loss_weights_at(1) == {"lfm": 1.0, "ffm": 2.0} and cfg.loss_weights_at(2) == {"ce": 1.0, "ffm": 0.5}
    assert {"first_loss", "first_epochs"} <= set(cfg.recipe())
    assert list(cfg.recipe()) == list(TrainConfig.recipe_keys())
    assert "resume" not in cfg.recipe() and "device" not in cfg.recipe()


def test_train_run_takes_a_config_and_overrides(fake, tmp_path):
    from klas.train import TrainConfig

    write_selection(tmp_path / "a", fake)
    res = train_run(tmp_path / "a", TrainConfig(epochs=1, batch_size=32, latency=False, eval_batch_size=100),
                    console=quiet(), progress=False, steps_per_epoch=2)
    manifest = json.loads((tmp_path / "a" / "train.json").read_text())
    assert res.complete and manifest["config"] == res.config
    assert set(manifest["config"]) == set(TrainConfig.recipe_keys()) | {"world_size", "device", "amp"}
    assert manifest["config"]["steps_per_epoch"] == 2 and manifest["config"]["layer"] == "linear"


def test_anchor_routes_are_sampled_with_full_tune(fake, tmp_path, monkeypatch):
    import klas.train.loop as loop
    from klas.train import TrainConfig
    from klas.train.core import sampled_routes

    routes, buckets = sampled_routes(["s0", "s1", "s2"], [0, 0, 3], [TI, SM])
    assert routes == ["s0", "s1", "s2", TI, SM] and buckets == [0, 0, 3, 4, 5]  # each anchor a bucket of its own
    for sampling in ("uniform", "bucket"):
        drawn = {routes[i] for i in _stitch_sequence(len(routes), 400, sampling, buckets, 0, 1)}
        assert drawn == set(routes)
    seen: list[str] = []
    real_fit = loop.fit

    def recording_fit(net, data, sequence, *args, **kwargs):
        seen.extend(sequence)
        return real_fit(net, data, sequence, *args, **kwargs)

    monkeypatch.setattr(loop, "fit", recording_fit)
    assert TrainConfig().full_tune and TrainConfig().resolved(steps_per_epoch=1, layer="linear").anchor_routes
    for name, opts in (("frozen", dict(full_tune=False)), ("full", dict(full_tune=True)),
                       ("full-no-routes", dict(full_tune=True, anchor_routes=False))):
        seen.clear()
        write_selection(tmp_path / name, fake)
        res = train_run(tmp_path / name, console=quiet(), steps_per_epoch=40, **{**FAST, **opts})
        assert set(seen) & set(MODELS) == (set(MODELS) if name == "full" else set()), name
        assert res.config["anchor_routes"] is (name == "full")


def test_lfm_stage_trains_stitches_only_then_the_loss_samples_anchors(fake, tmp_path, monkeypatch):
    """An lfm-only first stage gives anchors no term, so its steps sample only stitches; the second
    stage (ce) samples the anchors as routes again; lfm moves the stitch layers."""
    import klas.train.loop as loop

    seen: dict[int, list] = {}
    real_fit = loop.fit

    def recording_fit(net, data, sequence, objective, *args, **kwargs):
        seen[len(seen) + 1] = (list(sequence), dict(objective.weights))
        return real_fit(net, data, sequence, objective, *args, **kwargs)

    monkeypatch.setattr(loop, "fit", recording_fit)
    write_selection(tmp_path / "r", fake)
    res = train_run(tmp_path / "r", console=quiet(), steps_per_epoch=30,
                    **{**FAST, "full_tune": True, "first_loss": "lfm", "first_epochs": 1})
    assert res.config["first_loss"] == "lfm=1" and res.config["first_epochs"] == 1
    (seq1, w1), (seq2, w2) = seen[1], seen[2]
    assert w1 == {"lfm": 1.0} and w2 == {"ce": 1.0}
    assert not set(seq1) & set(MODELS) and set(seq2) & set(MODELS)
    assert res.history[0]["loss"] > 0
    rows = {r["id"]: r for r in res.rows}
    assert any(rows[stitch_id(*p)]["acc_after"] != rows[stitch_id(*p)]["acc_before"] for p in PAIRS)


def test_distillation_from_the_largest_anchor():
    from klas.train.core import Objective

    torch.manual_seed(0)
    logits = torch.randn(4, 10)
    targets = {"small": {"logits": torch.randn(6, 10)}, "large": {"logits": torch.randn(6, 10)}}
    p = torch.tensor([5, 0, 2, 3])
    y = torch.zeros(4, dtype=torch.long)
    own = Objective({"distill": 1.0}, 1.0, targets)(logits, None, y, p, "small")
    big = Objective({"distill": 1.0}, 1.0, targets, teacher="large")(logits, None, y, p, "small")
    ref = torch.nn.functional.kl_div(logits.log_softmax(1), targets["large"]["logits"][p].log_softmax(1),
                                     reduction="batchmean", log_target=True)
    torch.testing.assert_close(big, ref)
    assert not torch.allclose(own, big)


def test_cli_train_defaults_are_the_config_defaults():
    import dataclasses

    import typer

    from klas.cli import app
    from klas.train import TrainConfig

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    cmd = typer.main.get_command(app).commands["train"]
    checked = 0
    for param in cmd.params:
        if param.name in defaults and param.name not in ("device", "root"):
            assert param.default == defaults[param.name], param.name
            checked += 1
    assert checked >= 15
