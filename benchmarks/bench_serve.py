"""``imgvec serve`` under load: latency percentiles and throughput with concurrent clients.

The store is bench_query_scale's (``benchmarks.make_store``: clustered unit rows, paths
``img_0000000.jpg``..., random-weight mobilenetv2 at 224 px, 1280-d) with its HNSW index, both
kept and shared with that benchmark (a 1M-row HNSW index takes most of an hour to build here);
``imgvec serve STORE --index HNSW`` runs as its own process on 127.0.0.1 with the OpenVINO
runtime, and client threads (``http.client``, one keep-alive connection each: the lightest
client the standard library has, so the clients take as little as they can of the two cores the
server needs) send, for a bounded number of requests and time:

- ``GET /api/query?path=...&k=10``: a random stored path each time (the stored vector, no model);
- ``POST /api/query?k=10`` with a 500x375 photo-like JPEG (decode, model, search).

Latency is per request as the client sees it (client threads share the machine with the server:
on a 2-core machine they compete with it for the CPU). Throughput is answered requests per second.

The states users are in (``states`` in the results, 8 clients, each with its load average; ``--no-states``
leaves them out): ``after_index`` (the HNSW index built again with ``imgvec index`` and the server started
at once: the files as their writer left them in the page cache), ``cold`` (the server stopped, store and
index evicted from the page cache, the server started again) and ``warm`` (the main runs above). Each is
measured once the server reports its preload done.

``--hostile`` adds a run under attack (issue 26): 8 clients send GETs while 200 connections stay
open sending nothing and 4 clients post, over and over, the costliest upload the service accepts (a
16-bit grey PNG whose decoding costs most of the memory budget: a small file); GET p99 and the
server's RSS against its stated bound (RSS once loaded and warm + the memory budget).

    python -m benchmarks.bench_serve [--quick] [--rows 100000] [--full (1,000,000 rows)] [--keep] [--hostile]
        [--no-states] [--drop-caches]
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .common import OUT, byte_compiled, load_average, md_table, photo_like, where_measured, write_result

NAME = "serve"
DIM = 1280
CACHE = OUT / "model-cache"  # the benchmarks' own compiled-model cache (shared with bench_query)
TARGETS = {"get_p50_ms": 20.0, "get_p99_ms": 100.0, "post_p50_ms": 60.0}  # issue 20, at 1M rows
STATE_TARGETS = {"rows": 300_000, "get_p50_ms": 20.0, "get_p99_ms": 100.0}  # issue 28, in every state


def _env() -> dict[str, str]:
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "IMGVEC_CACHE_DIR": str(CACHE)}


def make_store(rows: int) -> tuple[Path, Path, list[Path]]:
    """bench_query_scale's store of ``rows`` and its HNSW index (made if missing); the files made now."""
    from .bench_query_scale import built, figures_for, index_for, scale_store, store_for

    store = store_for(rows)
    index = index_for(store, "hnsw")
    made = [path for path in (store, index, figures_for(index)) if not path.exists()]
    scale_store(rows)
    built(store, "hnsw", index, keep=True)
    return store, index, made


def jpeg_500x375() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(photo_like(np.random.default_rng(7), 500, 375)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


class Server:
    """``imgvec serve`` in a child process; its port once it says it is ready, its peak RSS at the end."""

    def __init__(self, store: Path, index: Path, *args: str) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        t = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "imgvec", "serve", str(store), "--index", str(index),
                                      "--port", str(self.port), "--runtime", "openvino", *args], stderr=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, text=True, env=_env())
        line = self.proc.stderr.readline() if self.proc.stderr else ""
        if not line.startswith("imgvec serve: http"):
            self.proc.kill()
            raise RuntimeError(f"imgvec serve did not start: {line}")
        self.start_s = time.perf_counter() - t
        while self.get_json("/api/info")["preloading"] and time.perf_counter() - t < 600:
            time.sleep(0.2)  # the service asks its store and index into memory in the background
        self.preloaded_s = time.perf_counter() - t

    def get_json(self, target: str) -> Any:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request("GET", target)
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()

    def peak_rss_mb(self, field: str = "VmHWM") -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


