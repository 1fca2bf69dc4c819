"""The service behind ``imgvec serve``: a store, its index and its model loaded once and kept current.

No HTTP here (:mod:`imgvec.service.app` is the face): a :class:`Service` answers with records and
raises imgvec's errors. Each answer compares the store file's identity (inode, size, mtime) with the
one loaded: when ``embed`` has published a new store, the service loads it and answers from it, or,
when it cannot (an index file it cannot read, say), keeps answering from the one it has and says so.
The store is searched as ``imgvec query`` searches it (:func:`imgvec.api.open_index`): its index file,
rows embedded after the index exhaustively beside it, and every row exhaustively where there is no
index file (a small store) or the index predates rows removed.

Memory is bounded: every upload's body and the decoding of every uploaded image hold a share of one
:class:`MemoryBudget` for as long as they live, sized before it is paid (the body by its length, the
decoding by :func:`imgvec.files.images.decode_cost` from the image's header), so the service's memory
is at most what it holds loaded (model, store, index) plus the budget. Images are served only from
below one folder the user named (or the store file's folder), whatever the store says its root is.

The map (:meth:`Service.map`: the 2-D layout ``imgvec inspect`` draws, of at most ``map_rows`` rows) is made
once per snapshot, on a thread of its own started by the first request that asks for it: nothing waits
for it (start-up, searches), a reload makes it again, and it costs ``map_rows`` x dim floats and t-SNE's
working memory beside what is loaded.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import queue
import threading
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from imgvec.errors import BadInputError, ImageSkipped, ImgvecError, param
from imgvec.files.images import DEFAULT_MAX_PIXELS, load_image
from imgvec.results import Neighbour, QueryResult, QueryResults, file_path

if TYPE_CHECKING:  # pragma: no cover
    from imgvec.embedding.embedder import Embedder
    from imgvec.files.provenance import Provenance
    from imgvec.vectors.index import VectorIndex

MAX_BODY_BYTES = 32 << 20  # an uploaded image; the memory budget then bounds what decoding it costs
MEMORY_BUDGET = 1 << 30  # bytes that uploads' bodies and decoding may hold at once, all requests together
BUDGET_WAIT_S = 5.0  # how long a request waits for its share of the budget before it is refused as busy
MAX_K = 1000
LET_GO_WAIT_S = 30.0  # how long requests answering from a file being rewritten may take before it is let go
MODEL_BATCH = 16  # uploads waiting for the model go through it together, up to this many
PRELOAD_STEP = 1 << 20  # bytes per read when the service reads its files into memory
THUMB_PIXELS = 320  # the page's cards show thumbnails this big (the HTML pages' are 160 px)
MAP_SEED = 0  # the map's sample and t-SNE are seeded: the same store gives the same map (imgvec.inspect_map's)
MAP_DECIMALS = 4  # the map's coordinates, in [0, 1]: a ten-thousandth of its side is finer than a pixel
MAP_NICE = 10  # the map's thread runs this much nicer than the searches (Linux: niceness is per thread)


class NotServed(BadInputError):
    """A path that is not an image of the store the service shows (HTTP 404)."""


class TooCostly(BadInputError):
    """A request that would need more memory than the whole budget (HTTP 413)."""


class Busy(ImgvecError):
    """The budget stayed taken by other requests for longer than a request waits (HTTP 503)."""


class Superseded(Busy):
    """The snapshot a map was being made for was replaced before its rows were read (ask again: HTTP 503)."""


def _mb(nbytes: int) -> str:
    return f"{nbytes / (1 << 20):,.1f} MB"


class MemoryBudget:
    """Bytes that requests hold while they live (bodies, decoding), shared by all of them: a request
    takes its share before it allocates and gives it back after; one that cannot get it within
    ``wait`` seconds is refused (:class:`Busy`), one that asks for more than the whole is refused at once
    (:class:`TooCostly`)."""

    def __init__(self, total: int = MEMORY_BUDGET, wait: float = BUDGET_WAIT_S) -> None:
        if total < 1 << 20:
            raise BadInputError(f"{param('memory_budget')} must be at least 1 MB, not {total} bytes")
        self.total, self.wait = int(total), wait
        self.used = self.peak = 0
        self._cond = threading.Condition()

    def acquire(self, nbytes: int, what: str) -> int:
        """Take ``nbytes`` (blocking up to ``wait``); the bytes taken, for :meth:`release`."""
        nbytes = int(nbytes)
        if nbytes > self.total:
            raise TooCostly(f"{what} needs {_mb(nbytes)}, over the service's memory budget of {_mb(self.total)} "
                            "(--memory-budget)")
        with self._cond:
            if not self._cond.wait_for(lambda: self.used + nbytes <= self.total, timeout=self.wait):
                raise Busy(f"busy: {what} needs {_mb(nbytes)} and other requests hold {_mb(self.used)} of the "
                           f"{_mb(self.total)} memory budget; try again")
            self.used += nbytes
            self.peak = max(self.peak, self.used)
        return nbytes

    def release(self, nbytes: int) -> None:
        with self._cond:
            self.used -= nbytes
            self._cond.notify_all()

    @contextlib.contextmanager
    def hold(self, nbytes: int, what: str = "decoding the image") -> Iterator[None]:
        taken = self.acquire(nbytes, what)
        try:
            yield
        finally:
            self.release(taken)


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """What changes when a file is replaced (rename) or rewritten: inode, size, mtime; None when absent."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


