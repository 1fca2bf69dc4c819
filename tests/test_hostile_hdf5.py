"""Hostile HDF5 files: imgvec files forged to reach other files or to allocate gigabytes.

One forged file per class of attack (links, external storage, virtual datasets, filters and
chunk bombs, size claims, heap-shared strings, malformed journals, FIFOs), each run through the
CLI in a child process under an address-space limit. Every command must end in one
``imgvec: error:`` line with exit 2-4, without opening or changing any other file (watched with
inotify) and without reaching the limit. The old reader followed links and external storage,
allocated what a file claimed, and hung on FIFOs.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np
import pytest

from imgvec.files.header import header_digest
from imgvec.vectors.classifier import LogisticHead, save_head
from imgvec.files.journal import MAGIC, Record, _encode
from imgvec.files.provenance import Provenance
from imgvec.vectors.store import create_store, open_store
from old_files import format2

D = 576  # mobilenetv3small's embedding size
PROV = Provenance("mobilenetv3small", "random", 0, None, None, 64, "in model", D)
HEADROOM = 1 << 30  # address space each child gets beyond what it maps to run a command on a valid file:
# every size claim below is several GB in files of a few MB (the old reader went far past it on each)
SECRET = b"root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n" * 40

# Runs CLI commands inside one child (imports paid once), under RLIMIT_AS; prints what each did.
CHILD = r"""
import json, resource, sys
limit = int(sys.argv[1])
if limit:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from typer.testing import CliRunner
from imgvec.cli import app
out = []
for args in json.loads(sys.argv[2]):
    r = CliRunner().invoke(app, args)
    crash = r.exception if r.exception is not None and not isinstance(r.exception, SystemExit) else None
    out.append({"args": args, "code": r.exit_code, "stderr": r.stderr, "stdout": r.stdout[-100000:],
                "exception": repr(crash)[:500] if crash is not None else None})
print(json.dumps(out))
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print("VmPeak", status["VmPeak"].split()[0], file=sys.stderr)
"""


@functools.cache
def _limit() -> int:
    """RLIMIT_AS for the children: the address space a child maps to list the backbones (the CLI imported, as
    for every command here), measured on this machine, plus :data:`HEADROOM`."""
    done = subprocess.run([sys.executable, "-c", CHILD, "0", json.dumps([["models", "-f", "json"]])],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return (int(done.stderr.split("VmPeak ")[1].split()[0]) << 10) + HEADROOM


# -- watching the other files: inotify, so a mere open is seen too --------------------------------------
class Watch:
    """Records every open, read or write of ``paths`` (Linux inotify) while the child runs."""

    EVENTS = 0x20 | 0x01 | 0x02 | 0x08  # IN_OPEN | IN_ACCESS | IN_MODIFY | IN_CLOSE_WRITE

    def __init__(self, paths: list[Path]) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK)
        assert self.fd >= 0
        for path in paths:
            assert self.libc.inotify_add_watch(self.fd, os.fsencode(path), self.EVENTS) >= 0, path

    def touched(self) -> bool:
        try:
            return len(os.read(self.fd, 65536)) > 0
        except BlockingIOError:
            return False
        finally:
            os.close(self.fd)


def _snapshot(paths: list[Path]) -> list[tuple[bytes, int]]:
    return [(p.read_bytes(), p.stat().st_mtime_ns) for p in paths]


def run_cli(commands: list[list[str]], others: list[Path], limit: int | None = None, timeout: int = 300,
            kept: tuple[Path, ...] = ()) -> list[dict]:
    """Run ``commands`` in a child under ``limit``; assert none of ``others`` was opened or changed,
    and none of ``kept`` (files the commands read) changed."""
    limit = _limit() if limit is None else limit
    before = _snapshot([*others, *kept])
    watch = Watch(others)
    try:
        done = subprocess.run([sys.executable, "-c", CHILD, str(limit), json.dumps(commands)], capture_output=True,
                              text=True, timeout=timeout)
    finally:
        touched = watch.touched()
    assert done.returncode == 0, f"child ended with {done.returncode} (a signal or the memory limit): {done.stderr[-2000:]}"
    assert not touched, f"another file was opened: {[str(p) for p in others]}"
    assert _snapshot([*others, *kept]) == before, "a file changed"
    return json.loads(done.stdout.splitlines()[-1])


def assert_answer_or_one_line(what: str, r: dict) -> None:
    """A fuzzed file's command ends in an answer (exit 0) or in one short error line (2-4), never otherwise."""
    assert r["exception"] is None, (what, r["args"], r["exception"])
    if r["code"]:
        lines = r["stderr"].splitlines()
        assert r["code"] in (2, 3, 4) and len(lines) == 1 and lines[0].startswith("imgvec: error:"), (
            what, r["args"], r["stderr"][:2000])
        assert len(lines[0]) < 500, (what, lines[0][:1000])


def assert_one_line(results: list[dict], *words: str) -> None:
    for r in results:
        assert r["exception"] is None, (r["args"], r["exception"])
        assert r["code"] in (2, 3, 4), (r["args"], r["code"], r["stdout"], r["stderr"])
        lines = r["stderr"].splitlines()
        assert len(lines) == 1 and lines[0].startswith("imgvec: error:"), (r["args"], r["stderr"][:2000])
        assert len(lines[0]) < 500, lines[0][:1000]
        for word in words:
            assert word in lines[0], (r["args"], lines[0])


# -- the valid files every forgery starts from ----------------------------------------------------------
def _vectors(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, D)) * 3
    return (centres[np.arange(n) % 3] + rng.normal(size=(n, D))).astype(np.float32)


