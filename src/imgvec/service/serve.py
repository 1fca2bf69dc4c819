"""``imgvec serve``: a local HTTP service that keeps a store, its index and the model loaded.

The routes (Starlette, served by uvicorn) are the face of the library, like the CLI: they
parse a request, call the :class:`Service`, and render its records as JSON or the page.

- ``GET /api/info``: the store (rows, generation, provenance), its index and the limits.
- ``GET /api/query?path=P&k=K``: "more like this" for a stored image, from its stored vector.
- ``POST /api/query?k=K`` with an image file as the body: decoded and embedded like ``imgvec query``.
  Both answer with the record ``imgvec query --format json`` prints for one image (``QueryResults.to_records``).
- ``GET /``: a page to pick or drop an image and browse its neighbours; ``GET /image?path=P``:
  a JPEG thumbnail of one row of the store, and of nothing else.

Safe by default: it binds 127.0.0.1 and answers only requests addressed to that host (a web page
cannot reach it through DNS rebinding), never writes the store, bounds request bodies, pixels and
``k``. Requests are served concurrently (sync routes run in Starlette's thread pool); the model
runs in one thread of its own, one batch at a time (uploads waiting for it go through together),
while decoding and searches run side by side. Each request compares the store file's identity
(inode, size, mtime) with the one loaded: when ``embed`` has published a new store, the service
loads it and answers from it, or, when it cannot (an index file it cannot read, say), keeps
answering from the one it has and says so in every answer. The store is searched as ``imgvec query``
searches it (:func:`imgvec.api._open_index`): its index file, rows embedded after the index
exhaustively beside it, and every row exhaustively where there is no index file (a small store) or
the index predates rows removed; the notes query prints say so in ``/api/info`` and in every answer.
"""

from __future__ import annotations

import io
import ipaddress
import os
import queue
import threading
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from imgvec.errors import BadInputError, ImageSkipped, ImgvecError, MismatchError, param
from imgvec.files.images import DEFAULT_MAX_PIXELS, load_image
from imgvec.results import Neighbour, QueryResult, QueryResults, file_path

if TYPE_CHECKING:  # pragma: no cover
    import socket

    from starlette.applications import Starlette

    from imgvec.embedding.embedder import Embedder
    from imgvec.vectors.index import VectorIndex
    from imgvec.files.provenance import Provenance

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
MAX_BODY_BYTES = 32 << 20  # an uploaded image; the pixel limit then bounds what decoding it costs
MAX_K = 1000
MODEL_BATCH = 16  # uploads waiting for the model go through it together, up to this many
PRELOAD_STEP = 128 << 10  # bytes per read-ahead request when the service asks its files into memory
THUMB_PIXELS = 320  # the page's cards show thumbnails this big (the HTML pages' are 160 px)
_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")


