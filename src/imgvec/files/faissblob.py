"""The FAISS blob of an index file, checked before FAISS sees a byte of it.

FAISS's reader trusts its input: a blob can name a file for it to open read-write (on-disk
inverted lists), claim vectors of any size (allocated before they are read), or hold ids and
graph links that point outside the index (read and written out of bounds later). So an index
file's blob is walked here first, following FAISS's own serialisation (``faiss/impl/
index_read.cpp``, ``index_write.cpp``; unchanged for these kinds from FAISS 1.8 to 1.15), for
exactly the kinds imgvec writes:

=======  ========================================================================
flat     ``IxFI``: IndexFlatIP
hnsw     ``IHNf``: IndexHNSWFlat, its graph, and its ``IxFI`` storage
ivfpq    ``IwPQ``: IndexIVFPQ from ``IVF{nlist},PQ{m}x{nbits}`` with inner product: an
         ``IxFI`` coarse quantizer, no direct map, the PQ, ``ilar`` array inverted lists
=======  ========================================================================

Every other structure is refused (on-disk lists, any file name, any other fourcc). Every count
is checked against the bytes that remain before anything is derived from it, so nothing here
or in FAISS allocates more than the blob holds; ``d``, ``ntotal`` and the metric must equal the
imgvec header; ids, links, levels and offsets must lie in range. Only headers, counts and id
or link arrays are read (as numpy views, checked vectorised), never the vectors, so the blob
can be a memory map of any size. Anything wrong raises one :class:`MalformedBlob`.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from imgvec.errors import BadInputError

KINDS = ("flat", "hnsw", "ivfpq")
METRIC_INNER_PRODUCT = 0  # faiss::METRIC_INNER_PRODUCT
MAX_HNSW_LEVELS = 64  # FAISS's default level probabilities give ~6 levels for M=32; 64 is far beyond any
MAX_EF = 1 << 16  # efConstruction/efSearch: FAISS's heaps are sized by them (imgvec writes 80 and 128)
MAX_LINKS = 1 << 16  # links per node over all its levels (imgvec's M=32: 64 on level 0, 32 above)
MAX_PQ_NBITS = 8  # imgvec's PQ codes are 4-8 bits; wider ones size per-query tables by 2**nbits
MAX_DIM = 1 << 20  # FAISS's own bound on d


class MalformedBlob(BadInputError):
    """The blob is not an index of the kind imgvec wrote: what is wrong, and at which byte."""


def _fourcc(code: str) -> int:
    return int.from_bytes(code.encode("ascii"), "little")


def _shown_fourcc(value: int) -> str:
    raw = value.to_bytes(4, "little")
    return repr(raw.decode("ascii")) if all(32 <= b < 127 for b in raw) else f"0x{value:08x}"


class _Cursor:
    """Reads little-endian fields of a byte buffer in order, through numpy views of it (never a copy);
    every read checks the bytes that remain."""

    def __init__(self, blob: Any) -> None:
        self.pos = 0
        if isinstance(blob, np.ndarray) and not blob.flags.c_contiguous:
            raise TypeError("a FAISS blob array must be contiguous")
        try:
            self.blob = np.frombuffer(memoryview(blob).cast("B"), np.uint8)
        except TypeError:
            raise TypeError(f"a FAISS blob must be a byte buffer, not {type(blob).__name__}") from None
        self.size = len(self.blob)

    @property
    def left(self) -> int:
        return self.size - self.pos

    def take(self, n: int, what: str) -> np.ndarray:
        """The next ``n`` bytes, as a uint8 view of the buffer."""
        self.need(n, what)
        data = self.blob[self.pos : self.pos + n]
        self.pos += n
        return data

    def fail(self, what: str, at: int | None = None) -> MalformedBlob:
        return MalformedBlob(f"FAISS blob, byte {self.pos if at is None else at}: {what}")

    def need(self, n: int, what: str) -> None:
        if n > self.left:
            raise self.fail(f"{what} needs {n} bytes, {self.left} remain")

    def scalar(self, fmt: str, what: str) -> Any:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))[0]

    def fourcc(self, allowed: dict[str, str], what: str) -> str:
        at = self.pos
        value = self.scalar("I", what)
        for code in allowed:
            if value == _fourcc(code):
                return code
        wanted = " or ".join(f"{code!r} ({name})" for code, name in allowed.items())
        raise self.fail(f"{what} is {_shown_fourcc(value)}, expected {wanted}", at)

    def boolean(self, what: str) -> bool:
        value = self.scalar("B", what)
        if value > 1:
            raise self.fail(f"{what} is {value}, not a boolean", self.pos - 1)
        return bool(value)

    def array(self, dtype: str, count: int, what: str) -> np.ndarray:
        """``count`` items of ``dtype``, viewed once they are known to be there."""
        itemsize = np.dtype(dtype).itemsize
        if count > self.left // itemsize:
            raise self.fail(f"{what}: {count} items of {itemsize} bytes claimed, {self.left} bytes remain")
        return self.take(count * itemsize, what).view(dtype)

    def skip(self, n: int, what: str) -> None:
        """Pass over ``n`` bytes whose values do not matter (vectors, codes): never read."""
        self.need(n, what)
        self.pos += n

    def vector(self, dtype: str, what: str, count: int | None = None) -> np.ndarray:
        """A FAISS vector: a 64-bit item count, then the items; ``count`` if the count is known."""
        at = self.pos
        n = self.scalar("Q", f"{what} length")
        if count is not None and n != count:
            raise self.fail(f"{what} holds {n} items, expected {count}", at)
        return self.array(dtype, n, what)

    def values(self, dtype: str, what: str, count: int) -> None:
        """A FAISS vector of ``count`` items whose values do not matter: its count checked, the rest skipped."""
        at = self.pos
        n = self.scalar("Q", f"{what} length")
        if n != count:
            raise self.fail(f"{what} holds {n} items, expected {count}", at)
        itemsize = np.dtype(dtype).itemsize
        if count > self.left // itemsize:
            raise self.fail(f"{what}: {count} items of {itemsize} bytes claimed, {self.left} bytes remain")
        self.skip(count * itemsize, what)

    def equal(self, value: Any, expected: Any, what: str, at: int) -> None:
        if value != expected:
            raise self.fail(f"{what} is {value}, expected {expected}", at)


def check(blob: Any, kind: str, dim: int, rows: int) -> None:
    """Raise :class:`MalformedBlob` unless ``blob`` is a ``kind`` index of ``rows`` vectors of ``dim``.

    ``blob``: bytes, memoryview, or a contiguous numpy uint8 array or memory map (never copied; only
    the pages holding headers, counts and ids or links are touched). :func:`imgvec.vectors.index.load_index`
    checks the file's mapping and then hands FAISS that same mapping, so FAISS reads the bytes checked.
    """
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: expected one of {', '.join(KINDS)}")
    cur = _Cursor(blob)
    if not 1 <= dim <= MAX_DIM:
        raise cur.fail(f"the header's dim {dim} is outside FAISS's [1, {MAX_DIM}]")
    if kind == "flat":
        _flat(cur, dim, rows, "the index")
    elif kind == "hnsw":
        _hnsw(cur, dim, rows)
    else:
        _ivfpq(cur, dim, rows)
    if cur.left:
        raise cur.fail(f"{cur.left} bytes follow the end of the index")


def _index_header(cur: _Cursor, dim: int, ntotal: int, what: str) -> None:
    """FAISS's common header: d, ntotal, two unused ints, is_trained, metric (inner product, no argument)."""
    for fmt, name, expected in (("i", "d", dim), ("q", "ntotal", ntotal)):
        at = cur.pos
        cur.equal(cur.scalar(fmt, f"{what}'s {name}"), expected, f"{what}'s {name}", at)
    cur.scalar("q", "unused field")
    cur.scalar("q", "unused field")
    at = cur.pos
    cur.equal(cur.boolean(f"{what}'s is_trained"), True, f"{what}'s is_trained", at)
    at = cur.pos
    metric = cur.scalar("i", f"{what}'s metric")
    if metric != METRIC_INNER_PRODUCT:
        raise cur.fail(f"{what}'s metric is {metric}, expected inner product ({METRIC_INNER_PRODUCT})", at)