Request = Callable[[http.client.HTTPConnection, int], int]  # sends request i, returns the status


def load(port: int, request: Request, clients: int, max_requests: int, max_seconds: float,
         warmup: int = 3) -> dict[str, Any]:
    """``clients`` threads, each its own keep-alive connection, send ``request(conn, i)`` until
    ``max_requests`` in all or ``max_seconds``; latency percentiles (ms) and throughput (answered/s)."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    issued = [0]
    deadline = [float("inf")]  # set once every client is ready

    def worker(seed: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            for i in range(warmup):  # connection set up, first-touch costs: not measured
                request(conn, seed * 1_000_003 + i)
            barrier.wait()
            n = 0
            while True:
                with lock:
                    if issued[0] >= max_requests or time.perf_counter() > deadline[0]:
                        return
                    issued[0] += 1
                n += 1
                t = time.perf_counter()
                status = request(conn, seed * 7919 + n)
                dt = time.perf_counter() - t
                with lock:
                    if status == 200:
                        latencies.append(dt)
                    else:
                        errors[0] += 1
        finally:
            conn.close()

    barrier = threading.Barrier(clients + 1)
    threads = [threading.Thread(target=worker, args=(c,)) for c in range(clients)]
    for th in threads:
        th.start()
    barrier.wait()
    start = time.perf_counter()
    deadline[0] = start + max_seconds
    for th in threads:
        th.join()
    wall = time.perf_counter() - start
    ms = np.asarray(latencies) * 1000
    return {"clients": clients, "requests": len(latencies), "errors": errors[0], "seconds": wall,
            "p50_ms": float(np.percentile(ms, 50)) if len(ms) else float("nan"),
            "p90_ms": float(np.percentile(ms, 90)) if len(ms) else float("nan"),
            "p99_ms": float(np.percentile(ms, 99)) if len(ms) else float("nan"),
            "throughput_rps": len(latencies) / wall if wall > 0 else float("nan")}


def stages(store: Path, index: Path, body: bytes, repeats: int = 50) -> dict[str, float]:
    """Where a request's time goes, in this process without HTTP: median ms of each stage of the service."""
    os.environ.update(_env())
    import faiss
    from imgvec.files.images import load_image
    from imgvec.vectors.index import search_store
    from imgvec.service.service import Service

    faiss.omp_set_num_threads(1)  # as imgvec serve runs its searches
    service = Service(store, runtime="openvino", index=index)
    snap = service.current()
    rows = snap.rows

    def ms(fn: Callable[[int], Any]) -> float:
        """Median ms of ``fn`` over ``repeats`` rows, each run once untimed first (pages touched, as in a
        warm service), so no stage is charged for first touches an earlier one would have made."""
        for i in range(repeats):
            fn((i * 2654435761) % rows)
        times = []
        for i in range(repeats):
            t = time.perf_counter()
            fn((i * 2654435761) % rows)
            times.append(time.perf_counter() - t)
        return statistics.median(times) * 1000

    def per_second(fn: Callable[[int], Any], threads: int = 8, seconds: float = 8.0) -> float:
        """Calls of ``fn`` answered per second by ``threads`` threads at once: the service without HTTP,
        what the clients could get at most from this machine."""
        done = [0]
        lock = threading.Lock()
        stop = time.perf_counter() + seconds

        def work(seed: int) -> None:
            n = 0
            while time.perf_counter() < stop:
                fn((seed * 7919 + n) * 2654435761 % rows)
                n += 1
            with lock:
                done[0] += n

        start = time.perf_counter()
        workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return done[0] / (time.perf_counter() - start)

    pixels = load_image("upload", 224, data=io.BytesIO(body))
    batch = np.stack([pixels] * 8)
    out = {"check_store_changed": ms(lambda i: service.current()),
           "read_stored_vector": ms(lambda i: snap.store.embeddings(i, i + 1)),
           "search_k10": ms(lambda i: search_store(snap.store, snap.store.embeddings(i, i + 1), 10, snap.index)),
           "get_without_http": ms(lambda i: service.query_path(f"img_{i:07d}.jpg", 10)),
           "decode_jpeg": ms(lambda i: load_image("upload", 224, data=io.BytesIO(body))),
           "model_1_image": ms(lambda i: service.embedder.embed_arrays(pixels[None])),
           "model_8_images_per_image": ms(lambda i: service.embedder.embed_arrays(batch), ) / 8,
           "post_without_http": ms(lambda i: service.query_image(body, 10)),
           "get_8_threads_per_s": per_second(lambda i: service.query_path(f"img_{i:07d}.jpg", 10)),
           "post_8_threads_per_s": per_second(lambda i: service.query_image(body, 10))}
    service.close()
    return out


