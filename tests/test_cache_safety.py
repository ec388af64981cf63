"""klas cache under bad input and faults (issue 8): nothing lost, nothing wrong read as valid, one line.

Every refusal goes through the CLI entry point in-process (``klas.cli.main``): exit status 2, one
``error:`` line, no traceback. Builds use one tiny random-init model at 32x32 on 24 images per split.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import klas.cache.writer as writer
from klas.cache import build_cache, open_cache
from klas.cache.integrity import VERIFIED
from klas.cli import main
from klas.data import resolve_workers
from klas.errors import KlasError
from klas.fs import DirLock, claim_dir
from klas.utils import sha256_json

MODEL = "resnet10t"
KW = dict(random_init=True, limit=24, batch_size=8, preprocess={"input_size": [3, 32, 32]}, progress=False)
CLI = ["--random-init", "--limit", "24", "--batch-size", "8", "--input-size", "32"]


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> Path:
    """A finished one-model cache; tests copy it before changing anything."""
    root = tmp_path_factory.mktemp("root")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        build_cache([MODEL], "digits", root / "ref", root=root, **KW)
    finally:
        torch.set_num_threads(threads)
    return root / "ref"


def klas(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """Run ``klas ARGS`` in-process; returns (exit status, stderr)."""
    monkeypatch.setattr(sys, "argv", ["klas", *args])
    with pytest.raises(SystemExit) as done:
        main()
    return done.value.code, capsys.readouterr().err


def refused(monkeypatch, capsys, *args: str) -> str:
    """Run ``klas ARGS`` and check it was refused the way every error is; returns the message."""
    code, err = klas(monkeypatch, capsys, *args)
    lines = [line for line in err.splitlines() if line.strip()]  # a progress bar may come first
    assert code == 2, err
    assert [line for line in lines if "error" in line.lower()] == lines[-1:], err
    assert lines[-1].startswith("error: ") and "Traceback" not in err
    return lines[-1]


def copy_of(ref: Path, dest: Path, keep_mtimes: bool = True) -> Path:
    shutil.copytree(ref, dest, copy_function=shutil.copy2 if keep_mtimes else shutil.copyfile)
    return dest


def _arrays(path: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(path)): np.load(p) for p in sorted(path.rglob("*.npy"))}


def _no_model_loads(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr(writer, "load_model", boom)


# -- 1. --overwrite never deletes what klas did not create -------------------------------------------------

def _users_dir(tmp_path: Path) -> tuple[list[str], Path]:
    d = tmp_path / "mine"
    d.mkdir()
    (d / "photo.jpg").write_bytes(b"precious")
    return ["--data", "digits", "--out", str(d), "--root", str(tmp_path / "root")], d


def _klas_root(tmp_path: Path) -> tuple[list[str], Path]:
    root = tmp_path / "root"
    (root / "zoo").mkdir(parents=True)
    (root / "zoo" / "klas_vit_ti.safetensors").write_bytes(b"weights")
    (root / "data").mkdir()
    (root / "data" / "digits.npy").write_bytes(b"images")
    return ["--data", "digits", "--out", str(root), "--root", str(root)], root


def _data_folder(tmp_path: Path) -> tuple[list[str], Path]:
    imgs = tmp_path / "imgs"
    for cls in ("cat", "dog"):
        (imgs / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(imgs / cls / f"{i}.png")
    return ["--data", str(imgs), "--out", str(imgs), "--root", str(tmp_path / "root")], imgs


@pytest.mark.parametrize("make", [_users_dir, _klas_root, _data_folder], ids=["users-dir", "klas-root", "data-folder"])
def test_overwrite_never_deletes_a_directory_klas_did_not_create(make, tmp_path, monkeypatch, capsys):
    args, victim = make(tmp_path)
    before = {p: p.read_bytes() for p in victim.rglob("*") if p.is_file()}
    _no_model_loads(monkeypatch)
    for extra in ([], ["--overwrite"]):
        msg = refused(monkeypatch, capsys, "cache", "--model", MODEL, *CLI, *args, *extra)
        assert "klas did not create" in msg and "choose a new or empty --out" in msg
        assert "pass --overwrite" not in msg
    assert {p: p.read_bytes() for p in victim.rglob("*") if p.is_file()} == before


def _as_format_1(cache: Path, same_config: bool) -> None:
    """Turn a cache into what klas wrote before format 2: no marker, no ``files``, the /1 fingerprint."""
    (cache / ".klas-dir.json").unlink()
    m = json.loads((cache / "manifest.json").read_text())
    if same_config:
        m["fingerprint"] = sha256_json({
            "format": "klas.cache/1",
            "models": [[x["spec"], x["weights_sha256"]] for x in m["models"]],
            "data": {k: m["data"][k] for k in ("fingerprint", "seed", "fractions", "limit", "preprocess")},
            "splits": list(m["splits"]),
            "amp": m["amp"],
        })
    m["format"] = "klas.cache/1"
    del m["files"]
    (cache / "manifest.json").write_text(json.dumps(m))


def test_an_old_format_cache_is_rebuilt_only_when_it_is_the_same_configuration(tmp_path, ref, one_thread):
    other = copy_of(ref, tmp_path / "other")
    _as_format_1(other, same_config=False)
    with pytest.raises(KlasError, match=r"format klas.cache/1 of an older klas.*--overwrite"):
        open_cache(other)
    with pytest.raises(KlasError, match=r"format klas.cache/1 of an older klas.*pass --overwrite"):
        build_cache([MODEL], "digits", other, root=ref.parent, **KW)
    assert build_cache([MODEL], "digits", other, root=ref.parent, overwrite=True, **KW).status == "written"
    same = copy_of(ref, tmp_path / "same")
    _as_format_1(same, same_config=True)
    assert build_cache([MODEL], "digits", same, root=ref.parent, **KW).status == "written"  # no --overwrite needed
    for cache in (other, same):
        assert open_cache(cache, verify=True).manifest["format"] == "klas.cache/2"


# -- 2. integrity of the arrays ---------------------------------------------------------------------------

def test_a_copied_cache_is_hashed_once_and_accepted(ref, tmp_path, monkeypatch):
    copy = copy_of(ref, tmp_path / "copy", keep_mtimes=False)
    open_cache(copy)  # mtimes moved, contents equal: accepted after hashing
    assert (copy / VERIFIED).is_file()
    import klas.cache.integrity as integrity

    monkeypatch.setattr(integrity, "sha256_file", lambda p: pytest.fail(f"hashed {p} again"))
    open_cache(copy)


def test_changed_rows_are_refused_and_never_up_to_date(ref, tmp_path, monkeypatch, capsys):
    bad = copy_of(ref, tmp_path / "bad")
    feats = np.load(bad / "score" / MODEL / "features.npy", mmap_mode="r+")
    feats[3:7] = 1.5  # finite garbage: only the checksum can tell
    feats.flush()
    del feats
    with pytest.raises(KlasError, match=r"score/resnet10t/features.npy changed \(its sha256 differs\).*--overwrite"):
        open_cache(bad)
    msg = refused(monkeypatch, capsys, "cache", "--model", MODEL, *CLI, "--data", "digits", "--out", str(bad),
                  "--root", str(ref.parent))
    assert "features.npy changed" in msg and "up to date" not in msg


def test_a_truncated_file_is_refused(ref, tmp_path):
    bad = copy_of(ref, tmp_path / "cut")
    path = bad / "eval" / MODEL / "logits.npy"
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size // 2)
    with pytest.raises(KlasError, match=r"eval/resnet10t/logits.npy changed size"):
        build_cache([MODEL], "digits", bad, root=ref.parent, **KW)
    (bad / "eval" / "labels.npy").unlink()
    with pytest.raises(KlasError, match=r"eval/labels.npy is missing"):
        open_cache(bad)


def test_verify_finds_a_change_that_kept_size_and_mtime(ref, tmp_path, monkeypatch, capsys):
    bad = copy_of(ref, tmp_path / "sly")
    path = bad / "probe-train" / "labels.npy"
    st = path.stat()
    labels = np.load(path)
    np.save(path, (labels + 1) % 10)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    open_cache(bad)  # the cheap check cannot see it
    with pytest.raises(KlasError, match="labels.npy changed"):
        open_cache(bad, verify=True)
    msg = refused(monkeypatch, capsys, "cache", "--verify", "--out", str(bad))
    assert "probe-train/labels.npy changed" in msg
    fine = copy_of(ref, tmp_path / "fine")
    code, _ = klas(monkeypatch, capsys, "cache", "--verify", "--out", str(fine))
    assert code == 0
    summary = build_cache([MODEL], "digits", fine, root=ref.parent, verify=True, **KW)
    assert summary.status == "up to date, verified" and summary.images == 0


# -- 3. non-finite results ---------------------------------------------------------------------------------

def test_nan_weights_stop_the_build_and_leave_it_unfinished(ref, tmp_path, monkeypatch, capsys, one_thread):
    from safetensors.torch import save_file

    from klas.models import build_model, parse_spec

    model, _ = build_model(parse_spec(MODEL), random_init=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["conv1.0.weight"][0, 0, 0, 0] = float("nan")
    save_file(state, str(tmp_path / "nan.safetensors"))
    out = tmp_path / "c"
    msg = refused(monkeypatch, capsys, "cache", "--model", f"{MODEL}={tmp_path / 'nan.safetensors'}", "--limit", "24",
                  "--batch-size", "8", "--input-size", "32", "--data", "digits", "--out", str(out),
                  "--root", str(ref.parent))
    assert "model resnet10t gives NaN or inf" in msg and "weights hold NaN/inf" in msg
    assert not (out / "manifest.json").exists()
    with pytest.raises(KlasError, match="unfinished: model resnet10t gives NaN"):
        open_cache(out)


# -- 4. a kill while the progress file is written ----------------------------------------------------------

def test_damaged_progress_files_are_recomputed(ref, tmp_path, monkeypatch, one_thread):
    out = tmp_path / "part"
    calls = []

    def interrupted(adapter, x):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return real(adapter, x)

    real = writer.pooled_forward
    monkeypatch.setattr(writer, "pooled_forward", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_cache([MODEL], "digits", out, root=ref.parent, **KW)
    monkeypatch.setattr(writer, "pooled_forward", real)
    progress = out / ".progress" / "probe-train.rank0.npy"
    assert progress.is_file() and not list(out.rglob(".*.tmp*"))
    progress.write_bytes(progress.read_bytes()[:20])  # torn
    (out / ".progress" / "probe-train.rank0.tmp.npy").write_bytes(b"\x93NUMPY")  # what older klas left behind
    summary = build_cache([MODEL], "digits", out, root=ref.parent, workers=2, **KW)  # loader processes: same bytes
    assert summary.status == "resumed"
    a, b = _arrays(ref), _arrays(out)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# -- 5. tracebacks -> one line ------------------------------------------------------------------------------

def test_weights_of_another_shape_are_one_line(ref, tmp_path, monkeypatch, capsys):
    from safetensors.torch import save_file

    from klas.models import build_model, parse_spec

    model, _ = build_model(parse_spec(MODEL), random_init=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["conv1.0.weight"] = torch.zeros(7, 3, 3, 3)
    save_file(state, str(tmp_path / "w.safetensors"))
    msg = refused(monkeypatch, capsys, "cache", "--model", f"{MODEL}={tmp_path / 'w.safetensors'}", "--data", "digits",
                  "--out", str(tmp_path / "c"), "--root", str(ref.parent))
    assert "do not fit resnet10t (conv1.0.weight has shape [7, 3, 3, 3] in the file" in msg


def _a_file(tmp_path: Path) -> Path:
    (tmp_path / "f").write_text("x")
    return tmp_path / "f"


@pytest.mark.parametrize("where", ["out-file", "out-under-file", "root-file", "root-under-file"])
def test_unwritable_out_or_root_fails_before_any_model_loads(where, tmp_path, monkeypatch, capsys):
    f = _a_file(tmp_path)
    place = f if where.endswith("-file") and "under" not in where else f / "sub"
    out, root = (place, tmp_path / "root") if where.startswith("out") else (tmp_path / "c", place)
    flag = "--out" if where.startswith("out") else "--root"
    _no_model_loads(monkeypatch)
    msg = refused(monkeypatch, capsys, "cache", "--model", MODEL, *CLI, "--data", "digits", "--out", str(out),
                  "--root", str(root))
    assert f"{flag} {place}" in msg and f"choose another {flag}" in msg
    assert f.read_text() == "x"


def test_zoo_root_is_checked_before_training(tmp_path, monkeypatch, capsys):
    import klas.zoo.run

    monkeypatch.setattr(klas.zoo.run, "train_and_record", lambda *a, **k: pytest.fail("trained before the check"))
    msg = refused(monkeypatch, capsys, "zoo", "--root", str(_a_file(tmp_path)))
    assert "--root" in msg and "is a file" in msg


def test_a_second_writer_gets_one_line(tmp_path, monkeypatch, capsys):
    out = claim_dir(tmp_path / "c", "cache", "--out")
    _no_model_loads(monkeypatch)
    with DirLock(out):
        msg = refused(monkeypatch, capsys, "cache", "--model", MODEL, *CLI, "--data", "digits", "--out", str(out),
                      "--root", str(tmp_path / "root"))
    assert f"another klas process (pid {os.getpid()}) is writing {out}" in msg


# -- 6./7. silent acceptance and unclear messages ------------------------------------------------------------

@pytest.mark.parametrize(
    "args,message",
    [
        (["--input-size", "0"], "--input-size must be a positive whole number of pixels, got 0"),
        (["--input-size", "-3"], "--input-size must be a positive whole number of pixels, got -3"),
        (["--split", ""], "--split is empty"),
        (["--split", " , "], "--split is empty"),
        (["--limit", "0"], "--limit must be a positive whole number of images per split, got 0"),
        (["--batch-size", "0"], "--batch-size must be a positive whole number, got 0"),
        (["--workers", "-1"], "--workers must be 'auto' or a whole number >= 0, got '-1'"),
        (["--workers", "many"], "--workers must be 'auto' or a whole number >= 0, got 'many'"),
    ],
)
def test_bad_values_are_named(args, message, tmp_path, monkeypatch, capsys):
    _no_model_loads(monkeypatch)
    msg = refused(monkeypatch, capsys, "cache", "--model", MODEL, "--random-init", "--data", "digits",
                  "--out", str(tmp_path / "c"), "--root", str(tmp_path / "root"), *args)
    assert message in msg
    assert not (tmp_path / "c").exists()


def test_workers_auto_is_zero_on_cpu_and_bounded_on_cuda(monkeypatch):
    assert resolve_workers("auto", "cpu") == 0
    assert 1 <= resolve_workers("auto", "cuda") <= 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1000")
    assert resolve_workers("auto", "cuda") == 1
    assert resolve_workers("3", "cpu") == resolve_workers(3, "cuda") == 3
