"""Embedding throughput: imgvec on OpenVINO and on TensorFlow, the models' own limits, Keras and a naive loop.

Contenders, all with the same backbone, input size (the model's default, 224), batch size (32)
and the same weights: random (seeded) with BatchNorm statistics calibrated on a few of the
photos (:func:`imgvec.backbones.builder.calibrate`), saved to a weights file, so activations
are of order 1 and the cosine columns mean something (plain random weights give activations of
~1e-11 where any two runtimes "agree"). ImageNet weights are not needed to time a network.

1. forward TF / forward OV: each runtime's engine alone on pre-decoded uint8 pixels, 32 per
   call (preprocessing included, no decoding at all: the model's limit on that runtime);
2. keras: ``keras.utils.image_dataset_from_directory(labels=None)`` + the backbone's
   ``preprocess_input`` (mapped in parallel, prefetched) + ``model.predict``;
3. naive: Pillow open/resize, ``preprocess_input`` and ``model(x)`` one image at a time
   (timed on a subset and extrapolated);
4. imgvec TF / imgvec OV: ``imgvec.api.embed(runtime=...)`` into a fresh store.

Model construction is left out of the steady-state rounds: engines are loaded once and kept by
the process (as imgvec keeps them between calls); start-up is measured on its own, in fresh
processes: loading each engine (OpenVINO: import + compile of the cached model; TensorFlow:
import + build + trace) and the whole ``imgvec embed`` command with its peak RSS. Contenders
run interleaved, in rotating order, several rounds; the best round counts (noise only adds
time). The load average before and after is recorded: the machine is shared.

Also: peak RSS of ``imgvec embed`` for 1k and 10k small images (memory must not grow with
N) and the time ``images.find_images`` takes to walk a tree of 200k empty files.

    python -m benchmarks.bench_embed [--quick] [--models mobilenetv2,efficientnetb0,resnet50]

int8 against float32 (``--int8 efficientnetlite0,mobilenetv2,...``, written to ``embed-int8.json``): per
backbone, side by side in one process, the forward pass alone and the whole ``imgvec.api.embed`` at each
precision (whole embed / forward is how much decoding and storing cost), the int8 model's one-time
quantization, cosine of int8 rows to float32 ones and the overlap of each photo's top-10 neighbours, and
precision@10 on a labelled folder of augmented copies (``--retrieval DIR``: ``DIR/<class>/*``, every copy
of one photo in one class; a neighbour counts when it is a copy of the same photo). Backbones with
pretrained weights offline (``efficientnetlite0`` once merged) run them; the others run BatchNorm-calibrated
random weights, labelled so, whose figures are for speed only.

    python -m benchmarks.bench_embed --int8 efficientnetlite0,mobilenetv2 [--retrieval DIR] [--images 300]
    python -m benchmarks.bench_embed --int8 default     # every backbone of INT8_MODELS in the registry
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import (OUT, best, byte_compiled, interleaved, md_table, peak_rss_mb_of, photo_folder, quiet_tf,
                     small_folder, timed, write_result)

NAME = "embed"
MODELS = ("mobilenetv2", "efficientnetb0", "resnet50")
BATCH = 32
RUNTIMES = ("openvino", "tensorflow")
# imgvec on OpenVINO against the Keras pipeline (issue 11), per model; and everywhere:
TARGETS = {"ov_vs_keras": {"mobilenetv2": 1.8, "efficientnetb0": 1.8, "resnet50": 1.4}, "vs_naive": 5.0,
           "cosine": 0.99999}
CACHE = OUT / "model-cache"  # the benchmarks' own compiled-model cache (IMGVEC_CACHE_DIR)

# A fresh process: load one engine (cached OpenVINO model, or TensorFlow build), embed one batch.
STARTUP = r"""
import json, sys, time
t0 = time.perf_counter()

def peak_rss_mb():  # VmHWM starts afresh at exec (ru_maxrss would carry the parent's peak over)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

import numpy as np
from imgvec.runtime.loader import load_engine
rt, name, weights, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
t1 = time.perf_counter()
engine = load_engine(rt, name, weights, size)
t2 = time.perf_counter()
engine(np.zeros((1, size, size, 3), np.uint8))
t3 = time.perf_counter()
print(json.dumps({"runtime": engine.runtime, "import_imgvec_s": t1 - t0, "load_s": t2 - t1, "first_call_s": t3 - t2,
                  "peak_rss_mb": peak_rss_mb(),
                  "tensorflow_imported": "tensorflow" in sys.modules}))
