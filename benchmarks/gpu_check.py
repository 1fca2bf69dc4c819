"""The prepared GPU check (issue 13): imgvec on a GPU through Keras' JAX and PyTorch backends.

Run by ``benchmarks/gpu_check.sh`` (see there and the README's GPU section):

    python benchmarks/gpu_check.py reference OUT.npz [--dry]   # here: TensorFlow rows on the CPU
    python benchmarks/gpu_check.py run REFERENCE.npz OUT.json [--dry]

``run`` generates photo-like JPEGs, measures how fast the CPU decodes them (one thread, and
the embedder's pool of one thread per core), then, in one process per backend (a process has
one Keras backend), embeds them with each model, batch size and precision through imgvec's
own Embedder on the GPU and records images/s, the time inside model calls against the time
outside them (waiting for decoded batches), GPU busy share and memory (nvidia-smi, and the
backend's own peak), and the cosine per row against the CPU rows in REFERENCE.npz. Weights
are random with calibrated BatchNorm statistics (tests/parity_util.py), made on each side by
the same recipe, since ResNet50's weights (94 MB) do not fit the 64 MiB that can be carried.
``--dry`` is the same on the CPU with a tiny set, so ``make test`` keeps it working.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from parity_util import calibrated_weights, calibration_images, cosines  # noqa: E402

FULL = dict(models=[["mobilenetv2", 224], ["efficientnetb0", 224], ["resnet50", 224]], images=3000, image_px=640,
            runs=[["float32", 64], ["float32", 256], ["mixed", 256]], device="gpu", budget_s=330)
DRY = dict(models=[["mobilenetv3small", 64]], images=32, image_px=96, runs=[["float32", 16], ["mixed", 16]],
           device="cpu", budget_s=600)
REFERENCE_IMAGES, REFERENCE_SEED, WEIGHTS_SEED = 16, 7, 0
# PyTorch first: it makes the calibrated weights files quickly (eager, nothing to compile), and JAX loads
# the same files, so both backends run the very same weights.
BACKENDS = ("torch", "jax")


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)  # a run cut short still leaves a whole file


# -- here: the CPU reference ------------------------------------------------------------------
def reference(out: Path, config: dict[str, Any]) -> None:
    """TensorFlow's rows on the CPU for each model's reference images and calibrated weights."""
    from imgvec.backbones.registry import get_backbone, parse_weights
    from imgvec.runtime.loader import dist_version, load_engine

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model, size in config["models"]:
            path = calibrated_weights(model, size, Path(tmp) / f"{model}.weights.h5", WEIGHTS_SEED)
            engine = load_engine("tensorflow", get_backbone(model), parse_weights(str(path)), size, "float32", "cpu")
            rows[f"{model}@{size}"] = engine(calibration_images(size, REFERENCE_IMAGES, REFERENCE_SEED))
    meta = dict(tensorflow=dist_version("tensorflow"), keras=dist_version("keras"), commit=_commit(),
                made=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    np.savez(out, meta=json.dumps(meta), **rows)


# -- there: images, decoding, the machine ------------------------------------------------------
def _make_images(args: tuple[Path, int, int, int]) -> None:
    from PIL import Image

    from imgvec.synthetic import PATTERNS, pattern

    folder, start, stop, px = args
    rng = np.random.default_rng(start)
    for i in range(start, stop):
        img = pattern(PATTERNS[i % len(PATTERNS)], px, rng)
        Image.fromarray(img).save(folder / f"img_{i:05d}.jpg", quality=90)


def make_images(folder: Path, n: int, px: int) -> list[str]:
    """``n`` generated JPEGs of ``px`` x ``px`` (patterns with noise, in random colours), one process per core."""
    folder.mkdir(parents=True, exist_ok=True)
    step = max(1, n // (4 * (os.cpu_count() or 1)))
    with ProcessPoolExecutor() as pool:
        list(pool.map(_make_images, [(folder, i, min(i + step, n), px) for i in range(0, n, step)]))
    return sorted(str(p) for p in folder.glob("*.jpg"))


def decode_rates(paths: list[str], size: int) -> dict[str, Any]:
    """Images/s decoding (and resizing to ``size``) on one thread and on the embedder's pool."""
    from imgvec.embedding.embedder import Embedder
    from imgvec.files.images import load_image

    workers = Embedder(model="mobilenetv2").workers  # what the embedder uses by default
    for p in paths[:4]:  # first calls load Pillow's plugins
        load_image(p, size)
    one = paths[: max(8, len(paths) // 10)]
    start = time.perf_counter()
    for p in one:
        load_image(p, size)
    single = len(one) / (time.perf_counter() - start)
    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda p: load_image(p, size), paths))
    pooled = len(paths) / (time.perf_counter() - start)
    return dict(size=size, workers=workers, one_thread_images_per_s=round(single, 1),
                pool_images_per_s=round(pooled, 1), pool_speedup=round(pooled / single, 2))


