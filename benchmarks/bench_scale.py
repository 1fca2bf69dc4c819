"""Past one CPU: Ray engine vs local engine, streaming IVF-PQ indexing memory, mixed precision.

    python -m benchmarks.bench_scale            # 300 photos, 100k-row index
    python -m benchmarks.bench_scale --full     # and the 1M x 1280 index (writes a 5 GB store)

All runs use random (seeded) weights: these are speed and memory figures, not accuracy.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np

from .common import OUT, generated_store, md_table, photo_folder, quiet_tf, write_result

NAME = "scale"
MODEL = "mobilenetv2"


def ray_vs_local(n: int) -> dict:
    """Whole-command wall time (start-up included) and the embedding-only rate of each engine."""
    import imgvec

    folder = photo_folder(n)
    quiet_tf()
    import ray

    rows = []
    for label, kwargs in [("local", {}), ("ray, 1 worker", {"engine": "ray", "ray_workers": 1}),
                          ("ray, 2 workers", {"engine": "ray", "ray_workers": 2})]:
        out = OUT / f"scale-{label.replace(', ', '-').replace(' ', '')}.h5"
        if out.exists():
            out.unlink()
        init_s = 0.0
        if kwargs and not ray.is_initialized():
            t = time.perf_counter()
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR", log_to_driver=False)
            init_s = time.perf_counter() - t
        s = imgvec.embed([folder], out, model=MODEL, weights="none", **kwargs)
        rows.append({"engine": label, "images": s.added, "seconds": s.seconds, "images_per_s": s.images_per_second,
                     "ray_init_s": init_s})
    if ray.is_initialized():
        ray.shutdown()
    base = rows[0]["images_per_s"]
    for r in rows:
        r["vs_local"] = r["images_per_s"] / base
    return {"model": MODEL, "images": n, "rows": rows,
            "note": "seconds cover the whole embed call: model load (in each new actor process for Ray), decoding, "
                    "inference, store writes; ray.init is timed separately"}


def index_memory(rows: int, dim: int = 1280, kind: str = "ivfpq") -> dict:
    """Peak RSS of `imgvec index --kind KIND` in a child process, against the store's size."""
    store = OUT / f"scale-{rows}x{dim}.h5"
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(1000, dim)).astype(np.float32)
    generated_store(store, rows, dim, lambda start, n: centres[rng.integers(0, 1000, n)] + rng.normal(0, 0.7, (n, dim)))
    index = store.with_name(store.stem + f".{kind}.index.h5")
    code = ("import resource, sys, time, imgvec; t = time.perf_counter(); "
            f"s = imgvec.build_index({str(store)!r}, kind={kind!r}, output={str(index)!r}, rebuild=True); "
            "print(s.rows, time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
    n, seconds, maxrss_kb = int(out[0]), float(out[1]), int(out[2])
    return {"kind": kind, "rows": n, "dim": dim, "seconds": seconds, "peak_rss_gb": maxrss_kb / 2**20,
            "whole_store_gb": rows * dim * 4 / 2**30, "index_file_gb": index.stat().st_size / 2**30}


def mixed_precision_cosine(n: int = 64) -> dict:
    """Mean and minimum cosine between float32 and mixed-precision embeddings of the same images."""
    from imgvec.embedding.embedder import Embedder
    from imgvec.errors import BadInputError

    rng = np.random.default_rng(0)
    from .common import photo_like

    pixels = np.stack([np.asarray(photo_like(rng, 224, 224)) for _ in range(n)])
    out = {}
    for name in ("mobilenetv2", "efficientnetb0", "resnet50"):
        a = Embedder(name, "none", 224, runtime="tensorflow").embed_arrays(pixels)
        try:
            b = Embedder(name, "none", 224, precision="mixed", runtime="tensorflow").embed_arrays(pixels)
        except BadInputError as error:  # random weights can leave float16's range: imgvec refuses
            out[name] = {"mean_cosine": None, "min_cosine": None, "refused": str(error),
                         "float32_max_abs": float(np.abs(a).max())}
            continue
        cos = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        out[name] = {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min())}
    return out


def markdown(data: dict) -> str:
    r = data["ray_vs_local"]
    out = [f"Ray engine against the local one, {r['images']} photo-like JPEGs, {r['model']}, random weights, "
           "2 cores (a local Ray started for the run):\n\n",
           md_table(["engine", "seconds", "images/s", "vs local", "ray.init s"],
                    [(x["engine"], x["seconds"], x["images_per_s"], x["vs_local"], x.get("ray_init_s", 0.0))
                     for x in r["rows"]]),
           "\nOn one 2-core machine Ray can only cost: each actor is a new process that imports TensorFlow and "
           "builds the model before its first batch, results travel through Ray's object store, and two actors "
           "split the same two cores that one local TensorFlow process already uses. Across machines, each "
           "worker adds about the 1-worker rate above (its own cores, its own model) as long as the shared "
           "filesystem and the single writer keep up; the writer only appends float32 rows to HDF5.\n\n",
           "Indexing from the store in chunks (`imgvec index --kind ivfpq`, generated clustered vectors):\n\n",
           md_table(["index", "rows x dim", "build s", "peak RSS GB", "store in RAM would be GB", "index file GB"],
                    [(m["kind"], f"{m['rows']:,} x {m['dim']}", m["seconds"], m["peak_rss_gb"],
                      m["whole_store_gb"], m["index_file_gb"]) for m in data["index_memory"]]),
           "\nMixed precision (`--precision mixed`, float16 compute on the TensorFlow runtime) against float32 on the same 64 images, "
           "computed on the CPU (random weights):\n\n",
           md_table(["backbone", "mean cosine", "min cosine"],
                    [(k, f"{v['mean_cosine']:.6f}", f"{v['min_cosine']:.6f}") if v["mean_cosine"] is not None else
                     (k, f"refused: random-weight activations peak at {v['float32_max_abs']:.1e}, "
                         "below float16's range (imgvec stops with an error, not zero vectors)", "-")
                     for k, v in data["mixed_precision"].items()])]
    return "".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--full", action="store_true", help="also index 1M x 1280 (5 GB store, several minutes)")
    ap.add_argument("--quick", action="store_true", help="60 images, a 20k-row index")
    ap.add_argument("--images", type=int, default=None)
    args = ap.parse_args(argv)
    images = args.images or (60 if args.quick else 300)
    result = {"quick": args.quick, "ray_vs_local": ray_vs_local(images),
              "index_memory": [index_memory(20_000 if args.quick else 100_000)]}
    if args.full:
        result["index_memory"].append(index_memory(1_000_000))
    result["mixed_precision"] = mixed_precision_cosine()
    write_result(NAME + ("-quick" if args.quick else ""), result)
    print(markdown(result))


if __name__ == "__main__":
    main()
