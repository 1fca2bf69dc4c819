"""The HTTP face of ``imgvec serve``: a Starlette app over a :class:`~imgvec.service.service.Service`.

- ``GET /api/info``: the store (rows, generation, provenance), its index and the limits.
- ``GET /api/query?path=P&k=K``: "more like this" for a stored image, from its stored vector.
- ``POST /api/query?k=K``: an image, as the body (an image content type) or as the one file of a
  multipart/form-data form (``curl -F file=@photo.jpg``), decoded and embedded like ``imgvec query``.
  Both answer with the record ``imgvec query --format json`` prints for one image.
- ``GET /api/map``: the 2-D map of the store (``imgvec inspect``'s, of at most ``map_rows`` rows): 200 with
  its points once made, 202 ``{"computing": true}`` (and ``Retry-After``) while it is made; the first
  request for a snapshot starts making it, in the background.
- ``GET /``: a page to pick or drop an image and browse its neighbours, with the map (hover: a thumbnail,
  a click: a search from that image); ``GET /image?path=P``: a JPEG thumbnail of one row of the store,
  and of nothing else.

Endpoints are module-level functions that find the service on ``request.app.state.service``; imgvec's
errors become one JSON line through the app's exception handlers (bad input 400, not served 404, a
mismatch 409, over the limits 413, busy 503); every response carries the security headers (one
middleware). Requests that change nothing still must come from this service's own page or a client
that is not a browser: a POST with a foreign ``Origin`` (or a browser's ``Sec-Fetch-Site`` saying
cross-site) is refused, and so is one whose content type is not an image or a multipart form.
Header values are percent-encoded (RFC 3986): a path in a note cannot break a response.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from imgvec.errors import BadInputError, ImgvecError, MismatchError, param
from imgvec.service.service import MAX_K, Busy, NotServed, Service, Snapshot, TooCostly

if TYPE_CHECKING:  # pragma: no cover
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; "
                                "img-src 'self' blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
                                "frame-ancestors 'none'"),
}
MAX_FORM_FIELDS = 8  # a multipart upload: its one file and a few small fields at most
MAX_FORM_FIELD_BYTES = 64 << 10  # each field that is not a file
UPLOAD_TYPES = "an image content type (image/*), application/octet-stream or multipart/form-data"
HOW_TO_UPLOAD = ("curl -F file=@photo.jpg URL, or curl -H 'Content-Type: image/jpeg' --data-binary @photo.jpg URL")


class UnsupportedUpload(BadInputError):
    """A POST whose content type is not one an image is sent with (HTTP 415)."""


def header_value(text: str) -> str:
    """``text`` as a header may carry it: percent-encoded UTF-8 (spaces and printable ASCII kept)."""
    return quote(text, safe=" !\"#$&'()*+,/:;<=>?@[]^_`{|}~")


def _headers(service: Service, snap: Snapshot | None = None) -> dict[str, str]:
    """What the store's state adds to an answer: its generation and rows, query's notes, staleness."""
    out: dict[str, str] = {}
    if snap is not None:
        out.update({"X-Imgvec-Generation": str(snap.generation), "X-Imgvec-Rows": str(snap.rows)})
        if snap.notes:  # what imgvec query prints on stderr for this store and index (also in /api/info)
            out["X-Imgvec-Notes"] = header_value(" | ".join(snap.notes))
    if service.stale:
        out["X-Imgvec-Stale"] = header_value(service.stale)
    return out


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> "Response":
    from starlette.responses import JSONResponse

    return JSONResponse({"error": message}, status, headers=headers)


def _service(request: "Request") -> Service:
    service: Service = request.app.state.service
    return service


def _required(request: "Request", name: str) -> str:
    value = request.query_params.get(name)
    if not value:
        raise BadInputError(f"{param(name)} is required")
    return value


# -- endpoints -------------------------------------------------------------------------------------
def info(request: "Request") -> "Response":
    from starlette.responses import JSONResponse

    service = _service(request)
    return JSONResponse(service.info(), headers=_headers(service, service.snapshot))


def query_get(request: "Request") -> "Response":
    from starlette.responses import JSONResponse

    service = _service(request)
    snap, result = service.query_path(_required(request, "path"), request.query_params.get("k"))
    return JSONResponse(result.to_records(), headers=_headers(service, snap))


async def query_post(request: "Request") -> "Response":
    """An uploaded image's neighbours. The body's length is checked before it is read and held from the
    memory budget while it lives (twice: the chunks and their join); decoding takes its own share."""
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import ClientDisconnect
    from starlette.responses import JSONResponse, Response

    service = _service(request)
    kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if not (kind.startswith("image/") or kind in ("application/octet-stream", "multipart/form-data")):
        raise UnsupportedUpload(f"send the image with {UPLOAD_TYPES}, not {kind or 'no content type'}: "
                                f"{HOW_TO_UPLOAD}")
    too_big = f"the image is over the limit of {service.max_body} bytes"
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > service.max_body):
        raise TooCostly(too_big)
    taken = await run_in_threadpool(service.budget.acquire, 2 * (int(length) if length else service.max_body),
                                    "the upload")
    try:
        limited = _limited(request, service.max_body, too_big)
        try:
            if kind == "multipart/form-data":
                data, name = await _form_image(limited)
            else:
                data, name = b"".join([chunk async for chunk in limited.stream()]), None
        except ClientDisconnect:  # gone, or closed by the server (body timeout, shutdown): no one to answer
            return Response(status_code=400)
        name = request.query_params.get("name") or name or "upload"
        snap, result = await run_in_threadpool(service.query_image, data, request.query_params.get("k"), name)
    finally:
        service.budget.release(taken)
    return JSONResponse(result.to_records(), headers=_headers(service, snap))


def _limited(request: "Request", limit: int, message: str) -> "Request":
    """``request`` with a body that raises :class:`TooCostly` once more than ``limit`` bytes arrived
    (a chunked body has no length to check first)."""
    from starlette.requests import Request

    received = 0

    async def receive() -> "Message":
        nonlocal received
        message_ = await request.receive()
        if message_["type"] == "http.request":
            received += len(message_.get("body", b""))
            if received > limit:
                raise TooCostly(message)
        return message_

    return Request(request.scope, receive)


async def _form_image(request: "Request") -> tuple[bytes, str | None]:
    """The one file of a multipart/form-data body, and its file name; limits apply as the parts are read."""
    from starlette.datastructures import UploadFile

    async with request.form(max_files=1, max_fields=MAX_FORM_FIELDS, max_part_size=MAX_FORM_FIELD_BYTES) as form:
        files = [value for value in form.values() if isinstance(value, UploadFile)]
        if not files:
            raise BadInputError(f"the form has no file: send the image as its one file field ({HOW_TO_UPLOAD})")
        return await files[0].read(), files[0].filename


def map_(request: "Request") -> "Response":
    from starlette.responses import JSONResponse

    service = _service(request)
    snap, record = service.map()
    if record is None:
        return JSONResponse({"computing": True, "generation": snap.generation, "rows": snap.rows}, 202,
                            headers={**_headers(service, snap), "Retry-After": "1"})
    return JSONResponse(record, headers=_headers(service, snap))


def image(request: "Request") -> "Response":
    from starlette.responses import Response

    service = _service(request)
    jpeg = service.image_file(_required(request, "path"))
    return Response(jpeg, media_type="image/jpeg", headers={**_headers(service), "Cache-Control": "private, max-age=60"})


def page(request: "Request") -> "Response":
    from starlette.responses import HTMLResponse

    from imgvec.pages.html import render

    service = _service(request)
    snap = service.current()
    sub = [f"{snap.rows} images in {service.path}; {snap.kind} index; cosine similarity", *snap.notes]
    if not service.images_shown(snap):
        sub.append(f"images are not shown: the store's root {snap.root} is not below {service.images} "
                   "(imgvec serve --images DIR names the folder they may be served from)")
    text = render("serve.html", title="imgvec serve", provenances=[snap.provenance], subtitle=sub,
                  k=service.default_k, max_k=MAX_K, stale=service.stale)
    return HTMLResponse(text, headers=_headers(service, snap))


def script(request: "Request") -> "Response":
    from importlib.resources import files

    from starlette.responses import Response

    return Response((files("imgvec.pages") / "templates" / "serve.js").read_bytes(), media_type="text/javascript")


# -- errors ----------------------------------------------------------------------------------------
_STATUS = [(NotServed, 404), (UnsupportedUpload, 415), (TooCostly, 413), (Busy, 503), (MismatchError, 409),
           (ImgvecError, 400)]


async def imgvec_error(request: "Request", exc: Exception) -> "Response":
    """imgvec's errors as one JSON line: bad input 400, a path not served 404, a mismatch 409, ..."""
    status = next(code for kind, code in _STATUS if isinstance(exc, kind))
    service = getattr(request.app.state, "service", None)
    return _error(status, str(exc), _headers(service) if service else None)