class NotServed(BadInputError):
    """A path that is not an image of the store the service shows (HTTP 404)."""


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
    the store gained after its index was built are searched exhaustively beside it.
    """

    def __init__(self, store: str | os.PathLike[str], runtime: str = "auto", k: int = 10,
                 weights: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_body: int = MAX_BODY_BYTES, index: str | os.PathLike[str] | None = None) -> None:
        from imgvec.vectors.index import index_path_for

        self.path = Path(store)
        self.index_given = index is not None  # a named index file must exist; the default one may not
        self.index_path = Path(index) if index is not None else index_path_for(self.path)
        self.runtime, self.weights = runtime, weights
        self.max_pixels, self.max_body = int(max_pixels), int(max_body)
        self.default_k = self.check_k(k)
        self.embedder: Embedder | None = None
        self.model: ModelWorker | None = None
        self._model_provenance: Provenance | None = None
        self.stale: str | None = None  # why the store on disk is newer than what is served
        self._failed: tuple[Any, ...] | None = None
        self._reload = threading.Lock()
        self.preloaded = threading.Event()  # set once the store and index files were asked into memory
        self._preloader: tuple[threading.Thread, threading.Event] | None = None
        self.snapshot: Snapshot = self._load(self._current_stamp())

    # -- the store, kept current ---------------------------------------------------------
    def _current_stamp(self) -> tuple[Any, ...]:
        return _stamp(self.path), _stamp(self.index_path)

    def current(self) -> Snapshot:
        """The snapshot to answer from: reloaded first when the store or its index file changed."""
        stamp = self._current_stamp()
        if stamp == self.snapshot.stamp or stamp == self._failed:
            return self.snapshot
        with self._reload:
            if stamp != self.snapshot.stamp and stamp != self._failed:
                old = self.snapshot
                try:
                    self.snapshot = self._load(stamp)
                    self.stale, self._failed = None, None
                except ImgvecError as error:
                    self._failed = stamp
                    self.stale = (f"{self.path} changed on disk but cannot be served ({error}); answers come from "
                                  f"it as it was when loaded: generation {old.generation}, {old.rows} rows")
        return self.snapshot

    def _load(self, stamp: tuple[Any, ...]) -> Snapshot:
        from imgvec.api import _open_index
        from imgvec.vectors.store import open_store

        store = open_store(self.path)
        try:
            index, unindexed, notes = _open_index(store, self.index_path if self.index_given else None)
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
        """Ask the kernel to read the store and index files into the page cache, in the background.

        A one-off query reads only the pages it touches; a service answers searches all over the
        index and reads stored vectors all over the store, so it wants them resident from the start
        (1M rows, cold cache: a GET took 143 ms p50, each visited vector a disk read, instead of ms).
        Advice only: where memory is short the kernel reads what fits.
        """
        self._stop_preload()  # a reload's files replace the ones being asked for
        self.preloaded.clear()
        stop = threading.Event()

        def advise() -> None:
            for path in paths:
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError:
                    continue  # replaced or removed meanwhile: the next load advises the new one
                try:
                    # Linux reads ahead at most its read-ahead window per call (128 KiB by default),
                    # however long the range: one call per window covers the file.
                    for start in range(0, os.fstat(fd).st_size, PRELOAD_STEP):
                        if stop.is_set():
                            return
                        os.posix_fadvise(fd, start, PRELOAD_STEP, os.POSIX_FADV_WILLNEED)
                finally:
                    os.close(fd)
            self.preloaded.set()

        if hasattr(os, "posix_fadvise"):
            # Not a daemon: one frozen at exit while it ran Python (a collection freeing h5py objects takes
            # h5py's lock) left the exiting process waiting for that lock forever. close() stops it.
            thread = threading.Thread(target=advise, name="imgvec-preload")
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
        self.snapshot.store.close()

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
        snap = self.current()
        row = self.row_of(snap, path)
        vector = snap.store.embeddings(row, row + 1)[0]
        return snap, self._answer(snap, file_path(snap.root, snap.keys[row]), vector, k)

    def query_image(self, data: bytes, k: int | str | None = None, name: str = "upload"
                    ) -> tuple[Snapshot, QueryResults]:
        """The neighbours of an image given as its file's bytes, embedded as the store's rows were."""
        k = self.check_k(self.default_k if k is None else k)
        if not data:
            raise BadInputError("the request has no image: send the image file as the body")
        snap = self.current()
        embedder, model = self.embedder, self.model
        assert embedder is not None and model is not None
        try:  # decoding runs in the request's thread, side by side with other requests
            pixels = load_image(name, embedder.image_size, self.max_pixels, data=io.BytesIO(data))
        except ImageSkipped as skipped:
            raise BadInputError(str(skipped)) from None
        return snap, self._answer(snap, name, model.embed(pixels), k)

    def image_file(self, path: str) -> bytes:
        """A JPEG thumbnail of the stored image ``path``: only rows of the store, only regular files,
        only files whose real location (links followed, as opened) is under the store's root."""
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

    def info(self) -> dict[str, Any]:
        snap = self.current()
        return {
            "store": str(self.path), "store_id": snap.store_id, "generation": snap.generation, "rows": snap.rows,
            "dim": snap.provenance.dim, "root": snap.root,
            "index": {"kind": snap.kind, "file": snap.index_file, "rows": snap.rows - snap.unindexed,
                      "unindexed": snap.unindexed},
            "notes": snap.notes,
            "provenance": asdict(snap.provenance),
            "runtime": self.embedder.engine_.runtime if self.embedder and self.embedder.engine_ else None,
            "stale": self.stale,
            "preloading": not self.preloaded.is_set(),
            "limits": {"max_body_bytes": self.max_body, "max_pixels": self.max_pixels, "max_k": MAX_K},
            "default_k": self.default_k,
        }


