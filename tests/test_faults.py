"""Attacks on imgvec's files: FIFOs, devices and sockets where images should be, output locations
that are missing, read-only, full or a folder. Every command must finish with the right output,
or one ``imgvec: error:`` line and exit 2, and nothing already stored may be lost.

The CLI runs in a child process with a timeout (a hang fails the test instead of stalling the
suite); one child runs a whole scenario so TensorFlow is imported once. Read-only and full
locations are small tmpfs mounts (root is not stopped by chmod); without permission to mount
those tests are skipped with the reason.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

import imgvec
from imgvec.errors import BadInputError

from test_fileio import fill, mounted_tmpfs, remount_ro

SMALL = ["-m", "mobilenetv3small", "--weights", "none", "--image-size", "64"]

# Runs each step in one process: a CLI command (its exit code and output are recorded) or,
# for a step starting with "!", a line of Python (to replace a stored image by a FIFO, say).
_DRIVER = r"""
import json, os, sys
from typer.testing import CliRunner
from imgvec.cli import app

results = []
for step in json.loads(sys.argv[1]):
    if step[0] == "!":
        exec(step[1])
        results.append(None)
        continue
    r = CliRunner().invoke(app, step)
    crash = r.exception if r.exception is not None and not isinstance(r.exception, SystemExit) else None
    results.append({"code": r.exit_code, "stdout": r.stdout, "stderr": r.stderr, "crash": repr(crash) if crash else None})
