"""The HDF5 store: embeddings, image paths, labels, skipped files and provenance.

Layout (format 3; readable with plain h5py, documented in docs/files.md)::

    /embeddings        float32 (N, D), chunked, appendable
    /paths             strings (N): paths relative to the root attribute
    /labels/codes      int32 (N,): row i's label is labels/names[codes[i]]; -1 where unknown
    /labels/names      strings: the distinct labels (none in an unlabelled store)
    /skipped/paths     strings: files that could not be decoded
    /skipped/reasons   strings: why
    /stats             float32 (N, 5), optional: width, height, brightness, contrast, sharpness of each
                       image (files/images.py STATS_COLUMNS); a row of NaN where not measured
    attrs              provenance fields, root, store_id, generation, rows (text: fixed-length UTF-8)

"strings" is a group of ``bytes`` (uint8, UTF-8 one after another) and ``offsets`` (uint64, N+1):
no variable-length string anywhere (:mod:`imgvec.files.strings`). Stores of formats 1 and 2 kept
paths, labels and skipped files as variable-length strings; they still read, and the first commit
that adds to or removes from one writes it anew in format 3.

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
from imgvec.files.header import FORMAT_VERSION, Header, text_attr, write_header
from imgvec.files.strings import (append_strings, check_string_heaps, create_strings, decode_keys,
                                  read_strings, read_strings_at, set_strings, strings_layout, text_value)
from imgvec.files.structure import Expect, check_finite, damaged, reading
from imgvec.fileio import (check_space, check_writable, copy_new, publish, remove_stale_temps,
                     temp_path, write_error)
from imgvec.files.h5format import PINNED, new_file
from imgvec.files.images import STATS_COLUMNS, bad_stats_rows
from imgvec.files.values import unusable_rows
from imgvec.files.journal import JournalWriter, Record, journal_path, read_journal
from imgvec.files.lock import StoreLock
from imgvec.progress import Phase, Progress
from imgvec.files.provenance import Provenance

CHUNK_ROWS = 256
STATS_CHUNK_ROWS = CHUNK_ROWS  # 5 KiB chunks: a small store stays small
CODES_CHUNK_ROWS = 4096  # 16 KiB chunks of label codes
_FOLD_MARGIN = 1 << 20  # HDF5 metadata and string chunks beyond the rows themselves


class Store:
    """An open store file. Use :func:`open_store` or :func:`create_store`; close when done.

    Opening validates the header and the layout (datasets present, typed and as long as the
    header says); reading embeddings refuses NaN or infinite values.
    """

    def __init__(self, file: Checked) -> None:
        self.h5, self.path, self.header = file.h5, file.path, file.header
        self._file = file
        self.lease = file.lease  # read-only: nobody rewrites the file in place while it is open
        self.provenance = self.header.provenance
        # Opened read-only, the file never changes under us (writers publish a new file by rename), so
        # the header read here answers rows and generation: no HDF5 call (and its global lock) per use.
        self._fixed = self.h5.mode == "r"
        self._columns = self.header.format_version >= 3  # strings as bytes and offsets (else variable-length)
        self._label_codes: dict[str, int] | None = None  # a writer's label table, once read
        if self._columns:
            file.check(strings_layout("skipped/reasons", file.datasets["skipped/paths/offsets"].shape[0] - 1))
        else:
            file.check({"skipped/reasons": Expect(1, "str", (file.datasets["skipped/paths"].shape[0],))})
        try:
            with reading(self.path, "store"):
                if text_attr(self.h5.attrs, "root") is None:
                    raise damaged(self.path, "store", "no 'root' attribute")
        except BaseException:
            file.close()
            raise

    def _attr(self, name: str, default: Any = ...) -> Any:
        with reading(self.path, "store"):
            return self.h5.attrs[name] if default is ... else self.h5.attrs.get(name, default)

    # -- identity ---------------------------------------------------------------------
    def _text(self, name: str) -> str:
        with reading(self.path, "store"):
            return str(text_attr(self.h5.attrs, name))

    @property
    def root(self) -> str:
        return self._text("root")

    @property
    def store_id(self) -> str:
        return self._text("store_id")

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
        if self._columns:
            return read_strings(self.h5["paths"], self.path, "store")
        return decode_keys(self.h5["paths"], self.rows, self.path)

    def labels(self) -> list[str]:
        if self._columns:
            with reading(self.path, "store"):
                codes = np.asarray(self.h5["labels/codes"][()], np.int64)
            return self._named(codes)
        return decode_keys(self.h5["labels"], self.rows, self.path)

    def label_names(self) -> list[str]:
        """The labels' table (format 3 on): each label once, none empty."""
        names = read_strings(self.h5["labels/names"], self.path, "store")
        if len(set(names)) != len(names) or "" in names:
            raise damaged(self.path, "store", "'labels/names' names a label twice, or an empty one")
        return names

    def _named(self, codes: np.ndarray) -> list[str]:
        """The labels the codes stand for ("" for -1), once every code is in the table."""
        names = self.label_names()
        if len(codes) and (codes.min() < -1 or codes.max() >= len(names)):
            bad = int(codes[(codes < -1) | (codes >= len(names))][0])
            raise damaged(self.path, "store", f"'labels/codes' holds {bad}, outside its table of {len(names)} labels")
        return np.array(names + [""], dtype=object)[codes].tolist()

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
        if self._columns:
            if name == "paths":
                found = dict(zip(wanted.tolist(), read_strings_at(self.h5["paths"], wanted, self.path, "store")))
            else:
                with reading(self.path, "store"):
                    codes = np.asarray(self.h5["labels/codes"][wanted], np.int64)
                found = dict(zip(wanted.tolist(), self._named(codes)))
            return [found[int(r)] for r in rows]
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

    @property
    def has_stats(self) -> bool:
        """Whether the store holds image statistics (``/stats``; stores made before they were recorded do not)."""
        return "stats" in self.h5

    def stats(self, start: int = 0, stop: int | None = None) -> np.ndarray | None:
        """Image statistics of rows ``start:stop`` (``STATS_COLUMNS``; a row of NaN: not measured), or None
        when the store has none. Values that are negative, infinite or out of range (files/values.py), or rows half
        measured, are damage."""
        if not self.has_stats:
            return None
        stop = self.rows if stop is None else min(stop, self.rows)
        with reading(self.path, "store"):
            block = np.asarray(self.h5["stats"][start:stop], dtype=np.float32)
        bad = bad_stats_rows(block)
        if bad.any():
            raise damaged(self.path, "store", f"'stats' has negative, infinite, out-of-range or partly missing values "
                                              f"(row {int(np.flatnonzero(bad)[0]) + start})")
        return block

    def skipped(self) -> list[tuple[str, str]]:
        if self._columns:
            paths, reasons = (read_strings(self.h5[f"skipped/{n}"], self.path, "store") for n in ("paths", "reasons"))
            return list(zip(paths, reasons))
        group = self.h5["skipped"]
        n = group["paths"].shape[0]
        return list(zip(decode_keys(group["paths"], n, self.path), decode_keys(group["reasons"], n, self.path)))

    def absolute(self, key: str) -> str:
        return key if os.path.isabs(key) else os.path.join(self.root, key)

    # -- writing (only ever on a file no reader can see yet, always in format 3: see StoreWriter) -------------
    def _writable(self) -> None:
        if not self._columns:  # StoreWriter writes an older store anew (_copy_without) before adding to it
            raise RuntimeError(f"{self.path}: a format-{self.header.format_version} store is not written in place")

    def _codes(self, labels: Sequence[str]) -> np.ndarray:
        """The codes of ``labels`` (-1: none), adding the labels not in the table yet to it."""
        if self._label_codes is None:
            self._label_codes = {name: i for i, name in enumerate(self.label_names())}
        table, new = self._label_codes, []
        for label in dict.fromkeys(labels):
            if label and label not in table:
                table[label] = len(table)
                new.append(label)
        append_strings(self.h5["labels/names"], new)
        return np.fromiter((table.get(label, -1) for label in labels), np.int32, len(labels))

    def _append(self, embeddings: np.ndarray, keys: Sequence[str], labels: Sequence[str],
                stats: np.ndarray | None = None) -> None:
        self._writable()
        m = len(keys)
        if m == 0:
            return
        n = self.rows
        if stats is not None and not self.has_stats:  # made on the first measured batch; rows before it: NaN
            _stats_dataset(self.h5, n)
        if stats is None and self.has_stats:
            stats = np.full((m, len(STATS_COLUMNS)), np.nan, np.float32)
        columns = [("embeddings", embeddings), ("labels/codes", self._codes(labels))]
        for name, values in columns + ([("stats", stats)] if stats is not None else []):
            ds = self.h5[name]
            ds.resize(n + m, axis=0)
            ds[n : n + m] = values
        append_strings(self.h5["paths"], keys)
        self.h5.attrs["rows"] = n + m

    def _set_stats(self, stats: np.ndarray) -> None:
        if not self.has_stats:
            _stats_dataset(self.h5, self.rows)
        self.h5["stats"][:] = stats

    def _set_skipped(self, skipped: Sequence[tuple[str, str]]) -> None:
        self._writable()
        for i, name in enumerate(("paths", "reasons")):
            set_strings(self.h5[f"skipped/{name}"], [item[i] for item in skipped])

    def close(self) -> None:
        self._file.close()  # the HDF5 file and its lease

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _missing(path: Path) -> str:
    return f"no such store (make one with imgvec embed ... -o {path})"


