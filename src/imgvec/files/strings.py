"""Strings in imgvec's HDF5 files: writing them, and reading them only once what they claim fits the file.

Since format 3 imgvec writes no variable-length string anywhere, so nothing in a new file reaches
HDF5's global heap:

* a column of strings is a group of two datasets, ``bytes`` (uint8: the strings' UTF-8, one after
  another; a name that is not UTF-8 kept byte for byte through ``surrogateescape``) and ``offsets``
  (uint64, one more than there are strings: string ``i`` is ``bytes[offsets[i]:offsets[i+1]]``,
  ``offsets[0] == 0``, never decreasing, the last one the length of ``bytes``), written by
  :func:`create_strings`/:func:`append_strings` and read by :func:`read_strings` once the offsets
  agree with each other, the bytes and the file (:func:`check_offsets`);
* a text attribute is a fixed-length byte string (:func:`text_value`).

Files of formats 1 and 2 hold variable-length strings: a length and a reference into a global heap.
They still read: the lengths are read raw and the heap collections walked (:mod:`imgvec.files.h5heap`)
before HDF5 follows them (:func:`decode_keys`, :func:`check_string_heaps`, :func:`check_root_heaps`).
"""

from __future__ import annotations

import os
from typing import Any, Iterable

import numpy as np

from imgvec.files.h5format import PINNED
from imgvec.files.structure import Expect, check_group, damaged, file_size, reading

BYTES_CHUNK = 1 << 14  # bytes per chunk of a strings column's ``bytes``: 16 KiB, so a small file stays small
OFFSETS_CHUNK = 1024  # offsets per chunk (8 KiB)


# -- format 3 on: strings as bytes and offsets, text attributes of fixed length ----------------------------
def text_value(value: str) -> Any:
    """``value`` as imgvec writes a text attribute: a fixed-length UTF-8 byte string, never a variable-length
    one (assign it: ``attrs[name] = text_value(value)``)."""
    return np.bytes_(str(value).encode("utf-8", "surrogateescape"))


def strings_layout(name: str, count: int | None = None) -> dict[str, Expect]:
    """The two datasets of the strings column ``name`` (``count`` strings, None: any number), for
    :func:`imgvec.files.structure.check_structure`."""
    return {f"{name}/offsets": Expect(1, "uint64", None if count is None else (count + 1,), 1),
            f"{name}/bytes": Expect(1, "uint8")}


def create_strings(parent: Any, name: str, values: Iterable[str] = ()) -> Any:
    """A new strings column ``name`` in ``parent`` (chunked, so it can grow), holding ``values``."""
    group = parent.create_group(name, **PINNED)
    group.create_dataset("bytes", shape=(0,), maxshape=(None,), dtype=np.uint8, chunks=(BYTES_CHUNK,), **PINNED)
    group.create_dataset("offsets", data=np.zeros(1, np.uint64), maxshape=(None,), chunks=(OFFSETS_CHUNK,),
                         **PINNED)
    append_strings(group, values)
    return group


