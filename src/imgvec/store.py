"""The HDF5 store: embeddings, image paths, labels, skipped files and provenance.

Layout (readable with plain h5py, documented in the README)::

    /embeddings        float32 (N, D), chunked, appendable
    /paths             UTF-8 strings (N,), relative to the root attribute
    /labels            UTF-8 strings (N,), "" where unknown
    /skipped/paths     UTF-8 strings, files that could not be decoded
    /skipped/reasons   UTF-8 strings, why
    attrs              provenance fields, root, store_id, rows

``rows`` is written last after each appended batch: it is the number of rows that are
complete. Readers never look past it, and a resumed run first trims anything beyond it.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .errors import BadInputError
from .h5io import decode_keys, encode_keys, read_provenance, str_dtype, write_provenance
from .provenance import Provenance

FORMAT = "imgvec-store"
FORMAT_VERSION = 1
CHUNK_ROWS = 256


class Store:
    """An open store file. Use :func:`open_store` or :func:`create_store`; close when done."""

    def __init__(self, h5: Any, path: Path) -> None:
        self.h5 = h5
        self.path = path
        if h5.attrs.get("format") != FORMAT:
            h5.close()
            raise BadInputError(f"{path}: not an imgvec store (no format={FORMAT!r} attribute)")
        self.provenance = read_provenance(h5.attrs)

    # -- identity ---------------------------------------------------------------------
    @property
    def root(self) -> str:
        return str(self.h5.attrs["root"])

    @property
    def store_id(self) -> str:
        return str(self.h5.attrs["store_id"])

    @property
    def rows(self) -> int:
        return int(self.h5.attrs["rows"])

    @property
    def dim(self) -> int:
        return int(self.h5["embeddings"].shape[1])

    # -- reading ----------------------------------------------------------------------
    def paths(self) -> list[str]:
        return decode_keys(self.h5["paths"], self.rows)

    def labels(self) -> list[str]:
        return decode_keys(self.h5["labels"], self.rows)

    def embeddings(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        stop = self.rows if stop is None else min(stop, self.rows)
        return np.asarray(self.h5["embeddings"][start:stop], dtype=np.float32)

    def iter_embeddings(self, chunk: int = 65536) -> Iterator[tuple[int, np.ndarray]]:
        """(start row, block) pairs covering every committed row, ``chunk`` rows at a time."""
        for start in range(0, self.rows, chunk):
            yield start, self.embeddings(start, start + chunk)

    def skipped(self) -> list[tuple[str, str]]:
        group = self.h5["skipped"]
        n = group["paths"].shape[0]
        return list(zip(decode_keys(group["paths"], n), decode_keys(group["reasons"], n)))

    def absolute(self, key: str) -> str:
        return key if os.path.isabs(key) else os.path.join(self.root, key)

    # -- writing ----------------------------------------------------------------------
    def trim(self) -> None:
        """Drop rows beyond the committed count (left by an interrupted append)."""
        for name in ("embeddings", "paths", "labels"):
            if self.h5[name].shape[0] != self.rows:
                self.h5[name].resize(self.rows, axis=0)

    def append(self, embeddings: np.ndarray, keys: Sequence[str], labels: Sequence[str]) -> None:
        """Append complete rows; ``rows`` moves only once all three datasets hold them."""
        m = len(keys)
        if not (embeddings.shape[0] == m == len(labels)):
            raise ValueError("embeddings, keys and labels must have the same length")
        if m == 0:
            return
        n = self.rows
        for name, values in (("embeddings", embeddings), ("paths", encode_keys(keys)), ("labels", encode_keys(labels))):
            ds = self.h5[name]
            ds.resize(n + m, axis=0)
            ds[n : n + m] = values
        self.h5.attrs["rows"] = n + m
        self.h5.flush()

    def set_skipped(self, skipped: Sequence[tuple[str, str]]) -> None:
        """Replace the record of skipped files (a file that now decodes leaves it)."""
        group = self.h5["skipped"]
        for i, name in enumerate(("paths", "reasons")):
            group[name].resize(len(skipped), axis=0)
            if skipped:
                group[name][:] = encode_keys(item[i] for item in skipped)
        self.h5.flush()

    def close(self) -> None:
        self.h5.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _h5open(path: Path, mode: str) -> Any:
    import h5py

    try:
        return h5py.File(path, mode)
    except FileNotFoundError:
        raise BadInputError(f"{path}: no such store (make one with `imgvec embed ... -o {path}`)") from None
    except OSError as error:
        raise BadInputError(f"{path}: cannot open as HDF5 ({str(error).splitlines()[0]})") from None


def open_store(path: str | os.PathLike[str], writable: bool = False) -> Store:
    """Open an existing store for reading (or appending, with ``writable``)."""
    path = Path(path)
    if not path.exists():
        raise BadInputError(f"{path}: no such store (make one with `imgvec embed ... -o {path}`)")
    return Store(_h5open(path, "r+" if writable else "r"), path)


def create_store(path: str | os.PathLike[str], provenance: Provenance, root: str) -> Store:
    """Create an empty store (the file must not exist yet)."""
    path = Path(path)
    if path.exists():
        raise BadInputError(f"{path}: already exists")
    if path.parent and not path.parent.exists():
        raise BadInputError(f"{path.parent}: output folder does not exist")
    h5 = _h5open(path, "w-")
    dim = provenance.dim
    h5.create_dataset("embeddings", shape=(0, dim), maxshape=(None, dim), dtype="float32",
                      chunks=(CHUNK_ROWS, dim))
    for name, where in (("paths", h5), ("labels", h5), ("paths", h5.create_group("skipped")), ("reasons", h5["skipped"])):
        where.create_dataset(name, shape=(0,), maxshape=(None,), dtype=str_dtype(), chunks=(1024,))
    h5.attrs["format"] = FORMAT
    h5.attrs["format_version"] = FORMAT_VERSION
    h5.attrs["root"] = root
    h5.attrs["store_id"] = uuid.uuid4().hex
    h5.attrs["rows"] = 0
    write_provenance(h5.attrs, provenance)
    h5.flush()
    return Store(h5, path)