def _opened_path(fh: Any) -> str | None:
    """Where an open file really is (Linux: /proc/self/fd), so a link swapped after a check cannot fool it."""
    try:
        return os.readlink(f"/proc/self/fd/{fh.fileno()}")
    except OSError:
        return None


# -- the HTTP face -------------------------------------------------------------------------
_SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; "
                                "img-src 'self' blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
                                "frame-ancestors 'none'"),
}


def create_app(service: Service, allowed_hosts: list[str] | None = None) -> "Starlette":
    """The Starlette app answering for ``service``; ``allowed_hosts``: the Host headers it answers."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, Response
    from starlette.routing import Route

    def headers(snap: Snapshot | None = None) -> dict[str, str]:
        out = dict(_SECURITY_HEADERS)
        if snap is not None:
            out.update({"X-Imgvec-Generation": str(snap.generation), "X-Imgvec-Rows": str(snap.rows)})
            if snap.notes:  # what imgvec query prints on stderr for this store and index
                out["X-Imgvec-Notes"] = " | ".join(snap.notes).encode("ascii", "replace").decode()
        if service.stale:
            out["X-Imgvec-Stale"] = service.stale.encode("ascii", "replace").decode()
        return out

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status, headers=headers())

    def answer(fn: Callable[[Request], Response]) -> Callable[[Request], Response]:
        """imgvec's errors as one JSON line: bad input 400, a path not served 404, a mismatch 409."""
        def endpoint(request: Request) -> Response:
            try:
                return fn(request)
            except NotServed as missing:
                return error(404, str(missing))
            except MismatchError as mismatch:
                return error(409, str(mismatch))
            except ImgvecError as bad:
                return error(400, str(bad))
        endpoint.__name__ = fn.__name__
        return endpoint

    def required(request: Request, name: str) -> str:
        value = request.query_params.get(name)
        if not value:
            raise BadInputError(f"{param(name)} is required")
        return value

    @answer
    def info(request: Request) -> Response:
        return JSONResponse(service.info(), headers=headers(service.snapshot))

    @answer
    def query_get(request: Request) -> Response:
        snap, result = service.query_path(required(request, "path"), request.query_params.get("k"))
        return JSONResponse(result.to_records(), headers=headers(snap))

    async def query_post(request: Request) -> Response:
        from starlette.concurrency import run_in_threadpool

        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > service.max_body):
            return error(413, f"the image is over the limit of {service.max_body} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > service.max_body:
                return error(413, f"the image is over the limit of {service.max_body} bytes")
            chunks.append(chunk)
        body = b"".join(chunks)

        def run(req: Request) -> Response:
            snap, result = service.query_image(body, req.query_params.get("k"),
                                               req.query_params.get("name") or "upload")
            return JSONResponse(result.to_records(), headers=headers(snap))

        return await run_in_threadpool(answer(run), request)

    @answer
    def image(request: Request) -> Response:
        jpeg = service.image_file(required(request, "path"))
        return Response(jpeg, media_type="image/jpeg", headers={**headers(), "Cache-Control": "private, max-age=60"})

    @answer
    def page(request: Request) -> Response:
        from imgvec.pages.html import render

        snap = service.current()
        sub = [f"{snap.rows} images in {service.path}; {snap.kind} index; cosine similarity", *snap.notes]
        text = render("serve.html", title="imgvec serve", provenances=[snap.provenance], subtitle=sub,
                      k=service.default_k, max_k=MAX_K, stale=service.stale)
        return HTMLResponse(text, headers=headers(snap))

    def script(request: Request) -> Response:
        from importlib.resources import files

        return Response((files("imgvec.pages") / "templates" / "serve.js").read_bytes(),
                        media_type="text/javascript", headers=headers())

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return error(exc.status_code, str(exc.detail))

    async def server_error(request: Request, exc: Exception) -> Response:  # a bug: still one JSON line
        first = str(exc).splitlines()[0] if str(exc) else ""
        return error(500, f"internal error: {type(exc).__name__}: {first}")

    routes = [Route("/", page, methods=["GET"]), Route("/serve.js", script, methods=["GET"]),
              Route("/image", image, methods=["GET"]), Route("/api/info", info, methods=["GET"]),
              Route("/api/query", query_get, methods=["GET"]), Route("/api/query", query_post, methods=["POST"])]
    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)] if allowed_hosts else []
    return Starlette(routes=routes, middleware=middleware,
                     exception_handlers={HTTPException: http_error, Exception: server_error})