"""


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix == ".jpg")


def _env() -> dict[str, str]:
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "IMGVEC_CACHE_DIR": str(CACHE)}


def calibrated_weights(name: str, folder: Path) -> Path:
    """Seeded random weights, BatchNorm calibrated on 8 of the photos, as a weights file (cached)."""
    import numpy as np

    from imgvec.backbones.registry import get_backbone
    from imgvec.backbones.builder import calibrated_weights as calibrated
    from imgvec.files.images import load_image

    backbone = get_backbone(name)
    path = OUT / "weights" / f"{name}-{backbone.input_size}-calibrated.weights.h5"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = np.stack([load_image(f, backbone.input_size) for f in _files(folder)[:8]])
        calibrated(backbone, backbone.input_size, pixels, path)
    return path


def bench_startup(name: str, weights: Path, size: int, folder: Path, repeats: int) -> dict[str, Any]:
    """Fresh processes, interleaved: engine load per runtime; the whole ``imgvec embed`` per runtime."""
    exe = str(Path(sys.executable).with_name("imgvec"))
    loads: dict[str, list[dict[str, Any]]] = {rt: [] for rt in RUNTIMES}
    embeds: dict[str, list[tuple[float, float]]] = {rt: [] for rt in RUNTIMES}
    for r in range(repeats):
        for rt in RUNTIMES[r % 2:] + RUNTIMES[: r % 2]:
            out = subprocess.run([sys.executable, "-c", STARTUP, rt, name, str(weights), str(size)],
                                 capture_output=True, text=True, env=_env(), check=True)
            loads[rt].append(json.loads(out.stdout.strip().splitlines()[-1]))
            with tempfile.TemporaryDirectory(dir=OUT) as tmp:
                embeds[rt].append(peak_rss_mb_of([exe, "embed", str(folder), "-o", f"{tmp}/s.h5", "-m", name,
                                                  "--weights", str(weights), "--batch-size", str(BATCH),
                                                  "--runtime", rt], env=_env()))
    n = len(_files(folder))
    return {rt: {"load_s": min(x["load_s"] for x in loads[rt]), "first_call_s": min(x["first_call_s"] for x in loads[rt]),
                 "import_imgvec_s": min(x["import_imgvec_s"] for x in loads[rt]),
                 "load_peak_rss_mb": max(x["peak_rss_mb"] for x in loads[rt]),
                 "tensorflow_imported": loads[rt][0]["tensorflow_imported"],
                 "embed_command_s": min(w for _, w in embeds[rt]), "embed_command_images_per_s": n / min(w for _, w in embeds[rt]),
                 "embed_command_peak_rss_mb": max(m for m, _ in embeds[rt]), "runs": loads[rt]}
            for rt in RUNTIMES}


def bench_model(name: str, folder: Path, repeats: int, naive_n: int, sweep: tuple[int, ...]) -> dict[str, Any]:
    quiet_tf()
    os.environ["IMGVEC_CACHE_DIR"] = str(CACHE)
    import keras
    import numpy as np
    import tensorflow as tf
    from PIL import Image

    from imgvec import api
    from imgvec.backbones.registry import get_backbone, parse_weights
    from imgvec.backbones.builder import preprocess_input
    from imgvec.runtime.loader import entry_path, load_engine, release_engines, row_cosines
    from imgvec.vectors.store import open_store

    files = _files(folder)
    n = len(files)
    backbone = get_backbone(name)
    size = backbone.input_size
    weights_file = calibrated_weights(name, folder)
    weights = parse_weights(str(weights_file))
    load_s = {}
    for rt in RUNTIMES:
        load_s[rt], _ = timed(lambda rt=rt: load_engine(rt, name, weights, size))
    engines = {rt: load_engine(rt, name, weights, size) for rt in RUNTIMES}
    convert_s = json.loads((entry_path(backbone, weights, size) / "manifest.json").read_text())["convert_s"]
    model = engines["tensorflow"].model  # type: ignore[attr-defined]
    preprocess = preprocess_input(backbone)
    raw = np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)

    def forward(rt: str, step: int = BATCH, count: int = n) -> None:
        for i in range(0, count, step):
            engines[rt](raw[i : i + step])

    def keras_ref() -> tuple[list[str], Any]:
        ds = keras.utils.image_dataset_from_directory(
            str(folder), labels=None, image_size=(size, size), batch_size=BATCH, shuffle=False, verbose=False)
        paths = list(ds.file_paths)
        ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
        return paths, model.predict(ds, verbose=0)

    def naive() -> None:  # one image per direct model call
        for path in files[:naive_n]:
            im = Image.open(path).convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
            np.asarray(model(preprocess(np.asarray(im, dtype=np.float32)[None]), training=False))

    tmp = Path(tempfile.mkdtemp(prefix="bench-embed-", dir=OUT))
    runs = [0]

    def imgvec_embed(rt: str) -> Path:
        runs[0] += 1
        out = tmp / f"run{runs[0]}.h5"
        api.embed([str(folder)], out, model=name, weights=str(weights_file), batch_size=BATCH, runtime=rt)
        return out

    # warm up every contender (tracing, predict_function, thread pools)
    for rt in RUNTIMES:
        forward(rt, count=min(n, 2 * BATCH))
    naive()
    keras_ref()
    load = os.getloadavg()
    times = interleaved({"forward_openvino": lambda: forward("openvino"), "forward_tensorflow": lambda: forward("tensorflow"),
                         "keras": keras_ref, "naive": naive, "imgvec_openvino": lambda: imgvec_embed("openvino"),
                         "imgvec_tensorflow": lambda: imgvec_embed("tensorflow")}, repeats)
    ips = {k: (naive_n if k == "naive" else n) / best(v) for k, v in times.items()}

    # equivalence: each runtime's rows against the Keras reference's, matched by file name; engines against each other
    ref_paths, ref_emb = keras_ref()
    ref = {os.path.basename(p): e for p, e in zip(ref_paths, ref_emb)}
    cosines = {}
    for rt in RUNTIMES:
        with open_store(imgvec_embed(rt)) as st:
            ours = dict(zip((os.path.basename(k) for k in st.paths()), st.embeddings()))
        common = sorted(set(ref) & set(ours))
        cos = row_cosines(np.stack([ours[k] for k in common]), np.stack([ref[k] for k in common]))
        cosines[f"imgvec_{rt}_vs_keras"] = {"mean": float(cos.mean()), "min": float(cos.min()), "rows": len(common)}
    cos = row_cosines(engines["openvino"](raw[:64]), engines["tensorflow"](raw[:64]))
    cosines["openvino_vs_tensorflow"] = {"mean": float(cos.mean()), "min": float(cos.min()), "rows": len(cos)}

    sweep_n = min(n, 32)
    sweep_times = interleaved({f"{rt} {c}": (lambda rt=rt, c=c: forward(rt, c, sweep_n)) for rt in RUNTIMES
                               for c in sweep}, max(1, repeats - 1))
    load_after = os.getloadavg()
    shutil.rmtree(tmp, ignore_errors=True)
    release_engines()
    return {
        "model": name, "images": n, "image_size": size, "batch_size": BATCH,
        "model_batch": {rt: min(BATCH, engines[rt].model_batch) for rt in RUNTIMES},
        "versions": {rt: engines[rt].version for rt in RUNTIMES},
        "weights": "random (seed 0), BatchNorm calibrated on 8 photos", "repeats": repeats, "naive_images": naive_n,
        "images_per_s": ips, "runs_s": times,
        "ratios": {"openvino_vs_tensorflow_forward": ips["forward_openvino"] / ips["forward_tensorflow"],
                   "imgvec_openvino_vs_keras": ips["imgvec_openvino"] / ips["keras"],
                   "imgvec_tensorflow_vs_keras": ips["imgvec_tensorflow"] / ips["keras"],
                   "imgvec_openvino_vs_forward_openvino": ips["imgvec_openvino"] / ips["forward_openvino"],
                   "imgvec_openvino_vs_naive": ips["imgvec_openvino"] / ips["naive"]},
        "cosine": cosines, "load_in_process_s": load_s, "openvino_convert_s": convert_s,
        "forward_by_call_size": {k: sweep_n / best(t) for k, t in sweep_times.items()},
        "load_average": {"before": load, "after": load_after},
        "startup": bench_startup(name, weights_file, size, folder, max(1, repeats)),
    }


def bench_decode(folder: Path, size: int = 224) -> dict[str, Any]:
    """Milliseconds per image to decode and resize, one core: imgvec's Pillow path and TensorFlow's."""
    import tensorflow as tf

    from imgvec.files.images import load_image

    files = _files(folder)
    raw = [Path(f).read_bytes() for f in files]

    def with_tf() -> None:
        for r in raw:
            tf.image.resize(tf.io.decode_jpeg(r, channels=3), (size, size)).numpy()

    pil = min(timed(lambda: [load_image(f, size) for f in files])[0] for _ in range(3))
    tfs = min(timed(with_tf)[0] for _ in range(3))
    return {"images": len(files), "imgvec_ms": 1000 * pil / len(files), "tf_ms": 1000 * tfs / len(files),
            "imgvec_core_ms": decode_core_ms(files, size)}  # CPU ms, as embed decodes (statistics included)


def bench_rss(counts: tuple[int, ...], size: int, repeats: int = 1) -> list[dict[str, Any]]:
    """Peak RSS of the ``imgvec embed`` command for growing numbers of small images."""
    exe = str(Path(sys.executable).with_name("imgvec"))
    env = _env()
    rows = []
    for count in counts:
        folder = small_folder(count, 64)
        peak, wall = [], []
        for _ in range(repeats):
            with tempfile.TemporaryDirectory(dir=OUT) as tmp:
                mb, dt = peak_rss_mb_of([exe, "embed", str(folder), "-o", f"{tmp}/s.h5", "--model", "mobilenetv3small",
                                         "--weights", "none", "--image-size", str(size)], env=env)
            peak.append(mb)
            wall.append(dt)
        rows.append({"images": count, "model": "mobilenetv3small", "image_size": size, "peak_rss_mb": max(peak),
                     "wall_s": min(wall), "images_per_s": count / min(wall)})
    return rows


def bench_enumerate(count: int, repeats: int = 3) -> dict[str, Any]:
    """Time for images.find_images over a tree of ``count`` empty .jpg files (1000 per folder)."""
    from imgvec.files.images import find_images

    root = OUT / f"tree-{count}"
    if not (root / ".complete").exists():
        for i in range(count):
            if i % 1000 == 0:
                sub = root / f"class{i // 20000:02d}" / f"d{i // 1000:04d}"
                sub.mkdir(parents=True, exist_ok=True)
            (sub / f"f_{i:07d}.jpg").touch()
        (root / ".complete").write_text(str(count))
    ts = []
    for _ in range(repeats):
        dt, coll = timed(lambda: find_images([str(root)]))
        assert len(coll.files) == count, len(coll.files)
        ts.append(dt)
    return {"files": count, "seconds": min(ts), "files_per_s": count / min(ts), "runs_s": ts}


def _decode_allows(data: dict[str, Any], m: dict[str, Any]) -> str:
    """The most imgvec OV/keras can be on these cores: OpenVINO's forward pass plus imgvec's decoding (its CPU ms a
    photo, measured), every core busy, against the Keras pipeline's rate; empty where not measured."""
    decode_ms = (data.get("decode") or {}).get("imgvec_core_ms")
    if decode_ms is None:
        return ""
    cores = (data.get("machine") or {}).get("cores") or os.cpu_count() or 1  # no machine yet: printed as it runs
    forward_ms = 1000 * cores / m["images_per_s"]["forward_openvino"]
    most = 1000 * cores / (forward_ms + decode_ms) / m["images_per_s"]["keras"]
    return f" (decoding, {decode_ms:.2f} CPU ms a photo, allows at most {most:.2f}x)"


