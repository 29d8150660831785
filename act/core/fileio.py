"""Atomic file writes: a crash, a kill -9 or a full disk at any moment leaves either the old file or the new one,
never half of one.

The bytes go to a temp file in the same folder (same filesystem, so the rename is atomic), are flushed and fsync'ed,
the temp file is renamed over the target (`os.replace`) and the folder is fsync'ed so the rename itself is durable.
Any OSError on the way removes the temp file and becomes a `ResourceError` naming the path and saying what to do
(disk full, read-only filesystem, permission denied).
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, IO, Optional, Union

from act.core.errors import ResourceError

PathLike = Union[str, Path]

_HINTS = {
    errno.ENOSPC: "the disk is full; free some space (or set output_dir to another disk)",
    getattr(errno, "EDQUOT", -1): "the disk quota is exhausted; free some space",
    errno.EROFS: "the filesystem is read-only; set output_dir to a writable folder",
    errno.EACCES: "permission denied; set output_dir to a folder you can write",
    errno.EPERM: "operation not permitted; set output_dir to a folder you can write",
    errno.EIO: "an I/O error occurred on the device",
}


def describe_os_error(e: OSError, path: PathLike, what: str = "write") -> str:
    """'could not write /x/last.pt: No space left on device (the disk is full; ...)'."""
    reason = e.strerror or str(e) or type(e).__name__
    hint = _HINTS.get(e.errno)
    return f"could not {what} {path}: {reason}" + (f" ({hint})" if hint else "")


def _default_mode() -> int:
    """The mode a plain open() would give a new file (0o666 less the umask); mkstemp's 0o600 would hide a run's
    outputs from the other users of a shared machine."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


_MODE = _default_mode()


def os_error_in(e: BaseException) -> Optional[OSError]:
    """The OSError behind `e`, if any: torch.save reports a failed write as a RuntimeError whose context is the
    OSError of the file object."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems (and Windows) cannot open a folder; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def atomic_write(path: PathLike, write: Callable[[IO[bytes]], Any], what: str = "file") -> Path:
    """Call `write(f)` with a binary file object and atomically put the result at `path`.

    On any failure the previous content of `path` (if any) is untouched and no temp file is left behind. OSErrors
    become ResourceError (exit 5) naming `path` and a hint; other exceptions propagate unchanged.
    """
    path = Path(path)
    tmp: Optional[str] = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            try:
                os.fchmod(fd, _MODE)
            except (AttributeError, OSError):
                pass
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    except Exception as e:
        os_err = os_error_in(e)
        if os_err is None:
            raise
        msg = describe_os_error(os_err, path)
        if path.exists():
            msg += f"; the previous {what} at {path} is intact"
        raise ResourceError(msg) from e
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return path


def atomic_write_bytes(path: PathLike, data: bytes, what: str = "file") -> Path:
    return atomic_write(path, lambda f: f.write(data), what)


def atomic_write_text(path: PathLike, text: str, what: str = "file") -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), what)


def atomic_torch_save(obj: Any, path: PathLike, what: str = "checkpoint") -> Path:
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f), what)


def remove_stale_temps(folder: PathLike) -> int:
    """Delete temp files that a killed process left behind in `folder` (`.NAME.XXXX.tmp`). Returns how many."""
    n = 0
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    for p in folder.glob(".*.tmp"):
        try:
            p.unlink()
            n += 1
        except OSError:
            pass
    return n


def check_writable(folder: PathLike) -> None:
    """Create `folder` if needed and prove that a file can be written in it, before any work starts."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".act-write-test.", suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise ResourceError(describe_os_error(e, folder, "write to output_dir")) from e
