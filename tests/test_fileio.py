"""fileio: regular files only, output paths checked before the work, atomic writes with one-line errors.

Read-only and full locations are small tmpfs mounts (the tests run as root, which chmod does
not stop); where mounting is not permitted they are skipped with the reason.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from imgvec import fileio
from imgvec.errors import BadInputError


@contextlib.contextmanager
def mounted_tmpfs(folder: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` at ``folder``, unmounted afterwards; skips the test where mounting is not permitted.

    ``remount_ro(folder)`` and ``fill(folder)`` then make it read-only or full.
    """
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}): "
                    "read-only and full disks are not tested")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    with mounted_tmpfs(tmp_path / "fs", "1m") as folder:
        yield folder


def remount_ro(folder: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)


def fill(folder: Path, leave: int = 0) -> None:
    """Fill the file system holding ``folder`` up to ``leave`` free bytes."""
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    with open(folder / "filler", "wb") as fh:
        try:
            fh.write(b"\0" * max(0, free - leave))
        except OSError as error:
            assert error.errno == errno.ENOSPC


def _specials(folder: Path) -> dict[str, str]:
    os.mkfifo(folder / "pipe")
    os.symlink("/dev/zero", folder / "zero")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(folder / "sock"))
    sock.close()
    return {"pipe": "a FIFO (named pipe)", "zero": "a character device", "sock": "a socket"}


def test_open_regular_refuses_everything_but_regular_files_without_blocking(tmp_path: Path):
    (tmp_path / "file").write_bytes(b"data")
    with fileio.open_regular(tmp_path / "file") as fh:
        assert fh.read() == b"data"
    for name, kind in {**_specials(tmp_path), ".": "a folder"}.items():
        with pytest.raises(fileio.NotRegularFile) as info:
            fileio.open_regular(tmp_path / name)
        assert info.value.strerror == f"{kind}, not a regular file"
    with pytest.raises(FileNotFoundError):
        fileio.open_regular(tmp_path / "gone")


def test_require_regular_says_what_the_path_is(tmp_path: Path):
    _specials(tmp_path)
    with pytest.raises(BadInputError, match="is a FIFO .named pipe., not a store"):
        fileio.require_regular(tmp_path / "pipe", "a store")
    with pytest.raises(BadInputError, match="no such file"):
        fileio.require_regular(tmp_path / "gone", "a store")


def test_check_writable_names_the_problem(tmp_path: Path):
    assert fileio.check_writable(tmp_path / "new.h5") == tmp_path / "new.h5"
    (tmp_path / "old.h5").write_bytes(b"x")
    fileio.check_writable(tmp_path / "old.h5")  # overwriting a regular file is fine
    _specials(tmp_path)
    cases = {tmp_path / "nope" / "x.h5": "the folder .*nope does not exist",
             tmp_path / "old.h5" / "x.h5": ".*old.h5 is not a folder",
             tmp_path: "it is a folder",
             tmp_path / "pipe": "it is a FIFO"}
    for path, why in cases.items():
        with pytest.raises(BadInputError, match=f"cannot write {path}: {why}"):
            fileio.check_writable(path)


def test_read_only_and_full_file_systems(small_fs: Path):
    fileio.write_text(small_fs / "page.html", "kept")
    fill(small_fs, leave=4096)
    with pytest.raises(BadInputError, match="no space left on the disk .* MB free"):
        fileio.check_space(small_fs / "big.h5", 1 << 20)
    with pytest.raises(BadInputError, match=r"^cannot write .*page.html: no space left on the disk$"):
        fileio.write_bytes(small_fs / "page.html", b"y" * 100_000)
    assert (small_fs / "page.html").read_text() == "kept"  # the old file survives
    assert sorted(p.name for p in small_fs.iterdir()) == ["filler", "page.html"]  # no temporary file left
    remount_ro(small_fs)
    with pytest.raises(BadInputError, match="cannot write .*new.html: the file system is read-only"):
        fileio.check_writable(small_fs / "new.html")
    with pytest.raises(BadInputError, match="cannot write .*sub: the file system is read-only"):
        fileio.make_folder(small_fs / "sub")


def test_make_folder(tmp_path: Path):
    assert fileio.make_folder(tmp_path / "a" / "b").is_dir()
    (tmp_path / "f").write_text("x")
    with pytest.raises(BadInputError, match="cannot write .*f: it is not a folder"):
        fileio.make_folder(tmp_path / "f")


def test_atomic_path_removes_the_temporary_file_on_any_failure(tmp_path: Path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with fileio.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_write_error_reads_errno_from_hdf5_messages(tmp_path: Path):
    error = OSError("Can't write data (file write failed: time = ..., errno = 28, error message = 'No space')")
    assert str(fileio.write_error(tmp_path / "s.h5", error)) == f"cannot write {tmp_path / 's.h5'}: no space left on the disk"
    assert "permission denied" in str(fileio.write_error("x", PermissionError(errno.EACCES, "Permission denied")))


@pytest.mark.parametrize("writer", ["new store", "fold", "head"])
def test_temporary_files_are_never_created_through_a_link_put_at_their_name(tmp_path: Path, monkeypatch, writer):
    """Issue 30: a temporary file is created exclusively (O_EXCL), so a link someone put at its name (here,
    with the random part of the name made known) makes one line and nothing outside the folder."""
    import numpy as np

    from imgvec.files.provenance import Provenance
    from imgvec.vectors.classifier import LogisticHead, save_head
    from imgvec.vectors.store import StoreWriter, create_store

    prov = Provenance("mobilenetv3small", "random", 0, None, None, 64, "in model", 576)
    store, outside = tmp_path / "s.h5", tmp_path / "elsewhere" / "target"
    outside.parent.mkdir()
    if writer != "new store":
        with create_store(store, prov, str(tmp_path)) as w:
            w.append(np.eye(4, 576, dtype=np.float32), ["a", "b", "c", "d"], ["x", "x", "y", "y"])
    target = tmp_path / "head.h5" if writer == "head" else store
    monkeypatch.setattr(fileio.secrets, "token_hex", lambda n: "feedbeef")  # the name made known
    monkeypatch.setattr(fileio, "_try_create", lambda path, parent: None)  # its probe would meet the link first
    link = fileio.temp_path(target)
    link.symlink_to(outside)
    with pytest.raises(BadInputError, match="cannot write") as error:
        if writer == "new store":
            create_store(store, prov, str(tmp_path))
        elif writer == "fold":
            with StoreWriter(store) as w:
                w.append(np.ones((1, 576), np.float32), ["e"], ["y"])
        else:
            head = LogisticHead(cv=2, Cs=(1.0,)).fit(np.eye(4, 576, dtype=np.float32), ["x", "x", "y", "y"])
            save_head(head, target, prov, "sid", 0, ["a", "b", "c", "d"])
    assert "\n" not in str(error.value)
    assert not outside.exists()  # (the link itself, at this writer's temporary name, is removed with it)
