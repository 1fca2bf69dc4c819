"""An append-only, checksummed record log: where embed writes rows before they reach the store.

HDF5 files are not safe to kill mid-write, so a run never modifies a store in place: each
batch is appended here as one framed record (magic, length, CRC-32, payload), and the store
is rewritten from store + journal under a temporary name and renamed into place at the end.
A record cut short by a kill fails its length or checksum and is ignored, with everything
after it; every complete record survives.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

MAGIC = b"IVJ1"
_FRAME = struct.Struct("<4sQI")  # magic, payload length, crc32 of payload


@dataclass
class Record:
    """One batch: rows that embedded, and files that were skipped."""

    embeddings: np.ndarray
    keys: list[str]
    labels: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    store_id: str = ""


def _encode(record: Record) -> bytes:
    meta = json.dumps({"store_id": record.store_id, "keys": record.keys, "labels": record.labels,
                       "skipped": record.skipped, "shape": list(record.embeddings.shape)}).encode()
    return struct.pack("<I", len(meta)) + meta + np.ascontiguousarray(record.embeddings, "<f4").tobytes()


def _decode(payload: bytes) -> Record:
    (n,) = struct.unpack_from("<I", payload)
    meta = json.loads(payload[4 : 4 + n])
    emb = np.frombuffer(payload[4 + n :], "<f4").reshape(meta["shape"]).astype(np.float32)
    return Record(emb, meta["keys"], meta["labels"], [tuple(s) for s in meta["skipped"]], meta["store_id"])


def journal_path(store: str | os.PathLike[str]) -> Path:
    store = Path(store)
    return store.with_name(store.name + ".journal")


class JournalWriter:
    """Appends records; each ``append`` is one ``write`` of a whole frame, synced to disk.

    The file is opened on the first append, so a writer that appends nothing leaves no file.
    """

    def __init__(self, path: str | os.PathLike[str], fsync: bool = True) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self._fh: Any = None

    def _open(self) -> Any:
        valid = valid_length(self.path)
        fh = open(self.path, "ab")
        if fh.tell() != valid:  # drop a torn tail before appending after it
            fh.truncate(valid)
            fh.seek(valid)
        return fh

    def append(self, record: Record) -> None:
        if self._fh is None:
            self._fh = self._open()
        payload = _encode(record)
        self._fh.write(_FRAME.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload)
        self._fh.flush()
        if self.fsync:
            os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "JournalWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _frames(path: Path) -> Iterator[tuple[int, bytes]]:
    """(end offset, payload) of each complete, intact record, stopping at the first bad one."""
    if not path.exists():
        return
    with open(path, "rb") as fh:
        offset = 0
        while True:
            head = fh.read(_FRAME.size)
            if len(head) < _FRAME.size:
                return
            magic, length, crc = _FRAME.unpack(head)
            if magic != MAGIC:
                return
            payload = fh.read(length)
            if len(payload) < length or zlib.crc32(payload) != crc:
                return
            offset += _FRAME.size + length
            yield offset, payload


def valid_length(path: Path) -> int:
    end = 0
    for end, _ in _frames(path):
        pass
    return end


def read_journal(path: str | os.PathLike[str]) -> Iterator[Record]:
    """Every intact record, in the order written, one at a time (a journal can be large)."""
    for _, payload in _frames(Path(path)):
        yield _decode(payload)
