"""imgvec.files.strings: format 3 writes no variable-length string anywhere (strings as bytes and offsets,
labels as codes into a table, text attributes of fixed length); files of format 2 still read.

The hostile files of the new layout (offsets out of order, past the bytes or the file, codes outside the
table, a table naming a label twice) are run through the CLI in test_hostile_hdf5.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

import imgvec
from imgvec.errors import BadInputError
from imgvec.files.header import FORMAT_VERSION
from imgvec.files.provenance import Provenance
from imgvec.files.strings import create_strings, decode_strings, encode_strings, read_strings
from imgvec.vectors.classifier import read_head
from imgvec.vectors.store import StoreWriter, create_store, open_store
from old_files import format2

D = 576
PROV = Provenance("mobilenetv3small", "random", 0, None, None, 64, "in model", D)


def variable_length_strings(path: Path) -> list[str]:
    """Every object and attribute of the HDF5 file at ``path`` that holds a variable-length string."""
    found: list[str] = []

    def visit(name: str, obj: Any) -> None:
        for attr in obj.attrs:
            tid = obj.attrs.get_id(attr).get_type()
            if tid.get_class() == h5py.h5t.STRING and tid.is_variable_str():
                found.append(f"{name} attribute {attr}")
        if isinstance(obj, h5py.Dataset):
            tid = obj.id.get_type()
            if (tid.get_class() == h5py.h5t.STRING and tid.is_variable_str()) or h5py.check_vlen_dtype(obj.dtype):
                found.append(name)

    with h5py.File(path, "r") as h5:
        visit("/", h5)
        h5.visititems(visit)
    return found


def _rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, D)).astype(np.float32)


# -- (a) nothing new reaches HDF5's global heap ----------------------------------------------------------
def test_no_file_imgvec_writes_holds_a_variable_length_string(store_path: Path, tmp_path: Path):
    """A store made by embed, its index, a head made by train, a store rows were removed from, a merged
    store: no dataset and no attribute anywhere holds a variable-length string."""
    import shutil

    store = Path(shutil.copy(store_path, tmp_path / "photos.h5"))
    imgvec.build_index(store, "flat")
    imgvec.train(store, tmp_path / "head.h5", cv=2)
    with open_store(store) as s:
        first = s.paths()[0]
    imgvec.merge([store], tmp_path / "merged.h5")
    with StoreWriter(store) as w:
        w.commit(drop={first})
    written = [store, tmp_path / "photos.index.h5", tmp_path / "head.h5", tmp_path / "merged.h5"]
    for path in written:
        assert imgvec.info(path).to_records()["format_version"] == FORMAT_VERSION, path
        assert variable_length_strings(path) == [], path
    with h5py.File(store) as h5:  # the check above sees attributes and datasets of every group
        assert isinstance(h5.attrs["root"], bytes) and "labels/names/bytes" in h5 and "skipped/reasons/offsets" in h5


def test_the_check_finds_what_format_2_wrote(tmp_path: Path):
    """The walk above is not vacuous: today's layout would have failed it."""
    old = format2(tmp_path)
    assert {"paths", "labels", "skipped/paths", "/ attribute root"} <= set(variable_length_strings(old["s.h5"]))
    assert "classes" in variable_length_strings(old["head.h5"])
    assert "/ attribute index_kind" in variable_length_strings(old["s.index.h5"])


# -- (b) format 2 still reads; a format-2 store is written anew on its first commit -------------------------
def test_format_2_files_still_read_through_the_heap_walk(tmp_path: Path, image_dir: Path):
    old = format2(tmp_path)
    store = imgvec.info(old["s.h5"]).to_records()
    assert (store["format_version"], store["rows"], store["skipped"]) == (2, 30, 1)
    assert store["labels"] == {"a": 10, "b": 10, "c": 10} and store["index"]["state"] == "up to date"
    assert imgvec.info(old["s.index.h5"]).to_records()["format_version"] == 2
    assert imgvec.info(old["head.h5"]).to_records()["format_version"] == 2
    head, _ = read_head(old["head.h5"])
    assert list(head.classes_) == ["a", "b", "c"]
    predictions = imgvec.predict(old["head.h5"], [old["s.h5"]])
    assert len(predictions.predictions) == 30 and {p.truth for p in predictions.predictions} == {"a", "b", "c"}
    assert predictions.predictions[1].path.endswith("b/1.png")
    found = imgvec.query(old["s.h5"], [next(image_dir.rglob("*.png"))], k=3)
    assert found.index.endswith("s.index.h5")  # its format-2 index, searched
    hits = found.queries[0].results
    assert len(hits) == 3 and all(h.path.endswith(".png") and h.label in "abc" for h in hits)
    with open_store(old["s.h5"]) as s:
        paths = s.paths()
        assert s.paths_at([4, 2]) == [paths[4], paths[2]] and s.labels_at([4]) == ["b"]