def markdown(data: dict[str, Any]) -> str:
    models = data["models"]
    out = [f"Embedding throughput, {data['images']} photo-like JPEGs (~500x375), batch {BATCH}, input 224, "
           "**random weights with calibrated BatchNorm** (speed only), best of interleaved rounds; "
           "OV = OpenVINO, TF = TensorFlow.\n\n"]
    rows = []
    for m in models:
        ips, r, c = m["images_per_s"], m["ratios"], m["cosine"]
        rows.append((m["model"], ips["forward_tensorflow"], ips["forward_openvino"], ips["keras"], ips["naive"],
                     ips["imgvec_tensorflow"], ips["imgvec_openvino"], f"{r['openvino_vs_tensorflow_forward']:.2f}x",
                     f"{r['imgvec_openvino_vs_keras']:.2f}x", f"{r['imgvec_openvino_vs_naive']:.1f}x",
                     f"{c['openvino_vs_tensorflow']['min']:.7f}", f"{c['imgvec_openvino_vs_keras']['min']:.4f}",
                     f"{c['imgvec_tensorflow_vs_keras']['min']:.4f}"))
    out.append(md_table(["model", "forward TF img/s", "forward OV img/s", "keras img/s", "naive img/s",
                         "imgvec TF img/s", "imgvec OV img/s", "OV/TF forward", "imgvec OV/keras", "imgvec OV/naive",
                         "cosine OV vs TF (min)", "cosine imgvec OV vs keras (min)",
                         "cosine imgvec TF vs keras (min)"], rows))
    out.append("\nCosine of imgvec's rows against the Keras pipeline's differs from 1 by decoding alone "
               "(Pillow's antialiased resize against TensorFlow's plain bilinear): imgvec on TensorFlow runs the very "
               "model the Keras pipeline runs and gives the same cosine as on OpenVINO. How far the vectors move "
               "depends on how the network reacts to those small pixel differences; the BatchNorm-calibrated "
               "random networks measured here react strongly (efficientnetb0 most), so a low cosine in these "
               "columns is a property of random weights and two resizes, not a fault in either pipeline.\n")
    t = TARGETS
    misses = [f"{m['model']} imgvec OV/keras {m['ratios']['imgvec_openvino_vs_keras']:.2f}x < "
              f"{t['ov_vs_keras'][m['model']]}x{_decode_allows(data, m)}" for m in models
              if m["ratios"]["imgvec_openvino_vs_keras"] < t["ov_vs_keras"].get(m["model"], 0)]
    misses += [f"{m['model']} cosine OV vs TF {m['cosine']['openvino_vs_tensorflow']['min']:.7f}" for m in models
               if m["cosine"]["openvino_vs_tensorflow"]["min"] < t["cosine"]]
    out.append(f"\nTargets: imgvec OV/keras >= {', '.join(f'{k} {v}x' for k, v in t['ov_vs_keras'].items())}; "
               f"OV vs TF cosine >= {t['cosine']} per row. "
               + (("**Not met:** " + "; ".join(misses) + ".\n") if misses else "All met.\n"))
    out.append("\nStart-up in a fresh process (OpenVINO: import + compile of the cached model; TensorFlow: import + "
               "build + trace), and the whole `imgvec embed` command on the same photos:\n\n")
    out.append(md_table(["model", "runtime", "engine load s", "imports TensorFlow", "peak RSS MB (load)",
                         "`imgvec embed` s", "img/s", "peak RSS MB (embed)"],
                        [(m["model"], rt, st["load_s"], st["tensorflow_imported"], st["load_peak_rss_mb"],
                          st["embed_command_s"], st["embed_command_images_per_s"], st["embed_command_peak_rss_mb"])
                         for m in models for rt, st in m["startup"].items()]))
    out.append("\nOne-time OpenVINO conversion (cached afterwards), s: "
               + ", ".join(f"{m['model']} {m['openvino_convert_s']:.1f}" for m in models)
               + ". Load average (1 min) during the rounds: "
               + ", ".join(f"{m['model']} {m['load_average']['before'][0]:.1f}-{m['load_average']['after'][0]:.1f}"
                           for m in models) + ".\n")
    if data.get("decode"):
        d = data["decode"]
        out.append(f"\nDecoding one of these JPEGs to 224x224, one image at a time: imgvec (Pillow, draft mode, "
                   f"antialiased bilinear) {d['imgvec_ms']:.2f} ms; TensorFlow (decode_jpeg + bilinear resize "
                   f"without antialiasing, as image_dataset_from_directory) {d['tf_ms']:.2f} ms.\n")
    sizes = list(data["models"][0]["forward_by_call_size"]) if data["models"] else []
    if sizes:
        out.append("\nForward pass alone (images/s) by runtime and images per model call:\n\n")
        out.append(md_table(["model", *sizes],
                            [(m["model"], *(m["forward_by_call_size"][s] for s in sizes)) for m in data["models"]]))
    if data.get("rss"):
        out.append("\nPeak RSS of `imgvec embed` (mobilenetv3small, small JPEGs, the default runtime). The first row "
                   "includes the one-time OpenVINO conversion (TensorFlow is imported for it); later runs load the "
                   "cached model:\n\n")
        out.append(md_table(["images", "image size", "peak RSS MB", "wall s", "img/s"],
                            [(r["images"], r["image_size"], r["peak_rss_mb"], r["wall_s"], r["images_per_s"])
                             for r in data["rss"]]))
    if data.get("enumerate"):
        e = data["enumerate"]
        out.append(f"\n`find_images` over {e['files']:,} empty files: {e['seconds']:.2f} s "
                   f"({e['files_per_s']:,.0f} files/s).\n")
    return "".join(out)


