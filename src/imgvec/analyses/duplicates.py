"""Near-duplicate and exact-duplicate images in a store.

Exact duplicates are files with the same sha256 (regular files only: a stored image later
replaced by a FIFO or a link to ``/dev/zero`` is reported unreadable, never read). Near
duplicates are pairs whose embeddings have cosine similarity at or above a threshold,
grouped transitively (connected components, by union-find).

Vectors are L2-normalised and projected onto their top principal directions (at most 64).
A projection onto orthonormal directions never lengthens a difference vector, so every pair
with ``cos >= t`` (squared distance ``<= 2 - 2t``) is also within that distance after
projection. A search in the small space therefore returns a superset of the true pairs, which
are then confirmed with the full vectors: nothing is reported that is not above the
threshold. Up to 20,000 images the search is exhaustive (square tiles of pairs, one matrix
product each), so no pair is missed either; above, it is a FAISS range search on inverted
lists (IVF-Flat, 2*sqrt(N) lists, 24 probed), which is what keeps 100k images fast, at the
price of possibly missing a pair that falls into cells far apart (``exact=True`` forces the
exhaustive search). The saved FAISS index is not used: an IVF-PQ index's scores are
approximations and cannot be compared to a threshold.

Memory stays within a fixed budget however many pairs pass the threshold: a tile holds at
most :data:`TILE` squared pairs, a range search runs on as few query rows at a time as keep
its possible hits under :data:`RESULT_BUDGET`, candidate pairs are confirmed
:data:`CONFIRM_BYTES` of vectors at a time, and each block only feeds a union-find; pairs are
never all kept, and a pair whose rows are already in one group is not even confirmed. When
most pairs pass the threshold (one group of nearly everything) the features are degenerate,
a sign of random weights or a wrong backbone: the result says so.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from imgvec.checks import check_threshold
from imgvec.fileio import sha256_file
from imgvec.vectors.index import normalized
from imgvec.progress import Phase, Progress
from imgvec.results import DedupResult, DuplicateGroup, Member
from imgvec.vectors.store import Store

PROJECTED_DIM = 64
PCA_SAMPLE_ROWS = 20_000
QUERY_BLOCK = 2048  # query rows per range search at most
TILE = 2048  # exhaustive search: rows by rows of pairs compared at once (so at most TILE**2 hits)
EXACT_MAX_ROWS = 20_000  # exhaustive search in the projected space up to here (a few seconds)
IVF_NPROBE = 24
RESULT_BUDGET = 4_000_000  # inverted lists: range-search hits held at once (12 bytes each, plus temporaries)
CONFIRM_BYTES = 64 << 20  # full vectors gathered at once to confirm candidate pairs
DEGENERATE_MIN_ROWS = 50  # below this a store is too small to judge
DEGENERATE_SAMPLE = 10_000  # random pairs that estimate the share




def hash_files(paths: Sequence[str], workers: int | None = None) -> list[str | None]:
    """sha256 of each file (None where it cannot be read or is not a regular file), a few at a time in threads."""

    def one(path: str) -> str | None:
        try:
            return sha256_file(path)
        except OSError:
            return None

    with ThreadPoolExecutor(workers or min(8, (os.cpu_count() or 1) * 2)) as pool:
        return list(pool.map(one, paths, chunksize=64))


class UnionFind:
    """Disjoint sets of rows ``0..n-1``, merged a block of pairs at a time (vectorised)."""

    def __init__(self, n: int) -> None:
        self.parent = np.arange(n, dtype=np.int64)

    def find(self, rows: np.ndarray) -> np.ndarray:
        """The set (its smallest member's row) of each of ``rows``; compresses their paths."""
        root = self.parent[rows]
        while True:
            up = self.parent[root]
            if np.array_equal(up, root):
                break
            root = up
        self.parent[rows] = root
        return root

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        """Merge the sets of ``a[k]`` and ``b[k]`` for every k, chains within the block included."""
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        ra, rb = self.find(a), self.find(b)
        apart = ra != rb
        if not apart.any():
            return
        roots, local = np.unique(np.concatenate([ra[apart], rb[apart]]), return_inverse=True)
        m = int(apart.sum())
        graph = coo_matrix((np.ones(m, np.int8), (local[:m], local[m:])), shape=(len(roots), len(roots)))
        _, label = connected_components(graph, directed=False)
        smallest = np.full(label.max() + 1, len(self.parent), np.int64)
        np.minimum.at(smallest, label, roots)  # each component's smallest root becomes its root
        self.parent[roots] = smallest[label]

    def groups(self) -> list[np.ndarray]:
        """Sets of 2+ rows, each sorted, in order of their smallest row."""
        label = self.find(np.arange(len(self.parent)))
        order = np.argsort(label, kind="stable")
        bounds = np.flatnonzero(np.diff(label[order])) + 1
        return [g for g in np.split(order, bounds) if len(g) > 1]


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


def _ivf_index(low: np.ndarray) -> tuple[Any, str, int]:
    """Inverted lists over the projected vectors, the method's name, and the most hits one query
    can have (the rows of the largest lists it may probe), which sizes the query blocks."""
    import faiss

    n, d = low.shape
    nlist = max(1, int(2 * np.sqrt(n)))
    index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, nlist, faiss.METRIC_L2)
    rng = np.random.default_rng(0)
    index.train(low[np.sort(rng.choice(n, min(n, 40 * nlist), replace=False))])  # k-means: ~40 points a list
    index.add(low)
    index.nprobe = min(nlist, IVF_NPROBE)
    sizes = np.sort([index.invlists.list_size(i) for i in range(nlist)])
    return index, f"inverted lists ({nlist} lists, {index.nprobe} probed)", int(sizes[-index.nprobe:].sum())


