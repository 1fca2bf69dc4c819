from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from imgvec.errors import BadInputError, MismatchError
from imgvec.vectors.index import build_index, choose_kind, load_index, normalized
from imgvec.files.provenance import Provenance
from imgvec.vectors.store import StoreWriter, create_store, open_store
from page_cache import resident_fraction


def _store(path: Path, x: np.ndarray, backbone: str = "mobilenetv3small"):
    prov = Provenance(backbone, "random", 0, None, None, 64, "in model", x.shape[1])
    with create_store(path, prov, str(path.parent)) as w:
        w.append(x, [f"{i}.png" for i in range(len(x))], [""] * len(x))
    return open_store(path)


def _clustered(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(20, d))
    return (centres[rng.integers(0, 20, n)] + 0.5 * rng.normal(size=(n, d))).astype(np.float32)


def test_flat_is_exact_cosine(tmp_path: Path):
    x = _clustered(500, 32)
    q = _clustered(20, 32, seed=1)
    with _store(tmp_path / "s.h5", x) as s:
        index = build_index(s, "auto")
    assert index.kind == "flat"
    scores, ids = index.search(q, 5)
    brute = normalized(q) @ normalized(x).T
    np.testing.assert_array_equal(ids, np.argsort(-brute, axis=1)[:, :5])
    np.testing.assert_allclose(scores, np.sort(brute, axis=1)[:, ::-1][:, :5], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind, min_recall", [("hnsw", 0.95), ("ivfpq", 0.4)])
def test_approximate_indexes_find_most_true_neighbours(tmp_path: Path, kind: str, min_recall: float):
    x = _clustered(1500, 32)
    q = _clustered(50, 32, seed=2)
    with _store(tmp_path / "s.h5", x) as s:
        index = build_index(s, kind)
    _, ids = index.search(q, 10)
    truth = np.argsort(-(normalized(q) @ normalized(x).T), axis=1)[:, :10]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth)])
    assert recall >= min_recall


def test_save_load_round_trip_and_coverage_checks(tmp_path: Path):
    x = _clustered(200, 16)
    with _store(tmp_path / "s.h5", x) as s:
        index = build_index(s, "flat")
        index.save(tmp_path / "s.index.h5")
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []  # no temp file left
    loaded = load_index(tmp_path / "s.index.h5")
    assert loaded.kind == "flat" and loaded.rows == 200
    np.testing.assert_array_equal(loaded.search(x[:3], 3)[1], index.search(x[:3], 3)[1])
    with open_store(tmp_path / "s.h5") as s:
        loaded.check_covers(s)
    with StoreWriter(tmp_path / "s.h5") as w:
        w.append(x[:1], ["new.png"], [""])
    with open_store(tmp_path / "s.h5") as s:
        with pytest.raises(MismatchError, match=r"covers 200 rows but .* has 201; rebuild it \(imgvec index"):
            loaded.check_covers(s)
    with _store(tmp_path / "other.h5", x) as other:
        with pytest.raises(MismatchError, match="built from another store"):
            loaded.check_covers(other)


def test_kind_choice():
    assert choose_kind("auto", 10) == "flat"
    # auto: HNSW while its build fits the memory budget (default: half the RAM), IVF-PQ beyond
    assert choose_kind("auto", 10_000_000, dim=1280, memory_budget=200 * 2**30) == "hnsw"
    assert choose_kind("auto", 10_000_000, dim=1280, memory_budget=8 * 2**30) == "ivfpq"
    with pytest.raises(BadInputError, match="expected one of"):
        choose_kind("annoy", 10)
    with pytest.raises(BadInputError, match="ivfpq index needs at least"):
        choose_kind("ivfpq", 10)


def test_auto_picks_compact_ivfpq_when_hnsw_would_not_fit_the_budget():
    assert choose_kind("auto", 1_000_000, 1280, memory_budget=16 << 30) == "hnsw"
    assert choose_kind("auto", 1_000_000, 1280, memory_budget=2 << 30) == "ivfpq"
    # The budget covers the build's real peak (FAISS doubles its storage while growing: about twice the
    # index), not the index alone: half of a 24 GiB machine takes HNSW at 1M rows, not at 1.2M.
    assert choose_kind("auto", 1_000_000, 1280, memory_budget=12 << 30) == "hnsw"
    assert choose_kind("auto", 1_200_000, 1280, memory_budget=12 << 30) == "ivfpq"


def test_training_sample_is_streamed_and_seeded(tmp_path: Path):
    from imgvec.vectors.index import _training_sample

    x = _clustered(300, 8)
    with _store(tmp_path / "s.h5", x) as s:
        a, b = _training_sample(s, 50), _training_sample(s, 50)
    np.testing.assert_array_equal(a, b)
    assert {tuple(r) for r in a} <= {tuple(r) for r in x}


