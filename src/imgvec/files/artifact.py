"""Opening imgvec files: one call opens a file, checks it and hands back what it holds.

:func:`open_checked` opens an HDF5 file race-free (:func:`open_file`, which also walks its root's
string heaps), reads its header (:mod:`imgvec.files.header`) and checks the datasets its kind's
layout names (:func:`imgvec.files.structure.check_structure`), handing back a :class:`Checked`
file; :func:`peek` reads any file's header alone;
:func:`check_partner` validates an index or head against its store. Anything wrong is one
:class:`~imgvec.errors.BadInputError` (damaged, forged) or :class:`~imgvec.errors.MismatchError`
(made from something else) line naming the file and the fix.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from imgvec.errors import BadInputError, MismatchError, first_line
from imgvec.fileio import atomic_path, require_regular
from imgvec.files.lease import Lease, covering, take as take_lease
from imgvec.files.header import FORMATS, Header, check_attributes, other_attrs, read_header, text_attr, write_header
from imgvec.files.strings import check_root_heaps
from imgvec.files.structure import Expect, capped, check_structure, reading

Layout = Callable[[Header], Mapping[str, Expect]]


@contextlib.contextmanager
def create(path: str | os.PathLike[str], header: Header) -> Iterator[Any]:
    """A new HDF5 file at ``path`` with ``header``, written atomically (see :func:`fileio.atomic_path`)."""
    from imgvec.files.h5format import new_file

    with atomic_path(path) as tmp:
        with new_file(tmp) as h5:  # the format pinned; created here, never through a link
            write_header(h5.attrs, header)
            yield h5


def open_file(path: str | os.PathLike[str], what: str, missing: str, mode: str = "r") -> Any:
    """Open an imgvec file (a regular file only: never a FIFO or a device); ``what`` names it in errors."""
    import h5py

    path = require_regular(path, what, missing)
    try:
        h5 = h5py.File(path, mode)
    except OSError as error:
        raise BadInputError(f"{path}: not an HDF5 file, so not {what} ({capped(first_line(error))})") from None
    try:
        # h5.attrs and every name open the root group anew, outside any check: one whose object
        # header is damaged (no group message left) must fail here, inside the guard, not there.
        with reading(path, None):
            h5["/"]
        check_root_heaps(h5, path, None)
    except BaseException:
        h5.close()
        raise
    return h5


@dataclass
class Checked:
    """An open imgvec file whose header and datasets passed their checks: what the file layer hands back.

    ``datasets`` holds the datasets the layout named (absent optional ones left out); close it when done.
    """

    h5: Any
    path: Path
    header: Header
    datasets: dict[str, Any]
    lease: Lease | None = None  # opened read-only: held until closed, so nobody rewrites the file in place

    def check(self, expected: Mapping[str, Expect]) -> dict[str, Any]:
        """More datasets, checked like the first ones (for sizes that depend on what those hold)."""
        try:
            found = check_structure(self.h5, self.path, self.header.kind, expected)
        except BaseException:
            self.close()
            raise
        self.datasets.update(found)
        return found

    def close(self) -> None:
        self.h5.close()
        if self.lease is not None:
            self.lease.release()

    def __enter__(self) -> "Checked":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def check_file(h5: Any, path: str | os.PathLike[str], kind: str, layout: Layout | None = None) -> Checked:
    """The open file ``h5`` as a :class:`Checked` ``kind`` file: its header read and validated, then the
    datasets ``layout(header)`` names checked before any is read; ``h5`` is closed if anything is wrong."""
    try:
        header = read_header(h5.attrs, path, kind)
        datasets = check_structure(h5, path, kind, layout(header)) if layout else {}
    except BaseException:
        h5.close()
        raise
    return Checked(h5, Path(path), header, datasets)


def open_checked(path: str | os.PathLike[str], kind: str, missing: str, layout: Layout | None = None, *,
                 what: str | None = None, mode: str = "r") -> Checked:
    """Open, check and hand back a ``kind`` file in one call (:func:`open_file`, then :func:`check_file`);
    ``missing`` is the message for a path that does not exist, ``what`` names the file in errors.

    Read-only, a lease on the file is taken before HDF5 reads a byte of it (:mod:`imgvec.files.lease`) and
    held by the :class:`Checked` file: what is checked is what is read, until it is closed."""
    lease = take_lease(path) if mode == "r" else None
    try:
        h5 = open_file(path, what or f"an imgvec {kind} file", missing, mode)
    except BaseException:
        if lease is not None:
            lease.release()
        raise
    lease = covering(lease, h5)
    try:
        file = check_file(h5, path, kind, layout)
    except BaseException:
        if lease is not None:
            lease.release()
        raise
    file.lease = lease
    return file


@contextlib.contextmanager
def opened(path: str | os.PathLike[str], kind: str, missing: str) -> Iterator[tuple[Any, Header]]:
    """``(h5, header)`` of a validated imgvec file of ``kind``, closed afterwards."""
    with open_checked(path, kind, missing) as file:
        yield file.h5, file.header


def peek(path: str | os.PathLike[str]) -> tuple[str, Header, dict[str, Any]]:
    """The kind, header and other attributes of any imgvec file, reading attributes only."""
    with open_file(path, "an imgvec file", "no such file") as h5:
        check_attributes(h5.attrs, path, None)
        with reading(path, None):
            fmt = text_attr(h5.attrs, "format")
        kind = next((k for k, f in FORMATS.items() if f == fmt), None)
        if kind is None:
            raise BadInputError(f"{path}: not an imgvec file (store, index or head)")
        header = read_header(h5.attrs, path, kind)
        with reading(path, kind):
            extra = other_attrs(h5.attrs)
    return kind, header, extra


def check_partner(header: Header, store: Header, what: str, store_what: str, fix: str,
                  same_rows: bool = True) -> None:
    """Raise :class:`MismatchError` unless ``header`` (an index's) describes exactly ``store``'s rows."""
    from imgvec.files.provenance import check_compatible

    if header.store_id != store.store_id:
        raise MismatchError(f"{what} was built from another store than {store_what}; {fix}")
    if header.generation != store.generation:
        raise MismatchError(f"{what} predates rows removed from {store_what} (generation {header.generation}, "
                            f"the store is at {store.generation}); {fix}")
    check_compatible(store.provenance, header.provenance, store_what, what, fix)
    if same_rows and header.rows != store.rows:
        raise MismatchError(f"{what} covers {header.rows} rows but {store_what} has {store.rows}; {fix}")