def _tiles(low: np.ndarray, radius: float) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Every pair ``i < j`` within squared distance ``radius``, one TILE x TILE square of pairs at a time."""
    norms = np.einsum("ij,ij->i", low, low)
    n = len(low)
    for a in range(0, n, TILE):
        for b in range(a, n, TILE):
            d2 = norms[a : a + TILE, None] + norms[None, b : b + TILE] - 2 * (low[a : a + TILE] @ low[b : b + TILE].T)
            i, j = np.nonzero(d2 <= radius)
            i, j = i + a, j + b
            keep = j > i  # each pair once, no self pairs
            yield i[keep], j[keep]


def candidate_blocks(vectors: np.ndarray, threshold: float, projected_dim: int = PROJECTED_DIM,
                     exact: bool | None = None) -> tuple[str, Iterator[tuple[np.ndarray, np.ndarray]]]:
    """The search method, and blocks of candidate pairs ``(i, j)``, ``i < j``: a superset of the pairs
    with cosine ``>= threshold`` (all of them when exhaustive), each block under :data:`RESULT_BUDGET`."""
    n = len(vectors)
    if exact is None:
        exact = n <= EXACT_MAX_ROWS
    if n < 2:
        return "exact", iter(())
    P = _projection(vectors, projected_dim)
    low = np.ascontiguousarray(vectors @ P, dtype=np.float32)
    # Squared distance between unit vectors is 2 - 2 cos; widen slightly for float rounding.
    radius = float((2.0 - 2.0 * threshold) * (1 + 1e-4) + 1e-5)
    if exact:
        return "exact", _tiles(low, radius)
    index, method, max_hits = _ivf_index(low)
    block = int(np.clip(RESULT_BUDGET // max(max_hits, 1), 1, QUERY_BLOCK))

    def blocks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, n, block):
            lims, _, ids = index.range_search(low[start : start + block], radius)
            rows = np.repeat(np.arange(start, start + len(lims) - 1), np.diff(lims).astype(np.int64))
            keep = ids > rows  # each pair once, no self pairs
            yield rows[keep], ids[keep].astype(np.int64)

    return method, blocks()


def cosines(vectors: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Cosine similarity of rows ``i[k]`` and ``j[k]`` of L2-normalised ``vectors``."""
    return np.einsum("ij,ij->i", vectors[i], vectors[j])


@dataclass
class NearSearch:
    candidates: int  # pairs the projected search proposed
    checked: int  # of those, pairs confirmed with the full vectors (the rest were already grouped)
    method: str  # "exact", or the inverted-list settings used


