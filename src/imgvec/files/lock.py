"""The lock a store's writer holds: ``.NAME.h5.lock`` beside the store, never followed through a link.

The lock is ``flock`` on that file, opened without following a link (O_NOFOLLOW: a dangling
link there would otherwise create its target, anywhere) and only if it is a regular file. A
writer removes the file when it lets go, so none is left behind; that is safe with flock because
a writer checks, once it holds the lock, that the file it locked is still the one at the lock's
name: one that opened the file just before its holder removed it finds it gone and takes the lock
again, on the new file.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import BinaryIO

from imgvec.errors import BadInputError
from imgvec.fileio import NotRegularFile, open_regular_append, write_error

TRIES = 16  # a lock file replaced this many times in a row while we take it: refused, not looped on


def lock_path(store: str | os.PathLike[str]) -> Path:
    store = Path(store)
    return store.with_name(f".{store.name}.lock")


class StoreLock:
    """An exclusive lock on writing ``store``; :meth:`release` removes the lock file and lets go."""

    def __init__(self, store: str | os.PathLike[str]) -> None:
        self.store, self.path = Path(store), lock_path(store)
        for _ in range(TRIES):
            fh = self._open()
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.close()
                raise BadInputError(f"{self.store}: another imgvec process is writing this store; wait for it to "
                                    "finish") from None
            if _same(fh, self.path):
                self._fh: BinaryIO | None = fh
                return
            fh.close()  # its holder removed it while we waited for it: take the lock on the new file
        raise BadInputError(f"{self.path}: the lock file keeps being replaced; is another program writing there?")

    def _open(self) -> BinaryIO:
        try:
            return open_regular_append(self.path)  # a FIFO there must not hang the writer, a link is not followed
        except NotRegularFile as error:
            raise BadInputError(f"{self.path}: is {error.strerror.split(',')[0]}, not a lock file; remove it") from None
        except OSError as error:
            raise write_error(self.path, error) from None

    def close(self) -> None:
        """Let go, leaving the file (what a killed writer leaves: harmless, the next writer takes it)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def release(self) -> None:
        """Remove the lock file (if it is still ours) while holding it, then let go."""
        if self._fh is not None:
            with contextlib.suppress(OSError):
                if _same(self._fh, self.path):
                    os.unlink(self.path)
        self.close()


def _same(fh: BinaryIO, path: Path) -> bool:
    """Whether the open file ``fh`` is the file at ``path`` (not followed: a link there is another file)."""
    try:
        here = os.lstat(path)
    except OSError:
        return False
    mine = os.fstat(fh.fileno())
    return (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)