def encode_strings(values: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
    """``values`` as (their UTF-8 bytes one after another, each one's length)."""
    raw = encode_keys(values)
    return np.frombuffer(b"".join(raw), np.uint8), np.fromiter(map(len, raw), np.uint64, len(raw))


def append_strings(group: Any, values: Iterable[str]) -> None:
    """Add ``values`` at the end of the strings column ``group`` (of a file being written)."""
    blob, lengths = encode_strings(values)
    if not len(lengths):
        return
    offsets, data = group["offsets"], group["bytes"]
    n = offsets.shape[0]
    end = int(offsets[n - 1])
    offsets.resize(n + len(lengths), axis=0)
    offsets[n:] = end + np.cumsum(lengths, dtype=np.uint64)
    if len(blob):
        data.resize(end + len(blob), axis=0)
        data[end:] = blob


def set_strings(group: Any, values: Iterable[str]) -> None:
    """Replace what the strings column ``group`` holds by ``values``."""
    group["offsets"].resize(1, axis=0)
    group["offsets"][0] = 0
    group["bytes"].resize(0, axis=0)
    append_strings(group, values)


def check_offsets(offsets: np.ndarray, data_length: int, size: int, name: str, path: Any, kind: str) -> None:
    """Offsets of a strings column that agree with each other, its ``bytes`` dataset (``data_length``) and
    the file (``size`` bytes), or one damaged-file line."""
    if not len(offsets) or offsets[0] != 0:
        raise damaged(path, kind, f"{name!r}: its offsets do not start at 0")
    last = int(offsets[-1])
    if last > size:
        raise damaged(path, kind, f"{name!r}: its offsets claim {last:,} bytes, more than the file's {size:,}")
    if last != data_length:
        raise damaged(path, kind, f"{name!r}: its offsets end at byte {last:,}, its bytes at {data_length:,}")
    if len(offsets) > 1 and (np.diff(offsets.astype(np.int64)) < 0).any():
        raise damaged(path, kind, f"{name!r}: its offsets decrease (at string "
                                  f"{int(np.argmax(np.diff(offsets.astype(np.int64)) < 0))})")


def read_strings(group: Any, path: Any, kind: str) -> list[str]:
    """Every string of the column ``group``, once its offsets check (:func:`check_offsets`)."""
    name = group.name.lstrip("/")
    with reading(path, kind):
        offsets = np.asarray(group["offsets"][()], np.uint64)
        data = group["bytes"]
        check_offsets(offsets, data.shape[0], file_size(group.file), name, path, kind)
        blob = np.asarray(data[()], np.uint8) if len(offsets) > 1 and offsets[-1] else np.zeros(0, np.uint8)
    return decode_strings(blob, offsets)


def read_strings_at(group: Any, rows: np.ndarray, path: Any, kind: str) -> list[str]:
    """The strings at ``rows`` (sorted, distinct, in range) of the column ``group``; the others' bytes are
    never read. Each one's offsets are checked against each other, the ``bytes`` and the file first."""
    name = group.name.lstrip("/")
    with reading(path, kind):
        ds, data = group["offsets"], group["bytes"]
        n = ds.shape[0]
        ends_at = np.asarray(ds[[0, n - 1]] if n > 1 else ds[[0]], np.uint64)
        check_offsets(ends_at, data.shape[0], file_size(group.file), name, path, kind)
        rows = np.asarray(rows, np.int64)
        if len(rows) > max(64, n // 16):  # many rows: one read of everything is cheaper
            every = read_strings(group, path, kind)
            return [every[r] for r in rows.tolist()]
        starts, stops = np.asarray(ds[rows], np.uint64), np.asarray(ds[rows + 1], np.uint64)
        bad = (starts > stops) | (stops > ends_at[-1])
        if bad.any():
            raise damaged(path, kind, f"{name!r}: the offsets of string {int(rows[np.argmax(bad)])} are out of order "
                                      "or past its bytes")
        raw = [bytes(np.asarray(data[int(a):int(b)], np.uint8)) if b > a else b"" for a, b in zip(starts, stops)]
    return [r.decode("utf-8", "surrogateescape") for r in raw]


def decode_strings(blob: np.ndarray, offsets: np.ndarray) -> list[str]:
    """The strings ``blob[offsets[i]:offsets[i+1]]`` (offsets already checked), decoded as
    :func:`encode_keys` encoded them.

    Without a NUL byte in ``blob`` (never in a file name), NULs are put between the strings and the whole
    decoded and split at once (numpy and C, not a Python call per string): UTF-8 never uses a NUL byte
    inside a character, so each string decodes exactly as it would alone."""
    n = len(offsets) - 1
    if n <= 0:
        return []
    if not (blob == 0).any():
        joined = np.insert(blob, offsets[1:-1].astype(np.intp), 0)
        return joined.tobytes().decode("utf-8", "surrogateescape").split("\0")
    raw = blob.tobytes()
    return [raw[a:b].decode("utf-8", "surrogateescape") for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]


# -- formats 1 and 2: variable-length strings, read after imgvec's own heap walk ---------------------------

def str_dtype() -> Any:
    import h5py

    return h5py.string_dtype("utf-8")


def encode_keys(keys: Iterable[str]) -> list[bytes]:
    # surrogateescape keeps non-UTF-8 file names round-tripping instead of failing the batch.
    return [str(k).encode("utf-8", "surrogateescape") for k in keys]


def decode_keys(dataset: Any, stop: int, path: Any = None, kind: str = "store") -> list[str]:
    """The first ``stop`` strings of ``dataset``, once their lengths are known to fit in the file."""
    if stop == 0:
        return []
    path = dataset.file.filename if path is None else path
    with reading(path, kind):
        size, need = file_size(dataset.file), string_bytes(dataset, stop, path, kind)
        if need > size:
            raise damaged(path, kind, f"{dataset.name!r}: {stop:,} strings claim {need:,} bytes, more than the "
                                      f"file's {size:,}")
        return list(dataset.asstr(errors="surrogateescape")[:stop])


def string_bytes(ds: Any, stop: int, path: Any, kind: str) -> int:
    """Bytes the first ``stop`` strings of ``ds`` will take once read, from the file's own length fields.

    A variable-length string is a 4-byte length and a reference into a heap; many references may
    point at the same large heap object, so a small file could read as gigabytes of strings. The
    lengths are read raw (without following the references) and summed before any string is, and
    the heap collections they point into are walked (:mod:`imgvec.h5heap`) before HDF5 walks them.
    """
    refs = _string_refs(ds, stop, path, kind)
    if refs is None:
        return stop * ds.id.get_type().get_size()
    _check_heaps(ds, refs["heap"], path, kind)
    return int(refs["length"].sum(dtype=np.uint64))


def check_string_heaps(ds: Any, rows: Iterable[int], path: Any, kind: str) -> None:
    """Walk the heap collections the strings at ``rows`` of ``ds`` point into, before HDF5 reads them."""
    refs = _string_refs(ds, rows, path, kind)
    if refs is not None:
        _check_heaps(ds, refs["heap"], path, kind)


def _string_refs(ds: Any, rows: int | Iterable[int], path: Any, kind: str) -> np.ndarray | None:
    """The raw (length, heap address, index) of the first ``rows`` strings of ``ds``, or of the strings
    at the rows listed, read without following them; None if ``ds`` does not hold variable-length strings."""
    import h5py

    tid = ds.id.get_type()
    if not (tid.get_class() == h5py.h5t.STRING and tid.is_variable_str()):
        return None
    if _sizeof_addr(ds) != 8:
        raise damaged(path, kind, "file addresses are not 8 bytes, as imgvec writes them")
    ref = np.dtype([("length", "<u4"), ("heap", "<u8"), ("index", "<u4")])
    wanted = None if isinstance(rows, int) else np.unique(np.fromiter(rows, np.int64))
    stop = rows if wanted is None else (int(wanted[-1]) + 1 if len(wanted) else 0)
    if stop == 0:
        return np.zeros(0, ref)
    if ds.id.get_create_plist().get_layout() == h5py.h5d.CHUNKED:
        step = ds.chunks[0]
        firsts = range(0, stop, step) if wanted is None else (np.unique(wanted // step) * step).tolist()
        parts = []
        for start in firsts:
            try:
                _, raw = ds.id.read_direct_chunk((start,))
            except (KeyError, OSError, RuntimeError, ValueError):
                raise damaged(path, kind, f"{ds.name!r} misses the chunk at row {start}") from None
            block = np.frombuffer(raw, ref, count=min(step, stop - start, len(raw) // ref.itemsize))
            parts.append(block if wanted is None else block[wanted[(wanted >= start) & (wanted < start + len(block))]
                                                            - start])
        block = np.concatenate(parts)
    else:
        offset = ds.id.get_offset()
        raw = os.pread(ds.file.id.get_vfd_handle(), stop * ref.itemsize, offset) if offset is not None else b""
        block = np.frombuffer(raw, ref, count=len(raw) // ref.itemsize)
        block = block if wanted is None else block[wanted[wanted < len(block)]]
    return block


def _sizeof_addr(ds: Any) -> int:
    import h5py

    return h5py.h5i.get_file_id(ds.id).get_create_plist().get_sizes()[0]  # not ds.file: that builds a File


def _check_heaps(obj: Any, addresses: np.ndarray, path: Any, kind: str) -> None:
    import h5py

    from imgvec.files import h5heap

    fid = h5py.h5i.get_file_id(obj.id)
    fd = fid.get_vfd_handle()
    try:
        h5heap.check_collections(h5heap.reader(fd), np.unique(addresses).tolist(), os.fstat(fd).st_size, set())
    except h5heap.MalformedHeap as error:
        raise damaged(path, kind, str(error)) from None


def check_root_heaps(h5: Any, path: Any, kind: str | None) -> None:
    """Walk the heap collections the root group's string attributes point into, before any is read
    (every attribute seen: HDF5's own count must match the messages found)."""
    import h5py

    from imgvec.files import h5heap

    with reading(path, kind):
        read, size = h5heap.reader(h5.id.get_vfd_handle()), file_size(h5)
        if h5.id.get_create_plist().get_sizes() != (8, 8):
            raise damaged(path, kind, "file addresses are not 8 bytes, as imgvec writes them")
        check_group(h5, path, kind, "/")  # the root's names: walked before anything looks one up
        # not h5o.get_info: it sums the storage of the root's B-tree, following it before any check
        address, attrs = h5py.h5g.get_objinfo(h5.id).objno[0], h5py.h5a.get_num_attrs(h5.id)
    try:
        heaps, found = h5heap.attribute_heaps(read, address, size)
        if found != attrs:
            raise h5heap.MalformedHeap(f"HDF5 counts {attrs} attributes, the header holds {found}")
        h5heap.check_collections(read, heaps, size, set())
    except h5heap.MalformedHeap as error:
        raise damaged(path, kind, str(error)) from None
