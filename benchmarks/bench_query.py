"""Latency of ``imgvec query`` for one image against a 100k-row store, split into stages.

The store is written directly (``create_store`` + ``append`` of random unit rows with
mobilenetv3small / random-weight provenance), so no embedding run is needed. Stages are
timed in a fresh process each, for each runtime: interpreter + ``import imgvec``; model load
(OpenVINO: the cached compiled model; TensorFlow: import + build + trace); embedding one
image; the search. The whole ``imgvec query`` command is timed per runtime, interleaved, with
a saved index (median of the runs) and its peak RSS. ``imgvec --help``, ``imgvec models`` and
an OpenVINO query are checked not to import TensorFlow.

    python -m benchmarks.bench_query [--quick] [--rows 100000]
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
from typing import Any

import numpy as np

from .common import OUT, byte_compiled, md_table, peak_rss_mb_of, photo_folder, write_result

NAME = "query"

STAGES = r"""
import json, os, sys, time
t0 = time.perf_counter()
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
import numpy as np
from imgvec import api
from imgvec.embedding.embedder import Embedder
from imgvec.vectors.store import open_store
from imgvec.vectors.index import build_index
t_import = time.perf_counter()
store, image, runtime = sys.argv[1], sys.argv[2], sys.argv[3]
with open_store(store) as s:
    prov = s.provenance
    t = time.perf_counter(); index = build_index(s, "flat"); t_index = time.perf_counter() - t
    t = time.perf_counter(); keys = s.paths(); t_keys = time.perf_counter() - t
e = Embedder.from_provenance(prov, runtime=runtime)
t = time.perf_counter(); e.load(); t_load = time.perf_counter() - t
t = time.perf_counter(); emb = next(iter(e.embed_files([image]))).embeddings; t_embed = time.perf_counter() - t
t = time.perf_counter(); index.search(emb, 10); t_search = time.perf_counter() - t
print(json.dumps({"import_s": t_import - t0, "flat_index_from_store_s": t_index, "read_keys_s": t_keys,
                  "model_load_s": t_load, "embed_one_s": t_embed, "search_s": t_search,
                  "imports_tensorflow": "tensorflow" in sys.modules}))
