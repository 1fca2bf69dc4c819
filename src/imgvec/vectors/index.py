"""FAISS indexes over a store: choice, build, save, load, search.

Similarity is cosine: vectors are L2-normalised and searched by inner product. An index
file is HDF5 holding FAISS's own serialised bytes (plain data, no pickle) in ``/faiss`` and the
artifact header (files/header.py) that says which store, which generation of it and how many of its
rows it covers. ``/faiss`` is one contiguous dataset, so loading maps those bytes instead of
reading them: :mod:`imgvec.files.faissblob` checks the mapped bytes, and FAISS then reads the same
mapping without copying (its zero-copy reader), so opening an index takes the same few
milliseconds at any size and a search brings in only the pages it touches. Writing streams
FAISS's bytes into the file a few MiB at a time (never a second copy in memory), atomically.
"""

from __future__ import annotations

import math
import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from imgvec.files import faissblob
from imgvec.files.artifact import check_partner, create, open_checked
from imgvec.files.header import Header, text_attr
from imgvec.files.strings import text_value
from imgvec.files.structure import REBUILD, Expect, damaged
from imgvec.checks import check_at_least, check_choice
from imgvec.errors import BadInputError, MismatchError, first_line, param
from imgvec.fileio import uncache
from imgvec.progress import Phase, Progress
from imgvec.files.h5format import PINNED
from imgvec.files.values import describe_unusable, unusable_rows
from imgvec.files.provenance import Provenance
from imgvec.vectors.store import Store

KINDS = ("auto", "flat", "hnsw", "ivfpq")
# auto: exact search up to this many rows, HNSW above (see benchmarks/bench_index.py).
AUTO_FLAT_MAX_ROWS = 100_000
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 128
IVFPQ_MIN_ROWS = 1_000
IVF_NPROBE = 32
TRAIN_SAMPLE_ROWS = 100_000
# Rows read and added per step: FAISS's IVF-PQ add needs about five times the chunk's size on
# top of it (assignments, residuals, codes), so 64 MiB chunks keep its peak near 0.4 GiB.
ADD_CHUNK_BYTES = 64 << 20
FAISS_GPU_MODES = ("auto", "on", "off")
HNSW_BYTES_PER_LINK = 8  # FAISS HNSW keeps about 2*M int32 neighbour ids per vector on level 0
IO_BLOCK_BYTES = 16 << 20  # FAISS bytes move between memory and the file this much at a time
SPOT_CHECK_ROWS = 8  # store rows compared with the index's own vectors before a search


def default_memory_budget() -> int:
    """Half of this machine's physical memory, in bytes."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def index_path_for(store_path: str | os.PathLike[str]) -> Path:
    """Where ``imgvec index`` puts a store's index: ``photos.h5`` -> ``photos.index.h5``."""
    path = Path(store_path)
    return path.with_name(path.stem + ".index.h5")


def index_bytes(kind: str, rows: int, dim: int) -> int:
    """Roughly what an index of ``kind`` holds in memory (flat and HNSW keep every vector)."""
    if kind == "flat":
        return rows * dim * 4
    if kind == "hnsw":
        return rows * (dim * 4 + HNSW_M * HNSW_BYTES_PER_LINK)
    return rows * (_pq_subquantizers(dim) + 8)


def build_peak_bytes(kind: str, rows: int, dim: int) -> int:
    """What building and saving an index of ``kind`` holds at its peak, beyond the interpreter.

    FAISS grows an index's storage by doubling it as rows are added, and while it copies into the
    larger buffer both exist: about twice the index at the peak (measured: 8.5 GB building a 5.1 GB
    flat index of 1M x 1280, 1.4 GB for a 1.08 GB HNSW index of 200k). On top: one streamed chunk of
    the store (read, then normalised; FAISS's IVF-PQ add needs about five more), the IVF-PQ training
    sample, and one I/O block while saving (the file is written from the index, never from a copy).
    """
    chunk = chunk_rows(dim) * dim * 4
    sample = min(rows, TRAIN_SAMPLE_ROWS) * dim * 4 if kind == "ivfpq" else 0
    return 2 * index_bytes(kind, rows, dim) + (7 if kind == "ivfpq" else 2) * chunk + sample + IO_BLOCK_BYTES