def _pretrained_offline(name: str) -> bool:
    """Whether ``name``'s ImageNet weights load without a download (packaged, or in Keras' cache)."""
    try:
        from imgvec.backbones.builder import offline_weights  # type: ignore[attr-defined]  # after the lite0 merge
    except ImportError:
        return False
    from imgvec.backbones.registry import get_backbone

    try:
        return offline_weights(get_backbone(name)) is not None
    except Exception:  # noqa: BLE001 - a backbone whose weights cannot be found: random ones
        return False


def precision_at_k(rows: Any, labels: list[str], k: int = 10) -> float:
    """Mean share of each row's ``k`` nearest other rows (cosine) that carry its label."""
    import numpy as np

    x = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-30)
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    lab = np.asarray(labels)
    return float((lab[top] == lab[:, None]).mean())


def decode_core_ms(files: list[Path], size: int, repeats: int = 3) -> float:
    """CPU milliseconds per image of what embed does before the model (decode, resize, the image statistics),
    on one core: the best of ``repeats`` passes, as CPU time (other processes on the machine do not count)."""
    from imgvec.files.images import load_image_stats

    best_s = float("inf")
    for _ in range(repeats):
        t = time.process_time()
        for f in files:
            load_image_stats(str(f), size)
        best_s = min(best_s, time.process_time() - t)
    return 1000 * best_s / len(files)


