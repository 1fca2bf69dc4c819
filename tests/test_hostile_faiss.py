"""Forged FAISS blobs in index files never reach FAISS (issue 17).

The corpus is built here from valid indexes by editing their FAISS bytes where FAISS's writer
(``faiss/impl/index_write.cpp``) puts each field; the offsets are worked out in this file, not
taken from imgvec.files.faissblob, so a walker that misread the format would not agree with them.
Every forged file goes through the real command line and must end in one line, exit 2-4.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import pytest

from imgvec.files import faissblob
from imgvec.errors import BadInputError
from imgvec.vectors.index import VectorIndex, build_index, load_index, normalized
from imgvec.vectors.store import create_store, open_store

HEADER = 4 + 4 + 8 + 8 + 8 + 1 + 4  # fourcc, d, ntotal, two unused int64, is_trained, metric
PYTHON = [sys.executable, "-m", "imgvec"]


# -- reading and editing FAISS's layout --------------------------------------------------------
def _u64(blob: bytes, at: int) -> int:
    return struct.unpack_from("<Q", blob, at)[0]


def _put(blob: bytes, at: int, fmt: str, *values: int) -> bytes:
    out = bytearray(blob)
    struct.pack_into("<" + fmt, out, at, *values)
    return bytes(out)


def _flat_end(blob: bytes, at: int) -> int:
    """Where an IxFI block starting at ``at`` ends: header, a count of floats, the floats."""
    return at + HEADER + 8 + 4 * _u64(blob, at + HEADER)


def _hnsw_layout(blob: bytes) -> dict[str, int]:
    """Byte offsets of an IHNf blob's fields (vectors: where their 64-bit count is)."""
    at, out = HEADER, {}
    for name, size in (("probas", 8), ("cum", 4), ("levels", 4), ("offsets", 8), ("links", 4)):
        out[name] = at
        at += 8 + size * _u64(blob, at)
    out.update(entry=at, max_level=at + 4, ef_construction=at + 8, storage=at + 20)
    return out


def _hnsw_array(blob: bytes, lay: dict[str, int], name: str, dtype: str) -> np.ndarray:
    return np.frombuffer(blob, dtype, _u64(blob, lay[name]), lay[name] + 8)


def _ivf_layout(blob: bytes, d: int) -> dict[str, int]:
    """Byte offsets of an IwPQ blob's fields, up to its ilar inverted lists and their payload."""
    out = {"nlist": HEADER, "quantizer": HEADER + 16}
    at = _flat_end(blob, out["quantizer"])
    out["direct_map"] = at
    at += 1 + 8 + 1
    code_size = _u64(blob, at)
    nbits = _u64(blob, at + 24)
    at += 8 + 24 + 8 + 4 * d * (1 << nbits)  # code_size, PQ d/M/nbits, centroids
    out.update(code_size=code_size, invlists=at, list_type=at + 20, sizes=at + 24)
    out["payload"] = at + 24 + 8 + 8 * _u64(blob, at + 24)
    return out


def _ivf_ids(blob: bytes, lay: dict[str, int]) -> list[tuple[int, int]]:
    """(byte offset, id) of every stored id, list by list: codes then int64 ids."""
    nlist, at, out = _u64(blob, lay["nlist"]), lay["payload"], []
    for size in np.frombuffer(blob, "<u8", nlist, lay["sizes"] + 8):
        at += int(size) * lay["code_size"]
        out += [(at + 8 * i, struct.unpack_from("<q", blob, at + 8 * i)[0]) for i in range(int(size))]
        at += 8 * int(size)
    return out


def _blob(path: Path) -> bytes:
    import h5py

    with h5py.File(path, "r") as h5:
        return h5["faiss"][...].tobytes()


def _with_blob(src: Path, dst: Path, blob: bytes) -> Path:
    """A copy of index file ``src`` whose FAISS bytes are ``blob`` (the header, and its checksum, kept)."""
    import h5py

    shutil.copyfile(src, dst)
    with h5py.File(dst, "r+") as h5:
        del h5["faiss"]
        h5.create_dataset("faiss", data=np.frombuffer(blob, np.uint8))  # contiguous, as imgvec writes it
    return dst


# -- the valid indexes the corpus starts from -------------------------------------------------
ROWS = 1200  # enough for imgvec's IVF-PQ and for HNSW nodes above level 1


