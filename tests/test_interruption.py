"""Kill -9 an embedding run at random moments, resume it, and compare with a clean run."""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import imgvec
from imgvec.files.journal import journal_path
from imgvec.vectors.store import StoreWriter, open_store
from imgvec.synthetic import make_image_folder

ARGS = ["-m", "mobilenetv3small", "--weights", "none", "--image-size", "64", "--batch-size", "4", "--workers", "1"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = make_image_folder(tmp_path_factory.mktemp("kill") / "photos", per_class=20, size=64, seed=3)
    (root / "reds" / "bad.jpg").write_bytes(b"not a jpeg")
    return root


@pytest.fixture(scope="module")
def reference(folder: Path, tmp_path_factory) -> dict[str, np.ndarray]:
    path = tmp_path_factory.mktemp("ref") / "ref.h5"
    imgvec.embed([folder], path, model="mobilenetv3small", weights="none", image_size=64, batch_size=4)
    with open_store(path) as s:
        return dict(zip(s.paths(), s.embeddings()))


def _embed_cmd(folder: Path, store: Path) -> list[str]:
    return [sys.executable, "-m", "imgvec", "embed", str(folder), "-o", str(store), *ARGS]


def _kill_and_resume(folder: Path, store: Path, kills: int, seed: int) -> None:
    rng = random.Random(seed)
    # Time a whole run once (start-up included) so kills land before, during and after embedding.
    t0 = time.perf_counter()
    subprocess.run(_embed_cmd(folder, store.with_name("timing.h5")), check=True, capture_output=True)
    whole = time.perf_counter() - t0
    for _ in range(kills):
        proc = subprocess.Popen(_embed_cmd(folder, store), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, whole))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if store.exists():  # whatever the kill left must open as a valid store
            with open_store(store) as s:
                assert len(set(s.paths())) == s.rows
    subprocess.run(_embed_cmd(folder, store), check=True, capture_output=True)


def _check_same(store: Path, reference: dict[str, np.ndarray]) -> None:
    with open_store(store) as s:
        paths = s.paths()
        assert len(paths) == len(set(paths)) == len(reference)
        got = dict(zip(paths, s.embeddings()))
        assert s.skipped() == [("reds/bad.jpg", "not a recognised image")]
    assert set(got) == set(reference)
    for key, emb in reference.items():
        np.testing.assert_allclose(got[key], emb, rtol=1e-4, atol=1e-5)
    assert not journal_path(store).exists()
    assert not [p for p in store.parent.iterdir() if ".tmp-" in p.name]


def test_killed_runs_resume_to_the_same_store(folder: Path, reference, tmp_path: Path):
    store = tmp_path / "s.h5"
    _kill_and_resume(folder, store, kills=3, seed=1)
    _check_same(store, reference)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(5))
def test_killed_runs_resume_to_the_same_store_many_times(folder: Path, reference, tmp_path: Path, seed: int):
    store = tmp_path / "s.h5"
    _kill_and_resume(folder, store, kills=6, seed=100 + seed)
    _check_same(store, reference)


def test_kill_between_publish_and_journal_removal_doubles_nothing(folder: Path, reference, tmp_path: Path):
    """The journal outlives the rename that published it: replaying it must add nothing."""
    store = tmp_path / "s.h5"
    imgvec.embed([folder / "reds"], store, model="mobilenetv3small", weights="none", image_size=64)
    with StoreWriter(store) as w:
        w.append(np.ones((1, 576), np.float32), ["extra.png"], [""])
        w._journal.close()
        saved = journal_path(store).read_bytes()
    journal_path(store).write_bytes(saved)  # as if killed just after os.replace
    with open_store(store) as s:
        rows = s.rows
    StoreWriter(store).close()
    with open_store(store) as s:
        assert s.rows == rows and s.paths().count("extra.png") == 1


def test_reader_during_a_run_sees_a_complete_store(folder: Path, tmp_path: Path):
    photos = tmp_path / "photos"
    shutil.copytree(folder / "greens", photos / "greens")
    store = tmp_path / "s.h5"
    imgvec.embed([photos], store, model="mobilenetv3small", weights="none", image_size=64)
    for name in ("reds", "blues", "yellows"):
        shutil.copytree(folder / name, photos / name)
    proc = subprocess.Popen(_embed_cmd(photos, store), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen = 0
    try:
        while proc.poll() is None:
            with open_store(store) as s:
                assert s.embeddings().shape == (s.rows, 576) and len(s.paths()) == s.rows
            r = imgvec.query(store, [photos / "greens" / "greens_000.png"], k=1)
            assert r.queries[0].results[0].path == "greens/greens_000.png"
            seen += 1
            time.sleep(0.05)
    finally:
        proc.wait()
    assert proc.returncode == 0, proc.stderr.read()
    assert seen  # it did read while the run was going
    with open_store(store) as s:
        assert s.rows == 80