def ceiling(forward_images_per_s: float, decode_ms: float) -> float:
    """Whole embed / forward pass at best, when the forward pass alone keeps every core busy: its CPU time per
    image (cores / rate) against that plus decoding's."""
    forward_ms = 1000 * (os.cpu_count() or 1) / forward_images_per_s
    return forward_ms / (forward_ms + decode_ms)


def bench_int8(name: str, folder: Path, repeats: int, retrieval: Path | None) -> dict[str, Any]:
    """int8 against float32 for one backbone: forward and whole-embed speed, what int8 changes, precision@10."""
    os.environ["IMGVEC_CACHE_DIR"] = str(CACHE)
    import numpy as np

    from imgvec import api
    from imgvec.backbones.builder import resolve_weights
    from imgvec.backbones.registry import get_backbone, parse_weights
    from imgvec.embedding.embedder import calibration_sample, neighbour_overlap
    from imgvec.files.images import find_images, load_image
    from imgvec.runtime.loader import Calibration, entry_path, load_engine, release_engines, row_cosines
    from imgvec.vectors.store import open_store

    backbone = get_backbone(name)
    size = backbone.input_size
    pretrained = _pretrained_offline(name)
    weights_arg = "imagenet" if pretrained else str(calibrated_weights(name, folder))
    weights = resolve_weights(backbone, parse_weights(weights_arg))  # as load_engine names its cache entry
    files = _files(folder)
    n = len(files)
    found = find_images([str(folder)])
    calibration = Calibration.of(found.root, calibration_sample([f.key for f in found.files]))
    t = time.perf_counter()
    engines = {"float32": load_engine("openvino", name, weights, size)}
    f32_load = time.perf_counter() - t
    t = time.perf_counter()
    engines["int8"] = load_engine("openvino", name, weights, size, "int8", "cpu", calibration)
    int8_load = time.perf_counter() - t
    manifest = json.loads((entry_path(backbone, weights, size, calibration) / "manifest.json").read_text())
    pixels = np.stack([load_image(f, size) for f in files])
    decode_ms = decode_core_ms(files, size)
    tmp = Path(tempfile.mkdtemp(prefix="bench-int8-", dir=OUT))
    runs = [0]

    def forward(p: str) -> None:
        for i in range(0, n, BATCH):
            engines[p](pixels[i : i + BATCH])

    embed_s: dict[str, list[float]] = {p: [] for p in engines}  # each run's embedding phase (after the build)

    def whole(p: str, source: Path = folder) -> Path:
        runs[0] += 1
        out = tmp / f"run{runs[0]}.h5"
        summary = api.embed([str(source)], out, model=name, weights=weights_arg, batch_size=BATCH, precision=p,
                            runtime="openvino", accept_int8=True)
        if source == folder:
            embed_s[p].append(summary.embed_seconds)
        return out

    for p in engines:  # warm up (thread pools, the int8 check's float32 engine)
        forward(p)
        whole(p)
    load = os.getloadavg()
    times = interleaved({f"{kind}_{p}": (lambda kind=kind, p=p: forward(p) if kind == "forward" else whole(p))
                         for p in engines for kind in ("forward", "embed")}, repeats)
    ips = {k: n / best(v) for k, v in times.items()}  # embed_*: the whole api.embed call, wall clock
    phase = {p: n / best(v[-repeats:]) for p, v in embed_s.items()}  # its embedding phase: what imgvec embed prints
    rows = {}
    for p in engines:
        with open_store(whole(p)) as st:
            rows[p] = st.embeddings()
    cos = row_cosines(rows["int8"], rows["float32"])
    result: dict[str, Any] = {
        "model": name, "images": n, "image_size": size, "batch_size": BATCH,
        "weights": "imagenet (pretrained)" if pretrained else "random (seed 0), BatchNorm calibrated on 8 photos: speed only",
        "pretrained": pretrained, "repeats": repeats, "images_per_s": ips, "runs_s": times,
        "embed_phase_images_per_s": phase,
        "ratios": {"embed_int8_vs_float32": phase["int8"] / phase["float32"],
                   "forward_int8_vs_float32": ips["forward_int8"] / ips["forward_float32"],
                   "embed_vs_forward_float32": phase["float32"] / ips["forward_float32"],
                   "embed_vs_forward_int8": phase["int8"] / ips["forward_int8"],
                   "whole_call_int8_vs_float32": ips["embed_int8"] / ips["embed_float32"]},
        # the most whole embed can reach of the forward pass when the forward pass keeps every core busy and
        # decoding needs decode_core_ms of one core per image on top: forward / (forward + decode), CPU time
        "decode_core_ms": decode_ms, "cores": os.cpu_count(),
        "embed_vs_forward_ceiling": {p: ceiling(ips[f"forward_{p}"], decode_ms) for p in engines},
        # and the most int8 can gain on whole embed then: (forward f32 + decode) / (forward int8 + decode)
        "embed_speedup_ceiling": (ceiling(ips["forward_int8"], decode_ms) * ips["forward_int8"])
                                 / (ceiling(ips["forward_float32"], decode_ms) * ips["forward_float32"]),
        "quantize_s": manifest.get("quantize_s"), "calibration_images": len(calibration.keys),
        "load_s": {"float32": f32_load, "int8_with_quantization": int8_load},
        "cosine_to_float32": {"median": float(np.median(cos)), "min": float(cos.min())},
        "top10_overlap": neighbour_overlap(rows["float32"], rows["int8"], min(10, n - 1)),
        "load_average": {"before": load, "after": os.getloadavg()},
    }
    if retrieval is not None:
        labelled = {}
        for p in engines:
            with open_store(whole(p, retrieval)) as st:
                labelled[p] = (st.embeddings(), st.labels())
        real_cos = row_cosines(labelled["int8"][0], labelled["float32"][0])
        result["retrieval"] = {"folder": str(retrieval), "images": len(labelled["float32"][1]),
                               **{f"precision_at_10_{p}": precision_at_k(*labelled[p]) for p in engines},
                               # what int8 changes on real photos (the photo-like JPEGs above are near-ties to a
                               # pretrained network, so their neighbour lists say little about real folders)
                               "top10_overlap": neighbour_overlap(labelled["float32"][0], labelled["int8"][0], 10),
                               "cosine_to_float32": {"median": float(np.median(real_cos)), "min": float(real_cos.min())}}
    shutil.rmtree(tmp, ignore_errors=True)
    release_engines()
    return result


