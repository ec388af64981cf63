"""klas.fs: owned directories, locks, atomic writes and pre-flight checks (what keeps user data safe)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from klas.errors import KlasError
from klas.fs import (
    MARKER, DirLock, atomic_path, atomic_write, check_free_space, claim_dir, clear_dir, dir_kind,
    ensure_writable_dir, read_json, write_json_atomic,
)


def test_claim_creates_and_marks_a_new_directory(tmp_path):
    d = claim_dir(tmp_path / "a" / "b", "cache", "--out")
    assert d.is_dir() and dir_kind(d) == "cache"
    assert claim_dir(d, "cache", "--out") == d  # idempotent


def test_claim_refuses_a_users_directory_and_leaves_it_alone(tmp_path):
    (tmp_path / "photo.jpg").write_bytes(b"precious")
    with pytest.raises(KlasError, match="klas did not create"):
        claim_dir(tmp_path, "cache", "--out")
    with pytest.raises(KlasError, match="not a klas cache"):
        clear_dir(tmp_path, "cache")
    assert (tmp_path / "photo.jpg").read_bytes() == b"precious"
    assert not (tmp_path / MARKER).exists()


def test_claim_refuses_another_kind(tmp_path):
    claim_dir(tmp_path / "r", "run", "--run")
    with pytest.raises(KlasError, match="klas run directory, not a cache"):
        claim_dir(tmp_path / "r", "cache", "--out")


def test_legacy_directories_are_recognised(tmp_path):
    (tmp_path / "manifest.json").write_text("{}")
    assert claim_dir(tmp_path, "cache", "--out", legacy=lambda p: "cache") == tmp_path
    assert dir_kind(tmp_path) == "cache"


def test_clear_keeps_marker_and_named_entries(tmp_path):
    d = claim_dir(tmp_path / "c", "cache", "--out")
    (d / "x").mkdir()
    (d / "x" / "f").write_text("1")
    (d / "keep.json").write_text("1")
    clear_dir(d, "cache", keep=("keep.json",))
    assert sorted(p.name for p in d.iterdir()) == sorted([MARKER, "keep.json"])


def test_writable_checks_name_the_flag(tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(KlasError, match=r"--run .* is a file"):
        ensure_writable_dir(f, "--run")
    with pytest.raises(KlasError, match=r"cannot write to --out .*a file is in the way"):
        ensure_writable_dir(f / "sub", "--out")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_writable_refuses_a_read_only_directory(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(KlasError, match="permission denied"):
            ensure_writable_dir(ro / "x", "--out")
    finally:
        ro.chmod(0o755)


def test_free_space_message_has_readable_units(tmp_path):
    with pytest.raises(KlasError, match=r"need [\d.]+ GiB, [\d.]+ (GiB|MiB|KiB|B) free"):
        check_free_space(tmp_path, 1 << 62)


def test_atomic_write_leaves_old_file_on_error(tmp_path):
    p = tmp_path / "a.json"
    write_json_atomic(p, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_write(p) as fh:
            fh.write("torn")
            raise RuntimeError("boom")
    assert read_json(p) == {"v": 1}
    assert [x.name for x in tmp_path.iterdir()] == ["a.json"]
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "b.npy") as tmp:
            assert tmp.suffix == ".npy"
            tmp.write_bytes(b"x")
            raise RuntimeError("boom")
    assert [x.name for x in tmp_path.iterdir()] == ["a.json"]


def test_lock_refuses_a_second_process(tmp_path):
    with DirLock(tmp_path, "--run"):
        code = (
            "import sys; from klas.fs import DirLock; from klas.errors import KlasError\n"
            f"try:\n    DirLock({str(tmp_path)!r}, '--run').__enter__()\n"
            "except KlasError as e:\n    print(e); sys.exit(3)\n"
        )
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert res.returncode == 3, res.stderr
        assert f"another klas process (pid {os.getpid()}) is writing" in res.stdout
    with DirLock(tmp_path, "--run"):  # released on exit
        pass