def _layout(header: Header) -> dict[str, Expect]:
    """The datasets a store holds, as its header implies them."""
    stats = Expect(2, "float32", (header.rows, len(STATS_COLUMNS)), optional=True)
    if header.format_version >= 3:  # exactly its rows, strings as bytes and offsets
        return {"embeddings": Expect(2, "float32", (header.rows, header.dim)), **strings_layout("paths", header.rows),
                "labels/codes": Expect(1, "int32", (header.rows,)), **strings_layout("labels/names"),
                **strings_layout("skipped/paths"), "stats": stats}
    # A published version-2 store holds exactly its rows; version 1 could hold a cut-off batch past them.
    n = header.rows if header.format_version > 1 else None
    least = None if n is not None else header.rows
    return {"embeddings": Expect(2, "float32", (n, header.dim), least), "paths": Expect(1, "str", (n,), least),
            "labels": Expect(1, "str", (n,), least), "skipped/paths": Expect(1, "str"),
            "stats": Expect(2, "float32", (n, len(STATS_COLUMNS)), least, optional=True)}


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
    create_strings(h5, "paths")
    labels = h5.create_group("labels", **PINNED)
    labels.create_dataset("codes", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(CODES_CHUNK_ROWS,),
                          **PINNED)
    create_strings(labels, "names")
    skipped = h5.create_group("skipped", **PINNED)
    for name in ("paths", "reasons"):
        create_strings(skipped, name)
    h5.attrs["root"] = text_value(root)
    write_header(h5.attrs, Header("store", provenance, uuid.uuid4().hex, 0, 0, dim))


