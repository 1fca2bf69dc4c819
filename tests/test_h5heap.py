"""imgvec.h5heap: global heap collections are walked as HDF5 walks them, and refused where HDF5's walk
would never end or would run past the collection; only the object headers imgvec writes are read."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import h5py
import pytest

from imgvec.files import h5heap


def _file(path: Path, **kwargs) -> Path:
    with h5py.File(path, "w", **kwargs) as h5:
        h5.attrs["root"] = "/photos"
        h5.attrs["count"] = 3
        h5["names"] = [b"a.png", b"bb.png", b""]
        h5["names"].attrs["unused"] = "x"  # only the root group's attributes are walked
    return path


def _heaps(path: Path) -> tuple[list[int], int, int]:
    with h5py.File(path, "r") as h5:
        info = h5py.h5o.get_info(h5.id)
        heaps, found = h5heap.attribute_heaps(h5heap.reader(h5.id.get_vfd_handle()), info.addr, path.stat().st_size)
        return heaps, found, info.num_attrs


def _check(path: Path, addresses: list[int]) -> None:
    with open(path, "rb") as fh:
        h5heap.check_collections(h5heap.reader(fh.fileno()), addresses, path.stat().st_size, set())


def _patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(data)


def test_the_attributes_and_their_heap_are_found_and_pass(tmp_path: Path):
    path = _file(tmp_path / "f.h5")
    heaps, found, counted = _heaps(path)
    assert found == counted == 2 and len(set(heaps)) == 1  # the string attribute; the integer has no heap
    checked: set[int] = set()
    with open(path, "rb") as fh:
        h5heap.check_collections(h5heap.reader(fh.fileno()), heaps, path.stat().st_size, checked)
    assert checked == set(heaps)


@pytest.mark.parametrize("at, data, message", [
    (16, struct.pack("<H", 0) + b"\0" * 6 + struct.pack("<Q", 0), "does not walk to its end"),  # free space of 0
    (24, struct.pack("<Q", 1 << 40), "does not walk to its end"),  # an object past the collection
    (16, struct.pack("<H", 0) + b"\0" * 6 + struct.pack("<Q", 20), "does not walk to its end"),  # unaligned step
    (0, b"GCOX", "no global heap collection"),
    (8, struct.pack("<Q", 1 << 40), "claims"),
    (8, struct.pack("<Q", 100), "claims"),  # smaller than any collection
])
def test_forged_collections_are_refused(tmp_path: Path, at: int, data: bytes, message: str):
    path = _file(tmp_path / "f.h5")
    heaps, _, _ = _heaps(path)
    _patch(path, heaps[0] + at, data)
    with pytest.raises(h5heap.MalformedHeap, match=message):
        _check(path, heaps)


def test_a_string_pointing_past_the_file_is_refused(tmp_path: Path):
    path = _file(tmp_path / "f.h5")
    with pytest.raises(h5heap.MalformedHeap, match="past the file's end"):
        _check(path, [path.stat().st_size + 8])


def test_many_collections_are_walked_side_by_side(tmp_path: Path):
    """Strings spread over many collections (a big store's paths): all walked, a bad one named."""
    path = tmp_path / "many.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("s", data=[("x" * 70_000 + str(i)).encode() for i in range(40)], dtype=h5py.string_dtype())
    with h5py.File(path, "r") as h5:
        ds = h5["s"]
        raw = os.pread(h5.id.get_vfd_handle(), 40 * 16, ds.id.get_offset())
    heaps = sorted({struct.unpack_from("<Q", raw, 16 * i + 4)[0] for i in range(40)})
    assert len(heaps) > 5
    _check(path, heaps)
    _patch(path, heaps[3] + 16, struct.pack("<H", 0) + b"\0" * 6 + struct.pack("<Q", 0))
    with pytest.raises(h5heap.MalformedHeap, match=f"at byte {heaps[3]:,}"):
        _check(path, heaps)


def test_object_headers_imgvec_does_not_write_are_refused(tmp_path: Path):
    path = _file(tmp_path / "v2.h5", libver="latest")  # version-2 object headers ("OHDR")
    with pytest.raises(h5heap.MalformedHeap, match="version imgvec does not write"):
        _heaps(path)
