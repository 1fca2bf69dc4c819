"""The whole ``imgvec query`` process against rows: 100k, 300k (and 1M with --full) x 1280, per index kind.

    python -m benchmarks.bench_query_scale            # 100k and 300k rows
    python -m benchmarks.bench_query_scale --full     # and 1M rows (three ~5 GB files; deleted afterwards)
    python -m benchmarks.bench_query_scale --rows 100000 --kinds hnsw

Stores come from ``benchmarks.make_store`` (generated unit rows, random-weight mobilenetv2
provenance, dim 1280), so nothing is embedded but the one query photo (500x375 JPEG). For each
size and index kind (flat, hnsw, ivfpq) the index is built with ``imgvec index --kind``, then
``imgvec query STORE PHOTO -k 10 --runtime openvino --index INDEX`` runs as its own process:
once to fill the compiled-model cache (not counted), once more with the store and index files
dropped from the page cache first (the cold query, as after a reboot), then ``--repeats`` times;
the states users are in are recorded apart (``states`` in the results, each with its load average):
``after_index`` (the first query right after ``imgvec index`` wrote the index: its pages as the
writer left them in the page cache; the compiled model was cached before the build, so only the
files' state differs), ``cold`` (the store and index evicted: ``posix_fadvise(DONTNEED)`` on both
files, or with ``--drop-caches`` the whole page cache as root, which disturbs everyone else on a
shared machine) and ``warm`` (the median of the repeats);
the table gives the cold time, the median warm time and the child's peak RSS (VmHWM, which counts
the index file's pages the search brought in, as RssFile). A profile of one query process per row splits the time into
stages (imports, opening the index, the store check, model load, embedding, search, reading
the hits' paths). The load average is recorded: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from .common import OUT, byte_compiled, load_average, md_table, photo_folder, where_measured, write_result

NAME = "query_scale"
DIM = 1280
KINDS = ("flat", "hnsw", "ivfpq")
TARGET_S = {"flat": 2.0, "hnsw": 1.0, "ivfpq": 1.0}  # at 1M rows (issue 20)
TARGET_RSS_MB = {"hnsw": 1024, "ivfpq": 1024}
# 300k HNSW in every state users are in (issue 28): the whole query process and its peak RSS.
STATE_TARGET = {"rows": 300_000, "kind": "hnsw", "wall_s": 1.0, "peak_rss_mb": 1024}
CACHE = OUT / "model-cache"

# One `imgvec query` process, as `python -m imgvec` runs it, reporting its memory right after the search
# (while the index is still mapped: private RssAnon and mapped-file RssFile) and its peak (VmHWM) at the end.
WRAPPER = r"""
import json, os, runpy, sys
import imgvec.api
def status():
    fields = dict(l.split(':', 1) for l in open('/proc/self/status').read().splitlines())
    return {k: int(fields[k].split()[0]) / 1024 for k in ('VmHWM', 'RssAnon', 'RssFile')}
seen = {}
search = imgvec.api.search_store
def searched(*args, **kwargs):
    out = search(*args, **kwargs)
    now = status()
    seen.update(anon_after_search_mb=now['RssAnon'], file_after_search_mb=now['RssFile'])
    return out
imgvec.api.search_store = searched
sys.argv = ['imgvec'] + sys.argv[1:]
try:
    runpy.run_module('imgvec', run_name='__main__', alter_sys=True)
finally:
    with open(os.environ['QUERY_SCALE_REPORT'], 'w') as fh:
        json.dump({**seen, 'VmHWM': status()['VmHWM']}, fh)
"""

PROFILE = r"""
import json, os, sys, time
t0 = time.perf_counter()
import numpy as np
from imgvec import api
from imgvec.embedding.embedder import Embedder
from imgvec.vectors.index import load_index, search_store
from imgvec.vectors.store import open_store
t = {"imports_s": time.perf_counter() - t0}
store, index_path, photo = sys.argv[1:4]
def stage(name, fn):
    s = time.perf_counter(); out = fn(); t[name] = time.perf_counter() - s; return out
with open_store(store) as s:
    index = stage("open_index_s", lambda: load_index(index_path))
    stage("check_store_rows_s", lambda: index.check_covers(s, tail=True))
    e = Embedder.from_provenance(s.provenance, runtime="openvino")
    stage("model_load_s", e.load)
    emb = stage("embed_s", lambda: next(iter(e.embed_files([photo]))).embeddings)
    scores, ids = stage("search_s", lambda: search_store(s, emb, 10, index))
    stage("read_hits_s", lambda: (s.paths_at(ids[0].tolist()), s.labels_at(ids[0].tolist())))
