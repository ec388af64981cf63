"""klas.data: digits generation, ImageFolder sources, splits, transforms (fast, CPU)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from klas.data import (
    SPLITS,
    DigitsConfig,
    DigitsSource,
    ImageSource,
    SplitDataset,
    build_transform,
    generate_digits,
    load_split_tensors,
    make_splits,
    open_source,
)
from klas.data.digits import digits_cache_path
from klas.errors import KlasError

ZOO_CFG = dict(input_size=(3, 32, 32), interpolation="bilinear", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
               crop_pct=1.0, crop_mode="center")


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def digits(cache_root) -> DigitsSource:
    return open_source("digits", cache_root)


def _write_folder(root, counts: dict[str, int], size=(12, 10)) -> None:
    """ImageFolder layout with ``counts[class]`` small PNGs per class."""
    rng = np.random.default_rng(0)
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            arr = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / cls / f"img_{i:03d}.png")


# ---- digits -------------------------------------------------------------------------------------------

def test_digits_generation_is_byte_identical():
    cfg = DigitsConfig(variants=2)
    a, la, ga = generate_digits(cfg)
    b, lb, gb = generate_digits(cfg)
    assert a.shape == (1797 * 2, 32, 32, 3) and a.dtype == np.uint8
    assert a.tobytes() == b.tobytes()
    assert np.array_equal(la, lb) and np.array_equal(ga, gb)
    other, _, _ = generate_digits(dataclasses.replace(cfg, seed=1))
    assert other.tobytes() != a.tobytes()


def test_digits_source_ids_labels_and_cache(digits, cache_root):
    k = digits.config.variants
    assert isinstance(digits, ImageSource)
    assert digits.name == "digits" and digits.classes == [str(d) for d in range(10)]
    assert len(digits) == 1797 * k
    assert 6 <= k <= 10  # ~11-18k images so model size matters
    # id = original * k + variant: all variants of an original share its label and group
    assert np.array_equal(digits.groups, np.arange(len(digits)) // k)
    assert digits.label(5 * k) == digits.label(5 * k + k - 1)
    img = digits.load(0)
    assert img.mode == "RGB" and img.size == (32, 32)
    # variants of one scan really differ
    assert not np.array_equal(np.asarray(digits.load(0)), np.asarray(digits.load(1)))
    assert len(digits.fingerprint) == 64
    assert digits_cache_path(cache_root, digits.config).is_file()


def test_digits_cache_is_reused_and_matches_fresh_generation(digits, cache_root):
    again = DigitsSource(root=cache_root)  # reads the cached .npy (memory-mapped)
    assert isinstance(again.images, np.memmap)
    assert again.fingerprint == digits.fingerprint
    fresh, _, _ = generate_digits(digits.config)
    assert np.asarray(again.images).tobytes() == fresh.tobytes()


def test_digits_fingerprint_tracks_generator_params():
    assert DigitsConfig().fingerprint() == DigitsConfig().fingerprint()
    assert DigitsConfig().fingerprint() != DigitsConfig(noise=(0.0, 0.1)).fingerprint()


def test_named_digits_sets_open_by_name_and_differ(digits, cache_root):
    from klas.data.digits import DIGITS_SETS

    hard = open_source("digits-hard", cache_root)
    assert (hard.name, digits.name) == ("digits-hard", "digits")
    assert hard.fingerprint == DIGITS_SETS["digits-hard"].fingerprint() != digits.fingerprint
    assert np.array_equal(hard.labels, digits.labels)  # same scans, same labels: only the warps differ
    assert not np.array_equal(np.asarray(hard.images[:64]), np.asarray(digits.images[:64]))
    assert open_source(hard.name, cache_root).fingerprint == hard.fingerprint  # a cache reopens it by name
    with pytest.raises(KlasError, match="unknown digits set 'digits-easy': the built-in sets are digits, "
                                        "digits-hard; anything else"):
        open_source("digits-easy", cache_root)


# ---- splits -------------------------------------------------------------------------------------------

def test_digit_splits_disjoint_cover_and_keep_scans_whole(digits):
    splits = make_splits(digits, seed=0)
    assert tuple(splits) == SPLITS
    all_ids = np.concatenate([s.ids for s in splits.values()])
    assert len(all_ids) == len(digits) and len(np.unique(all_ids)) == len(digits)  # disjoint + cover
    for s in splits.values():
        assert s.ids.dtype == np.int64 and s.labels.dtype == np.int64
        assert np.all(np.diff(s.ids) > 0)  # sorted ascending
        assert np.array_equal(s.labels, digits.labels[s.ids])
    originals = {name: set(digits.groups[s.ids].tolist()) for name, s in splits.items()}
    assert not originals["probe-train"] & originals["score"]
    assert not originals["probe-train"] & originals["eval"]
    assert not originals["score"] & originals["eval"]
    label_sets = {name: set(s.labels.tolist()) for name, s in splits.items()}
    assert label_sets["probe-train"] == label_sets["score"] == label_sets["eval"] == set(range(10))
    n = len(digits)
    assert abs(len(splits["probe-train"]) / n - 0.6) < 0.01 and abs(len(splits["eval"]) / n - 0.2) < 0.01


def test_splits_are_deterministic_and_seeded(digits):
    a, b = make_splits(digits, seed=3), make_splits(digits, seed=3)
    assert all(a[k] == b[k] for k in SPLITS)
    c = make_splits(digits, seed=4)
    assert not np.array_equal(a["score"].ids, c["score"].ids)


def test_limit_keeps_n_class_balanced_ids(digits):
    full = make_splits(digits, seed=0)
    limited = make_splits(digits, seed=0, limit=50)
    for name, s in limited.items():
        assert len(s) == 50
        assert np.isin(s.ids, full[name].ids).all()
        assert np.all(np.diff(s.ids) > 0)
        assert np.bincount(s.labels, minlength=10).tolist() == [5] * 10
    assert make_splits(digits, seed=0, limit=10**9)["eval"] == full["eval"]
    with pytest.raises(KlasError, match="--limit 3 is smaller than the number of classes"):
        make_splits(digits, limit=3)


@pytest.mark.parametrize("fractions", [(0.5, 0.5), (0.6, 0.3, 0.3), (0.8, 0.2, 0.0)])
def test_bad_fractions(digits, fractions):
    with pytest.raises(KlasError, match="fractions"):
        make_splits(digits, fractions=fractions)


# ---- ImageFolder --------------------------------------------------------------------------------------

def test_folder_source_and_splits(tmp_path):
    _write_folder(tmp_path, {"cat": 7, "dog": 5, "emu": 3})
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden").mkdir()
    src = open_source(str(tmp_path))
    assert src.classes == ["cat", "dog", "emu"]
    assert len(src) == 15
    assert [src.label(i) for i in range(len(src))] == [0] * 7 + [1] * 5 + [2] * 3
    img = src.load(7)
    assert img.mode == "RGB" and img.size == (10, 12)  # PIL size is (W, H)
    assert src.name == str(tmp_path.resolve())
    splits = make_splits(src, seed=0)
    ids = np.concatenate([s.ids for s in splits.values()])
    assert sorted(ids.tolist()) == list(range(15))
    for s in splits.values():
        assert set(s.labels.tolist()) == {0, 1, 2}  # stratified: every class in every split
    assert len(splits["probe-train"]) == 4 + 3 + 1


def test_folder_fingerprint_changes_with_content(tmp_path):
    _write_folder(tmp_path, {"a": 3, "b": 3})
    fp = open_source(str(tmp_path)).fingerprint
    assert open_source(str(tmp_path)).fingerprint == fp
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(tmp_path / "b" / "img_999.png")
    assert open_source(str(tmp_path)).fingerprint != fp


def test_folder_missing_directory(tmp_path):
    with pytest.raises(KlasError, match="data directory not found"):
        open_source(str(tmp_path / "nope"))


def test_folder_is_a_file(tmp_path):
    (tmp_path / "x.png").write_bytes(b"")
    with pytest.raises(KlasError, match="is a file, not a directory"):
        open_source(str(tmp_path / "x.png"))


def test_folder_empty(tmp_path):
    with pytest.raises(KlasError, match="no class subfolders"):
        open_source(str(tmp_path))


def test_folder_images_without_class_folders(tmp_path):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "loose.png")
    with pytest.raises(KlasError, match="no class subfolders"):
        open_source(str(tmp_path))


def test_folder_class_folders_without_images(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "readme.txt").write_text("hi")
    with pytest.raises(KlasError, match="no images found"):
        open_source(str(tmp_path))


def test_folder_one_empty_class(tmp_path):
    _write_folder(tmp_path, {"a": 3, "b": 3})
    (tmp_path / "c").mkdir()
    with pytest.raises(KlasError, match="class folder .*c has no images"):
        open_source(str(tmp_path))


def test_folder_single_class(tmp_path):
    _write_folder(tmp_path, {"only": 5})
    with pytest.raises(KlasError, match="only 1 class folder .*at least 2 classes"):
        open_source(str(tmp_path))


def test_folder_unreadable_image_is_named(tmp_path):
    _write_folder(tmp_path, {"a": 3, "b": 3})
    (tmp_path / "b" / "broken.png").write_bytes(b"this is not a png")
    src = open_source(str(tmp_path))
    bad = next(i for i in range(len(src)) if src.paths[i].name == "broken.png")
    with pytest.raises(KlasError, match=r"cannot read image .*broken\.png"):
        src.load(bad)


def test_folder_class_too_small_for_three_splits(tmp_path):
    _write_folder(tmp_path, {"big": 10, "tiny": 2})
    src = open_source(str(tmp_path))
    with pytest.raises(KlasError, match=r"class 'tiny' has 2 image\(s\).*at least 3 images"):
        make_splits(src)


# ---- transforms ---------------------------------------------------------------------------------------

def test_transform_shape_and_normalisation():
    tf = build_transform(ZOO_CFG)
    white = tf(Image.new("RGB", (32, 32), (255, 255, 255)))
    black = tf(Image.new("RGB", (50, 40), (0, 0, 0)))  # other sizes are resized + cropped
    assert white.shape == black.shape == (3, 32, 32) and white.dtype == torch.float32
    assert torch.allclose(white, torch.ones_like(white)) and torch.allclose(black, -torch.ones_like(black))


def test_transform_imagenet_style_config():
    cfg = dict(input_size=(3, 24, 24), interpolation="bicubic", mean=(0.485, 0.456, 0.406),
               std=(0.229, 0.224, 0.225), crop_pct=0.875)
    out = build_transform(cfg)(Image.new("RGB", (64, 48), (124, 116, 104)))
    assert out.shape == (3, 24, 24)
    assert out.abs().max() < 0.05  # the ImageNet mean colour maps to ~0


def test_transform_needs_mean_std():
    with pytest.raises(KlasError, match="lacks mean, std"):
        build_transform({"input_size": (3, 32, 32)})


def test_split_dataset_and_tensors(digits):
    split = make_splits(digits, limit=20)["score"]
    tf = build_transform(ZOO_CFG)
    ds = SplitDataset(digits, split, tf)
    x0, y0, id0 = ds[0]
    assert len(ds) == 20 and x0.shape == (3, 32, 32) and y0 == split.labels[0] and id0 == split.ids[0]
    x, y, ids = load_split_tensors(digits, split, tf)
    assert x.shape == (20, 3, 32, 32) and x.dtype == torch.float32
    assert y.dtype == ids.dtype == torch.int64
    assert torch.equal(x[0], x0) and y.tolist() == split.labels.tolist() and ids.tolist() == split.ids.tolist()
    assert -1.0 <= x.min() and x.max() <= 1.0
