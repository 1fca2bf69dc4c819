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
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

import imgvec
from imgvec.errors import BadInputError
from imgvec.vectors.store import open_store

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
    assert all(line.startswith(("imgvec: note: ", "imgvec: warning: ", "imgvec: progress: ")) for line in lines[:-1]), r
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
    with mounted_tmpfs(tmp_path / "fs", "4m") as folder:  # a store of 24 rows and room to append to it once
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
                       and p.name not in ("filler", "photos.h5"))
    assert leftovers in ([], ["photos.h5.journal"]), leftovers  # no temporary or lock files; a journal keeps finished batches
    (small_fs / "filler").unlink()
    _still_queries(full_store, image_dir)
    again = imgvec.embed([more / "photos"], full_store)  # with room again, the run completes
    assert (again.added, again.rows) == (24, 48) and not (small_fs / "photos.h5.journal").exists()


def test_train_checks_its_output_before_fitting(store_and_head, tmp_path: Path, monkeypatch):
    from imgvec.vectors.classifier import LogisticHead

    def never(*args, **kwargs):
        raise AssertionError("the head was fitted before its output was checked")

    monkeypatch.setattr(LogisticHead, "fit", never)
    with pytest.raises(BadInputError, match="cannot write .*nope/head.h5: the folder .* does not exist"):
        imgvec.train(store_and_head[0], tmp_path / "nope" / "head.h5")


def test_keras_refusing_a_backbone_is_one_line(monkeypatch):
    from imgvec.backbones.registry import Weights, get_backbone
    from imgvec.backbones.builder import build_model
    from imgvec.backbones.device import import_keras

    def refuse(*args, **kwargs):
        raise ValueError("Input size must be at least 32x32; Received: input_shape=(64, 64, 3)\nmore detail")

    monkeypatch.setattr(import_keras().applications, "MobileNetV3Small", refuse)
    monkeypatch.setenv("IMGVEC_OFFLINE", "0")  # Keras is asked (and refuses) before any weights are looked for
    for weights in (Weights("random", seed=0), Weights("imagenet")):
        with pytest.raises(BadInputError) as info:
            build_model(get_backbone("mobilenetv3small"), weights, 64)
        assert str(info.value) == ("mobilenetv3small cannot be built for 64px inputs: Input size must be at least "
                                   "32x32; Received: input_shape=(64, 64, 3)")


def test_random_weights_leave_the_global_generators_alone():
    from imgvec.backbones.registry import Weights, get_backbone
    from imgvec.backbones.builder import build_model
    from imgvec.backbones.device import import_tensorflow

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
def test_a_failing_ray_batch_releases_every_actor(monkeypatch, image_dir: Path, tmp_path: Path):
    """Actors still busy with other blocks when one block fails are killed too, not only the idle ones."""
    ray = pytest.importorskip("ray")
    import time

    from imgvec.embedding import distributed
    from imgvec.embedding.embedder import Embedder

    marks = str(tmp_path)

    class FailingWorker:  # defined here so that Ray ships it by value to its workers
        def __init__(self, config: dict) -> None:
            pass

        def embed(self, paths: list[str]) -> list:
            if any(p.endswith("blues_000.png") for p in paths):
                for _ in range(600):  # fail only once the other actor is inside its block (an event, not a guess)
                    if any(name.startswith("busy-") for name in os.listdir(marks)):
                        break
                    time.sleep(0.05)
                raise RuntimeError("this batch failed")
            open(f"{marks}/busy-{paths[0].rsplit('/', 1)[-1]}", "w").close()
            time.sleep(60)  # busy for longer than the test: only a kill ends it early
            open(f"{marks}/finished-{paths[0].rsplit('/', 1)[-1]}", "w").close()
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
        busy = [p.name for p in tmp_path.iterdir()]
        # the other actor was mid-block (it had started one and never finished it): killed, not waited for
        assert busy and all(name.startswith("busy-") for name in busy), busy
    finally:
        ray.shutdown()


