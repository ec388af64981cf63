"""The built-in ``digits`` calibration set: scikit-learn's 1797 real 8x8 digit scans made into a harder
32x32 RGB task.

Every original scan gets ``variants`` seeded copies, each with its own random affine warp (rotation,
scale, shear, translation), foreground/background colours and contrast, an occluding patch and additive
pixel noise. Sample id ``original * variants + v`` is variant ``v`` of scan ``original``; the ``groups``
array carries ``original`` so splits keep all variants of one scan together.

Generation is vectorised (one ``grid_sample`` per chunk) and takes a few seconds; the uint8 result is
cached as ``<root>/data/digits-<fingerprint[:16]>.npy``. The same :class:`DigitsConfig` gives
byte-identical images.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from klas.fs import DEFAULT_ROOT, atomic_path

#: Bump when the generator changes in a way that changes its output for the same config.
GENERATOR_VERSION = 2

#: Images processed per step; part of the generator (the noise stream is seeded per chunk), not a knob.
_CHUNK = 2048


@dataclass(frozen=True)
class DigitsConfig:
    """Parameters of the digits generator; all of them (plus the version) go into the fingerprint."""

    variants: int = 8  # seeded copies per original scan: 1797 * 8 = 14376 images
    size: int = 32  # output side in pixels
    seed: int = 0  # generator seed (splits have their own seed)
    rotation: float = 15.0  # max |rotation| in degrees
    scale: tuple[float, float] = (0.75, 1.05)  # digit size relative to the frame
    shear: float = 0.2  # max |shear| (x shift per unit y)
    translate: float = 0.1  # max |shift| as a fraction of the frame
    contrast: tuple[float, float] = (0.5, 1.0)  # |foreground - background| grey-level range
    colour_jitter: float = 0.1  # max per-channel shift of the background and foreground colours
    invert_p: float = 0.0  # probability of a dark digit on a light background (0: always light on dark)
    noise: tuple[float, float] = (0.0, 0.08)  # std range of additive gaussian pixel noise (image range 0..1)
    occlusion_p: float = 0.4  # probability of an occluding rectangle of a random colour
    occlusion_size: tuple[float, float] = (0.2, 0.4)  # its side range as a fraction of the frame

    def fingerprint(self) -> str:
        blob = json.dumps(
            {"generator": "klas-digits", "version": GENERATOR_VERSION, **dataclasses.asdict(self)}, sort_keys=True
        )
        return hashlib.sha256(blob.encode()).hexdigest()


#: The named digits sets ``--data`` accepts. ``digits`` is the demo's; ``digits-hard`` warps each scan
#: further (rotation ±30°, scale 0.6-1.1, shear 0.3, shift 15 %), the harder task studied for a demo
#: family with more room between its members (README, "Looking for a harder task").
DIGITS_SETS: dict[str, DigitsConfig] = {
    "digits": DigitsConfig(),
    "digits-hard": DigitsConfig(rotation=30.0, scale=(0.6, 1.1), shear=0.3, translate=0.15),
}


def _digits_base() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digit scans: images (1797, 8, 8) float32 in 0..1, labels (1797,) int64."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return (bunch.images / 16.0).astype(np.float32), bunch.target.astype(np.int64)


def _affine_thetas(rng: np.random.Generator, n: int, cfg: DigitsConfig) -> np.ndarray:
    """(n, 2, 3) affine_grid matrices mapping output coords to source coords (normalised -1..1)."""
    angle = np.deg2rad(rng.uniform(-cfg.rotation, cfg.rotation, n))
    scale = rng.uniform(*cfg.scale, n)
    shear = rng.uniform(-cfg.shear, cfg.shear, n)
    shift = rng.uniform(-cfg.translate, cfg.translate, (n, 2)) * 2.0  # fraction of frame -> normalised units
    cos, sin = np.cos(angle), np.sin(angle)
    # forward map (source -> output): shift + scale * R @ Shear; affine_grid needs its inverse
    fwd = np.empty((n, 2, 2))
    fwd[:, 0, 0], fwd[:, 0, 1] = cos, cos * shear - sin
    fwd[:, 1, 0], fwd[:, 1, 1] = sin, sin * shear + cos
    fwd *= scale[:, None, None]
    inv = np.linalg.inv(fwd)  # (n, 2, 2)
    theta = np.concatenate([inv, -(inv @ shift[:, :, None])], axis=2)  # (n, 2, 3)
    return theta.astype(np.float32)


def _warp(base: np.ndarray, theta: np.ndarray, size: int) -> np.ndarray:
    """Warp (n, 8, 8) scans with (n, 2, 3) thetas into (n, size, size) stroke masks in 0..1."""
    src = torch.from_numpy(base)[:, None]  # (n, 1, 8, 8)
    grid = F.affine_grid(torch.from_numpy(theta), [len(base), 1, size, size], align_corners=False)
    out = F.grid_sample(src, grid, mode="bicubic", padding_mode="zeros", align_corners=False)
    return out[:, 0].clamp_(0.0, 1.0).numpy()


def _rect_masks(rng: np.random.Generator, n: int, cfg: DigitsConfig) -> np.ndarray:
    """(n, size, size) bool: a random rectangle for a fraction ``occlusion_p`` of the images, else empty."""
    s = cfg.size
    on = rng.random(n) < cfg.occlusion_p
    wh = np.round(rng.uniform(*cfg.occlusion_size, (n, 2)) * s).astype(np.int64)  # (n, 2) width, height
    x0 = np.floor(rng.random(n) * (s - wh[:, 0] + 1)).astype(np.int64)
    y0 = np.floor(rng.random(n) * (s - wh[:, 1] + 1)).astype(np.int64)
    xs = np.arange(s)
    in_x = (xs[None] >= x0[:, None]) & (xs[None] < (x0 + wh[:, 0])[:, None])  # (n, s)
    in_y = (xs[None] >= y0[:, None]) & (xs[None] < (y0 + wh[:, 1])[:, None])  # (n, s)
    return in_y[:, :, None] & in_x[:, None, :] & on[:, None, None]


def _colours(rng: np.random.Generator, n: int, cfg: DigitsConfig) -> tuple[np.ndarray, np.ndarray]:
    """Background and foreground RGB (n, 3): a grey pair ``contrast`` apart at a random brightness, each
    channel shifted by up to ``colour_jitter``, swapped (dark digit on light) with probability ``invert_p``."""
    contrast = rng.uniform(*cfg.contrast, n)[:, None]
    level = rng.random((n, 1)) * (1.0 - contrast)  # background grey so that level + contrast <= 1
    bg = level + rng.uniform(-cfg.colour_jitter, cfg.colour_jitter, (n, 3))
    fg = level + contrast + rng.uniform(-cfg.colour_jitter, cfg.colour_jitter, (n, 3))
    invert = (rng.random(n) < cfg.invert_p)[:, None]
    bg, fg = np.where(invert, fg, bg), np.where(invert, bg, fg)
    return np.clip(bg, 0.0, 1.0), np.clip(fg, 0.0, 1.0)


def generate_digits(cfg: DigitsConfig = DigitsConfig()) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Build the set: images (N, size, size, 3) uint8, labels (N,) int64, groups (N,) int64 (original index)."""
    base, base_labels = _digits_base()
    k, s = cfg.variants, cfg.size
    groups = np.repeat(np.arange(len(base), dtype=np.int64), k)  # id = original * k + variant
    n = len(groups)
    rng = np.random.default_rng(cfg.seed)
    theta = _affine_thetas(rng, n, cfg)
    bg, fg = _colours(rng, n, cfg)
    occluded = _rect_masks(rng, n, cfg)
    occ_colour = rng.random((n, 3))
    noise_std = rng.uniform(*cfg.noise, n)

    images = np.empty((n, s, s, 3), dtype=np.uint8)
    for start in range(0, n, _CHUNK):
        sl = slice(start, min(start + _CHUNK, n))
        m = len(range(*sl.indices(n)))
        stroke = _warp(base[groups[sl]], theta[sl], s)[..., None]  # (m, s, s, 1)
        img = bg[sl, None, None] + (fg[sl, None, None] - bg[sl, None, None]) * stroke  # (m, s, s, 3)
        img = np.where(occluded[sl, :, :, None], occ_colour[sl, None, None], img)
        # noise drawn per chunk from a chunk-seeded stream: independent of _CHUNK only through seed+start
        noise_rng = np.random.default_rng([cfg.seed, 1, start])
        img = img + noise_rng.standard_normal((m, s, s, 3)) * noise_std[sl, None, None, None]
        images[sl] = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    return images, base_labels[groups], groups


