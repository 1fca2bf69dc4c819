"""HDF5 structure checks: every object an imgvec file holds, checked from its metadata before a byte of it is read.

Everything here holds for every file imgvec writes, so anything else is forged or damaged:
HDF5 follows soft and external links, external storage and virtual datasets into other files,
runs filters (a small gzip chunk can inflate to gigabytes) and hands out whatever sizes a file
claims. Whatever is wrong is one :func:`damaged` line naming the file and how to make it again.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import numpy as np

from imgvec.errors import BadInputError, ImgvecError, first_line
from imgvec.files.values import describe_unusable, unusable_rows

REBUILD = {
    "store": "embed the images again into a new store (imgvec embed)",
    "index": "rebuild the index from its store (imgvec index STORE)",
    "head": "train the head again (imgvec train STORE -o HEAD)",
}
MAX_CHUNK_BYTES = 64 << 20  # imgvec writes chunks of at most 4 MiB (store rows) and 1 MiB (FAISS bytes)
MAX_ATTR_VALUES = 64  # every header attribute is a scalar
_LAYOUTS = {0: "compact", 1: "contiguous", 2: "chunked", 3: "virtual"}


def damaged(path: str | os.PathLike[str], kind: str | None, what: str) -> BadInputError:
    """One line naming the file, what is wrong with it and how to make it again (``kind`` None: not known yet)."""
    if kind is None:
        return BadInputError(f"{path}: damaged imgvec file ({what})")
    return BadInputError(f"{path}: damaged imgvec {kind} file ({what}); {REBUILD[kind]}")


def capped(value: Any, limit: int = 80) -> str:
    """``value`` for a message, cut to ``limit`` characters: a forged file must not make a long error."""
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def reading(path: Any, kind: str | None) -> Iterator[None]:
    """Whatever HDF5 says while reading a file that passed the checks above is still one damaged-file line.

    A KeyError or TypeError is HDF5's only when h5py raised it (h5py reports some damage, an object
    that cannot be opened, as KeyError); raised by imgvec's own code it is a bug, and stays one.
    """
    try:
        yield
    except ImgvecError:  # a check inside the block said what is wrong (BadInputError is a ValueError too)
        raise
    except (KeyError, TypeError) as error:
        if not _raised_in_h5py(error):
            raise
        raise damaged(path, kind, f"HDF5 cannot read it: {capped(first_line(error))}") from None
    except (OSError, RuntimeError, ValueError, MemoryError, OverflowError) as error:
        raise damaged(path, kind, f"HDF5 cannot read it: {capped(first_line(error))}") from None


def _raised_in_h5py(error: BaseException) -> bool:
    """Whether ``error`` was raised inside h5py (its Python or Cython code), not by a caller."""
    tb, last = error.__traceback__, None
    while tb is not None:
        last, tb = tb, tb.tb_next
    name = last.tb_frame.f_code.co_filename if last is not None else ""
    return f"{os.sep}h5py{os.sep}" in name or name.startswith(f"h5py{os.sep}")


def check_attributes(attrs: Any, path: Any, kind: str | None) -> None:
    """Refuse attributes imgvec never writes (it writes scalars), before any value is read."""
    with reading(path, kind):
        for name in attrs:
            aid = attrs.get_id(name)
            if math.prod(aid.shape or ()) > MAX_ATTR_VALUES:
                raise damaged(path, kind, f"attribute {capped(name, 40)!r} holds {math.prod(aid.shape):,} "
                                          "values; imgvec writes scalars")


@dataclass(frozen=True)
class Expect:
    """One dataset an imgvec file must hold: its rank, type and the sizes its header implies.

    ``shape`` gives each dimension's exact size (None: any); ``min_rows`` a lower bound on the
    first one (version-1 stores could hold a cut-off batch past their rows).
    """

    ndim: int
    dtype: str  # 'float32', 'uint8', 'uint64', 'str'
    shape: tuple[int | None, ...] | None = None
    min_rows: int | None = None
    optional: bool = False


def check_structure(h5: Any, path: Any, kind: str, expected: Mapping[str, Expect]) -> dict[str, Any]:
    """The datasets ``expected`` names, each checked before anything of it is read.

    Every object on the way is a hard link in this file (never a soft or external link), each
    dataset is stored in this file as imgvec stores it (contiguous or chunked, no external
    storage, no virtual dataset, no filters, chunks of at most :data:`MAX_CHUNK_BYTES`), has
    the rank, type and sizes the header implies, and the bytes it claims are present in the
    file (all of them together fit in it). Anything else is one :func:`damaged` line. Absent
    optional datasets are left out.
    """
    with reading(path, kind):
        size, addr = file_size(h5), h5.id.get_create_plist().get_sizes()[0]
        found, claimed = {}, 0
        for name, spec in expected.items():
            checked = _checked(h5, name, path, kind, spec, size, addr)
            if checked is not None:
                found[name] = checked[0]
                claimed += checked[1]
        if claimed > size:
            raise damaged(path, kind, f"{', '.join(found)} together claim {claimed:,} bytes, more than the "
                                      f"file's {size:,}")
        return found


def file_size(h5: Any) -> int:
    """The size on disk of the open file ``h5`` (what every size claim inside it is checked against)."""
    return os.fstat(h5.id.get_vfd_handle()).st_size


def _link(group: Any, name: str, path: Any, kind: str, shown: str) -> bool:
    """Whether ``name`` exists in ``group`` as a hard link; soft and external links are damage."""
    import h5py

    check_group(group, path, kind, shown)  # before HDF5 looks the name up in the group's B-tree
    key = name.encode("utf-8", "surrogateescape")
    if not group.id.links.exists(key):  # looks at the link alone: never follows it
        return False
    link = group.id.links.get_info(key).type
    if link != h5py.h5l.TYPE_HARD:
        what = {h5py.h5l.TYPE_SOFT: "a soft link", h5py.h5l.TYPE_EXTERNAL: "an external link"}.get(
            link, "a user-defined link")
        raise damaged(path, kind, f"{shown!r} is {what}, not an object of this file")
    return True


def check_group(group: Any, path: Any, kind: str | None, shown: str) -> None:
    """The group's symbol-table B-tree walked, bounded, before HDF5 looks a name up in it."""
    from imgvec.files import chunks

    try:
        chunks.check_group(group.id)
    except chunks.MalformedChunks as error:
        raise damaged(path, kind, f"the group holding {capped(shown, 40)!r}: {error}") from None