def _make_store(path: Path, seed: int, n: int = 30) -> Path:
    with create_store(path, PROV, str(path.parent)) as w:
        w.append(_vectors(n, seed), [f"{'abc'[i % 3]}/{i}.png" for i in range(n)], ["abc"[i % 3] for i in range(n)],
                 skipped=[("bad.png", "cannot decode")])
    return path


def _make_head(store: Path, path: Path, shift: int = 0) -> Path:
    with open_store(store) as s:
        labels = np.roll(np.asarray(s.labels()), shift)
        head = LogisticHead(cv=2, Cs=(0.1, 1.0)).fit(s.embeddings(), labels)
        save_head(head, path, s.provenance, s.store_id, s.generation, [s.absolute(k) for k in s.paths()])
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from imgvec.vectors.index import build_index

    root = tmp_path_factory.mktemp("hostile")
    store, other = _make_store(root / "s.h5", 0), _make_store(root / "other.h5", 5)
    with open_store(other) as o:
        build_index(o, "flat").save(root / "other.index.h5")
    return {"store": store, "other": other, "other_index": root / "other.index.h5",
            "head": _make_head(store, root / "head.h5"), "other_head": _make_head(store, root / "other_head.h5", 1)}


@pytest.fixture
def case(base: dict[str, Path], tmp_path: Path, image_dir: Path) -> dict[str, Path]:
    """Fresh copies in ``tmp_path`` (a command may try to write them), an image folder and a secret file;
    ``old_*``: a store, its index and a head of format 2 (variable-length strings: tests/old_files.py)."""
    paths = {name: Path(shutil.copy(p, tmp_path / p.name)) for name, p in base.items()}
    (tmp_path / "secret.txt").write_bytes(SECRET)
    (tmp_path / "format2").mkdir()
    old = format2(tmp_path / "format2")
    return {**paths, "secret": tmp_path / "secret.txt", "images": image_dir,
            "query": next(image_dir.rglob("*.png")), "old_store": old["s.h5"], "old_index": old["s.index.h5"],
            "old_head": old["head.h5"]}


def forge(path: Path, attack: Callable[[h5py.File], None]) -> Path:
    """Apply ``attack`` and recompute the header checksum, as anyone can."""
    with h5py.File(path, "r+") as h5:
        attack(h5)
        h5.attrs["header_sha256"] = header_digest(h5.attrs)
    return path


def _swap(h5: h5py.File, name: str, **kw: Any) -> None:
    del h5[name]
    h5.create_dataset(name, **kw)


def _linked(name: str, other: Path) -> Callable[[h5py.File], None]:
    """An attack replacing dataset ``name`` by an external link to the same name in ``other``."""
    def attack(h5: h5py.File) -> None:
        del h5[name]
        h5[name] = h5py.ExternalLink(str(other), "/" + name)
    return attack


# -- links and storage in other files ------------------------------------------------------------------
def test_a_store_linking_its_vectors_to_another_store_is_refused_and_the_other_never_written(case):
    other = case["other"]
    store = forge(case["store"], _linked("embeddings", other))
    results = run_cli([["info", str(store)], ["query", str(store), str(case["query"]), "-k", "3"],
                       ["embed", str(case["images"]), "-o", str(store)]], [other])
    assert_one_line(results, str(store), "'embeddings' is an external link")


def test_a_soft_link_is_refused(case):
    def attack(h5: h5py.File) -> None:
        h5.move("labels", "hidden")
        h5["labels"] = h5py.SoftLink("/hidden")

    store = forge(case["store"], attack)
    assert_one_line(run_cli([["info", str(store)]], [case["other"]]), "'labels' is a soft link")


def test_a_store_whose_paths_are_stored_in_another_file_is_refused(case):
    secret = case["secret"]

    def attack(h5: h5py.File) -> None:
        _swap(h5, "paths/bytes", shape=h5["paths/bytes"].shape, dtype="uint8", external=[(str(secret), 0, len(SECRET))])

    store = forge(case["store"], attack)
    results = run_cli([["info", str(store)], ["predict", str(case["head"]), str(store)],
                       ["query", str(store), str(case["query"])]], [secret])
    assert_one_line(results, "'paths/bytes' keeps its data in an external file")


def test_embed_never_writes_vectors_into_an_external_file(case):
    raw = case["secret"].with_name("vectors.raw")
    raw.write_bytes(_vectors(30, 1).tobytes())

    def attack(h5: h5py.File) -> None:
        _swap(h5, "embeddings", shape=(30, D), maxshape=(None, D), dtype="float32",
              external=[(str(raw), 0, h5py.h5f.UNLIMITED)])

    store = forge(case["store"], attack)
    results = run_cli([["embed", str(case["images"]), "-o", str(store)], ["info", str(store)]], [raw])
    assert_one_line(results, "external file")


def test_a_virtual_dataset_is_refused(case):
    other = case["other"]

    def attack(h5: h5py.File) -> None:
        layout = h5py.VirtualLayout(shape=(30, D), dtype="float32")
        layout[:] = h5py.VirtualSource(str(other), "embeddings", shape=(30, D))
        del h5["embeddings"]
        h5.create_virtual_dataset("embeddings", layout)

    store = forge(case["store"], attack)
    results = run_cli([["info", str(store)], ["predict", str(case["head"]), str(store)]], [other])
    assert_one_line(results, "virtual dataset")


def test_a_head_whose_coefficients_link_to_another_head_is_refused(case):
    other = case["other_head"]
    head = forge(case["head"], _linked("coef", other))
    results = run_cli([["info", str(head)], ["predict", str(head), str(case["store"])]], [other])
    assert_one_line(results, str(head), "'coef' is an external link")