def requests_for(rows: int, body: bytes) -> tuple[Request, Request]:
    """GET of a stored path (row chosen from ``i``) and POST of the photo ``body``."""
    def get(conn: http.client.HTTPConnection, i: int) -> int:
        row = (i * 2654435761) % rows
        conn.request("GET", f"/api/query?path=img_{row:07d}.jpg&k=10")
        response = conn.getresponse()
        response.read()
        return response.status

    def post(conn: http.client.HTTPConnection, i: int) -> int:
        conn.request("POST", "/api/query?k=10", body=body, headers={"Content-Type": "image/jpeg"})
        response = conn.getresponse()
        response.read()
        return response.status

    return get, post


def _state_runs(store: Path, index: Path, rows: int, body: bytes, get_requests: int, post_requests: int,
                seconds: float) -> dict[str, Any]:
    """Start a server on the files as they are now and load it with 8 clients once its preload is done."""
    get, post = requests_for(rows, body)
    server = Server(store, index)
    try:
        state = {"server_start_s": server.start_s, "server_preloaded_s": server.preloaded_s,
                 "get": load(server.port, get, 8, get_requests, seconds),
                 "post": load(server.port, post, 8, post_requests, seconds)}
        state["server_peak_rss_mb"] = server.peak_rss_mb()
    finally:
        server.stop()
    return {**state, "load_average": load_average()}


def measure_states(store: Path, index: Path, rows: int, body: bytes, get_requests: int, post_requests: int,
                   seconds: float, drop: bool) -> dict[str, Any]:
    """The after-index and cold states (the warm one is the main runs)."""
    from .bench_query_scale import _build, figures_for, make_cold

    states: dict[str, Any] = {}
    figures_for(index).write_text(json.dumps(_build(store, "hnsw", index)))  # the index written anew, then served
    states["after_index"] = _state_runs(store, index, rows, body, get_requests, post_requests, seconds)
    method = make_cold(drop, store, index)
    states["cold"] = {**_state_runs(store, index, rows, body, get_requests, post_requests, seconds), "method": method}
    return states


def measure(rows: int, clients: tuple[int, ...], get_requests: int, post_requests: int, seconds: float,
            keep: bool, states: bool = True, drop: bool = False, with_hostile: bool = False) -> dict[str, Any]:
    store, index, made = make_store(rows)
    try:
        attacked = hostile(store, index, rows, seconds) if with_hostile else None
        body = jpeg_500x375()
        load_before = load_average()
        state_runs = measure_states(store, index, rows, body, get_requests, post_requests, seconds, drop) if states else {}
        get, post = requests_for(rows, body)
        server = Server(store, index)
        try:
            runs = []
            for n in clients:
                runs.append({"endpoint": "GET /api/query?path=...&k=10",
                             **load(server.port, get, n, get_requests, seconds)})
                runs.append({"endpoint": "POST /api/query?k=10 (500x375 JPEG)",
                             **load(server.port, post, n, post_requests, seconds)})
            info = server.get_json("/api/info")
            rss = server.peak_rss_mb()
        finally:
            server.stop()
        load_after = load_average()
        profile = stages(store, index, body)
    finally:
        if not keep:
            for path in made:
                path.unlink(missing_ok=True)
    return {"rows": rows, "dim": DIM, "stages_ms": profile, "index_kind": info["index"]["kind"],
            "runtime": info["runtime"],
            "backbone": f"{info['provenance']['backbone']} @ {info['provenance']['input_size']}px, random weights",
            "jpeg_bytes": len(body), "server_start_s": server.start_s, "server_preloaded_s": server.preloaded_s, "server_peak_rss_mb": rss,
            "load_average_before": load_before, "load_average_after": load_after, "runs": runs,
            "states": {**state_runs, **({"warm": {"get": next(r for r in runs if r["clients"] == 8 and
                                                                   r["endpoint"].startswith("GET")),
                                                  "post": next(r for r in runs if r["clients"] == 8 and
                                                                    r["endpoint"].startswith("POST")),
                                                  "load_average": load_after}} if 8 in clients else {})},
            **({"hostile": attacked} if attacked else {})}


