from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from imgvec.errors import BadInputError
from imgvec.files.journal import journal_path
from imgvec.files.provenance import Provenance
from imgvec.vectors.store import StoreWriter, create_store, open_store


def _prov(dim: int = 4) -> Provenance:
    return Provenance("mobilenetv3small", "random", 0, None, None, 64, "in model", dim)


def _rows(start: int, n: int, dim: int = 4) -> np.ndarray:
    return np.arange(start * dim, (start + n) * dim, dtype=np.float32).reshape(n, dim)


def test_round_trip_with_plain_h5py(tmp_path: Path):
    path = tmp_path / "s.h5"
    emb = _rows(0, 3)
    with create_store(path, _prov(), str(tmp_path)) as w:
        w.append(emb[:2], ["a.png", "sub/b.png"], ["x", ""], skipped=[("bad.jpg", "cannot decode")])
        w.append(emb[2:], ["ünï/çødé.png"], ["y"])
    with open_store(path) as s:
        assert s.rows == 3 and s.dim == 4
        assert s.paths() == ["a.png", "sub/b.png", "ünï/çødé.png"]
        assert s.labels() == ["x", "", "y"]
        np.testing.assert_array_equal(s.embeddings(), emb)
        assert s.skipped() == [("bad.jpg", "cannot decode")]
        assert s.provenance.key() == _prov().key()
    with h5py.File(path) as h5:  # the documented layout, without imgvec
        assert h5["embeddings"].dtype == np.float32 and h5["embeddings"].shape == (3, 4)
        offsets, data = h5["paths/offsets"][()], h5["paths/bytes"][()]  # strings: bytes and offsets
        assert data[offsets[2]:offsets[3]].tobytes().decode() == "ünï/çødé.png"
        names = h5["labels/names/bytes"][()].tobytes()
        assert names == b"xy" and list(h5["labels/codes"]) == [0, -1, 1]  # labels: codes into their table
        assert h5.attrs["backbone"] == b"mobilenetv3small" and h5.attrs["weights"] == b"random"
        assert h5.attrs["rows"] == 3 and h5.attrs["root"].decode() == str(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["s.h5"]


def test_non_utf8_file_names_round_trip(tmp_path: Path):
    name = b"caf\xe9.png".decode("utf-8", "surrogateescape")  # a latin-1 name, as os.listdir gives it
    with create_store(tmp_path / "s.h5", _prov(), str(tmp_path)) as w:
        w.append(np.zeros((1, 4), np.float32), [name], [""], skipped=[(name + "x", "bad")])
    with open_store(tmp_path / "s.h5") as s:
        assert s.paths() == [name] and s.skipped() == [(name + "x", "bad")]


def test_uncommitted_rows_are_invisible_until_commit_and_survive_a_crash(tmp_path: Path):
    path = tmp_path / "s.h5"
    w = create_store(path, _prov(), str(tmp_path))
    w.append(_rows(0, 2), ["a", "b"], ["", ""])
    with open_store(path) as s:  # a reader during the run sees the last complete store
        assert s.rows == 0 and s.pending_rows() == 2
    w._journal.close()
    w._lock.close()  # the process dies here: no commit
    with StoreWriter(path) as w2:  # the next run folds the journal in first
        assert w2.keys == {"a", "b"}
        w2.append(_rows(2, 1), ["c"], [""])
    with open_store(path) as s:
        assert s.paths() == ["a", "b", "c"]
        np.testing.assert_array_equal(s.embeddings(), _rows(0, 3))
    assert not journal_path(path).exists()


def test_a_torn_journal_tail_is_ignored_and_rows_are_never_doubled(tmp_path: Path):
    path = tmp_path / "s.h5"
    w = create_store(path, _prov(), str(tmp_path))
    w.append(_rows(0, 2), ["a", "b"], ["", ""])
    w.append(_rows(2, 2), ["c", "d"], ["", ""])
    w._journal.close()
    w._lock.close()
    journal = journal_path(path)
    data = journal.read_bytes()
    journal.write_bytes(data[:-7])  # the second batch was being written when the kill came
    with StoreWriter(path) as w2:
        assert w2.keys == {"a", "b"}
        w2.append(_rows(2, 2), ["c", "d"], ["", ""])
        w2.append(_rows(0, 1), ["a"], [""])  # a duplicate key is dropped when folding
    with open_store(path) as s:
        assert s.paths() == ["a", "b", "c", "d"]
        np.testing.assert_array_equal(s.embeddings(), _rows(0, 4))


def test_drop_removes_rows_and_bumps_generation(tmp_path: Path):
    path = tmp_path / "s.h5"
    with create_store(path, _prov(), str(tmp_path)) as w:
        w.append(_rows(0, 4), ["a", "b", "c", "d"], ["x", "y", "x", "y"], skipped=[("b.bad", "no")])
    with open_store(path) as s:
        gen, store_id = s.generation, s.store_id
    with StoreWriter(path) as w:
        w.commit(drop={"b", "d", "b.bad"})
    with open_store(path) as s:
        assert s.paths() == ["a", "c"] and s.labels() == ["x", "x"] and s.skipped() == []
        np.testing.assert_array_equal(s.embeddings(), _rows(0, 4)[[0, 2]])
        assert s.generation == gen + 1 and s.store_id == store_id


def test_skips_are_replaced_when_retried(tmp_path: Path):
    path = tmp_path / "s.h5"
    with create_store(path, _prov(), str(tmp_path)) as w:
        w.append(_rows(0, 1), ["a"], [""], skipped=[("b", "truncated"), ("c", "truncated")])
    with StoreWriter(path) as w:
        w.append(_rows(1, 1), ["b"], [""])  # b was fixed; c was not retried
    with open_store(path) as s:
        assert s.paths() == ["a", "b"] and s.skipped() == [("c", "truncated")]


def test_second_writer_is_refused(tmp_path: Path):
    path = tmp_path / "s.h5"
    with create_store(path, _prov(), str(tmp_path)):
        code = ("import sys; from imgvec.vectors.store import StoreWriter\n"
                "try:\n    StoreWriter(sys.argv[1])\nexcept Exception as e:\n    print(e)")
        out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True).stdout
        assert "another imgvec process is writing this store" in out