"""


def make_store(rows: int) -> Path:
    from imgvec.files.provenance import Provenance
    from imgvec.vectors.store import create_store

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

    from imgvec.backbones.registry import get_backbone

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


RUNTIMES = ("openvino", "tensorflow")
CACHE = OUT / "model-cache"  # the benchmarks' own compiled-model cache


def _env() -> dict[str, str]:
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "IMGVEC_CACHE_DIR": str(CACHE)}


def _wall(cmd: list[str], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
        best = min(best, time.perf_counter() - t)
    return best


def _query_commands(exe: str, store: Path, image: str, repeats: int) -> dict[str, Any]:
    """The whole ``imgvec query`` per runtime, interleaved: wall seconds of each run and peak RSS."""
    runs: dict[str, list[tuple[float, float]]] = {rt: [] for rt in RUNTIMES}
    for r in range(repeats):
        for rt in RUNTIMES[r % 2:] + RUNTIMES[: r % 2]:
            runs[rt].append(peak_rss_mb_of([exe, "query", str(store), image, "-k", "10", "--runtime", rt], env=_env()))
    return {rt: {"median_s": statistics.median(w for _, w in v), "min_s": min(w for _, w in v),
                 "runs_s": [w for _, w in v], "peak_rss_mb": max(m for m, _ in v)} for rt, v in runs.items()}


def _imports_tf(args: list[str]) -> bool:
    code = ("import sys; from imgvec.cli import app\n"
            f"try:\n    app({args!r}, standalone_mode=False)\nexcept SystemExit:\n    pass\n"
            "print('tensorflow' in sys.modules, file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env())
    return out.stderr.strip().splitlines()[-1] == "True"


def markdown(data: dict[str, Any]) -> str:
    st = data["stages"]
    out = [f"`imgvec query` of one JPEG against a {data['rows']:,}-row store (mobilenetv3small, random weights), "
           f"per runtime. Stages: fresh processes, no saved index (a flat index is built from the store), best of "
           f"{data['repeats']}. Commands: with a saved index, median of {data['command_repeats']} interleaved runs.\n\n"]
    out.append(md_table(["stage", *(f"{rt} s" for rt in RUNTIMES)], [
        ("python start-up + `import imgvec` (api, store, index)", *(st[rt]["import_s"] for rt in RUNTIMES)),
        ("read store + build flat index", *(st[rt]["flat_index_from_store_s"] for rt in RUNTIMES)),
        ("model load (OpenVINO: cached compiled model; TensorFlow: import + build + trace)",
         *(st[rt]["model_load_s"] for rt in RUNTIMES)),
        ("embed one image", *(st[rt]["embed_one_s"] for rt in RUNTIMES)),
        ("search (k=10)", *(st[rt]["search_s"] for rt in RUNTIMES)),
        ("imports TensorFlow", *(st[rt]["imports_tensorflow"] for rt in RUNTIMES)),
        ("**whole `imgvec query` command** (median)", *(data["query_command"][rt]["median_s"] for rt in RUNTIMES)),
        ("its peak RSS MB", *(data["query_command"][rt]["peak_rss_mb"] for rt in RUNTIMES)),
    ]))
    q = data["query_command"]
    out.append(f"\nTarget: the whole OpenVINO query <= 1.0 s (median): "
               f"{'met' if q['openvino']['median_s'] <= 1.0 else '**not met**'} "
               f"({q['openvino']['median_s']:.2f} s; TensorFlow {q['tensorflow']['median_s']:.2f} s).\n\n")
    out.append(md_table(["command", "wall s", "imports TensorFlow"],
                        [(c["command"], c["wall_s"], c["imports_tensorflow"]) for c in data["commands"]]))
    return "".join(out)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="20k rows, 1 repeat")
    ap.add_argument("--rows", type=int, default=None)
    args = ap.parse_args(argv)
    byte_compiled()  # processes timed from their start read imgvec compiled, as after pip install
    rows = args.rows or (20_000 if args.quick else 100_000)
    repeats = 1 if args.quick else 3
    store = make_store(rows)
    image = str(sorted(photo_folder(64 if args.quick else 300).glob("*.jpg"))[0])
    exe = str(Path(sys.executable).with_name("imgvec"))
    subprocess.run([exe, "index", str(store)], check=True, capture_output=True, env=_env())
    runs: dict[str, list[dict[str, Any]]] = {rt: [] for rt in RUNTIMES}
    for r in range(repeats + 1):  # the first round converts the OpenVINO model into the cache: not counted
        for rt in RUNTIMES[r % 2:] + RUNTIMES[: r % 2]:
            out = subprocess.run([sys.executable, "-c", STAGES, str(store), image, rt], capture_output=True,
                                 text=True, env=_env(), check=True)
            if r:
                runs[rt].append(json.loads(out.stdout.strip().splitlines()[-1]))
    stages = {rt: {k: min(x[k] for x in v) for k in v[0]} for rt, v in runs.items()}
    command_repeats = 3 if args.quick else 5
    commands = [{"command": f"imgvec {' '.join(a)}", "wall_s": _wall([exe, *a], repeats),
                 "imports_tensorflow": _imports_tf(list(a))}
                for a in (["--help"], ["models"], ["query", str(store), image, "--runtime", "openvino"])]
    commands[-1]["command"] = "imgvec query STORE IMAGE --runtime openvino"
    data = {"quick": args.quick, "rows": rows, "repeats": repeats, "stages": stages, "stage_runs": runs,
            "command_repeats": command_repeats,
            "query_command": _query_commands(exe, store, image, command_repeats), "commands": commands,
            "load_average": os.getloadavg()}
    write_result(NAME + ("-quick" if args.quick else ""), data)
    print(markdown(data))
    return data


if __name__ == "__main__":
    main()
