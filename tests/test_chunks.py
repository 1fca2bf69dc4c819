"""imgvec.files.chunks: a chunked dataset's B-tree is walked as HDF5 would follow it, and refused where
HDF5 would recurse without end or read outside the file (the CLI cases are in test_hostile_hdf5.py)."""

from __future__ import annotations

import struct
from pathlib import Path

import h5py
import numpy as np
import pytest

from imgvec.files import chunks
from imgvec.files.provenance import Provenance
from imgvec.vectors.store import StoreWriter, create_store, open_store

D = 576
PROV = Provenance("mobilenetv3small", "random", 0, None, None, 64, "in model", D)


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store whose vectors' tree has two levels (more than 64 chunks), built in batches, then with rows removed."""
    path = tmp_path_factory.mktemp("chunks") / "s.h5"
    with create_store(path, PROV, str(path.parent)) as w:
        for b in range(17):
            w.append(np.ones((1000, D), np.float32), [f"{b}/{i}.png" for i in range(1000)], ["a"] * 1000)
    with StoreWriter(path) as w:
        w.commit(drop={f"3/{i}.png" for i in range(300)})
    return path


def test_every_chunk_imgvec_writes_is_found_as_hdf5_counts_them(big: Path):
    with open_store(big) as s:  # the walk runs on every open; here its counts are compared with HDF5's
        names: list[str] = []
        s.h5.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
        assert {"embeddings", "paths/bytes", "paths/offsets", "labels/codes", "skipped/paths/bytes"} <= set(names)
        for name in names:
            ds = s.h5[name]
            assert chunks.check_dataset(ds, ds.dtype.itemsize) == ds.id.get_num_chunks(), name
        assert s.h5["embeddings"].id.get_num_chunks() > 2 * chunks.DEFAULT_ISTORE_K  # two levels walked


def _node(path: Path, name: str) -> tuple[int, int]:
    from imgvec.files.h5heap import reader

    with h5py.File(path, "r") as h5:
        header, _ = h5py.h5g.get_objinfo(h5[name].id).objno
        root, dims = chunks._layout(reader(h5.id.get_vfd_handle()), header, path.stat().st_size)
    return root, len(dims)


@pytest.mark.parametrize("patch, message", [
    (lambda root, rank: (root + 5, struct.pack("<B", 2)), "level"),  # the root's children are at level 0
    (lambda root, rank: (root + 6, struct.pack("<H", 65)), "room for 64"),
    (lambda root, rank: (root + 24 + 8 + 8 * rank, struct.pack("<Q", root)), "twice"),  # a child is the root
    (lambda root, rank: (root + 24 + 8 + 8 * rank, struct.pack("<Q", 1 << 40)), "outside the file"),
    (lambda root, rank: (root + 8, struct.pack("<Q", 96)), "sibling"),
    (lambda root, rank: (root, b"TRXE"), "no chunk B-tree node"),
])
def test_a_damaged_tree_is_refused_before_hdf5_follows_it(big: Path, tmp_path: Path, patch, message):
    path = tmp_path / "s.h5"
    path.write_bytes(big.read_bytes())
    root, rank = _node(path, "embeddings")
    at, data = patch(root, rank)
    with open(path, "r+b") as fh:
        fh.seek(at)
        fh.write(data)
    with h5py.File(path, "r") as h5:
        with pytest.raises(chunks.MalformedChunks, match=message):
            chunks.check_dataset(h5["embeddings"], 4)


def test_other_chunk_indexes_are_refused(tmp_path: Path):
    """HDF5's newer formats (superblock 2+, layout version 4: fixed/extensible arrays, v2 B-trees): not imgvec's."""
    path = tmp_path / "f.h5"
    with h5py.File(path, "w", libver="latest") as h5:
        h5.create_dataset("x", data=np.ones((10, 4), np.float32), chunks=(5, 4), maxshape=(None, 4))
    with h5py.File(path, "r") as h5, pytest.raises(chunks.MalformedChunks, match="version"):
        chunks.check_dataset(h5["x"], 4)