INT8_TARGETS = {"embed_speedup": 2.0, "top10_overlap": 0.9, "precision_at_10_drop": 0.02, "embed_vs_forward": 0.9}


def markdown_int8(data: dict[str, Any]) -> str:
    t = INT8_TARGETS
    rows, misses = [], []
    for m in data["models"]:
        ips, r, ret = m["images_per_s"], m["ratios"], m.get("retrieval", {})
        p32, p8 = ret.get("precision_at_10_float32"), ret.get("precision_at_10_int8")
        ph = m["embed_phase_images_per_s"]
        rows.append((m["model"], "pretrained" if m["pretrained"] else "RANDOM (speed only)", ips["forward_float32"],
                     ips["forward_int8"], ph["float32"], ph["int8"], f"{r['embed_int8_vs_float32']:.2f}x",
                     f"{r['whole_call_int8_vs_float32']:.2f}x",
                     f"{r['embed_vs_forward_float32']:.2f}", f"{r['embed_vs_forward_int8']:.2f}",
                     _ceilings(m),
                     ret.get("top10_overlap", "-") if m["pretrained"] else "-",
                     m["top10_overlap"] if m["pretrained"] else "-", p32 if p32 is not None and m["pretrained"] else "-",
                     p8 if p8 is not None and m["pretrained"] else "-", m["quantize_s"]))
        if r["embed_int8_vs_float32"] < t["embed_speedup"]:
            most = f" (decoding allows at most {m['embed_speedup_ceiling']:.2f}x)" if "embed_speedup_ceiling" in m else ""
            misses.append(f"{m['model']} whole embed int8/float32 {r['embed_int8_vs_float32']:.2f}x < "
                          f"{t['embed_speedup']}x{most}")
        for p in ("float32", "int8"):
            if r[f"embed_vs_forward_{p}"] < t["embed_vs_forward"]:
                most = (f" (ceiling {m['embed_vs_forward_ceiling'][p]:.2f})" if "embed_vs_forward_ceiling" in m else "")
                misses.append(f"{m['model']} {p} whole embed / forward {r[f'embed_vs_forward_{p}']:.2f} < "
                              f"{t['embed_vs_forward']}{most}")
        overlap = ret.get("top10_overlap")
        if m["pretrained"] and overlap is not None and overlap < t["top10_overlap"]:
            misses.append(f"{m['model']} top-10 overlap on real photos {overlap:.3f} < {t['top10_overlap']}")
        if m["pretrained"] and p32 is not None and p32 - p8 > t["precision_at_10_drop"]:
            misses.append(f"{m['model']} precision@10 {p8:.3f} vs float32 {p32:.3f}")
    loads = ", ".join(f"{m['model']} {m['load_average']['before'][0]:.1f}-{m['load_average']['after'][0]:.1f}"
                      for m in data["models"])
    return ("int8 (OpenVINO, NNCF post-training quantization on 100 of the photos) against float32, "
            f"{data['images']} photo-like JPEGs, batch {BATCH}, best of interleaved rounds. embed img/s is the "
            "embedding phase `imgvec embed` reports (decode, inference, store), after the model is built; the whole "
            "call also finds the files and, for a new int8 store, checks int8 against float32 on up to 200 images "
            "(a one-time cost, like the quantization). Neighbour figures only for pretrained weights (random ones "
            "say nothing about them). Real photos: the labelled augmented copies of the packaged photos that "
            "precision@10 uses; photo-like: the synthetic JPEGs timed above, near-ties to a pretrained network "
            "(their top-10 lists are fragile under any change, so the target is judged on the real photos). "
            "Ceiling: the most whole embed can reach of the forward pass on this machine's cores, measured: the "
            "forward pass's CPU time per image (cores / its rate) against that plus decoding's (decode, resize and "
            "the image statistics embed records, CPU ms per image on one core, in brackets); above it only a "
            "cheaper decoder or more cores help.\n\n"
            + md_table(["model", "weights", "forward f32 img/s", "forward int8 img/s", "embed f32 img/s",
                        "embed int8 img/s", "embed int8/f32", "whole call int8/f32 (with check)",
                        "embed/forward f32", "embed/forward int8", "ceiling f32 / int8 (decode ms)",
                        "top-10 overlap, real photos", "top-10 overlap, photo-like", "P@10 f32", "P@10 int8",
                        "quantize s"], rows)
            + f"\nTargets: whole embed int8/f32 >= {t['embed_speedup']}x, whole embed >= {t['embed_vs_forward']} of the "
              f"forward pass, top-10 overlap >= {t['top10_overlap']}, precision@10 within {t['precision_at_10_drop']} "
              "of float32. " + (("**Not met:** " + "; ".join(misses) + ".") if misses else "All met.")
            + f" Load average (1 min) before-after: {loads}.\n")


