"""Latency of ``imgvec query`` for one image against a 100k-row store, split into stages.

The store is written directly (``create_store`` + ``append`` of random unit rows with
mobilenetv3small / random-weight provenance), so no embedding run is needed. Stages are
timed in a fresh process each: interpreter + ``import imgvec``; model build; embedding
one image; the search. ``imgvec --help`` and ``imgvec models`` are timed as commands and
checked not to import TensorFlow.

    python -m benchmarks.bench_query [--quick] [--rows 100000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .common import OUT, md_table, photo_folder, write_result

NAME = "query"

STAGES = r"""
import json, os, sys, time
t0 = time.perf_counter()
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
import numpy as np
from imgvec import api
from imgvec.embedder import Embedder
from imgvec.store import open_store
from imgvec.index import build_index
t_import = time.perf_counter()
store, image = sys.argv[1], sys.argv[2]
with open_store(store) as s:
    prov = s.provenance
    t = time.perf_counter(); index = build_index(s, "flat"); t_index = time.perf_counter() - t
    t = time.perf_counter(); keys = s.paths(); t_keys = time.perf_counter() - t
e = Embedder.from_provenance(prov)
t = time.perf_counter(); e.load(); t_load = time.perf_counter() - t
t = time.perf_counter(); emb = next(iter(e.embed_files([image]))).embeddings; t_embed = time.perf_counter() - t
t = time.perf_counter(); index.search(emb, 10); t_search = time.perf_counter() - t
print(json.dumps({"import_s": t_import - t0, "flat_index_from_store_s": t_index, "read_keys_s": t_keys,
                  "model_load_s": t_load, "embed_one_s": t_embed, "search_s": t_search}))
"""


def make_store(rows: int) -> Path:
    from imgvec.provenance import Provenance
    from imgvec.store import create_store

    path = OUT / f"store-{rows}.h5"
    if path.exists():
        return path
    OUT.mkdir(parents=True, exist_ok=True)
    from importlib.metadata import PackageNotFoundError, version

    def v(*names: str) -> str:
        for name in names:
            try:
                return version(name)
            except PackageNotFoundError:
                pass
        return ""

    from imgvec.backbones import get_backbone

    bb = get_backbone("mobilenetv3small")
    prov = Provenance(bb.name, "random", 0, None, None, bb.input_size, bb.preprocessing, bb.dim,
                      keras_version=v("keras"), tensorflow_version=v("tensorflow", "tensorflow-cpu", "tf-nightly"))
    rng = np.random.default_rng(0)
    tmp = path.with_suffix(".tmp.h5")
    tmp.unlink(missing_ok=True)
    with create_store(tmp, prov, str(OUT)) as s:
        for start in range(0, rows, 10_000):
            m = min(10_000, rows - start)
            x = rng.standard_normal((m, 576)).astype(np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            s.append(x, [f"img/{i:07d}.jpg" for i in range(start, start + m)], [""] * m)
    tmp.rename(path)
    return path


def _wall(cmd: list[str], repeats: int) -> float:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        best = min(best, time.perf_counter() - t)
    return best


def _imports_tf(args: list[str]) -> bool:
    code = ("import sys; from imgvec.cli import app\n"
            f"try:\n    app({args!r}, standalone_mode=False)\nexcept SystemExit:\n    pass\n"
            "print('tensorflow' in sys.modules, file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return out.stderr.strip().splitlines()[-1] == "True"


def markdown(data: dict[str, Any]) -> str:
    s = data["stages"]
    out = [f"`imgvec query` of one JPEG against a {data['rows']:,}-row store (mobilenetv3small, random weights, "
           f"no saved index so a flat index is built from the store; best of {data['repeats']}):\n\n"]
    out.append(md_table(["stage", "seconds"], [
        ("python start-up + `import imgvec` (api, store, index)", s["import_s"]),
        ("read store + build flat index", s["flat_index_from_store_s"]),
        ("read store keys", s["read_keys_s"]),
        ("model load (TensorFlow import + build + trace)", s["model_load_s"]),
        ("embed one image", s["embed_one_s"]),
        ("search (k=10)", s["search_s"]),
        ("**whole `imgvec query` command**", data["query_command_s"]),
    ]))
    out.append("\n")
    out.append(md_table(["command", "wall s", "imports TensorFlow"],
                        [(c["command"], c["wall_s"], c["imports_tensorflow"]) for c in data["commands"]]))
    return "".join(out)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="20k rows, 1 repeat")
    ap.add_argument("--rows", type=int, default=None)
    args = ap.parse_args(argv)
    rows = args.rows or (20_000 if args.quick else 100_000)
    repeats = 1 if args.quick else 3
    store = make_store(rows)
    image = str(sorted(photo_folder(64 if args.quick else 300).glob("*.jpg"))[0])
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", STAGES, str(store), image], capture_output=True, text=True,
                             env=env, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    stages = {k: min(r[k] for r in runs) for k in runs[0]}
    exe = str(Path(sys.executable).with_name("imgvec"))
    query_s = _wall([exe, "query", str(store), image, "-k", "10"], repeats)
    commands = [{"command": f"imgvec {' '.join(a)}", "wall_s": _wall([exe, *a], repeats),
                 "imports_tensorflow": _imports_tf(list(a))} for a in (["--help"], ["models"])]
    data = {"quick": args.quick, "rows": rows, "repeats": repeats, "stages": stages, "stage_runs": runs,
            "query_command_s": query_s, "commands": commands}
    write_result(NAME + ("-quick" if args.quick else ""), data)
    print(markdown(data))
    return data


if __name__ == "__main__":
    main()
