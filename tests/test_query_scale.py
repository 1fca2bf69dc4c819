"""Indexes mapped, not read; a query that always covers the store; the generated big store.

Small sizes: the speed and memory figures at 100k-1M rows are in benchmarks/bench_query_scale.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from imgvec.cli import app
from imgvec.errors import BadInputError
from imgvec.vectors.index import build_index, load_index, normalized
from imgvec.vectors.store import open_store
from test_index import _clustered, _store

ROOT = Path(__file__).resolve().parent.parent
SMALL_ARGS = ["-m", "mobilenetv3small", "--weights", "none", "--image-size", "64"]


def run(*args: object, code: int = 0):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
    return result


def _faiss_arrays(index) -> list[np.ndarray]:
    """The big arrays FAISS searches: flat vectors, HNSW storage and links, IVF-PQ list codes."""
    import faiss

    idx = faiss.downcast_index(index.faiss_index)
    if index.kind == "ivfpq":
        lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(idx).invlists)
        full = next(i for i in range(lists.nlist) if lists.list_size(i))
        return [faiss.rev_swig_ptr(lists.get_codes(full), lists.list_size(full) * lists.code_size)]
    flat = faiss.downcast_index(idx.storage) if index.kind == "hnsw" else idx
    arrays = [faiss.rev_swig_ptr(flat.get_xb(), index.rows * flat.d)]
    if index.kind == "hnsw":
        arrays.append(faiss.rev_swig_ptr(idx.hnsw.neighbors.data(), idx.hnsw.neighbors.size()))
    return arrays


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_mapped_index_answers_as_the_built_one_from_the_file_mapping(tmp_path: Path, kind: str):
    x = _clustered(2000, 32)
    q = _clustered(30, 32, seed=3)
    with _store(tmp_path / "s.h5", x) as s:
        built = build_index(s, kind)
    built.save(tmp_path / "s.index.h5")
    loaded = load_index(tmp_path / "s.index.h5")
    start, stop = loaded.mapping.ctypes.data, loaded.mapping.ctypes.data + len(loaded.mapping)
    for array in _faiss_arrays(loaded):  # FAISS reads the file's pages, not a copy of them
        assert start <= array.ctypes.data and array.ctypes.data + array.nbytes <= stop
    want_scores, want_ids = built.search(q, 10)
    scores, ids = loaded.search(q, 10)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-6)
    if kind == "flat":
        truth = np.argsort(-(normalized(q) @ normalized(x).T), axis=1)[:, :10]
        np.testing.assert_array_equal(ids, truth)


def test_an_index_in_the_old_chunked_layout_is_refused_with_the_rebuild_command(tmp_path: Path, store_path: Path,
                                                                                image_dir: Path):
    import json

    import h5py

    store = tmp_path / "photos.h5"
    shutil.copy(store_path, store)
    run("index", store)
    index = tmp_path / "photos.index.h5"
    with h5py.File(index, "r+") as h5:  # what imgvec wrote before: the same bytes in 1 MiB chunks
        blob = h5["faiss"][:]
        del h5["faiss"]
        h5.create_dataset("faiss", data=blob, maxshape=(None,), chunks=(1 << 20,))
    with pytest.raises(BadInputError, match=r"chunked layout of an older imgvec.*imgvec index STORE"):
        load_index(index)
    image = next(image_dir.rglob("*.png"))
    r = run("query", store, image, code=2)
    assert "chunked layout" in r.stderr and "imgvec index STORE" in r.stderr
    run("index", store)  # the user's next step: the rebuilt index is mapped and answers
    assert load_index(index).mapping is not None
    r = run("query", store, image, "-k", "1", "-f", "json")
    top = json.loads(r.stdout)["queries"][0]["results"][0]
    assert Path(top["path"]).name == image.name and top["score"] > 0.999


@pytest.fixture()
def photos(tmp_path: Path, image_dir: Path) -> Path:
    """A copy of the session's 24 images, embedded into photos.h5 and indexed."""
    folder = tmp_path / "photos"
    shutil.copytree(image_dir, folder)
    run("embed", folder, "-o", tmp_path / "photos.h5", *SMALL_ARGS)
    run("index", tmp_path / "photos.h5", "--kind", "hnsw")
    return folder