def test_no_lock_file_is_left_once_the_writer_is_done(tmp_path: Path):
    path = tmp_path / "s.h5"
    with create_store(path, _prov(), str(tmp_path)) as w:
        w.append(_rows(0, 1), ["a"], [""])
        assert (tmp_path / ".s.h5.lock").exists()  # there while the writer runs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.h5"]
    with pytest.raises(ValueError):
        with StoreWriter(path) as w:
            w.append(_rows(0, 1), ["a", "b"], [""])  # a failing writer removes it too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.h5"]


def test_a_lock_file_removed_while_a_writer_waited_to_lock_it_is_not_a_lock(tmp_path: Path, monkeypatch):
    """Writer B opens the lock file; writer A, done, removes it and lets go; B's flock then succeeds on a
    file no longer there. B must see that and lock the file the name leads to now, or a third writer C
    would make a new file and hold a lock of its own beside B. (Through StoreWriter only: whichever
    module holds the lock, it opens the file with fileio's open_regular_append.)"""
    import sys

    path = tmp_path / "s.h5"
    create_store(path, _prov(), str(tmp_path)).close()
    a = StoreWriter(path)
    lock_file = tmp_path / ".s.h5.lock"
    opened_before_removal = open(lock_file, "ab")  # B's open, just before A lets go
    lock_module = sys.modules[type(a._lock).__module__]
    a.close()
    assert not lock_file.exists()
    real_open = lock_module.open_regular_append
    handles = iter([opened_before_removal])
    monkeypatch.setattr(lock_module, "open_regular_append", lambda p: next(handles, None) or real_open(p))
    b = StoreWriter(path)  # locks the removed file first, must notice, and take the new one
    assert lock_file.exists() and opened_before_removal.closed
    with pytest.raises(BadInputError, match="another imgvec process is writing this store"):
        StoreWriter(path)  # C is refused
    b.close()
    assert not lock_file.exists()


