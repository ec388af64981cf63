"""Nothing wrong, ever silently (issue 18): the reliability pass's findings, kept from coming back.

Each case is what a careless or unlucky user does (a swapped checkpoint, an edited artifact, a full
disk, a hostile image, an input that would silently change the computation, a hint that names the
wrong command); each must end in one ``error:`` line, exit status 2, and nothing half-written that
looks complete. Everything runs in-process (``klas.cli.main`` or library calls) on tiny data.

The 51 cases of the earlier pass (issue 8) stay where they were added: ``tests/test_cache_safety.py``
(the cache: foreign directories, integrity, NaN, progress files, weights, permissions, one writer,
bad values), ``tests/test_run.py`` (runs: stale stages, foreign or unwritable ``--run``, one writer),
``tests/test_cli.py`` (usage errors) and the refusal tests of ``test_train.py`` / ``test_export.py``.
This module reuses their helpers (``refused``, ``klas``, the FakeCache of ``test_train.py``).
"""
from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_cache_safety import CLI, MODEL, klas, refused  # noqa: E402
from test_train import FAST, PAIRS, quiet, write_selection  # noqa: E402

from klas.errors import KlasError  # noqa: E402
from klas.train import train_run  # noqa: E402
from klas.train.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# Stages that bind ``klas.cache.open_cache`` when first imported: imported here, before a test serves a
# FakeCache through it (``_serve``), so that none of them keeps the stand-in after that test.
for _stage in ("klas.export", "klas.search", "klas.tree"):
    importlib.import_module(_stage)


# -- 1. artifacts verify what they claim -------------------------------------------------------------

def _serve(monkeypatch, cache) -> None:
    """``klas.cache.open_cache`` serves ``cache`` (a test_train FakeCache) for its own path."""
    import klas.cache

    def open_cache(path, verify=False):
        if str(path) != str(cache.path):
            raise KlasError(f"no cache at {path}")
        return cache

    monkeypatch.setattr(klas.cache, "open_cache", open_cache)


@pytest.fixture(scope="module")
def trained_pair(tmp_path_factory):
    """Two trainings of one selection on a FakeCache that differ only in their seed (built once)."""
    from test_train import FakeCache

    base = tmp_path_factory.mktemp("pair")
    cache = FakeCache(base / "cache")
    with pytest.MonkeyPatch.context() as mp:
        _serve(mp, cache)
        for seed in (0, 1):
            write_selection(base / "runs" / f"seed{seed}", cache, pairs=PAIRS[:2])
            train_run(base / "runs" / f"seed{seed}", console=quiet(), seed=seed, **FAST)
    return cache, base / "runs"


@pytest.fixture
def two_trainings(trained_pair, monkeypatch, tmp_path):
    """Copies of the two trainings, their cache served: (run, other run)."""
    cache, runs = trained_pair
    _serve(monkeypatch, cache)
    return [shutil.copytree(runs / f"seed{seed}", tmp_path / "runs" / f"seed{seed}") for seed in (0, 1)]


def test_export_refuses_a_checkpoint_of_another_training(two_trainings, monkeypatch, capsys):
    run, other = two_trainings
    shutil.copy(checkpoint_path(other), checkpoint_path(run))
    msg = refused(monkeypatch, capsys, "export", "pareto", str(run), "--models")
    assert f"checkpoint {checkpoint_path(run)}" in msg and "results.parquet" in msg
    assert f"klas train {run} --overwrite" in msg
    assert not (run / "export").exists()
    # results of a klas that recorded no checkpoint hash: the training config (seed included) tells them apart
    _drop_metadata(run / "results.parquet", b"klas.checkpoint_sha256")
    assert "is not the one results.parquet" in refused(monkeypatch, capsys, "export", "pareto", str(run), "--models")
    # the front alone does not need the checkpoint: it is still exported from results.parquet
    assert refused_or_ok(monkeypatch, capsys, "export", "pareto", str(run)) == 0
    # the hinted command repairs the run
    train_run(run, console=quiet(), overwrite=True, **FAST)
    assert refused_or_ok(monkeypatch, capsys, "export", "pareto", str(run), "--models") == 0


def _drop_metadata(path: Path, key: bytes) -> None:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    meta = {k: v for k, v in table.schema.metadata.items() if k != key}
    pq.write_table(table.replace_schema_metadata(meta), path)