def test_rows_embedded_after_the_index_are_searched_without_reindexing(tmp_path: Path, photos: Path):
    import json

    from imgvec.synthetic import make_image_folder

    store = tmp_path / "photos.h5"
    make_image_folder(photos / "new", per_class=3, size=64, seed=7, classes=("reds", "blues", "greens", "greys")[:2],
                      fmt="jpg")
    run("embed", photos, "-o", store, *SMALL_ARGS)
    with open_store(store) as s:
        assert s.rows == 30
    new = sorted((photos / "new").rglob("*.jpg"))
    r = run("query", store, *new, "-k", "3", "-f", "json")
    assert "6 of 30 rows" in r.stderr and "not indexed yet" in r.stderr and f"imgvec index {store}" in r.stderr
    for q in json.loads(r.stdout)["queries"]:
        top = q["results"][0]
        assert Path(q["query"]).name == Path(top["path"]).name and top["score"] > 0.999
        assert [n["rank"] for n in q["results"]] == [1, 2, 3]
    run("index", store)  # extending the index: then nothing is left out and nothing is said
    r = run("query", store, new[0], "-k", "3")
    assert "not indexed" not in r.stderr


def test_rows_removed_by_sync_never_come_back(tmp_path: Path, photos: Path):
    import json

    store = tmp_path / "photos.h5"
    gone = sorted(photos.rglob("*.png"))[:4]
    kept = tmp_path / "kept"
    kept.mkdir()
    for path in gone:
        shutil.copy(path, kept / path.name)
        path.unlink()
    run("embed", photos, "-o", store, *SMALL_ARGS, "--sync")
    r = run("query", store, *sorted(kept.iterdir()), "-k", "20", "-f", "json")
    assert "predates rows removed" in r.stderr and f"imgvec index {store}" in r.stderr
    names = {Path(n["path"]).name for q in json.loads(r.stdout)["queries"] for n in q["results"]}
    assert len(names) == 20 and not names & {p.name for p in gone}
    with open_store(store) as s:
        assert names <= {Path(p).name for p in s.paths()}
    header = run("query", store, *sorted(kept.iterdir())[:1], "-k", "3").stdout.splitlines()[0]
    assert f"index {store.with_name('photos.index.h5')} not used: it predates rows removed" in header, header
    assert "no index file" not in header  # the file is there: the table says why it was not searched


@pytest.fixture(scope="module")
def big_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """90,000 generated rows of 576 values (mobilenetv3small at 64 px), and its 207 MB flat index."""
    store = tmp_path_factory.mktemp("big") / "big.h5"
    subprocess.run([sys.executable, "-m", "benchmarks.make_store", str(store), "--rows", "90000", "--dim", "576",
                    "--image-size", "64"], cwd=ROOT, check=True, capture_output=True)
    run("index", store, "--kind", "flat")
    return store


def test_make_store_writes_a_store_info_index_and_query_accept(big_store: Path, image_dir: Path):
    import json

    r = run("info", big_store, "-f", "json")
    info = json.loads(r.stdout)
    assert info["rows"] == 90000 and info["dim"] == 576 and info["provenance"]["backbone"] == "mobilenetv3small"
    assert info["index"]["state"] == "up to date" and info["index"]["rows"] == 90000
    with open_store(big_store) as s:
        assert s.paths_at([0, 89999]) == ["img_0000000.jpg", "img_0089999.jpg"]
        x = s.embeddings(0, 1000)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1, rtol=1e-5)
    image = next(image_dir.rglob("*.png"))
    r = run("query", big_store, image, "-k", "5", "-f", "json")
    results = json.loads(r.stdout)["queries"][0]["results"]
    assert len(results) == 5 and all(Path(n["path"]).name.startswith("img_") for n in results)
    assert [n["score"] for n in results] == sorted((n["score"] for n in results), reverse=True)


def test_opening_a_big_index_does_not_read_it(big_store: Path):
    """A child that opens the 207 MB flat index and searches nothing grows by a few MB, not by the index."""
    index = big_store.with_name("big.index.h5")
    code = (
        "import sys\n"
        "from imgvec.vectors.index import load_index\n"
        "import faiss, h5py\n"
        "status = lambda: dict(l.split(':', 1) for l in open('/proc/self/status').read().splitlines())\n"
        "before = int(status()['VmRSS'].split()[0])\n"
        "index = load_index(sys.argv[1])\n"
        "print(int(status()['VmHWM'].split()[0]) - before, index.rows)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(index)], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    grown_kb, rows = map(int, out.stdout.split())
    size = index.stat().st_size
    assert rows == 90000 and size > 200e6
    assert grown_kb * 1024 < size / 10, f"opening grew the process by {grown_kb / 1024:.0f} MB"