@pytest.fixture(scope="module")
def big_store(tmp_path_factory: pytest.TempPathFactory, store_path: Path) -> Path:
    """ROWS generated vectors in a store made like the conftest one (so its queries embed the same way)."""
    with open_store(store_path) as s:
        prov, dim = s.provenance, s.dim
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(40, dim))[rng.integers(0, 40, ROWS)] + 0.3 * rng.normal(size=(ROWS, dim)))
    path = tmp_path_factory.mktemp("big") / "big.h5"
    with create_store(path, prov, str(path.parent)) as w:
        w.append(x.astype(np.float32), [f"{i}.png" for i in range(ROWS)], [""] * ROWS)
    return path


@pytest.fixture(scope="module")
def valid(tmp_path_factory: pytest.TempPathFactory, big_store: Path) -> dict[str, Path]:
    """A valid index file of each kind over the big store, as ``imgvec index`` builds it."""
    folder = tmp_path_factory.mktemp("valid")
    with open_store(big_store) as s:
        return {kind: build_index(s, kind).save(folder / f"{kind}.index.h5") for kind in ("flat", "hnsw", "ivfpq")}


@pytest.fixture(scope="module")
def dim(big_store: Path) -> int:
    with open_store(big_store) as s:
        return s.dim


@pytest.fixture(scope="module")
def query_image(holdout_dir: Path) -> Path:
    return sorted(p for p in holdout_dir.rglob("*") if p.is_file())[0]


def _ondisk_blob(store: Path, outside: Path, offset: int | None = None) -> bytes:
    """An imgvec IVF-PQ index of ``store`` whose lists FAISS keeps in file ``outside`` (OnDiskInvertedLists),
    serialised as FAISS does: the blob names that file. ``offset``: the first list's place in it."""
    import faiss

    from imgvec.vectors.index import _new_faiss_index

    with open_store(store) as s:
        x = normalized(s.embeddings())
    index = _new_faiss_index("ivfpq", x.shape[1], len(x))
    index.train(x)
    ivf = faiss.extract_index_ivf(index)
    lists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(outside))
    ivf.replace_invlists(lists, True)
    lists.this.disown()
    index.add(x)
    blob = faiss.serialize_index(index).tobytes()
    del index, ivf
    if offset is not None:
        at = blob.index(b"ilod") + 4 + 8 + 8 + 8  # nlist, code_size, then the lists' count: (size, capacity, offset)s
        blob = _put(blob, at + 16, "Q", offset)
    return blob


