"""The file system, safely: regular files only, bounded reads, atomic writes, one-line errors.

Everything imgvec opens may be a FIFO, a device or a socket (opening a FIFO for reading blocks
forever; ``/dev/zero`` never ends), and every write may meet a missing folder, a read-only or
full disk. Every open and every write of imgvec goes through this module, which turns those
cases into :class:`~imgvec.errors.BadInputError` (or :class:`NotRegularFile`) naming the path.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import shutil
import socket
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator

from imgvec.errors import BadInputError, first_line

PathLike = str | os.PathLike[str]

_KINDS = ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
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


def open_regular(path: PathLike, follow_links: bool = True) -> BinaryIO:
    """Open ``path`` for binary reading only if it is a regular file (after following links, unless
    ``follow_links`` is False: then a link there is :class:`NotRegularFile`, as for a store's partner files).

    The open itself never blocks (O_NONBLOCK: a FIFO with no writer would otherwise hang);
    anything but a regular file raises :class:`NotRegularFile` before a byte is read.
    """
    return _open_if_regular(path, os.O_RDONLY | (0 if follow_links else os.O_NOFOLLOW), "rb")


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
        why = error.strerror if isinstance(error, OSError) and error.strerror else first_line(error)
    return BadInputError(f"cannot write {path}: {why}")


def check_writable(path: PathLike) -> Path:
    """Check before any work that a file can be written at ``path``; one line if not.

    The folder must exist and accept a new file (tried for real: root passes ``os.access``
    on /proc and /sys, which refuse files all the same), and ``path`` must not be a folder or
    another non-regular thing. Run this before long work so a bad ``-o`` costs nothing.
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
    _try_create(path, parent)
    return path


def _try_create(path: Path, parent: Path) -> None:
    """Create and remove an empty file beside ``path``: the folder really takes new files."""
    probe = temp_path(path)
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    except OSError as error:
        if error.errno == errno.ENOENT:  # /proc: the folder is there, but takes no files
            raise BadInputError(f"cannot write {path}: {parent} does not take new files") from None
        raise write_error(path, error) from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)


def check_output(output: PathLike, inputs: Iterable[PathLike | None],
                 read_under: Callable[[str], bool] | None = None) -> Path:
    """Check an output before any work: writable (:func:`check_writable`) and none of the command's inputs.

    ``output`` is refused when it resolves (same real path, or same file by inode: a hard
    link) to an input or to an input's partner file (a store's journal and lock), so that
    ``train S -o S`` or ``query S Q --html S`` cannot overwrite what they read. An input
    that is a folder is refused as a whole, and a file under it when ``read_under(name)``
    says the command reads such files (the images of a folder it embeds).
    """
    output = Path(output)
    target = os.path.realpath(output)
    try:
        out_stat: os.stat_result | None = os.stat(output)
    except OSError:
        out_stat = None
    for given in inputs:
        if given is None:
            continue
        for what, path in _partners(Path(given)):
            same = os.path.realpath(path) == target
            if not same and out_stat is not None:
                with contextlib.suppress(OSError):
                    other = os.stat(path)
                    same = (other.st_dev, other.st_ino) == (out_stat.st_dev, out_stat.st_ino)
            if same:
                which = "an input" if not what and str(given) == str(output) else f"{what}{given}, an input"
                raise BadInputError(f"cannot write {output}: it is {which} of this command; "
                                    "write the output to another file")
        folder = os.path.realpath(given)
        if (read_under is not None and os.path.isdir(folder) and read_under(output.name)
                and os.path.commonpath([folder, target]) == folder):
            raise BadInputError(f"cannot write {output}: it is in {given}, whose images this command reads; "
                                "write the output to another folder")
    return check_writable(output)


def _partners(path: Path) -> list[tuple[str, Path]]:
    """A file and the files that belong to it: a store's journal and lock (see store.py, journal.py)."""
    path = Path(os.path.abspath(path))  # "." has no name to add to
    return [("", path), ("the journal of ", path.with_name(path.name + ".journal")),
            ("the lock file of ", path.with_name(f".{path.name}.lock"))] if path.name else [("", path)]


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


def uncache(path: PathLike) -> None:
    """Drop a written and flushed file's pages from the page cache, for a file read at scattered places
    through a mapping (a search index). Pages a writer leaves behind sit in large folios, which the
    kernel maps whole on the first touch: the first ``imgvec query`` after ``imgvec index`` mapped
    1.2 GB of a 300k-row HNSW index for a search that reads a few MB (benchmarks/bench_query_scale.py);
    read back a page at a time, it maps ~0.2 GB. Advice only: nothing happens where it cannot be given."""
    if not hasattr(os, "posix_fadvise"):
        return
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
# .NAME.tmp-HOST-PID-RANDOM (and .NAME.tmp-PID, the name of earlier versions): who wrote it, never guessable;
# .NAME.trash-HOST-PID-RANDOM: something being deleted (moved aside first, so it is gone from NAME at once).
_TEMP = re.compile(r"\.(?P<target>.+?)\.(?P<what>tmp|trash)-(?:(?P<host>[0-9a-f]{8})-)?(?P<pid>\d+)(?:-[0-9a-f]+)?")


