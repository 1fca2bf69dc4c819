"""Nearest-neighbour search: imgvec's FAISS indexes against faiss flat, hnswlib and scikit-learn.

Vectors are generated, L2-normalised, dim 1280 (EfficientNetB0 / MobileNetV2 size) and
clustered: a Gaussian mixture in a 64-d latent space, mapped to 1280-d by a random linear
map, plus small isotropic noise. Real CNN embeddings are clustered with low intrinsic
dimension; uniform high-dimensional noise would make every approximate index look bad
(all neighbours nearly equidistant). Queries are fresh draws from the same distribution.

Recall@10 is measured against exact inner-product search (faiss IndexFlatIP). imgvec's
indexes are made with ``imgvec.index._new_faiss_index`` and ``normalized`` (the same code
``build_index`` runs, minus the HDF5 store it reads from).

    python -m benchmarks.bench_index [--quick] [--full] [--ivfpq]   # --full adds N=1M (5 GB, slow)
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from typing import Any, Callable

import numpy as np

from .common import md_table, timed, write_result

NAME = "index"
DIM = 1280
K = 10


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


def bench_n(n: int, n_queries: int, singles: int, with_sklearn: bool, with_hnswlib: bool,
            ef_sweep: tuple[int, ...], with_ivfpq: bool = False) -> dict[str, Any]:
    import faiss

    from imgvec import index as ix

    print(f"# N={n:,}", file=sys.stderr)
    gen_s, (base, queries) = timed(lambda: make_data(n, n_queries))
    base = ix.normalized(base)
    qn = ix.normalized(queries)

    def faiss_search(index: Any, q: np.ndarray) -> np.ndarray:
        return index.search(ix.normalized(q), K)[1]

    rows: list[dict[str, Any]] = []
    flat_row, truth = run_contender("faiss IndexFlatIP (exact)", lambda: _faiss_add(faiss.IndexFlatIP(DIM), base),
                                    faiss_search, qn, None, singles)
    rows.append(flat_row)

    def imgvec_build(kind: str) -> Callable[[], Any]:
        def build() -> Any:
            index = ix._new_faiss_index(kind, DIM, n)
            if not index.is_trained:
                sample = np.sort(np.random.default_rng(0).choice(n, min(n, ix.TRAIN_SAMPLE_ROWS), replace=False))
                index.train(ix.normalized(base[sample]))
            step = ix.chunk_rows(base.shape[1])
            for start in range(0, n, step):
                index.add(ix.normalized(base[start : start + step]))
            return index
        return build

    auto = ix.choose_kind("auto", n, DIM)
    hnsw_index = None
    for kind in ("hnsw", "ivfpq") if with_ivfpq else ("hnsw",):
        label = f"imgvec {kind} (M={ix.HNSW_M}, efC={ix.HNSW_EF_CONSTRUCTION}, ef={ix.HNSW_EF_SEARCH})" \
            if kind == "hnsw" else f"imgvec {kind} (nprobe={ix.IVF_NPROBE})"
        build_s, index = timed(imgvec_build(kind))
        row, _ = run_contender(label, lambda: index, faiss_search, qn, truth, singles)
        row["build_s"] = build_s
        rows.append(row)
        if kind == "hnsw":
            hnsw_index = index
            # efSearch sweep on the same graph
            sweep = []
            for ef in ef_sweep:
                index.hnsw.efSearch = ef
                r, _ = run_contender(f"imgvec hnsw ef={ef}", lambda: index, faiss_search, qn, truth, singles)
                sweep.append({"ef_search": ef, **{k: r[k] for k in ("batch_qps", "single_query_ms", "recall_at_10")}})
            index.hnsw.efSearch = ix.HNSW_EF_SEARCH
        else:
            del index
            gc.collect()
    auto_row = dict(next(r for r in rows if r["name"].startswith(f"imgvec {auto}") or
                         (auto == "flat" and r["name"].startswith("faiss IndexFlatIP"))))
    auto_row["name"] = f"imgvec auto (-> {auto})"
    rows.insert(1, auto_row)
    del hnsw_index
    gc.collect()

    if with_hnswlib:
        import hnswlib

        def hb() -> Any:
            p = hnswlib.Index(space="ip", dim=DIM)
            p.init_index(max_elements=n, M=ix.HNSW_M, ef_construction=ix.HNSW_EF_CONSTRUCTION, random_seed=0)
            p.add_items(base, num_threads=-1)
            p.set_ef(ix.HNSW_EF_SEARCH)
            return p
        row, _ = run_contender("hnswlib (same M/efC/ef)", hb, lambda p, q: p.knn_query(q, k=K)[0].astype(np.int64),
                               qn, truth, singles)
        rows.append(row)
        gc.collect()

    if with_sklearn:
        from sklearn.neighbors import NearestNeighbors

        row, _ = run_contender("sklearn NearestNeighbors brute (cosine)",
                               lambda: NearestNeighbors(n_neighbors=K, algorithm="brute", metric="cosine").fit(base),
                               lambda nn, q: nn.kneighbors(q, return_distance=False), qn, truth, singles)
        rows.append(row)
    return {"n": n, "dim": DIM, "queries": n_queries, "auto_kind": auto, "generate_s": gen_s, "rows": rows,
            "ef_sweep": sweep}


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
        if res.get("ef_sweep"):
            out.append("\nimgvec HNSW, efSearch sweep on the same graph:\n\n")
            out.append(md_table(["efSearch", "queries/s (batch)", "ms / single query", "recall@10"],
                                [(s["ef_search"], s["batch_qps"], s["single_query_ms"], s["recall_at_10"])
                                 for s in res["ef_sweep"]]))
    return "".join(out)


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
    from imgvec import index

    return index


if __name__ == "__main__":
    main()