print(json.dumps(results))
"""


def run_steps(steps: list[list[str]], timeout: float = 300) -> list[dict]:
    """Run ``steps`` in a child process; a step still running after ``timeout`` seconds fails the test."""
    try:
        done = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(steps)], capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    except subprocess.TimeoutExpired:
        pytest.fail(f"imgvec hung: the steps did not finish in {timeout:.0f}s: {steps}")
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.splitlines()[-1])
    for step, r in zip(steps, results):
        assert r is None or r["crash"] is None, f"{step}: {r['crash']}\n{r['stderr']}"
    return results


def _specials(folder: Path, suffix: str = "") -> list[str]:
    """A FIFO, a link to /dev/zero and a unix socket named like images in ``folder``; their names."""
    folder.mkdir(parents=True, exist_ok=True)
    os.mkfifo(folder / f"pipe{suffix}.jpg")
    os.symlink("/dev/zero", folder / f"zero{suffix}.png")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(folder / f"sock{suffix}.png"))
    sock.close()
    return [f"pipe{suffix}.jpg", f"zero{suffix}.png", f"sock{suffix}.png"]


def _one_error_line(r: dict, *needles: str) -> None:
    """Exit 2 and one error line (notes, such as the random-weights one, may come before it)."""
    lines = r["stderr"].strip().splitlines()
    assert r["code"] == 2 and lines[-1].startswith("imgvec: error: "), r
    assert all(line.startswith(("imgvec: note: ", "imgvec: warning: ")) for line in lines[:-1]), r
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])


def test_fifo_device_and_socket_never_hang_any_command(tmp_path: Path, image_dir: Path):
    photos = tmp_path / "photos"
    shutil.copytree(image_dir, photos)
    _specials(photos / "reds")
    queries = tmp_path / "q"
    _specials(queries)
    shutil.copy(image_dir / "blues" / "blues_001.png", queries / "blues.png")
    only_bad = tmp_path / "bad"
    bad_names = _specials(only_bad)
    labelled_bad = tmp_path / "heldout"
    _specials(labelled_bad / "reds")
    store, head = str(tmp_path / "s.h5"), str(tmp_path / "h.h5")
    stored = [photos / "reds" / "reds_000.png", photos / "blues" / "blues_000.png", photos / "greens" / "greens_000.png"]
    replace = ("import os, socket\n"
               f"for p in {[str(p) for p in stored]!r}: os.remove(p)\n"
               f"os.mkfifo({str(stored[0])!r}); os.symlink('/dev/zero', {str(stored[1])!r})\n"
               f"s = socket.socket(socket.AF_UNIX); s.bind({str(stored[2])!r}); s.close()")
    r = run_steps([
        ["embed", str(photos), "-o", store, *SMALL],
        ["train", store, "-o", head, "--cv", "2"],
        ["query", store, str(queries), "-k", "3", "-f", "json"],
        ["query", store, str(only_bad)],
        ["predict", head, str(queries), "-f", "json"],
        ["predict", head, str(only_bad / "pipe.jpg")],
        ["evaluate", head, str(labelled_bad)],
        ["!", replace],  # stored images replaced by a FIFO, a device link and a socket
        ["dedup", store, "-f", "json"],
        ["embed", str(photos), "-o", store],
        ["query", store, str(queries / "blues.png"), "-k", "2", "-f", "json"],
    ])
    embed, train, query, query_bad, predict, predict_bad, evaluate, _, dedup, again, query_after = r
    assert embed["code"] == 0 and "24 images embedded, 0 already there, 3 skipped" in embed["stdout"]
    assert "skipped reds/pipe.jpg: a FIFO (named pipe), not a regular file" in embed["stderr"]
    assert "skipped reds/zero.png: a character device, not a regular file" in embed["stderr"]
    assert "skipped reds/sock.png: a socket, not a regular file" in embed["stderr"]
    assert train["code"] == 0
    results = json.loads(query["stdout"])["queries"]
    assert query["code"] == 0 and [q["query"].endswith("blues.png") for q in results] == [True]
    assert len(results[0]["results"]) == 3 and query["stderr"].count("imgvec: warning: skipped") == 3
    _one_error_line(query_bad, "no input image could be read (3 skipped; first", "not a regular file")
    assert predict["code"] == 0 and len(json.loads(predict["stdout"])["predictions"]) == 1
    _one_error_line(predict_bad, "(1 skipped; first", "pipe.jpg: a FIFO (named pipe), not a regular file")
    _one_error_line(evaluate, "no input image could be read (3 skipped")
    assert dedup["code"] == 0 and "3 files could not be read for hashing" in dedup["stderr"]
    assert again["code"] == 0 and "0 images embedded, 24 already there" in again["stdout"]
    assert query_after["code"] == 0 and len(json.loads(query_after["stdout"])["queries"][0]["results"]) == 2
    # The three special files of the folder that holds nothing else were each looked at and skipped, never
    # read (a FIFO read would have hung until the timeout), and are still what they were.
    assert sorted(bad_names) == ["pipe.jpg", "sock.png", "zero.png"]
    assert f"(3 skipped; first {only_bad / 'pipe.jpg'}: a FIFO (named pipe)" in query_bad["stderr"]
    assert stat.S_ISFIFO(os.lstat(only_bad / "pipe.jpg").st_mode) and os.readlink(only_bad / "zero.png") == "/dev/zero"
    assert stat.S_ISSOCK(os.lstat(only_bad / "sock.png").st_mode)


@pytest.fixture(scope="module")
def store_and_head(tmp_path_factory: pytest.TempPathFactory, store_path: Path) -> tuple[Path, Path]:
    """A store and a head trained on it; tests must not modify them."""
    folder = tmp_path_factory.mktemp("store")
    store, head = folder / "photos.h5", folder / "head.h5"
    shutil.copy(store_path, store)
    imgvec.train(store, head, cv=2)
    return store, head


def _writing_commands(store: Path, head: Path, photos: Path, holdout: Path, out: Path, stores: Path) -> dict:
    """Every command that writes, its output at ``out`` (a path whose location is bad)."""
    compare = ["compare", str(photos), "-m", "mobilenetv3small", "--weights", "none", "--image-size", "64", "--cv", "2"]
    query_image = str(photos / "reds" / "reds_001.png")
    return {
        "embed": ["embed", str(photos), "-o", str(out / "new.h5"), *SMALL],
        "index": ["index", str(store), "-o", str(out / "photos.index.h5")],
        "train": ["train", str(store), "-o", str(out / "head.h5"), "--cv", "2"],
        "merge": ["merge", str(store), "-o", str(out / "merged.h5")],
        "query --html": ["query", str(store), query_image, "--html", str(out / "q.html")],
        "predict --html": ["predict", str(head), query_image, "--html", str(out / "p.html")],
        "evaluate --html": ["evaluate", str(head), str(holdout), "--html", str(out / "e.html")],
        "compare --html": [*compare, "--stores", str(stores), "--html", str(out / "c.html")],
        "compare --stores": [*compare, "--stores", str(out / "compare")],
    }


def _still_queries(store: Path, photos: Path) -> None:
    result = imgvec.query(store, [photos / "reds" / "reds_001.png"], k=3)
    assert len(result.queries[0].results) == 3


def test_missing_folder_and_folder_named_as_output_fail_first(store_and_head, image_dir: Path, holdout_dir: Path,
                                                              tmp_path: Path):
    store, head = store_and_head
    before = store.read_bytes()
    stores = tmp_path / "compare-stores"
    missing = _writing_commands(store, head, image_dir, holdout_dir, tmp_path / "nope" / "deeper", stores)
    del missing["compare --stores"]  # compare makes its stores folder, parents included
    folders = tmp_path / "folders"
    for name in ("new.h5", "photos.index.h5", "head.h5", "merged.h5", "q.html", "p.html", "e.html", "c.html"):
        (folders / name).mkdir(parents=True)
    (folders / "compare").write_text("a file where compare wants its stores folder")
    named_folders = _writing_commands(store, head, image_dir, holdout_dir, folders, stores)
    results = run_steps(list(missing.values()) + list(named_folders.values()))
    for name, r in zip(missing, results[: len(missing)]):
        _one_error_line(r, "cannot write", "nope/deeper", "does not exist")
        assert r["stdout"] == "", name  # checked before any result was printed
    for name, r in zip(named_folders, results[len(missing):]):
        _one_error_line(r, "cannot write", str(folders), "is a folder" if name != "compare --stores" else "not a folder")
    assert not stores.exists() or not any(stores.iterdir())  # compare did no work before refusing its page
    assert store.read_bytes() == before
    _still_queries(store, image_dir)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    with mounted_tmpfs(tmp_path / "fs", "3m") as folder:
        yield folder


def test_read_only_location(store_and_head, image_dir: Path, holdout_dir: Path, tmp_path: Path, small_fs: Path):
    store, head = store_and_head
    ro_store = small_fs / "photos.h5"
    shutil.copy(store, ro_store)
    remount_ro(small_fs)
    commands = _writing_commands(store, head, image_dir, holdout_dir, small_fs, tmp_path / "compare-stores")
    commands["embed into a store there"] = ["embed", str(image_dir), "-o", str(ro_store)]
    commands["index beside a store there"] = ["index", str(ro_store)]
    for name, r in zip(commands, run_steps(list(commands.values()))):
        _one_error_line(r, "cannot write", "the file system is read-only")
        assert r["stdout"] == "", name
    _still_queries(ro_store, image_dir)


def test_full_disk_loses_nothing(store_and_head, image_dir: Path, holdout_dir: Path, tmp_path: Path, small_fs: Path):
    store, head = store_and_head
    full_store = small_fs / "photos.h5"
    shutil.copy(store, full_store)
    more = tmp_path / "more"
    shutil.copytree(image_dir, more / "photos")  # outside the store's root: 24 images it does not have
    fill(small_fs)
    before = full_store.read_bytes()
    commands = _writing_commands(store, head, image_dir, holdout_dir, small_fs, tmp_path / "compare-stores")
    commands["embed into a store there"] = ["embed", str(more / "photos"), "-o", str(full_store), *SMALL]
    commands["index beside a store there"] = ["index", str(full_store)]
    for name, r in zip(commands, run_steps(list(commands.values()))):
        _one_error_line(r, "cannot write", "no space left on the disk")
    assert full_store.read_bytes() == before
    leftovers = sorted(str(p.relative_to(small_fs)) for p in small_fs.rglob("*") if p.is_file()
                       and p.name not in ("filler", "photos.h5") and not p.name.endswith(".lock"))  # locks stay
    assert leftovers in ([], ["photos.h5.journal"]), leftovers  # no temporary files; a journal keeps finished batches
    (small_fs / "filler").unlink()
    _still_queries(full_store, image_dir)
    again = imgvec.embed([more / "photos"], full_store)  # with room again, the run completes
    assert (again.added, again.rows) == (24, 48) and not (small_fs / "photos.h5.journal").exists()


def test_train_checks_its_output_before_fitting(store_and_head, tmp_path: Path, monkeypatch):
    from imgvec.classifier import LogisticHead

    def never(*args, **kwargs):
        raise AssertionError("the head was fitted before its output was checked")

    monkeypatch.setattr(LogisticHead, "fit", never)
    with pytest.raises(BadInputError, match="cannot write .*nope/head.h5: the folder .* does not exist"):
        imgvec.train(store_and_head[0], tmp_path / "nope" / "head.h5")


def test_keras_refusing_a_backbone_is_one_line(monkeypatch):
    from imgvec.backbones import Weights, build_model, get_backbone
    from imgvec.device import import_keras

    def refuse(*args, **kwargs):
        raise ValueError("Input size must be at least 32x32; Received: input_shape=(64, 64, 3)\nmore detail")

    monkeypatch.setattr(import_keras().applications, "MobileNetV3Small", refuse)
    for weights in (Weights("random", seed=0), Weights("imagenet")):
        with pytest.raises(BadInputError) as info:
            build_model(get_backbone("mobilenetv3small"), weights, 64)
        assert str(info.value) == ("mobilenetv3small cannot be built for 64px inputs: Input size must be at least "
                                   "32x32; Received: input_shape=(64, 64, 3)")


def test_random_weights_leave_the_global_generators_alone():
    from imgvec.backbones import Weights, build_model, get_backbone
    from imgvec.device import import_tensorflow

    tf = import_tensorflow()

    def draws() -> tuple:
        return random.random(), float(np.random.random()), float(tf.random.uniform([]))

    def seeded() -> None:
        random.seed(7)
        np.random.seed(7)
        tf.random.set_seed(7)

    seeded()
    expected = draws()
    seeded()
    first = build_model(get_backbone("mobilenetv3small"), Weights("random", seed=0), 64).get_weights()
    assert draws() == expected  # as if no model had been built
    second = build_model(get_backbone("mobilenetv3small"), Weights("random", seed=0), 64).get_weights()
    other = build_model(get_backbone("mobilenetv3small"), Weights("random", seed=1), 64).get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


@pytest.mark.slow  # starting Ray takes ~25 s here
def test_a_failing_ray_batch_releases_every_actor(monkeypatch, image_dir: Path):
    """Actors still busy with other blocks when one block fails are killed too, not only the idle ones."""
    ray = pytest.importorskip("ray")
    import time

    from imgvec import distributed
    from imgvec.embedder import Embedder

    class FailingWorker:  # defined here so that Ray ships it by value to its workers
        def __init__(self, config: dict) -> None:
            pass

        def embed(self, paths: list[str]) -> list:
            if any(p.endswith("blues_000.png") for p in paths):
                raise RuntimeError("this batch failed")
            time.sleep(2)  # the other actor is still busy when the failure arrives
            return []

    killed = []
    real_kill = ray.kill
    monkeypatch.setattr(distributed, "_Worker", FailingWorker)
    monkeypatch.setattr(ray, "kill", lambda actor, **kwargs: (killed.append(actor), real_kill(actor, **kwargs)))
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        paths = sorted(str(p) for p in image_dir.rglob("*.png"))
        batches = distributed.embed_files_on_ray(Embedder("mobilenetv3small", "none", 64), paths, workers=2,
                                                 block_size=2)
        with pytest.raises(ray.exceptions.RayTaskError, match="this batch failed"):
            list(batches)
        assert len(killed) == 2 and len(set(killed)) == 2
    finally:
        ray.shutdown()
