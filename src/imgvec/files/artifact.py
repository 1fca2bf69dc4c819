"""Opening imgvec files: one call opens a file, checks it and hands back what it holds.

:func:`open_file` opens an HDF5 file race-free and walks its root's string heaps; :func:`opened`
adds the header (:mod:`imgvec.files.header`), whose datasets each kind then checks with
:func:`imgvec.files.structure.check_structure`; :func:`peek` reads any file's header alone;
:func:`check_partner` validates an index or head against its store. Anything wrong is one
:class:`~imgvec.errors.BadInputError` (damaged, forged) or :class:`~imgvec.errors.MismatchError`
(made from something else) line naming the file and the fix.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

from imgvec.errors import BadInputError, MismatchError
from imgvec.fileio import atomic_path, require_regular
from imgvec.files.header import FORMATS, Header, check_attributes, other_attrs, read_header, text_attr, write_header
from imgvec.files.strings import check_root_heaps
from imgvec.files.structure import capped, reading


@contextlib.contextmanager
def create(path: str | os.PathLike[str], header: Header) -> Iterator[Any]:
    """A new HDF5 file at ``path`` with ``header``, written atomically (see :func:`fileio.atomic_path`)."""
    import h5py

    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as h5:
            write_header(h5.attrs, header)
            yield h5


def open_file(path: str | os.PathLike[str], what: str, missing: str, mode: str = "r") -> Any:
    """Open an imgvec file (a regular file only: never a FIFO or a device); ``what`` names it in errors."""
    import h5py

    path = require_regular(path, what, missing)
    try:
        h5 = h5py.File(path, mode)
    except OSError as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise BadInputError(f"{path}: not an HDF5 file, so not {what} ({capped(reason)})") from None
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


@contextlib.contextmanager
def opened(path: str | os.PathLike[str], kind: str, missing: str) -> Iterator[tuple[Any, Header]]:
    """``(h5, header)`` of a validated imgvec file of ``kind``, closed afterwards."""
    with open_file(path, f"an imgvec {kind} file", missing) as h5:
        yield h5, read_header(h5.attrs, path, kind)


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