def test_a_format_2_store_is_written_in_format_3_when_rows_are_added(tmp_path: Path):
    old = format2(tmp_path, "s.h5")["s.h5"]
    with open_store(old) as s:
        before = (s.paths(), s.labels(), s.skipped(), s.embeddings(), s.store_id, s.generation, s.root)
    with StoreWriter(old) as w:
        w.append(_rows(2, 1), ["new/1.png", "new/2.png"], ["d", ""])
    assert variable_length_strings(old) == []
    with open_store(old) as s:
        assert s.header.format_version == FORMAT_VERSION and s.rows == 32
        assert s.paths() == before[0] + ["new/1.png", "new/2.png"] and s.labels() == before[1] + ["d", ""]
        assert s.skipped() == before[2] and (s.store_id, s.generation, s.root) == before[4:]
        np.testing.assert_array_equal(s.embeddings(0, 30), before[3])
        assert s.label_names() == ["a", "b", "c", "d"]


# -- (d) odd names round-trip -----------------------------------------------------------------------------
ODD = [b"caf\xe9.png".decode("utf-8", "surrogateescape"), "new\nline.png", "", "ünï/çødé.png", "\udcff",
       "tab\tand space .png", "x" * 5000]


def test_odd_names_round_trip_and_an_unlabelled_store_has_an_empty_label_table(tmp_path: Path):
    path = tmp_path / "s.h5"
    reasons = [("bad\n.png", "reason with\nnewline"), ("sk\udce9p.png", "")]
    with create_store(path, PROV, str(tmp_path / "r\udce9oot")) as w:
        w.append(_rows(len(ODD), 0), ODD, [""] * len(ODD), skipped=reasons)
    with open_store(path) as s:
        assert s.paths() == ODD and s.labels() == [""] * len(ODD) and s.label_names() == []
        assert s.skipped() == reasons and s.root == str(tmp_path / "r\udce9oot")
        assert s.paths_at([5, 0, 1]) == [ODD[5], ODD[0], ODD[1]] and s.labels_at([2]) == [""]
    with h5py.File(path) as h5:
        assert h5["labels/names/offsets"].shape == (1,) and h5["labels/names/bytes"].shape == (0,)
        assert list(h5["labels/codes"]) == [-1] * len(ODD)
    with StoreWriter(path) as w:  # appending: the table grows, earlier codes stay
        w.append(_rows(2, 1), ["p/1", "p/2"], ["cat\n", ODD[0]])
        w.append(_rows(1, 2), ["p/3"], [ODD[0]])
    with open_store(path) as s:
        assert s.labels() == [""] * len(ODD) + ["cat\n", ODD[0], ODD[0]] and s.label_names() == ["cat\n", ODD[0]]
        assert s.paths()[-3:] == ["p/1", "p/2", "p/3"]


def test_decoding_all_at_once_equals_decoding_each_string_alone():
    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(0, 12))
        pieces = [bytes(rng.integers(1, 256, int(rng.integers(0, 6)), dtype=np.uint8)) for _ in range(n)]
        if trial % 3 == 0:
            pieces = [p.replace(b"\x80", b"\0") for p in pieces]  # some hold NUL: decoded one by one
        blob = np.frombuffer(b"".join(pieces), np.uint8)
        offsets = np.concatenate([[0], np.cumsum([len(p) for p in pieces])]).astype(np.uint64)
        expected = [p.decode("utf-8", "surrogateescape") for p in pieces]
        assert decode_strings(blob, offsets) == expected, pieces
        back, lengths = encode_strings(expected)
        assert back.tobytes() == blob.tobytes() and lengths.tolist() == [len(p) for p in pieces]


def test_a_strings_column_in_plain_h5py(tmp_path: Path):
    with h5py.File(tmp_path / "c.h5", "w") as h5:
        group = create_strings(h5, "names", ["a", "", "bc"])
        assert group["offsets"][()].tolist() == [0, 1, 1, 3] and group["bytes"][()].tobytes() == b"abc"
        assert read_strings(group, tmp_path / "c.h5", "store") == ["a", "", "bc"]
        group["offsets"][1] = 2
        group["offsets"][2] = 1
        with pytest.raises(BadInputError, match="'names': its offsets decrease"):
            read_strings(group, tmp_path / "c.h5", "store")


def test_a_query_hit_whose_offsets_are_forged_is_one_line(tmp_path: Path):
    """paths_at reads only the hits' offsets: each pair is checked against the bytes before they are read."""
    path = tmp_path / "s.h5"
    with create_store(path, PROV, str(tmp_path)) as w:
        w.append(_rows(4, 0), ["a", "bb", "ccc", "dddd"], [""] * 4)
    with h5py.File(path, "r+") as h5:
        h5["paths/offsets"][2] = 9  # string 1 ends at 9, past string 2's start; the last offset stays 10
    with open_store(path) as s:
        assert s.paths_at([0]) == ["a"]
        with pytest.raises(BadInputError, match="offsets of string 2 are out of order"):
            s.paths_at([2])
        with pytest.raises(BadInputError, match="its offsets decrease"):
            s.paths()