def refused_or_ok(monkeypatch, capsys, *args: str) -> int:
    """Run ``klas ARGS`` in-process; its exit status (0 when it returned)."""
    from klas.cli import main

    monkeypatch.setattr(sys, "argv", ["klas", *args])
    try:
        main()
    except SystemExit as done:
        code = done.code or 0
    else:
        code = 0
    err = capsys.readouterr().err
    assert code == 0, err
    return code


# -- artifacts: load_stitched / load_tree check config against tensors -------------------------------

def _strip_hashes(art: Path) -> None:
    """What an artifact of a klas before recorded hashes looks like: neither file vouches for the other."""
    import json

    from safetensors.torch import load_file, save_file

    cfg = json.loads((art / "config.json").read_text())
    cfg.pop("weights_sha256", None)
    (art / "config.json").write_text(json.dumps(cfg))
    save_file(load_file(str(art / "model.safetensors")), str(art / "model.safetensors"), metadata={"format": cfg["format"]})


def _edit_config(change):
    def edit(art: Path) -> None:
        import json

        cfg = json.loads((art / "config.json").read_text())
        change(cfg)
        (art / "config.json").write_text(json.dumps(cfg))
    return edit


def _edit_tensors(change):
    def edit(art: Path) -> None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(art / "model.safetensors"))
        change(tensors)
        save_file(tensors, str(art / "model.safetensors"), metadata={"format": load_format(art)})
    return edit


def load_format(art: Path) -> str:
    import json

    return json.loads((art / "config.json").read_text())["format"]


def _write(name: str, data: bytes):
    return lambda art: (art / name).write_bytes(data)


def _setitem(d, *path_value):
    *path, value = path_value
    for k in path[:-1]:
        d = d[k]
    d[path[-1]] = value


STITCHED_TAMPERING = [  # (what, hashes kept, edit, message)
    ("config not JSON", True, _write("config.json", b"{not json"), r"config.json is unreadable \(JSONDecodeError\)"),
    ("config a list", True, _write("config.json", b"[1, 2]"), r"config.json is not a klas.stitched/1 config"),
    ("weights torn", True, lambda a: (a / "model.safetensors").write_bytes((a / "model.safetensors").read_bytes()[:300]),
     r"model.safetensors is unreadable"),
    ("cut point edited", True, _edit_config(lambda c: _setitem(c, "src", "cut", c["src"]["cut"] - 1)),
     r"config.json was edited after export"),
    ("tensor changed", True, _edit_tensors(lambda t: t["stitch.proj.weight"].add_(1.0)), r"changed after export"),
    ("cut point edited, no hashes", False, _edit_config(lambda c: _setitem(c, "src", "cut", c["src"]["cut"] - 1)),
     r"does not fit VisionTransformer \(src, unexpected \['blocks\.\d\."),
    ("cut outside the model", False, _edit_config(lambda c: _setitem(c, "dst", "cut", 9)),
     r"records cut point 9 for vit_small_patch16_224 \(dst\), outside 0\.\.3"),
    ("block count edited", False, _edit_config(lambda c: _setitem(c, "src", "num_blocks", 12)),
     r"records 12 blocks for vit_tiny_patch16_224, which has 4"),
    ("kind edited", False, _edit_config(lambda c: _setitem(c, "kind", "tree")), r"has kind 'tree', not anchor or stitch"),
    ("src entry gone", False, _edit_config(lambda c: c.pop("src")), r"holds a config its tensors do not fit .*KeyError"),
    ("stitch width edited", False, _edit_config(lambda c: _setitem(c, "stitch", "in_width", 7)),
     r"does not fit its stitch layer \(LinearStitch: proj.weight has shape \[48, 32\], the model \[48, 7\]\)"),
    ("create kwargs edited", False, _edit_config(lambda c: _setitem(c, "src", "create_kwargs", {"bogus": 1})),
     r"holds a config its tensors do not fit .*TypeError"),
    ("extra tensor", False, _edit_tensors(lambda t: t.update({"stitch.extra": t["stitch.proj.weight"].clone()})),
     r"does not fit its stitch layer \(LinearStitch, unexpected \['extra'\]\)"),
    ("foreign prefix", False, _edit_tensors(lambda t: t.update({"evil.x": t["stitch.proj.weight"].clone()})),
     r"holds an unexpected tensor 'evil.x'"),
    ("tensor missing", False, _edit_tensors(lambda t: t.pop("dst.head.weight")), r"missing \['head.weight'\]"),
    ("tensor of another shape", False, _edit_tensors(lambda t: t.update({"dst.head.bias": t["dst.head.bias"][:5]})),
     r"head.bias has shape \[5\], the model \[10\]"),
]


