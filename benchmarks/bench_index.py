"""Nearest-neighbour search: imgvec's FAISS indexes against faiss flat, hnswlib and scikit-learn.

Vectors are generated, L2-normalised, dim 1280 (EfficientNetB0 / MobileNetV2 size) and
clustered: a Gaussian mixture in a 64-d latent space, mapped to 1280-d by a random linear
map, plus small isotropic noise. Real CNN embeddings are clustered with low intrinsic
dimension; uniform high-dimensional noise would make every approximate index look bad
(all neighbours nearly equidistant). Queries are fresh draws from the same distribution.

Recall@10 is measured against exact inner-product search (faiss IndexFlatIP). Every row labelled
imgvec is imgvec's own path end to end: the vectors are written to a store file, a fresh process
builds the index from it (``imgvec.vectors.index.build_index(open_store(...))``, streamed in chunks) and
saves it (``VectorIndex.save``), three more fresh processes load it (``load_index``), and the
queries go through ``VectorIndex.search``. Build and load peaks are each child's own VmHWM from
/proc/self/status (ru_maxrss can carry a parent's peak across exec), shown beside the index file's
size and beside the interpreter's RSS after its imports.

    python -m benchmarks.bench_index [--quick] [--full] [--ivfpq]   # --full adds N=1M (5 GB, slow)
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .common import OUT, fmt, generated_store, md_table, median, timed, write_result

NAME = "index"
DIM = 1280
K = 10
LOAD_FIXED_MB = 64  # what loading may hold beyond the index without it being a second copy


def clustered(n: int, dim: int, rng: np.random.Generator, clusters: int = 500, latent: int = 64,
              proj: np.ndarray | None = None, centres: np.ndarray | None = None,
              chunk: int = 100_000) -> np.ndarray:
    """``n`` unit vectors from a clustered, low-intrinsic-dimension distribution (float32)."""
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        which = rng.integers(0, len(centres), m)
        spread = rng.uniform(0.3, 0.8, len(centres))[which, None]  # clusters differ in size
        z = centres[which] + spread * rng.standard_normal((m, latent), dtype=np.float32)
        x = z @ proj + 0.15 * rng.standard_normal((m, dim), dtype=np.float32)
        out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def make_data(n: int, n_queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    latent = 64
    centres = rng.standard_normal((500, latent), dtype=np.float32)
    proj = (rng.standard_normal((latent, DIM), dtype=np.float32) / np.sqrt(latent)).astype(np.float32)
    base = clustered(n, DIM, rng, latent=latent, proj=proj, centres=centres)
    queries = clustered(n_queries, DIM, rng, latent=latent, proj=proj, centres=centres)
    return base, queries


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f[f >= 0]) & set(t)) / len(t) for f, t in zip(found, truth)]))


def run_contender(name: str, build: Callable[[], Any], search: Callable[[Any, np.ndarray], np.ndarray],
                  queries: np.ndarray, truth: np.ndarray | None, singles: int) -> tuple[dict[str, Any], Any]:
    build_s, index = timed(build)
    search(index, queries[:10])  # warm-up
    batch_s, ids = timed(lambda: search(index, queries))
    t = time.perf_counter()
    for q in queries[:singles]:
        search(index, q[None])
    single_ms = (time.perf_counter() - t) / singles * 1000
    row = {"name": name, "build_s": build_s, "batch_qps": len(queries) / batch_s, "single_query_ms": single_ms,
           "recall_at_10": recall(ids, truth) if truth is not None else 1.0}
    print(f"  {name}: build {build_s:.1f}s, {row['batch_qps']:.0f} q/s batched, {single_ms:.2f} ms single, "
          f"recall@10 {row['recall_at_10']:.4f}", file=sys.stderr)
    return row, ids


# Run in fresh interpreters: VmHWM (the process's own peak RSS, reset by exec) is read at the end;
# ru_maxrss could carry the parent's peak across exec. "base" is VmRSS after the imports.
_STATUS = """
def vm(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
"""
BUILD = _STATUS + """
import json, sys, time
import faiss, h5py, numpy
from imgvec.vectors.index import build_index
from imgvec.vectors.store import open_store
base = vm("VmRSS")
t = time.perf_counter()
with open_store(sys.argv[1]) as store:
    index = build_index(store, sys.argv[2])
built = time.perf_counter()
index.save(sys.argv[3])
saved = time.perf_counter()
print(json.dumps({"kind": index.kind, "build_s": built - t, "save_s": saved - built, "peak_mb": vm("VmHWM"),
                  "base_mb": base}))
"""
LOAD = _STATUS + """
import json, sys, time
import faiss, h5py, numpy
from imgvec.vectors.index import load_index
base = vm("VmRSS")
t = time.perf_counter()
index = load_index(sys.argv[1])
print(json.dumps({"load_s": time.perf_counter() - t, "peak_mb": vm("VmHWM"), "base_mb": base}))
"""


def _child(script: str, *args: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark child failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def imgvec_build(store: Path, kind: str, n: int, loads: int = 3) -> tuple[dict[str, Any], Path]:
    """Build+save ``kind`` from the store file in a fresh process, then load it in ``loads`` fresh ones."""
    from imgvec.vectors import index as ix

    path = store.with_name(f"{store.stem}.{kind}.index.h5")
    b = _child(BUILD, str(store), kind, str(path))
    ls = [_child(LOAD, str(path)) for _ in range(loads)]
    file_mb = path.stat().st_size / 1e6
    mem = {"kind": b["kind"], "index_file_mb": file_mb, "index_estimate_mb": ix.index_bytes(b["kind"], n, DIM) / 1e6,
           "auto_budget_mb": ix.build_peak_bytes(b["kind"], n, DIM) / 1e6,
           "build_s": b["build_s"], "save_s": b["save_s"], "build_peak_mb": b["peak_mb"], "build_base_mb": b["base_mb"],
           "load_s": median([x["load_s"] for x in ls]), "load_s_all": [x["load_s"] for x in ls],
           "load_peak_mb": median([x["peak_mb"] for x in ls]), "load_peak_mb_all": [x["peak_mb"] for x in ls],
           "load_base_mb": median([x["base_mb"] for x in ls])}
    print(f"  imgvec {kind} from the store: build {b['build_s']:.1f}s + save {b['save_s']:.1f}s, peak "
          f"{b['peak_mb']:.0f} MB; file {file_mb:.0f} MB; load {mem['load_s']:.2f}s, peak {mem['load_peak_mb']:.0f} MB",
          file=sys.stderr)
    return mem, path


def bench_n(n: int, n_queries: int, singles: int, with_sklearn: bool, with_hnswlib: bool,
            ef_sweep: tuple[int, ...], with_ivfpq: bool = False) -> dict[str, Any]:
    from imgvec.vectors import index as ix

    print(f"# N={n:,}", file=sys.stderr)
    gen_s, (base, queries) = timed(lambda: make_data(n, n_queries))
    base = ix.normalized(base)
    qn = ix.normalized(queries)
    store = generated_store(OUT / f"index-bench-{n}-v1.h5", n, DIM, lambda start, m, x=base: x[start : start + m])
    flat_row, truth, others = _baselines(base, qn, singles, with_hnswlib, with_sklearn)
    del base  # from here on imgvec reads the store file, and its builds run in fresh processes
    gc.collect()
    auto = ix.choose_kind("auto", n, DIM)
    kinds = [auto] + [k for k in ("hnsw", "ivfpq" if with_ivfpq else "") if k and k != auto]
    imgvec_rows, memory, sweep = [], [], []
    for kind in kinds:
        row, mem, ef_rows = _imgvec_contender(store, kind, kind == auto, n, qn, truth, singles, ef_sweep)
        imgvec_rows.append(row)
        memory.append(mem)
        sweep += ef_rows
    return {"n": n, "dim": DIM, "queries": n_queries, "auto_kind": auto, "generate_s": gen_s,
            "rows": [flat_row, *imgvec_rows, *others], "memory": memory, "ef_sweep": sweep}


def _baselines(base: np.ndarray, qn: np.ndarray, singles: int, with_hnswlib: bool, with_sklearn: bool
               ) -> tuple[dict[str, Any], np.ndarray, list[dict[str, Any]]]:
    """Exact faiss IndexFlatIP (the ground truth), hnswlib and scikit-learn, built from ``base`` in memory."""
    import faiss

    from imgvec.vectors import index as ix

    flat_row, truth = run_contender("faiss IndexFlatIP (exact)", lambda: _faiss_add(faiss.IndexFlatIP(DIM), base),
                                    lambda index, q: index.search(ix.normalized(q), K)[1], qn, None, singles)
    gc.collect()
    others: list[dict[str, Any]] = []
    if with_hnswlib:
        import hnswlib

        def hb() -> Any:
            p = hnswlib.Index(space="ip", dim=DIM)
            p.init_index(max_elements=len(base), M=ix.HNSW_M, ef_construction=ix.HNSW_EF_CONSTRUCTION, random_seed=0)
            p.add_items(base, num_threads=-1)
            p.set_ef(ix.HNSW_EF_SEARCH)
            return p
        row, _ = run_contender("hnswlib (same M/efC/ef)", hb, lambda p, q: p.knn_query(q, k=K)[0].astype(np.int64),
                               qn, truth, singles)
        others.append(row)
        gc.collect()
    if with_sklearn:
        from sklearn.neighbors import NearestNeighbors

        row, _ = run_contender("sklearn NearestNeighbors brute (cosine)",
                               lambda: NearestNeighbors(n_neighbors=K, algorithm="brute", metric="cosine").fit(base),
                               lambda nn, q: nn.kneighbors(q, return_distance=False), qn, truth, singles)
        others.append(row)
        gc.collect()
    return flat_row, truth, others


def _imgvec_contender(store: Path, kind: str, is_auto: bool, n: int, qn: np.ndarray, truth: np.ndarray,
                      singles: int, ef_sweep: tuple[int, ...]
                      ) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """imgvec's ``kind`` end to end: built from the store file and saved in a fresh process (build+save
    peak), loaded in fresh processes (load time and peak), then loaded here and searched through
    ``VectorIndex.search``; for HNSW also an efSearch sweep on the same graph."""
    import faiss

    from imgvec.vectors import index as ix

    mem, path = imgvec_build(store, kind, n)
    vi = ix.load_index(path)
    path.unlink()
    params = {"hnsw": f"M={ix.HNSW_M}, efC={ix.HNSW_EF_CONSTRUCTION}, ef={ix.HNSW_EF_SEARCH}",
              "ivfpq": f"nprobe={ix.IVF_NPROBE}", "flat": "exact"}[kind]
    label = f"imgvec auto (-> {kind}; {params})" if is_auto else f"imgvec {kind} ({params})"

    def search(v: Any, q: np.ndarray) -> np.ndarray:
        return v.search(q, K)[1]

    row, _ = run_contender(label, lambda: vi, search, qn, truth, singles)
    row["build_s"] = mem["build_s"]
    row["built_from"] = "store file, fresh process"
    sweep = []
    if kind == "hnsw":
        graph = faiss.downcast_index(vi.faiss_index).hnsw
        for ef in ef_sweep:
            graph.efSearch = ef
            r, _ = run_contender(f"imgvec hnsw ef={ef}", lambda: vi, search, qn, truth, singles)
            sweep.append({"ef_search": ef, **{k: r[k] for k in ("batch_qps", "single_query_ms", "recall_at_10")}})
    return row, {"name": f"imgvec {kind}" + (" (auto)" if is_auto else ""), **mem}, sweep


def _faiss_add(index: Any, x: np.ndarray) -> Any:
    index.add(x)
    return index


def markdown(data: dict[str, Any]) -> str:
    out = []
    for res in data["sizes"]:
        out.append(f"\nN = {res['n']:,} clustered unit vectors, dim {res['dim']}, {res['queries']} queries, k={K} "
                   f"(2 cores; auto picks **{res['auto_kind']}** at this size):\n\n")
        out.append(md_table(["index", "build s", "queries/s (batch)", "ms / single query", "recall@10"],
                            [(r["name"], r["build_s"], r["batch_qps"], r["single_query_ms"], r["recall_at_10"])
                             for r in res["rows"]]))
        flat = next((r for r in res["rows"] if "exact" in r["name"]), None)
        auto = next((r for r in res["rows"] if r["name"].startswith("imgvec auto")), None)
        if flat and auto and res["auto_kind"] != "flat":
            out.append(f"\nimgvec auto: {auto['batch_qps'] / flat['batch_qps']:.0f}x the exact queries/s at "
                       f"recall@10 {auto['recall_at_10']:.3f} (targets: 10x, 0.95).\n")
        if not any(r["name"].startswith("sklearn") for r in res["rows"]):
            out.append("\nscikit-learn's brute force is left out at this size to keep the run short: it is exact "
                       "search like IndexFlatIP, scales linearly like it, and trails it at the smaller size.\n")
        if res.get("memory"):
            out.append(_memory_markdown(res))
        if res.get("ef_sweep"):
            out.append("\nimgvec HNSW, efSearch sweep on the same graph:\n\n")
            out.append(md_table(["efSearch", "queries/s (batch)", "ms / single query", "recall@10"],
                                [(s["ef_search"], s["batch_qps"], s["single_query_ms"], s["recall_at_10"])
                                 for s in res["ef_sweep"]]))
    return "".join(out)


def _memory_markdown(res: dict[str, Any]) -> str:
    """Build and load peaks of imgvec's indexes beside the index file's size."""
    out = [f"\nimgvec's indexes at N = {res['n']:,}: built from the store file and saved in a fresh process, loaded "
           "in 3 fresh processes (load time and peak: the median). Peaks are each process's VmHWM; the interpreter "
           "with numpy, h5py and faiss imported holds the RSS in brackets before any work; x index = (peak - "
           "interpreter) / index file:\n\n"]
    out.append(md_table(
        ["index", "file MB", "build + save s", "build+save peak MB", "x index", "auto budgets MB", "load s",
         "load peak MB", "x index"],
        [(m["name"], m["index_file_mb"],
          f"{fmt(m['build_s'])} + {fmt(m['save_s'])}", f"{fmt(m['build_peak_mb'])} ({fmt(m['build_base_mb'])})",
          f"{_above(m, 'build') / m['index_file_mb']:.2f}", m["auto_budget_mb"], m["load_s"],
          f"{fmt(m['load_peak_mb'])} ({fmt(m['load_base_mb'])})", f"{_above(m, 'load') / m['index_file_mb']:.2f}")
         for m in res["memory"]]))
    for m in res["memory"]:
        build, load = _above(m, "build"), _above(m, "load")
        covered = "covers the peak" if build <= m["auto_budget_mb"] else "**does not cover the peak**"
        # A second copy would add the index again; HDF5's cache and a 16 MiB I/O block are fixed costs.
        second = load >= 1.5 * m["index_file_mb"] + LOAD_FIXED_MB
        copies = "**a second copy of the index**" if second else "no second copy"
        out.append(f"\n- {m['kind']}: build+save peaks {build:,.0f} MB above the interpreter for a "
                   f"{m['index_file_mb']:,.0f} MB index ({build / m['index_file_mb']:.2f}x); `auto` budgets "
                   f"{m['auto_budget_mb']:,.0f} MB for it (twice the index, as FAISS grows storage by doubling, plus "
                   f"the streamed chunks) and {covered}; loading peaks "
                   f"{load:,.0f} MB above the interpreter, the index + {load - m['index_file_mb']:,.0f} MB "
                   f"({copies}), in {m['load_s']:.2f} s.")
    return "".join(out) + "\n"


def _above(m: dict[str, Any], what: str) -> float:
    return m[f"{what}_peak_mb"] - m[f"{what}_base_mb"]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="N=20k only")
    ap.add_argument("--full", action="store_true", help="also N=1M (5 GB of vectors; HNSW build takes long)")
    ap.add_argument("--ivfpq", action="store_true",
                    help="also imgvec's IVF-PQ (its PQ64 training took 338 s at N=20k on 2 cores)")
    ap.add_argument("--sizes", default=None, help="comma-separated N values (overrides --quick/--full)")
    args = ap.parse_args(argv)
    if args.sizes:
        sizes = [int(s) for s in args.sizes.split(",")]
    else:
        sizes = [20_000] if args.quick else [100_000] + ([1_000_000] if args.full else [])
    results = []
    for n in sizes:
        big = n >= 1_000_000
        results.append(bench_n(n, 1000, singles=50 if not big else 20, with_sklearn=not big, with_hnswlib=True,
                               ef_sweep=(16, 32, 64, 128, 256), with_ivfpq=args.ivfpq))
        gc.collect()
    data = {"quick": args.quick, "sizes": results,
            "params": {"AUTO_FLAT_MAX_ROWS": _ix().AUTO_FLAT_MAX_ROWS, "HNSW_M": _ix().HNSW_M,
                       "HNSW_EF_CONSTRUCTION": _ix().HNSW_EF_CONSTRUCTION, "HNSW_EF_SEARCH": _ix().HNSW_EF_SEARCH}}
    write_result(NAME + ("-quick" if args.quick else ""), data)
    print(markdown(data))
    return data


def _ix() -> Any:
    from imgvec.vectors import index

    return index


if __name__ == "__main__":
    main()