def allowed_hosts_for(host: str) -> list[str] | None:
    """The Host headers a service bound to ``host`` answers: its loopback names when it is on loopback
    (DNS rebinding cannot reach it), any when it was asked to listen on the network."""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    return [*_LOOPBACK_NAMES, host] if loopback else None


def listen(host: str, port: int) -> "socket.socket":
    """A TCP socket listening on ``host``:``port``; one :class:`BadInputError` line when it cannot."""
    import socket

    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on such sockets' connections, and without
        # it each response (headers, then body) waits ~40 ms for the client's delayed ACK (Nagle).
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)  # connections wait in the backlog from now on, until uvicorn accepts them
    except OSError as error:
        raise BadInputError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    return sock


def run(store: str | os.PathLike[str], host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, runtime: str = "auto",
        k: int = 10, weights: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
        max_body: int = MAX_BODY_BYTES, say: Callable[[str], None] = print,
        index: str | os.PathLike[str] | None = None) -> None:
    """Load ``store`` (its index, its model) and serve it on ``host``:``port`` until interrupted.

    Everything that can fail (the store, the model, the port) fails before serving starts, as one
    :class:`ImgvecError`. ``say`` gets one line when the service is ready.
    """
    import faiss
    import uvicorn

    # Requests are the parallelism here: each search runs on one thread. FAISS's own threads for a
    # single query only add hand-offs (flat, 200k x 1280, quiet machine: 68 ms on 2 threads, 54 ms on
    # one; HNSW beside busy cores: 16 ms p50 against 4 ms).
    faiss.omp_set_num_threads(1)
    service = Service(store, runtime=runtime, k=k, weights=weights, max_pixels=max_pixels, max_body=max_body,
                      index=index)
    try:
        sock = listen(host, port)
    except BaseException:
        service.close()
        raise
    snap = service.snapshot
    shown = f"[{host}]" if ":" in host else host
    open_to = ("" if allowed_hosts_for(host) else
               "; listening beyond this machine: anyone who can reach it can search the store and see its images")
    say(f"imgvec serve: http://{shown}:{sock.getsockname()[1]}/ ({service.path}: {snap.rows} rows, {snap.kind} "
        f"index, {snap.provenance.describe()}){open_to}; Ctrl-C stops")
    config = uvicorn.Config(create_app(service, allowed_hosts_for(host)), log_level="warning", access_log=False,
                            limit_concurrency=256, timeout_graceful_shutdown=2)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        service.close()
        sock.close()