def link_similar(vectors: np.ndarray, threshold: float, sets: UnionFind, rows: np.ndarray | None = None,
                 projected_dim: int = PROJECTED_DIM, exact: bool | None = None) -> NearSearch:
    """Merge in ``sets`` every pair of ``vectors`` (L2-normalised) with cosine ``>= threshold``.

    ``rows`` maps the rows of ``vectors`` to rows of ``sets`` (default: the same). Memory is
    bounded whatever the number of pairs: see the module docstring.
    """
    check_threshold(threshold)
    rows = np.arange(len(vectors)) if rows is None else rows
    method, blocks = candidate_blocks(vectors, threshold, projected_dim, exact)
    step = max(1, CONFIRM_BYTES // (8 * vectors.shape[1]))
    candidates = checked = 0
    for i, j in blocks:
        candidates += len(i)
        for s in range(0, len(i), step):
            a, b = i[s : s + step], j[s : s + step]
            apart = sets.find(rows[a]) != sets.find(rows[b])  # already one group: nothing to learn
            a, b = a[apart], b[apart]
            checked += len(a)
            ok = cosines(vectors, a, b) >= threshold
            sets.union(rows[a[ok]], rows[b[ok]])
    return NearSearch(candidates, checked, method)


def share_above(vectors: np.ndarray, threshold: float, sample: int = DEGENERATE_SAMPLE) -> float:
    """Estimated share of all pairs of rows with cosine ``>= threshold`` (random pairs, seeded)."""
    n = len(vectors)
    if n < 2:
        return 0.0
    rng = np.random.default_rng(0)
    i = rng.integers(0, n, sample)
    j = rng.integers(0, n - 1, sample)
    j += j >= i  # a pair of two different rows
    return float(np.mean(cosines(vectors, i, j) >= threshold))


def find_duplicates(store: Store, threshold: float = 0.95, check_files: bool = True, exact: bool | None = None,
                    progress: Progress | None = None, vectors: np.ndarray | None = None) -> DedupResult:
    """Exact (same sha256) and near (cosine >= threshold) duplicate groups in ``store``.

    Near groups list one copy of identical files (the others are in their exact group).
    ``progress`` hears the phases ``reading the store`` (rows), ``hashing files`` and ``searching pairs``.
    ``vectors``: the store's rows, L2-normalised, when the caller has read them already (not read again).
    """
    check_threshold(threshold)
    began = time.perf_counter()
    keys = store.paths()
    n = len(keys)
    if vectors is None:
        vectors = np.empty((n, store.dim), np.float32)
        with Phase(progress, "reading the store", n) as step:
            for start, block in store.iter_embeddings():  # chunked: never two copies of the whole store
                vectors[start : start + len(block)] = normalized(block)
                step.update(start + len(block))
    groups: list[DuplicateGroup] = []
    hashes: list[str | None] = [None] * n
    missing: list[str] = []
    sets = UnionFind(n)
    if check_files:
        with Phase(progress, "hashing files", n):
            hashes = hash_files([store.absolute(k) for k in keys])
        missing = [k for k, h in zip(keys, hashes) if h is None]
        by_hash: dict[str, list[int]] = defaultdict(list)
        for row, h in enumerate(hashes):
            if h is not None:
                by_hash[h].append(row)
        for h, rows in by_hash.items():
            if len(rows) > 1:
                groups.append(_group("exact", rows, vectors, keys, h))
                sets.union(np.full(len(rows) - 1, rows[0]), np.asarray(rows[1:]))
    # Identical files share one representative in the similarity search.
    unique = np.flatnonzero(sets.find(np.arange(n)) == np.arange(n))
    search = vectors if len(unique) == n else vectors[unique]
    with Phase(progress, "searching pairs", 1):
        found = link_similar(search, threshold, sets, unique, exact=exact)
    for rows in sets.groups():
        if check_files and len({hashes[r] for r in rows}) == 1 and hashes[rows[0]] is not None:
            continue  # already listed as identical files
        groups.append(_group("near", list(rows), vectors, keys))
    groups.sort(key=lambda g: (g.kind != "exact", -len(g.members), g.members[0].path))
    share = share_above(vectors, threshold) if n >= DEGENERATE_MIN_ROWS else 0.0
    return DedupResult(Path(store.path), store.provenance, threshold, n, fold_copies(groups), found.candidates,
                       missing, time.perf_counter() - began, found.method, share, found.checked, store.root)


def fold_copies(groups: list[DuplicateGroup]) -> list[DuplicateGroup]:
    """Near groups without the second and later copies of identical files (listed in their exact group).

    A near group left with fewer than two images (it was only copies) is dropped.
    """
    exact_of = {m.path: i for i, g in enumerate(groups) if g.kind == "exact" for m in g.members}
    out = []
    for g in groups:
        if g.kind != "near":
            out.append(g)
            continue
        seen: set[int] = set()
        members = []
        for m in g.members:
            group = exact_of.get(m.path)
            if group is not None and group in seen:
                continue
            if group is not None:
                seen.add(group)
            members.append(m)
        if len(members) > 1:
            out.append(DuplicateGroup(g.kind, members, g.sha256))
    return out


def _group(kind: str, rows: list[int], vectors: np.ndarray, keys: list[str], sha: str = "") -> DuplicateGroup:
    rows = sorted(rows, key=lambda r: keys[r])
    sims = vectors[rows] @ vectors[rows[0]]
    return DuplicateGroup(kind, [Member(keys[r], float(min(1.0, s))) for r, s in zip(rows, sims)], sha)