# -- outputs that name an input, pseudo file systems, temporary files ---------------------------------
def test_an_output_that_names_an_input_is_refused_before_any_work(store_and_head, image_dir: Path, holdout_dir: Path,
                                                                   tmp_path: Path):
    """``train S -o S`` made the store a head, ``index S -o S`` and ``query S Q --html S`` overwrote it (rc 0)."""
    store, head = tmp_path / "photos.h5", tmp_path / "head.h5"
    shutil.copy(store_and_head[0], store)
    shutil.copy(store_and_head[1], head)
    photos = tmp_path / "photos"
    shutil.copytree(image_dir, photos)
    linked = tmp_path / "same-inode.h5"
    os.link(store, linked)
    query_image = photos / "reds" / "reds_001.png"
    protected = [store, head, query_image]
    before = {p: p.read_bytes() for p in protected}
    commands = {
        "train S -o S": ["train", str(store), "-o", str(store), "--cv", "2"],
        "train S -o a hard link to S": ["train", str(store), "-o", str(linked), "--cv", "2"],
        "index S -o S": ["index", str(store), "-o", str(store)],
        "index S -o S's journal": ["index", str(store), "-o", f"{store}.journal"],
        "index S -o S's lock": ["index", str(store), "-o", str(tmp_path / ".photos.h5.lock")],
        "merge S -o S": ["merge", str(store), "-o", str(store)],
        "query --html S": ["query", str(store), str(query_image), "--html", str(store)],
        "query --html Q": ["query", str(store), str(query_image), "--html", str(query_image)],
        "query --html INDEX": ["query", str(store), str(query_image), "--index", str(head), "--html", str(head)],
        "predict --html HEAD": ["predict", str(head), str(query_image), "--html", str(head)],
        "predict --html an image of a folder it reads": ["predict", str(head), str(photos), "--html",
                                                         str(photos / "blues" / "blues_000.png")],
        "evaluate --html HEAD": ["evaluate", str(head), str(holdout_dir), "--html", str(head)],
        "embed -o an image it embeds": ["embed", str(photos), "-o", str(photos / "reds" / "reds_002.png"), *SMALL],
    }
    for name, r in zip(commands, run_steps(list(commands.values()))):
        _one_error_line(r, "cannot write", "this command")
        assert r["stdout"] == "", name  # refused before any result
    assert {p: p.read_bytes() for p in protected} == before
    assert (photos / "blues" / "blues_000.png").read_bytes() == (image_dir / "blues" / "blues_000.png").read_bytes()
    _still_queries(store, photos)


def test_the_partners_an_output_may_not_name_are_the_files_a_store_writer_makes(store_path: Path, tmp_path: Path):
    """fileio names a store's journal and lock itself (it sits below store.py): the names must stay the same."""
    from imgvec.fileio import _partners
    from imgvec.files.journal import journal_path
    from imgvec.vectors.store import StoreWriter

    store = tmp_path / "photos.h5"
    shutil.copy(store_path, store)
    with StoreWriter(store) as writer:
        writer.append(np.ones((1, writer.provenance.dim), np.float32), ["new.png"], [""])
        made = {p for p in tmp_path.iterdir() if p != store and ".tmp-" not in p.name}
    assert made == {journal_path(store), tmp_path / ".photos.h5.lock"}
    assert made <= {path for _, path in _partners(store)}


