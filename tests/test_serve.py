"""imgvec serve: the JSON API, the page, the image route's refusals, a store changing underneath,
concurrency around the model, the command itself, and one real browser driving the page."""

from __future__ import annotations

import concurrent.futures
import functools
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from PIL import Image

import imgvec
from imgvec.pages.html import PALETTE
from imgvec.service import app as serve_app, server
from page_cache import resident_fraction
from imgvec.service.service import Service

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:starlette.*",
                                        "ignore:Using `httpx`:DeprecationWarning")
TestClient = pytest.importorskip("starlette.testclient").TestClient
PNG = {"Content-Type": "image/png"}  # an upload as the page and curl send it: an image content type
CHROMIUM = "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else shutil.which("chromium")


def _client(service: Service, **kwargs) -> TestClient:
    return TestClient(serve_app.create_app(service, **kwargs))


def _cli_record(store: Path, image: Path, k: int) -> dict:
    """What `imgvec query --format json` prints for ``image``: the record the API must give."""
    out = subprocess.run([sys.executable, "-m", "imgvec", "query", str(store), str(image), "-k", str(k),
                          "--format", "json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _same_record(got: dict, want: dict) -> None:
    """The same record: every field equal, scores to float32 rounding (stored vs re-embedded vectors)."""
    assert set(got) == set(want) and len(got["queries"]) == len(want["queries"]) == 1
    assert {k: v for k, v in got.items() if k != "queries"} == {k: v for k, v in want.items() if k != "queries"}
    g, w = got["queries"][0], want["queries"][0]
    assert set(g) == set(w) == {"query", "results"}
    assert [(r["rank"], r["path"], r["label"]) for r in g["results"]] == [
        (r["rank"], r["path"], r["label"]) for r in w["results"]]
    np.testing.assert_allclose([r["score"] for r in g["results"]], [r["score"] for r in w["results"]], atol=1e-4)


def _hits(response) -> list[dict]:
    """The neighbours in an answer, their paths relative to the store's root (as the store names them)."""
    record = response.json()
    return [{**n, "path": os.path.relpath(n["path"], record["root"])} for n in record["queries"][0]["results"]]


@pytest.fixture(scope="module")
def served(tmp_path_factory, image_dir: Path, small) -> dict:
    """A store of the test images (with a link out of its root, and one file turned into a FIFO after
    embedding), and a service over it. Tests must not change the store."""
    root = tmp_path_factory.mktemp("serve")
    folder = root / "photos"
    shutil.copytree(image_dir, folder)
    outside = root / "outside.png"
    shutil.copy(image_dir / "reds" / "reds_001.png", outside)
    (folder / "reds" / "link_out.png").symlink_to(outside)
    shutil.copy(image_dir / "greens" / "greens_000.png", folder / "greens" / "becomes_fifo.png")
    store = root / "photos.h5"
    imgvec.embed([folder], store, **small)
    (folder / "greens" / "becomes_fifo.png").unlink()
    os.mkfifo(folder / "greens" / "becomes_fifo.png")
    service = Service(store)
    return dict(root=root, folder=folder, store=store, service=service, client=_client(service))


# -- the API ----------------------------------------------------------------------------------
def test_info_says_what_is_served(served):
    info = served["client"].get("/api/info").json()
    assert info["rows"] == 26 and info["generation"] == 0 and info["dim"] == 576
    assert info["index"] == {"kind": "flat", "file": None, "rows": 26, "unindexed": 0} and info["notes"] == []
    assert info["provenance"]["backbone"] == "mobilenetv3small" and info["provenance"]["weights"] == "random"
    assert info["runtime"] == "openvino" and info["stale"] is None and info["default_k"] == 10


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="needs posix_fadvise")
def test_the_store_and_its_index_are_read_into_memory_when_served(tmp_path):
    """A service answers from all over the index and the store: both files are read into the page
    cache at load, in the background, and /api/info says when they are there (not when they were asked for)."""
    from imgvec.files.provenance import Provenance
    from imgvec.vectors.store import create_store

    store = tmp_path / "big.h5"  # big enough that opening it and its index reads only a small part
    rows = np.random.default_rng(0).standard_normal((30_000, 576)).astype(np.float32)
    prov = Provenance("mobilenetv3small", "random", 0, None, None, 64, "in model", 576)
    with create_store(store, prov, str(tmp_path)) as writer:
        writer.append(rows, [f"img_{i:05d}.jpg" for i in range(len(rows))], [""] * len(rows))
    index_file = imgvec.build_index(store, kind="flat").path
    for path in (store, index_file):
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    assert resident_fraction(store) < 0.5 and resident_fraction(index_file) < 0.5
    service = Service(store)
    assert service.preloaded.wait(30)
    assert _client(service).get("/api/info").json()["preloading"] is False
    assert resident_fraction(store) > 0.9 and resident_fraction(index_file) > 0.9
    service._preload([store, index_file])  # asked again (a reload), then closed while it may still run
    snap = service.snapshot
    service.close()
    assert not [t for t in threading.enumerate() if t.name == "imgvec-preload"]
    assert not snap.store.h5  # closed


def test_query_by_stored_path_is_the_cli_record(served):
    want = _cli_record(served["store"], served["folder"] / "blues" / "blues_002.png", 5)
    for path in ("blues/blues_002.png", f"{served['folder']}/blues/blues_002.png"):  # as stored, or under the root
        r = served["client"].get("/api/query", params={"path": path, "k": 5})
        assert r.status_code == 200, r.text
        _same_record(r.json(), want)  # the query too: the image's path, absolute
        assert _hits(r)[0]["path"] == "blues/blues_002.png" and _hits(r)[0]["score"] > 0.999
        assert r.headers["X-Imgvec-Generation"] == "0" and r.headers["X-Imgvec-Rows"] == "26"


def test_query_by_uploaded_image_is_the_cli_record(served, holdout_dir: Path):
    image = holdout_dir / "yellows" / "yellows_001.png"
    r = served["client"].post("/api/query", headers=PNG, params={"k": 4, "name": "mine.png"}, content=image.read_bytes())
    assert r.status_code == 200, r.text
    want = _cli_record(served["store"], image, 4)
    assert r.json()["queries"][0]["query"] == "mine.png"
    want["queries"][0]["query"] = "mine.png"  # an upload has only the name it was sent with
    _same_record(r.json(), want)
    assert _hits(r)[0]["label"] == "yellows"


def test_default_k_and_k_above_the_rows(served):
    client = served["client"]
    assert len(_hits(client.get("/api/query", params={"path": "reds/reds_000.png"}))) == 10
    assert len(_hits(client.get("/api/query", params={"path": "reds/reds_000.png", "k": 500}))) == 26


@pytest.mark.parametrize("request_, status, message", [
    (("get", "/api/query", {"path": "reds/nope.png"}), 404, "reds/nope.png: not an image of the store"),
    (("get", "/api/query", {"path": "reds/reds_000.png", "k": 0}), 400, "k must be between 1 and 1000, not 0"),
    (("get", "/api/query", {"path": "reds/reds_000.png", "k": 1001}), 400, "k must be between 1 and 1000, not 1001"),
    (("get", "/api/query", {"path": "reds/reds_000.png", "k": "ten"}), 400, "k must be a whole number, not 'ten'"),
    (("get", "/api/query", {}), 400, "path is required"),
    (("get", "/image", {}), 400, "path is required"),
    (("delete", "/api/query", {}), 405, "Method Not Allowed"),
    (("post", "/api/info", {}), 405, "Method Not Allowed"),
    (("put", "/image", {"path": "reds/reds_000.png"}), 405, "Method Not Allowed"),
    (("get", "/api/nothing", {}), 404, "Not Found"),
])
def test_errors_are_one_json_line_with_a_4xx(served, request_, status, message):
    method, url, params = request_
    r = served["client"].request(method, url, params=params)
    assert r.status_code == status
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {"error": r.json()["error"]} and r.json()["error"].startswith(message)
    assert "\n" not in r.json()["error"]


def test_an_unexpected_failure_is_still_one_json_line(served, monkeypatch):
    client = TestClient(serve_app.create_app(served["service"]), raise_server_exceptions=False)

    def broken(*args):
        raise RuntimeError("faiss fell over\nwith a second line")

    monkeypatch.setattr("imgvec.vectors.index.search_store", broken)  # the search, as the service makes it
    r = client.get("/api/query", params={"path": "reds/reds_000.png"})
    assert r.status_code == 500 and r.json() == {"error": "internal error: RuntimeError: faiss fell over"}


def test_uploads_that_are_not_images_are_refused(served, tmp_path):
    client = served["client"]
    for body, why in ((b"", "the request has no image"),
                      (b"hello, not an image" * 100, "upload: not a recognised image"),
                      ((served["folder"] / "reds" / "reds_000.png").read_bytes()[:300], "upload: cannot decode")):
        r = client.post("/api/query", headers=PNG, content=body)
        assert r.status_code == 400 and r.json()["error"].startswith(why), r.text


def test_body_and_pixel_limits(served, image_dir: Path):
    small = Service(served["store"], max_body=20_000, max_pixels=64 * 64)
    client = _client(small)
    big = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 80, 3), np.uint8)).save(big, "PNG")
    assert len(big.getvalue()) > 18_000
    r = client.post("/api/query", headers=PNG, content=big.getvalue() + b"\0" * 2000)
    assert r.status_code == 413 and r.json()["error"] == "the image is over the limit of 20000 bytes"
    # without a Content-Length (chunked), counted as it arrives
    r = client.post("/api/query", headers=PNG, content=iter([big.getvalue(), b"\0" * 2000]))
    assert r.status_code == 413 and "over the limit of 20000 bytes" in r.json()["error"]
    r = client.post("/api/query", headers=PNG, content=big.getvalue())  # under the byte limit, over the pixel limit
    assert r.status_code == 400 and "80x80 pixels is over the limit of 4096" in r.json()["error"]
    ok = client.post("/api/query", headers=PNG, content=(image_dir / "reds" / "reds_002.png").read_bytes())  # 64x64: allowed
    assert ok.status_code == 200 and _hits(ok)[0]["path"] == "reds/reds_002.png"


