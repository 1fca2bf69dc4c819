"""--engine ray on a local Ray started by the test: same rows as a local run, resumable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import imgvec
from imgvec.errors import BadInputError
from imgvec.vectors.store import open_store

ray = pytest.importorskip("ray")
SMALL = dict(model="mobilenetv3small", weights="none", image_size=64, batch_size=4)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()


def _by_path(store: Path) -> dict[str, np.ndarray]:
    with open_store(store) as s:
        return dict(zip(s.paths(), s.embeddings()))


def test_ray_engine_matches_local_engine(local_ray, image_dir: Path, store_path: Path, tmp_path: Path):
    folder = tmp_path / "photos"
    import shutil

    shutil.copytree(image_dir, folder)
    (folder / "reds" / "bad.png").write_bytes(b"garbage")
    out = tmp_path / "ray.h5"
    s = imgvec.embed([folder], out, engine="ray", ray_workers=2, **SMALL)
    assert (s.added, [k for k, _ in s.skipped]) == (24, ["reds/bad.png"])
    ray_rows, local_rows = _by_path(out), _by_path(store_path)
    assert set(ray_rows) == set(local_rows)
    for key, emb in local_rows.items():
        other = ray_rows[key]
        assert float(emb @ other / (np.linalg.norm(emb) * np.linalg.norm(other))) >= 0.9999
    again = imgvec.embed([folder], out, engine="ray", ray_workers=1)
    assert (again.added, again.already) == (0, 24)


def test_killed_ray_run_resumes_exactly_once(image_dir: Path, store_path: Path, tmp_path: Path):
    """The driver (and the local Ray it started) killed mid-run; a second run finishes the job."""
    import shutil

    # Enough images that the run is still going when its first batch reaches the journal: the compiled
    # model embeds these 64-px images in milliseconds, and the kill must land mid-run.
    folder = tmp_path / "photos"
    shutil.copytree(image_dir, folder)
    for i in range(8):
        for image in sorted(image_dir.rglob("*.png")):
            target = folder / "more" / f"{i}-{image.name}"
            target.parent.mkdir(exist_ok=True)
            shutil.copy(image, target)
    out = tmp_path / "ray.h5"
    cmd = [sys.executable, "-m", "imgvec", "embed", str(folder), "-o", str(out), "-m", "mobilenetv3small",
           "--weights", "none", "--image-size", "64", "--batch-size", "2", "--engine", "ray", "--ray-workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if out.with_name(out.name + ".journal").exists():  # some batches are in: kill now
            break
        time.sleep(0.01)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed: the test proves nothing"
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    rows = _by_path(out)
    with open_store(out) as s:
        assert len(s.paths()) == len(set(s.paths())) == 24 * 9
    local = _by_path(store_path)
    assert set(local) <= set(rows)
    for key in local:
        np.testing.assert_allclose(rows[key], local[key], rtol=1e-4, atol=1e-5)


def test_without_ray_the_message_says_how_to_install(monkeypatch, image_dir: Path, tmp_path: Path):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(BadInputError, match=r"pip install 'imgvec\[ray\]'"):
        imgvec.embed([image_dir], tmp_path / "s.h5", engine="ray", **SMALL)
    with pytest.raises(BadInputError, match="expected one of local, ray"):
        imgvec.embed([image_dir], tmp_path / "s.h5", engine="spark", **SMALL)