def test_load_stitched_refuses_every_tampering_in_one_line(two_trainings, tmp_path):
    from klas.export import export_pareto, load_stitched
    from test_export import _all_on_front

    run = two_trainings[0]
    _all_on_front(run)
    res = export_pareto(run, models=True, console=quiet())
    art = res.out_dir / res.models[next(r for r in res.models if "->" in r)]
    assert load_stitched(art).config["made_from"]["seed"] == 0
    for k, (what, hashes, edit, message) in enumerate(STITCHED_TAMPERING):
        case = shutil.copytree(art, tmp_path / f"case{k}")
        if not hashes:
            _strip_hashes(case)
            load_stitched(case)  # untouched, an artifact without hashes still loads
        edit(case)
        with pytest.raises(KlasError, match=message) as err:
            load_stitched(case)
        assert "\n" not in str(err.value) and "re-export it with: klas export pareto RUN --models" in str(err.value), what


def _tree_artifact(out: Path) -> Path:
    """A tree over the two tiny ViTs (trunk Ti, share point 2, S joins at 2), saved as klas export tree does."""
    from test_train import MODELS, tiny_vit

    from klas.export import save_tree
    from klas.stitch.network import StitchNet
    from klas.stitch.tree import StitchTree, TreeSpec

    ti, sm = (tiny_vit(n) for n in MODELS)
    spec = TreeSpec(ti.name, 2, ((sm.name, 2),))
    net = StitchNet({m.name: m.adapter for m in (ti, sm)}, {m.name: m.profile for m in (ti, sm)}, spec.stitch_specs())
    tree = StitchTree.from_net(net, spec).eval()
    return save_tree(tree, out, {n: n for n in MODELS}, {"data_config": {"input_size": [3, 32, 32]}})


TREE_TAMPERING = [  # (what, hashes kept, edit, message)
    ("share point edited", True, _edit_config(lambda c: _setitem(c, "spec", "share", 3)), r"was edited after export"),
    ("branch cut edited", False, _edit_config(lambda c: _setitem(c, "spec", "branches", 0, "cut", 3)),
     r"does not describe one tree"),
    ("share outside the trunk", False, _edit_config(lambda c: _setitem(c, "spec", "share", 4)),
     r"records share point 4 outside trunk vit_tiny_patch16_224's 1\.\.3"),
    ("models gone", False, _edit_config(lambda c: c.pop("models")), r"holds a config its tensors do not fit .*KeyError"),
    ("spec garbage", False, _edit_config(lambda c: _setitem(c, "spec", "share", "two")), r"holds a malformed tree spec"),
    ("extra tensor group", False, _edit_tensors(lambda t: t.update({"m7.x": t["s0.proj.weight"].clone()})),
     r"does not describe one tree"),
    ("stitch tensor missing", False, _edit_tensors(lambda t: t.pop("s0.proj.bias")), r"missing \['proj.bias'\]"),
]


def test_load_tree_refuses_every_tampering_in_one_line(tmp_path):
    from klas.export import load_tree

    art = _tree_artifact(tmp_path / "tree")
    assert load_tree(art).spec.share == 2
    for k, (what, hashes, edit, message) in enumerate(TREE_TAMPERING):
        case = shutil.copytree(art, tmp_path / f"case{k}")
        if not hashes:
            _strip_hashes(case)
            load_tree(case)
        edit(case)
        with pytest.raises(KlasError, match=message) as err:
            load_tree(case)
        assert "\n" not in str(err.value) and "re-export it with: klas export tree RUN" in str(err.value), what


# -- 2. a full disk is one line, never a traceback or SIGBUS ---------------------------------------------

@contextmanager
def small_disk(path: Path, size: str):
    """``path`` on a tmpfs of ``size`` (needs root and the right to mount; skipped where the test cannot)."""
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount command here to make a small file system")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root and mount rights): {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def grow(disk: Path, size: str) -> None:
    """Free space on ``disk`` the way a user would: here by growing the tmpfs."""
    subprocess.run(["mount", "-o", f"remount,size={size}", str(disk)], check=True, capture_output=True)