# -- images: rows of the store, and nothing else -------------------------------------------------
def test_image_of_a_row_is_a_thumbnail(served):
    r = served["client"].get("/image", params={"path": "blues/blues_003.png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    im = Image.open(io.BytesIO(r.content))
    assert im.format == "JPEG" and im.size == (64, 64)
    original = np.asarray(Image.open(served["folder"] / "blues" / "blues_003.png").convert("RGB"), float)
    assert np.abs(np.asarray(im, float) - original).mean() < 12  # the same picture, re-encoded


@pytest.mark.parametrize("path, status, message", [
    ("../outside.png", 404, "not an image of the store"),
    ("reds/../reds/reds_000.png", 404, "not an image of the store"),  # names a row, but not as stored: no normalising
    ("/etc/passwd", 404, "not an image of the store"),
    ("..%2Foutside.png", 404, "not an image of the store"),  # an encoded slash, sent encoded once more
    ("reds%2Freds_000.png", 404, "not an image of the store"),
    ("photos.h5", 404, "not an image of the store"),
    ("reds/link_out.png", 404, "links outside the store's root"),
    ("greens/becomes_fifo.png", 404, "a FIFO (named pipe), not a regular file"),
])
def test_image_refuses_anything_but_a_row_under_the_root(served, path, status, message):
    r = served["client"].get("/image", params={"path": path})
    assert r.status_code == status and message in r.json()["error"], r.text
    assert r.headers["content-type"] == "application/json"


def test_image_refuses_raw_traversal_in_the_url(served):
    client, root = served["client"], served["root"]
    for url in ("/image?path=..%2Foutside.png", "/image?path=%2e%2e/outside.png", f"/image?path={root}/outside.png",
                "/image?path=reds%2F..%2F..%2Foutside.png", "/image/../outside.png"):
        r = client.get(url)
        assert r.status_code == 404 and r.headers["content-type"] == "application/json", url
    assert client.get(f"/image?path={served['folder']}/reds%2Freds_000.png").status_code == 200  # a row, absolute form


def test_a_link_out_is_still_a_row_to_search_from(served):
    r = served["client"].get("/api/query", params={"path": "reds/link_out.png", "k": 2})
    assert r.status_code == 200  # the same picture as reds_001.png: both at the top
    assert {n["path"] for n in _hits(r)} == {"reds/link_out.png", "reds/reds_001.png"}


# -- the page ----------------------------------------------------------------------------------
def test_page_has_the_banner_provenance_and_a_script_of_its_own(served):
    client = served["client"]
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    text = r.text
    assert "RANDOM WEIGHTS" in text and "mobilenetv3small" in text and "64px" in text and "26 images" in text
    assert '<script src="/serve.js" defer></script>' in text and 'id="file"' in text and 'data-k="10"' in text
    assert "script-src 'self'" in r.headers["content-security-policy"]
    js = client.get("/serve.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert "innerHTML" not in js.text and "/api/query" in js.text


def test_only_this_machines_host_names_are_answered(served):
    client = _client(served["service"], allowed_hosts=server.allowed_hosts_for("127.0.0.1"))
    assert client.get("/api/info", headers={"Host": "127.0.0.1:8000"}).status_code == 200
    assert client.get("/api/info", headers={"Host": "localhost:8000"}).status_code == 200
    assert client.get("/api/info", headers={"Host": "evil.example:8000"}).status_code == 400  # DNS rebinding
    assert server.allowed_hosts_for("0.0.0.0") is None


# -- the store changing underneath ---------------------------------------------------------------
def test_new_rows_are_served_once_embed_publishes_them(tmp_path, image_dir: Path, holdout_dir: Path, small):
    folder = tmp_path / "photos"
    shutil.copytree(image_dir, folder)
    store = tmp_path / "photos.h5"
    imgvec.embed([folder], store, **small)
    service = Service(store)
    client = _client(service)
    assert client.get("/api/query", params={"path": "greens/new.png"}).status_code == 404
    new = holdout_dir / "greens" / "greens_002.png"
    shutil.copy(new, folder / "greens" / "new.png")
    imgvec.embed([folder], store, **small)  # while the service is loaded
    r = client.get("/api/query", params={"path": "greens/new.png", "k": 3})
    assert r.status_code == 200 and _hits(r)[0]["path"] == "greens/new.png"
    assert r.headers["X-Imgvec-Rows"] == "25"
    r = client.post("/api/query", headers=PNG, params={"k": 1}, content=new.read_bytes())
    assert _hits(r) == [{"rank": 1, "path": "greens/new.png", "score": pytest.approx(1, abs=1e-4),
                                    "label": "greens"}]
    assert client.get("/api/info").json()["rows"] == 25


def test_an_index_file_is_searched_as_query_searches_it_or_the_service_says_it_is_stale(
        tmp_path, image_dir: Path, holdout_dir: Path, small):
    """Rows embedded after the index are searched exhaustively beside it, an index from before rows were
    removed is not used (every row searched), as `imgvec query` does and says; an index that cannot be
    read leaves the service answering from what it had, saying so."""
    folder = tmp_path / "photos"
    shutil.copytree(image_dir, folder)
    store = tmp_path / "photos.h5"
    imgvec.embed([folder], store, **small)
    imgvec.build_index(store, kind="flat")
    index_file = store.with_name("photos.index.h5")
    before = index_file.read_bytes()
    client = _client(Service(store))
    shutil.copy(holdout_dir / "blues" / "blues_000.png", folder / "blues" / "added.png")
    imgvec.embed([folder], store, **small)
    r = client.get("/api/query", params={"path": "blues/added.png", "k": 1})
    assert r.status_code == 200 and _hits(r)[0]["path"] == "blues/added.png"
    assert "1 of 25 rows" in r.headers["X-Imgvec-Notes"] and "not indexed yet" in r.headers["X-Imgvec-Notes"]
    info = client.get("/api/info").json()
    assert info["index"] == {"kind": "flat", "file": str(index_file), "rows": 24, "unindexed": 1}
    assert info["notes"] == imgvec.query(store, [holdout_dir / "blues" / "blues_000.png"], k=1).notes
    assert index_file.read_bytes() == before, "the service never writes the index file"

    (folder / "reds" / "reds_000.png").unlink()
    imgvec.embed([folder], store, sync=True, **small)  # rows removed: the index no longer names the same rows
    r = client.get("/api/query", params={"path": "reds/reds_001.png", "k": 30})
    assert r.status_code == 200 and "X-Imgvec-Stale" not in r.headers and r.headers["X-Imgvec-Generation"] == "1"
    assert "reds/reds_000.png" not in [n["path"] for n in _hits(r)] and len(_hits(r)) == 24  # every row
    assert "predates rows removed" in r.headers["X-Imgvec-Notes"]
    out = subprocess.run([sys.executable, "-m", "imgvec", "query", str(store), str(folder / "reds" / "reds_001.png"),
                          "-k", "30", "--format", "json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "predates rows removed" in out.stderr, out.stderr
    _same_record(r.json(), json.loads(out.stdout))  # the very answer imgvec query gives
    info = client.get("/api/info").json()
    assert info["index"] == {"kind": "flat", "file": None, "rows": 24, "unindexed": 0} and info["stale"] is None
    assert "predates rows removed" in info["notes"][0] and "predates rows removed" in client.get("/").text

    index_file.write_bytes(b"not an index")  # an index that cannot be read: the last good state is served
    r = client.get("/api/query", params={"path": "reds/reds_001.png", "k": 30})
    assert r.status_code == 200
    assert "answers come from it as it was when loaded: generation 1, 24 rows" in r.headers["X-Imgvec-Stale"]
    info = client.get("/api/info").json()
    assert info["stale"].startswith(f"{store} changed on disk but cannot be served") and info["rows"] == 24
    assert "STALE" in client.get("/").text

    imgvec.build_index(store, kind="flat", rebuild=True)  # the index catches up: used again, nothing to say
    r = client.get("/api/query", params={"path": "reds/reds_001.png", "k": 30})
    assert "X-Imgvec-Stale" not in r.headers and "X-Imgvec-Notes" not in r.headers
    assert len(_hits(r)) == 24 and "reds/reds_000.png" not in [n["path"] for n in _hits(r)]
    info = client.get("/api/info").json()
    assert info["stale"] is None and info["notes"] == [] and info["index"]["file"] == str(index_file)


def test_an_index_named_with_index_is_the_one_searched(tmp_path, image_dir: Path, small):
    """--index FILE: that file is searched (and watched), as `imgvec query --index` does; a named file
    that does not exist is one line, not a silent exhaustive search."""
    folder = tmp_path / "photos"
    shutil.copytree(image_dir, folder)
    store = tmp_path / "photos.h5"
    imgvec.embed([folder], store, **small)
    elsewhere = tmp_path / "indexes" / "photos.hnsw.h5"
    elsewhere.parent.mkdir()
    imgvec.build_index(store, kind="hnsw", output=elsewhere)
    assert not store.with_name("photos.index.h5").exists()
    client = _client(Service(store, index=elsewhere))
    info = client.get("/api/info").json()
    assert info["index"] == {"kind": "hnsw", "file": str(elsewhere), "rows": 24, "unindexed": 0}
    r = client.get("/api/query", params={"path": "reds/reds_001.png", "k": 3})
    assert r.status_code == 200 and _hits(r)[0]["path"] == "reds/reds_001.png"
    with pytest.raises(imgvec.BadInputError, match="no such index"):
        Service(store, index=tmp_path / "missing.index.h5")
    out = _imgvec("serve", str(store), "--index", str(tmp_path / "missing.index.h5"))
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "missing.index.h5: no such index" in out.stderr


# -- concurrency ---------------------------------------------------------------------------------
def test_the_model_runs_one_batch_at_a_time_while_searches_go_on(served, image_dir: Path):
    service = served["service"]
    engine = service.embedder.engine_
    inside, most, calls, gate = [0], [0], [], threading.Event()
    lock = threading.Lock()

    def slow_engine(pixels):
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
            calls.append(len(pixels))
        gate.wait(20)  # held until the searches below have been answered
        try:
            return engine(pixels)
        finally:
            with lock:
                inside[0] -= 1

    slow_engine.model_batch = engine.model_batch  # type: ignore[attr-defined]
    service.embedder.engine_ = slow_engine
    client = served["client"]
    bodies = [(image_dir / cls / f"{cls}_002.png").read_bytes() for cls in ("blues", "reds", "greens", "yellows")]
    posts: dict = {}

    def post(i: int) -> None:
        posts[i] = client.post("/api/query", headers=PNG, params={"k": 2}, content=bodies[i])

    try:
        first = threading.Thread(target=post, args=(0,))
        first.start()
        _wait_for(lambda: inside[0] == 1)
        rest = [threading.Thread(target=post, args=(i,)) for i in (1, 2, 3)]
        for t in rest:
            t.start()
        _wait_for(lambda: service.model.queue.qsize() == 3)  # decoded, waiting for the model
        gets = [client.get("/api/query", params={"path": "reds/reds_000.png", "k": 3}) for _ in range(5)]
        assert inside[0] == 1 and not posts, "the searches were answered while the model was busy"
        gate.set()
        for t in [first, *rest]:
            t.join(60)
    finally:
        gate.set()
        service.embedder.engine_ = engine
    assert all(g.status_code == 200 for g in gets)
    assert [_hits(posts[i])[0]["path"] for i in range(4)] == [
        "blues/blues_002.png", "reds/reds_002.png", "greens/greens_002.png", "yellows/yellows_002.png"]
    assert most[0] == 1, "two batches ran through the model at once"
    assert calls == [1, 3], "the three uploads that waited went through the model as one batch"


def _wait_for(condition, seconds: float = 30) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


# -- the map -------------------------------------------------------------------------------------
def _map(client: TestClient) -> dict:
    """GET /api/map until it is made (202 meanwhile); the record."""
    answers = []
    _wait_for(lambda: answers.append(client.get("/api/map")) or answers[-1].status_code != 202, 300)
    r = answers[-1]
    assert r.status_code == 200, r.text
    assert all(a.json().get("computing") is True and a.headers["Retry-After"] == "1" for a in answers[:-1])
    return r.json()


def test_the_map_is_inspect_maps_layout_of_every_row(served):
    client, store = served["client"], served["store"]
    record = _map(client)
    points = record["points"]
    assert (record["rows"], record["generation"], record["sampled"], len(points)) == (26, 0, False, 26)
    with imgvec.open_store(store) as s:  # every row, its own label (null: none), its absolute path
        want = {r: (os.path.join(s.root, k), lab or None) for r, (k, lab) in enumerate(zip(s.paths(), s.labels()))}
    assert {p["row"]: (p["path"], p["label"]) for p in points} == want
    xy = np.array([(p["x"], p["y"]) for p in points])
    assert np.isfinite(xy).all() and xy.min() >= 0 and xy.max() <= 1 and np.ptp(xy, axis=0).min() > 0.5
    reference = imgvec.inspect_map(store).map_records()  # the same seeded layout as inspect's map of the store
    assert record["method"] == reference["method"]
    np.testing.assert_allclose(xy, [(p["x"], p["y"]) for p in reference["points"]], atol=2e-4)
    assert [p["path"] for p in points] == [p["path"] for p in reference["points"]]
    names = sorted({lab for _, lab in want.values()})  # one colour a class, the report's palette in this order
    assert record["legend"] == [{"label": name, "colour": PALETTE[i], "points": sum(lab == name for _, lab in want.values())}
                                for i, name in enumerate(names)] and len(names) > 2
    assert record["issues"] is None and "imgvec inspect" in record["notes"][-1]
    assert client.get("/api/map").json() == record, "made once per snapshot"


def test_the_map_reads_only_its_sample(served, tmp_path):
    """Above map_rows the map is inspect's seeded sample, and only the sampled rows are read."""
    from imgvec.analyses.inspection import layout_2d, read_normalized

    with imgvec.open_store(served["store"]) as s:
        read: list[tuple[int, int]] = []
        embeddings = s.embeddings
        s.embeddings = lambda start=0, stop=None: read.append((start, stop)) or embeddings(start, stop)
        rows, vectors = imgvec.api.map_sample(s, 10, seed=3)
        assert sum(stop - start for start, stop in read) == 10 and len(rows) == 10
        s.embeddings = embeddings
        got = imgvec.api.layout_map(rows, vectors, s.rows, seed=3)
        want = layout_2d(read_normalized(s), 10, seed=3)
    assert got.sampled and got.total == 26 and got.method == want.method and "sample of 10 of 26 rows" in got.method
    np.testing.assert_array_equal(got.rows, want.rows)
    np.testing.assert_allclose(got.xy, want.xy, atol=1e-5)


def test_map_rows_0_is_no_map(served):
    service = Service(served["store"], map_rows=0)
    try:
        record = _client(service).get("/api/map").json()
        assert record["points"] == [] and record["legend"] == [] and "--map-rows 0" in record["method"]
    finally:
        service.close()
    for bad in (-1, 1):
        with pytest.raises(imgvec.errors.BadInputError, match="map.rows"):
            Service(served["store"], map_rows=bad)


def test_the_map_is_made_beside_searches_and_again_after_a_reload(tmp_path, image_dir: Path, holdout_dir: Path,
                                                                    small, monkeypatch):
    folder = tmp_path / "photos"
    shutil.copytree(image_dir, folder)
    store = tmp_path / "photos.h5"
    imgvec.embed([folder], store, **small)
    service = Service(store, map_rows=20)
    client = _client(service)
    release, layout_map = threading.Event(), imgvec.api.layout_map

    def held(*args, **kwargs):
        release.wait(60)
        return layout_map(*args, **kwargs)

    monkeypatch.setattr(imgvec.api, "layout_map", held)
    try:
        assert client.get("/api/map").status_code == 202  # started, not waited for
        assert client.get("/api/query", params={"path": "greens/greens_000.png", "k": 2}).status_code == 200
        assert client.get("/api/map").json() == {"computing": True, "generation": 0, "rows": 24}
        release.set()
        first = _map(client)
        assert (first["rows"], first["sampled"], len(first["points"]), first["generation"]) == (24, True, 20, 0)
        shutil.copy(holdout_dir / "greens" / "greens_002.png", folder / "greens" / "new.png")
        imgvec.embed([folder], store, **small)  # while the service is loaded
        second = _map(client)
        with imgvec.open_store(store) as s:
            keys, generation = s.paths(), s.generation
        assert (second["rows"], len(second["points"]), second["generation"]) == (25, 20, generation)
        assert all(p["path"] == os.path.join(str(folder), keys[p["row"]]) for p in second["points"])
        assert second != first
    finally:
        release.set()
        service.close()


# -- the command ---------------------------------------------------------------------------------
def _imgvec(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "imgvec", *args], capture_output=True, text=True, timeout=timeout)


def test_serve_command_errors_are_one_line(tmp_path, served):
    out = _imgvec("serve", str(tmp_path / "missing.h5"))
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "no such store" in out.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = _imgvec("serve", str(served["store"]), "--port", str(port))
    assert out.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in out.stderr, out.stderr
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    out = _imgvec("serve", str(served["store"]), "-k", "0")
    assert out.returncode == 2 and "-k must be between 1 and 1000, not 0" in out.stderr, out.stderr
    for option, value, message in (("--max-connections", "0", "max-connections must be at least 1"),
                                   ("--header-timeout", "0", "header-timeout must be more than 0 seconds"),
                                   ("--memory-budget", "0", "memory-budget must be at least 1 MB")):
        out = _imgvec("serve", str(served["store"]), option, value)
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and message in out.stderr, out.stderr


def test_connections_are_not_held_back_by_nagle():
    """asyncio sets TCP_NODELAY only on connections of an IPPROTO_TCP socket: without it every answer
    waited ~40 ms for the client's delayed ACK (measured: 44 ms vs 0.7 ms for a 404)."""
    import asyncio

    async def main() -> int:
        nodelay = asyncio.get_running_loop().create_future()

        async def accepted(reader, writer):
            nodelay.set_result(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        aserver = await asyncio.start_server(accepted, sock=server.listen("127.0.0.1", 0))
        async with aserver:
            port = aserver.sockets[0].getsockname()[1]
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            value = await asyncio.wait_for(nodelay, 10)
            writer.close()
            return value

    assert asyncio.run(main()) != 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def running(served):
    """`imgvec serve` itself, in a subprocess on a free port of 127.0.0.1; its URL once it is ready."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "imgvec", "serve", str(served["store"]), "--port", str(port),
                             "-k", "5"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        line = proc.stderr.readline()
        assert line.startswith(f"imgvec serve: http://127.0.0.1:{port}/"), line + (proc.stderr.read() or "")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(30)


def test_served_over_real_http(running):
    import httpx

    with httpx.Client(trust_env=False, timeout=30) as client:  # conftest points HTTP_PROXY at a closed port
        r = client.get(f"{running}/api/info")
        assert r.status_code == 200 and r.json()["default_k"] == 5
        assert client.get(f"{running}/api/info", headers={"Host": "attacker.example"}).status_code == 400


@pytest.mark.skipif(CHROMIUM is None, reason="the browser test needs Debian's chromium package "
                                             "(.ci/run installs it: apt-get install -y chromium)")
def test_page_in_headless_chromium(running, served, holdout_dir: Path, tmp_path: Path):
    playwright = pytest.importorskip("playwright.sync_api", reason="the browser test needs pip playwright")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--no-proxy-server"])
        try:
            # bypass_csp: the page forbids eval, which Playwright's wait_for_function uses
            page = browser.new_page(viewport={"width": 1280, "height": 720}, bypass_csp=True)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(running + "/")
            assert "RANDOM WEIGHTS" in page.inner_text("header")
            page.set_input_files("#file", str(holdout_dir / "blues" / "blues_000.png"))
            page.wait_for_selector("figure.hit >> nth=4")
            hits = page.locator("figure.hit")
            assert hits.count() == 5
            assert page.inner_text("#results h2") == "blues_000.png"
            assert page.locator("figure.hit .label").first.inner_text() == "blues"
            page.wait_for_function("[...document.querySelectorAll('#results img')].every(i => i.complete)")
            shown = page.evaluate("[...document.querySelectorAll('#results figure')].map(f => [f.dataset.path || '', "
                                  "!!f.querySelector('img') && f.querySelector('img').naturalWidth > 0])")
            assert len(shown) == 6 and shown[0] == ["", True], "the uploaded query is shown"
            refused = {f"{served['folder']}/{p}" for p in ("greens/becomes_fifo.png",  # a FIFO
                                                           "reds/link_out.png")}  # a link out of the root
            assert all(ok == (path not in refused) for path, ok in shown), shown
            assert page.locator("#results .missing").count() == sum(path in refused for path, _ in shown)
            target = hits.nth(2).get_attribute("data-path")
            hits.nth(2).click()
            caption = os.path.relpath(target, served["folder"])  # paths are shown relative to the store's root
            page.wait_for_function("t => document.querySelector('#results h2').textContent === t", arg=caption)
            assert page.locator("figure.hit").count() == 5
            assert target not in _shown_paths(page), "the image searched from is not its own neighbour"
            assert "?path=" in page.url
            page.wait_for_function("[...document.querySelectorAll('#results img')].every(i => i.complete)")
            shot = tmp_path / "serve.png"
            page.screenshot(path=str(shot), full_page=True)
            assert not errors, errors
        finally:
            browser.close()
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert (np.abs(pixels.astype(int) - (179, 38, 30)).sum(axis=2) < 30).sum() > 5000, "no red RANDOM banner"
    target_dir = os.environ.get("IMGVEC_SERVE_SCREENSHOT")  # docs/serve.png is made this way
    if target_dir:
        shutil.copy(shot, target_dir)


def test_the_service_knows_no_http():
    """service/service.py is the service without its face: importing it loads neither Starlette nor uvicorn."""
    code = ("import sys, imgvec.service.service; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('starlette', 'uvicorn', 'h11')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


# -- under attack: memory, connections, origins, headers, shutdown, files (issue 26) ----------------
_COST_CASE = r"""
import io, sys
from contextlib import nullcontext
from PIL import Image
from imgvec.files.images import load_image


def peak():  # this process's peak RSS (VmHWM; ru_maxrss would count the parent's RSS at fork)
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1]) << 10


data = open(sys.argv[1], "rb").read()
warm = io.BytesIO()
Image.new("RGB", (8, 8)).save(warm, "PNG")
load_image("warm.png", 64, data=warm)
costs = []
before = peak()
load_image(sys.argv[1], 64, data=io.BytesIO(data), reserve=lambda cost: costs.append(cost) or nullcontext())
print(costs[0], peak() - before)
"""


def _costly_image(kind: str, n: int, path: Path) -> None:
    """An image of ``kind`` whose decoding goes through one of the costly paths load_image has."""
    rng, turned = np.random.default_rng(0), Image.Exif()
    turned[0x0112] = 6  # EXIF: rotate
    noise = rng.integers(0, 255, (n, n, 3), np.uint8)
    if kind == "grey16_turned":
        grey16 = (np.arange(n * n, dtype=np.uint32).reshape(n, n) % 65535).astype(np.uint16)
        Image.fromarray(grey16).save(path, "PNG", exif=turned)
    elif kind == "float_tiff":
        Image.fromarray(np.linspace(0, 1, n * n, dtype=np.float32).reshape(n, n)).save(path, "TIFF")
    elif kind == "rgb_turned":
        Image.fromarray(noise).save(path, "PNG", exif=turned)
    elif kind == "progressive_jpeg":
        Image.fromarray(noise).save(path, "JPEG", progressive=True)
    elif kind == "palette_transparent":
        Image.fromarray(noise[..., 0], "P").save(path, "PNG", transparency=0)
    elif kind == "webp":
        Image.fromarray(noise).save(path, "WEBP")


@pytest.mark.parametrize("kind", ["grey16_turned", "float_tiff", "rgb_turned", "progressive_jpeg",
                                  "palette_transparent", "webp"])
def test_the_cost_of_decoding_is_known_before_it_is_paid(kind, tmp_path):
    """load_image hands the reservation its cost before a pixel is decoded, and the process's peak
    memory grows by no more than that cost (a fresh process that only reads the file and decodes it)."""
    path = tmp_path / f"{kind}.img"
    _costly_image(kind, 1500, path)
    out = subprocess.run([sys.executable, "-c", _COST_CASE, str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    cost, grew = map(int, out.stdout.split())
    assert grew >= 1500 * 1500 // 4, f"{kind}: decoding grew the peak by {grew} bytes: nothing was measured"
    assert grew <= cost, f"{kind}: decoding grew the peak by {grew >> 20} MB, over its cost {cost >> 20} MB"


def _grey16_png(side: int) -> bytes:
    """A small file that costs much to decode: a 16-bit grey PNG of ``side`` x ``side`` (a gradient)."""
    buf = io.BytesIO()
    Image.fromarray((np.arange(side * side, dtype=np.uint32).reshape(side, side) % 65535).astype(np.uint16)
                    ).save(buf, "PNG")
    return buf.getvalue()


def test_an_upload_over_the_memory_budget_is_413_and_a_full_budget_is_503(served):
    service = Service(served["store"], memory_budget=8 << 20, max_body=1 << 20)
    client = _client(service)
    body = _grey16_png(800)  # ~15 KB of file, ~12 MB to decode
    assert len(body) < 100_000
    r = client.post("/api/query", headers=PNG, content=body)
    assert r.status_code == 413 and "over the service's memory budget of 8.0 MB" in r.json()["error"], r.text
    service.budget.wait = 0.2
    taken = service.budget.acquire(7 << 20, "a test")  # other requests hold most of it
    try:
        small = (served["folder"] / "reds" / "reds_002.png").read_bytes()
        r = client.post("/api/query", headers=PNG, content=small)
        assert r.status_code == 503 and r.json()["error"].startswith("busy:"), r.text
    finally:
        service.budget.release(taken)
    r = client.post("/api/query", headers=PNG, content=small)
    assert r.status_code == 200 and service.budget.used == 0
    service.close()


def _start(store: Path, *args: str) -> tuple[subprocess.Popen, str]:
    """`imgvec serve STORE ARGS` on a free port; the process and its URL once it says it is ready."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "imgvec", "serve", str(store), "--port", str(port), *args],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    line = proc.stderr.readline()
    if not line.startswith(f"imgvec serve: http://127.0.0.1:{port}/"):
        proc.kill()
        raise AssertionError(line + (proc.stderr.read() or ""))
    threading.Thread(target=proc.stderr.read, daemon=True).start()  # drained: a full pipe would stall it
    return proc, f"http://127.0.0.1:{port}"


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(30)


def _kb(pid: int, field: str) -> int:
    """A /proc/PID/status field (VmRSS, VmHWM) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) << 10
    raise AssertionError(field)


def test_the_service_memory_is_what_it_loaded_plus_its_budget(served):
    """The stated worst case: RSS <= what the service holds once loaded and warm (model, store, index)
    plus the memory budget. Eight uploads that each cost most of the budget, at once: without the
    budget they would hold about eight times it."""
    import httpx

    budget = 96 << 20
    proc, url = _start(served["store"], "--memory-budget", str(budget >> 20))
    try:
        small = [(served["folder"] / cls / f"{cls}_001.png").read_bytes() for cls in ("reds", "blues", "greens")]
        with httpx.Client(trust_env=False, timeout=120) as client:
            def post(body: bytes) -> httpx.Response:
                return client.post(f"{url}/api/query", headers=PNG, content=body)

            with concurrent.futures.ThreadPoolExecutor(8) as pool:  # warm: the model at every batch size
                assert all(r.status_code == 200 for r in pool.map(post, small * 3))
            loaded = _kb(proc.pid, "VmHWM")
            body = _grey16_png(1700)  # ~60 MB to decode
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                answers = list(pool.map(post, [body] * 8))
        assert {r.status_code for r in answers} <= {200, 503} and any(r.status_code == 200 for r in answers), \
            [r.text for r in answers]
        peak = _kb(proc.pid, "VmHWM")
        assert peak - loaded <= budget, f"grew {(peak - loaded) >> 20} MB with a {budget >> 20} MB budget"
    finally:
        _stop(proc)


def _closed(sock: socket.socket) -> bool:
    """Whether the server closed ``sock`` without an answer (an end of file, or a reset when it left data
    unread); a socket still open makes recv wait for its 60 s timeout and fail."""
    try:
        return sock.recv(4096) == b""
    except ConnectionResetError:
        return True


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=60)


def test_idle_and_slow_clients_do_not_keep_others_out(served):
    """50 connections that send nothing and a client sending its headers a byte at a time, with room for
    only 32: a normal GET is answered; the idle ones are closed by the server (header timeout), and so is an
    upload whose body stops arriving (body timeout)."""
    import httpx

    proc, url = _start(served["store"], "--max-connections", "32", "--header-timeout", "3", "--body-timeout", "3")
    idle: list[socket.socket] = []
    try:
        idle = [_connect(url) for _ in range(50)]
        loris = _connect(url)
        loris.sendall(b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        stop = threading.Event()

        def drip() -> None:
            while not stop.is_set():
                try:
                    loris.sendall(b"X")
                except OSError:
                    return
                stop.wait(0.2)

        dripping = threading.Thread(target=drip)
        dripping.start()
        try:
            with httpx.Client(trust_env=False, timeout=60) as client:
                r = client.get(f"{url}/api/query", params={"path": "reds/reds_000.png", "k": 3})
            assert r.status_code == 200 and len(_hits(r)) == 3
            slow_upload = _connect(url)
            slow_upload.sendall(b"POST /api/query HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                                b"Content-Length: 1000000\r\n\r\n" + b"\x89PNG" * 100)
            assert _closed(slow_upload)  # closed once its body took longer than allowed
            for sock in idle[-5:]:  # the newest idle ones (the oldest made room): closed by the header timeout
                assert _closed(sock)
            assert _closed(loris)  # evicted or timed out: closed without an answer
        finally:
            stop.set()
            dripping.join()
    finally:
        for sock in idle:
            sock.close()
        _stop(proc)


def test_when_every_connection_is_busy_a_new_one_is_answered_503(served):
    """At the cap with no idle connection to close (two uploads arriving), a new client hears 503 at once
    and the uploads are left alone."""
    proc, url = _start(served["store"], "--max-connections", "2")
    busy: list[socket.socket] = []
    try:
        for _ in range(2):
            sock = _connect(url)
            sock.sendall(b"POST /api/query HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                         b"Content-Length: 100000\r\nExpect: 100-continue\r\n\r\n")
            # the server answers "100 Continue" once the app reads the body: the request is in progress
            assert sock.recv(4096).startswith(b"HTTP/1.1 100")
            sock.sendall(b"\0" * 1000)
            busy.append(sock)
        import httpx

        with httpx.Client(trust_env=False, timeout=60) as client:
            r = client.get(f"{url}/api/info")
        assert r.status_code == 503 and "every connection is in use" in r.json()["error"], r.text
        for sock in busy:  # still open: the uploads were not the ones closed
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(1)
    finally:
        for sock in busy:
            sock.close()
        _stop(proc)


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_a_stop_signal_with_uploads_in_flight_ends_the_process_within_10_s(served, signal_name):
    """Three large uploads half sent and a GET answered: the signal refuses the uploads (503) and the
    process is gone within 10 s."""
    import signal

    proc, url = _start(served["store"])
    uploads: list[socket.socket] = []
    try:
        for _ in range(3):
            sock = _connect(url)
            sock.sendall(b"POST /api/query HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                         b"Content-Length: 30000000\r\n\r\n" + b"\0" * (1 << 20))
            uploads.append(sock)
        import httpx

        with httpx.Client(trust_env=False, timeout=60) as client:  # the service still answers meanwhile
            assert client.get(f"{url}/api/info").status_code == 200
        proc.send_signal(getattr(signal, signal_name))
        proc.wait(10)
        for sock in uploads:  # refused: a 503, or closed (reset, when the rest of the body was never read)
            answer = b""
            try:
                while chunk := sock.recv(4096):
                    answer += chunk
            except ConnectionResetError:
                pass
            assert answer == b"" or answer.startswith(b"HTTP/1.1 503"), answer[:200]
    finally:
        for sock in uploads:
            sock.close()
        _stop(proc)


def test_cross_origin_posts_and_uploads_that_are_not_images_are_refused(served):
    client, body = served["client"], (served["folder"] / "reds" / "reds_002.png").read_bytes()
    for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"},
                    {"Origin": "http://testserver.evil.example"}):
        r = client.post("/api/query", headers={**PNG, **headers}, content=body)
        assert r.status_code == 403 and r.json()["error"].startswith("cross-origin request refused"), headers
        assert r.headers["X-Frame-Options"] == "DENY"  # the middleware's headers on a refusal too
    assert client.post("/api/query", headers={**PNG, "Origin": "http://testserver"}, content=body).status_code == 200
    assert client.post("/api/query", headers={**PNG, "Sec-Fetch-Site": "same-origin"}, content=body).status_code == 200
    for kind in ("text/plain", "application/x-www-form-urlencoded", None):
        r = client.post("/api/query", headers={"Content-Type": kind} if kind else {}, content=body)
        assert r.status_code == 415 and "curl -F file=@photo.jpg" in r.json()["error"], (kind, r.text)
    r = client.get("/api/query", headers={"Origin": "http://evil.example"}, params={"path": "reds/reds_000.png"})
    assert r.status_code == 200  # reads are not refused: the browser keeps the answer from the other site


def test_notes_with_line_breaks_are_encoded_in_headers(tmp_path, image_dir: Path, holdout_dir: Path, small):
    """A store in a folder whose name holds CR/LF: the notes that name it reach headers percent-encoded,
    and whole in /api/info's JSON."""
    from urllib.parse import unquote

    folder = tmp_path / "evil\r\nX-Injected: 1"
    shutil.copytree(image_dir, folder / "photos")
    store = folder / "photos.h5"
    imgvec.embed([folder / "photos"], store, **small)
    imgvec.build_index(store, kind="flat")
    shutil.copy(holdout_dir / "blues" / "blues_000.png", folder / "photos" / "blues" / "added.png")
    imgvec.embed([folder / "photos"], store, **small)
    client = _client(Service(store))
    r = client.get("/api/query", params={"path": "blues/added.png", "k": 2})
    assert r.status_code == 200 and "X-Injected" not in r.headers
    notes = client.get("/api/info").json()["notes"]
    assert len(notes) == 1 and "\r\nX-Injected: 1" in notes[0]
    assert "\r" not in r.headers["X-Imgvec-Notes"] and "\n" not in r.headers["X-Imgvec-Notes"]
    assert unquote(r.headers["X-Imgvec-Notes"]) == notes[0]


def test_images_are_served_only_below_the_folder_the_user_names(tmp_path, image_dir: Path):
    """A store whose root says elsewhere (forged, or moved): its rows' images are not served unless
    --images names a folder above them; searching still works."""
    from imgvec.files.provenance import Provenance
    from imgvec.vectors.store import create_store

    (tmp_path / "stores").mkdir()
    store = tmp_path / "stores" / "forged.h5"
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(image_dir, elsewhere)
    keys = ["reds/reds_000.png", "blues/blues_000.png"]
    prov = Provenance("mobilenetv3small", "random", 0, None, None, 64, "in model", 576)
    with create_store(store, prov, str(elsewhere)) as writer:
        writer.append(np.random.default_rng(0).standard_normal((2, 576)).astype(np.float32), keys, ["", ""])
    client = _client(Service(store))
    r = client.get("/image", params={"path": "reds/reds_000.png"})
    assert r.status_code == 404 and "the folder images are served from" in r.json()["error"], r.text
    assert client.get("/api/query", params={"path": "reds/reds_000.png", "k": 1}).status_code == 200
    assert "images are not shown" in client.get("/").text
    shown = _client(Service(store, images=elsewhere))
    assert shown.get("/image", params={"path": "reds/reds_000.png"}).status_code == 200
    assert shown.get("/api/info").json()["images"] == str(elsewhere.resolve())
    out = _imgvec("serve", str(store), "--images", str(tmp_path / "nowhere"))
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "nowhere: no such folder" in out.stderr


# -- uploads as browsers and curl send them, and the page (issue 29) ---------------------------------
def test_a_multipart_upload_is_the_same_query_as_a_raw_body(served, holdout_dir: Path):
    client = served["client"]
    image = holdout_dir / "yellows" / "yellows_001.png"
    raw = client.post("/api/query", headers=PNG, params={"k": 4}, content=image.read_bytes())
    form = client.post("/api/query", params={"k": 4}, files={"file": ("mine.png", image.read_bytes(), "image/png")})
    assert form.status_code == 200, form.text
    assert form.json()["queries"][0]["query"] == "mine.png"  # the file's own name
    assert _hits(form) == _hits(raw)
    r = client.post("/api/query", files=[("a", ("a.png", image.read_bytes(), "image/png")),
                                         ("b", ("b.png", image.read_bytes(), "image/png"))])
    assert r.status_code == 400 and "Too many files" in r.json()["error"], r.text
    r = client.post("/api/query", data={"note": "no file here"}, files={})
    assert r.status_code == 415  # a form without a file part is urlencoded: not an upload
    r = client.post("/api/query", files={"note": (None, b"text only")})
    assert r.status_code == 400 and "the form has no file" in r.json()["error"]
    assert "curl -F file=@photo.jpg" in r.json()["error"]


def test_multipart_uploads_have_the_body_limit_before_their_parts_are_read(served):
    client = _client(Service(served["store"], max_body=20_000))
    blob = np.random.default_rng(1).integers(0, 256, 30_000, np.uint8).tobytes()
    r = client.post("/api/query", files={"file": ("big.png", blob, "image/png")})
    assert r.status_code == 413 and r.json()["error"] == "the image is over the limit of 20000 bytes"

    def chunks():  # no Content-Length: counted as it arrives
        yield b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n\r\n"
        yield blob
        yield b"\r\n--b--\r\n"

    r = client.post("/api/query", headers={"Content-Type": "multipart/form-data; boundary=b"}, content=chunks())
    assert r.status_code == 413 and "over the limit of 20000 bytes" in r.json()["error"]


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_curl_form_upload_works(running, holdout_dir: Path):
    image = holdout_dir / "reds" / "reds_001.png"
    out = subprocess.run(["curl", "-s", "--noproxy", "*", "-F", f"file=@{image}", f"{running}/api/query?k=2"],
                         capture_output=True, text=True, timeout=60)
    record = json.loads(out.stdout)
    assert record["queries"][0]["query"] == "reds_001.png" and len(record["queries"][0]["results"]) == 2
    assert record["queries"][0]["results"][0]["label"] == "reds"
    out = subprocess.run(["curl", "-s", "--noproxy", "*", "--data-binary", f"@{image}", f"{running}/api/query"],
                         capture_output=True, text=True, timeout=60)
    assert "curl -F file=@photo.jpg" in json.loads(out.stdout)["error"]  # curl's default type says what to send


def _shown_paths(page) -> list[str]:
    return page.evaluate("[...document.querySelectorAll('figure.hit')].map(f => f.dataset.path)")


def _browser(p):
    return p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--no-proxy-server"])


@pytest.mark.skipif(CHROMIUM is None, reason="the browser test needs Debian's chromium package "
                                             "(.ci/run installs it: apt-get install -y chromium)")
def test_page_click_k_change_and_back_in_headless_chromium(running, served):
    """A click searches from that image (left out of its own results), changing k re-runs the search on
    screen, and Back/Forward restore the searches their URLs name."""
    playwright = pytest.importorskip("playwright.sync_api", reason="the browser test needs pip playwright")
    folder = served["folder"]
    first = f"{folder}/blues/blues_000.png"

    def caption_is(page, path: str) -> None:
        page.wait_for_function("t => (document.querySelector('#results h2') || {}).textContent === t",
                               arg=os.path.relpath(path, folder))

    def hits_are(page, n: int) -> None:
        page.wait_for_function("n => document.querySelectorAll('figure.hit').length === n", arg=n)

    with playwright.sync_playwright() as p:
        browser = _browser(p)
        try:
            page = browser.new_page(bypass_csp=True)  # the page forbids eval, which wait_for_function uses
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{running}/?path={first}&k=3")
            caption_is(page, first)
            hits_are(page, 3)
            assert first not in _shown_paths(page) and page.input_value("#k") == "3"
            target = page.locator("figure.hit").nth(1).get_attribute("data-path")
            page.locator("figure.hit").nth(1).click()  # a click: a search of its own, in the URL
            caption_is(page, target)
            hits_are(page, 3)
            assert target not in _shown_paths(page) and "k=3" in page.url
            page.fill("#k", "6")
            page.dispatch_event("#k", "change")  # k changed: the search on screen runs again
            hits_are(page, 6)
            caption_is(page, target)
            assert target not in _shown_paths(page) and "k=6" in page.url
            page.go_back()  # the same image at k=3
            hits_are(page, 3)
            caption_is(page, target)
            assert page.input_value("#k") == "3"
            page.go_back()  # the first search
            caption_is(page, first)
            hits_are(page, 3)
            assert first not in _shown_paths(page)
            page.go_forward()
            caption_is(page, target)
            assert not errors, errors
        finally:
            browser.close()


@pytest.mark.skipif(CHROMIUM is None, reason="the browser test needs Debian's chromium package "
                                             "(.ci/run installs it: apt-get install -y chromium)")
def test_the_map_on_the_page_shows_a_thumbnail_on_hover_and_searches_on_a_click_in_headless_chromium(running, served):
    """Under the page's own Content-Security-Policy (no bypass: waits are Playwright's locators): the map draws
    every row coloured by label with a legend; hovering a point shows its thumbnail; a click searches from it."""
    playwright = pytest.importorskip("playwright.sync_api", reason="the browser test needs pip playwright")
    folder = served["folder"]
    with playwright.sync_playwright() as p:
        browser = _browser(p)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            # what the page's Content-Security-Policy refuses is reported on the console (404s of images not served
            # are expected: results may include them)
            page.on("console", lambda m: "Content Security Policy" in m.text and errors.append(m.text))
            page.goto(running + "/")
            dots = page.locator("#map circle")
            playwright.expect(dots).to_have_count(26, timeout=120_000)
            shown = page.evaluate("[...document.querySelectorAll('#map circle')].map(c => [c.dataset.path, "
                                  "+c.getAttribute('cx'), +c.getAttribute('cy'), c.getAttribute('fill')])")
            assert {path for path, *_ in shown} == {f"{folder}/{key}" for key in served["service"].snapshot.keys}
            fills = {os.path.basename(os.path.dirname(path)): set() for path, *_ in shown}
            for path, _, _, fill in shown:
                fills[os.path.basename(os.path.dirname(path))].add(fill)
            assert all(len(f) == 1 for f in fills.values()) and len(set.union(*fills.values())) == len(fills)
            playwright.expect(page.locator("#legend li")).to_have_count(len(fills))
            # a point that stands alone (the pointer lands on it, not a neighbour), of an image that is served
            xy = np.array([(x, y) for _, x, y, _ in shown])
            gaps = np.sort(np.hypot(*(xy[:, None] - xy[None]).transpose(2, 0, 1)), axis=1)[:, 1]
            candidates = [i for i in np.argsort(-gaps) if "fifo" not in shown[i][0] and "link_out" not in shown[i][0]]
            target = shown[candidates[0]][0]
            assert gaps[candidates[0]] > 8, "no point stands apart from the others"
            dot = page.locator(f'#map circle[data-path="{target}"]')
            dot.hover()
            thumb = page.locator("#preview img")
            playwright.expect(page.locator("#preview")).to_be_visible()
            playwright.expect(thumb).to_have_attribute("src", "/image?path=" + quote(target, safe="!*'()"))
            playwright.expect(thumb).to_have_js_property("complete", True)
            assert thumb.evaluate("i => i.naturalWidth") > 0, "the hovered point's thumbnail is shown"
            assert page.inner_text("#preview figcaption").startswith(os.path.relpath(target, folder))
            with page.expect_response(lambda r: "/api/query" in r.url) as answer:
                dot.click()
            nearest = answer.value.json()["queries"][0]["results"][0]
            assert nearest["path"] == target and nearest["score"] == pytest.approx(1, abs=1e-4), "its own row first"
            playwright.expect(page.locator("#results h2")).to_have_text(os.path.relpath(target, folder))
            playwright.expect(page.locator("figure.hit")).to_have_count(5)
            assert page.locator("figure.query img").get_attribute("src") == "/image?path=" + quote(target, safe="!*'()")
            assert target not in _shown_paths(page) and "?path=" in page.url
            playwright.expect(dot).to_have_class("current")
            playwright.expect(page.locator("#map circle.hit")).to_have_count(5)  # its results ringed on the map
            assert sorted(page.evaluate("[...document.querySelectorAll('#map circle.hit')].map(c => c.dataset.path)")
                          ) == sorted(_shown_paths(page))
            assert not errors, errors
        finally:
            browser.close()


@pytest.mark.skipif(CHROMIUM is None, reason="the browser test needs Debian's chromium package "
                                             "(.ci/run installs it: apt-get install -y chromium)")
def test_a_page_of_another_origin_cannot_post_work_in_headless_chromium(running, served, tmp_path):
    """A page served from another origin (another port) posts an image three ways a page can: a simple
    request (text/plain, no preflight), a multipart form (no preflight), and an image/png request (preflight).
    None is answered 200; the same upload from the service's own page is."""
    import http.server

    playwright = pytest.importorskip("playwright.sync_api", reason="the browser test needs pip playwright")
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(served["folder"] / "reds" / "reds_002.png", site / "x.png")
    (site / "attack.html").write_text("""<!doctype html><title>attack</title><script>
(async () => {
  const target = new URLSearchParams(location.search).get("target") + "/api/query?k=2";
  const png = await (await fetch("/x.png")).blob();
  const tries = [
    {method: "POST", mode: "no-cors", body: new Blob([png], {type: "text/plain"})},
    {method: "POST", mode: "no-cors", body: (() => { const f = new FormData(); f.append("file", png, "x.png"); return f; })()},
    {method: "POST", body: png, headers: {"Content-Type": "image/png"}},
  ];
  for (const t of tries) { try { await fetch(target, t); } catch (e) {} }
  document.title = "done";
})();
</script>""")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    attacker = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=attacker.serve_forever, daemon=True).start()
    statuses: list[tuple[str, int]] = []
    try:
        with playwright.sync_playwright() as p:
            browser = _browser(p)
            try:
                page = browser.new_page()
                page.on("response", lambda r: statuses.append((r.request.method, r.status))
                        if r.url.startswith(running + "/api/query") else None)
                page.goto(f"http://127.0.0.1:{attacker.server_address[1]}/attack.html?target={running}")
                page.wait_for_function("document.title === 'done'", timeout=60_000)
                foreign = list(statuses)
                page.goto(running + "/")  # the service's own page sends the same upload
                page.set_input_files("#file", str(site / "x.png"))
                page.wait_for_selector("figure.hit")
            finally:
                browser.close()
    finally:
        attacker.shutdown()
    assert foreign and all(status != 200 for _, status in foreign), foreign
    assert [s for m, s in foreign if m == "POST"] == [403, 403], foreign  # the preflighted one never posted
    assert ("POST", 200) in statuses[len(foreign):]


def test_an_index_rewritten_in_place_under_the_service_is_let_go_then_served_again(served, tmp_path: Path):
    """`cp` over the index a service has mapped: the writer waits while the service answers from the checked
    bytes, the service lets go at its next request (503 while the new file is not one), and answers again
    once a good index is back; never a crash (SIGBUS in FAISS) or an answer from unchecked bytes."""
    store = Path(shutil.copy(served["store"], tmp_path / "s.h5"))
    index = tmp_path / "s.index.h5"
    imgvec.build_index(store, kind="hnsw", output=index)
    good = Path(shutil.copy(index, tmp_path / "good.index"))
    service = Service(store)
    client = _client(service)
    path = service.snapshot.keys[0]
    before = client.get("/api/query", params={"path": path, "k": 3}).json()
    lease = service.snapshot.index.lease
    assert lease is not None
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(os.urandom(index.stat().st_size))
    rewrite = ("import sys; data = open(sys.argv[2], 'rb').read(); f = open(sys.argv[1], 'r+b'); f.truncate(0); "
               "f.write(data[: len(data) // 2]); f.close()")
    writer = subprocess.Popen([sys.executable, "-c", rewrite, str(index), str(garbage)], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not lease.check() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert writer.poll() is None, "the writer waits while the service holds the index"
        busy = client.get("/api/query", params={"path": path, "k": 3})  # notices, lets go: the writer goes on
        assert busy.status_code in (200, 503), busy.text
        assert writer.wait(30) == 0, writer.stderr.read()
        answered = client.get("/api/query", params={"path": path, "k": 3})
        assert answered.status_code == 503 and "rewritten" in answered.json()["error"], answered.text
        os.replace(good, index)  # a good index again (as imgvec index writes it: a rename)
        again = client.get("/api/query", params={"path": path, "k": 3})
        assert again.status_code == 200 and again.json()["queries"] == before["queries"], again.text
    finally:
        writer.kill()
        service.close()