def test_proc_sys_and_folders_at_temp_names_are_one_line(store_and_head, image_dir: Path, tmp_path: Path):
    """Root passes os.access on /proc and /sys, which refuse files: that was a traceback from the lock file."""
    store, head = store_and_head
    query_image = str(image_dir / "reds" / "reds_001.png")
    commands = [["embed", str(image_dir), "-o", "/proc/x.h5", *SMALL], ["embed", str(image_dir), "-o", "/sys/x.h5"],
                ["index", str(store), "-o", "/proc/x.h5"], ["train", str(store), "-o", "/sys/x.h5"],
                ["merge", str(store), "-o", "/proc/x.h5"], ["query", str(store), query_image, "--html", "/sys/x.html"]]
    for r in run_steps(commands):
        _one_error_line(r, "cannot write /")
    # folders where temporary names go (an old writer's name, and one of today's form, its pid dead) stay, and
    # the writes still happen
    resumed = tmp_path / "photos.h5"
    shutil.copy(store, resumed)
    dead = _dead_pid()
    folders = [tmp_path / ".photos.h5.tmp-99999", tmp_path / f".photos.h5.tmp-{_host()}-{dead}-0a1b",
               tmp_path / f".head.h5.tmp-{dead}", tmp_path / f".photos.index.h5.tmp-{_host()}-{dead}-00"]
    for folder in folders:
        folder.mkdir()
    embed, train, index = run_steps([["embed", str(image_dir), "-o", str(resumed)],
                                     ["train", str(resumed), "-o", str(tmp_path / "head.h5"), "--cv", "2"],
                                     ["index", str(resumed)]])
    assert embed["code"] == 0 and "0 images embedded, 24 already there" in embed["stdout"], embed
    assert train["code"] == 0 and index["code"] == 0, (train, index)
    assert all(folder.is_dir() for folder in folders)