def test_stale_temp_files_are_cleared(tmp_path: Path):
    path = tmp_path / "s.h5"
    create_store(path, _prov(), str(tmp_path)).close()
    (tmp_path / ".s.h5.tmp-99999").write_bytes(b"half a file")
    StoreWriter(path).close()
    assert not (tmp_path / ".s.h5.tmp-99999").exists()


def test_errors(tmp_path: Path):
    with pytest.raises(BadInputError, match="no such store"):
        open_store(tmp_path / "missing.h5")
    (tmp_path / "junk.h5").write_text("not hdf5")
    with pytest.raises(BadInputError, match="not an HDF5 file"):
        open_store(tmp_path / "junk.h5")
    with h5py.File(tmp_path / "other.h5", "w") as h5:
        h5["x"] = 1
    with pytest.raises(BadInputError, match="not an imgvec store"):
        open_store(tmp_path / "other.h5")
    create_store(tmp_path / "s.h5", _prov(), str(tmp_path)).close()
    with pytest.raises(BadInputError, match="already exists"):
        create_store(tmp_path / "s.h5", _prov(), str(tmp_path))
    with pytest.raises(BadInputError, match="cannot write .*the folder .* does not exist"):
        create_store(tmp_path / "nope" / "s.h5", _prov(), str(tmp_path))


def test_long_runs_checkpoint_as_the_journal_doubles_the_store(tmp_path: Path):
    path = tmp_path / "s.h5"
    visible = []
    with create_store(path, _prov(), str(tmp_path)) as w:
        w.checkpoint_rows = 4
        for i in range(20):
            w.append(_rows(i, 1), [f"{i}.png"], [""])
            with open_store(path) as s:
                visible.append(s.rows)
    assert visible == [0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 8, 8, 8, 8, 16, 16, 16, 16, 16]
    with open_store(path) as s:
        assert s.rows == 20


def test_merge_shards_rebases_paths_and_drops_duplicates(tmp_path: Path):
    from imgvec.vectors.store import merge_stores

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with create_store(tmp_path / "a.h5", _prov(), str(tmp_path / "a")) as w:
        w.append(_rows(0, 2), ["x.png", "y.png"], ["cat", "dog"], skipped=[("bad.png", "no")])
    with create_store(tmp_path / "b.h5", _prov(), str(tmp_path / "b")) as w:
        w.append(_rows(2, 2), ["x.png", "../a/y.png"], ["cat", "dog"])
    rows, dups = merge_stores([tmp_path / "a.h5", tmp_path / "b.h5"], tmp_path / "all.h5")
    assert (rows, dups) == (3, 1)
    with open_store(tmp_path / "all.h5") as s:
        assert s.root == str(tmp_path)
        assert s.paths() == ["a/x.png", "a/y.png", "b/x.png"] and s.labels() == ["cat", "dog", "cat"]
        np.testing.assert_array_equal(s.embeddings(), _rows(0, 3))
        assert s.skipped() == [("a/bad.png", "no")]
    with pytest.raises(BadInputError, match="more than one store"):
        merge_stores([tmp_path / "a.h5", tmp_path / "b.h5"], tmp_path / "strict.h5", on_duplicate="error")
    assert not (tmp_path / "strict.h5").exists() and not journal_path(tmp_path / "strict.h5").exists()


def test_merge_refuses_stores_made_differently(tmp_path: Path):
    from imgvec.errors import MismatchError
    from imgvec.vectors.store import merge_stores

    create_store(tmp_path / "a.h5", _prov(4), str(tmp_path)).close()
    other = Provenance("mobilenetv2", "random", 0, None, None, 64, "tf", 4)
    create_store(tmp_path / "b.h5", other, str(tmp_path)).close()
    with pytest.raises(MismatchError, match="backbone: mobilenetv3small vs mobilenetv2"):
        merge_stores([tmp_path / "a.h5", tmp_path / "b.h5"], tmp_path / "all.h5")