HOSTILE_BUDGET_MB = 256  # the service's --memory-budget in the hostile run


def costliest_upload(budget: int, image_size: int) -> bytes:
    """The 16-bit grey PNG (a gradient: a small file) whose decoding costs the most under ``budget``
    bytes with the upload's own share (twice its body) beside it: the most one request can take."""
    from PIL import Image

    from imgvec.files.images import decode_cost

    def png(side: int) -> bytes:
        buf = io.BytesIO()
        Image.fromarray((np.arange(side * side, dtype=np.uint32).reshape(side, side) % 65535).astype(np.uint16)
                        ).save(buf, "PNG")
        return buf.getvalue()

    def cost(side: int) -> int:
        data = png(side)
        with Image.open(io.BytesIO(data)) as im:
            return decode_cost(im, image_size, len(data)) + 2 * len(data)

    low, high = 64, 16384
    while high - low > 16:  # the cost grows with the side
        mid = (low + high) // 2
        low, high = (mid, high) if cost(mid) <= budget else (low, mid)
    return png(low)


def hostile(store: Path, index: Path, rows: int, seconds: float, idle: int = 200, uploaders: int = 4,
            clients: int = 8) -> dict[str, Any]:
    """GET latency and server RSS while ``idle`` connections send nothing and ``uploaders`` clients keep
    posting the costliest upload, against a service with a memory budget of HOSTILE_BUDGET_MB."""
    import socket

    budget = HOSTILE_BUDGET_MB << 20
    server = Server(store, index, "--memory-budget", str(HOSTILE_BUDGET_MB))
    try:
        size = server.get_json("/api/info")["provenance"]["input_size"]
        heavy = costliest_upload(budget, size)
        warm = jpeg_500x375()
        for _ in range(3):  # the model warm at a few batch sizes, as in the normal runs
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
            conn.request("POST", "/api/query?k=10", body=warm, headers={"Content-Type": "image/jpeg"})
            conn.getresponse().read()
            conn.close()
        loaded_mb = server.peak_rss_mb()
        loaded = {f: server.peak_rss_mb(f) for f in ("RssAnon", "RssFile")}
        stop = threading.Event()
        reconnects = [0]
        peaks = dict(loaded)

        def sample() -> None:
            """The server's private (RssAnon) and mapped-file (RssFile) memory every 20 ms: VmHWM counts both,
            and the index pages its searches map are page cache the kernel can drop, not the budget's."""
            while not stop.wait(0.02):
                for f in peaks:
                    peaks[f] = max(peaks[f], server.peak_rss_mb(f))

        def hold_idle() -> None:
            """``idle`` connections that send nothing, each opened again as soon as the server closes it."""
            import selectors

            sel = selectors.DefaultSelector()
            for _ in range(idle):
                sel.register(socket.create_connection(("127.0.0.1", server.port), timeout=60), selectors.EVENT_READ)
            try:
                while not stop.is_set():
                    for key, _ in sel.select(timeout=0.2):
                        sel.unregister(key.fileobj)
                        key.fileobj.close()  # closed by the server (header timeout): open another
                        sel.register(socket.create_connection(("127.0.0.1", server.port), timeout=60),
                                     selectors.EVENT_READ)
                        reconnects[0] += 1
            finally:
                for key in list(sel.get_map().values()):
                    key.fileobj.close()

        idler = threading.Thread(target=hold_idle)
        idler.start()
        sampler = threading.Thread(target=sample)
        sampler.start()
        upload_status: dict[int, int] = {}
        lock = threading.Lock()

        def upload() -> None:
            while not stop.is_set():
                conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
                try:
                    conn.request("POST", "/api/query?k=10", body=heavy, headers={"Content-Type": "image/png"})
                    status = conn.getresponse().status
                except OSError:
                    status = 0  # closed by the server
                finally:
                    conn.close()
                with lock:
                    upload_status[status] = upload_status.get(status, 0) + 1

        uploading = [threading.Thread(target=upload) for _ in range(uploaders)]
        for th in uploading:
            th.start()

        def get(conn: http.client.HTTPConnection, i: int) -> int:
            conn.request("GET", f"/api/query?path=img_{(i * 2654435761) % rows:07d}.jpg&k=10")
            response = conn.getresponse()
            response.read()
            return response.status

        try:
            run = load(server.port, get, clients, 10**9, seconds)
        finally:
            stop.set()
            for th in [*uploading, idler, sampler]:
                th.join()
        peak_mb = server.peak_rss_mb()
    finally:
        server.stop()
    return {"endpoint": "GET /api/query?path=...&k=10", **run, "idle_connections": idle,
            "idle_reopened": reconnects[0], "uploaders": uploaders,
            "upload_pixels": _png_pixels(heavy), "upload_bytes": len(heavy), "upload_status": upload_status,
            "memory_budget_mb": HOSTILE_BUDGET_MB, "loaded_rss_mb": loaded_mb, "peak_rss_mb": peak_mb,
            "rss_bound_mb": loaded_mb + HOSTILE_BUDGET_MB, "rss_within_bound": peak_mb <= loaded_mb + HOSTILE_BUDGET_MB,
            # the stated bound (docs/reliability.md): private memory <= loaded + budget; mapped file pages <= what was
            # mapped once loaded + the index file (its pages the searches touch, shared page cache)
            "loaded_anon_mb": loaded["RssAnon"], "peak_anon_mb": peaks["RssAnon"],
            "anon_bound_mb": loaded["RssAnon"] + HOSTILE_BUDGET_MB,
            "anon_within_bound": peaks["RssAnon"] <= loaded["RssAnon"] + HOSTILE_BUDGET_MB,
            "loaded_file_mb": loaded["RssFile"], "peak_file_mb": peaks["RssFile"],
            "index_file_mb": index.stat().st_size / 2**20,
            "file_within_bound": peaks["RssFile"] <= loaded["RssFile"] + index.stat().st_size / 2**20}


