"""The HDF5 format imgvec writes, pinned here rather than taken from h5py's defaults or its global
configuration (``h5py.get_config().track_order = True`` made imgvec write version-2 object headers its
own readers refuse).

Every file is created with the lowest format versions that hold it and none newer than HDF5 1.8's
(``libver``): superblock version 0, version-1 object headers, layout messages of version 3, chunks
indexed by version-1 B-trees; every group and dataset without creation-order tracking. That is what
:mod:`imgvec.files.h5heap` and :mod:`imgvec.files.chunks` read before HDF5 does.
"""

from __future__ import annotations

import os
from typing import Any

LIBVER = ("earliest", "v108")  # h5py's (low, high) bounds on the format versions HDF5 may write
PINNED: dict[str, Any] = {"track_order": False}  # for every create_group and create_dataset


def new_file(path: str | os.PathLike[str]) -> Any:
    """A new HDF5 file at ``path`` in imgvec's pinned format, created here (mode "x": never through a
    link, never over a file already there)."""
    import h5py

    return h5py.File(path, "x", libver=LIBVER, **PINNED)
