"""The file system, safely: regular files only, bounded reads, atomic writes, one-line errors.

Everything imgvec opens may be a FIFO, a device or a socket (opening a FIFO for reading blocks
forever; ``/dev/zero`` never ends), and every write may meet a missing folder, a read-only or
full disk. Every open and every write of imgvec goes through this module, which turns those
cases into :class:`~imgvec.errors.BadInputError` (or :class:`NotRegularFile`) naming the path.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import stat
from pathlib import Path
from typing import BinaryIO, Iterator

from .errors import BadInputError

PathLike = str | os.PathLike[str]

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))

# What a failed write means to a user, by errno.
_WRITE_ERRORS = {
    errno.ENOENT: "the folder does not exist",
    errno.ENOTDIR: "a part of the path is not a folder",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "the file system is read-only",
    errno.ENOSPC: "no space left on the disk",
    errno.EDQUOT: "disk quota exceeded",
    errno.EISDIR: "it is a folder",
    errno.EFBIG: "file too large for this file system",
}


class NotRegularFile(OSError):
    """A path that exists but is not a regular file (FIFO, device, socket, folder)."""


def kind_of(mode: int) -> str:
    """'a FIFO (named pipe)', 'a folder', ... for a ``st_mode`` that is not a regular file."""
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def open_regular(path: PathLike) -> BinaryIO:
    """Open ``path`` for binary reading only if it is a regular file (after following links).

    The open itself never blocks (O_NONBLOCK: a FIFO with no writer would otherwise hang);
    anything but a regular file raises :class:`NotRegularFile` before a byte is read.
    """
    return _open_if_regular(path, os.O_RDONLY, "rb")


def require_regular(path: PathLike, what: str, missing: str = "no such file") -> Path:
    """``path`` as a Path if it is a regular file; else one BadInputError line saying what it is."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise BadInputError(f"{path}: {missing}") from None
    except OSError as error:
        raise BadInputError(f"{path}: cannot read {what} ({error.strerror or error})") from None
    if not stat.S_ISREG(mode):
        raise BadInputError(f"{path}: is {kind_of(mode)}, not {what}")
    return path


def _errno_of(error: BaseException) -> int | None:
    """The errno of an OSError, also when HDF5 only mentions it in its message."""
    if isinstance(error, OSError) and error.errno:
        return error.errno
    match = re.search(r"errno = (\d+)", str(error))
    return int(match.group(1)) if match else None


def write_error(path: PathLike, error: BaseException) -> BadInputError:
    """One line for a failed write of ``path``: what the OS said, in words a user can act on."""
    code = _errno_of(error)
    why = _WRITE_ERRORS.get(code) if code is not None else None
    if why is None:
        why = (error.strerror if isinstance(error, OSError) and error.strerror else str(error).splitlines()[0]
               if str(error) else type(error).__name__)
    return BadInputError(f"cannot write {path}: {why}")


def check_writable(path: PathLike) -> Path:
    """Check before any work that a file can be written at ``path``; one line if not.

    The folder must exist and be writable, and ``path`` must not be a folder or another
    non-regular thing. Run this before long work so a bad ``-o`` costs nothing.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.exists():
        raise BadInputError(f"cannot write {path}: the folder {parent} does not exist")
    if not parent.is_dir():
        raise BadInputError(f"cannot write {path}: {parent} is not a folder")
    if path.exists() or path.is_symlink():
        try:
            mode = os.stat(path).st_mode
        except OSError:
            mode = 0
        if mode and not stat.S_ISREG(mode):
            raise BadInputError(f"cannot write {path}: it is {kind_of(mode)}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BadInputError(f"cannot write {path}: {_unwritable(parent)}")
    return path


def _unwritable(folder: Path) -> str:
    """Why files cannot be made in ``folder``: a read-only file system, or permissions."""
    try:
        read_only = os.statvfs(folder).f_flag & os.ST_RDONLY
    except OSError:
        read_only = 0
    return "the file system is read-only" if read_only else f"permission denied in {folder}"


def make_folder(path: PathLike) -> Path:
    """Create the folder ``path`` (and its parents) if needed; one line if it cannot be."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise BadInputError(f"cannot write {path}: it is not a folder") from None
    except OSError as error:
        raise write_error(path, error) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise BadInputError(f"cannot write in {path}: {_unwritable(path)}")
    return path


def check_space(path: PathLike, needed: int) -> None:
    """Refuse up front when the disk holding ``path`` has less than ``needed`` bytes free."""
    parent = Path(path).parent if str(Path(path).parent) else Path(".")
    try:
        free = shutil.disk_usage(parent).free
    except OSError:
        return
    if free < needed:
        raise BadInputError(f"cannot write {path}: no space left on the disk "
                            f"({free / 1e6:.1f} MB free, about {needed / 1e6:.1f} MB needed)")


def fsync_path(path: PathLike) -> None:
    """Flush a file (or a folder's entries) to disk, so a rename after it survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(path: PathLike) -> Path:
    """The temporary name a file is written under before it is renamed to ``path``."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def publish(tmp: PathLike, path: PathLike) -> None:
    """Make ``tmp`` durable and rename it over ``path`` (atomic on POSIX), then sync the folder."""
    path = Path(path)
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent if str(path.parent) else ".")


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    The one writer of every imgvec file (store, index, head, cache entry, HTML page): the
    temporary file is removed on every failure, so nothing half-written is ever left, and the
    previous file at ``path`` survives. OS errors become one :class:`BadInputError` line.
    """
    path = Path(path)
    check_writable(path)
    tmp = temp_path(path)
    try:
        yield tmp
        publish(tmp, path)
    except BadInputError:
        raise
    except OSError as error:
        raise write_error(path, error) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
    return Path(path)


def write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"))


def open_regular_append(path: PathLike) -> BinaryIO:
    """Open (or create) ``path`` for appending only if it is a regular file; never blocks on a FIFO.

    For the files a writer keeps beside its output (journal, lock): a FIFO there would otherwise
    hang the open, and a device would take the bytes. Raises :class:`NotRegularFile` for those.
    """
    return _open_if_regular(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, "a+b")


def _open_if_regular(path: PathLike, flags: int, mode: str) -> BinaryIO:
    """``os.open`` without blocking (O_NONBLOCK), then :class:`NotRegularFile` unless fstat says regular."""
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError as error:  # a socket cannot be opened at all, a FIFO not for writing (ENXIO): say what it is
        try:
            st_mode = os.stat(path).st_mode
        except OSError:
            raise error from None
        if stat.S_ISREG(st_mode):
            raise
        raise NotRegularFile(errno.EINVAL, f"{kind_of(st_mode)}, not a regular file", os.fspath(path)) from None
    try:
        st_mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(st_mode):
            raise NotRegularFile(errno.EINVAL, f"{kind_of(st_mode)}, not a regular file", os.fspath(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, mode)
    except BaseException:
        os.close(fd)
        raise