status = dict(l.split(':', 1) for l in open('/proc/self/status').read().splitlines())
t["peak_rss_mb"] = int(status["VmHWM"].split()[0]) / 1024
print(json.dumps(t))
"""


def _env(report: Path | None = None) -> dict[str, str]:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "IMGVEC_CACHE_DIR": str(CACHE)}
    if report:
        env["QUERY_SCALE_REPORT"] = str(report)
    return env


def free_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def _build(store: Path, kind: str, index: Path) -> dict[str, Any]:
    """``imgvec index --kind KIND`` in a child: wall seconds and peak RSS."""
    code = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
            "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
            "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code, sys.executable, "-m", "imgvec", "index", str(store), "--kind",
                          kind, "-o", str(index), "--rebuild"], check=True, capture_output=True, text=True,
                         env=_env()).stdout.split()
    return {"build_s": float(out[0]), "build_peak_rss_mb": int(out[1]) / 1024, "index_mb": index.stat().st_size / 2**20}


def store_for(rows: int) -> Path:
    return OUT / f"query-scale-{rows}x{DIM}.h5"


def scale_store(rows: int) -> Path:
    """The generated store of ``rows`` (``benchmarks.make_store``), written unless it is there."""
    from .make_store import write_store

    store = store_for(rows)
    if not store.exists():
        t = time.perf_counter()
        write_store(store, rows, DIM)
        print(f"  wrote {store.name} in {time.perf_counter() - t:.0f}s", file=sys.stderr)
    return store


def index_for(store: Path, kind: str) -> Path:
    return store.with_name(f"{store.stem}.{kind}.index.h5")


def figures_for(index: Path) -> Path:
    """Where an index's build figures are kept beside it, for a later run that reuses the index."""
    return index.with_name(index.name + ".build.json")


def built(store: Path, kind: str, index: Path, keep: bool) -> dict[str, Any]:
    """Build the index, or with ``keep`` reuse one a previous run built (and its build figures, kept beside it)."""
    figures = figures_for(index)
    if keep and index.exists() and figures.exists() and figures.stat().st_mtime >= index.stat().st_mtime:
        return json.loads(figures.read_text())
    built = _build(store, kind, index)
    figures.write_text(json.dumps(built))
    return built


def _query(store: Path, index: Path, photo: Path) -> dict[str, Any]:
    """One whole ``imgvec query`` process: wall seconds (start-up included) and its memory at the end."""
    report = OUT / "query-scale-report.json"
    report.unlink(missing_ok=True)
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", WRAPPER, "query", str(store), str(photo), "-k", "10", "--runtime",
                           "openvino", "--index", str(index), "-f", "json"], capture_output=True, text=True,
                          env=_env(report))
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"imgvec query exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
    hits = json.loads(proc.stdout)["queries"][0]["results"]
    if len(hits) != 10:
        raise RuntimeError(f"imgvec query gave {len(hits)} results, not 10")
    return {"wall_s": wall, **json.loads(report.read_text())}


def evict(*paths: Path) -> None:
    """Drop the files' pages from the page cache (clean pages no process maps: no root needed)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def drop_caches() -> bool:
    """Drop the whole page cache (``echo 1 > /proc/sys/vm/drop_caches``); False where not permitted."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except OSError:
        return False
    return True


def make_cold(drop: bool, *paths: Path) -> str:
    """Evict ``paths`` from the page cache; how (what the results record as the cold state's method)."""
    if drop and drop_caches():
        return "drop_caches"
    evict(*paths)
    return "posix_fadvise DONTNEED"


FILL_MODEL_CACHE = r"""
import sys
from imgvec.embedding.embedder import Embedder
from imgvec.vectors.store import open_store
with open_store(sys.argv[1]) as s:
    Embedder.from_provenance(s.provenance, runtime="openvino").load()
"""


def fill_model_cache(store: Path) -> None:
    """Convert and cache the store's model in a child (so the first query after ``index`` pays no conversion)."""
    subprocess.run([sys.executable, "-c", FILL_MODEL_CACHE, str(store)], check=True, capture_output=True, env=_env())


def _state(run: dict[str, Any]) -> dict[str, Any]:
    return {"wall_s": run["wall_s"], "peak_rss_mb": run["VmHWM"], "anon_after_search_mb": run.get("anon_after_search_mb"),
            "file_after_search_mb": run.get("file_after_search_mb"), "load_average": load_average()}


