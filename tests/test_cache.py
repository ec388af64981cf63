"""klas cache: contents, resumability after a kill, torchrun sharding, and refusing bad input."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from klas.cache import build_cache, open_cache, pooled_forward
from klas.cli import main as cli_main
from klas.errors import KlasError
from klas.models import load_model

MODELS = ["resnet18", "resnet34"]
KW = dict(random_init=True, limit=24, batch_size=8, preprocess={"input_size": [3, 32, 32]}, progress=False)


def _cli(*args: str, cwd: Path, **popen) -> list[str]:
    return [sys.executable, "-m", "klas", *args]


@pytest.fixture(scope="module")
def ref_cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("root")
    out = root / "ref"
    build_cache(MODELS, "digits", out, root=root, **KW)
    return out


def _arrays(path: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(path)): np.load(p) for p in sorted(path.rglob("*.npy"))}


def test_cache_holds_what_the_models_compute(ref_cache):
    cache = open_cache(ref_cache)
    assert cache.model_names == MODELS
    assert cache.splits == ["probe-train", "score", "eval"]
    ids = [set(cache.ids(s).tolist()) for s in cache.splits]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    # recompute one model on the score split and compare with what was stored (float16 on disk)
    loaded = load_model("resnet34", random_init=True, input_size=(3, 32, 32))
    x = torch.stack([cache.dataset("score", root=ref_cache.parent)[i][0] for i in range(len(cache.ids("score")))])
    feats, logits = pooled_forward(loaded.adapter, x)
    np.testing.assert_allclose(cache.features("score", "resnet34"), feats.numpy(), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(cache.logits("score", "resnet34"), logits.numpy(), rtol=2e-3, atol=2e-3)
    # representation columns: rep 0 is the stem's pooled output, widths follow the profile
    prof = cache.profiles["resnet34"]
    for rep in prof.reps:
        assert cache.rep_features("score", "resnet34", rep.index).shape == (len(x), rep.width)
    manifest = cache.manifest
    assert manifest["models"][0]["weights_sha256"] and manifest["data"]["fingerprint"]
    assert {"torch", "timm", "klas"} <= set(manifest["versions"])


def test_same_command_again_is_a_no_op(ref_cache):
    before = (ref_cache / "manifest.json").stat().st_mtime_ns
    summary = build_cache(MODELS, "digits", ref_cache, root=ref_cache.parent, **KW)
    assert summary.status == "up to date" and summary.images == 0
    assert (ref_cache / "manifest.json").stat().st_mtime_ns == before


def test_another_configuration_is_refused_without_overwrite(ref_cache, tmp_path):
    with pytest.raises(KlasError, match="another configuration.*--overwrite"):
        build_cache(["resnet18"], "digits", ref_cache, root=ref_cache.parent, **KW)
    copy = tmp_path / "copy"
    shutil.copytree(ref_cache, copy)
    summary = build_cache(["resnet18"], "digits", copy, root=ref_cache.parent, overwrite=True, **KW)
    assert summary.status == "written" and open_cache(copy).model_names == ["resnet18"]


def test_killed_run_resumes_to_an_identical_cache(ref_cache, tmp_path):
    out = tmp_path / "killed"
    args = ["cache", "--random-init", "--data", "digits", "--limit", "24", "--batch-size", "8",
            "--input-size", "32", "--out", str(out), "--root", str(ref_cache.parent)]
    for m in MODELS:
        args += ["--model", m]
    proc = subprocess.Popen(_cli(*args, cwd=tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list((out / ".progress").glob("*.npy")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "a killed cache must not look complete"
    with pytest.raises(KlasError, match="incomplete.*re-run the same"):
        open_cache(out)
    done = subprocess.run(_cli(*args, cwd=tmp_path), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resumed" in done.stdout or "written" in done.stdout
    a, b = _arrays(ref_cache), _arrays(out)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_torchrun_shards_equal_single_process(ref_cache, tmp_path):
    out = tmp_path / "ddp"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc-per-node", "2", "--master-port", "29517", "-m", "klas", "cache",
           "--random-init", "--data", "digits", "--limit", "24", "--batch-size", "8", "--input-size", "32",
           "--out", str(out), "--root", str(ref_cache.parent), "--device", "cpu"]
    for m in MODELS:
        cmd += ["--model", m]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = _arrays(ref_cache), _arrays(out)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert json.loads((out / "manifest.json").read_text())["fingerprint"] == open_cache(ref_cache).fingerprint


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "resnet18", "--data", "/no/such/dir"], "not found"),
        (["--model", "resnt18", "--data", "digits"], "did you mean"),
        (["--model", "ghostnet_050", "--data", "digits", "--random-init"], "unsupported architecture"),
        (["--model", "resnet18", "--model", "resnet18", "--data", "digits"], "give one an alias"),
        (["--model", "resnet18", "--data", "digits", "--split", "train"], "unknown split"),
        (["--model", "resnet18", "--data", "digits", "--random-init", "--amp", "fp8", "--device", "cpu"], "unknown --amp 'fp8'"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, message, tmp_path, capsys):
    """In process through the CLI's entry point (klas.cli.main); the first case also as a real
    subprocess, the way a user runs it, to tie the two."""
    argv = ["cache", *args, "--out", str(tmp_path / "c")]
    with pytest.raises(SystemExit) as exit_:
        cli_main(argv)
    stderr = capsys.readouterr().err
    assert exit_.value.code == 2 and message in stderr and "Traceback" not in stderr
    assert len([line for line in stderr.splitlines() if line.strip()]) == 1, stderr
    if message == "not found":
        done = subprocess.run(_cli(*argv, cwd=tmp_path), capture_output=True, text=True)
        assert done.returncode == 2 and done.stderr == stderr
    assert not (tmp_path / "c" / "manifest.json").exists()


def test_empty_image_folder_is_refused(tmp_path):
    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    with pytest.raises(KlasError):
        build_cache(["resnet18"], str(tmp_path / "imgs"), tmp_path / "c", root=tmp_path, **KW)
    assert not (tmp_path / "c" / "manifest.json").exists()


def test_cache_on_a_named_digits_set_reopens_that_set(tmp_path):
    """A cache of ``--data digits-hard`` records the set's name and reopens the same images, as
    ``klas search`` and ``klas train`` do (not the demo's ``digits``, which would fail the fingerprint)."""
    build_cache(["resnet18"], "digits-hard", tmp_path / "c", root=tmp_path, **KW)
    cache = open_cache(tmp_path / "c")
    assert cache.manifest["data"]["source"] == "digits-hard"
    src = cache.source(root=tmp_path)
    assert src.name == "digits-hard" and src.fingerprint == cache.manifest["data"]["fingerprint"]
