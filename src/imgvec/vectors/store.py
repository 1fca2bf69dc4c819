"""The HDF5 store: embeddings, image paths, labels, skipped files and provenance.

Layout (readable with plain h5py, documented in the README)::

    /embeddings        float32 (N, D), chunked, appendable
    /paths             UTF-8 strings (N,), relative to the root attribute
    /labels            UTF-8 strings (N,), "" where unknown
    /skipped/paths     UTF-8 strings, files that could not be decoded
    /skipped/reasons   UTF-8 strings, why
    attrs              provenance fields, root, store_id, generation, rows

A store file is never modified in place while a run is under way. :class:`StoreWriter`
holds a lock, appends each batch to a checksummed journal beside the store
(``photos.h5.journal``), and on commit writes store + journal to a temporary file that is
renamed over the store. A kill at any moment leaves the previous store intact and every
complete batch in the journal; the next writer folds the journal in first. Readers always
see a complete store, and never look past its ``rows`` attribute.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, Collection, Iterator, Sequence

import numpy as np

from imgvec.checks import check_choice
from imgvec.errors import BadInputError, param
from imgvec.files.artifact import Checked, check_file, open_checked
from imgvec.files.header import Header, write_header
from imgvec.files.strings import check_string_heaps, decode_keys, encode_keys, str_dtype
from imgvec.files.structure import Expect, check_finite, damaged, reading
from imgvec.fileio import (check_space, check_writable, copy_new, publish, remove_stale_temps,
                     temp_path, write_error)
from imgvec.files.h5format import PINNED, new_file
from imgvec.files.values import unusable_rows
from imgvec.files.journal import JournalWriter, Record, journal_path, read_journal
from imgvec.files.lock import StoreLock
from imgvec.progress import Phase, Progress
from imgvec.files.provenance import Provenance

CHUNK_ROWS = 256
_FOLD_MARGIN = 1 << 20  # HDF5 metadata and string chunks beyond the rows themselves


class Store:
    """An open store file. Use :func:`open_store` or :func:`create_store`; close when done.

    Opening validates the header and the layout (datasets present, typed and as long as the
    header says); reading embeddings refuses NaN or infinite values.
    """

    def __init__(self, file: Checked) -> None:
        self.h5, self.path, self.header = file.h5, file.path, file.header
        self.lease = file.lease  # read-only: nobody rewrites the file in place while it is open
        self.provenance = self.header.provenance
        # Opened read-only, the file never changes under us (writers publish a new file by rename), so
        # the header read here answers rows and generation: no HDF5 call (and its global lock) per use.
        self._fixed = self.h5.mode == "r"
        skipped = file.datasets["skipped/paths"].shape[0]
        file.check({"skipped/reasons": Expect(1, "str", (skipped,))})
        try:
            if not isinstance(self._attr("root", None), str):
                raise damaged(self.path, "store", "no 'root' attribute")
        except BaseException:
            file.close()
            raise

    def _attr(self, name: str, default: Any = ...) -> Any:
        with reading(self.path, "store"):
            return self.h5.attrs[name] if default is ... else self.h5.attrs.get(name, default)

    # -- identity ---------------------------------------------------------------------
    @property
    def root(self) -> str:
        return str(self._attr("root"))

    @property
    def store_id(self) -> str:
        return str(self._attr("store_id"))

    @property
    def rows(self) -> int:
        return self.header.rows if self._fixed else int(self._attr("rows"))

    @property
    def generation(self) -> int:
        """Bumped whenever rows are removed, so an index knows its row numbers went stale."""
        return self.header.generation if self._fixed else int(self._attr("generation", 0))

    def current_header(self) -> Header:
        """The header as the store is now (rows and generation change while a writer appends)."""
        return Header("store", self.provenance, self.store_id, self.generation, self.rows, self.dim)

    def pending_rows(self) -> int:
        """Rows an interrupted run left in the journal; the next ``embed`` folds them in."""
        return sum(len(r.keys) for r in read_journal(journal_path(self.path), self.dim))

    @property
    def dim(self) -> int:
        return self.provenance.dim

    # -- reading ----------------------------------------------------------------------
    def paths(self) -> list[str]:
        return decode_keys(self.h5["paths"], self.rows, self.path)

    def labels(self) -> list[str]:
        return decode_keys(self.h5["labels"], self.rows, self.path)

    def paths_at(self, rows: Sequence[int]) -> list[str]:
        """The paths of ``rows`` only (a query's hits): a big store's other paths are never read."""
        return self._keys_at("paths", rows)

    def labels_at(self, rows: Sequence[int]) -> list[str]:
        """The labels of ``rows`` only."""
        return self._keys_at("labels", rows)

    def _keys_at(self, name: str, rows: Sequence[int]) -> list[str]:
        wanted = np.unique(np.asarray(rows, dtype=np.int64))
        if len(wanted) == 0:
            return []
        if wanted[0] < 0 or wanted[-1] >= self.rows:
            raise IndexError(f"rows {wanted[0]}..{wanted[-1]} outside the store's {self.rows}")
        ds = self.h5[name]
        check_string_heaps(ds, wanted.tolist(), self.path, "store")
        with reading(self.path, "store"):
            found = dict(zip(wanted.tolist(), ds.asstr(errors="surrogateescape")[wanted]))
        return [found[int(r)] for r in rows]

    def embeddings(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        stop = self.rows if stop is None else min(stop, self.rows)
        with reading(self.path, "store"):
            block = np.asarray(self.h5["embeddings"][start:stop], dtype=np.float32)
        return check_finite(block, self.path, "store", "/embeddings", start)

    def iter_embeddings(self, chunk: int = 65536, start: int = 0) -> Iterator[tuple[int, np.ndarray]]:
        """(start row, block) pairs covering the committed rows from ``start`` on, ``chunk`` rows at a time."""
        for start in range(start, self.rows, chunk):
            yield start, self.embeddings(start, start + chunk)

    def skipped(self) -> list[tuple[str, str]]:
        group = self.h5["skipped"]
        n = group["paths"].shape[0]
        return list(zip(decode_keys(group["paths"], n, self.path), decode_keys(group["reasons"], n, self.path)))

    def absolute(self, key: str) -> str:
        return key if os.path.isabs(key) else os.path.join(self.root, key)

    # -- writing (only ever on a file no reader can see yet: see StoreWriter) -------------
    def _trim(self) -> None:
        for name in ("embeddings", "paths", "labels"):
            if self.h5[name].shape[0] != self.rows:
                self.h5[name].resize(self.rows, axis=0)

    def _append(self, embeddings: np.ndarray, keys: Sequence[str], labels: Sequence[str]) -> None:
        m = len(keys)
        if m == 0:
            return
        n = self.rows
        for name, values in (("embeddings", embeddings), ("paths", encode_keys(keys)), ("labels", encode_keys(labels))):
            ds = self.h5[name]
            ds.resize(n + m, axis=0)
            ds[n : n + m] = values
        self.h5.attrs["rows"] = n + m

    def _set_skipped(self, skipped: Sequence[tuple[str, str]]) -> None:
        group = self.h5["skipped"]
        for i, name in enumerate(("paths", "reasons")):
            group[name].resize(len(skipped), axis=0)
            if skipped:
                group[name][:] = encode_keys(item[i] for item in skipped)

    def close(self) -> None:
        self.h5.close()
        if self.lease is not None:
            self.lease.release()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _missing(path: Path) -> str:
    return f"no such store (make one with imgvec embed ... -o {path})"


def _layout(header: Header) -> dict[str, Expect]:
    """The datasets a store holds, as its header implies them."""
    # A published version-2 store holds exactly its rows; version 1 could hold a cut-off batch past them.
    n = header.rows if header.format_version > 1 else None
    least = None if n is not None else header.rows
    return {"embeddings": Expect(2, "float32", (n, header.dim), least), "paths": Expect(1, "str", (n,), least),
            "labels": Expect(1, "str", (n,), least), "skipped/paths": Expect(1, "str")}


def _h5new(path: Path) -> Any:
    """A new store file at ``path``, in the pinned format, created here (never through a link); one-line errors."""
    try:
        return new_file(path)
    except OSError as error:
        raise write_error(path, error) from None


def open_store(path: str | os.PathLike[str], mode: str = "r") -> Store:
    """Open a store for reading (``mode`` "r+": a writer's private copy), checked in one call."""
    path = Path(path)
    return Store(open_checked(path, "store", _missing(path), _layout, what="an imgvec store", mode=mode))


def _init_layout(h5: Any, provenance: Provenance, root: str) -> None:
    dim = provenance.dim
    h5.create_dataset("embeddings", shape=(0, dim), maxshape=(None, dim), dtype="float32",
                      chunks=(CHUNK_ROWS, dim), **PINNED)
    skipped = h5.create_group("skipped", **PINNED)
    for name, where in (("paths", h5), ("labels", h5), ("paths", skipped), ("reasons", skipped)):
        where.create_dataset(name, shape=(0,), maxshape=(None,), dtype=str_dtype(), chunks=(1024,), **PINNED)
    h5.attrs["root"] = root
    write_header(h5.attrs, Header("store", provenance, uuid.uuid4().hex, 0, 0, dim))


class StoreWriter:
    """The one way to add rows to a store, safely against kills and concurrent readers.

    Opening takes an exclusive lock (a second writer gets a clear error), clears temporary
    files a killed run left, and folds in any journal it left. ``append`` writes a batch to
    the journal; ``commit`` publishes store + journal as the new store. ``append`` also
    commits by itself once the journal holds as many rows as the store (and at least
    ``checkpoint_rows``): a long run becomes visible to readers as it goes, while the
    copying stays proportional to the store's final size (the sizes double).
    """

    def __init__(self, path: str | os.PathLike[str], provenance: Provenance | None = None,
                 root: str | None = None, checkpoint_rows: int = 2000) -> None:
        self.path = Path(path)
        self.checkpoint_rows = checkpoint_rows
        self._pending = 0
        check_writable(self.path)  # missing or read-only folder, a folder named like the store: one line
        self._lock = StoreLock(self.path)
        try:
            remove_stale_temps(self.path)
            if not self.path.exists():
                if provenance is None or root is None:
                    raise BadInputError(f"{self.path}: no such store")
                self._create(provenance, root)
            self._fold()
            with open_store(self.path) as store:
                self.provenance, self.root, self.store_id = store.provenance, store.root, store.store_id
                self.keys: set[str] = set(store.paths())
                self.skipped = store.skipped()
            self._journal = JournalWriter(journal_path(self.path))
        except BaseException:
            self._lock.release()
            raise

    def _create(self, provenance: Provenance, root: str) -> None:
        tmp = temp_path(self.path)
        check_space(self.path, _FOLD_MARGIN + CHUNK_ROWS * provenance.dim * 4)
        try:
            with _h5new(tmp) as h5:
                _init_layout(h5, provenance, root)
            publish(tmp, self.path)
        except OSError as error:
            raise write_error(self.path, error) from None
        finally:
            tmp.unlink(missing_ok=True)

    def append(self, embeddings: np.ndarray, keys: Sequence[str], labels: Sequence[str],
               skipped: Sequence[tuple[str, str]] = ()) -> None:
        """Record one batch durably (in the journal); it reaches the store on :meth:`commit`."""
        if not (len(embeddings) == len(keys) == len(labels)):
            raise ValueError("embeddings, keys and labels must have the same length")
        embeddings = np.asarray(embeddings, np.float32)
        finite = ~unusable_rows(embeddings)
        if not finite.all():  # never stored: keep the batch's good rows, then say which images and weights
            good = np.flatnonzero(finite)
            self.append(embeddings[good], [keys[i] for i in good], [labels[i] for i in good], skipped)
            raise self._non_finite([keys[i] for i in np.flatnonzero(~finite)])
        try:
            self._journal.append(Record(embeddings, list(keys), list(labels), [tuple(s) for s in skipped],
                                        self.store_id))
        except OSError as error:  # a full disk: the batches already in the journal stay
            raise write_error(self._journal.path, error) from None
        self.keys.update(keys)
        self._pending += len(keys)
        if self._pending >= max(self.checkpoint_rows, len(self.keys) - self._pending):
            self.commit()

    def _non_finite(self, keys: Sequence[str]) -> BadInputError:
        shown = ", ".join(repr(self._absolute(k)[-120:]) for k in keys[:3]) + (f" and {len(keys) - 3} more"
                                                                             if len(keys) > 3 else "")
        return BadInputError(f"{len(keys)} images embed to NaN, infinite or out-of-range values with {self.provenance.describe()} "
                             f"({shown}): the model overflows with these weights; those images were not stored, "
                             f"{self.path} keeps the rest")

    def _absolute(self, key: str) -> str:
        return key if os.path.isabs(key) else os.path.join(self.root, key)

    def commit(self, drop: Collection[str] = ()) -> None:
        """Publish the journal's rows (and remove the rows named in ``drop``) as the new store."""
        self._journal.close()
        self._fold(set(drop))
        self._pending = 0
        self.keys.difference_update(drop)

    def _fold(self, drop: Collection[str] = ()) -> None:
        jpath = journal_path(self.path)
        with open_store(self.path) as old:  # checked read-only before anything is written
            records = read_journal(jpath, old.dim)
            first = next(records, None)
            if first is None and not drop:
                jpath.unlink(missing_ok=True)
                return
            store_id, keys, dim = old.store_id, old.paths(), old.dim
        tmp = temp_path(self.path)
        # The new store is at most the old one plus the journal, and one more chunk of rows.
        journal = jpath.stat().st_size if jpath.exists() else 0
        check_space(self.path, self.path.stat().st_size + journal + CHUNK_ROWS * dim * 4 + _FOLD_MARGIN)
        try:
            self._fold_into(tmp, first, records, store_id, keys, set(drop))
            publish(tmp, self.path)
        except OSError as error:  # the disk filled up anyway: the old store and the journal stay as they were
            raise write_error(self.path, error) from None
        finally:
            tmp.unlink(missing_ok=True)
        jpath.unlink(missing_ok=True)

    def _fold_into(self, tmp: Path, first: Record | None, records: Iterator[Record], store_id: str,
                   keys: list[str], dropped: set[str]) -> None:
        """Write the store, less ``dropped``, plus the journal's records, to ``tmp``."""
        doomed = dropped & set(keys)
        if doomed:
            _copy_without(self.path, tmp, doomed)
        else:
            copy_new(self.path, tmp)
        with open_store(tmp, "r+") as store:
            store._trim()
            seen = set(keys) - doomed
            retried: set[str] = set()
            fresh_skips: list[tuple[str, str]] = []
            for record in _chain(first, records):
                if record.store_id and record.store_id != store_id:
                    continue  # a journal left by an earlier store of the same name
                keep = [i for i, k in enumerate(record.keys) if k not in seen and k not in dropped]
                store._append(record.embeddings[keep], [record.keys[i] for i in keep],
                              [record.labels[i] for i in keep])
                seen.update(record.keys)
                retried.update(record.keys)
                retried.update(k for k, _ in record.skipped)
                fresh_skips.extend(record.skipped)
            old_skips = [s for s in store.skipped() if s[0] not in retried and s[0] not in dropped]
            fresh = {k: reason for k, reason in fresh_skips if k not in seen}
            store._set_skipped(old_skips + list(fresh.items()))
            write_header(store.h5.attrs, store.current_header())  # new rows; a version-1 store becomes version 2

    def close(self, commit: bool = True) -> None:
        """Commit what was appended (unless told not to) and release the lock."""
        try:
            if commit:
                self.commit()
            else:
                self._journal.close()
        finally:
            self._lock.release()  # the lock file goes too (see imgvec.files.lock)

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _chain(first: Record | None, rest: Iterator[Record]) -> Iterator[Record]:
    if first is not None:
        yield first
    yield from rest


def create_store(path: str | os.PathLike[str], provenance: Provenance, root: str) -> StoreWriter:
    """A writer on a new, empty store (the file must not exist yet)."""
    if Path(path).exists():
        raise BadInputError(f"{path}: already exists")
    return StoreWriter(path, provenance, root)


def _copy_without(src: Path, dst: Path, doomed: set[str], chunk: int = 65536) -> None:
    """Write a copy of store ``src`` to ``dst`` leaving out the rows whose key is in ``doomed``."""
    with open_store(src) as old, _h5new(dst) as h5:
        _init_layout(h5, old.provenance, old.root)
        for key, value in old.h5.attrs.items():
            h5.attrs[key] = value
        write_header(h5.attrs, Header("store", old.provenance, old.store_id, old.generation + 1, 0, old.dim))
        new = Store(check_file(h5, dst, "store", _layout))
        keys, labels = old.paths(), old.labels()
        for start in range(0, old.rows, chunk):
            idx = [i for i in range(start, min(start + chunk, old.rows)) if keys[i] not in doomed]
            if idx:
                block = old.embeddings(start, start + chunk)[np.asarray(idx) - start]
                new._append(block, [keys[i] for i in idx], [labels[i] for i in idx])
        new._set_skipped([s for s in old.skipped() if s[0] not in doomed])
        write_header(h5.attrs, new.current_header())


def merge_stores(inputs: Sequence[str | os.PathLike[str]], output: str | os.PathLike[str],
                 on_duplicate: str = "first", chunk: int = 65536, progress: Progress | None = None) -> tuple[int, int]:
    """Write the rows of several stores (shards) into a new store; returns (rows, duplicates).

    ``progress`` (see :mod:`imgvec.progress`) hears the phase ``merging`` (rows read).

    Every input must have been made the same way (provenance). Paths are re-based onto the
    inputs' common root; a path present in several inputs is kept once, from the first input
    that has it (``on_duplicate="first"``), or refused (``"error"``).
    """
    from imgvec.files.images import key_for
    from imgvec.files.provenance import check_compatible

    check_choice(param("on_duplicate"), on_duplicate, ("first", "error"))
    if not inputs:
        raise BadInputError("no stores to merge")
    if Path(output).exists():
        raise BadInputError(f"{output}: already exists")
    stores = [open_store(p) for p in inputs]
    try:
        first = stores[0]
        for other in stores[1:]:
            check_compatible(first.provenance, other.provenance, f"store {first.path}", f"store {other.path}",
                             fix="only stores made with the same backbone, weights, input size and quantization can be merged")
        root = os.path.commonpath([s.root for s in stores])
        seen: set[str] = set()
        duplicates = 0
        writer = StoreWriter(output, first.provenance, root)
        step = Phase(progress, "merging", sum(s.rows for s in stores)).__enter__()
        try:
            for s in stores:
                keys = [key_for(s.absolute(k), root) for k in s.paths()]
                labels = s.labels()
                for start, block in s.iter_embeddings(chunk):
                    idx = [i for i in range(start, start + len(block)) if keys[i] not in seen]
                    duplicates += len(block) - len(idx)
                    if duplicates and on_duplicate == "error":
                        dup = next(keys[i] for i in range(start, start + len(block)) if keys[i] in seen)
                        raise BadInputError(f"{dup} is in more than one store (use {param('on_duplicate')} first to keep one)")
                    seen.update(keys[i] for i in idx)
                    writer.append(block[np.asarray(idx, dtype=np.int64) - start], [keys[i] for i in idx],
                                  [labels[i] for i in idx])
                    step.advance(len(block))
                skipped = [(key_for(s.absolute(k), root), r) for k, r in s.skipped()]
                writer.append(np.zeros((0, s.dim), np.float32), [], [], skipped=skipped)
        except BaseException:
            writer.close(commit=False)  # a failed merge leaves no half-made store behind
            for leftover in (Path(output), journal_path(output)):
                leftover.unlink(missing_ok=True)
            raise
        writer.close()
        return len(seen), duplicates
    finally:
        for s in stores:
            s.close()