def test_a_disk_that_fills_during_klas_cache_is_one_line_never_sigbus(vit_cache, tmp_path, monkeypatch, capsys):
    import klas.cache.writer as writer
    from klas.cache import open_cache

    with small_disk(tmp_path / "disk", "160k") as disk:
        out = disk / "c"
        monkeypatch.setattr(writer, "check_free_space", lambda *a, **k: None)  # the disk fills after the check
        args = ["cache", "--model", MODEL, *CLI, "--data", "digits", "--out", str(out), "--root", str(vit_cache.parent)]
        msg = refused(monkeypatch, capsys, *args)  # before issue 18: killed by SIGBUS, exit 135, no message
        assert msg.startswith(f"error: no space left on device writing {out} (it needs ")
        assert msg.endswith("free some space there, then re-run the same command to continue where it stopped")
        assert not (out / "manifest.json").exists()
        grow(disk, "2m")
        assert klas(monkeypatch, capsys, *args)[0] == 0  # the hinted command
        open_cache(out, verify=True)


def test_klas_cache_allocates_its_arrays_before_writing_rows(vit_cache, tmp_path, monkeypatch, capsys):
    """No sparse file: a full disk must surface while the files are made, not while rows are written."""
    import klas.cache.writer as writer

    def stop(*a, **k):
        raise KeyboardInterrupt  # Ctrl-C before the first batch: the arrays exist, no row is written yet

    monkeypatch.setattr(writer, "_compute", stop)
    out = tmp_path / "c"
    code, _ = klas(monkeypatch, capsys, "cache", "--model", MODEL, *CLI, "--data", "digits", "--out", str(out),
                   "--root", str(vit_cache.parent))
    arrays = sorted(out.rglob("features.npy")) + sorted(out.rglob("logits.npy"))
    assert code == 130 and len(arrays) == 6
    for path in arrays:  # before issue 18: 8 KiB of blocks for a file of ~48 KiB (a hole where the rows go)
        assert path.stat().st_blocks * 512 >= path.stat().st_size, path


def test_a_full_disk_in_search_is_one_line_and_the_hint_finishes_it(vit_cache, tmp_path, monkeypatch, capsys):
    with small_disk(tmp_path / "disk", "24k") as disk:
        run = disk / "run"
        args = ["search", str(vit_cache), "--run", str(run), "--probe-epochs", "1"]
        msg = refused(monkeypatch, capsys, *args)
        assert msg.startswith(f"error: no space left on device writing {run}/") and msg.endswith("re-run the same command")
        assert not (run / "selection.json").exists()
        grow(disk, "4m")
        assert klas(monkeypatch, capsys, *args)[0] == 0
        assert (run / "selection.json").is_file()


def test_a_full_disk_in_train_and_export_is_one_line_and_resume_finishes_it(trained_pair, monkeypatch, capsys,
                                                                            tmp_path):
    cache, runs = trained_pair
    _serve(monkeypatch, cache)
    with small_disk(tmp_path / "disk", "96k") as disk:
        run = disk / "run"
        write_selection(run, cache, pairs=PAIRS[:2])
        args = ["train", str(run), "--epochs", "2", "--frozen", "--batch-size", "32"]
        msg = refused(monkeypatch, capsys, *args)
        assert msg.startswith(f"error: no space left on device writing {checkpoint_path(run)} (it needs ")
        assert msg.endswith("then re-run the same command with --resume added to continue")
        assert not (run / "results.parquet").exists() and checkpoint_path(run).is_file()  # the last good epoch
        grow(disk, "1m")
        assert klas(monkeypatch, capsys, *args, "--resume")[0] == 0
        msg = refused(monkeypatch, capsys, "export", "pareto", str(run), "--models")
        assert msg.startswith(f"error: no space left on device writing {run / 'export'} (it needs more than ")
        assert not (run / "export").exists() and not (run / ".export.partial").exists()
        grow(disk, "8m")
        assert klas(monkeypatch, capsys, "export", "pareto", str(run), "--models")[0] == 0


def test_enospc_from_any_writer_is_one_line(two_trainings, monkeypatch, capsys):
    """Where no small file system can be made: ENOSPC injected where the disk reports it (fsync, as NFS does)."""
    import errno
    import os

    run = two_trainings[0]

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    msg = refused(monkeypatch, capsys, "train", str(run), "--overwrite", "--epochs", "1", "--frozen")
    assert msg.startswith(f"error: no space left on device writing {checkpoint_path(run)} (it needs ")
    assert msg.endswith("re-run the same command with --resume in place of --overwrite to continue")


