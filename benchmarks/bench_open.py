"""What the structure checks cost when opening a large store: before and after, side by side.

    python -m benchmarks.bench_open [--rows 1000000] [--dim 1280] [--before main] [--repeats 7] [--keep]

Writes a store of ``rows`` x ``dim`` in imgvec's layout (about 5 GB at 1M x 1280, removed
afterwards unless ``--keep``), then times in fresh child processes, alternating the code of
``--before`` (a git revision, extracted to a temporary folder) with this work tree's:

* ``open``: ``open_store`` (header and structure checks) and close;
* ``open+hits``: open and read the paths and labels of 10 rows (a query's hits);
* ``open+keys``: open and read every path and label (what ``info`` does), where the
  string lengths are now summed before the strings are read.

Each child reports the wall time and the peak RSS above what it held before opening (Linux: the
peak is reset through /proc/self/clear_refs); the medians go to benchmarks/results/open.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

import numpy as np

from .common import OUT, ROOT, generated_store, load_average, write_result

CHILD = r"""
import json, sys, time
import h5py, numpy  # imported before timing: both readers import them lazily on the first open
from imgvec.vectors.store import open_store
path, what = sys.argv[1], sys.argv[2]

def rss_kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])

base = rss_kb("VmRSS:")
with open("/proc/self/clear_refs", "w") as fh:  # reset the peak (VmHWM) to what is resident now
    fh.write("5")
t = time.perf_counter()
with open_store(path) as s:
    if what == "open+keys":
        n = len(s.paths()) + len(s.labels())
    elif what == "open+hits":  # what a query reads besides its index: 10 hits' paths and labels
        hits = [(i * 7919 * 104729) % s.rows for i in range(10)]
        n = len(s.paths_at(hits)) + len(s.labels_at(hits))
seconds = time.perf_counter() - t
print(json.dumps({"seconds": seconds, "peak_rss_mb": (rss_kb("VmHWM:") - base) / 1024}))
"""


def _extract(rev: str, into: Path) -> Path:
    """``src/`` of git revision ``rev``, extracted under ``into``."""
    data = subprocess.run(["git", "archive", rev, "src"], cwd=ROOT.parent, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def _child(src: Path, path: Path, what: str) -> dict[str, float]:
    done = subprocess.run([sys.executable, "-c", CHILD, str(path), what], capture_output=True, text=True,
                          env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"}, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--before", default="main", help="git revision whose reader is the baseline")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--keep", action="store_true", help="keep the generated store")
    args = ap.parse_args()

    path = OUT / f"open-{args.rows}x{args.dim}.h5"
    rng = np.random.default_rng(0)
    generated_store(path, args.rows, args.dim, lambda start, n: rng.standard_normal((n, args.dim), np.float32))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            sources = {"before": _extract(args.before, Path(tmp)), "after": ROOT.parent / "src"}
            results: dict[str, dict[str, dict[str, list[float]]]] = {}
            for what in ("open", "open+hits", "open+keys"):
                runs: dict[str, list[dict[str, float]]] = {name: [] for name in sources}
                _child(sources["after"], path, what)  # warm the page cache
                for r in range(args.repeats):
                    for name in (list(sources) if r % 2 == 0 else list(sources)[::-1]):
                        runs[name].append(_child(sources[name], path, what))
                results[what] = {name: {"seconds": [x["seconds"] for x in rs],
                                        "peak_rss_mb": [x["peak_rss_mb"] for x in rs]} for name, rs in runs.items()}
        summary = {}
        for what, by in results.items():
            med = {name: {k: statistics.median(v) for k, v in d.items()} for name, d in by.items()}
            summary[what] = {**med, "added_seconds": med["after"]["seconds"] - med["before"]["seconds"],
                             "added_percent": 100 * (med["after"]["seconds"] / med["before"]["seconds"] - 1),
                             "added_rss_mb": med["after"]["peak_rss_mb"] - med["before"]["peak_rss_mb"]}
        out = write_result("open", {"rows": args.rows, "dim": args.dim, "file_bytes": path.stat().st_size,
                                    "load_average": load_average(),
                                    "before": args.before, "repeats": args.repeats, "summary": summary,
                                    "runs": results})
        print(json.dumps(summary, indent=1))
        print(f"wrote {out}")
    finally:
        if not args.keep:
            path.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