def _ceilings(m: dict[str, Any]) -> str:
    c = m.get("embed_vs_forward_ceiling")
    return f"{c['float32']:.2f} / {c['int8']:.2f} ({m['decode_core_ms']:.1f})" if c else "-"


INT8_MODELS = ("efficientnetlite0", "mobilenetv2", "efficientnetb0", "resnet50")  # those in the registry run


def int8_models(asked: str) -> list[str]:
    """``default``: :data:`INT8_MODELS` that the registry has (efficientnetlite0 once merged); else the list."""
    from imgvec.backbones.registry import BACKBONES

    return [m for m in INT8_MODELS if m in BACKBONES] if asked == "default" else asked.split(",")


def retrieval_folder(per_class: int) -> Path | None:
    """Augmented copies of packaged photos (``synthetic.make_photo_folder``, once merged), cached; else None."""
    from imgvec import synthetic

    make = getattr(synthetic, "make_photo_folder", None)
    if make is None:
        return None
    folder = OUT / f"augmented-{per_class}"
    if not (folder / ".complete").exists():
        try:
            make(folder, per_class=per_class)
        except ImportError as error:  # scikit-image missing
            print(f"# no augmented copies ({error}): precision@10 left out", file=sys.stderr)
            return None
        (folder / ".complete").write_text("")
    return folder


