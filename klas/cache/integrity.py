"""Per-file integrity of a cache: sizes, mtimes and sha256 recorded in the manifest, checked on open.

The manifest's ``files`` maps every array's path (relative to the cache, ``/``-separated) to
``{"size", "mtime_ns", "sha256"}``. Opening a cache checks cheaply: every file must exist with its
recorded size; a file whose mtime differs (a copy, a ``touch``, or an edit) is hashed and accepted only
when its sha256 still matches. ``full=True`` hashes every file.

A copied cache would otherwise be re-hashed on every open, so the hashes confirmed at a new mtime are
remembered, best effort, in a side file (:data:`VERIFIED`) keyed by path, size, mtime and sha256; an
entry counts only when its sha256 equals the manifest's, so a stale or foreign side file cannot make a
changed file pass.
"""
from __future__ import annotations

import json
from pathlib import Path

from klas.errors import KlasError
from klas.fs import write_json_atomic
from klas.utils import sha256_file

#: Side file of hashes confirmed at a file's current mtime (after a copy); never required.
VERIFIED = ".klas-cache-verified.json"


def record_files(root: Path, relpaths: list[str]) -> dict[str, dict]:
    """``{relpath: {"size", "mtime_ns", "sha256"}}`` of finished files under ``root``."""
    out = {}
    for rel in relpaths:
        path = root / rel
        st = path.stat()
        out[rel] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256_file(path)}
    return out


def _damaged(root: Path, rel: str, why: str) -> KlasError:
    return KlasError(
        f"cache file {root / rel} {why} since cache {root} was written; its contents cannot be trusted: "
        f"re-run the klas cache command with --overwrite"
    )


def _read_verified(root: Path) -> dict:
    try:
        data = json.loads((root / VERIFIED).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def verify_files(root: Path, files: dict[str, dict], full: bool = False) -> None:
    """Raise a one-line :class:`KlasError` naming the first missing, resized or changed file.

    Cheap by default (size + mtime, hashing only files whose mtime moved); ``full`` hashes all of them.
    """
    root = Path(root)
    known = _read_verified(root)
    confirmed = {}
    for rel, rec in files.items():
        path = root / rel
        try:
            st = path.stat()
        except OSError:
            raise _damaged(root, rel, "is missing") from None
        if st.st_size != rec["size"]:
            raise _damaged(root, rel, f"changed size ({st.st_size} bytes, {rec['size']} recorded)")
        stamp = [st.st_size, st.st_mtime_ns, rec["sha256"]]
        if not full and (st.st_mtime_ns == rec["mtime_ns"] or known.get(rel) == stamp):
            continue
        if sha256_file(path) != rec["sha256"]:
            raise _damaged(root, rel, "changed (its sha256 differs)")
        if st.st_mtime_ns != rec["mtime_ns"]:
            confirmed[rel] = stamp
    if confirmed:
        try:
            write_json_atomic(root / VERIFIED, {**known, **confirmed})
        except OSError:
            pass  # a read-only cache: hash again next time
