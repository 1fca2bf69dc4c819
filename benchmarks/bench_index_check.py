"""What checking an index's FAISS blob (imgvec.files.faissblob) adds to opening the index.

    python -m benchmarks.bench_index_check              # 100k x 1280: flat, HNSW, IVF-PQ
    python -m benchmarks.bench_index_check --rows 20000 --kinds flat,hnsw   # quicker

For each kind, in fresh processes (so each starts cold in memory, warm in the page cache):
``load_index`` is load_index as imgvec runs it (the ``/faiss`` dataset mapped, the mapping checked,
and FAISS handed that same mapping, zero-copy); ``unchecked`` is the same with the check switched
off; ``check`` is faissblob.check alone on the mapping. Times are the best of ``--repeats``
interleaved runs; peak RSS is the process's maximum resident size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .common import OUT, best, generated_store, md_table, write_result

NAME = "index-check"
KINDS = ("flat", "hnsw", "ivfpq")


def _child(variant: str, path: str) -> dict[str, float]:
    """One measurement in this (fresh) process: seconds and peak RSS of ``variant`` on index ``path``."""
    import faiss  # noqa: F401 - imported before any timing: load_index imports it on first use

    import imgvec.vectors.index as ix
    from imgvec.files import faissblob
    from imgvec.files.artifact import opened

    if variant == "check":
        with opened(path, "index", "") as (h5, header):
            blob, kind = ix._mapped_blob(h5, h5["faiss"], path), str(h5.attrs["index_kind"])
        start = time.perf_counter()
        faissblob.check(blob, kind, header.dim, header.rows)
    else:
        if variant == "unchecked":  # the same loading with the check switched off
            faissblob.check = lambda *args: None
        start = time.perf_counter()
        ix.load_index(path)
    seconds = time.perf_counter() - start
    status = Path("/proc/self/status").read_text()  # VmHWM: this process's peak (ru_maxrss survives exec)
    peak_kb = int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1])
    return {"seconds": seconds, "peak_rss_mb": peak_kb / 1024}


def _measure(variant: str, path: Path) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-m", "benchmarks.bench_index_check", "--child", variant, str(path)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def _index(kind: str, rows: int, dim: int) -> Path:
    from imgvec.vectors.index import build_index
    from imgvec.vectors.store import open_store

    store = generated_store(OUT / f"check-{rows}x{dim}.h5", rows, dim,
                            lambda start, n: np.random.default_rng(start).normal(size=(n, dim)).astype(np.float32))
    path = OUT / f"check-{rows}x{dim}.{kind}.index.h5"
    if not path.exists():
        with open_store(store) as s:
            build_index(s, kind).save(path)
    return path


def run(rows: int, dim: int, repeats: int, kinds: tuple[str, ...] = KINDS) -> dict[str, Any]:
    results = []
    for kind in kinds:
        path = _index(kind, rows, dim)
        runs: dict[str, list[dict[str, float]]] = {v: [] for v in ("unchecked", "load_index", "check")}
        for r in range(repeats):
            order = list(runs)[r % 3:] + list(runs)[: r % 3]
            for variant in order:
                runs[variant].append(_measure(variant, path))
        row = {"kind": kind, "rows": rows, "dim": dim, "index_mb": path.stat().st_size / 1e6}
        for variant, ms in runs.items():
            row[f"{variant}_s"] = best([m["seconds"] for m in ms])
            row[f"{variant}_peak_rss_mb"] = max(m["peak_rss_mb"] for m in ms)
        row["check_share"] = row["check_s"] / row["unchecked_s"]
        results.append(row)
        print(json.dumps(row), flush=True)
    return {"rows": rows, "dim": dim, "repeats": repeats, "results": results}


def markdown(data: dict[str, Any]) -> str:
    return md_table(
        ["index", "file MB", "unchecked open s", "load_index s", "check alone s", "check / open",
         "unchecked peak RSS MB", "load_index peak RSS MB"],
        [(f"{r['kind']} {r['rows']:,} x {r['dim']}", r["index_mb"], r["unchecked_s"], r["load_index_s"],
          r["check_s"], f"{100 * r['check_share']:.2f}%", r["unchecked_peak_rss_mb"], r["load_index_peak_rss_mb"])
         for r in data["results"]])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma-separated: flat,hnsw,ivfpq")
    ap.add_argument("--child", nargs=2, metavar=("VARIANT", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child(*args.child)))
        return {}
    data = run(args.rows, args.dim, args.repeats, tuple(args.kinds.split(",")))
    print(markdown(data))
    write_result(NAME, data)
    return data


if __name__ == "__main__":
    main()