def _flat(cur: _Cursor, dim: int, ntotal: int, what: str) -> None:
    """``IxFI``: header, then ntotal * d float32 (stored as a count of 4-byte groups)."""
    cur.fourcc({"IxFI": "IndexFlatIP"}, f"{what}'s type")
    _index_header(cur, dim, ntotal, what)
    cur.values("<f4", f"{what}'s vectors", ntotal * dim)


def _hnsw(cur: _Cursor, dim: int, rows: int) -> None:
    """``IHNf``: header, the HNSW graph (checked in full, vectorised), then its flat storage."""
    cur.fourcc({"IHNf": "IndexHNSWFlat"}, "the index's type")
    _index_header(cur, dim, rows, "the index")
    if rows >= 1 << 31:
        raise cur.fail(f"{rows} vectors: an HNSW graph holds at most 2**31 - 1")
    at = cur.pos
    probas = cur.vector("<f8", "HNSW assign_probas")
    if not 1 <= len(probas) <= MAX_HNSW_LEVELS:
        raise cur.fail(f"HNSW has {len(probas)} levels, expected 1 to {MAX_HNSW_LEVELS}", at)
    if not (np.isfinite(probas).all() and (probas >= 0).all() and (probas <= 1).all()):
        raise cur.fail("HNSW assign_probas are not probabilities", at)
    at = cur.pos
    cum = cur.vector("<i4", "HNSW cum_nneighbor_per_level", len(probas) + 1).astype(np.int64)
    if cum[0] != 0 or (np.diff(cum) < 1).any() or cum[-1] > MAX_LINKS:
        raise cur.fail(f"HNSW neighbours per level {cum.tolist()} are not increasing from 0", at)
    at = cur.pos
    levels = cur.vector("<i4", "HNSW levels", rows)
    if rows and (levels.min() < 1 or levels.max() > len(probas)):
        raise cur.fail(f"HNSW levels outside [1, {len(probas)}]", at)
    at = cur.pos
    offsets = cur.vector("<u8", "HNSW offsets", rows + 1)
    # Each node's links follow the previous node's: offsets grow by exactly its level's link count.
    if offsets[0] != 0 or (rows and not np.array_equal(np.diff(offsets), cum[levels].astype(np.uint64))):
        raise cur.fail("HNSW offsets disagree with the levels", at)
    at = cur.pos
    links = cur.vector("<i4", "HNSW neighbours", int(offsets[-1]))
    if len(links) and (links.min() < -1 or links.max() >= rows):
        raise cur.fail(f"HNSW neighbour ids outside [-1, {rows})", at)
    at = cur.pos
    entry = cur.scalar("i", "HNSW entry point")
    max_level = cur.scalar("i", "HNSW max_level")
    top = int(levels.max()) - 1 if rows else -1
    if max_level != top:
        raise cur.fail(f"HNSW max_level is {max_level}, the levels say {top}", at + 4)
    if not (entry == -1 if rows == 0 else (0 <= entry < rows and levels[entry] - 1 == top)):
        raise cur.fail(f"HNSW entry point {entry} is not a node of the top level", at)
    _upper_links(cur, levels, offsets, cum, links, top, at)
    for name in ("efConstruction", "efSearch"):
        at = cur.pos
        ef = cur.scalar("i", f"HNSW {name}")
        if not 1 <= ef <= MAX_EF:
            raise cur.fail(f"HNSW {name} is {ef}, expected 1 to {MAX_EF}", at)
    cur.scalar("i", "unused field")
    _flat(cur, dim, rows, "the HNSW storage")


