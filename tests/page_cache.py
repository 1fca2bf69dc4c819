"""What of a file is in the page cache (Linux mincore), for the tests of what imgvec leaves there or reads in."""

from __future__ import annotations

import ctypes
import mmap
from pathlib import Path

import numpy as np


def resident_fraction(path: Path) -> float:
    """The share of ``path``'s pages in the page cache (mincore over a fresh read-only map, which touches none)."""
    libc = ctypes.CDLL(None, use_errno=True)
    size = path.stat().st_size
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), size, access=mmap.ACCESS_READ) as m:
        view = np.frombuffer(m, np.uint8)
        vec = (ctypes.c_ubyte * pages)()
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        assert libc.mincore(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(size), vec) == 0, ctypes.get_errno()
        del view
        return sum(b & 1 for b in vec) / pages