def _checked(h5: Any, name: str, path: Any, kind: str, spec: Expect, size: int, addr: int) -> tuple[Any, int] | None:
    """``(dataset, bytes it claims)`` once checked; None for a missing optional one."""
    import h5py

    group = h5
    parts = name.split("/")
    for i, part in enumerate(parts):
        shown = "/".join(parts[: i + 1])
        if not _link(group, part, path, kind, shown):
            if spec.optional:
                return None
            raise damaged(path, kind, f"no {shown!r} {'dataset' if i == len(parts) - 1 else 'group'}")
        group = group[part]
        if i < len(parts) - 1 and not isinstance(group, h5py.Group):
            raise damaged(path, kind, f"{shown!r} is not a group")
    ds = group
    if not isinstance(ds, h5py.Dataset):
        raise damaged(path, kind, f"{name!r} is not a dataset")
    claimed = _check_storage(ds, name, path, kind, size, addr)
    if ds.ndim != spec.ndim:
        raise damaged(path, kind, f"{name!r} has shape {capped(ds.shape)}, expected {spec.ndim}-D")
    ok = ((h5py.check_string_dtype(ds.dtype) is not None) if spec.dtype == "str"
          else ds.dtype == np.dtype(spec.dtype))
    if not ok:
        raise damaged(path, kind, f"{name!r} holds {capped(ds.dtype)}, expected {spec.dtype}")
    for axis, want in enumerate(spec.shape or ()):
        if want is not None and ds.shape[axis] != want:
            what = "rows" if axis == 0 else "columns"
            raise damaged(path, kind, f"{name!r} has {ds.shape[axis]} {what}, the header says {want}")
    if spec.min_rows is not None and ds.shape[0] < spec.min_rows:
        raise damaged(path, kind, f"{name!r} has {ds.shape[0]} rows, fewer than the header's {spec.min_rows}")
    return ds, claimed