def _stats_dataset(h5: Any, rows: int) -> None:
    """An empty ``/stats`` of ``rows`` unmeasured (NaN) rows."""
    h5.create_dataset("stats", shape=(rows, len(STATS_COLUMNS)), maxshape=(None, len(STATS_COLUMNS)),
                      dtype="float32", chunks=(STATS_CHUNK_ROWS, len(STATS_COLUMNS)), fillvalue=np.nan, **PINNED)


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
               skipped: Sequence[tuple[str, str]] = (), stats: np.ndarray | None = None) -> None:
        """Record one batch durably (in the journal); it reaches the store on :meth:`commit`.

        ``stats``: each row's image statistics (``STATS_COLUMNS``), when they were measured."""
        if not (len(embeddings) == len(keys) == len(labels)) or (stats is not None and len(stats) != len(keys)):
            raise ValueError("embeddings, keys, labels (and stats) must have the same length")
        embeddings = np.asarray(embeddings, np.float32)
        finite = ~unusable_rows(embeddings)
        if not finite.all():  # never stored: keep the batch's good rows, then say which images and weights
            good = np.flatnonzero(finite)
            self.append(embeddings[good], [keys[i] for i in good], [labels[i] for i in good], skipped,
                        None if stats is None else stats[good])
            raise self._non_finite([keys[i] for i in np.flatnonzero(~finite)])
        try:
            self._journal.append(Record(embeddings, list(keys), list(labels), [tuple(s) for s in skipped],
                                        self.store_id, None if stats is None else np.asarray(stats, np.float32)))
        except OSError as error:  # a full disk: the batches already in the journal stay
            raise write_error(self._journal.path, error) from None
        self.keys.update(keys)
        self._pending += len(keys)
        if self._pending >= max(self.checkpoint_rows, len(self.keys) - self._pending):
            self.commit()

    def set_stats(self, keys: Sequence[str], stats: np.ndarray) -> None:
        """Publish image statistics for every row (``imgvec inspect --stats``): ``keys`` are the store's paths in
        row order as they were read, refused if the store changed since."""
        self.commit()
        with open_store(self.path) as store:
            if store.paths() != list(keys):
                raise BadInputError(f"{self.path} changed while its images were read; run again")
        stats = np.asarray(stats, np.float32)
        if stats.shape != (len(keys), len(STATS_COLUMNS)):
            raise ValueError(f"stats of shape {stats.shape} for {len(keys)} rows")
        tmp = temp_path(self.path)
        check_space(self.path, self.path.stat().st_size + stats.nbytes + _FOLD_MARGIN)
        try:
            copy_new(self.path, tmp)
            with open_store(tmp, "r+") as store:
                store._set_stats(stats)
            publish(tmp, self.path)
        except OSError as error:
            raise write_error(self.path, error) from None
        finally:
            tmp.unlink(missing_ok=True)

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
            older = old.header.format_version < FORMAT_VERSION
        tmp = temp_path(self.path)
        # The new store is at most the old one plus the journal, and one more chunk of rows.
        journal = jpath.stat().st_size if jpath.exists() else 0
        check_space(self.path, self.path.stat().st_size + journal + CHUNK_ROWS * dim * 4 + _FOLD_MARGIN)
        try:
            self._fold_into(tmp, first, records, store_id, keys, set(drop), older)
            publish(tmp, self.path)
        except OSError as error:  # the disk filled up anyway: the old store and the journal stay as they were
            raise write_error(self.path, error) from None
        finally:
            tmp.unlink(missing_ok=True)
        jpath.unlink(missing_ok=True)

    def _fold_into(self, tmp: Path, first: Record | None, records: Iterator[Record], store_id: str,
                   keys: list[str], dropped: set[str], older: bool = False) -> None:
        """Write the store, less ``dropped``, plus the journal's records, to ``tmp`` (a store of an ``older``
        format written anew in this one)."""
        doomed = dropped & set(keys)
        if doomed or older:
            _copy_without(self.path, tmp, doomed)
        else:
            copy_new(self.path, tmp)
        with open_store(tmp, "r+") as store:
            seen = set(keys) - doomed
            retried: set[str] = set()
            fresh_skips: list[tuple[str, str]] = []
            for record in _chain(first, records):
                if record.store_id and record.store_id != store_id:
                    continue  # a journal left by an earlier store of the same name
                keep = [i for i, k in enumerate(record.keys) if k not in seen and k not in dropped]
                store._append(record.embeddings[keep], [record.keys[i] for i in keep],
                              [record.labels[i] for i in keep], None if record.stats is None else record.stats[keep])
                seen.update(record.keys)
                retried.update(record.keys)
                retried.update(k for k, _ in record.skipped)
                fresh_skips.extend(record.skipped)
            old_skips = [s for s in store.skipped() if s[0] not in retried and s[0] not in dropped]
            fresh = {k: reason for k, reason in fresh_skips if k not in seen}
            store._set_skipped(old_skips + list(fresh.items()))
            write_header(store.h5.attrs, store.current_header())  # its new rows

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
    """Write a copy of store ``src`` to ``dst`` in this format, leaving out the rows whose key is in ``doomed``
    (and then a generation on: the rows after them moved)."""
    with open_store(src) as old, _h5new(dst) as h5:
        _init_layout(h5, old.provenance, old.root)
        with reading(src, "store"):
            for key, value in old.h5.attrs.items():
                h5.attrs[key] = text_value(value) if isinstance(value, str) else value
        generation = old.generation + bool(doomed)
        write_header(h5.attrs, Header("store", old.provenance, old.store_id, generation, 0, old.dim))
        new = Store(check_file(h5, dst, "store", _layout))
        keys, labels = old.paths(), old.labels()
        for start in range(0, old.rows, chunk):
            idx = [i for i in range(start, min(start + chunk, old.rows)) if keys[i] not in doomed]
            if idx:
                block = old.embeddings(start, start + chunk)[np.asarray(idx) - start]
                stats = old.stats(start, start + chunk)
                new._append(block, [keys[i] for i in idx], [labels[i] for i in idx],
                            None if stats is None else stats[np.asarray(idx) - start])
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
                    stats = s.stats(start, start + len(block))
                    writer.append(block[np.asarray(idx, dtype=np.int64) - start], [keys[i] for i in idx],
                                  [labels[i] for i in idx],
                                  stats=None if stats is None else stats[np.asarray(idx, dtype=np.int64) - start])
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