def _upper_links(cur: _Cursor, levels: np.ndarray, offsets: np.ndarray, cum: np.ndarray,
                 links: np.ndarray, top: int, at: int) -> None:
    """A link on level ``l`` must lead to a node that has level ``l`` (FAISS reads that node's links there)."""
    for level in range(1, top + 1):
        nodes = np.flatnonzero(levels > level)
        slots = offsets[nodes].astype(np.int64)[:, None] + np.arange(cum[level], cum[level + 1])
        found = links[slots]
        found = found[found >= 0]
        if (levels[found] <= level).any():
            raise cur.fail(f"an HNSW link on level {level} leads to a node below it", at)


def _ivfpq(cur: _Cursor, dim: int, rows: int) -> None:
    """``IwPQ``: IVF header, flat quantizer, no direct map, PQ, then ``ilar`` lists holding each row once."""
    cur.fourcc({"IwPQ": "IndexIVFPQ"}, "the index's type")
    _index_header(cur, dim, rows, "the index")
    at = cur.pos
    nlist = cur.scalar("Q", "IVF nlist")
    if not 1 <= nlist <= max(rows, 1):
        raise cur.fail(f"IVF nlist is {nlist}, expected 1 to the {rows} rows", at)
    at = cur.pos
    nprobe = cur.scalar("Q", "IVF nprobe")
    if not 1 <= nprobe <= nlist:
        raise cur.fail(f"IVF nprobe is {nprobe}, expected 1 to nlist {nlist}", at)
    _flat(cur, dim, nlist, "the IVF quantizer")
    at = cur.pos
    cur.equal(cur.scalar("B", "IVF direct map type"), 0, "IVF direct map type", at)
    cur.vector("<i8", "IVF direct map", 0)
    cur.boolean("IVF by_residual")
    at = cur.pos
    code_size = cur.scalar("Q", "IVF code_size")
    # The product quantizer: d, M sub-quantizers of nbits each, d * 2**nbits centroids.
    at_pq = cur.pos
    cur.equal(cur.scalar("Q", "PQ d"), dim, "PQ d", at_pq)
    at_m = cur.pos
    m = cur.scalar("Q", "PQ M")
    if not (1 <= m <= dim and dim % m == 0):
        raise cur.fail(f"PQ M is {m}, expected a divisor of d {dim}", at_m)
    at_bits = cur.pos
    nbits = cur.scalar("Q", "PQ nbits")
    if not 1 <= nbits <= MAX_PQ_NBITS:
        raise cur.fail(f"PQ nbits is {nbits}, expected 1 to {MAX_PQ_NBITS}", at_bits)
    cur.equal(code_size, (m * nbits + 7) // 8, "IVF code_size", at)
    cur.values("<f4", "PQ centroids", dim << nbits)
    _array_lists(cur, nlist, code_size, rows)


def _array_lists(cur: _Cursor, nlist: int, code_size: int, rows: int) -> None:
    """``ilar``: nlist, code_size, list sizes ('full' or 'sprs'), then each list's codes and ids."""
    cur.fourcc({"ilar": "array inverted lists"}, "IVF inverted lists")
    at = cur.pos
    cur.equal(cur.scalar("Q", "inverted lists' nlist"), nlist, "inverted lists' nlist", at)
    at = cur.pos
    cur.equal(cur.scalar("Q", "inverted lists' code_size"), code_size, "inverted lists' code_size", at)
    at = cur.pos
    if cur.fourcc({"full": "one size per list", "sprs": "(list, size) pairs"}, "list sizes' type") == "full":
        sizes = cur.vector("<u8", "list sizes", nlist)
    else:
        pairs = cur.vector("<u8", "list sizes")
        if len(pairs) % 2 or len(pairs) > 2 * nlist:
            raise cur.fail(f"{len(pairs)} sparse list-size entries for {nlist} lists", at)
        lists, sizes = pairs[0::2], pairs[1::2]
        if len(lists) and (lists[-1] >= nlist or (np.diff(lists.astype(np.int64)) < 1).any()):
            raise cur.fail("sparse list numbers are not increasing within nlist", at)
    # The float sum catches a uint64 sum that wrapped around to the right total.
    if int(sizes.sum()) != rows or sizes.sum(dtype=np.float64) > 2 * rows + 1:
        raise cur.fail(f"the list sizes do not add up to the {rows} rows", at)
    start = cur.pos
    payload = cur.array("u1", rows * (code_size + 8), "inverted lists' codes and ids")
    _check_ids(cur, start, payload, sizes.astype(np.int64), code_size, rows)


def _check_ids(cur: _Cursor, start: int, payload: np.ndarray, sizes: np.ndarray, code_size: int,
               rows: int) -> None:
    """Each list holds its codes then its int64 ids: gather every id (one vectorised read) and require
    each row exactly once."""
    if rows == 0:
        return
    before = np.cumsum(sizes) - sizes  # rows in the lists before each list
    first_id = before * (code_size + 8) + sizes * code_size  # where each list's ids begin in the payload
    where = np.repeat(first_id - 8 * before, sizes) + 8 * np.arange(rows, dtype=np.int64)
    windows = np.lib.stride_tricks.as_strided(payload, (len(payload) - 7, 8), (1, 1), writeable=False)
    ids = np.ascontiguousarray(windows[where]).view("<i8").ravel()
    if ids.min() < 0 or ids.max() >= rows:
        raise cur.fail(f"stored IVF ids outside [0, {rows})", start)
    if np.bincount(ids, minlength=rows).max() != 1:
        raise cur.fail("a row is stored twice in the IVF lists (so another is missing)", start)