def _memory_verdict(h: dict[str, Any]) -> str:
    """The hostile run's memory against the stated bound: private memory (sampled every 20 ms) within what the
    service held once loaded + the budget, mapped file pages within those mapped then + the index file."""
    if "peak_anon_mb" not in h:  # a result from before the two were told apart: the whole RSS against one bound
        return (f"server RSS {h['peak_rss_mb']:,.0f} MB at its peak against the bound {h['rss_bound_mb']:,.0f} MB "
                f"(loaded {h['loaded_rss_mb']:,.0f} + budget): {'within' if h['rss_within_bound'] else '**over**'}.")
    ok = h["anon_within_bound"] and h["file_within_bound"]
    return (f"server private memory (RssAnon) {h['peak_anon_mb']:,.0f} MB at its peak against {h['anon_bound_mb']:,.0f} "
            f"MB (loaded {h['loaded_anon_mb']:,.0f} + budget); mapped file pages (RssFile: libraries, model, the index "
            f"pages searches touched, shared page cache) {h['peak_file_mb']:,.0f} MB against "
            f"{h['loaded_file_mb'] + h['index_file_mb']:,.0f} MB (loaded {h['loaded_file_mb']:,.0f} + the "
            f"{h['index_file_mb']:,.0f} MB index file); whole RSS (VmHWM) {h['peak_rss_mb']:,.0f} MB: "
            f"{'within the stated bound' if ok else '**over the stated bound**'}.")