def main_int8(models: list[str], n: int, repeats: int, retrieval: Path | None, quick: bool) -> dict[str, Any]:
    folder = photo_folder(n)
    retrieval = retrieval or retrieval_folder(4 if quick else 20)
    results = []
    for name in models:
        t = time.perf_counter()
        results.append(bench_int8(name, folder, repeats, retrieval))
        print(f"# int8 {name}: done in {time.perf_counter() - t:.0f}s", file=sys.stderr)
    data = {"images": n, "quick": quick, "models": results}
    write_result(NAME + "-int8" + ("-quick" if quick else ""), data)
    print(markdown_int8(data))
    return data


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: 64 images, mobilenetv2 only, one round")
    ap.add_argument("--models", default=None, help=f"comma-separated (default {','.join(MODELS)})")
    ap.add_argument("--images", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--int8", default=None, metavar="BACKBONES",
                    help="instead: int8 against float32 for these comma-separated backbones, or 'default' (embed-int8.json)")
    ap.add_argument("--retrieval", type=Path, default=None,
                    help="with --int8: labelled folder of augmented copies for precision@10 (default: made by "
                         "synthetic.make_photo_folder where it exists)")
    args = ap.parse_args(argv)
    byte_compiled()  # processes timed from their start read imgvec compiled, as after pip install
    quick = args.quick
    if args.int8:
        return main_int8(int8_models(args.int8), args.images or (32 if quick else 300),
                         args.repeats or (1 if quick else 3), args.retrieval, quick)
    models = args.models.split(",") if args.models else (["mobilenetv2"] if quick else list(MODELS))
    n = args.images or (64 if quick else 300)
    repeats = args.repeats or (1 if quick else 3)
    folder = photo_folder(n)
    results = []
    for name in models:
        t = time.perf_counter()
        m = bench_model(name, folder, repeats if name != "resnet50" else max(1, repeats - 1),
                        naive_n=16 if quick else 40, sweep=(8, 16, 32))
        print(f"# {name}: done in {time.perf_counter() - t:.0f}s", file=sys.stderr)
        results.append(m)
    data: dict[str, Any] = {"images": n, "quick": quick, "models": results}
    data["decode"] = bench_decode(folder)
    if not args.skip_rss:
        data["rss"] = bench_rss((300, 1000) if quick else (1000, 10000), size=96)
        data["enumerate"] = bench_enumerate(20_000 if quick else 200_000)
    write_result(NAME + ("-quick" if quick else ""), data)
    print(markdown(data))
    return data


if __name__ == "__main__":
    main()
