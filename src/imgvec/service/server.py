"""Listening for ``imgvec serve``: the socket, uvicorn with bounded connections, and a bounded shutdown.

Connections are bounded in number and in time, so clients that connect and send nothing, or send a
request slowly, cannot keep others waiting: a request's line and headers must arrive within
``header_timeout`` seconds (from the connection's start, or from the first byte after an answer), its
body within ``body_timeout`` of its headers, an idle connection between requests is closed after
``keep_alive`` seconds (uvicorn's own timer), and at ``max_connections`` open connections the one idle
longest (no request in progress: nothing sent yet, half a request line, or between requests) is closed
to make room; when every connection is busy a new one is answered 503. SIGTERM or SIGINT: uploads still
arriving are refused (503), requests being answered get ``GRACE_S`` seconds, and the process is gone
within ``EXIT_WITHIN_S`` whatever still runs.
"""

from __future__ import annotations

import ipaddress
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from imgvec.errors import BadInputError, param
from imgvec.files.images import DEFAULT_MAX_PIXELS
from imgvec.service.app import create_app
from imgvec.service.service import MAX_BODY_BYTES, MEMORY_BUDGET, Service

if TYPE_CHECKING:  # pragma: no cover
    import socket

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
GRACE_S = 3.0  # on SIGTERM/SIGINT: how long requests being answered may still take
EXIT_WITHIN_S = 9.0  # on SIGTERM/SIGINT: the process ends by then, whatever still runs
_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")


@dataclass(frozen=True)
class Limits:
    """How long and how many connections may stay open (each a ``imgvec serve`` option)."""

    header_timeout: float = 10.0  # seconds for a request's line and headers
    body_timeout: float = 60.0  # seconds for a request's body after its headers (32 MB at ~4 Mbit/s)
    keep_alive: float = 5.0  # seconds an idle connection stays open between requests
    max_connections: int = 512  # open connections at once; at the cap the longest idle one is closed
    max_header_bytes: int = 16 << 10  # a request line and headers larger than this: 400

    def __post_init__(self) -> None:
        for name in ("header_timeout", "body_timeout", "keep_alive"):
            if not getattr(self, name) > 0:
                raise BadInputError(f"{param(name)} must be more than 0 seconds")
        if self.max_connections < 1:
            raise BadInputError(f"{param('max_connections')} must be at least 1, not {self.max_connections}")


