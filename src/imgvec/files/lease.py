"""Holding the bytes that were checked: a read lease on a file imgvec reads while it uses it.

imgvec replaces its own files by renaming, never in place, but a user's ``cp`` over an index,
``rsync --inplace`` or a restore rewrites the very file a query has mapped: FAISS then reads bytes
that were never checked, or faults (SIGBUS) on a truncated page. A Linux read lease (``F_SETLEASE``)
closes that gap without a copy: while it is held, another process's ``open`` for writing or
``truncate`` of the file waits (up to ``/proc/sys/fs/lease-break-time``, 45 s by default). The holder
answers from the bytes it checked and lets go; then the writer proceeds, and the next use sees, and
checks, the new file.

The holder learns of a waiting writer by asking (:meth:`Lease.check`, ``F_GETLEASE``), not by a signal:
the kernel's notice is routed (``F_SETSIG``) to SIGURG, whose default is to be ignored, so no handler
runs in the process. (A Python SIGIO handler made the kernel kill processes whose libraries had
changed the signal stack, TensorFlow and OpenVINO among them.)

Where a lease cannot be had (another user's file without CAP_LEASE, a file system without leases such
as NFS) the file is used as before, unprotected: :func:`take` returns None.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
from typing import Any

from imgvec.errors import BadInputError

# The lease-break notice goes to a signal that is ignored unless the program asks for it.
NOTICE_SIGNAL = signal.SIGURG


class Lease:
    """A read lease on one open file: while held, nobody else opens the file for writing or truncates it."""

    def __init__(self, fd: int, path: str) -> None:
        self.fd, self.path = fd, path
        self._broken = False

    def check(self) -> bool:
        """Whether a writer is waiting for the file (or the lease is gone): the file must be let go soon."""
        if not self._broken:
            try:
                self._broken = self.fd < 0 or fcntl.fcntl(self.fd, fcntl.F_GETLEASE) != fcntl.F_RDLCK
            except OSError:
                self._broken = True
        return self._broken

    def release(self) -> None:
        """Let go (the waiting writer proceeds); the bytes mapped from this file must not be used after."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __del__(self) -> None:
        self.release()


def take(path: str | os.PathLike[str]) -> Lease | None:
    """A read lease on ``path`` (opened anew, never through a link), or None where leases are not to be had.
    Take it before the file is opened for reading (then check it covers that open: :func:`covering`). A file
    someone holds open for writing right now is refused in one line: it is not yet what it will be."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.fcntl(fd, fcntl.F_SETSIG, NOTICE_SIGNAL)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as error:
        os.close(fd)
        if error.errno == errno.EAGAIN:
            raise BadInputError(f"{path} is open for writing in another process; try again when it is written") \
                from None
        return None  # EACCES/EPERM (not ours, no CAP_LEASE), EINVAL (no leases on this file system)
    return Lease(fd, os.fspath(path))


def covering(lease: Lease | None, h5: Any) -> Lease | None:
    """``lease`` if it is on the file HDF5 has open (``h5``, an h5py file); else released and None (the
    path was replaced between the two opens: HDF5 reads the new file, unprotected)."""
    if lease is None:
        return None
    mine, theirs = os.fstat(lease.fd), os.fstat(h5.id.get_vfd_handle())
    if (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino):
        return lease
    lease.release()
    return None