async def http_error(request: "Request", exc: Exception) -> "Response":
    return _error(getattr(exc, "status_code", 500), str(getattr(exc, "detail", exc)))


async def server_error(request: "Request", exc: Exception) -> "Response":
    """A bug: still one JSON line."""
    first = str(exc).splitlines()[0] if str(exc) else ""  # answered outside the middleware: headers added here
    return _error(500, f"internal error: {type(exc).__name__}: {first}", dict(SECURITY_HEADERS))


# -- middleware ------------------------------------------------------------------------------------
class SecurityHeaders:
    """Adds :data:`SECURITY_HEADERS` to every response, errors and refusals included."""

    def __init__(self, app: "ASGIApp") -> None:
        self.app = app

    async def __call__(self, scope: "Scope", receive: "Receive", send: "Send") -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_secured(message: "Message") -> None:
            if message["type"] == "http.response.start":
                from starlette.datastructures import MutableHeaders

                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers[name] = value
            await send(message)

        await self.app(scope, receive, send_secured)


class SameOrigin:
    """Refuses (403) a request that may change or cost something (any method but GET, HEAD, OPTIONS) when a
    browser says it comes from another site: an ``Origin`` other than this service's own (``null``
    included), or ``Sec-Fetch-Site: cross-site``/``same-site``. Clients that are not browsers send neither."""

    SAFE = ("GET", "HEAD", "OPTIONS")

    def __init__(self, app: "ASGIApp") -> None:
        self.app = app

    async def __call__(self, scope: "Scope", receive: "Receive", send: "Send") -> None:
        if scope["type"] == "http" and scope["method"] not in self.SAFE:
            from starlette.datastructures import Headers

            headers = Headers(scope=scope)
            own = f"{scope.get('scheme', 'http')}://{headers.get('host', '')}"
            origin, site = headers.get("origin"), headers.get("sec-fetch-site")
            if (origin is not None and origin != own) or site in ("cross-site", "same-site"):
                response = _error(403, f"cross-origin request refused: {header_value(origin or site or '')} is not "
                                       f"{header_value(own)}; only this service's own page may send it")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(service: Service, allowed_hosts: list[str] | None = None) -> "Starlette":
    """The Starlette app answering for ``service``; ``allowed_hosts``: the Host headers it answers."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware
    from starlette.routing import Route

    routes = [Route("/", page, methods=["GET"]), Route("/serve.js", script, methods=["GET"]),
              Route("/image", image, methods=["GET"]), Route("/api/info", info, methods=["GET"]),
              Route("/api/query", query_get, methods=["GET"]), Route("/api/query", query_post, methods=["POST"]),
              Route("/api/map", map_, methods=["GET"])]
    middleware = [Middleware(SecurityHeaders),
                  *([Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)] if allowed_hosts else []),
                  Middleware(SameOrigin)]
    handlers: dict[Any, Any] = {ImgvecError: imgvec_error, HTTPException: http_error, Exception: server_error}
    app = Starlette(routes=routes, middleware=middleware, exception_handlers=handlers)
    app.state.service = service
    return app
