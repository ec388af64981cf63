"""File-system mechanics every stage shares: atomic writes, owned directories, locks, pre-flight checks.

Torch-free on purpose: the CLI imports it to answer ``--help`` at once.

The promises these helpers keep for every stage:

* **Atomic files.** :func:`atomic_write` writes to a temporary name beside the target and renames it
  into place, so a reader sees the old file or the complete new one, never a torn one.
* **Owned directories.** A directory klas creates carries a marker file (:data:`MARKER`) naming what
  it is (``cache``, ``run``, ``zoo``, ...). :func:`claim_dir` refuses to write into, and
  :func:`clear_dir` refuses to delete, a non-empty directory that klas did not create, whatever
  ``--overwrite`` says: ``--out ~/photos --overwrite`` must never delete photos.
* **One writer.** :class:`DirLock` holds an exclusive ``flock`` on a directory's lock file for the
  length of a stage; a second process gets one line naming the first, not a crash halfway.
* **Fail before the long work.** :func:`ensure_writable_dir` and :func:`check_free_space` run before
  any model is loaded, so permissions, a file in the way or a full disk surface at once.
* **A full disk is one line.** A disk that fills while an atomic writer writes (whatever library
  writes: ``json``, ``torch.save``, safetensors, pyarrow, numpy, matplotlib) raises :class:`DiskFull`,
  a :class:`KlasError` naming the file and the space it needs; the temporary file is removed and the
  old file stays. :func:`allocate` gives a file its disk blocks up front, so memory-mapped writes
  into it later cannot meet a full disk (which would kill the process with SIGBUS, no message).
"""
from __future__ import annotations

import errno
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from klas.errors import KlasError

__all__ = [
    "DEFAULT_ROOT", "MARKER", "LOCK", "DiskFull", "atomic_write", "atomic_path", "write_json_atomic", "read_json",
    "atomic_dir", "allocate", "is_disk_full", "ensure_writable_dir", "check_free_space", "format_bytes", "dir_kind",
    "claim_dir", "clear_dir", "DirLock",
]

#: Where klas writes by default; override with the KLAS_CACHE environment variable.
DEFAULT_ROOT = Path(os.environ.get("KLAS_CACHE", "cache"))

#: Marker file of a directory klas created: ``{"kind": ...}``.
MARKER = ".klas-dir.json"

#: Lock file a stage holds while it writes a directory.
LOCK = ".klas.lock"


#: errno values of a full disk (or a full quota).
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
#: How writers that lose the errno still say it (numpy, safetensors, pyarrow, torch).
_DISK_FULL_TEXT = ("no space left on device", "disk quota exceeded", "os error 28", "errno 28", "storagefull")
#: A writer that failed while less than this was free ran out of space (some, like torch.save, lose the errno).
_NEARLY_FULL = 1 << 20


class DiskFull(KlasError):
    """No space left while klas wrote ``path``: one line naming the file, the space it needs and the fix."""

    def __init__(self, path: Path | str, need: str, fix: str = "free some space there and re-run the command") -> None:
        self.path, self.need = Path(path), need
        free = _free_bytes(self.path)
        where = "" if free is None else f", {format_bytes(free)} free there"
        super().__init__(f"no space left on device writing {self.path} (it needs {need}{where}); {fix}")

    def with_fix(self, fix: str) -> "DiskFull":
        """The same error with another fix (a command that continues the interrupted stage)."""
        return DiskFull(self.path, self.need, fix)

    def __reduce__(self):  # pickled (a worker process, torchrun): the same one line, as a KlasError
        return KlasError, (str(self),)


def _free_bytes(path: Path) -> int | None:
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def is_disk_full(exc: BaseException, path: Path | str | None = None) -> bool:
    """Whether ``exc`` (or what caused it) means the disk is full: ENOSPC/EDQUOT, a writer's words for
    it, or, for a writer that loses both (torch.save), a failure while under 1 MiB is free at ``path``.
    Interrupts and KlasErrors are never a full disk."""
    if not isinstance(exc, Exception) or isinstance(exc, KlasError):
        return False
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in DISK_FULL_ERRNOS:
            return True
        if any(text in str(seen).lower() for text in _DISK_FULL_TEXT):
            return True
        seen = seen.__cause__ or seen.__context__
    free = _free_bytes(Path(path)) if path is not None else None
    return free is not None and free < _NEARLY_FULL


