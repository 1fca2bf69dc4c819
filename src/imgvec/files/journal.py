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
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from imgvec.errors import BadInputError, FileNote
from imgvec.files.values import describe_unusable, unusable_rows
from imgvec.fileio import NotRegularFile, open_regular, open_regular_append

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


class JournalError(BadInputError):
    """A record that passed its checksum but is not what imgvec writes (forged, or from a bug)."""


def _damaged(path: Any, number: int, what: str) -> JournalError:
    return JournalError(f"{path}: damaged imgvec journal (record {number}: {what}); the store beside it is intact: "
                        "delete the journal to drop the rows it holds, then embed again")


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _decode(payload: bytes, path: Any = "journal", number: int = 1, dim: int | None = None) -> Record:
    """The record in ``payload``, checked field by field (a CRC only says the bytes are as written)."""
    if len(payload) < 4:
        raise _damaged(path, number, "shorter than its header")
    (n,) = struct.unpack_from("<I", payload)
    if n > len(payload) - 4:
        raise _damaged(path, number, f"metadata of {n:,} bytes in a record of {len(payload):,}")
    try:
        meta = json.loads(payload[4 : 4 + n])
    except (ValueError, RecursionError):
        raise _damaged(path, number, "its metadata is not JSON") from None
    if not isinstance(meta, dict):
        raise _damaged(path, number, "its metadata is not an object")
    keys, labels, skipped, shape = (meta.get(k) for k in ("keys", "labels", "skipped", "shape"))
    if not (_strings(keys) and _strings(labels) and len(keys) == len(labels)):
        raise _damaged(path, number, "keys and labels are not two lists of names of one length")
    if not (isinstance(skipped, list) and all(isinstance(s, list) and len(s) == 2 and _strings(s) for s in skipped)):
        raise _damaged(path, number, "skipped is not a list of (name, reason) pairs")
    if not isinstance(meta.get("store_id"), str):
        raise _damaged(path, number, "no store_id")
    if not (isinstance(shape, list) and len(shape) == 2 and all(type(v) is int and v >= 0 for v in shape)
            and shape[0] == len(keys) and (dim is None or shape[1] == dim)):
        want = f"[{len(keys)}, {dim if dim is not None else 'dim'}]"
        raise _damaged(path, number, f"shape {str(shape)[:40]} is not {want}")
    body = len(payload) - 4 - n
    if body != shape[0] * shape[1] * 4:
        raise _damaged(path, number, f"{body:,} bytes of vectors for shape {shape}")
    emb = np.frombuffer(payload, "<f4", offset=4 + n).reshape(shape).astype(np.float32)
    unusable = unusable_rows(emb)
    if unusable.any():
        bad = [keys[i] for i in np.flatnonzero(unusable)[:3]]
        raise _damaged(path, number, f"{describe_unusable()} in the vectors of {int(unusable.sum())} images, "
                                     f"first {', '.join(repr(k[:80]) for k in bad)}")
    return Record(emb, keys, labels, [(s[0], s[1]) for s in skipped], meta["store_id"])


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
        fh = _opened(self.path, open_regular_append)
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


def _opened(path: Path, opener: Any) -> Any:
    """``opener(path)``, with anything but a regular file (a FIFO, a device) as one line."""
    try:
        return opener(path)
    except NotRegularFile as error:
        raise BadInputError(f"{path}: is {error.strerror.split(',')[0]}, not an imgvec journal; remove it") from None


def _frames(path: Path) -> Iterator[tuple[int, bytes]]:
    """(end offset, payload) of each complete, intact record, stopping at the first bad one."""
    if not os.path.lexists(path):
        return
    with _opened(path, lambda p: open_regular(p, follow_links=False)) as fh:  # a link there is refused
        size = os.fstat(fh.fileno()).st_size
        offset = 0
        while True:
            head = fh.read(_FRAME.size)
            if len(head) < _FRAME.size:
                return
            magic, length, crc = _FRAME.unpack(head)
            if magic != MAGIC or length > size - offset - _FRAME.size:  # a torn tail, never a huge read
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


def read_journal(path: str | os.PathLike[str], dim: int | None = None) -> Iterator[Record]:
    """Every intact record, in the order written, one at a time (a journal can be large).

    A torn tail (a kill mid-write) ends the journal quietly; a record that is intact but not
    what imgvec writes (shape, names, ``dim``-wide finite vectors) is a :class:`JournalError`; a
    record holding a string no store can hold (:func:`unstorable`) is left out with a
    :class:`~imgvec.errors.FileNote`, so the rest folds and the journal goes with the fold.
    """
    for number, (_, payload) in enumerate(_frames(Path(path)), 1):
        record = _decode(payload, path, number, dim)
        bad = unstorable(record)
        if bad is None:
            yield record
        else:  # the others still fold; this one is gone with the journal once they have
            warnings.warn(FileNote(f"{path}: record {number} dropped ({len(record.keys)} rows): {bad}"),
                          stacklevel=2)


def unstorable(record: Record) -> str | None:
    """Why a string of ``record`` cannot go into a store (a NUL byte, or text that is not UTF-8 even with
    the store's surrogate escapes for undecodable file-name bytes), or None when all can."""
    names = [("key", k) for k in record.keys] + [("label", v) for v in record.labels] + [
        (what, v) for pair in record.skipped for what, v in zip(("skipped name", "skip reason"), pair)]
    for what, value in names:
        if "\0" in value:
            return f"a {what} holds a NUL byte ({_shown(value)})"
        try:
            value.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            return f"a {what} is not valid UTF-8 ({_shown(value)})"
    return None


def _shown(value: str, limit: int = 60) -> str:
    text = ascii(value)  # a NUL, an escape or a lone surrogate shown as an escape, never as itself
    return text if len(text) <= limit else text[: limit - 3] + "..."