@dataclass
class Snapshot:
    """One state of the store, and everything answers are made from: rows, their names, the index."""

    stamp: tuple[Any, ...]
    provenance: "Provenance"
    store_id: str
    generation: int
    root: str
    keys: list[str]
    labels: list[str]
    rows_of: dict[str, int]
    index: "VectorIndex | None"  # None: every row searched exhaustively (as imgvec query does)
    index_file: str | None  # the index file searched; None when there is none or it cannot be used
    unindexed: int  # rows after those the index holds, searched exhaustively beside it
    notes: list[str]  # imgvec query's notes: what is searched how, and the fix
    store: Any  # the open Store: stored vectors are read from it
    users: int = 0  # requests answering from it now (its files are let go only when none is)

    def broken(self) -> bool:
        """Whether another process waits to rewrite the store or index file in place (their leases,
        :mod:`imgvec.files.lease`): this snapshot must be let go, and its bytes never read again."""
        leases = (getattr(self.store, "lease", None), getattr(self.index, "lease", None))
        return any(lease is not None and lease.check() for lease in leases)

    def release(self) -> None:
        """Close the store and let go of the index's mapped file (the waiting writer goes on)."""
        self.store.close()
        if self.index is not None and self.index.lease is not None:
            self.index.lease.release()

    @property
    def rows(self) -> int:
        return len(self.keys)

    @property
    def kind(self) -> str:
        """The index kind answers name: ``flat`` when every row is searched exhaustively (as query says)."""
        return self.index.kind if self.index else "flat"


class ModelWorker:
    """One thread owns the model: uploads wait in a queue, and whatever is waiting when the model
    is free goes through it as one batch (one batch at a time; a batch spreads over the cores)."""

    def __init__(self, embedder: "Embedder", max_batch: int = MODEL_BATCH) -> None:
        self.embedder, self.max_batch = embedder, max_batch
        self.queue: queue.Queue[tuple[np.ndarray, Future[np.ndarray]] | None] = queue.Queue()
        self.batches: list[int] = []  # how many images each model call took (the last 1000)
        threading.Thread(target=self._loop, name="imgvec-model", daemon=True).start()

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        """The embedding of one ``(size, size, 3)`` uint8 image, when its batch has run."""
        done: Future[np.ndarray] = Future()
        self.queue.put((pixels, done))
        return done.result()

    def stop(self) -> None:
        self.queue.put(None)

    def _loop(self) -> None:
        while (item := self.queue.get()) is not None:
            batch = [item]
            while len(batch) < self.max_batch:
                try:
                    more = self.queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self.queue.put(None)  # stop after this batch
                    break
                batch.append(more)
            try:
                rows = self.embedder.embed_arrays(np.stack([pixels for pixels, _ in batch]))
            except BaseException as error:  # noqa: BLE001 - every waiting request hears of it
                for _, done in batch:
                    done.set_exception(error)
                continue
            self.batches = [*self.batches[-999:], len(batch)]
            for (_, done), row in zip(batch, rows):
                done.set_result(row)