# -- 3. hostile images: one line naming the file; high bit depths scaled, never clipped -------------------

def _image_folder(root: Path) -> Path:
    """Two classes of tiny 8-bit images; tests add hostile files to it."""
    from PIL import Image

    for c, cls in enumerate(("cat", "dog")):
        (root / cls).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (16, 16), (60 * c, 40 * i, 90)).save(root / cls / f"{i}.png")
    return root


def test_high_depth_images_are_scaled_not_clipped(tmp_path):
    import numpy as np
    from PIL import Image

    from klas.data import FolderSource

    folder = _image_folder(tmp_path / "imgs")
    ramp = np.linspace(0, 65535, 16 * 16).reshape(16, 16).astype(np.uint16)
    Image.fromarray(ramp).save(folder / "cat" / "gray16.png")
    src = FolderSource(folder)
    img = src.load(src.paths.index(folder / "cat" / "gray16.png"))
    assert Image.open(folder / "cat" / "gray16.png").mode.startswith("I")  # PIL's own convert("RGB") clips it
    got = np.asarray(img)
    assert img.mode == "RGB" and got.shape == (16, 16, 3)
    np.testing.assert_array_equal(got[..., 0], np.round(ramp / 257).astype(np.uint8))  # before: 99.6 % white
    assert (got == 255).mean() < 0.01


def test_hostile_images_are_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    import re

    import numpy as np
    from PIL import Image

    from klas.data import FolderSource

    folder = _image_folder(tmp_path / "imgs")
    bad = {
        "text.png": (lambda p: p.write_bytes(b"not an image"), r"\(UnidentifiedImageError\)"),
        "empty.jpg": (lambda p: p.write_bytes(b""), r"\(UnidentifiedImageError\)"),
        "torn.png": (lambda p: p.write_bytes((folder / "cat" / "0.png").read_bytes()[:60]), r"\(OSError\)"),
        "bomb.png": (lambda p: Image.new("RGB", (64, 64)).save(p), r"could be decompression bomb"),
        "int32.tif": (lambda p: Image.fromarray(np.full((8, 8), 70000, np.int32)).save(p), r"32-bit integer pixels"),
        "float.tif": (lambda p: Image.fromarray(np.ones((8, 8), np.float32)).save(p), r"floating-point pixels"),
    }
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a 64x64 image is then over twice PIL's limit
    for name, (make, _) in bad.items():
        make(folder / "dog" / name)
    src = FolderSource(folder)
    for name, (_, why) in bad.items():
        path = folder / "dog" / name
        with pytest.raises(KlasError, match=re.escape(f"image {path}") + ".*" + why) as err:
            src.load(src.paths.index(path))
        assert "\n" not in str(err.value) and "Traceback" not in str(err.value)
    # through klas cache, its loader in a worker process: still the one line naming the file
    for name in list(bad)[1:]:
        (folder / "dog" / name).unlink()
    msg = refused(monkeypatch, capsys, "cache", "--model", MODEL, *CLI, "--workers", "1", "--data", str(folder),
                  "--out", str(tmp_path / "c"), "--root", str(tmp_path / "root"))
    assert re.fullmatch(rf"error: cannot read image {re.escape(str(folder / 'dog' / 'text.png'))} "
                        r"\(UnidentifiedImageError\); fix or delete the file and rerun", msg), msg


# -- 4. inputs that would silently change the computation are refused ---------------------------------

@pytest.mark.parametrize("model, size, message", [
    ("vit_tiny_patch16_224", 70, "input size 70 px does not fit vit_tiny_patch16_224: its first layer reads 16-pixel "
                                 "patches every 16 px and would silently drop the last 6 rows and columns; use an "
                                 "--input-size it tiles, e.g. 64 or 80"),
    ("klas_vit_ti", 30, "input size 30 px does not fit klas_vit_ti: its first layer reads 8-pixel patches every 8 px"),
    ("convnext_atto", 70, "would silently drop the last 2 rows and columns; use an --input-size it tiles, e.g. 68 or 72"),
    ("levit_128s", 64, "levit_128s runs only at its native input size 224 px (it cannot be resized); use --input-size "
                       "224, or leave --input-size out and give levit_128s first"),
])
def test_an_input_size_the_model_cannot_take_whole_is_refused(model, size, message, vit_cache, tmp_path, monkeypatch,
                                                              capsys):
    msg = refused(monkeypatch, capsys, "cache", "--model", MODEL, "--model", model, "--random-init", "--limit", "12",
                  "--input-size", str(size), "--data", "digits", "--out", str(tmp_path / "c"),
                  "--root", str(vit_cache.parent))
    assert message in msg
    assert not (tmp_path / "c" / "manifest.json").exists()