def _check_storage(ds: Any, name: str, path: Any, kind: str, size: int, addr: int) -> int:
    """Refuse a dataset stored anywhere but in this file, filtered, or claiming bytes the file lacks;
    return the bytes it claims."""
    import h5py

    dcpl = ds.id.get_create_plist()
    layout = dcpl.get_layout()
    if layout == h5py.h5d.VIRTUAL:
        raise damaged(path, kind, f"{name!r} is a virtual dataset (its data would come from other files)")
    if dcpl.get_external_count():
        raise damaged(path, kind, f"{name!r} keeps its data in an external file")
    if layout not in (h5py.h5d.CONTIGUOUS, h5py.h5d.CHUNKED):
        raise damaged(path, kind, f"{name!r} has {_LAYOUTS.get(layout, 'an unknown')} layout, which imgvec never writes")
    if dcpl.get_nfilters():
        raise damaged(path, kind, f"{name!r} is compressed or filtered ({capped(dcpl.get_filter(0)[3])}), "
                                  "which imgvec never writes")
    item = _disk_itemsize(ds, addr)
    if layout == h5py.h5d.CHUNKED:
        chunk = ds.chunks or ()
        if math.prod(chunk) * item > MAX_CHUNK_BYTES:
            raise damaged(path, kind, f"{name!r} has chunks of {math.prod(chunk) * item / 1e6:.0f} MB "
                                      f"(at most {MAX_CHUNK_BYTES >> 20} MiB)")
        from imgvec.files import chunks

        try:  # before HDF5 follows the chunk index: a looped one makes it recurse without end
            chunks.check_dataset(ds, item)
        except chunks.MalformedChunks as error:
            raise damaged(path, kind, f"{name!r}: {error}") from None
    # Unfiltered data takes its own size in the file. A contiguous dataset says where its bytes are
    # (O(1)); a chunked one would need its chunk index walked, so it is held to the file's size, which
    # bounds what reading it can allocate just as well (chunks it lacks read as zeros).
    claimed = math.prod(ds.shape) * item
    stored = ds.id.get_storage_size() if layout == h5py.h5d.CONTIGUOUS else claimed
    if claimed > size or stored > size or claimed > stored:
        raise damaged(path, kind, f"{name!r} claims {claimed:,} bytes but the file holds "
                                  f"{min(stored, size):,} ({size:,} in all)")
    return claimed


def _disk_itemsize(ds: Any, addr: int) -> int:
    """Bytes one element takes in the file: a variable-length string is a 4-byte length and a heap id."""
    import h5py

    tid = ds.id.get_type()
    if tid.get_class() == h5py.h5t.STRING and tid.is_variable_str():
        return 8 + addr  # addr: the file's size of offsets (8 unless made otherwise)
    return tid.get_size()


def check_finite(values: np.ndarray, path: Any, kind: str, what: str, first_row: int = 0) -> np.ndarray:
    """``values`` unchanged if every number is usable (:mod:`imgvec.files.values`: finite and not so large that
    normalising or scoring overflows float32), else a damaged-file error naming the first bad row."""
    bad = unusable_rows(values)
    if bad.any():
        raise damaged(path, kind, f"{what} has {describe_unusable()} (row {int(np.argmax(bad)) + first_row})")
    return values