def _dead_pid() -> int:
    """The pid of a process that has ended."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _host() -> str:
    from imgvec.fileio import temp_path

    return temp_path("x").name.split(".tmp-")[1].split("-")[0]


def test_a_killed_writers_temp_is_removed_by_the_next_write(store_and_head, image_dir: Path, tmp_path: Path):
    """kill -9 during `index`'s save left the whole index as a temp file that no later run removed."""
    store = tmp_path / "photos.h5"
    shutil.copy(store_and_head[0], store)
    killed = subprocess.run([sys.executable, "-c", (
        "import os, signal, imgvec, imgvec.fileio as f\n"
        "f.publish = lambda tmp, path: os.kill(os.getpid(), signal.SIGKILL)  # killed once the temp is written\n"
        f"imgvec.build_index({str(store)!r})")], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    [left] = [p for p in tmp_path.iterdir() if p.name.startswith(".photos.index.h5.tmp-")]
    assert left.stat().st_size > 10_000  # the whole index, under its temp name
    live_writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".photos.index.h5.tmp-{_host()}-{live_writer.pid}-feed"
        other_host = tmp_path / f".photos.index.h5.tmp-00000000-{_dead_pid()}-feed"
        for path in (live, other_host):
            path.write_bytes(b"a writer still at work")
        [r] = run_steps([["index", str(store)]])
        assert r["code"] == 0 and "built a flat index over 24 rows" in r["stdout"], r
        assert not left.exists()  # its writer is gone
        assert live.exists() and other_host.exists()  # a live writer's, and one another machine may still write
    finally:
        live_writer.kill()
        live_writer.wait()
    _still_queries(store, image_dir)  # with the index just written


# -- arguments at the boundary, SIGTERM, formats ------------------------------------------------------
def test_arguments_out_of_range_are_one_line_and_leave_no_store(image_dir: Path, store_and_head, tmp_path: Path):
    out = tmp_path / "new.h5"
    embed = ["embed", str(image_dir), "-o", str(out), "-m", "mobilenetv3small", "--weights", "none"]
    query = ["query", str(store_and_head[0]), str(image_dir / "reds" / "reds_001.png")]
    size_0, size_4096, too_big_a_batch, max_pixels_0, k_0 = run_steps([
        [*embed, "--image-size", "0"],  # was taken as 224
        [*embed, "--image-size", "4096"],
        [*embed, "--image-size", "2048", "--batch-size", "100000"],  # fits no machine: refused before the model loads
        [*embed, "--image-size", "64", "--max-pixels", "0"],  # skipped every image, rc 0
        [*query, "-k", "0"],  # named a --k option that does not exist
    ])
    _one_error_line(size_0, "--image-size 0 is too small for mobilenetv3small (at least 32)")
    _one_error_line(size_4096, "--image-size 4096 is too large (at most 2048")
    _one_error_line(too_big_a_batch, "--image-size 2048 with --batch-size 100000 needs about", "GiB", "fits")
    _one_error_line(max_pixels_0, "--max-pixels must be at least 1, not 0")
    _one_error_line(k_0, "error: -k must be at least 1, not 0")
    assert not out.exists() and not Path(f"{out}.journal").exists()


def test_an_embed_stopped_before_its_first_row_leaves_no_store(image_dir: Path, tmp_path: Path, monkeypatch):
    from imgvec.embedding.embedder import Embedder

    def stopped(self, paths, **kwargs):
        raise KeyboardInterrupt
        yield

    monkeypatch.setattr(Embedder, "embed_files", stopped)
    out = tmp_path / "new.h5"
    with pytest.raises(KeyboardInterrupt, match="nothing was stored yet"):
        imgvec.embed([image_dir], out, model="mobilenetv3small", weights="none", image_size=64)
    assert not out.exists() and not Path(f"{out}.journal").exists()


def test_sigterm_stops_like_ctrl_c_and_the_rerun_completes(image_dir: Path, tmp_path: Path):
    """SIGTERM (kill, a scheduler, docker stop) ended embed with 143 and not a word; now: Ctrl-C's message, work kept."""
    from imgvec.synthetic import make_image_folder

    folder = make_image_folder(tmp_path / "many", per_class=60, size=64, seed=3)
    store = tmp_path / "many.h5"
    command = [sys.executable, "-m", "imgvec", "embed", str(folder), "-o", str(store), *SMALL, "--batch-size", "2"]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    journal, deadline = Path(f"{store}.journal"), time.monotonic() + 240
    while not (journal.exists() and journal.stat().st_size) and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    child.send_signal(signal.SIGTERM)  # batches are stored: the run is under way
    out, err = child.communicate(timeout=120)
    assert child.returncode == 143, (out, err)
    line = err.strip().splitlines()[-1]
    assert line.startswith("imgvec: interrupted (SIGTERM); ") and "rows are safely stored in" in line, err
    kept = int(line.split("; ")[1].split()[0])
    assert 0 < kept < 240 and out == ""
    [again] = run_steps([["embed", str(folder), "-o", str(store)]])
    assert again["code"] == 0 and f"{240 - kept} images embedded, {kept} already there" in again["stdout"], again
    assert "240 rows in all" in again["stdout"]
    with open_store(store) as s:
        assert sorted(s.paths()) == sorted(str(p.relative_to(folder)) for p in folder.rglob("*.png"))


def test_unsupported_formats_are_listed_as_skipped(image_dir: Path, tmp_path: Path):
    """An .avif or .heic photo was silently ignored: not embedded, not named as skipped."""
    from PIL import Image, features

    photos = tmp_path / "photos"
    shutil.copytree(image_dir, photos)
    (photos / "reds" / "phone.heic").write_bytes(b"\0\0\0\x18ftypheic" + bytes(64))
    (photos / "reds" / "scan.jxl").write_bytes(b"\xff\x0a" + bytes(64))
    avif = features.check("avif")
    if avif:
        Image.open(image_dir / "reds" / "reds_000.png").convert("RGB").save(photos / "reds" / "new.avif")
    else:
        (photos / "reds" / "new.avif").write_bytes(b"\0\0\0\x1cftypavif" + bytes(64))
    store = tmp_path / "photos.h5"
    embed, again = run_steps([["embed", str(photos), "-o", str(store), *SMALL], ["embed", str(photos), "-o", str(store)]])
    assert embed["code"] == 0 and f"{25 if avif else 24} images embedded, 0 already there, {2 if avif else 3} skipped" \
        in embed["stdout"], embed
    assert "imgvec: warning: skipped reds/phone.heic: unsupported format (.heic): imgvec reads " in embed["stderr"]
    assert "imgvec: warning: skipped reds/scan.jxl: unsupported format (.jxl)" in embed["stderr"]
    assert ("skipped reds/new.avif" in embed["stderr"]) != avif
    with open_store(store) as s:
        assert {k for k, _ in s.skipped()} == {"reds/phone.heic", "reds/scan.jxl"} | (set() if avif else {"reds/new.avif"})
    assert again["code"] == 0 and "0 images embedded" in again["stdout"]  # skipped files are tried again, and skipped