class Service:
    """The store at ``store``, its index and its model, loaded once and kept up to date.

    Read-only: the store and its index file are opened for reading and never written; rows
    the store gained after its index was built are searched exhaustively beside it. ``images``:
    the folder images may be served from (default: the store file's folder); a row's image is
    served only when it lies below both that folder and the store's root.
    """

    def __init__(self, store: str | os.PathLike[str], runtime: str = "auto", k: int = 10,
                 weights: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_body: int = MAX_BODY_BYTES, index: str | os.PathLike[str] | None = None,
                 images: str | os.PathLike[str] | None = None, memory_budget: int = MEMORY_BUDGET,
                 map_rows: int | None = None) -> None:
        from imgvec.analyses.inspection import MAP_ROWS
        from imgvec.vectors.index import index_path_for

        self.path = Path(store)
        self.index_given = index is not None  # a named index file must exist; the default one may not
        self.index_path = Path(index) if index is not None else index_path_for(self.path)
        self.runtime, self.weights = runtime, weights
        self.max_pixels, self.max_body = int(max_pixels), int(max_body)
        self.default_k = self.check_k(k)
        self.budget = MemoryBudget(memory_budget)
        if self.max_body > self.budget.total:
            raise BadInputError(f"the body limit ({_mb(self.max_body)}) is over the memory budget "
                                f"({_mb(self.budget.total)}): raise --memory-budget")
        if images is not None and not os.path.isdir(images):
            raise BadInputError(f"{images}: no such folder (--images)")
        self.images = os.path.realpath(images if images is not None else self.path.parent)
        self.embedder: Embedder | None = None
        self.model: ModelWorker | None = None
        self._model_provenance: Provenance | None = None
        self.stale: str | None = None  # why the store on disk is newer than what is served
        self._failed: tuple[Any, ...] | None = None
        self._reload = threading.Lock()
        self.preloaded = threading.Event()  # set once the store and index files were read into memory
        self._preloader: tuple[threading.Thread, threading.Event] | None = None
        self._idle = threading.Condition()
        self.map_rows = int(map_rows if map_rows is not None else MAP_ROWS)  # 0: no map
        if self.map_rows < 0 or self.map_rows == 1:
            raise BadInputError(f"{param('map_rows')} must be 0 (no map) or at least 2, not {self.map_rows}")
        self._map: tuple[Snapshot, Future[dict[str, Any]]] | None = None  # the current snapshot's map, made or coming
        self._map_lock = threading.Lock()  # guards _map
        self._map_running = threading.Lock()  # one map is made at a time
        self._snapshot: Snapshot | None = self._load(self._current_stamp())

    # -- the store, kept current ---------------------------------------------------------
    def _current_stamp(self) -> tuple[Any, ...]:
        return _stamp(self.path), _stamp(self.index_path)

    def current(self) -> Snapshot:
        """The snapshot to answer from: reloaded first when the store or its index file changed. While
        another process rewrites one of them in place, there is none: :class:`Busy` until the new file checks."""
        if self._snapshot is not None and self._snapshot.broken():
            self._let_go()
        stamp = self._current_stamp()
        snap = self._snapshot
        if snap is not None and (stamp == snap.stamp or stamp == self._failed):
            return snap
        if snap is None and stamp == self._failed:
            raise Busy(self.stale or f"{self.path} is being rewritten")
        with self._reload:
            snap = self._snapshot
            if snap is None or (stamp != snap.stamp and stamp != self._failed):
                try:
                    self._snapshot = self._load(stamp)
                    self.stale, self._failed = None, None
                except ImgvecError as error:
                    self._failed = stamp
                    if snap is None:
                        self.stale = (f"{self.path} or its index is being rewritten in place by another process "
                                      f"({error}); answers resume once the new file checks")
                        raise Busy(self.stale) from None
                    self.stale = (f"{self.path} changed on disk but cannot be served ({error}); answers come from "
                                  f"it as it was when loaded: generation {snap.generation}, {snap.rows} rows")
        return self._snapshot  # type: ignore[return-value]

    @property
    def snapshot(self) -> Snapshot:
        """The snapshot last loaded (what :meth:`info` and the page describe)."""
        return self.current()

    def _let_go(self) -> None:
        """Another process waits to rewrite a file the snapshot holds: stop answering from it, wait for the
        requests answering from it now, then let go of its files (the writer goes on; nothing reads them)."""
        with self._reload:
            old = self._snapshot
            if old is None or not old.broken():
                return
            self._snapshot, self._failed = None, None
            self.stale = f"{self.path} or its index is being rewritten in place by another process"
        with self._idle:
            self._idle.wait_for(lambda: old.users == 0, timeout=LET_GO_WAIT_S)
        old.release()

    @contextlib.contextmanager
    def _using(self) -> Iterator[Snapshot]:
        """The current snapshot, counted as in use until the block ends (see :meth:`_let_go`)."""
        snap = self.current()
        with self._idle:
            snap.users += 1
        try:
            yield snap
        finally:
            with self._idle:
                snap.users -= 1
                self._idle.notify_all()

    def _load(self, stamp: tuple[Any, ...]) -> Snapshot:
        from imgvec.api import open_index
        from imgvec.vectors.store import open_store

        store = open_store(self.path)
        try:
            index, unindexed, notes = open_index(store, self.index_path if self.index_given else None)
            keys, labels = store.paths(), store.labels()
            prov = store.provenance
            self._load_model(prov, store.root)
            self._preload([self.path, *([self.index_path] if index else [])])
            return Snapshot(stamp, prov, store.store_id, store.generation, store.root, keys, labels,
                            {k: i for i, k in enumerate(keys)}, index, str(self.index_path) if index else None,
                            unindexed, notes, store)
        except BaseException:
            store.close()
            raise

    def _preload(self, paths: list[Path]) -> None:
        """Read the store and index files into the page cache, in the background; ``preloaded`` is set once
        they were read (so ``preloading`` turns false when they are in memory, not when they were asked for).

        A one-off query reads only the pages it touches; a service answers searches all over the
        index and reads stored vectors all over the store, so it wants them resident from the start
        (1M rows, cold cache: a GET took 143 ms p50, each visited vector a disk read, instead of ms).
        Asking alone (``POSIX_FADV_WILLNEED``) returns before the disk has answered: at 300k rows the
        first seconds of traffic after "done" still waited on it (benchmarks/bench_serve.py). Where memory
        is short the kernel keeps what fits.
        """
        self._stop_preload()  # a reload's files replace the ones being asked for
        self.preloaded.clear()
        stop = threading.Event()

        def read() -> None:
            buffer = bytearray(PRELOAD_STEP)
            for path in paths:
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError:
                    continue  # replaced or removed meanwhile: the next load reads the new one
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # a wide read-ahead window
                    while os.readv(fd, [buffer]) > 0:  # the GIL is let go while the disk answers
                        if stop.is_set():
                            return
                except OSError:
                    continue  # unreadable now: searches read what they need
                finally:
                    os.close(fd)
            self.preloaded.set()

        if hasattr(os, "posix_fadvise"):
            # Not a daemon: one frozen at exit while it ran Python (a collection freeing h5py objects takes
            # h5py's lock) left the exiting process waiting for that lock forever. close() stops it.
            thread = threading.Thread(target=read, name="imgvec-preload")
            self._preloader = (thread, stop)
            thread.start()
        else:  # pragma: no cover - macOS, Windows
            self.preloaded.set()

    def _stop_preload(self) -> None:
        if self._preloader is not None:
            thread, stop = self._preloader
            stop.set()
            if thread is not threading.current_thread():
                thread.join()
            self._preloader = None

    def close(self) -> None:
        """Stop the background work (the preload, the model's thread) and close the store."""
        self._stop_preload()
        if self.model is not None:
            self.model.stop()
        if self._snapshot is not None:
            self._snapshot.release()

    def _load_model(self, prov: "Provenance", root: str | None = None) -> None:
        """The embedder for ``prov``, loaded (compiled) now; kept while the store's provenance stays the same."""
        from imgvec.embedding.embedder import Embedder

        if self._model_provenance is not None and self._model_provenance.key() == prov.key():
            return
        embedder = Embedder.from_provenance(prov, weights_path=self.weights, runtime=self.runtime, root=root,
                                            max_pixels=self.max_pixels, batch_size=MODEL_BATCH)
        embedder.load()
        if self.model is not None:
            self.model.stop()
        self.embedder, self.model, self._model_provenance = embedder, ModelWorker(embedder), prov

    # -- answers ---------------------------------------------------------------------------
    def check_k(self, k: Any) -> int:
        try:
            k = int(k)
        except (TypeError, ValueError):
            raise BadInputError(f"{param('k')} must be a whole number, not {k!r}") from None
        if not 1 <= k <= MAX_K:
            raise BadInputError(f"{param('k')} must be between 1 and {MAX_K}, not {k}")
        return k

    def row_of(self, snap: Snapshot, path: str) -> int:
        """The row of ``path``: a stored path exactly as stored, or joined to the store's root (as query
        records show it). Nothing is normalised: ``a/../b.jpg`` is not ``b.jpg``."""
        row = snap.rows_of.get(path)
        if row is None and path.startswith(snap.root.rstrip("/") + "/"):
            row = snap.rows_of.get(path[len(snap.root.rstrip("/")) + 1:])
        if row is None:
            raise NotServed(f"{path}: not an image of the store {self.path}")
        return row

    def _answer(self, snap: Snapshot, query: str, vector: np.ndarray, k: int) -> QueryResults:
        """The ``k`` neighbours of ``vector`` as the result ``imgvec query`` gives for one image."""
        from imgvec.vectors.index import search_store

        scores, ids = search_store(snap.store, vector.reshape(1, -1), k, snap.index)
        found = [Neighbour(r + 1, snap.keys[i], float(s), snap.labels[i])
                 for r, (i, s) in enumerate(zip(ids[0].tolist(), scores[0])) if i >= 0]
        return QueryResults(snap.provenance, [QueryResult(query, found)], [], snap.kind, self.path, snap.root,
                            snap.index_file or "", unindexed=snap.unindexed, notes=snap.notes)

    def query_path(self, path: str, k: int | str | None = None) -> tuple[Snapshot, QueryResults]:
        """The neighbours of a stored image, from its stored vector (no decoding, no model)."""
        k = self.check_k(self.default_k if k is None else k)
        with self._using() as snap:
            row = self.row_of(snap, path)
            vector = snap.store.embeddings(row, row + 1)[0]
            return snap, self._answer(snap, file_path(snap.root, snap.keys[row]), vector, k)

    def query_image(self, data: bytes, k: int | str | None = None, name: str = "upload"
                    ) -> tuple[Snapshot, QueryResults]:
        """The neighbours of an image given as its file's bytes, embedded as the store's rows were.

        Decoding holds its cost (known from the header before a pixel is decoded) from the budget."""
        k = self.check_k(self.default_k if k is None else k)
        if not data:
            raise BadInputError("the request has no image: send the image file as the body, or as the one "
                                "file of a multipart/form-data form")
        self.current()  # a changed store is reloaded first, its model with it
        embedder, model = self.embedder, self.model
        if embedder is None or model is None:  # pragma: no cover - _load always loads one
            raise ImgvecError("the service has no model loaded")
        try:  # decoding runs in the request's thread, side by side with other requests
            pixels = load_image(name, embedder.image_size, self.max_pixels, data=io.BytesIO(data),
                                reserve=lambda cost: self.budget.hold(cost, f"decoding {name}"))
        except ImageSkipped as skipped:
            raise BadInputError(str(skipped)) from None
        vector = model.embed(pixels)
        with self._using() as snap:
            return snap, self._answer(snap, name, vector, k)

    def image_file(self, path: str) -> bytes:
        """A JPEG thumbnail of the stored image ``path``: only rows of the store, only regular files, only
        files whose real location (links followed, as opened) is under the store's root and under the
        folder images are served from (:attr:`images`), whatever root the store names."""
        from imgvec.fileio import open_regular
        from imgvec.pages.html import thumbnail_jpeg

        snap = self.current()
        key = snap.keys[self.row_of(snap, path)]
        root = os.path.realpath(snap.root)
        if os.path.isabs(key):
            raise NotServed(f"{path}: outside the store's root {snap.root}; not served")
        try:
            with open_regular(os.path.join(snap.root, key)) as fh:
                real = _opened_path(fh) or os.path.realpath(os.path.join(snap.root, key))
                if os.path.commonpath([root, real]) != root:
                    raise NotServed(f"{path}: links outside the store's root {snap.root}; not served")
                if os.path.commonpath([self.images, real]) != self.images:
                    raise NotServed(f"{path}: outside {self.images}, the folder images are served from "
                                    "(--images DIR); not served")
                jpeg = thumbnail_jpeg(fh, THUMB_PIXELS, self.max_pixels)
        except NotServed:
            raise
        except OSError as error:
            raise NotServed(f"{path}: cannot be read ({error.strerror or error})") from None
        except Exception as error:  # noqa: BLE001 - any decoder failure: the file changed since it was embedded
            raise BadInputError(f"{path}: cannot decode: {str(error).splitlines()[0] if str(error) else error}"
                                ) from None
        if jpeg is None:
            raise BadInputError(f"{path}: over the limit of {self.max_pixels} pixels")
        return jpeg

    # -- the map --------------------------------------------------------------------------------
    def map(self) -> tuple[Snapshot, dict[str, Any] | None]:
        """The current snapshot and its map's record (:meth:`_map_record`), or None while it is being made: the
        first ask starts making it on a thread of its own, and a reloaded snapshot gets a map of its own.
        A map that failed raises its error, for this snapshot."""
        snap = self.current()
        if not self.map_rows:
            return snap, self._map_record(snap, np.arange(0), np.empty((0, snap.provenance.dim), np.float32))
        with self._map_lock:
            if self._map is None or self._map[0] is not snap:
                self._map = (snap, Future())
                threading.Thread(target=self._make_map, args=self._map, name="imgvec-map", daemon=True).start()
            made = self._map[1]
        if not made.done():
            return snap, None
        return snap, made.result()

    def _make_map(self, snap: Snapshot, made: "Future[dict[str, Any]]") -> None:
        """Make ``snap``'s map into ``made``: its rows read while ``snap`` is counted in use (it cannot be let
        go meanwhile), then laid out with nothing held. A daemon thread: at exit nothing waits for a t-SNE."""
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), MAP_NICE)  # this thread only (Linux)
        except (AttributeError, OSError):  # pragma: no cover - other systems: the process's niceness
            pass
        try:
            with self._map_running:
                with self._map_lock:
                    if self._map is None or self._map[0] is not snap:
                        raise Superseded("the store was reloaded before its map was made; ask again")
                made.set_result(self._map_record(snap, *self._map_rows_of(snap)))
        except BaseException as error:  # noqa: BLE001 - whoever asks for this snapshot's map hears of it
            made.set_exception(error)

    def _map_rows_of(self, snap: Snapshot) -> tuple[np.ndarray, np.ndarray]:
        """The rows the map lays out and their vectors (:func:`imgvec.api.map_sample`), read from ``snap``."""
        from imgvec import api

        with self._idle:
            snap.users += 1
        try:
            if snap is not self._snapshot or snap.broken():  # replaced or let go: its files may be closed
                raise Superseded("the store changed before its map was made; ask again")
            return api.map_sample(snap.store, self.map_rows, MAP_SEED)
        finally:
            with self._idle:
                snap.users -= 1
                self._idle.notify_all()

    def _map_record(self, snap: Snapshot, rows: np.ndarray, vectors: np.ndarray) -> dict[str, Any]:
        """The map as JSON: one point per row laid out (its row, absolute path, x and y in [0, 1] rounded to
        :data:`MAP_DECIMALS`, label or null), each label's colour and count; never a NaN or an infinity."""
        from imgvec import api
        from imgvec.pages.html import label_colours

        layout = api.layout_map(rows, vectors, snap.rows, MAP_SEED)
        points: list[dict[str, Any]] = []
        dropped = 0
        if layout is not None:
            for row, (x, y) in zip(layout.rows.tolist(), layout.xy.astype(np.float64).tolist()):
                if not (math.isfinite(x) and math.isfinite(y)):
                    dropped += 1
                    continue
                points.append({"row": row, "path": file_path(snap.root, snap.keys[row]),
                               "x": round(min(max(x, 0.0), 1.0), MAP_DECIMALS),
                               "y": round(min(max(y, 0.0), 1.0), MAP_DECIMALS), "label": snap.labels[row] or None})
        counts = Counter(point["label"] or "" for point in points)
        colours = label_colours(counts)
        legend = [{"label": name or None, "colour": colours[name], "points": counts[name]}
                  for name in sorted(counts, key=lambda n: (n == "", n))]
        notes = ([f"{dropped} rows had no finite position and are not drawn"] if dropped else [])
        method = (layout.method if layout else "no map: turned off (imgvec serve --map-rows 0)" if not self.map_rows
                  else "no map: the store has fewer than two rows")
        return {"store": str(self.path), "root": snap.root, "generation": snap.generation, "rows": snap.rows,
                "sampled": layout is not None and layout.sampled, "method": method, "legend": legend, "points": points,
                "issues": None, "notes": notes + [
                    "Label issues and outliers are not marked here: `imgvec inspect STORE --html FILE` marks them "
                    "on its map"]}

    def images_shown(self, snap: Snapshot | None = None) -> bool:
        """Whether the store's root lies below the folder images are served from (else none is shown)."""
        root = os.path.realpath((snap or self.snapshot).root)
        return os.path.commonpath([self.images, root]) == self.images

    def info(self) -> dict[str, Any]:
        snap = self.current()
        return {
            "store": str(self.path), "store_id": snap.store_id, "generation": snap.generation, "rows": snap.rows,
            "dim": snap.provenance.dim, "root": snap.root,
            "index": {"kind": snap.kind, "file": snap.index_file, "rows": snap.rows - snap.unindexed,
                      "unindexed": snap.unindexed},
            "notes": snap.notes,
            "provenance": snap.provenance.json_fields(),
            "runtime": self.embedder.engine_.runtime if self.embedder and self.embedder.engine_ else None,
            "stale": self.stale,
            "preloading": not self.preloaded.is_set(),
            "images": self.images,
            "limits": {"max_body_bytes": self.max_body, "max_pixels": self.max_pixels, "max_k": MAX_K,
                       "memory_budget_bytes": self.budget.total},
            "default_k": self.default_k,
        }


def _opened_path(fh: Any) -> str | None:
    """Where an open file really is (Linux: /proc/self/fd), so a link swapped after a check cannot fool it."""
    try:
        return os.readlink(f"/proc/self/fd/{fh.fileno()}")
    except OSError:
        return None
