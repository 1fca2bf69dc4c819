"""FAISS indexes over a store: choice, build, save, load, search.

Similarity is cosine: vectors are L2-normalised and searched by inner product. An index
file is HDF5 holding FAISS's own serialised bytes (plain data, no pickle) and attributes
that say which store, and how many of its rows, it covers.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BadInputError, MismatchError
from .provenance import Provenance, check_compatible
from .h5io import atomic_h5, open_h5, read_provenance, write_provenance
from .store import Store

FORMAT = "imgvec-index"
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


def choose_kind(kind: str, rows: int, dim: int = 0, memory_budget: int | None = None) -> str:
    """auto: exact search for small stores, HNSW while its vectors fit the memory budget, else IVF-PQ."""
    if kind not in KINDS:
        raise BadInputError(f"--kind {kind!r}: expected one of {', '.join(KINDS)}")
    if kind == "auto":
        if rows <= AUTO_FLAT_MAX_ROWS:
            return "flat"
        budget = default_memory_budget() if memory_budget is None else memory_budget
        return "hnsw" if index_bytes("hnsw", rows, dim) <= budget else "ivfpq"
    if kind == "ivfpq" and rows < IVFPQ_MIN_ROWS:
        raise BadInputError(f"--kind ivfpq needs at least {IVFPQ_MIN_ROWS} rows (store has {rows}); use flat")
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
    """Rows scaled to unit length (zero rows stay zero), as contiguous float32."""
    x = np.array(x, dtype=np.float32, order="C", copy=True)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > 0)
    return x


@dataclass
class VectorIndex:
    """A FAISS index plus what it covers: the store's id, its row count and provenance."""

    faiss_index: Any
    kind: str
    rows: int
    store_id: str
    provenance: Provenance
    generation: int = 0

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Cosine scores and store rows of the ``k`` nearest neighbours of each query row."""
        if k < 1:
            raise BadInputError(f"-k must be at least 1, not {k}")
        k = min(k, self.rows)
        scores, ids = self.faiss_index.search(normalized(queries), k)
        return scores, ids

    def check_covers(self, store: Store, index_name: str = "the index") -> None:
        """Raise unless this index was built from exactly ``store`` as it is now."""
        fix = f"run `imgvec index {store.path}` to rebuild it"
        if self.store_id != store.store_id:
            raise MismatchError(f"{index_name} was built from another store than {store.path}; {fix}")
        if self.generation != store.generation:
            raise MismatchError(f"{index_name} predates rows removed from {store.path}; {fix}")
        check_compatible(store.provenance, self.provenance, f"store {store.path}", index_name, fix)
        if self.rows != store.rows:
            raise MismatchError(
                f"{index_name} covers {self.rows} rows but {store.path} now has {store.rows}; {fix}"
            )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write to ``path`` atomically (temporary file, then rename)."""
        import faiss

        with atomic_h5(path) as h5:
            h5.create_dataset("faiss", data=faiss.serialize_index(to_cpu(self.faiss_index)))
            h5.attrs.update({"format": FORMAT, "kind": self.kind, "metric": "cosine", "rows": self.rows,
                             "store_id": self.store_id, "faiss_version": faiss.__version__})
            write_provenance(h5.attrs, self.provenance)
        return Path(path)


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

    if mode not in FAISS_GPU_MODES:
        raise BadInputError(f"--faiss-gpu {mode!r}: expected one of {', '.join(FAISS_GPU_MODES)}")
    if mode == "off":
        return False
    if not hasattr(faiss, "StandardGpuResources"):
        if mode == "on":
            raise BadInputError("--faiss-gpu on: the installed faiss has no GPU support (faiss-cpu); "
                                "install faiss-gpu as the README says, or use --faiss-gpu off")
        return False
    if faiss.get_num_gpus() == 0:
        if mode == "on":
            raise BadInputError("--faiss-gpu on: faiss has GPU support but sees no GPU; use --faiss-gpu off")
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
                gpu: bool = False) -> VectorIndex:
    """Build an index over every committed row of ``store``, streaming it in chunks.

    Only the index itself and one chunk (plus, for IVF-PQ, a training sample of at most
    ``TRAIN_SAMPLE_ROWS`` rows) are in memory at once, never the whole store.
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
        sample = _training_sample(store, min(rows, TRAIN_SAMPLE_ROWS))
        faiss.normalize_L2(sample)
        index.train(sample)
        del sample
    for _, block in store.iter_embeddings(chunk_rows(store.dim)):
        index.add(normalized(block))
    return VectorIndex(index, kind, rows, store.store_id, store.provenance, store.generation)


def can_extend(index: VectorIndex, store: Store) -> bool:
    """True when ``store`` only gained rows since ``index`` was built, so adding them suffices."""
    return (index.store_id == store.store_id and index.generation == store.generation
            and index.rows <= store.rows and index.provenance.key() == store.provenance.key())


def extend_index(index: VectorIndex, store: Store) -> int:
    """Add the store rows the index does not cover yet (FAISS adds without retraining); returns how many."""
    if not can_extend(index, store):
        raise MismatchError(f"the index cannot be extended to {store.path}; rebuild it")
    added = store.rows - index.rows
    for _, block in store.iter_embeddings(chunk_rows(store.dim), start=index.rows):
        index.faiss_index.add(normalized(block))
    index.rows = store.rows
    return added


def load_index(path: str | os.PathLike[str], gpu: bool = False) -> VectorIndex:
    import faiss

    with open_h5(path, FORMAT, "no such index (make one with `imgvec index STORE`)") as h5:
        index = faiss.deserialize_index(np.asarray(h5["faiss"][()]))
        attrs = dict(h5.attrs)
        provenance = read_provenance(h5.attrs)
    kind = str(attrs["kind"])
    if kind == "hnsw":
        index.hnsw.efSearch = HNSW_EF_SEARCH
    elif kind == "ivfpq":
        faiss.extract_index_ivf(index).nprobe = min(IVF_NPROBE, faiss.extract_index_ivf(index).nlist)
    if gpu:
        index = to_gpu(index, kind)
    return VectorIndex(index, kind, int(attrs["rows"]), str(attrs["store_id"]), provenance,
                       int(attrs.get("generation", 0)))