def temp_path(path: PathLike, what: str = "tmp") -> Path:
    """A fresh temporary name a file (or folder) is written under before it is renamed to ``path``
    (``what`` "trash": the name something is moved to before it is deleted).

    The name carries this host and process (so :func:`remove_stale_temps` can tell a dead
    writer's leftovers from a live one's, and one machine never removes another's on a shared
    folder) and a random part (no one can put a folder or a link where it goes beforehand).
    """
    path = Path(path)
    return path.with_name(f".{path.name}.{what}-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}")


@dataclass(frozen=True)
class TempName:
    """What a :func:`temp_path` name says: the name it becomes, and the process (on which host) writing it."""

    target: str
    pid: int
    here: bool  # written on this host (names of earlier versions carry no host: this one's)

    @property
    def stale(self) -> bool:
        """Its writer was on this host and is gone (killed): a leftover anyone may remove."""
        return self.here and not _alive(self.pid)


def temp_name(name: str) -> TempName | None:
    """What the temporary ``name`` (a :func:`temp_path` name) says; None for any other name."""
    match = _TEMP.fullmatch(name)
    if not match:
        return None
    return TempName(match["target"], int(match["pid"]), match["host"] in (None, _HOST))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


def remove_stale_temps(path: PathLike) -> list[Path]:
    """Remove the temporary files that killed writers of ``path`` left beside it; the ones removed.

    Only regular files named by :func:`temp_path` whose writer was this host's and is gone
    (its process no longer exists) are removed: a live writer's temp, another host's (on a
    shared folder) and anything that is not a regular file are left alone.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    removed = []
    try:
        names = [n for n in os.listdir(parent) if n.startswith(f".{path.name}.tmp-")]
    except OSError:
        return removed
    for name in names:
        temp = temp_name(name)
        if temp is None or temp.target != path.name or not temp.stale:
            continue
        stale = parent / name
        with contextlib.suppress(OSError):
            if stat.S_ISREG(os.lstat(stale).st_mode):
                stale.unlink()
                removed.append(stale)
    return removed


def publish(tmp: PathLike, path: PathLike) -> None:
    """Make ``tmp`` durable and rename it over ``path`` (atomic on POSIX), then sync the folder."""
    path = Path(path)
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent if str(path.parent) else ".")


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    The caller creates the file there exclusively (``open(tmp, "xb")``, ``h5py.File(tmp, "x")``):
    nothing is ever written through a link someone put at that name.

    The one writer of every imgvec file (store, index, head, cache entry, HTML page): the
    temporary file is removed on every failure, so nothing half-written is ever left, and the
    previous file at ``path`` survives; temporary files that killed writers left are removed first. OS errors become one :class:`BadInputError` line.
    """
    path = Path(path)
    check_writable(path)
    remove_stale_temps(path)
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


def copy_new(src: PathLike, dst: PathLike) -> None:
    """Copy the regular file ``src`` to ``dst``, a file this creates (O_EXCL: never through a link, never
    over a file already there), as a temporary file is made."""
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    with os.fdopen(fd, "wb") as out, open_regular(src) as inp:
        size, offset = os.fstat(inp.fileno()).st_size, 0
        try:
            while offset < size:  # in the kernel, as shutil.copyfile does
                sent = os.sendfile(out.fileno(), inp.fileno(), offset, min(size - offset, 1 << 30))
                if sent == 0:
                    break
                offset += sent
        except OSError as error:
            if offset or error.errno not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
                raise
            shutil.copyfileobj(inp, out, 1 << 20)


def write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "xb") as fh:  # x: created here, never through a link
            fh.write(data)
    return Path(path)


def write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"))


def open_regular_append(path: PathLike) -> BinaryIO:
    """Open (or create) ``path`` for appending only if it is a regular file; never blocks on a FIFO.

    For the files a writer keeps beside its output (journal, lock): a FIFO there would otherwise
    hang the open, and a device would take the bytes; a symbolic link is never followed (O_NOFOLLOW:
    a dangling one would create its target, anywhere). Raises :class:`NotRegularFile` for those.
    """
    return _open_if_regular(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, "a+b")


def _open_if_regular(path: PathLike, flags: int, mode: str) -> BinaryIO:
    """``os.open`` without blocking (O_NONBLOCK), then :class:`NotRegularFile` unless fstat says regular."""
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError as error:  # a socket cannot be opened at all, a FIFO not for writing (ENXIO): say what it is
        try:
            st_mode = (os.lstat if flags & os.O_NOFOLLOW else os.stat)(path).st_mode
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


def sha256_file(path: str | os.PathLike[str]) -> str:
    """sha256 of a regular file (a FIFO or device raises :class:`NotRegularFile`, never hangs)."""
    with open_regular(path) as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()
