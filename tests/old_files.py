"""imgvec files of format 2 (variable-length strings), made by imgvec at commit 89cb242, kept gzipped in
tests/data/format2: what the files layer must still read.

``s.h5`` is test_hostile_hdf5's ``_make_store(path, 0)`` (30 rows of mobilenetv3small's 576 dimensions, random
weights seed 0, labels a/b/c, one skipped file), ``s.index.h5`` its flat index, ``head.h5`` a head trained on it
(``_make_head``). The store's root attribute names the folder it was made in, which exists nowhere else.
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

DATA = Path(__file__).parent / "data" / "format2"
NAMES = ("s.h5", "s.index.h5", "head.h5")


def format2(folder: Path, *names: str) -> dict[str, Path]:
    """Fresh copies of the named format-2 files (all three unless told) in ``folder``, by name."""
    out = {}
    for name in names or NAMES:
        with gzip.open(DATA / f"{name}.gz", "rb") as src, open(folder / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
        out[name] = folder / name
    return out
