"""ImageFolder-style calibration data: ``<dir>/<class>/<...>/<image>``, class names from the subfolders."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

from klas.errors import KlasError

#: File name endings (case-insensitive) treated as images; everything else is ignored.
IMG_EXTENSIONS: tuple[str, ...] = (
    ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm",
)

_FINGERPRINT_VERSION = "klas-folder-v1"


def _list_images(class_dir: Path) -> list[Path]:
    """Image files under one class folder (recursively), sorted by their path relative to it."""
    files = [
        p for p in class_dir.rglob("*")
        if p.suffix.lower() in IMG_EXTENSIONS and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(class_dir).parts)
    ]
    return sorted(files, key=lambda p: p.relative_to(class_dir).as_posix())


class FolderSource:
    """Images in class subfolders of one directory (the torchvision ImageFolder layout).

    Classes are the sorted names of the non-hidden subfolders; samples are the image files
    (``IMG_EXTENSIONS``) in each class folder, sorted by class and then by relative path, and a sample's
    id is its index in that list. Files are only decoded by :meth:`load`, so a broken image is reported
    when it is first read, by name.

    The fingerprint hashes each file's relative path, label, size and modification time (``st_mtime_ns``),
    not its bytes: it is cheap on large folders and changes whenever a file is added, removed, renamed or
    rewritten, but an in-place edit that keeps both size and mtime goes unnoticed.
    """

    def __init__(self, directory: str | Path) -> None:
        root = Path(directory).expanduser()
        if not root.exists():
            raise KlasError(
                f"data directory not found: {root}; pass 'digits' or a folder with one subfolder of images per class"
            )
        if not root.is_dir():
            raise KlasError(
                f"--data {root} is a file, not a directory; pass 'digits' or a folder with one subfolder per class"
            )
        root = root.resolve()
        class_dirs = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)
        if not class_dirs:
            raise KlasError(
                f"{root} has no class subfolders; put the images in {root}/<class name>/ (one folder per class)"
            )
        files_per_class = [_list_images(d) for d in class_dirs]
        if not any(files_per_class):
            exts = ", ".join(IMG_EXTENSIONS)
            raise KlasError(f"no images found in the class folders of {root}; expected files ending in {exts}")
        for d, files in zip(class_dirs, files_per_class):
            if not files:
                raise KlasError(f"class folder {d} has no images; add images to it or remove the folder")
        if len(class_dirs) < 2:
            raise KlasError(
                f"{root} has only 1 class folder ({class_dirs[0].name!r}); klas needs at least 2 classes"
            )

        self.root = root
        self.name = str(self.root)
        self.classes = [d.name for d in class_dirs]
        self.paths: list[Path] = [f for files in files_per_class for f in files]
        self._labels: list[int] = [c for c, files in enumerate(files_per_class) for _ in files]
        self.fingerprint = self._fingerprint()

    def _fingerprint(self) -> str:
        h = hashlib.sha256(_FINGERPRINT_VERSION.encode())
        for path, label in zip(self.paths, self._labels):
            st = path.stat()
            rel = path.relative_to(self.root).as_posix()
            h.update(f"{rel}\t{label}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return f"FolderSource({self.name!r}, {len(self)} images, {len(self.classes)} classes)"

    def label(self, idx: int) -> int:
        return self._labels[idx]

    def load(self, idx: int) -> Image.Image:
        """Decode sample ``idx`` as 8-bit RGB (:func:`to_rgb`); a file PIL cannot read, or will not (an
        image over its decompression-bomb limit), raises a :class:`KlasError` naming it."""
        path = self.paths[idx]
        try:
            with Image.open(path) as img:
                return to_rgb(img, path)
        except KlasError:
            raise
        except Image.DecompressionBombError as exc:
            raise KlasError(f"cannot read image {path}: {exc}; shrink or delete the file and rerun") from None
        except Exception as exc:  # whatever a damaged or hostile file makes PIL raise
            raise KlasError(
                f"cannot read image {path} ({exc.__class__.__name__}); fix or delete the file and rerun"
            ) from None


def to_rgb(img: Image.Image, path: Path | str) -> Image.Image:
    """``img`` as 8-bit RGB. 16-bit images (PIL modes ``I;16*``, and ``I`` from a PNG or a 16-bit TIFF)
    are scaled into 0..255 (PIL's own conversion clips them: nearly every pixel white); 32-bit integer and
    floating-point pixels, whose range klas cannot know, are refused in one line naming the file."""
    mode = img.mode
    bits = 16 if mode.startswith("I;16") else _integer_bits(img) if mode == "I" else None
    if bits == 16:
        values = np.asarray(img).astype(np.int64)
        return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), "L").convert("RGB")
    if mode in ("I", "F"):
        kind = "32-bit integer" if mode == "I" else "floating-point"
        raise KlasError(f"image {path} has {kind} pixels, whose range klas cannot know; convert it to 8- or 16-bit "
                        f"RGB or grayscale, or delete it, and rerun")
    return img.convert("RGB")


def _integer_bits(img: Image.Image) -> int | None:
    """Bits per sample of a PIL ``I`` image: 16 for a 16-bit PNG or TIFF, else None (unknown)."""
    if img.format == "PNG":
        return 16
    tags = getattr(img, "tag_v2", None)
    return 16 if tags is not None and tags.get(258) in (16, (16,)) else None
