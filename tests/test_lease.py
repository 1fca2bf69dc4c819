"""Files rewritten in place while imgvec holds them (``cp`` over a mapped index, ``rsync --inplace``): the
writer waits while imgvec answers from the bytes it checked, then proceeds; never a crash (SIGBUS)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from imgvec.cli import app

# Rewrites the file in place, as cp does: open for writing with truncation (waits on a lease), then writes.
REWRITE = ("import sys, time; start = time.monotonic(); data = open(sys.argv[2], 'rb').read(); "
           "f = open(sys.argv[1], 'r+b'); f.truncate(0); f.write(data[: len(data) // 3]); f.close(); "
           "print(time.monotonic() - start)")


@pytest.fixture
def indexed(store_path: Path, tmp_path: Path) -> dict:
    import imgvec

    store = Path(shutil.copy(store_path, tmp_path / "s.h5"))
    index = tmp_path / "s.index.h5"
    imgvec.build_index(store, kind="hnsw", output=index)
    return {"store": store, "index": index}


def _wait(lease, seconds: float = 20) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if lease.check():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("what", ["index", "store"])
def test_a_file_rewritten_in_place_waits_while_imgvec_answers_from_what_it_checked(indexed: dict, what: str,
                                                                                   tmp_path: Path):
    from imgvec.vectors.index import load_index
    from imgvec.vectors.store import open_store

    index, store = load_index(indexed["index"]), open_store(indexed["store"])
    held = index if what == "index" else store
    assert held.lease is not None, "leases are available on this file system"
    queries = store.embeddings(0, 4)
    before = index.search(queries, 3)
    paths_before = store.paths()[:4]
    other = tmp_path / "other.bin"
    other.write_bytes(np.random.default_rng(0).bytes(indexed[what].stat().st_size))
    writer = subprocess.Popen([sys.executable, "-c", REWRITE, str(indexed[what]), str(other)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert _wait(held.lease), "the lease holder is told a writer waits"
        assert writer.poll() is None, "the writer waits while the lease is held"
        after = index.search(queries, 3)  # the mapped bytes are still the checked ones: no SIGBUS, same answer
        assert all(np.array_equal(a, b) for a, b in zip(before, after))
        assert store.paths()[:4] == paths_before
    finally:
        index.lease and index.lease.release()
        store.close()
    out, err = writer.communicate(timeout=60)
    assert writer.returncode == 0, err
    assert float(out) < 30  # it went on once the lease was let go, well before the kernel's 45 s
    assert indexed[what].stat().st_size < other.stat().st_size  # and did rewrite the file


def test_a_query_while_the_index_is_open_for_writing_is_one_line(indexed: dict, image_dir: Path):
    image = sorted((image_dir / "reds").iterdir())[0]
    with open(indexed["index"], "r+b"):  # a writer in the middle of rewriting it
        r = CliRunner().invoke(app, ["query", str(indexed["store"]), str(image), "-k", "2"])
    assert r.exit_code == 2 and "open for writing in another process" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = CliRunner().invoke(app, ["query", str(indexed["store"]), str(image), "-k", "2", "-f", "json"])
    assert r.exit_code == 0, r.stderr  # written and closed: answered