def choose_kind(kind: str, rows: int, dim: int = 0, memory_budget: int | None = None) -> str:
    """auto: exact search for small stores, HNSW while its build peak fits the memory budget, else IVF-PQ."""
    check_choice(param("kind"), kind, KINDS)
    if kind == "auto":
        if rows <= AUTO_FLAT_MAX_ROWS:
            return "flat"
        budget = default_memory_budget() if memory_budget is None else memory_budget
        return "hnsw" if build_peak_bytes("hnsw", rows, dim) <= budget else "ivfpq"
    if kind == "ivfpq" and rows < IVFPQ_MIN_ROWS:
        raise BadInputError(f"an ivfpq index needs at least {IVFPQ_MIN_ROWS} rows (store has {rows}); use flat")
    return kind


def _pq_subquantizers(dim: int) -> int:
    """Sub-vectors for PQ: the largest divisor of ``dim`` up to 64 that leaves at least 4 dims each."""
    return max(m for m in range(1, min(64, dim // 4) + 1) if dim % m == 0) if dim >= 4 else 1


def _new_faiss_index(kind: str, dim: int, rows: int) -> Any:
    import faiss

    ip = faiss.METRIC_INNER_PRODUCT
    if kind == "flat":
        return faiss.IndexFlatIP(dim)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, HNSW_M, ip)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index.hnsw.efSearch = HNSW_EF_SEARCH
        return index
    nlist = max(1, min(int(4 * math.sqrt(rows)), min(rows, TRAIN_SAMPLE_ROWS) // 39))
    # FAISS wants ~39 training points per centroid: 8-bit codes from ~10k rows, fewer bits below.
    nbits = int(min(8, max(4, math.floor(math.log2(rows / 39)))))
    index = faiss.index_factory(dim, f"IVF{nlist},PQ{_pq_subquantizers(dim)}x{nbits}", ip)
    index.nprobe = min(IVF_NPROBE, nlist)
    return index


def normalized(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), as contiguous float32. Rows with values their norm
    would overflow on are refused (stored rows were checked when read; this catches a model's output)."""
    x = np.array(x, dtype=np.float32, order="C", copy=True)
    bad = unusable_rows(x)
    if bad.any():
        raise BadInputError(f"{int(bad.sum())} of {len(x)} vectors hold {describe_unusable()}: the model overflows "
                            "on these images")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > 0)
    return x


@dataclass
class VectorIndex:
    """A FAISS index plus what it covers: the store's id, generation, row count and provenance."""

    faiss_index: Any
    kind: str
    rows: int
    store_id: str
    provenance: Provenance
    generation: int = 0
    mapping: Any = field(default=None, repr=False)  # the mapped file bytes FAISS's arrays point into, kept alive
    lease: Any = field(default=None, repr=False)  # while held, nobody rewrites the mapped file in place

    @property
    def header(self) -> Header:
        return Header("index", self.provenance, self.store_id, self.generation, self.rows, self.provenance.dim)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Cosine scores and store rows of the ``k`` nearest neighbours of each query row.

        Ids are rows in ``[0, rows)``, or -1 where an approximate index found fewer than ``k``;
        :func:`load_index` checked every id the index stores, so no other value can come back.
        """
        k = min(check_at_least("k", k), self.rows)
        scores, ids = self.faiss_index.search(normalized(queries), k)
        if ids.size and (ids.min() < -1 or ids.max() >= self.rows):  # only an index that bypassed
            bad = ids[(ids < -1) | (ids >= self.rows)][0]         # load_index's checks gets here
            raise BadInputError(f"the index answered row {bad}, outside its {self.rows} rows; rebuild it")
        # The blob checks read no vector, so the scores are checked for what they are: cosines of unit rows
        # (exactly stored for flat and HNSW; PQ's reconstructions may stray a little past 1).
        found = scores[ids >= 0]
        if not np.isfinite(found).all() or (self.kind != "ivfpq" and found.size and np.abs(found).max() > 1.01):
            raise BadInputError("the index holds vectors that are not unit length (scores overflow or are not "
                                "cosines): it is damaged or was edited; rebuild it")
        return scores, ids

    def check_covers(self, store: Store, index_name: str = "the index", tail: bool = False) -> int:
        """Raise unless this index was built from ``store`` as it is now; return the rows it lacks.

        Without ``tail`` the index must hold every row of the store. With it, the index may hold
        only the store's first rows (rows appended since it was built), and how many came after
        them is returned: :func:`search_store` searches those exhaustively. Beyond the headers, a
        few of the store's rows are compared with the vectors the index holds for them, so an
        index whose attributes were copied or forged from the right store but whose contents
        come from elsewhere is caught too.
        """
        fix = f"rebuild it (imgvec index {store.path})"
        check_partner(self.header, store.current_header(), index_name, f"store {store.path}", fix,
                      same_rows=not tail)
        if self.rows > store.rows:
            raise MismatchError(f"{index_name} covers {self.rows} rows but store {store.path} has {store.rows}; {fix}")
        if not _holds_rows(self, store):
            raise MismatchError(f"{index_name} does not hold {store.path}'s vectors (its header says it does: "
                                f"copied or forged from another index?); {fix}")
        return store.rows - self.rows

    def predates_removals(self, store: Store) -> bool:
        """True when this is ``store``'s index from before rows were removed (``embed --sync``): its row
        numbers no longer name the same images, so it cannot be used, only rebuilt."""
        return self.store_id == store.store_id and self.generation != store.generation

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write to ``path`` atomically, streaming FAISS's bytes into one contiguous dataset (no copy in memory).

        FAISS is asked to write twice: once to count the bytes (a contiguous dataset's size is fixed
        when it is made), once into the file.
        """
        import faiss

        cpu = to_cpu(self.faiss_index)
        counter = _DatasetSink(None)
        faiss.write_index(cpu, faiss.PyCallbackIOWriter(counter.write, IO_BLOCK_BYTES))
        with create(path, self.header) as h5:
            sink = _DatasetSink(h5.create_dataset("faiss", shape=(counter.size,), dtype=np.uint8, **PINNED))
            faiss.write_index(cpu, faiss.PyCallbackIOWriter(sink.write, IO_BLOCK_BYTES))
            sink.flush()
            if sink.size != counter.size:
                raise RuntimeError(f"FAISS wrote {sink.size} bytes, then {counter.size}")
            h5.attrs.update({"index_kind": text_value(self.kind), "metric": text_value("cosine"),
                             "faiss_version": text_value(faiss.__version__)})
        uncache(path)  # searched through a mapping, where the writer's cached pages would be mapped whole
        return Path(path)


class _DatasetSink:
    """Writes the bytes FAISS writes into a fixed-size uint8 dataset, ``IO_BLOCK_BYTES`` at a time.

    With no dataset it only counts them (``size``).
    """

    def __init__(self, ds: Any) -> None:
        self.ds = ds
        self.size = 0  # bytes written to the dataset (or counted)
        self.buffer = bytearray()

    def write(self, data: bytes) -> int:
        if self.ds is None:
            self.size += len(data)
            return len(data)
        self.buffer += data
        if len(self.buffer) >= IO_BLOCK_BYTES:
            self.flush()
        return len(data)

    def flush(self) -> None:
        if self.buffer:
            self.ds[self.size : self.size + len(self.buffer)] = np.frombuffer(self.buffer, np.uint8)
            self.size += len(self.buffer)
            self.buffer = bytearray()


def _mapped_blob(h5: Any, ds: Any, path: str | os.PathLike[str]) -> np.ndarray:
    """The ``/faiss`` bytes as a read-only map of the file h5py has open (nothing read yet).

    Only a plain contiguous dataset wholly inside the file is mapped; an index an earlier imgvec
    saved in chunks cannot be, and is refused with the command that rebuilds it. The map
    is of the very file the header was validated in (h5py's own descriptor), and imgvec only
    ever replaces index files by renaming (fileio.atomic_path), never rewrites them in place,
    so the mapped bytes stay the ones checked while the index is in use.
    """
    import h5py

    fd = h5.id.get_vfd_handle()
    size, n = os.fstat(fd).st_size, ds.shape[0]
    if n > size:  # imgvec never compresses it: more bytes than the file holds is a forgery
        raise damaged(path, "index", f"'faiss' claims {n} bytes in a file of {size}")
    plist = ds.id.get_create_plist()
    if plist.get_layout() == h5py.h5d.CHUNKED:
        raise BadInputError(f"{path}: an index in the chunked layout of an older imgvec, which cannot be mapped; "
                            f"{REBUILD['index']}")
    offset = ds.id.get_offset()
    if plist.get_layout() != h5py.h5d.CONTIGUOUS or plist.get_external_count() or offset is None:
        raise damaged(path, "index", "'faiss' is not one contiguous dataset inside the file")
    if n == 0 or offset + n > size:
        raise damaged(path, "index", f"'faiss' claims bytes {offset}-{offset + n} of a file of {size}")
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    mapping = mmap.mmap(fd, offset + n - start, access=mmap.ACCESS_READ, offset=start)
    return np.frombuffer(mapping, np.uint8, n, offset - start)


def _read_at_random(blob: np.ndarray) -> None:
    """Tell the kernel an approximate search reads this mapping at scattered places (after the checks,
    which read its structure in order). Otherwise each vector an HNSW search visits on a cold cache
    reads ahead 128 KB or more around it: at 1M x 1280, one search took 3.1 s and mapped 166 MB
    instead of 0.19 s and 33 MB (benchmarks/bench_query_scale.py)."""
    mapping = blob.base.obj if isinstance(blob.base, memoryview) else None
    if isinstance(mapping, mmap.mmap) and hasattr(mmap, "MADV_RANDOM"):
        mapping.madvise(mmap.MADV_RANDOM)


class _BlobSource:
    """Hands FAISS's copying reader the checked blob, at most ``IO_BLOCK_BYTES`` per call."""

    def __init__(self, blob: np.ndarray) -> None:
        self.blob = blob
        self.pos = 0

    def read(self, n: int) -> bytes:
        start, self.pos = self.pos, min(self.pos + n, len(self.blob))
        return self.blob[start : self.pos].tobytes()


def _holds_rows(index: VectorIndex, store: Store) -> bool:
    """Whether the index holds the store's vectors at a few rows spread over the store."""
    if index.rows == 0:
        return True
    rows = np.unique(np.linspace(0, index.rows - 1, min(SPOT_CHECK_ROWS, index.rows)).astype(np.int64))
    expected = normalized(np.concatenate([store.embeddings(int(r), int(r) + 1) for r in rows]))
    if index.kind in ("flat", "hnsw"):
        cpu = to_cpu(index.faiss_index)
        held = np.stack([cpu.reconstruct(int(r)) for r in rows])
        return bool(np.allclose(held, expected, atol=1e-4))
    # IVF-PQ keeps compressed codes only: each row must at least find itself among its neighbours.
    _, ids = index.faiss_index.search(expected, min(10, index.rows))
    return bool(np.mean([r in found for r, found in zip(rows, ids)]) >= 0.5)


def chunk_rows(dim: int) -> int:
    """Rows per streamed chunk for ``dim``-dimensional float32 vectors."""
    return max(1024, ADD_CHUNK_BYTES // (4 * max(dim, 1)))


def _training_sample(store: Store, n: int) -> np.ndarray:
    """``n`` rows picked at random (seeded), read in one sequential pass over the store."""
    picked = np.sort(np.random.default_rng(0).choice(store.rows, n, replace=False))
    out = np.empty((n, store.dim), np.float32)
    filled = 0
    for start, block in store.iter_embeddings(chunk_rows(store.dim)):
        mine = picked[(picked >= start) & (picked < start + len(block))] - start
        out[filled : filled + len(mine)] = block[mine]
        filled += len(mine)
    return out


def use_faiss_gpu(mode: str = "auto") -> bool:
    """Whether to run FAISS on the GPU: ``auto`` when this faiss build has GPU support and sees a GPU."""
    import faiss

    check_choice(param("faiss_gpu"), mode, FAISS_GPU_MODES)
    if mode == "off":
        return False
    if not hasattr(faiss, "StandardGpuResources"):
        if mode == "on":
            raise BadInputError(f"{param('faiss_gpu')} on: the installed faiss has no GPU support (faiss-cpu); "
                                f"install faiss-gpu as the README says, or use {param('faiss_gpu')} off")
        return False
    if faiss.get_num_gpus() == 0:
        if mode == "on":
            raise BadInputError(f"{param('faiss_gpu')} on: faiss has GPU support but sees no GPU; "
                                f"use {param('faiss_gpu')} off")
        return False
    return True


def to_gpu(index: Any, kind: str) -> Any:
    """The index on every visible GPU; HNSW has no GPU version in FAISS and stays on the CPU."""
    import faiss

    return index if kind == "hnsw" else faiss.index_cpu_to_all_gpus(index)


def to_cpu(index: Any) -> Any:
    """A CPU copy of a GPU index (what gets saved: index files always load without a GPU)."""
    import faiss

    return faiss.index_gpu_to_cpu(index) if "Gpu" in type(index).__name__ else index


def build_index(store: Store, kind: str = "auto", memory_budget: int | None = None,
                gpu: bool = False, progress: Progress | None = None) -> VectorIndex:
    """Build an index over every committed row of ``store``, streaming it in chunks.

    Only the index itself and one chunk (plus, for IVF-PQ, a training sample of at most
    ``TRAIN_SAMPLE_ROWS`` rows) are in memory at once, never the whole store. ``progress``
    hears ``training the <kind> index`` and ``building the <kind> index`` (rows added).
    """
    import faiss

    rows = store.rows
    if rows == 0:
        raise BadInputError(f"{store.path} holds no embeddings yet")
    kind = choose_kind(kind, rows, store.dim, memory_budget)
    index = _new_faiss_index(kind, store.dim, rows)
    if gpu:
        index = to_gpu(index, kind)
    if not index.is_trained:
        with Phase(progress, f"training the {kind} index", 1):
            sample = _training_sample(store, min(rows, TRAIN_SAMPLE_ROWS))
            faiss.normalize_L2(sample)
            index.train(sample)
            del sample
    with Phase(progress, f"building the {kind} index", rows) as step:
        for start, block in store.iter_embeddings(chunk_rows(store.dim)):
            index.add(normalized(block))
            step.update(start + len(block))
    return VectorIndex(index, kind, rows, store.store_id, store.provenance, store.generation)


def search_store(store: Store, queries: np.ndarray, k: int, index: VectorIndex | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Cosine scores and rows of the ``k`` nearest store rows to each query, over every committed row.

    The rows ``index`` covers (the store's first ``index.rows``, see :meth:`VectorIndex.check_covers`)
    are searched with it, the rows after them exhaustively, streamed in chunks, and both are merged
    by score. Without an index every row is searched exhaustively. Ids are -1 where fewer than
    ``k`` were found.
    """
    import faiss

    check_at_least("k", k)
    if store.rows == 0:
        raise BadInputError(f"{store.path} holds no embeddings yet")
    q = normalized(queries)
    heap = faiss.ResultHeap(len(q), min(k, store.rows), keep_max=True)
    start = 0
    if index is not None:
        heap.add_result(*index.search(q, k))
        start = index.rows
    for first, block in store.iter_embeddings(chunk_rows(store.dim), start):
        scores, ids = faiss.knn(q, normalized(block), min(k, len(block)), metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(scores, ids + first)
    heap.finalize()
    return heap.D, heap.I


def can_extend(index: VectorIndex, store: Store) -> bool:
    """True when ``store`` only gained rows since ``index`` was built, so adding them suffices."""
    try:
        check_partner(index.header, store.current_header(), "index", "store", "", same_rows=False)
    except MismatchError:
        return False
    return index.rows <= store.rows and _holds_rows(index, store)


def extend_index(index: VectorIndex, store: Store, progress: Progress | None = None) -> int:
    """Add the store rows the index does not cover yet (FAISS adds without retraining); returns how many."""
    if index.mapping is not None:
        raise ValueError("a mapped index is read-only: load it with mapped=False to extend it")
    if not can_extend(index, store):
        raise MismatchError(f"the index cannot be extended to {store.path}; rebuild it")
    added = store.rows - index.rows
    with Phase(progress, f"adding to the {index.kind} index", added) as step:
        for start, block in store.iter_embeddings(chunk_rows(store.dim), start=index.rows):
            index.faiss_index.add(normalized(block))
            step.update(start + len(block) - index.rows)
    index.rows = store.rows
    return added


class OpenIndex(NamedTuple):
    """How a store is searched: its index (None: every row exhaustively), the rows the index lacks
    (searched exhaustively beside it) and notes saying so."""

    index: VectorIndex | None
    unindexed: int
    notes: list[str]


def _layout(header: Header) -> dict[str, Expect]:
    """An index file holds FAISS's serialized bytes (checked by :mod:`imgvec.files.faissblob` before use)."""
    return {"faiss": Expect(1, "uint8")}


def load_index(path: str | os.PathLike[str], gpu: bool = False, mapped: bool = True) -> VectorIndex:
    """Open an index file, checking that FAISS's index agrees with the header (rows, dim, metric, kind).

    The FAISS bytes are mapped and checked (:mod:`imgvec.files.faissblob`) before FAISS reads them.
    ``mapped`` (the default) leaves FAISS's vectors, codes and links in the mapping: constant-time
    opening, read-only. ``mapped=False`` copies them into memory, for an index that will grow
    (:func:`extend_index`).
    """
    with open_checked(path, "index", "no such index (make one with imgvec index STORE)", _layout) as file:
        h5, header, ds = file.h5, file.header, file.datasets["faiss"]
        kind = text_attr(h5.attrs, "index_kind")
        if kind not in KINDS[1:]:
            raise damaged(path, "index", f"index_kind {kind!r} is not one of {', '.join(KINDS[1:])}")
        blob = _mapped_blob(h5, ds, path)
        lease, file.lease = file.lease, None  # held past the HDF5 file: by the mapping's index, or until read
    try:
        return _read_blob(blob, kind, header, path, gpu, mapped, lease)
    except BaseException:
        if lease is not None:
            lease.release()
        raise


def _read_blob(blob: np.ndarray, kind: str, header: Header, path: str | os.PathLike[str], gpu: bool, mapped: bool,
               lease: Any) -> VectorIndex:
    """FAISS's index from the mapped ``blob``, once the blob checks (:mod:`imgvec.files.faissblob`)."""
    import faiss

    try:
        faissblob.check(blob, kind, header.dim, header.rows)
    except faissblob.MalformedBlob as error:  # never hand FAISS a blob it could misread
        raise damaged(path, "index", str(error)) from None
    reader = (faiss.ZeroCopyIOReader(faiss.swig_ptr(blob), len(blob)) if mapped
              else faiss.PyCallbackIOReader(_BlobSource(blob).read, IO_BLOCK_BYTES))
    try:
        index = faiss.read_index(reader)
    except (RuntimeError, MemoryError, ValueError) as error:
        raise damaged(path, "index", f"FAISS cannot read it: {first_line(error, limit=120)}") from None
    expected = {"flat": "IndexFlat", "hnsw": "IndexHNSW", "ivfpq": "IndexIVFPQ"}[kind]
    found = type(faiss.downcast_index(index)).__name__
    for what, ok in ((f"a {found}, not the {kind} index its header names", found.startswith(expected)),
                     (f"FAISS holds {index.ntotal} vectors, the header says {header.rows}", index.ntotal == header.rows),
                     (f"FAISS vectors have {index.d} dimensions, the header says {header.dim}", index.d == header.dim),
                     ("its metric is not inner product (cosine)", index.metric_type == faiss.METRIC_INNER_PRODUCT)):
        if not ok:
            raise damaged(path, "index", what)
    if mapped and kind != "flat":
        _read_at_random(blob)
    if kind == "hnsw":
        faiss.downcast_index(index).hnsw.efSearch = HNSW_EF_SEARCH
    elif kind == "ivfpq":
        ivf = faiss.extract_index_ivf(index)
        ivf.nprobe = min(IVF_NPROBE, ivf.nlist)
    if gpu:
        index = to_gpu(index, kind)
    if not mapped and lease is not None:
        lease.release()  # FAISS holds its own copy
    return VectorIndex(index, kind, header.rows, header.store_id, header.provenance, header.generation,
                       blob if mapped else None, lease if mapped else None)
