"""Strings in imgvec's HDF5 files: writing them, and reading them only once what they claim fits the file.

A variable-length string is a length and a reference into a global heap; the lengths are read
raw and the heap collections walked (:mod:`imgvec.files.h5heap`) before HDF5 follows them.
"""

from __future__ import annotations

import os
from typing import Any, Iterable

import numpy as np

from imgvec.files.structure import check_group, damaged, file_size, reading

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