def _cli(*args: object, limit: int | None = None) -> tuple[int, str, str, int]:
    """Run ``imgvec args`` in a child (under RLIMIT_AS ``limit`` if given): rc, stdout, stderr, peak RSS (KiB)."""
    code = textwrap.dedent("""
        import json, resource, subprocess, sys
        limit, args = json.loads(sys.argv[1])
        def cap():
            if limit:
                resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        out = subprocess.run(args, capture_output=True, text=True, preexec_fn=cap)
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        print(json.dumps([out.returncode, out.stdout, out.stderr, peak]))
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    cmd = [*PYTHON, *map(str, args)]
    out = subprocess.run([sys.executable, "-c", code, json.dumps([limit, cmd])], capture_output=True, text=True,
                         env=env, check=True, timeout=600)
    rc, stdout, stderr, rss = json.loads(out.stdout)
    return rc, stdout, stderr, rss


def _one_line(rc: int, stderr: str, path: Path) -> None:
    """Refused the imgvec way: exit 2-4, and stderr is exactly one line naming the file as damaged."""
    assert rc in (2, 3, 4), (rc, stderr[-2000:])
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"imgvec: error: {path}: damaged imgvec index file"), stderr[-2000:]


# -- the corpus: each forgery, how it is made, and (in its name) what it does to today's FAISS --------
def _ivf_id(blob: bytes, d: int, which: int, value: int) -> bytes:
    lay = _ivf_layout(blob, d)
    return _put(blob, _ivf_ids(blob, lay)[which][0], "q", value)


def _ivf_id_twice(blob: bytes, d: int) -> bytes:
    lay = _ivf_layout(blob, d)
    ids = _ivf_ids(blob, lay)
    return _put(blob, ids[1][0], "q", ids[0][1])


def _ivf_null_lists(blob: bytes, d: int) -> bytes:
    lay = _ivf_layout(blob, d)
    return blob[: lay["invlists"]] + b"il00"


def _ivf_quantizer_too_big(blob: bytes, d: int) -> bytes:
    """The coarse quantizer holds nlist + 30 centroids: FAISS reads list numbers beyond its lists."""
    q = HEADER + 16
    end = _flat_end(blob, q)
    nlist = _u64(blob, HEADER)
    extra = np.random.default_rng(0).normal(size=(30, d)).astype("<f4").tobytes()
    blob = _put(blob, q + 8, "q", nlist + 30)
    blob = _put(blob, q + HEADER, "Q", (nlist + 30) * d)
    return blob[:end] + extra + blob[end:]


def _flat_null(blob: bytes, d: int) -> bytes:
    return b"null" + blob[4:]


def _hnsw_null_storage(blob: bytes, d: int) -> bytes:
    lay = _hnsw_layout(blob)
    return blob[: lay["storage"]] + b"null"


def _hnsw_entry_below_top(blob: bytes, d: int) -> bytes:
    """The entry point is the last node, set on a level it does not have (its links end the array)."""
    lay = _hnsw_layout(blob)
    levels = _hnsw_array(blob, lay, "levels", "<i4")
    top = int(levels.max())
    last = len(levels) - 1
    assert levels[last] == 1 < top, "the fixture's last node should be on level 0 only, below the top"
    return _put(blob, lay["entry"], "i", last)


def _hnsw_link_to_lower_node(blob: bytes, d: int) -> bytes:
    """Every level-1 link of the top nodes leads to the last node, which only has level 0."""
    lay = _hnsw_layout(blob)
    levels = _hnsw_array(blob, lay, "levels", "<i4")
    cum = _hnsw_array(blob, lay, "cum", "<i4")
    offsets = _hnsw_array(blob, lay, "offsets", "<u8")
    assert levels.max() >= 2, "the fixture's graph should have a level above 0"
    last = len(levels) - 1
    for node in np.flatnonzero(levels >= 2):
        for slot in range(int(cum[1]), int(cum[2])):
            blob = _put(blob, lay["links"] + 8 + 4 * (int(offsets[node]) + slot), "i", last)
    return blob


CORPUS: dict[str, tuple[str, Callable[[bytes, int], bytes]]] = {
    # today: rc 0 and short answers (the negative id is dropped)
    "ivf_negative_id": ("ivfpq", lambda b, d: _ivf_id(b, d, 0, -5)),
    # today: IndexError traceback
    "ivf_id_out_of_range": ("ivfpq", lambda b, d: _ivf_id(b, d, 0, 10**6)),
    # today: rc 0, one row answered twice and another never
    "ivf_id_twice": ("ivfpq", _ivf_id_twice),
    # today: FAISS warns, then searches missing lists (a crash)
    "ivf_null_lists": ("ivfpq", _ivf_null_lists),
    # today: FAISS probes lists it does not have (out-of-bounds reads)
    "ivf_quantizer_more_centroids_than_lists": ("ivfpq", _ivf_quantizer_too_big),
    # today: FAISS returns no index at all, then an AttributeError traceback
    "flat_null_fourcc": ("flat", _flat_null),
    # today: an HNSW index without vectors, searched (a crash)
    "hnsw_null_storage": ("hnsw", _hnsw_null_storage),
    # today: the search starts on links the entry node does not have (out-of-bounds reads)
    "hnsw_entry_point_below_top": ("hnsw", _hnsw_entry_below_top),
    # today: the search follows links into a node's missing level (out-of-bounds reads)
    "hnsw_link_to_lower_node": ("hnsw", _hnsw_link_to_lower_node),
}


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_forged_blob_is_one_line_through_the_cli(case: str, valid: dict[str, Path], dim: int, big_store: Path,
                                                 query_image: Path, tmp_path: Path):
    kind, forge = CORPUS[case]
    forged = _with_blob(valid[kind], tmp_path / f"{case}.index.h5", forge(_blob(valid[kind]), dim))
    rc, out, err, _ = _cli("query", big_store, query_image, "--index", forged, "-f", "json")
    _one_line(rc, err, forged)
    assert out == ""


# -- on-disk inverted lists: a blob that names a file ------------------------------------------
IN_ACCESS, IN_MODIFY, IN_OPEN = 0x1, 0x2, 0x20


class _Watch:
    """inotify on one file: whether anything opened, read or wrote it while watched."""

    def __init__(self, path: Path) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK)
        assert self.fd >= 0
        assert self.libc.inotify_add_watch(self.fd, str(path).encode(), IN_ACCESS | IN_MODIFY | IN_OPEN) >= 0

    def events(self) -> bytes:
        try:
            return os.read(self.fd, 65536)
        except BlockingIOError:
            return b""
        finally:
            os.close(self.fd)


@pytest.mark.parametrize("offset", [None, 1 << 50], ids=["file", "absurd_offset"])
def test_blob_naming_a_file_never_opens_it(offset: int | None, valid: dict[str, Path], big_store: Path,
                                           query_image: Path, tmp_path: Path):
    outside = tmp_path / "outside.bin"
    blob = _ondisk_blob(big_store, outside, offset)
    assert str(outside).encode() in blob and b"ilod" in blob
    before = outside.read_bytes()
    forged = _with_blob(valid["ivfpq"], tmp_path / "forged.index.h5", blob)
    watch = _Watch(outside)
    rc, out, err, _ = _cli("query", big_store, query_image, "--index", forged)
    _one_line(rc, err, forged)
    if offset is None:  # the next step: `imgvec index` rebuilds over the forged file (today: extends the named one)
        rc, out, err, _ = _cli("index", big_store, "-o", forged, "--kind", "flat")
        assert rc == 0, err
    assert watch.events() == b"", "the file the blob names was opened"
    assert outside.read_bytes() == before
    if offset is not None:
        return
    rc, out, err, _ = _cli("query", big_store, query_image, "--index", forged, "-f", "json")
    assert rc == 0, err
    assert len(json.loads(out)["queries"][0]["results"]) == 10


# -- size claims, under an address-space limit -----------------------------------------------
# Sized from what the same query maps with a valid index on this machine (not from one machine's figures):
# the address-space limit leaves room for a 1 GB claim (so a check that let it through would show in the peak
# RSS) but not for a 4 GB one; a peak RSS more than MARGIN over the valid run's is an allocated claim.
MARGIN = 256 << 20  # a quarter of the smallest claim below


class Limits(NamedTuple):
    address_space: int  # bytes: RLIMIT_AS for the runs on forged files
    rss_kib: int  # the peak RSS a run on a forged file of a few MB must stay under


@pytest.fixture(scope="module")
def limits(valid: dict[str, Path], big_store: Path, query_image: Path) -> Limits:
    """The valid flat index's query, measured in a child: its peak address space and peak RSS."""
    code = textwrap.dedent("""
        import atexit, runpy, sys
        def peaks():
            status = dict(line.split(":", 1) for line in open("/proc/self/status"))
            print("PEAKS", status["VmPeak"].split()[0], status["VmHWM"].split()[0], file=sys.stderr)
        atexit.register(peaks)
        sys.argv = ["imgvec", *sys.argv[1:]]
        runpy.run_module("imgvec", run_name="__main__")
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code, "query", str(big_store), str(query_image), "--index",
                          str(valid["flat"])], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    vm_kib, hwm_kib = map(int, out.stderr.split("PEAKS ")[1].split()[:2])
    return Limits((vm_kib << 10) + (3 << 29), hwm_kib + (MARGIN >> 10))  # + 1.5 GiB: a 1 GB claim fits


@pytest.mark.parametrize("claim", [1 << 28, 1 << 30, 1 << 38], ids=["1GB", "4GB", "1TB"])
def test_a_huge_claim_allocates_nothing(claim: int, valid: dict[str, Path], big_store: Path, query_image: Path,
                                        tmp_path: Path, limits: Limits):
    """A flat blob of a few MB claiming ``claim`` floats: one line, no MemoryError, no kill, no big RSS
    (today FAISS allocates a claim that fits under the limit, and fails on the rest)."""
    blob = _put(_blob(valid["flat"]), HEADER, "Q", claim)
    forged = _with_blob(valid["flat"], tmp_path / "claim.index.h5", blob)
    assert forged.stat().st_size < 4_000_000
    rc, _, err, rss_kib = _cli("query", big_store, query_image, "--index", forged, limit=limits.address_space)
    _one_line(rc, err, forged)
    assert rss_kib < limits.rss_kib, f"peak RSS {rss_kib >> 10} MiB for a {forged.stat().st_size}-byte file"


def test_a_huge_hnsw_claim_allocates_nothing(valid: dict[str, Path], big_store: Path, query_image: Path,
                                             tmp_path: Path, limits: Limits):
    blob = _blob(valid["hnsw"])
    blob = _put(blob, _hnsw_layout(blob)["links"], "Q", 3 << 27)  # 1.5 GB of int32 links
    forged = _with_blob(valid["hnsw"], tmp_path / "claim.index.h5", blob)
    rc, _, err, rss_kib = _cli("query", big_store, query_image, "--index", forged, limit=limits.address_space)
    _one_line(rc, err, forged)
    assert rss_kib < limits.rss_kib, f"peak RSS {rss_kib >> 10} MiB"


def test_a_dataset_larger_than_its_file_is_refused_before_reading(valid: dict[str, Path], tmp_path: Path):
    """The walker reads a dataset by its length: one claiming more than the file holds never gets to it."""
    import h5py

    forged = tmp_path / "sparse.index.h5"
    shutil.copyfile(valid["flat"], forged)
    with h5py.File(forged, "r+") as h5:
        del h5["faiss"]
        h5.create_dataset("faiss", shape=(1 << 40,), dtype=np.uint8, chunks=(1 << 20,))  # never written
    with pytest.raises(BadInputError, match=r"damaged imgvec index file \('faiss' claims 1,?099,?511,?627,?776 bytes"):
        load_index(forged)


# -- the walker itself, in process: every field of each kind --------------------------------------
def _refused(blob: bytes, kind: str, d: int, rows: int, match: str) -> None:
    with pytest.raises(faissblob.MalformedBlob, match=match):
        faissblob.check(blob, kind, d, rows)


def test_walker_refuses_each_field(valid: dict[str, Path], dim: int):
    rows = ROWS
    flat, hnsw, ivf = (_blob(valid[k]) for k in ("flat", "hnsw", "ivfpq"))
    for kind, blob in (("flat", flat), ("hnsw", hnsw), ("ivfpq", ivf)):
        faissblob.check(blob, kind, dim, rows)
        faissblob.check(np.frombuffer(blob, np.uint8), kind, dim, rows)
        _refused(blob, kind, dim + 1, rows, r"byte 4: the index's d is \d+, expected")
        _refused(blob, kind, dim, rows + 1, f"byte 8: the index's ntotal is {rows}, expected {rows + 1}")
        _refused(_put(blob, 33, "i", 1), kind, dim, rows, r"metric is 1, expected inner product")
        _refused(_put(blob, 32, "B", 0), kind, dim, rows, "is_trained is False")
        _refused(_put(blob, 32, "B", 7), kind, dim, rows, "is_trained is 7, not a boolean")
        _refused(blob + b"\0", kind, dim, rows, "1 bytes follow the end of the index")
        for cut in (0, 3, 40, len(blob) // 2, len(blob) - 1):
            _refused(blob[:cut], kind, dim, rows, r"needs \d+ bytes, \d+ remain|claimed, \d+ bytes remain")
    _refused(b"IxF2" + flat[4:], "flat", dim, rows, r"byte 0: the index's type is 'IxF2', expected 'IxFI'")
    _refused(b"\xff\x00\x01\x02" + flat[4:], "flat", dim, rows, "type is 0x020100ff")
    _refused(flat, "hnsw", dim, rows, "expected 'IHNf'")

    lay = _hnsw_layout(hnsw)
    levels = _hnsw_array(hnsw, lay, "levels", "<i4")
    links = _hnsw_array(hnsw, lay, "links", "<i4")
    _refused(_put(hnsw, lay["links"] + 8 + 4 * 5, "i", rows), "hnsw", dim, rows,
             rf"neighbour ids outside \[-1, {rows}\)")
    _refused(_put(hnsw, lay["links"] + 8, "i", -2), "hnsw", dim, rows, r"neighbour ids outside")
    _refused(_put(hnsw, lay["levels"] + 8, "i", 0), "hnsw", dim, rows, r"levels outside \[1, ")
    _refused(_put(hnsw, lay["levels"] + 8, "i", 99), "hnsw", dim, rows, r"levels outside")
    top = int(levels.max())
    if top < len(_hnsw_array(hnsw, lay, "probas", "<f8")):  # one level more: the offsets no longer add up
        node = int(np.flatnonzero(levels == 1)[0])
        _refused(_put(hnsw, lay["levels"] + 8 + 4 * node, "i", 2), "hnsw", dim, rows, "offsets disagree")
    _refused(_put(hnsw, lay["offsets"] + 8 + 8 * 3, "Q", 1 << 62), "hnsw", dim, rows, "offsets disagree")
    _refused(_put(hnsw, lay["entry"], "i", rows), "hnsw", dim, rows, f"entry point {rows} is not")
    _refused(_put(hnsw, lay["entry"], "i", -1), "hnsw", dim, rows, "entry point -1 is not")
    _refused(_put(hnsw, lay["max_level"], "i", 40), "hnsw", dim, rows, "max_level is 40")
    _refused(_put(hnsw, lay["ef_construction"], "i", 1 << 30), "hnsw", dim, rows, "efConstruction is")
    _refused(_put(hnsw, lay["cum"] + 12, "i", -7), "hnsw", dim, rows, "are not increasing from 0")
    _refused(_put(hnsw, lay["probas"] + 8, "d", float("nan")), "hnsw", dim, rows, "not probabilities")
    _refused(_put(hnsw, lay["probas"], "Q", 1 << 40), "hnsw", dim, rows, "claimed")
    _refused(_put(hnsw, lay["links"], "Q", len(links) + 1), "hnsw", dim, rows, r"holds \d+ items, expected")
    _refused(hnsw[: lay["storage"]] + b"IxF2" + hnsw[lay["storage"] + 4 :], "hnsw", dim, rows,
             "HNSW storage's type is 'IxF2'")

    lay = _ivf_layout(ivf, dim)
    nlist = _u64(ivf, lay["nlist"])
    _refused(_put(ivf, lay["nlist"], "Q", 0), "ivfpq", dim, rows, "nlist is 0")
    _refused(_put(ivf, lay["nlist"] + 8, "Q", nlist + 1), "ivfpq", dim, rows, "nprobe is")
    _refused(_put(ivf, lay["direct_map"], "B", 2), "ivfpq", dim, rows, "direct map type is 2")
    _refused(_put(ivf, lay["direct_map"] + 1, "Q", 1 << 40), "ivfpq", dim, rows, "direct map holds")
    pq = lay["direct_map"] + 10
    _refused(_put(ivf, pq, "Q", 99), "ivfpq", dim, rows, "IVF code_size is 99")
    _refused(_put(ivf, pq + 8, "Q", dim + 1), "ivfpq", dim, rows, "PQ d is")
    _refused(_put(ivf, pq + 16, "Q", 7), "ivfpq", dim, rows, "PQ M is 7")
    _refused(_put(ivf, pq + 24, "Q", 24), "ivfpq", dim, rows, "PQ nbits is 24")
    for code in (b"ilod", b"ilp2", b"il00"):
        _refused(ivf[: lay["invlists"]] + code + ivf[lay["invlists"] + 4 :], "ivfpq", dim, rows,
                 f"inverted lists is '{code.decode()}', expected 'ilar'")
    _refused(_put(ivf, lay["list_type"], "4s", b"xxxx"), "ivfpq", dim, rows, "list sizes' type is 'xxxx'")
    _refused(_put(ivf, lay["sizes"] + 8, "Q", rows + 1), "ivfpq", dim, rows, "do not add up")
    # two sizes that wrap around 2**64 to the right total
    wrapped = _put(ivf, lay["sizes"] + 8, "Q", (1 << 64) - 1)
    wrapped = _put(wrapped, lay["sizes"] + 16, "Q", rows + 1)
    _refused(wrapped, "ivfpq", dim, rows, "do not add up")
    for value, match in ((-1, rf"ids outside \[0, {rows}\)"), (rows, r"ids outside"), (None, "stored twice")):
        ids = _ivf_ids(ivf, lay)
        _refused(_put(ivf, ids[-1][0], "q", ids[0][1] if value is None else value), "ivfpq", dim, rows, match)


def test_walker_takes_any_buffer_and_never_copies_it(valid: dict[str, Path], dim: int, tmp_path: Path):
    blob = _blob(valid["hnsw"])
    (tmp_path / "blob").write_bytes(blob)
    mapped = np.memmap(tmp_path / "blob", np.uint8, "r")
    for buffer in (blob, memoryview(blob), bytearray(blob), np.frombuffer(blob, np.uint8), mapped):
        faissblob.check(buffer, "hnsw", dim, ROWS)
    with pytest.raises(TypeError, match="must be contiguous"):
        faissblob.check(np.frombuffer(blob, np.uint8)[::2], "hnsw", dim, ROWS)


def test_faiss_reads_the_very_mapping_that_was_checked(valid: dict[str, Path], dim: int, tmp_path: Path,
                                                        monkeypatch):
    """load_index checks the file's mapping and FAISS then reads that same mapping: in place (mapped,
    its arrays point into it) or copied from it (``mapped=False``, an index to extend), never a second
    read of the file that could differ from what was checked. A refused blob never reaches FAISS."""
    import faiss

    import imgvec.vectors.index as ix

    walked: list[np.ndarray] = []
    check = faissblob.check
    monkeypatch.setattr(faissblob, "check", lambda blob, *args: (walked.append(blob), check(blob, *args))[1])
    copied: list[np.ndarray] = []
    source = ix._BlobSource.__init__
    monkeypatch.setattr(ix._BlobSource, "__init__", lambda self, blob: (copied.append(blob), source(self, blob))[1])
    for kind in ("flat", "hnsw", "ivfpq"):
        loaded = load_index(valid[kind])
        assert loaded.mapping is walked.pop() and not loaded.mapping.flags.writeable and not copied
        start, stop = loaded.mapping.ctypes.data, loaded.mapping.ctypes.data + len(loaded.mapping)
        if kind != "ivfpq":  # the vectors FAISS searches lie inside the mapping walked
            inner = faiss.downcast_index(loaded.faiss_index)
            flat = faiss.downcast_index(inner.storage) if kind == "hnsw" else inner
            vectors = faiss.rev_swig_ptr(flat.get_xb(), ROWS * dim)
            assert start <= vectors.ctypes.data and vectors.ctypes.data + vectors.nbytes <= stop
        extendable = load_index(valid[kind], mapped=False)
        assert extendable.mapping is None and copied.pop() is walked.pop()
        assert extendable.faiss_index.ntotal == ROWS
    read: list[object] = []
    monkeypatch.setattr(faiss, "read_index", lambda *args: read.append(args))
    forged = _with_blob(valid["flat"], tmp_path / "ntotal.index.h5",
                        _put(_blob(valid["flat"]), 8, "q", ROWS + 1))
    with pytest.raises(BadInputError, match="ntotal"):
        load_index(forged)
    assert walked and not read, "FAISS was handed a blob the check refused"


# -- valid indexes of every kind still load and answer the same --------------------------------
def test_valid_indexes_load_and_answer_the_same(tmp_path: Path):
    """Over 1200 generated rows, each kind (IVF-PQ as imgvec builds it) saved, checked, loaded and searched."""
    from imgvec.files.provenance import Provenance

    rng = np.random.default_rng(0)
    x = (rng.normal(size=(40, 32))[rng.integers(0, 40, 1200)] + 0.3 * rng.normal(size=(1200, 32))).astype(np.float32)
    prov = Provenance("mobilenetv3small", "random", 0, None, None, 64, "in model", 32)
    with create_store(tmp_path / "s.h5", prov, str(tmp_path)) as w:
        w.append(x, [f"{i}.png" for i in range(len(x))], [""] * len(x))
    q = x[::37] + 0.05
    with open_store(tmp_path / "s.h5") as s:
        for kind in ("flat", "hnsw", "ivfpq"):
            built = build_index(s, kind)
            path = built.save(tmp_path / f"{kind}.index.h5")
            faissblob.check(_blob(path), kind, 32, 1200)
            loaded = load_index(path)
            loaded.check_covers(s)
            want_scores, want_ids = built.search(q, 10)
            scores, ids = loaded.search(q, 10)
            np.testing.assert_array_equal(ids, want_ids)
            np.testing.assert_allclose(scores, want_scores, rtol=1e-6)
            assert ((ids >= 0) & (ids < 1200)).all()


def test_search_never_answers_a_row_outside_the_index(tmp_path: Path):
    """An index whose FAISS ids escaped the checks (built in memory around them) is refused at search."""
    import faiss

    from imgvec.files.provenance import Provenance

    x = normalized(np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32))
    inner = faiss.IndexIDMap(faiss.IndexFlatIP(8))
    inner.add_with_ids(x, np.arange(50, dtype=np.int64) + 1000)
    prov = Provenance("mobilenetv3small", "random", 0, None, None, 64, "in model", 8)
    with pytest.raises(BadInputError, match=r"the index answered row 10\d\d, outside its 50 rows"):
        VectorIndex(inner, "flat", 50, "id", prov).search(x[:2], 3)
    ok = faiss.IndexFlatIP(8)
    ok.add(x)
    _, ids = VectorIndex(ok, "flat", 50, "id", prov).search(x[:2], 3)
    assert ids[:, 0].tolist() == [0, 1]


# -- fuzz: mutations of valid blobs, each loaded in a child under an address-space limit ------------
# One process imports imgvec once, then forks a child per mutated file: the child limits its address
# space, loads the index as `imgvec query` does (load, check against the store, search), and exits.
_FUZZ = textwrap.dedent("""
    import json, os, resource, sys, traceback
    from imgvec.errors import ImgvecError
    from imgvec.vectors.index import load_index
    from imgvec.vectors.store import open_store
    limit, store, files = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    ends = {}
    for f in files:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
                os.dup2(os.open(f + ".err", os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
                try:
                    index = load_index(f)
                    with open_store(store) as s:
                        index.check_covers(s)
                        queries = s.embeddings(0, 5)
                    _, ids = index.search(queries, 5)
                    with open(f + ".out", "w") as out:
                        json.dump(ids.tolist(), out)
                    code = 0
                except ImgvecError as error:
                    print(f"imgvec: error: {error}", file=sys.stderr)
                    code = error.exit_code
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(code)
        _, status, usage = os.wait4(pid, 0)
        end = ["signal", os.WTERMSIG(status)] if os.WIFSIGNALED(status) else ["exit", os.WEXITSTATUS(status)]
        ends[f] = end + [usage.ru_maxrss]
    print(json.dumps(ends))
""")


def _mutations(blob: bytes, rng: np.random.Generator, n: int) -> list[tuple[str, bytes]]:
    """Byte flips (half of them in the first 256 bytes, where the headers are), 64-bit length prefixes
    set to edge values, and truncations."""
    data = np.frombuffer(blob, np.uint8)
    words = np.lib.stride_tricks.sliding_window_view(data, 8)[:: 1].copy().view("<u8").ravel()
    counts = np.flatnonzero((words > 0) & (words < len(blob)))  # plausible length prefixes
    out = []
    for i in range(n):
        how = i % 3
        if how == 0:
            at = int(rng.integers(0, 256 if i % 2 else len(blob)))
            out.append((f"flip@{at}", _put(blob, at, "B", blob[at] ^ (1 << int(rng.integers(0, 8))))))
        elif how == 1:
            at = int(rng.choice(counts))
            edges = [0, 1, _u64(blob, at) - 1, _u64(blob, at) + 1, 1 << 27, 1 << 31, 1 << 40, (1 << 64) - 1]
            value = edges[int(rng.integers(0, len(edges)))]
            out.append((f"length@{at}={value}", _put(blob, at, "Q", value)))
        else:
            cut = int(rng.integers(0, len(blob)))
            out.append((f"cut@{cut}", blob[:cut]))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_fuzzed_blobs_end_in_an_answer_or_one_line(kind: str, valid: dict[str, Path], big_store: Path,
                                                   tmp_path: Path, limits: Limits):
    blob = _blob(valid[kind])
    files = {}
    for i, (name, mutated) in enumerate(_mutations(blob, np.random.default_rng(17), 150)):
        files[str(_with_blob(valid[kind], tmp_path / f"fuzz{i}.index.h5", mutated))] = name
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", _FUZZ, str(limits.address_space), str(big_store), *files], capture_output=True,
                         text=True, env=env, timeout=900, check=True)
    failures, answered = [], 0
    for path, (how, code, rss_kib) in json.loads(run.stdout).items():
        err = Path(path + ".err").read_text()
        if rss_kib > limits.rss_kib:  # a few MB of index: more than the valid query's peak is an allocated claim
            failures.append(f"{files[path]}: peak RSS {rss_kib >> 10} MiB")
        if how == "exit" and code == 0:
            ids = np.array(json.loads(Path(path + ".out").read_text()))
            found = [row[row >= 0] for row in ids]
            ok = (ids.shape == (5, 5) and ((ids >= -1) & (ids < ROWS)).all() and err == ""
                  and all(len(set(row)) == len(row) for row in found))  # each row answered once at most
            answered += ok
        else:
            lines = err.splitlines()
            ok = how == "exit" and code in (2, 3, 4) and len(lines) == 1 and lines[0].startswith("imgvec: error:")
        if not ok:
            failures.append(f"{files[path]}: {how} {code}, {err[-300:]!r}")
    assert not failures, "\n".join(failures)
    assert answered > 0  # some mutations (in vector bytes) are still valid indexes, and answer
