from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from imgvec.errors import BadInputError
from imgvec.provenance import Provenance
from imgvec.store import create_store, open_store


def _prov(dim: int = 4) -> Provenance:
    return Provenance("mobilenetv3small", "random", 0, None, None, 64, "in model", dim)


def test_round_trip_with_plain_h5py(tmp_path: Path):
    path = tmp_path / "s.h5"
    emb = np.arange(12, dtype=np.float32).reshape(3, 4)
    with create_store(path, _prov(), str(tmp_path)) as s:
        s.append(emb[:2], ["a.png", "sub/b.png"], ["x", ""])
        s.append(emb[2:], ["ünï/çødé.png"], ["y"])
        s.set_skipped([("bad.jpg", "cannot decode")])
    with open_store(path) as s:
        assert s.rows == 3 and s.dim == 4
        assert s.paths() == ["a.png", "sub/b.png", "ünï/çødé.png"]
        assert s.labels() == ["x", "", "y"]
        np.testing.assert_array_equal(s.embeddings(), emb)
        assert s.skipped() == [("bad.jpg", "cannot decode")]
        assert s.provenance.key() == _prov().key()
    with h5py.File(path) as h5:  # the documented layout, without imgvec
        assert h5["embeddings"].dtype == np.float32 and h5["embeddings"].shape == (3, 4)
        assert h5["paths"].asstr()[2] == "ünï/çødé.png"
        assert h5.attrs["backbone"] == "mobilenetv3small" and h5.attrs["weights"] == "random"
        assert h5.attrs["rows"] == 3 and h5.attrs["root"] == str(tmp_path)


def test_non_utf8_file_names_round_trip(tmp_path: Path):
    name = b"caf\xe9.png".decode("utf-8", "surrogateescape")  # a latin-1 name, as os.listdir gives it
    with create_store(tmp_path / "s.h5", _prov(), str(tmp_path)) as s:
        s.append(np.zeros((1, 4), np.float32), [name], [""])
    with open_store(tmp_path / "s.h5") as s:
        assert s.paths() == [name]


def test_rows_beyond_the_committed_count_are_invisible_and_trimmed(tmp_path: Path):
    path = tmp_path / "s.h5"
    with create_store(path, _prov(), str(tmp_path)) as s:
        s.append(np.ones((2, 4), np.float32), ["a", "b"], ["", ""])
    with h5py.File(path, "r+") as h5:  # what an interrupted append leaves behind
        h5["embeddings"].resize(5, axis=0)
        h5["paths"].resize(4, axis=0)
    with open_store(path, writable=True) as s:
        assert s.rows == 2 and s.paths() == ["a", "b"] and s.embeddings().shape == (2, 4)
        s.trim()
        s.append(np.zeros((1, 4), np.float32), ["c"], [""])
    with open_store(path) as s:
        assert s.paths() == ["a", "b", "c"] and s.embeddings().shape == (3, 4)


def test_errors(tmp_path: Path):
    with pytest.raises(BadInputError, match="no such store"):
        open_store(tmp_path / "missing.h5")
    (tmp_path / "junk.h5").write_text("not hdf5")
    with pytest.raises(BadInputError, match="cannot open as HDF5"):
        open_store(tmp_path / "junk.h5")
    with h5py.File(tmp_path / "other.h5", "w") as h5:
        h5["x"] = 1
    with pytest.raises(BadInputError, match="not an imgvec store"):
        open_store(tmp_path / "other.h5")
    create_store(tmp_path / "s.h5", _prov(), str(tmp_path)).close()
    with pytest.raises(BadInputError, match="already exists"):
        create_store(tmp_path / "s.h5", _prov(), str(tmp_path))
    with pytest.raises(BadInputError, match="output folder does not exist"):
        create_store(tmp_path / "nope" / "s.h5", _prov(), str(tmp_path))