def test_the_size_hints_are_sizes_the_models_take():
    from klas.models import load_model

    for model, size in (("vit_tiny_patch16_224", 64), ("vit_tiny_patch16_224", 80), ("convnext_atto", 68),
                        ("levit_128s", 224)):
        assert load_model(model, random_init=True, input_size=(3, size, size)).profile.reps[0].grid[0] > 0


def test_random_init_with_a_weights_file_is_refused(vit_cache, tmp_path, monkeypatch, capsys):
    import timm
    from safetensors.torch import save_file

    from klas.cache import open_cache
    from klas.zoo import ZOO_ARCHS  # noqa: F401  registers the demo architectures with timm

    weights = tmp_path / "ti.safetensors"
    save_file(timm.create_model("klas_vit_ti").state_dict(), str(weights))
    args = ["cache", "--model", f"klas_vit_ti={weights}", "--limit", "12", "--data", "digits",
            "--out", str(tmp_path / "c"), "--root", str(vit_cache.parent)]
    msg = refused(monkeypatch, capsys, *args, "--random-init")
    assert msg == (f"error: --random-init builds untrained, seeded weights and would ignore the weights file {weights} "
                   f"given for klas_vit_ti; drop --random-init to use the file, or drop ={weights}")
    assert not (tmp_path / "c").exists()
    assert klas(monkeypatch, capsys, *args)[0] == 0  # the hint: without --random-init the file is used
    entry = open_cache(tmp_path / "c").manifest["models"][0]
    assert (entry["weights"], entry["random_init"]) == (str(weights), False)


# -- 5./6. every hint names the right command; locks before the long work --------------------------------

#: A tree on the session's two-ViT cache, as short as klas tree allows.
TREE = ["--trunk", "klas_vit_ti", "--share-at", "3", "--epochs", "1", "--task-epochs", "1", "--probe-epochs", "1",
        "--init-images", "20", "--steps-per-epoch", "2", "--no-latency"]


def test_a_second_klas_tree_learns_of_the_lock_before_scoring(vit_cache, tmp_path, monkeypatch, capsys):
    import os

    import klas.tree.run as tree_run
    from klas.fs import DirLock, claim_dir

    def scoring(*a, **k):
        raise AssertionError("klas tree scored before it took the run's lock")

    monkeypatch.setattr(tree_run, "plan_tree", scoring)
    run = claim_dir(tmp_path / "run", "tree", "--run")
    with DirLock(run, "--run"):
        msg = refused(monkeypatch, capsys, "tree", str(vit_cache), "--run", str(run), "--root", str(vit_cache.parent), *TREE)
    assert f"another klas process (pid {os.getpid()}) is writing {run}" in msg


def test_klas_tree_refuses_to_resume_checkpoints_of_another_cache(vit_cache, tmp_path, monkeypatch, capsys):
    from klas.fs import claim_dir
    from klas.tree import TreeConfig, parse_share_at

    run = claim_dir(tmp_path / "run", "tree", "--run")
    cfg = TreeConfig(trunk="klas_vit_ti", share_at=parse_share_at("3"), epochs=1, task_epochs=1, probe_epochs=1,
                     init_images=20, steps_per_epoch=2, latency=False)
    save_checkpoint(run / "checkpoints" / "s3.pt", {"config": cfg.recipe(), "cache_fingerprint": "f" * 64,
                                                    "stitch_states": {}})
    msg = refused(monkeypatch, capsys, "tree", str(vit_cache), "--run", str(run), "--root", str(vit_cache.parent),
                  *TREE, "--resume")
    assert f"checkpoint {run / 'checkpoints' / 's3.pt'} was trained on another cache (fingerprint ffffffffffff" in msg


