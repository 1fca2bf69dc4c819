"""Write a valid imgvec store of generated unit vectors, without embedding any image.

    python -m benchmarks.make_store OUT.h5 --rows 1000000 --dim 1280
    python -m benchmarks.make_store OUT.h5 --rows 50000 --dim 576 --image-size 64

So that scale (index builds, query time and memory against rows) can be measured on any
machine: one million rows take about a minute to write instead of days to embed. The store is
what ``imgvec embed`` would write for images named ``img_0000000.jpg``, ``img_0000001.jpg``, ...
(unlabelled, under OUT's folder) with random weights (seed 0) of the backbone: mobilenetv2 for
``--dim 1280``, otherwise the first backbone of ``imgvec models`` with that embedding size (or
``--model``). ``imgvec info``, ``index`` and ``query`` accept it; a query embeds its photo with
that random-weight backbone. Rows are unit vectors drawn around ``--clusters`` random centres
(seeded), so neighbours are meaningful to an index; they are written ``--chunk`` rows at a time
(memory stays bounded at any size), into a temporary file renamed over OUT at the end.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Callable

import numpy as np

Fill = Callable[[int, int], np.ndarray]


def backbone_for(dim: int, model: str | None = None):
    """The backbone a generated store of ``dim``-sized rows names: ``model``, else mobilenetv2 for 1280, else
    the first in the registry with that size."""
    from imgvec.backbones.registry import BACKBONES, get_backbone

    if model is None and dim == 1280:
        model = "mobilenetv2"
    if model is not None:
        backbone = get_backbone(model)
        if backbone.dim != dim:
            raise SystemExit(f"make_store: {backbone.name} embeds {backbone.dim} values, not --dim {dim}")
        return backbone
    for backbone in BACKBONES.values():
        if backbone.dim == dim:
            return backbone
    sizes = sorted({b.dim for b in BACKBONES.values()})
    raise SystemExit(f"make_store: no backbone embeds {dim} values; --dim is one of {', '.join(map(str, sizes))}")


def clustered_unit_rows(dim: int, clusters: int = 1000, spread: float = 0.7, seed: int = 0) -> Fill:
    """``fill(start, n)``: ``n`` unit rows around ``clusters`` fixed random centres, the same for the same start."""
    centres = np.random.default_rng(seed).normal(size=(clusters, dim)).astype(np.float32)

    def fill(start: int, n: int) -> np.ndarray:
        rng = np.random.default_rng([seed, start])
        x = centres[rng.integers(0, clusters, n)] + rng.normal(0, spread, (n, dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    return fill


def write_store(path: str | os.PathLike[str], rows: int, dim: int, fill: Fill | None = None,
                model: str | None = None, image_size: int | None = None, chunk: int = 16_384) -> Path:
    """Write a store of ``rows`` generated rows to ``path`` atomically, ``chunk`` rows at a time."""

    from imgvec.files.header import Header, text_attr, write_header
    from imgvec.files.strings import append_strings
    from imgvec.fileio import atomic_path
    from imgvec.files.provenance import Provenance
    from imgvec.files.h5format import new_file
    from imgvec.vectors.store import _init_layout

    path = Path(path)
    backbone = backbone_for(dim, model)
    size = image_size or backbone.input_size
    if size < backbone.min_size:
        raise SystemExit(f"make_store: {backbone.name} needs --image-size of at least {backbone.min_size}")
    fill = fill or clustered_unit_rows(dim)
    prov = Provenance(backbone.name, "random", 0, None, None, size, backbone.preprocessing, dim)
    with atomic_path(path) as tmp, new_file(tmp) as h5:  # imgvec's pinned format, as a store writer makes it
        _init_layout(h5, prov, str(path.resolve().parent))
        for name in ("embeddings", "labels/codes"):
            h5[name].resize(rows, axis=0)
        for start in range(0, rows, chunk):
            n = min(chunk, rows - start)
            h5["embeddings"][start : start + n] = np.asarray(fill(start, n), np.float32)
            append_strings(h5["paths"], (f"img_{i:07d}.jpg" for i in range(start, start + n)))
            h5["labels/codes"][start : start + n] = np.full(n, -1, np.int32)  # unlabelled
        write_header(h5.attrs, Header("store", prov, str(text_attr(h5.attrs, "store_id")), 0, rows, dim))
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.make_store", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="store file to write (replaced if it exists)")
    ap.add_argument("--rows", type=int, required=True, help="rows to generate")
    ap.add_argument("--dim", type=int, default=1280, help="embedding size (default 1280: mobilenetv2)")
    ap.add_argument("--model", default=None, help="backbone named in the provenance (its size must be --dim)")
    ap.add_argument("--image-size", type=int, default=None, help="input size in the provenance (default: the "
                    "backbone's); queries are embedded at this size")
    ap.add_argument("--clusters", type=int, default=1000, help="random centres the rows are drawn around")
    ap.add_argument("--seed", type=int, default=0, help="seed of the rows")
    ap.add_argument("--chunk", type=int, default=16_384, help="rows generated and written at a time")
    args = ap.parse_args(argv)
    if args.rows < 1 or args.chunk < 1:
        ap.error("--rows and --chunk must be at least 1")
    write_store(args.out, args.rows, args.dim, clustered_unit_rows(args.dim, args.clusters, seed=args.seed),
                args.model, args.image_size, args.chunk)
    print(f"{args.out}: {args.rows} rows x {args.dim}")


if __name__ == "__main__":
    main()