def _size(path: Path) -> int:
    """Bytes under ``path`` (a file, or a directory's files); 0 when it is gone."""
    try:
        if path.is_dir():
            return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        return path.stat().st_size
    except OSError:
        return 0


def _need(written: int, previous: int) -> str:
    """The space a write needs, as far as the failed attempt tells: the size of the file it replaces, else
    more than what was written when the disk filled."""
    return f"about {format_bytes(previous)}" if previous > written else f"more than {format_bytes(written)}"


def _why(exc: OSError) -> str:
    if exc.errno == errno.EROFS:
        return "read-only file system"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if exc.errno == errno.ENOSPC:
        return "no space left on device"
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        return "a file is in the way"
    return exc.strerror or exc.__class__.__name__


class _Recorded:
    """A file that remembers the OSError its ``write`` raised: some writers (torch.save) turn it into
    an error without the errno, which :func:`atomic_write` needs to tell a full disk."""

    def __init__(self, fh: IO) -> None:
        self._fh, self.error = fh, None

    def write(self, data):
        try:
            return self._fh.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def __getattr__(self, name: str):
        return getattr(self._fh, name)


@contextmanager
def atomic_write(path: Path | str, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success fsync it and rename it over ``path``.

    On any exception the temporary file is removed and ``path`` is left as it was; a full disk is
    :class:`DiskFull`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fh = None
    try:
        with open(tmp, mode) as raw:
            fh = _Recorded(raw)
            yield fh
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        _give_up(exc if fh is None or fh.error is None else fh.error, path, tmp)
        raise


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """A temporary path beside ``path`` for writers that want a file name (parquet, safetensors, npy).

    The temporary name keeps ``path``'s suffix, so writers that append one (``np.save``) do not.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as exc:
        _give_up(exc, path, tmp)
        raise


def _give_up(exc: BaseException, path: Path, tmp: Path) -> None:
    """A failed atomic write (``exc``: what went wrong): remove the temporary file (or directory); a full
    disk becomes :class:`DiskFull`."""
    full = isinstance(exc, DiskFull) or is_disk_full(exc, tmp)  # a nested writer's DiskFull names a temporary path
    written = _size(tmp)
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.unlink(missing_ok=True)
    if full:
        raise DiskFull(path, _need(written, _size(path))) from exc


def write_json_atomic(path: Path | str, data: Any) -> None:
    """Write JSON so that readers see either the old file or the complete new one, never a torn one."""
    with atomic_write(path) as fh:
        json.dump(data, fh, indent=2, sort_keys=False)
        fh.write("\n")


def read_json(path: Path | str, what: str = "file") -> Any:
    """Read JSON with a one-line error when it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise KlasError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise KlasError(f"{what} {path} is unreadable ({exc.__class__.__name__}); delete it and rerun") from exc


@contextmanager
def atomic_dir(final: Path | str, overwrite: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary name and move it into place only when the block succeeds."""
    final = Path(final)
    if final.exists() and not overwrite:
        raise KlasError(f"{final} already exists; pass --overwrite to replace it")
    tmp = final.with_name(f".{final.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException as exc:
        _give_up(exc, final, tmp)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def allocate(path: Path | str) -> None:
    """Give every byte of the file ``path`` its disk blocks now (no holes), keeping its contents.

    A sparse file (what ``np.lib.format.open_memmap`` makes) takes blocks only when its pages are
    written back; on a full disk that kills the process with SIGBUS. ``posix_fallocate`` where the
    system has it, else each block is read and written back (zeros where it is still a hole). A full
    disk is :class:`DiskFull` naming the file.
    """
    path = Path(path)
    size = path.stat().st_size
    fd = os.open(path, os.O_RDWR)
    try:
        try:
            os.posix_fallocate(fd, 0, size)
            return
        except AttributeError:  # no posix_fallocate (macOS)
            pass
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
        step = 1 << 20
        for offset in range(0, size, step):
            os.pwrite(fd, os.pread(fd, min(step, size - offset), offset), offset)
        os.fsync(fd)
    except OSError as exc:
        if is_disk_full(exc):
            raise DiskFull(path, format_bytes(size)) from None
        raise
    finally:
        os.close(fd)


def ensure_writable_dir(path: Path | str, flag: str) -> Path:
    """Create ``path`` (and parents) if needed and prove a file can be written there; else one line.

    ``flag`` names the option the user gave it (``--out``, ``--run``, ``--root``), for the fix.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise KlasError(f"{flag} {path} is a file, not a directory; choose another {flag}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".klas-write-test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise KlasError(f"cannot write to {flag} {path} ({_why(exc)}); choose another {flag}") from None
    return path


def check_free_space(path: Path | str, needed_bytes: int) -> None:
    """Refuse to start writing when the disk cannot hold the result."""
    probe = Path(path)
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed_bytes:
        raise KlasError(
            f"not enough disk space at {probe}: need {format_bytes(needed_bytes)}, {format_bytes(free)} free; "
            "free some space or choose another --out"
        )


def format_bytes(n: int) -> str:
    """A byte count for people: ``512 B``, ``1.5 KiB``, ... up to GiB (binary units, one decimal)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def dir_kind(path: Path | str, legacy: Callable[[Path], str | None] | None = None) -> str | None:
    """What klas made ``path`` as (``cache``, ``run``, ...), or None for a directory klas did not make.

    ``legacy(path)`` may recognise directories written before markers existed (by their manifest).
    """
    path = Path(path)
    marker = path / MARKER
    if marker.is_file():
        try:
            return str(json.loads(marker.read_text())["kind"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return legacy(path) if legacy else None


def claim_dir(path: Path | str, kind: str, flag: str, legacy: Callable[[Path], str | None] | None = None) -> Path:
    """Make ``path`` a writable directory of ``kind`` that klas owns, or refuse in one line.

    A missing or empty directory is created and marked; a directory already marked as ``kind`` (or
    recognised by ``legacy``) is kept as it is. Anything else is refused, ``--overwrite`` or not:
    klas never writes into or deletes a directory it did not create.
    """
    path = ensure_writable_dir(path, flag)
    found = dir_kind(path, legacy)
    if found is None and any(path.iterdir()):
        raise KlasError(
            f"{flag} {path} is a directory klas did not create (it holds other files); klas never writes into "
            f"or deletes such a directory, even with --overwrite: choose a new or empty {flag}"
        )
    if found is not None and found != kind:
        raise KlasError(f"{flag} {path} is a klas {found} directory, not a {kind}; choose another {flag}")
    if not (path / MARKER).is_file():
        write_json_atomic(path / MARKER, {"kind": kind})
    return path


def clear_dir(path: Path | str, kind: str, keep: tuple[str, ...] = ()) -> None:
    """Delete the contents of a directory klas created as ``kind`` (except its marker, lock and ``keep``).

    Refuses (KlasError) when the directory is not marked as ``kind``: the one place klas deletes a
    user-named directory checks ownership first.
    """
    path = Path(path)
    if not path.exists():
        return
    if dir_kind(path) != kind:
        raise KlasError(f"refusing to delete {path}: it is not a klas {kind} directory; remove it yourself if you mean to")
    for child in path.iterdir():
        if child.name in (MARKER, LOCK, *keep):
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


class DirLock:
    """An exclusive, non-blocking ``flock`` on ``path/.klas.lock`` held while a stage writes ``path``.

    The kernel drops the lock when the process dies, so a killed run never leaves a stale lock. A
    second process gets: ``another klas process (pid N) is writing PATH; wait for it or ...``.
    """

    def __init__(self, path: Path | str, flag: str = "--out") -> None:
        self.path = Path(path)
        self.flag = flag
        self._fh: IO | None = None

    def __enter__(self) -> "DirLock":
        import fcntl

        lock = self.path / LOCK
        try:
            fh = open(lock, "a+")
        except OSError as exc:
            raise KlasError(f"cannot write to {self.flag} {self.path} ({_why(exc)}); choose another {self.flag}") from None
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip() or "?"
            fh.close()
            raise KlasError(
                f"another klas process (pid {holder}) is writing {self.path}; wait for it to finish "
                f"or choose another {self.flag}"
            ) from None
        try:
            fh.seek(0)
            fh.truncate()
            fh.write(str(os.getpid()))
            fh.flush()
        except OSError as exc:
            fh.close()
            if is_disk_full(exc):
                raise DiskFull(lock, "a few bytes") from None
            raise
        self._fh = fh
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fh is not None:
            self._fh.close()  # closing the descriptor releases the flock
            self._fh = None