def test_an_index_whose_faiss_bytes_live_elsewhere_is_refused(case):
    """The FAISS blob itself is checked by its own validator; its dataset, like every other, by check_structure."""
    from imgvec.vectors.index import build_index

    with open_store(case["store"]) as s:
        index = build_index(s, "flat").save(case["store"].with_name("s.index.h5"))
    linked = shutil.copy(index, index.with_name("linked.index.h5"))
    forge(Path(linked), _linked("faiss", case["other_index"]))
    stored = forge(index, lambda h5: _swap(h5, "faiss", shape=(len(SECRET),), dtype="uint8",
                                           external=[(str(case["secret"]), 0, len(SECRET))]))
    results = run_cli([["query", str(case["store"]), str(case["query"]), "--index", str(linked)],
                       ["query", str(case["store"]), str(case["query"]), "--index", str(stored)]],
                      [case["other_index"], case["secret"]])
    assert_one_line(results, "'faiss'")


# -- sizes the file claims but does not hold -----------------------------------------------------------------
def _deflated_zeros(nbytes: int, block: int = 16 << 20) -> bytes:
    """A zlib stream of ``nbytes`` zeros, built from one compressed block repeated (fast, small)."""
    assert nbytes % block == 0
    c = zlib.compressobj(9)
    first = c.compress(bytes(block)) + c.flush(zlib.Z_FULL_FLUSH)
    again = c.compress(bytes(block)) + c.flush(zlib.Z_FULL_FLUSH)  # the same bytes for every later block
    tail = bytearray(c.flush())
    tail[-4:] = struct.pack(">I", _adler_of_zeros(nbytes, block))
    return first + again * (nbytes // block - 1) + bytes(tail)


def _adler_of_zeros(nbytes: int, block: int) -> int:
    adler, zeros = 1, bytes(block)
    for _ in range(nbytes // block):
        adler = zlib.adler32(zeros, adler)
    return adler


def test_a_30_row_store_with_one_huge_gzip_chunk_is_refused_without_inflating_it(case):
    rows = 944  # one chunk of 944 x 576 x 4 bytes: 2.2 GB of zeros in 2 MB
    chunk_rows = rows * 1024
    bomb = _deflated_zeros(chunk_rows * D * 4, block=D * 4 * 1024 * 4)

    def attack(h5: h5py.File) -> None:
        _swap(h5, "embeddings", shape=(30, D), maxshape=(None, D), dtype="float32", chunks=(chunk_rows, D),
              compression="gzip")
        h5["embeddings"].id.write_direct_chunk((0, 0), bomb)

    store = forge(case["store"], attack)
    results = run_cli([["predict", str(case["head"]), str(store)], ["query", str(store), str(case["query"])]],
                      [case["other"]])
    assert_one_line(results, "'embeddings'")


def test_a_store_claiming_1e8_rows_is_refused_before_allocating_them(case):
    def attack(h5: h5py.File) -> None:
        for name in ("embeddings", "paths/offsets", "labels/codes"):
            h5[name].resize(10**8 + (name == "paths/offsets"), axis=0)
        h5.attrs["rows"] = 10**8

    store = forge(case["store"], attack)
    assert os.path.getsize(store) < 1 << 20
    results = run_cli([["info", str(store)], ["predict", str(case["head"]), str(store)]], [case["other"]])
    assert_one_line(results, "claims", "bytes")


def test_strings_sharing_one_heap_object_cannot_multiply_it(case):
    """30 labels pointing at one 8 MB string would read as 240 MB from an 8 MB file (a format-2 store: new
    files hold no variable-length string)."""
    def attack(h5: h5py.File) -> None:
        labels = h5["labels"]
        labels[0] = b"x" * (8 << 20)
        _, raw = labels.id.read_direct_chunk((0,))
        refs = np.frombuffer(raw, "V16").copy()
        refs[:30] = refs[0]
        labels.id.write_direct_chunk((0,), refs.tobytes())

    store = forge(case["old_store"], attack)
    results = run_cli([["info", str(store)], ["predict", str(case["old_head"]), str(store)]], [case["other"]])
    assert_one_line(results, "'/labels'", "strings claim")


def _stall(path: Path, collection: int) -> Path:
    """Make the first object of the heap collection at ``collection`` free space of 0 bytes: HDF5's walk
    of that collection (HDF5 1.14 and 2.0) never ends, deaf to SIGTERM (found by the fuzz below)."""
    with open(path, "r+b") as fh:
        fh.seek(collection + 16)
        fh.write(b"\0\0")  # object index 0: free space
        fh.seek(collection + 24)
        fh.write(b"\0" * 8)  # of 0 bytes
    return path


def test_a_string_attribute_in_a_heap_that_never_ends_is_one_line_not_a_hang(case):
    """A format-2 store: new files' text attributes are of fixed length, in no heap."""
    from imgvec.files import h5heap

    with h5py.File(case["old_store"], "r") as h5:
        heaps, _ = h5heap.attribute_heaps(h5heap.reader(h5.id.get_vfd_handle()), h5py.h5o.get_info(h5.id).addr,
                                          case["old_store"].stat().st_size)
    store = _stall(case["old_store"], sorted(set(heaps))[0])
    results = run_cli([["info", str(store)], ["predict", str(case["old_head"]), str(store)],
                       ["query", str(store), str(case["query"])], ["embed", str(case["images"]), "-o", str(store)]],
                      [case["other"]], timeout=120)
    assert_one_line(results, "global heap collection", "does not walk to its end")


def test_stored_paths_in_a_heap_that_never_ends_are_one_line_not_a_hang(case):
    """A collection only one path uses (forged in the unused end of the vectors' chunk, where nothing
    else looks): reading every path (predict, info) or only a query's hits (query -k 30). A format-2 store."""
    from imgvec.files import h5heap

    store = case["old_store"]
    with h5py.File(store, "r+") as h5:
        fd = h5.id.get_vfd_handle()
        heaps, _ = h5heap.attribute_heaps(h5heap.reader(fd), h5py.h5o.get_info(h5.id).addr, store.stat().st_size)
        original = min(heaps)
        size = int.from_bytes(os.pread(fd, 8, original + 8), "little")
        chunk = h5["embeddings"].id.get_chunk_info(0)
        forged = chunk.byte_offset + 30 * D * 4 + 64  # past the 30 rows, inside the chunk's bytes
        assert forged + size <= chunk.byte_offset + chunk.size
        paths = h5["paths"]
        _, raw = paths.id.read_direct_chunk((0,))
        refs = np.frombuffer(raw, [("length", "<u4"), ("heap", "<u8"), ("index", "<u4")]).copy()
        refs["heap"][29] = forged - forged % 8
        paths.id.write_direct_chunk((0,), refs.tobytes())
        forged = int(refs["heap"][29])
    with open(store, "r+b") as fh:
        fh.seek(original)
        block = fh.read(size)
        fh.seek(forged)
        fh.write(block)
    _stall(store, forged)
    results = run_cli([["predict", str(case["old_head"]), str(store), "-f", "csv"]], [case["other"]], timeout=120)
    # query loads its model first (TensorFlow needs more address space than the limit the others run under)
    queried = run_cli([["query", str(store), str(case["query"]), "-k", "30"]], [case["other"]], limit=16 << 30,
                      timeout=300)
    for r in queried:  # it got as far as embedding the photo, and said so
        r["stderr"] = "".join(line for line in r["stderr"].splitlines(True) if not line.startswith("imgvec: progress:"))
    assert_one_line(results + queried, "global heap collection", "does not walk to its end")


@pytest.mark.parametrize("old", [False, True], ids=["format 3", "format 2"])
def test_a_22_kb_head_claiming_2m_classes_is_one_short_line(case, old):
    n = 2_000_000

    def attack(h5: h5py.File) -> None:
        if old:
            _swap(h5, "classes", shape=(n,), maxshape=(None,), chunks=(4096,), dtype=h5py.string_dtype())
        else:
            _swap(h5, "classes/offsets", shape=(n + 1,), maxshape=(None,), chunks=(4096,), dtype="uint64")
        _swap(h5, "coef", shape=(n, D), maxshape=(None, D), chunks=(64, D), dtype="float32")
        _swap(h5, "intercept", shape=(n,), maxshape=(None,), chunks=(4096,), dtype="float32")

    head = forge(case["old_head" if old else "head"], attack)
    assert os.path.getsize(head) < 100_000
    results = run_cli([["info", str(head)], ["predict", str(head), str(case["old_store" if old else "store"])]],
                      [case["other_head"]])
    assert_one_line(results, str(head), "'classes' claims" if old else "'classes/offsets' claims")


def _set(name: str, index: int, value: int) -> Callable[[h5py.File], None]:
    def attack(h5: h5py.File) -> None:
        h5[name][index] = value
    return attack


def _swap_offsets(name: str, i: int) -> Callable[[h5py.File], None]:
    def attack(h5: h5py.File) -> None:
        h5[name][i], h5[name][i + 1] = h5[name][i + 1], h5[name][i]
    return attack


# Each: the file, what is done to it, the commands that read that part, and the words of the line they end in.
STRINGS_ATTACKS = {
    "offsets not monotonic": ("store", _swap_offsets("paths/offsets", 3), ["predict"], "'paths': its offsets decrease"),
    "last offset beyond the bytes": ("store", _set("labels/names/offsets", -1, 7), ["info", "predict"],
                                     "'labels/names': its offsets end at byte 7, its bytes at 3"),
    "offsets claiming more than the file": ("store", _set("skipped/reasons/offsets", -1, 1 << 40), ["info"],
                                            "'skipped/reasons': its offsets claim 1,099,511,627,776 bytes, more than"),
    "codes out of range": ("store", _set("labels/codes", 4, 7), ["info", "predict"],
                           "'labels/codes' holds 7, outside its table of 3 labels"),
    "codes below -1": ("store", _set("labels/codes", 4, -2), ["info", "predict"], "'labels/codes' holds -2"),
    "a label table naming one label twice": ("store", _set("labels/names/bytes", 1, ord("a")), ["info", "predict"],
                                             "'labels/names' names a label twice"),
    "class offsets not monotonic": ("head", _swap_offsets("classes/offsets", 0), ["info", "predict"],
                                    "'classes': its offsets"),
}


def test_hostile_strings_of_the_new_layout_are_each_one_damaged_file_line(case, tmp_path: Path):
    """Format 3's strings (bytes and offsets, labels as codes into a table) checked against each other and the
    file before any is read: every command reading the forged part ends in one damaged-file line."""
    commands, expected = [], []
    for i, (what, (kind, attack, reads, words)) in enumerate(STRINGS_ATTACKS.items()):
        victim = Path(shutil.copy(case[kind], tmp_path / f"{i}-{case[kind].name}"))
        forge(victim, attack)
        store, head = (victim, case["head"]) if kind == "store" else (case["store"], victim)
        for command in reads:
            commands.append(["info", str(victim)] if command == "info" else
                            ["predict", str(head), str(store), "-f", "csv"])
            expected.append((what, words))
    results = run_cli(commands, [case["other"], case["secret"]])
    for (what, words), r in zip(expected, results):
        assert_one_line([r], "damaged imgvec", words)


def test_a_head_whose_training_digests_claim_1e9_rows_is_refused_on_info(case):
    forge(case["head"], lambda h5: _swap(h5, "train_paths", shape=(10**9,), maxshape=(None,), chunks=(4096,),
                                         dtype="uint64"))
    assert_one_line(run_cli([["info", str(case["head"])]], [case["other_head"]]), "'train_paths' claims")


@pytest.mark.parametrize("digests", [np.array([b"a", b"b"], dtype=object), np.arange(30, dtype=np.float64),
                                     np.arange(7, dtype=np.uint64)], ids=["strings", "floats", "miscounted"])
def test_training_digests_of_the_wrong_type_or_count_are_one_line(case, digests):
    kw = {"dtype": h5py.string_dtype()} if digests.dtype == object else {}
    forge(case["head"], lambda h5: _swap(h5, "train_paths", data=digests, **kw))
    assert_one_line(run_cli([["info", str(case["head"])]], [case["other_head"]]), "'train_paths'")


# -- journals and locks ---------------------------------------------------------------------------------
def _frame(payload: bytes) -> bytes:
    return struct.pack("<4sQI", MAGIC, len(payload), zlib.crc32(payload)) + payload


def _record_payload(meta: Any, body: bytes) -> bytes:
    text = json.dumps(meta).encode()
    return struct.pack("<I", len(text)) + text + body


def _store_id(store: Path) -> str:
    with open_store(store) as s:
        return s.store_id


MALFORMED: dict[str, Callable[[str], bytes]] = {
    "wrong dim": lambda sid: _encode(Record(np.ones((2, D - 76), np.float32), ["n/1.png", "n/2.png"], ["n", "n"],
                                            store_id=sid)),
    "shape disagrees with keys": lambda sid: _record_payload(
        {"store_id": sid, "keys": ["n/1.png"], "labels": ["n"], "skipped": [], "shape": [3, D]},
        np.ones((3, D), "<f4").tobytes()),
    "bytes disagree with shape": lambda sid: _record_payload(
        {"store_id": sid, "keys": ["n/1.png"], "labels": ["n"], "skipped": [], "shape": [1, D]}, b"\0" * 12),
    "meta is a list": lambda sid: _record_payload([1, 2, 3], b""),
    "labels missing": lambda sid: _record_payload({"store_id": sid, "keys": ["n/1.png"], "skipped": [],
                                                   "shape": [1, D]}, np.ones((1, D), "<f4").tobytes()),
    "nan rows": lambda sid: _encode(Record(np.full((2, D), np.nan, np.float32), ["n/1.png", "n/2.png"], ["n", "n"],
                                           store_id=sid)),
}


def test_crc_valid_but_malformed_journal_records_are_one_line_and_the_store_stays_usable(case):
    commands, kept, journals = [], [], []
    for i, make in enumerate(MALFORMED.values()):
        store = Path(shutil.copy(case["store"], case["store"].with_name(f"s{i}.h5")))
        journal = store.with_name(store.name + ".journal")
        journal.write_bytes(_frame(make(_store_id(store))))
        commands += [["embed", str(case["images"]), "-o", str(store)], ["info", str(store)],
                     ["predict", str(case["head"]), str(store), "-f", "csv"]]  # the store itself still answers
        kept += [store, journal]
        journals.append(journal)
    results = run_cli(commands, [], kept=tuple(kept))
    for what, journal, (embed, info, predict) in zip(MALFORMED, journals, zip(*[iter(results)] * 3)):
        assert_one_line([embed, info], str(journal), "damaged imgvec journal")
        assert predict["code"] == 0 and predict["stdout"].count(".png") == 30, (what, predict)
    assert "NaN, infinite or out-of-range" in results[-3]["stderr"]


@pytest.mark.parametrize("where", ["journal", "lock"])
def test_a_fifo_where_the_journal_or_lock_goes_never_hangs(case, where):
    store = case["store"]
    fifo = store.with_name(store.name + ".journal" if where == "journal" else f".{store.name}.lock")
    os.mkfifo(fifo)
    commands = [["embed", str(case["images"]), "-o", str(store)]] + ([["info", str(store)]] if where == "journal" else [])
    results = run_cli(commands, [], timeout=60, kept=(store,))
    assert_one_line(results, str(fifo), "FIFO")


# -- chunk indexes, journal strings and lock links (issue 30) ------------------------------------------
def _chunk_root(path: Path, name: str) -> tuple[int, int]:
    """(address of the root node of dataset ``name``'s chunk B-tree, its key's dimensions)."""
    from imgvec.files.chunks import _layout
    from imgvec.files.h5heap import reader

    with h5py.File(path, "r") as h5:
        header, _ = h5py.h5g.get_objinfo(h5[name].id).objno  # not h5o.get_info: that walks the tree
        root, dims = _layout(reader(h5.id.get_vfd_handle()), header, path.stat().st_size)
    return root, len(dims)


def _loop_chunk_index(path: Path, name: str, level: int) -> Path:
    """Make the root of ``name``'s chunk B-tree an internal node of ``level`` whose one child is itself:
    HDF5 recursed into it until the stack ran out (SIGSEGV)."""
    root, rank = _chunk_root(path, name)
    with open(path, "r+b") as fh:
        fh.seek(root + 5)
        fh.write(struct.pack("<BH", level, 1))
        fh.seek(root + 24 + 8 + 8 * rank)  # the first child, after the node's header and first key
        fh.write(struct.pack("<Q", root))
    return path


@pytest.mark.parametrize("level", [1, 255], ids=["self-link", "absurd level"])
@pytest.mark.parametrize("name", ["embeddings", "paths/offsets", "paths/bytes", "labels/codes"])
def test_a_chunk_index_that_points_to_itself_is_one_line_not_a_crash(case, name, level):
    store = _loop_chunk_index(case["store"], name, level)
    results = run_cli([["info", str(store)], ["predict", str(case["head"]), str(store), "-f", "csv"],
                       ["dedup", str(store)]], [case["other"]], timeout=120)
    assert_one_line(results, str(store), f"'{name}'", "chunk B-tree")


def _loop_group_tree(path: Path, group: str) -> Path:
    """Make the root node of ``group``'s symbol-table B-tree an internal node whose one child is itself."""
    from imgvec.files.h5heap import header_messages, reader

    with h5py.File(path, "r") as h5:
        header, _ = h5py.h5g.get_objinfo(h5[group].id).objno
        table = next(body for kind, _, body in header_messages(reader(h5.id.get_vfd_handle()), header,
                                                               path.stat().st_size) if kind == 0x0011)
    root = struct.unpack_from("<Q", table)[0]
    with open(path, "r+b") as fh:
        fh.seek(root + 5)
        fh.write(struct.pack("<BH", 1, 1))
        fh.seek(root + 24 + 8)  # the first child, after the node's header and first key
        fh.write(struct.pack("<Q", root))
    return path


@pytest.mark.parametrize("group", ["/", "/skipped", "/labels", "/paths"])
def test_a_group_whose_names_b_tree_points_to_itself_is_one_line_not_a_crash(case, group):
    """The same recursion in a group's symbol table (found while fixing chunk indexes): SIGSEGV on open."""
    store = _loop_group_tree(case["store"], group)
    results = run_cli([["info", str(store)], ["predict", str(case["head"]), str(store), "-f", "csv"]], [case["other"]],
                      timeout=120)
    assert_one_line(results, str(store), "group B-tree")


def _journal_with(store: Path, records: list[Record]) -> Path:
    journal = store.with_name(store.name + ".journal")
    journal.write_bytes(b"".join(_frame(_encode(r)) for r in records))
    return journal


def test_journal_records_whose_strings_no_store_holds_are_dropped_with_a_note_and_the_rest_folds(case):
    store = case["store"]
    sid, row = _store_id(store), np.ones((1, D), np.float32)
    journal = _journal_with(store, [
        Record(row, ["bad\0key.png"], ["a"], store_id=sid),  # a NUL: h5py refused the whole fold, every run
        Record(row, ["kept.png"], ["b"], store_id=sid),
        Record(row, ["surrogate\ud800.png"], ["a"], store_id=sid),  # not UTF-8, even with surrogate escapes
        Record(row, ["kept2.png"], ["c\0"], store_id=sid),
        Record(row, ["kept3.png"], ["c"], skipped=[("x\0.png", "bad")], store_id=sid)])
    embed = ["embed", str(case["images"]), "-o", str(store)]
    first, again = run_cli([embed, embed], [case["secret"]], limit=16 << 30, timeout=600)
    for r in (first, again):
        assert r["exception"] is None and r["code"] == 0, (r["exception"], r["stderr"][-2000:])
    notes = [line for line in first["stderr"].splitlines() if "dropped" in line]
    assert len(notes) == 4 and all(n.startswith(f"imgvec: note: {journal}: record ") for n in notes), notes
    assert [n.split("record ")[1].split()[0] for n in notes] == ["1", "3", "4", "5"]
    assert "Traceback" not in first["stderr"] + again["stderr"] and "dropped" not in again["stderr"]
    assert not journal.exists() and not store.with_name(f".{store.name}.lock").exists()  # no lock left either
    with open_store(store) as s:
        paths = s.paths()
        assert "kept.png" in paths and len(paths) == 30 + 1 + 24 and not any("\0" in p for p in paths)


@pytest.mark.parametrize("where", ["lock", "journal"])
def test_a_dangling_link_as_the_lock_or_journal_creates_nothing_outside_the_folder(case, tmp_path, where):
    store = case["store"]
    outside = tmp_path / "elsewhere" / "target"
    outside.parent.mkdir()
    link = store.with_name(f".{store.name}.lock" if where == "lock" else store.name + ".journal")
    link.symlink_to(outside)
    commands = [["embed", str(case["images"]), "-o", str(store)]] + ([["info", str(store)]] if where == "journal" else [])
    # room for the model: the old writer went on to embed (and created the link's target)
    results = run_cli(commands, [], limit=16 << 30, timeout=600, kept=(store,))
    assert_one_line(results, str(link), "symbolic link")
    assert list(outside.parent.iterdir()) == [] and link.is_symlink()


def test_a_journal_linked_to_another_file_never_reads_or_cuts_it(case):
    """The old writer read the linked file as a journal, found no record and truncated it to 0 bytes."""
    store, secret = case["store"], case["secret"]
    store.with_name(store.name + ".journal").symlink_to(secret)
    results = run_cli([["embed", str(case["images"]), "-o", str(store)], ["info", str(store)]], [secret],
                      limit=16 << 30, timeout=600)
    assert_one_line(results, "symbolic link")
    assert secret.read_bytes() == SECRET


# -- vectors that are not numbers ----------------------------------------------------------------------
OVERFLOW = """
import json, sys
from imgvec.backbones.registry import BACKBONES, Weights
from imgvec.backbones.builder import build_model
model = build_model(BACKBONES["mobilenetv3small"], Weights("random", 0), 64)
model.set_weights([w * 1e30 if w.ndim > 1 else w for w in model.get_weights()])  # every activation overflows
model.save_weights(sys.argv[1])
from typer.testing import CliRunner
from imgvec.cli import app
out = []
for _ in range(2):  # and again: the same answer, never "damaged store" (nothing non-finite was ever stored)
    r = CliRunner().invoke(app, json.loads(sys.argv[2]))
    crash = r.exception if r.exception is not None and not isinstance(r.exception, SystemExit) else None
    out.append(dict(code=r.exit_code, stderr=r.stderr, exception=repr(crash) if crash is not None else None,
                    store_left=__import__("os").path.exists(sys.argv[3])))
print(json.dumps(out))
"""


def test_weights_that_overflow_are_refused_where_the_rows_are_made(tmp_path: Path, image_dir: Path):
    """One child makes the weights and embeds twice (TensorFlow imported once, not three times)."""
    weights, store = tmp_path / "overflow.weights.h5", tmp_path / "s.h5"
    embed = ["embed", str(image_dir), "-o", str(store), "--model", "mobilenetv3small", "--weights", str(weights),
             "--image-size", "64", "--runtime", "tensorflow"]
    done = subprocess.run([sys.executable, "-c", OVERFLOW, str(weights), json.dumps(embed), str(store)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for run in json.loads(done.stdout.splitlines()[-1]):
        errors = [line for line in run["stderr"].splitlines() if line.startswith("imgvec: error:")]
        assert run["code"] == 2 and len(errors) == 1 and run["exception"] is None, run
        assert "Traceback" not in run["stderr"], run["stderr"][-3000:]
        assert "NaN, infinite or out-of-range" in errors[0] and str(weights) in errors[0] and str(image_dir) in errors[0], errors[0]
        assert not run["store_left"]  # a store this run made that holds no row is not left behind


def _without_root_group(path: Path) -> Path:
    """Turn the root group's symbol-table message into a NIL message: HDF5 opens the file, but
    the root (what ``h5.attrs`` and every name open anew) no longer reads as any kind of object."""
    data = bytearray(path.read_bytes())
    btree, heap = struct.unpack_from("<QQ", data, 80)  # the version-0 superblock's copy of the root's table
    pos = data.find(struct.pack("<QQ", btree, heap), 96) - 8  # the message itself, in the root's header
    assert pos > 0 and struct.unpack_from("<HH", data, pos) == (0x11, 16)
    struct.pack_into("<H", data, pos, 0)
    path.write_bytes(data)
    return path


def test_a_file_whose_root_group_cannot_be_opened_is_one_line(case):
    """Found by the fuzz (head, 'flip #120'): the root was opened outside the reading guard, a KeyError traceback."""
    store, head, index = (_without_root_group(case[k]) for k in ("store", "head", "other_index"))
    results = run_cli([["info", str(store)], ["info", str(head)], ["info", str(index)],
                       ["predict", str(head), str(case["other"])], ["predict", str(case["other_head"]), str(store)],
                       ["query", str(case["other"]), str(case["query"]), "--index", str(index)],
                       ["embed", str(case["images"]), "-o", str(store)]], [case["secret"]])
    assert_one_line(results, "unable to determine object type")


# -- fuzzing: random damage to valid files ------------------------------------------------------------------
_HUGE = (2**31 - 1, 2**32 - 1, 10**9, 2**40, 2**63 - 1, 2**64 - 1)


def _mutants(data: bytes, rng: np.random.Generator, n: int) -> list[tuple[str, bytes]]:
    """``n`` damaged copies of ``data``: flipped bytes, truncations, and size fields made huge."""
    sizes = [v for v in (30, 576, 1024, 256, 2, 3) for v in (v, v * 4, v * 16)]
    fields = sorted({m for v in sizes for fmt in ("<I", "<Q") for m in _find_all(data, struct.pack(fmt, v))})
    out = []
    for i in range(n):
        b = bytearray(data)
        how = i % 3
        if how == 0:
            for pos in rng.integers(0, len(b), int(rng.integers(1, 9))):
                b[pos] ^= int(rng.integers(1, 256))
            what = "flip"
        elif how == 1:
            b = b[: int(rng.integers(0, len(b)))]
            what = "truncate"
        else:
            pos = int(rng.choice(fields))
            value = int(rng.choice(_HUGE))
            width = 8 if rng.random() < 0.5 else 4
            b[pos : pos + width] = (value % (1 << (8 * width))).to_bytes(width, "little")
            what = f"size field at {pos}"
        out.append((f"{what} #{i}", bytes(b)))
    return out


def _find_all(data: bytes, needle: bytes) -> list[int]:
    found, start = [], data.find(needle)
    while start >= 0:
        found.append(start)
        start = data.find(needle, start + 1)
    return found


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["store", "head"])
def test_fuzzed_files_end_in_an_answer_or_one_line_never_a_signal_or_the_limit(base, tmp_path: Path, kind: str):
    rng = np.random.default_rng(17 if kind == "store" else 18)
    mutants = _mutants(base[kind].read_bytes(), rng, 300)
    for start in range(0, len(mutants), 100):  # one child per 100 files: a crash names its batch
        commands, names = [], []
        for what, data in mutants[start : start + 100]:
            path = tmp_path / f"m{len(names)}.h5"
            path.write_bytes(data)
            names.append(what)
            head, store = (str(base["head"]), str(path)) if kind == "store" else (str(path), str(base["store"]))
            commands += [["info", str(path)], ["predict", head, store, "-f", "csv"]]
        results = run_cli(commands, [], kept=(base["head"], base["store"]), timeout=1200)
        for what, (info, predict) in zip(names, zip(*[iter(results)] * 2)):
            for r in (info, predict):
                assert_answer_or_one_line(what, r)
        for path in tmp_path.glob("m*.h5"):
            path.unlink()


def _chunk_nodes(path: Path) -> dict[int, int]:
    """Every chunk B-tree node of a store (its roots and, in a big store, the nodes below): address -> rank."""
    nodes = {}
    data = path.read_bytes()
    strings = ("paths", "labels/names", "skipped/paths", "skipped/reasons")
    for name in ("embeddings", "labels/codes", *(f"{s}/{part}" for s in strings for part in ("bytes", "offsets"))):
        root, rank = _chunk_root(path, name)
        todo = [root] if root != 2**64 - 1 else []
        while todo:
            node = todo.pop()
            nodes[node] = rank
            level, used = data[node + 5], struct.unpack_from("<H", data, node + 6)[0]
            if level:
                todo += [struct.unpack_from("<Q", data, node + 24 + i * (16 + 8 * rank) + 8 + 8 * rank)[0]
                         for i in range(used)]
    return nodes


def _btree_mutants(path: Path, rng: np.random.Generator, n: int) -> list[tuple[str, bytes]]:
    """``n`` copies of store ``path`` with one chunk B-tree node rewritten: a child made the node itself or
    another node, a level changed, a child sent elsewhere, an entry count past the node's room."""
    data, nodes = path.read_bytes(), _chunk_nodes(path)
    addresses = sorted(nodes)
    out = []
    for i in range(n):
        b = bytearray(data)
        node = int(rng.choice(addresses))
        rank = nodes[node]
        used = max(1, struct.unpack_from("<H", b, node + 6)[0])
        child = node + 24 + int(rng.integers(0, used)) * (16 + 8 * rank) + 8 + 8 * rank
        how = i % 4
        if how == 0:
            b[node + 5] = int(rng.choice([1, 2, 7, 255]))
            struct.pack_into("<Q", b, child, node if rng.random() < 0.5 else int(rng.choice(addresses)))
            what = "child to a node"
        elif how == 1:
            b[node + 5] = int(rng.integers(0, 256))
            what = "level"
        elif how == 2:
            target = [0, 40, 96, len(b) - 8, len(b) + 4096, 2**63, 2**64 - 1, int(rng.integers(0, len(b)))]
            struct.pack_into("<Q", b, child, target[int(rng.integers(0, len(target)))])
            what = "child address"
        else:
            struct.pack_into("<H", b, node + 6, int(rng.choice([0, 65, 1000, 65535])))
            b[node + 5] = int(rng.integers(0, 3))
            what = "entries and level"
        out.append((f"{what} at node {node} #{i}", bytes(b)))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("rows", [30, 17_000], ids=["one-level", "two-level"])
def test_fuzzed_chunk_indexes_end_in_an_answer_or_one_line_never_a_signal_or_the_limit(base, tmp_path: Path,
                                                                                        rows: int):
    """Chunk B-tree nodes rewritten (issue 30), each store through info and predict in a child under the
    address-space limit and a time limit: the old reader recursed without end in a looped tree (SIGSEGV)."""
    source = base["store"] if rows == 30 else _make_store(tmp_path / "big.h5", 3, rows)
    mutants = _btree_mutants(source, np.random.default_rng(30 + rows), 48)
    for start in range(0, len(mutants), 24):  # one child per 24 files: a crash names its batch
        commands, names = [], []
        for what, data in mutants[start : start + 24]:
            path = tmp_path / f"m{len(names)}.h5"
            path.write_bytes(data)
            names.append(what)
            commands += [["info", str(path)], ["predict", str(base["head"]), str(path), "-f", "csv"]]
        results = run_cli(commands, [], kept=(base["head"],), timeout=600)
        for what, (info, predict) in zip(names, zip(*[iter(results)] * 2)):
            for r in (info, predict):
                assert_answer_or_one_line(what, r)
        for path in tmp_path.glob("m*.h5"):
            path.unlink()


PINNED_CHILD = r"""
import sys
from pathlib import Path
import h5py, numpy as np
h5py.get_config().track_order = True  # h5py's documented global option: must not change what imgvec writes
sys.path.insert(0, sys.argv[2])
from test_hostile_hdf5 import _make_head, _make_store
from imgvec.vectors.index import build_index
from imgvec.vectors.store import open_store
from typer.testing import CliRunner
from imgvec.cli import app
root = Path(sys.argv[1])
store = _make_store(root / "s.h5", 0)
with open_store(store) as s:
    build_index(s, "flat").save(root / "s.index.h5")
_make_head(store, root / "head.h5")
for name in ("s.h5", "s.index.h5", "head.h5"):
    r = CliRunner().invoke(app, ["info", str(root / name)])
    print(name, r.exit_code, r.stderr.strip()[:300])
"""


def test_the_format_is_pinned_whatever_h5pys_global_track_order_says(tmp_path: Path):
    """Issue 26: with ``track_order = True`` imgvec wrote version-2 object headers and refused its own store."""
    done = subprocess.run([sys.executable, "-c", PINNED_CHILD, str(tmp_path), str(Path(__file__).parent)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [line.split()[:2] for line in done.stdout.splitlines()[-3:]] == [
        ["s.h5", "0"], ["s.index.h5", "0"], ["head.h5", "0"]], done.stdout[-3000:]
    for name in ("s.h5", "s.index.h5", "head.h5"):
        data = (tmp_path / name).read_bytes()
        assert data[8] == 0, name  # superblock version 0
        with h5py.File(tmp_path / name, "r") as h5:
            headers = [h5py.h5g.get_objinfo(h5.id).objno[0]]  # the root, and every group and dataset below it
            h5.visititems(lambda name, obj: headers.append(h5py.h5g.get_objinfo(obj.id).objno[0]))
        assert all(data[a] == 1 for a in headers), name  # version-1 object headers ("OHDR" would be version 2)