def _profile(store: Path, index: Path, photo: Path) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", PROFILE, str(store), str(index), str(photo)], check=True,
                         capture_output=True, text=True, env=_env()).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure(rows: int, kinds: tuple[str, ...], repeats: int, photo: Path, keep: bool,
            done: Callable[[dict[str, Any]], None], drop: bool = False) -> None:
    """Measure each index kind over a generated store of ``rows``; ``done(row)`` after each."""
    store = scale_store(rows)
    try:
        fill_model_cache(store)
        for kind in kinds:
            index = index_for(store, kind)
            row: dict[str, Any] = {"rows": rows, "kind": kind, "load_average_before": load_average(),
                                   "mem_available_gb_before": round(free_gb(), 1)}
            fresh = not (keep and index.exists() and figures_for(index).exists())
            row.update(built(store, kind, index, keep))
            states: dict[str, Any] = {}
            if fresh:  # the first query right after `imgvec index`: the index as its writer left it
                states["after_index"] = _state(_query(store, index, photo))
            else:
                _query(store, index, photo)
                states["after_index"] = None  # an index reused from an earlier --keep run: not this state
            method = make_cold(drop, store, index)  # then one query from a cold page cache, as after a reboot
            cold = _query(store, index, photo)
            states["cold"] = {**_state(cold), "method": method}
            runs = [_query(store, index, photo) for _ in range(repeats)]
            states["warm"] = {**_state(sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]),
                              "median_of": len(runs)}
            row["states"] = states
            row.update(cold_s=cold["wall_s"], cold_peak_rss_mb=cold["VmHWM"],
                       median_s=statistics.median(r["wall_s"] for r in runs), runs_s=[r["wall_s"] for r in runs],
                       peak_rss_mb=max(r["VmHWM"] for r in runs),
                       anon_after_search_mb=max(r["anon_after_search_mb"] for r in runs),
                       file_after_search_mb=max(r["file_after_search_mb"] for r in runs),
                       profile=_profile(store, index, photo),
                       load_average_after=load_average())
            print(f"  {rows} {kind}: {row['median_s']:.2f}s, {row['peak_rss_mb']:.0f} MB peak "
                  f"(load {row['load_average_after'][0]})", file=sys.stderr)
            done(row)
            if not keep:
                index.unlink()
                figures_for(index).unlink(missing_ok=True)
    finally:
        if not keep:
            store.unlink(missing_ok=True)


def markdown(data: dict[str, Any]) -> str:
    nan = float("nan")
    def after(r: dict[str, Any], key: str) -> Any:
        state = (r.get("states") or {}).get("after_index")
        return state[key] if state else nan

    rows = [(f"{r['rows']:,}", r["kind"], r["median_s"], r.get("cold_s", nan), after(r, "wall_s"),
             after(r, "peak_rss_mb"), r["peak_rss_mb"],
             r.get("anon_after_search_mb", nan), r.get("file_after_search_mb", nan),
             r["index_mb"], r["build_s"], r["load_average_after"][0]) for r in data["runs"]]
    text = ("The whole `imgvec query` process (one 500x375 photo, k=10, OpenVINO with its cached compiled model, "
            "random-weight mobilenetv2, dim 1280) against a generated store "
            f"(`python -m benchmarks.make_store`), median of {data['repeats']}. Peak RSS is the process's VmHWM. "
            "The cold query ran first, with the store and index files dropped from the page cache. "
            "Right after the search the memory splits into private memory (RssAnon) and mapped file pages "
            "(RssFile: the libraries and the index file's pages the search brought in, shared page cache; "
            "this kernel maps whole large folios of a cached file, not only the pages read: a 1M-row HNSW "
            "search computing 1,249 distances, 6 MB of vectors, mapped 1.6 GB of an index file still cached "
            "as `imgvec index` wrote it).\n\n")
    text += ("The query right after `imgvec index` (the index file's pages as the writer left them in the page "
             "cache; the model was cached before the build) is its own column, as users meet it.\n\n")
    text += md_table(["rows", "index", "query s", "cold query s", "after index s", "after index peak RSS MB",
                      "peak RSS MB", "private MB", "mapped file MB", "index MB", "build s", "load avg"], rows)
    text += _machines(data["runs"])
    verdicts = []
    for r in (r for r in data["runs"] if r["rows"] >= 1_000_000):
        limit_s, limit_mb = TARGET_S[r["kind"]], TARGET_RSS_MB.get(r["kind"])
        met = r["median_s"] <= limit_s and (limit_mb is None or r["peak_rss_mb"] <= limit_mb)
        verdicts.append(f"{r['kind']} {r['median_s']:.2f} s (<= {limit_s:g} s)"
                        + (f", {r['peak_rss_mb']:,.0f} MB peak (<= {limit_mb:,} MB)" if limit_mb else "")
                        + (": met" if met else ": **not met**"))
    if verdicts:
        text += "\nTargets at 1,000,000 rows (warm page cache): " + "; ".join(verdicts) + ".\n"
    t = STATE_TARGET
    for r in (r for r in data["runs"] if (r["rows"], r["kind"]) == (t["rows"], t["kind"]) and r.get("states")):
        said = []
        for name, state in r["states"].items():
            if state is None:
                said.append(f"{name}: not measured (index reused)")
                continue
            met = state["wall_s"] <= t["wall_s"] and state["peak_rss_mb"] <= t["peak_rss_mb"]
            said.append(f"{name} {state['wall_s']:.2f} s, {state['peak_rss_mb']:,.0f} MB (load {state['load_average'][0]})"
                        + (": met" if met else ": **not met**"))
        text += (f"\nTargets at {t['rows']:,} rows {t['kind']}, each state (<= {t['wall_s']:g} s, "
                 f"<= {t['peak_rss_mb']:,} MB peak): " + "; ".join(said) + ".\n")
    stages = [(f"{r['rows']:,}", r["kind"], *(r["profile"].get(k, float("nan")) for k in PROFILE_STAGES))
              for r in data["runs"]]
    text += "\nWhere one query process spends its time (seconds):\n\n"
    text += md_table(["rows", "index", *PROFILE_STAGES], stages)
    return text