def test_klas_tree_hints_name_the_commands_that_continue_or_redo_it(vit_cache, tmp_path, monkeypatch, capsys):
    import json

    import klas.tree.fit as tree_fit

    run, real_fit = tmp_path / "run", tree_fit.fit
    args = ["tree", str(vit_cache), "--run", str(run), "--root", str(vit_cache.parent), *TREE]
    calls = []

    def ctrl_c_in_the_second_epoch(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_fit(*a, **k)

    monkeypatch.setattr(tree_fit, "fit", ctrl_c_in_the_second_epoch)
    code, err = klas(monkeypatch, capsys, *args)
    hint = "interrupted: finished work is kept; re-run the same command with --resume added to continue"
    assert code == 130 and err.strip().splitlines()[-1] == hint  # before: "re-run the same command" (no --resume)
    assert not (run / "tree.json").exists()
    monkeypatch.setattr(tree_fit, "fit", real_fit)
    assert klas(monkeypatch, capsys, *args, "--resume")[0] == 0 and (run / "tree.json").is_file()
    # a checkpoint of another training (its own hash intact) is refused by export, which names how to redo it
    ckpt_file = run / "checkpoints" / "s3.pt"
    good = ckpt_file.read_bytes()
    ckpt = load_checkpoint(ckpt_file)
    for state in ckpt["stitch_states"].values():
        next(iter(state.values())).add_(0.5)
    save_checkpoint(ckpt_file, {k: v for k, v in ckpt.items() if k not in ("format", "weights_sha256")})
    msg = refused(monkeypatch, capsys, "export", "tree", str(run), "--root", str(vit_cache.parent))
    assert f"checkpoint {ckpt_file} is not the one tree.json was evaluated with" in msg
    assert msg.endswith(f"klas tree {vit_cache} --run {run} --overwrite")
    ckpt_file.write_bytes(good)
    # the cache changed since the tree was trained: the hint redoes the tree (before: "rerun klas search, then train")
    manifest = json.loads((run / "tree.json").read_text())
    manifest["cache"]["fingerprint"] = "0" * 64
    (run / "tree.json").write_text(json.dumps(manifest))
    msg = refused(monkeypatch, capsys, "export", "tree", str(run), "--root", str(vit_cache.parent))
    redo = f"klas tree {vit_cache} --run {run} --overwrite"
    assert msg.endswith(f"rerun the tree on it: {redo}") and "klas search" not in msg
    calls.clear()  # the hinted command is accepted and trains (stopped in its second epoch, to stay quick)
    monkeypatch.setattr(tree_fit, "fit", ctrl_c_in_the_second_epoch)
    assert klas(monkeypatch, capsys, *redo.split()[1:], "--root", str(vit_cache.parent), *TREE)[0] == 130
    assert len(calls) == 2 and not (run / "tree.json").exists()


def test_a_cache_without_its_manifest_or_a_run_given_as_a_cache_is_named(vit_cache, tmp_path, monkeypatch, capsys):
    from klas.cache import open_cache
    from klas.run import claim_run

    run = claim_run(tmp_path / "run")
    msg = refused(monkeypatch, capsys, "search", str(run), "--run", str(tmp_path / "r2"))
    assert f"{run} is a klas run directory, not a cache" in msg and "no cache at" not in msg
    copy = shutil.copytree(vit_cache, tmp_path / "c")
    (copy / "manifest.json").unlink()
    msg = refused(monkeypatch, capsys, "search", str(copy), "--run", str(tmp_path / "r2"))
    assert msg == (f"error: cache {copy} has lost its manifest.json (its arrays cannot be checked without it); rebuild "
                   f"it: re-run the klas cache command that made it, with --overwrite")
    made_it = ["cache", "--model", "klas_vit_ti", "--model", "klas_vit_s", "--data", "digits", "--limit", "100",
               "--random-init", "--out", str(copy), "--root", str(vit_cache.parent)]
    assert klas(monkeypatch, capsys, *made_it, "--overwrite")[0] == 0
    assert open_cache(copy).fingerprint == open_cache(vit_cache).fingerprint


def test_klas_train_refuses_a_resume_with_other_options_before_loading_data(two_trainings, monkeypatch, capsys):
    import klas.train.loop as loop

    def loading(*a, **k):
        raise AssertionError("klas train loaded the data before checking the checkpoint's options")

    monkeypatch.setattr(loop, "SplitData", loading)
    msg = refused(monkeypatch, capsys, "train", str(two_trainings[0]), "--resume", "--epochs", "2", "--frozen",
                  "--batch-size", "32", "--lr", "0.1")
    assert "was made with other options: lr=0.003 (now 0.1)" in msg
