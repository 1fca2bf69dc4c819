"""Small HDF5 helpers shared by the store, index and head files."""

from __future__ import annotations

import contextlib
import os
from dataclasses import fields
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from .fileio import atomic_path
from .provenance import Provenance


def str_dtype() -> Any:
    import h5py

    return h5py.string_dtype("utf-8")


def encode_keys(keys: Iterable[str]) -> list[bytes]:
    # surrogateescape keeps non-UTF-8 file names round-tripping instead of failing the batch.
    return [str(k).encode("utf-8", "surrogateescape") for k in keys]


def decode_keys(dataset: Any, stop: int) -> list[str]:
    if stop == 0:
        return []
    return list(dataset.asstr(errors="surrogateescape")[:stop])


def write_provenance(attrs: Any, provenance: Provenance) -> None:
    """One attribute per provenance field, so plain h5py users can read them."""
    for f in fields(Provenance):
        value = getattr(provenance, f.name)
        if value is not None:
            attrs[f.name] = value


def read_provenance(attrs: Any) -> Provenance:
    data: dict[str, Any] = {}
    for f in fields(Provenance):
        if f.name in attrs:
            value = attrs[f.name]
            data[f.name] = value.item() if isinstance(value, np.generic) else value
        elif f.name.startswith("weights_"):
            data[f.name] = None
    return Provenance.from_mapping(data)


@contextlib.contextmanager
def open_h5(path: str | os.PathLike[str], fmt: str, missing: str) -> Iterator[Any]:
    """Open an imgvec HDF5 file read-only, checking that it exists and holds ``fmt``."""
    import h5py

    from .errors import BadInputError

    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{path}: {missing}")
    try:
        h5 = h5py.File(path, "r")
    except OSError as error:
        raise BadInputError(f"{path}: cannot open as HDF5 ({str(error).splitlines()[0]})") from None
    with h5:
        if h5.attrs.get("format") != fmt:
            raise BadInputError(f"{path}: not an {fmt} file")
        yield h5


@contextlib.contextmanager
def atomic_h5(path: str | os.PathLike[str]) -> Iterator[Any]:
    """Write a new HDF5 file under a temporary name; rename it over ``path`` only on success."""
    import h5py

    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as h5:
            yield h5
