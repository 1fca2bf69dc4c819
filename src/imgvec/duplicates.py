"""Near-duplicate and exact-duplicate images in a store.

Exact duplicates are files with the same sha256. Near duplicates are pairs whose embeddings
have cosine similarity at or above a threshold, grouped transitively (connected components,
i.e. union-find over the pairs).

Vectors are L2-normalised and projected onto their top principal directions (at most 64).
A projection onto orthonormal directions never lengthens a difference vector, so every pair
with ``cos >= t`` (squared distance ``<= 2 - 2t``) is also within that distance after
projection. A FAISS range search in the small space therefore returns a superset of the true
pairs, which are then confirmed with the full vectors: nothing is reported that is not above
the threshold. Up to 20,000 images the range search is exhaustive, so no pair is missed
either; above, it runs on inverted lists (IVF-Flat, 2*sqrt(N) lists, 24 probed), which is
what keeps 100k images fast, at the price of possibly missing a pair that falls into cells
far apart (``exact=True`` forces the exhaustive search). The saved FAISS index is not used:
an IVF-PQ index's scores are approximations and cannot be compared to a threshold.
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from .errors import BadInputError
from .index import normalized
from .store import Store

PROJECTED_DIM = 64
PCA_SAMPLE_ROWS = 20_000
QUERY_BLOCK = 2048
EXACT_MAX_ROWS = 20_000  # exhaustive search in the projected space up to here (a few seconds)
IVF_NPROBE = 24
MAX_CANDIDATES = 50_000_000  # candidate pairs held at once before we give up (threshold far too low)


@dataclass
class Member:
    path: str  # the store's key for the image
    score: float  # cosine similarity to the group's first member


@dataclass
class DuplicateGroup:
    kind: str  # "exact": identical files; "near": embeddings within the threshold
    members: list[Member]
    sha256: str = ""  # for exact groups

    @property
    def paths(self) -> list[str]:
        return [m.path for m in self.members]


@dataclass
class PairSearch:
    pairs: np.ndarray  # (n, 2) int64, i < j
    scores: np.ndarray  # (n,) float32 cosine similarity, >= threshold
    candidates: int  # pairs checked with the full vectors
    method: str  # "exact", or the inverted-list settings used


def sha256_file(path: str, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def hash_files(paths: Sequence[str], workers: int | None = None) -> list[str | None]:
    """sha256 of each file (None where it cannot be read), a few files at a time in threads."""

    def one(path: str) -> str | None:
        try:
            return sha256_file(path)
        except OSError:
            return None

    with ThreadPoolExecutor(workers or min(8, (os.cpu_count() or 1) * 2)) as pool:
        return list(pool.map(one, paths, chunksize=64))


def _projection(vectors: np.ndarray, dim: int) -> np.ndarray:
    """Top ``dim`` principal directions (columns, orthonormal) of a sample of ``vectors``."""
    d = vectors.shape[1]
    if d <= dim:
        return np.eye(d, dtype=np.float32)
    rng = np.random.default_rng(0)
    sample = vectors[np.sort(rng.choice(len(vectors), min(len(vectors), PCA_SAMPLE_ROWS), replace=False))]
    sample = sample.astype(np.float64) - sample.mean(axis=0, dtype=np.float64)
    _, eigvecs = np.linalg.eigh(sample.T @ sample)
    return np.ascontiguousarray(eigvecs[:, ::-1][:, :dim], dtype=np.float32)


def _low_index(low: np.ndarray, exact: bool) -> tuple[Any, str]:
    """Exhaustive L2 index over the projected vectors, or inverted lists over them for large sets."""
    import faiss

    n, d = low.shape
    if exact:
        index = faiss.IndexFlatL2(d)
        index.add(low)
        return index, "exact"
    nlist = max(1, int(2 * np.sqrt(n)))
    index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, nlist, faiss.METRIC_L2)
    rng = np.random.default_rng(0)
    index.train(low[np.sort(rng.choice(n, min(n, 40 * nlist), replace=False))])  # k-means: ~40 points a list
    index.add(low)
    index.nprobe = min(nlist, IVF_NPROBE)
    return index, f"inverted lists ({nlist} lists, {index.nprobe} probed)"


def similar_pairs(vectors: np.ndarray, threshold: float, projected_dim: int = PROJECTED_DIM,
                  exact: bool | None = None) -> PairSearch:
    """Every pair ``i < j`` of L2-normalised rows with cosine similarity ``>= threshold``.

    ``exact`` (default: up to :data:`EXACT_MAX_ROWS` rows) searches the projected vectors
    exhaustively and misses nothing; otherwise inverted lists over them look only in the
    cells nearest each image, which may miss a pair that falls in a far cell (rare at the
    high similarities of near duplicates). Every pair returned is confirmed on the full vectors.
    """
    if not -1.0 <= threshold <= 1.0:
        raise BadInputError(f"--threshold must be between -1 and 1, not {threshold}")
    n = len(vectors)
    if exact is None:
        exact = n <= EXACT_MAX_ROWS
    if n < 2:
        return PairSearch(np.zeros((0, 2), np.int64), np.zeros(0, np.float32), 0, "exact")
    P = _projection(vectors, projected_dim)
    low = np.ascontiguousarray(vectors @ P, dtype=np.float32)
    index, method = _low_index(low, exact)
    # Squared distance between unit vectors is 2 - 2 cos; widen slightly for float rounding.
    radius = float((2.0 - 2.0 * threshold) * (1 + 1e-4) + 1e-5)
    found_i, found_j, found_s = [], [], []
    candidates = 0
    for start in range(0, n, QUERY_BLOCK):
        lims, _, ids = index.range_search(low[start : start + QUERY_BLOCK], radius)
        counts = np.diff(lims).astype(np.int64)
        rows = np.repeat(np.arange(start, start + len(counts)), counts)
        keep = ids > rows  # each pair once, no self pairs
        i, j = rows[keep], ids[keep].astype(np.int64)
        candidates += len(i)
        if candidates > MAX_CANDIDATES:
            raise BadInputError(f"--threshold {threshold:g} links too many pairs (over {MAX_CANDIDATES:,}); "
                                "raise it (near duplicates are usually above 0.9)")
        for s in range(0, len(i), 1 << 20):  # confirm with the full vectors, a million pairs at a time
            a, b = i[s : s + (1 << 20)], j[s : s + (1 << 20)]
            sims = np.einsum("ij,ij->i", vectors[a], vectors[b])
            ok = sims >= threshold
            found_i.append(a[ok]), found_j.append(b[ok]), found_s.append(sims[ok].astype(np.float32))
    pairs = np.stack([np.concatenate(found_i), np.concatenate(found_j)], axis=1) if found_i else np.zeros((0, 2), np.int64)
    scores = np.concatenate(found_s) if found_s else np.zeros(0, np.float32)
    return PairSearch(pairs.astype(np.int64), scores, candidates, method)


def components(n: int, pairs: np.ndarray) -> list[np.ndarray]:
    """Groups of 2+ rows linked by ``pairs`` (union-find / connected components), each sorted."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if len(pairs) == 0:
        return []
    graph = coo_matrix((np.ones(len(pairs), np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    order = np.argsort(label, kind="stable")
    bounds = np.flatnonzero(np.diff(label[order])) + 1
    return [g for g in np.split(order, bounds) if len(g) > 1]


@dataclass
class Groups:
    groups: list[DuplicateGroup]
    candidates: int
    method: str
    missing: list[str] = field(default_factory=list)


def find_duplicates(store: Store, threshold: float = 0.95, check_files: bool = True, exact: bool | None = None,
                    progress: Callable[[int, int], None] | None = None) -> Groups:
    """Exact (same sha256) and near (cosine >= threshold) duplicate groups in ``store``."""
    keys = store.paths()
    n = len(keys)
    vectors = np.empty((n, store.dim), np.float32)
    for start, block in store.iter_embeddings():  # chunked: never two copies of the whole store
        vectors[start : start + len(block)] = normalized(block)
        if progress:
            progress(start + len(block), n)
    groups: list[DuplicateGroup] = []
    hashes: list[str | None] = [None] * n
    missing: list[str] = []
    if check_files:
        hashes = hash_files([store.absolute(k) for k in keys])
        missing = [k for k, h in zip(keys, hashes) if h is None]
        by_hash: dict[str, list[int]] = defaultdict(list)
        for row, h in enumerate(hashes):
            if h is not None:
                by_hash[h].append(row)
        for h, rows in by_hash.items():
            if len(rows) > 1:
                groups.append(_group("exact", rows, vectors, keys, h))
    # Identical files share one representative in the similarity search.
    rep = np.arange(n)
    if check_files:
        first: dict[str, int] = {}
        for row, h in enumerate(hashes):
            if h is not None:
                rep[row] = first.setdefault(h, row)
    unique = np.flatnonzero(rep == np.arange(n))
    found = similar_pairs(vectors[unique], threshold, exact=exact)
    pairs = unique[found.pairs] if len(found.pairs) else found.pairs
    # Put copies back: each copy is linked to its representative.
    copies = np.flatnonzero(rep != np.arange(n))
    linked = np.concatenate([pairs, np.stack([rep[copies], copies], axis=1)]) if len(copies) else pairs
    for rows in components(n, linked):
        if check_files and len({hashes[r] for r in rows}) == 1 and hashes[rows[0]] is not None:
            continue  # already listed as identical files
        groups.append(_group("near", list(rows), vectors, keys))
    groups.sort(key=lambda g: (g.kind != "exact", -len(g.members), g.members[0].path))
    return Groups(groups, found.candidates, found.method, missing)


def _group(kind: str, rows: list[int], vectors: np.ndarray, keys: list[str], sha: str = "") -> DuplicateGroup:
    rows = sorted(rows, key=lambda r: keys[r])
    sims = vectors[rows] @ vectors[rows[0]]
    return DuplicateGroup(kind, [Member(keys[r], float(min(1.0, s))) for r, s in zip(rows, sims)], sha)