def guarded_protocol(limits: Limits) -> type:
    """uvicorn's h11 protocol with :class:`Limits`' timers and connection cap, and a shutdown that refuses
    uploads still arriving instead of waiting for them."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    refusal = b'{"error": "the service is busy: every connection is in use; try again"}'
    stopping = b'{"error": "the service is shutting down; the upload was not read"}'

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._timer: Any = None
            self._waiting = ""  # what the timer waits for: "headers" or "body"
            self._since = self.loop.time()
            self._arm("headers", limits.header_timeout)
            if len(self.connections) > limits.max_connections:
                self._make_room()

        def _arm(self, waiting: str, seconds: float) -> None:
            self._disarm()
            self._waiting, self._timer = waiting, self.loop.call_later(seconds, self._expired)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
            self._timer, self._waiting = None, ""

        def _expired(self) -> None:
            self._timer = None
            if not self.transport.is_closing():
                self.transport.close()  # the app hears of it as a disconnect

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.transport.is_closing():
                return
            state = self.conn.their_state
            if state is h11.IDLE:  # (part of) a request line and headers
                if self._waiting != "headers":
                    self._since = self.loop.time()
                    self._arm("headers", limits.header_timeout)
            elif state is h11.SEND_BODY:
                if self._waiting != "body":
                    self._arm("body", limits.body_timeout)
            else:
                self._disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _idle(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _make_room(self) -> None:
            idle = [c for c in self.connections if c is not self and getattr(c, "_idle", lambda: False)()]
            if idle:
                oldest = min(idle, key=lambda c: getattr(c, "_since", 0.0))
                oldest.transport.close()
            else:
                self._refuse(refusal)

        def _refuse(self, body: bytes) -> None:
            """Answer 503 with ``body`` now (even while a request's body is still arriving) and close."""
            if self.conn.their_state is h11.IDLE:  # no request yet: h11 has nothing to answer, so write it as is
                self.transport.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                                     b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
                self.transport.close()
                return
            try:
                out = self.conn.send(h11.Response(status_code=503, headers=[
                    (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close")]))
                out = (out or b"") + (self.conn.send(h11.Data(data=body)) or b"")
                self.transport.write(out + (self.conn.send(h11.EndOfMessage()) or b""))
            except h11.LocalProtocolError:
                pass  # a response had already begun: closing is the refusal
            if self.cycle is not None:
                self.cycle.disconnected = True
                self.cycle.message_event.set()
            self.transport.close()

        def shutdown(self) -> None:
            if self.cycle is not None and not self.cycle.response_complete and not self.cycle.response_started \
                    and self.conn.their_state is h11.SEND_BODY:
                self._refuse(stopping)  # an upload still arriving: refused, not waited for
                return
            super().shutdown()

    return GuardedH11Protocol


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


def _return_freed_memory() -> None:
    """Have glibc give large freed blocks back to the system at once (mmap above 1 MiB, a fixed threshold):
    with its adaptive threshold a decoded image freed stays in the heap, and the process's memory is no
    longer bounded by what it holds (the budget) but by what it once held."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass


def run(store: str | os.PathLike[str], host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, runtime: str = "auto",
        k: int = 10, weights: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
        max_body: int = MAX_BODY_BYTES, say: Callable[[str], None] = print,
        index: str | os.PathLike[str] | None = None, images: str | os.PathLike[str] | None = None,
        memory_budget: int = MEMORY_BUDGET, limits: Limits | None = None, map_rows: int | None = None) -> None:
    """Load ``store`` (its index, its model) and serve it on ``host``:``port`` until interrupted.

    Everything that can fail (the store, the model, the port) fails before serving starts, as one
    :class:`ImgvecError`. ``say`` gets one line when the service is ready.
    """
    import faiss
    import uvicorn

    limits = limits or Limits()
    _return_freed_memory()
    # Requests are the parallelism here: each search runs on one thread. FAISS's own threads for a
    # single query only add hand-offs (flat, 200k x 1280, quiet machine: 68 ms on 2 threads, 54 ms on
    # one; HNSW beside busy cores: 16 ms p50 against 4 ms).
    faiss.omp_set_num_threads(1)
    service = Service(store, runtime=runtime, k=k, weights=weights, max_pixels=max_pixels, max_body=max_body,
                      index=index, images=images, memory_budget=memory_budget, map_rows=map_rows)
    try:
        sock = listen(host, port)
    except BaseException:
        service.close()
        raise
    snap = service.snapshot
    shown = f"[{host}]" if ":" in host else host
    open_to = ("" if allowed_hosts_for(host) else
               "; listening beyond this machine: anyone who can reach it can search the store and see its images")
    images_line = (f"images from below {service.images}" if service.images_shown() else
                   f"images NOT shown: the store's root {snap.root} is not below {service.images} (--images DIR)")
    say(f"imgvec serve: http://{shown}:{sock.getsockname()[1]}/ ({service.path}: {snap.rows} rows, {snap.kind} "
        f"index, {snap.provenance.describe()}; {images_line}){open_to}; Ctrl-C stops")
    config = uvicorn.Config(create_app(service, allowed_hosts_for(host)), log_level="warning", access_log=False,
                            http=guarded_protocol(limits), timeout_keep_alive=limits.keep_alive,
                            h11_max_incomplete_event_size=limits.max_header_bytes,
                            limit_concurrency=None, timeout_graceful_shutdown=GRACE_S)
    try:
        _server_class()(config).run(sockets=[sock])
    finally:
        service.close()
        sock.close()


class _Deadline:
    """Ends the process ``seconds`` after it is started unless the process ended first."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.started = seconds, False

    def start(self) -> None:
        if not self.started:
            self.started = True
            threading.Thread(target=self._run, name="imgvec-exit-deadline", daemon=True).start()

    def _run(self) -> None:
        time.sleep(self.seconds)
        sys.stderr.write(f"imgvec serve: requests still running {self.seconds:g} s after the stop signal; "
                         "stopped without them\n")
        sys.stderr.flush()
        os._exit(1)


def _server_class() -> type:
    import uvicorn

    class BoundedShutdown(uvicorn.Server):
        """uvicorn's server whose stop signal also starts a deadline for the whole process."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            if not hasattr(self, "deadline"):
                self.deadline = _Deadline(EXIT_WITHIN_S)
            self.deadline.start()
            super().handle_exit(sig, frame)

    return BoundedShutdown