def _machines(runs: list[dict[str, Any]]) -> str:
    """Where rows kept from different runs were measured (compare rows of one machine only); empty for one run."""
    where: dict[tuple[str, str], list[str]] = {}
    for r in runs:
        where.setdefault((r.get("machine", "?"), r.get("date", "?")), []).append(f"{r['rows']:,} {r['kind']}")
    if len(where) < 2:
        return ""
    return ("\nRows measured on different machines (compare rows of one machine only): "
            + "; ".join(f"{', '.join(rows)} on {cpu} ({date})" for (cpu, date), rows in where.items()) + ".\n")


PROFILE_STAGES = ("imports_s", "open_index_s", "check_store_rows_s", "model_load_s", "embed_s", "search_s",
                  "read_hits_s")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="also 1,000,000 rows (15 GB of files, ~11 GB to build HNSW)")
    ap.add_argument("--quick", action="store_true", help="20,000 rows only")
    ap.add_argument("--rows", type=int, nargs="*", default=None, help="row counts to measure instead")
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma-separated index kinds")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--keep", action="store_true",
                    help="keep the generated stores and indexes, and reuse the ones an earlier --keep run left")
    ap.add_argument("--drop-caches", action="store_true",
                    help="cold state: drop the whole page cache (root; disturbs a shared machine) instead of "
                         "evicting the two files")
    args = ap.parse_args(argv)
    sizes = args.rows or ([20_000] if args.quick else [100_000, 300_000] + ([1_000_000] if args.full else []))
    kinds = tuple(args.kinds.split(","))
    photo = sorted(photo_folder(1).glob("*.jpg"))[0]
    byte_compiled()  # the query processes read imgvec compiled, as after pip install
    name = NAME + ("-quick" if args.quick else "")
    previous = _previous(name) if args.rows else {}
    runs: list[dict[str, Any]] = previous.get("runs", [])
    where_measured(runs, previous, [])
    path = None

    def done(row: dict[str, Any]) -> None:  # results are written after every measurement: a 1M run is long
        nonlocal runs, path
        where_measured([], {}, [row])
        runs = [r for r in runs if (r["rows"], r["kind"]) != (row["rows"], row["kind"])] + [row]
        runs.sort(key=lambda r: (r["rows"], KINDS.index(r["kind"])))
        path = write_result(name, {"quick": args.quick, "dim": DIM, "repeats": args.repeats, "photo": "500x375 JPEG",
                                   "runs": runs, "targets_at_1m": {"median_s": TARGET_S, "peak_rss_mb": TARGET_RSS_MB}})

    for rows in sizes:
        print(f"## {rows} rows (load {load_average()}, {free_gb():.1f} GB available)", file=sys.stderr)
        measure(rows, kinds, args.repeats, photo, args.keep, done, args.drop_caches)
    if path:
        print(markdown(json.loads(path.read_text())))


def _previous(name: str) -> dict[str, Any]:
    from .common import RESULTS

    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


if __name__ == "__main__":
    main()