class DigitsSource:
    """A built-in digits set (``name``, generated from ``config``) as an :class:`~klas.data.ImageSource`
    (see the module docstring)."""

    def __init__(self, root: Path = DEFAULT_ROOT, config: DigitsConfig = DigitsConfig(), name: str = "digits") -> None:
        self.name = name  # what ``--data`` says to reopen it (a key of DIGITS_SETS for the named sets)
        self.config = config
        self.classes = [str(d) for d in range(10)]
        self.fingerprint = config.fingerprint()
        self.images = _load_or_generate(Path(root), config)  # (N, size, size, 3) uint8
        _, base_labels = _digits_base()
        self.groups = np.repeat(np.arange(len(base_labels), dtype=np.int64), config.variants)
        self.labels = base_labels[self.groups]

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return f"DigitsSource({self.name!r}, {len(self)} images, {self.config.variants} variants per scan)"

    def label(self, idx: int) -> int:
        return int(self.labels[idx])

    def load(self, idx: int) -> Image.Image:
        return Image.fromarray(np.asarray(self.images[idx]))  # (H, W, 3) uint8 -> RGB


def digits_cache_path(root: Path, config: DigitsConfig) -> Path:
    return Path(root) / "data" / f"digits-{config.fingerprint()[:16]}.npy"


def _load_or_generate(root: Path, config: DigitsConfig) -> np.ndarray:
    """Read the cached array when it is there and well-formed, else generate it and cache it atomically."""
    path = digits_cache_path(root, config)
    n = 1797 * config.variants
    shape = (n, config.size, config.size, 3)
    if path.is_file():
        try:
            arr = np.load(path, mmap_mode="r")
            if arr.shape == shape and arr.dtype == np.uint8:
                return arr
        except (OSError, ValueError):
            pass  # torn or foreign file: regenerate below
    images, _, _ = generate_digits(config)
    try:
        with atomic_path(path) as tmp:  # keeps the .npy suffix, so np.save adds none
            np.save(tmp, images)
    except OSError:
        pass  # read-only cache: keep the in-memory copy, regenerate next time
    return images