def machine(dry: bool) -> dict[str, Any]:
    info: dict[str, Any] = dict(cpu_count=os.cpu_count(), cpu_affinity=len(os.sched_getaffinity(0)),
                                cpu=_cpu_model(), python=platform.python_version())
    if not dry:
        query = "name,driver_version,memory.total"
        line = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                              text=True, check=True).stdout.strip().splitlines()[0]
        info.update(zip(["gpu", "driver", "gpu_memory_total"], [x.strip() for x in line.split(",")]))
    return info


def _cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        saved = ROOT / "gpu-wheels" / "COMMIT"
        return saved.read_text().strip() if saved.is_file() else "unknown"


class GpuSampler:
    """nvidia-smi's utilisation and memory every 100 ms while a run lasts."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                                      "--format=csv,noheader,nounits", "-lms", "100"],
                                     stdout=subprocess.PIPE, text=True)
        self.samples: list[tuple[float, float]] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            try:
                util, mem = (float(x) for x in line.split(","))
            except ValueError:
                continue
            self.samples.append((util, mem))

    def stop(self) -> dict[str, Any]:
        self.proc.terminate()
        self.proc.wait()
        self.thread.join(timeout=2)
        if not self.samples:
            return {}
        util = [u for u, _ in self.samples]
        return dict(gpu_busy_share=round(float(np.mean(util)) / 100, 3), gpu_samples=len(util),
                    gpu_memory_used_max_mib=max(m for _, m in self.samples))


# -- there: one Keras backend per process ------------------------------------------------------
class TimedEngine:
    """An engine that adds up the seconds spent inside model calls."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.runtime, self.version, self.device = engine.runtime, engine.version, engine.device
        self.model_batch = engine.model_batch
        self.seconds = 0.0

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        try:
            return self.engine(pixels)
        finally:
            self.seconds += time.perf_counter() - start


def _peak_memory(backend: str) -> dict[str, Any]:
    """The backend's own peak device memory (bytes allocated by it), where it reports one."""
    if backend == "torch":
        import torch

        if torch.cuda.is_available():
            peak = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            return dict(backend_peak_memory_mib=round(peak / 2**20, 1))
        return {}
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return dict(backend_peak_memory_mib=round(peak / 2**20, 1)) if peak else {}  # the process's peak so far


def backend_main(backend: str, config: dict[str, Any], paths: list[str], ref_path: Path, weights_dir: Path,
                 out: Path, deadline: float) -> None:
    from imgvec.backbones.device import import_keras

    import_keras(backend)
    from imgvec.embedding.embedder import Embedder
    from imgvec.errors import ImgvecError
    from imgvec.runtime.keras_backends import load_engine
    from imgvec.runtime.loader import dist_version

    part: dict[str, Any] = dict(backend=backend, version=dist_version(backend), keras=dist_version("keras"), runs=[])
    refs = np.load(ref_path)
    for model, size in config["models"]:
        if time.time() > deadline:
            part["runs"].append(dict(model=model, skipped="time budget spent"))
            continue
        weights = weights_dir / f"{model}-{size}.weights.h5"
        if not weights.is_file():
            start = time.perf_counter()
            calibrated_weights(model, size, weights, WEIGHTS_SEED)
            part.setdefault("calibration_s", {})[model] = round(time.perf_counter() - start, 1)
        ref_pixels = calibration_images(size, REFERENCE_IMAGES, REFERENCE_SEED)
        for precision, batch in config["runs"]:
            run: dict[str, Any] = dict(model=model, image_size=size, precision=precision, batch_size=batch)
            part["runs"].append(run)
            if time.time() > deadline:
                run["skipped"] = "time budget spent"
                continue
            embedder = Embedder(model=model, weights=str(weights), image_size=size, batch_size=batch, runtime=backend,
                                precision=precision, device=config["device"])
            if precision != "float32":
                # imgvec checks lower precision against float32 on the first batch and may refuse it; the
                # check records the verdict, and the speed is measured on the unchecked engine regardless.
                try:
                    embedder.embed_arrays(ref_pixels)
                    run["imgvec_verdict"] = "accepted"
                except ImgvecError as error:
                    run["imgvec_verdict"] = f"refused: {error}"
                embedder.engine_ = load_engine(backend, embedder.backbone, embedder.weights, size, precision,
                                               config["device"])
            run.update(_one_run(backend, config, paths, ref_pixels, refs[f"{model}@{size}"], embedder))
            _write_json(out, part)
    _write_json(out, part)