def _png_pixels(data: bytes) -> int:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return im.size[0] * im.size[1]


def markdown(data: dict[str, Any]) -> str:
    out = []
    for m in data["measurements"]:
        out.append(f"`imgvec serve` on a {m['rows']:,} x {m['dim']} generated store, {m['index_kind']} index, "
                   f"{m['backbone']} on {m['runtime']}; the server ready {m['server_start_s']:.1f} s after start "
                   f"(its preload done by {m.get('server_preloaded_s', float('nan')):.1f} s), "
                   f"peak RSS {m['server_peak_rss_mb']:,.0f} MB. Client threads (`http.client`) on the same "
                   f"machine; load average {m.get('load_average_before', data['load_average'])[0]:.1f} "
                   f"before, {m.get('load_average_after', data['load_average_end'])[0]:.1f} after"
                   + (f"; measured on {m['machine']} ({m['date']})" if "machine" in m else "") + ".\n\n")
        out.append(md_table(["request", "clients", "answered", "p50 ms", "p90 ms", "p99 ms", "requests/s"],
                            [(r["endpoint"], r["clients"], r["requests"], r["p50_ms"], r["p90_ms"], r["p99_ms"],
                              r["throughput_rps"]) for r in m["runs"]]))
        if "stages_ms" in m:
            st = m["stages_ms"]
            out.append(f"\nWhere the time goes (one request at a time, in-process, no HTTP; median ms): "
                       f"GET {st['get_without_http']:.1f} (search {st['search_k10']:.1f}, stored vector "
                       f"{st['read_stored_vector']:.2f}, store-changed check {st['check_store_changed']:.3f}); "
                       f"POST {st['post_without_http']:.1f} (JPEG decode {st['decode_jpeg']:.1f}, model "
                       f"{st['model_1_image']:.1f} for one image, {st['model_8_images_per_image']:.1f} per image "
                       f"in a batch of 8). With 8 clients a request mostly waits for the CPU: p50 is about "
                       f"8 / throughput.")
            if "post_8_threads_per_s" in st:
                out.append(f" Without HTTP or clients, 8 threads calling the service directly get "
                           f"{st['get_8_threads_per_s']:.0f} GETs/s and {st['post_8_threads_per_s']:.0f} POSTs/s "
                           f"from this machine: the most 8 clients could have, so a POST p50 no lower than "
                           f"about {8000 / st['post_8_threads_per_s']:.0f} ms here.")
            out.append("\n")
        if m.get("states"):
            out.append("\nThe states users are in, 8 clients, once the server reported its preload done:\n\n")
            out.append(md_table(["state", "preload done s", "GET p50 ms", "GET p99 ms", "POST p50 ms", "POST p99 ms",
                                 "load avg"],
                                [(name, st.get("server_preloaded_s", float("nan")), st["get"]["p50_ms"],
                                  st["get"]["p99_ms"], st["post"]["p50_ms"], st["post"]["p99_ms"],
                                  st["load_average"][0]) for name, st in m["states"].items()]))
            said = [f"{name} GET p50 {st['get']['p50_ms']:.1f} / p99 {st['get']['p99_ms']:.1f} ms"
                    + (": met" if st["get"]["p50_ms"] <= STATE_TARGETS["get_p50_ms"]
                       and st["get"]["p99_ms"] <= STATE_TARGETS["get_p99_ms"] else ": **not met**")
                    for name, st in m["states"].items()]
            if m["rows"] == STATE_TARGETS["rows"]:
                out.append(f"\nTargets at {STATE_TARGETS['rows']:,} rows HNSW, 8 clients, each state (GET p50 <= "
                           f"{STATE_TARGETS['get_p50_ms']:g} ms, p99 <= {STATE_TARGETS['get_p99_ms']:g} ms): "
                           + "; ".join(said) + ".\n")
        eight = {r["endpoint"].split()[0]: r for r in m["runs"] if r["clients"] == 8}
        if "hostile" in m:
            h = m["hostile"]
            out.append(f"\nUnder attack ({h['idle_connections']} idle connections, {h['uploaders']} clients posting a "
                       f"{h['upload_pixels']:,}-pixel 16-bit PNG of {h['upload_bytes']:,} bytes over and over, memory "
                       f"budget {h['memory_budget_mb']} MB): {h['clients']} GET clients, p50 {h['p50_ms']:.1f} ms, "
                       f"p99 {h['p99_ms']:.1f} ms (<= {TARGETS['get_p99_ms']:g}: "
                       f"{'met' if h['p99_ms'] <= TARGETS['get_p99_ms'] else '**not met**'}), {h['errors']} errors; "
                       f"uploads answered {h['upload_status']}; " + _memory_verdict(h) + "\n")
        if m["rows"] >= 1_000_000 and eight:
            g, p = eight["GET"], eight["POST"]
            verdicts = [f"{what} {got:.1f} ms (<= {limit:g}): {'met' if got <= limit else '**not met**'}"
                        for what, got, limit in (("GET p50", g["p50_ms"], TARGETS["get_p50_ms"]),
                                                 ("GET p99", g["p99_ms"], TARGETS["get_p99_ms"]),
                                                 ("POST p50", p["p50_ms"], TARGETS["post_p50_ms"]))]
            out.append(f"\nTargets at 1M rows, 8 clients: {'; '.join(verdicts)}.\n")
        out.append("\n")
    return "".join(out)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10,000 rows, fewer requests")
    ap.add_argument("--full", action="store_true", help="also 1,000,000 rows (a 5 GB store)")
    ap.add_argument("--rows", type=int, nargs="*", default=None,
                    help="these store sizes instead (their results replace those sizes' earlier ones)")
    ap.add_argument("--seconds", type=float, default=None, help="at most this long per load run")
    ap.add_argument("--hostile", action="store_true",
                    help="also a run under attack: idle connections and the costliest uploads beside the GET clients")
    ap.add_argument("--keep", action="store_true",
                    help="keep the stores and indexes this run makes (bench_query_scale --keep reuses them)")
    ap.add_argument("--no-states", action="store_true", help="leave out the after-index and cold states")
    ap.add_argument("--drop-caches", action="store_true",
                    help="cold state: drop the whole page cache (root; disturbs a shared machine)")
    args = ap.parse_args(argv)
    byte_compiled()  # processes timed from their start read imgvec compiled, as after pip install
    sizes = args.rows or ([10_000] if args.quick else [100_000] + ([1_000_000] if args.full else []))
    seconds = args.seconds or (10.0 if args.quick else 30.0)
    name = NAME + ("-quick" if args.quick else "")
    load_start = load_average()
    measurements = [measure(rows, (1, 8), 300 if args.quick else 2000, 60 if args.quick else 400, seconds, args.keep,
                            not args.no_states, args.drop_caches, args.hostile) for rows in sizes]
    if args.rows:
        from .common import RESULTS

        previous = RESULTS / f"{name}.json"
        before = json.loads(previous.read_text()) if previous.exists() else {}
        earlier = before.get("measurements", [])
        where_measured(earlier, before, measurements)
        measurements = sorted([m for m in earlier if m["rows"] not in sizes] + measurements, key=lambda m: m["rows"])
    data = {"quick": args.quick, "load_average": load_start, "load_average_end": load_average(),
            "measurements": measurements}
    print(f"wrote {write_result(name, data)}", file=sys.stderr)
    print(markdown(data))
    return data


if __name__ == "__main__":
    main()