def test_index_is_built_from_bounded_chunks_with_the_same_result(tmp_path: Path, monkeypatch):
    from imgvec.vectors import index as ix
    from imgvec.vectors.store import Store

    x = _clustered(2500, 8)
    q = _clustered(10, 8, seed=3)
    reads: list[int] = []
    original = Store.iter_embeddings

    def spy(self, chunk: int = 65536, start: int = 0):
        for start, block in original(self, chunk, start):
            reads.append(len(block))
            yield start, block

    monkeypatch.setattr(Store, "iter_embeddings", spy)
    monkeypatch.setattr(ix, "ADD_CHUNK_BYTES", 1)  # the smallest chunk: 1024 rows
    with _store(tmp_path / "s.h5", x) as s:
        index = build_index(s, "flat")
    assert reads == [1024, 1024, 452] and ix.chunk_rows(1280) == 1024
    brute = normalized(q) @ normalized(x).T
    np.testing.assert_array_equal(index.search(q, 5)[1], np.argsort(-brute, axis=1)[:, :5])
    monkeypatch.setattr(ix, "ADD_CHUNK_BYTES", 64 << 20)
    assert ix.chunk_rows(1280) == 13107  # 64 MiB of 1280-d float32 rows


def test_faiss_gpu_modes_without_a_gpu():
    from imgvec.vectors.index import use_faiss_gpu

    assert use_faiss_gpu("auto") is False and use_faiss_gpu("off") is False
    with pytest.raises(BadInputError, match="faiss_gpu on: the installed faiss has no GPU support"):
        use_faiss_gpu("on")
    with pytest.raises(BadInputError, match="expected one of"):
        use_faiss_gpu("maybe")


def test_index_files_are_written_in_bounded_blocks_and_mapped_on_load(tmp_path: Path, monkeypatch):
    """No second copy of the index in memory: FAISS's bytes go to the file a block at a time, and
    loading maps them: FAISS's vectors point into the file mapping instead of a copy."""
    import faiss

    import imgvec.vectors.index as ix

    x = _clustered(3000, 32)
    with _store(tmp_path / "s.h5", x) as s:
        index = build_index(s, "hnsw")
    monkeypatch.setattr(ix, "IO_BLOCK_BYTES", 4096)
    written: list[int] = []
    flush = ix._DatasetSink.flush
    monkeypatch.setattr(ix._DatasetSink, "flush", lambda self: (written.append(len(self.buffer)), flush(self))[1])
    index.save(tmp_path / "s.index.h5")
    total = 3000 * (32 * 4 + 2 * 32 * 4)  # the vectors and the level-0 links: hundreds of blocks
    assert len(written) > total // 4096 // 2 and max(written) < 2 * 4096
    loaded = load_index(tmp_path / "s.index.h5")
    storage = faiss.downcast_index(faiss.downcast_index(loaded.faiss_index).storage)
    vectors = faiss.rev_swig_ptr(storage.get_xb(), 3000 * 32)
    start = loaded.mapping.ctypes.data
    assert start <= vectors.ctypes.data < start + len(loaded.mapping)  # a view of the file, not a copy
    np.testing.assert_array_equal(loaded.search(x[:20], 5)[1], index.search(x[:20], 5)[1])


def _vm_flags(address: int) -> list[str]:
    """The kernel's flags for the mapping holding ``address`` (/proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, stop = (int(v, 16) for v in head.split("-"))
            inside = start <= address < stop
        elif inside and head == "VmFlags:":
            return line.split()[1:]
    raise AssertionError("no mapping holds the index")


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux's /proc/self/smaps")
@pytest.mark.parametrize("kind, random", [("hnsw", True), ("ivfpq", True), ("flat", False)])
def test_approximate_indexes_are_mapped_for_scattered_reads(tmp_path: Path, kind: str, random: bool):
    """HNSW and IVF-PQ searches touch scattered vectors: their mapping is advised random (no read-ahead
    around each, which on a cold cache cost 3.1 s against 0.19 s per search at 1M rows); a flat
    index is read from end to end and keeps the kernel's read-ahead."""
    with _store(tmp_path / "s.h5", _clustered(2000, 32)) as s:
        build_index(s, kind).save(tmp_path / "s.index.h5")
    loaded = load_index(tmp_path / "s.index.h5")
    assert ("rr" in _vm_flags(loaded.mapping.ctypes.data)) is random


def test_a_saved_index_leaves_no_pages_in_the_page_cache(tmp_path: Path):
    """The first search after `imgvec index` maps what the writer left cached, in folios the kernel maps whole:
    a saved index leaves none (fileio.uncache). A store is written the usual way, pages kept."""
    import subprocess
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("mincore and posix_fadvise as Linux has them")
    if subprocess.run(["stat", "-f", "-c", "%T", str(tmp_path)], capture_output=True, text=True).stdout.strip() == "tmpfs":
        pytest.skip("a tmpfs file is its page cache: nothing to drop")
    x = _clustered(2000, 64)
    with _store(tmp_path / "s.h5", x) as s:
        build_index(s, "hnsw").save(tmp_path / "s.index.h5")
    if resident_fraction(tmp_path / "s.h5") == 0:
        pytest.skip("this file system shows no page cache residency (the store's own pages are not seen)")
    assert resident_fraction(tmp_path / "s.index.h5") == 0
    loaded = load_index(tmp_path / "s.index.h5")  # and it still reads and searches, from the disk
    assert loaded.rows == 2000 and loaded.search(x[:3], 1)[1][:, 0].tolist() == [0, 1, 2]