def _one_run(backend: str, config: dict[str, Any], paths: list[str], ref_pixels: np.ndarray,
             ref_rows: np.ndarray, embedder: Any) -> dict[str, Any]:
    start = time.perf_counter()
    embedder.load()
    timed = embedder.engine_ = TimedEngine(embedder.engine_)
    cos = cosines(embedder.embed_arrays(ref_pixels), ref_rows)
    size = embedder.image_size
    embedder.embed_arrays(np.zeros((embedder.batch_size, size, size, 3), np.uint8))  # compile this batch shape
    load_s = time.perf_counter() - start
    _peak_memory(backend)
    timed.seconds = 0.0
    sampler = GpuSampler() if config["device"] == "gpu" else None
    start, n = time.perf_counter(), 0
    for batch in embedder.embed_files(paths):
        n += len(batch.indices)
    wall = time.perf_counter() - start
    result = dict(device=timed.device, images=n, load_and_compile_s=round(load_s, 1), wall_s=round(wall, 2),
                  images_per_s=round(n / wall, 1), model_images_per_s=round(n / max(timed.seconds, 1e-9), 1),
                  share_outside_model=round(1 - timed.seconds / wall, 3),
                  cosine_vs_cpu_min=round(float(cos.min()), 7), cosine_vs_cpu_mean=round(float(cos.mean()), 7))
    result.update(sampler.stop() if sampler else {})
    result.update(_peak_memory(backend))
    return result


# -- there: the whole check --------------------------------------------------------------------
def run(ref_path: Path, out: Path, config: dict[str, Any], dry: bool) -> None:
    began = time.time()
    deadline = began + config["budget_s"]
    results: dict[str, Any] = dict(commit=_commit(), date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                   dry=dry, config=config, machine=machine(dry))
    meta = json.loads(str(np.load(ref_path)["meta"]))
    results["reference"] = meta
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        paths = make_images(Path(tmp) / "images", config["images"], config["image_px"])
        results["images"] = dict(count=len(paths), px=config["image_px"], format="JPEG q90",
                                 generated_s=round(time.perf_counter() - start, 1))
        results["decode"] = decode_rates(paths, config["models"][0][1])
        _write_json(out, results)
        listing = Path(tmp) / "paths.json"
        listing.write_text(json.dumps(paths))
        results["backends"] = []
        for i, backend in enumerate(BACKENDS):
            part = Path(tmp) / f"{backend}.json"
            share = time.time() + (deadline - time.time()) / (len(BACKENDS) - i)  # each backend its share of the time
            command = [sys.executable, __file__, "backend", backend, json.dumps(config), str(listing), str(ref_path),
                       tmp, str(part), str(share)]
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=max(60.0, share - time.time() + 90))
                code, stderr = done.returncode, done.stderr
            except subprocess.TimeoutExpired as expired:
                code, stderr = "timed out", (expired.stderr or b"").decode(errors="replace")
            entry = json.loads(part.read_text()) if part.is_file() else dict(backend=backend, runs=[])
            if code:
                entry["error"] = (stderr.strip().splitlines() or [f"exit {code}"])[-1] + f" (exit {code})"
                entry["stderr_tail"] = stderr[-4000:]
            results["backends"].append(entry)
            _write_json(out, results)
    results["elapsed_s"] = round(time.time() - began, 1)
    _write_json(out, results)
    _summary(results)


def _summary(results: dict[str, Any]) -> None:
    d = results["decode"]
    print(f"decode ({d['size']} px): {d['one_thread_images_per_s']} images/s on one thread, "
          f"{d['pool_images_per_s']} on {d['workers']} threads")
    for entry in results["backends"]:
        print(f"{entry['backend']} {entry.get('version', '')}" + (f"  ERROR {entry['error']}" if "error" in entry else ""))
        for r in entry["runs"]:
            head = f"  {r['model']} {r.get('precision', '')} b{r.get('batch_size', '')}:"
            if "images_per_s" in r:
                print(f"{head} {r['images_per_s']} images/s (model alone {r['model_images_per_s']}), "
                      f"{r['share_outside_model']:.0%} outside the model, GPU busy {r.get('gpu_busy_share', '-')}, "
                      f"cosine >= {r['cosine_vs_cpu_min']}" + (f"; imgvec: {r['imgvec_verdict']}"
                                                               if "imgvec_verdict" in r else ""))
            else:
                print(f"{head} {r.get('skipped')}")


def main(argv: list[str]) -> None:
    dry = "--dry" in argv
    args = [a for a in argv if a != "--dry"]
    config = DRY if dry else FULL
    if args[0] == "reference":
        reference(Path(args[1]), config)
    elif args[0] == "run":
        run(Path(args[1]), Path(args[2]), config, dry)
    elif args[0] == "backend":
        backend, cfg, listing, ref, weights_dir, out, deadline = args[1:8]
        backend_main(backend, json.loads(cfg), json.loads(Path(listing).read_text()), Path(ref), Path(weights_dir),
                     Path(out), float(deadline))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
