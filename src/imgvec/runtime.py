"""Where and how the backbone runs: one row per runtime, an engine per loaded model.

keras.applications is the source of every model and its weights. A runtime turns that model
into an :class:`Engine`: a callable from ``(n, s, s, 3)`` uint8 pixels to ``(n, dim)`` float32
embeddings, with the backbone's own ``preprocess_input`` inside.

- ``tensorflow``: the Keras model in one traced ``tf.function`` (the reference; NVIDIA GPUs).
- ``openvino``: the same model converted once with ``openvino.convert_model`` and cached on disk
  (:func:`compiled_model`), compiled for the CPU in float32. Loading a cached model imports
  neither TensorFlow nor Keras, so a query starts in a fraction of a second.
- ``jax``, ``torch``: the Keras model on that Keras backend (``imgvec.keras_backends``).

``auto`` is OpenVINO on the CPU and TensorFlow where a GPU is used. A backbone OpenVINO cannot
convert falls back to TensorFlow with a one-line :class:`RuntimeNote`.

``precision="mixed"`` (float16 compute on TensorFlow, bfloat16 on OpenVINO) must agree with
float32 on the first batch it embeds (cosine >= :data:`PARITY_MIN_COSINE` per row) or it is
refused with one line; OpenVINO is compiled with an explicit float32 inference precision,
since its CPU default on AVX-512 BF16 machines is bfloat16 (cosine 0.77 on ResNet50).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib
import json
import os
import shutil
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from .backbones import Backbone, Weights, build_model, fetched_files, get_backbone, parse_weights, sha256_of
from .device import (DEVICES, PRECISIONS, check_choice, gpu_in_use, import_keras, import_tensorflow, precision_policy,
                     select_device)
from .errors import BadInputError, param
from .fileio import fsync_path

RUNTIMES = ("auto", "openvino", "tensorflow", "jax", "torch")
# Bump when the converted graph changes (what is folded in, inputs, outputs): old cache entries stop matching.
WRAPPER_VERSION = 2
# Images per model call on the CPU: calls of 8-32 run at the same speed per image, smaller ones are
# 10-40% slower, larger ones only hold more activations (benchmarks/bench_embed.py). On a GPU: the batch.
CPU_MODEL_BATCH = 16
GPU_MODEL_BATCH = 1024
PARITY_MIN_COSINE = 0.999


class RuntimeNote(UserWarning):
    """Something a user should know about how the model runs (a fallback); the CLI prints one line."""


class Engine(Protocol):
    runtime: str  # "openvino" | "tensorflow" | "jax" | "torch"
    version: str  # that library's version, recorded in provenance
    device: str  # "cpu" | "gpu"
    model_batch: int  # images per model call this engine prefers

    def __call__(self, pixels: np.ndarray) -> np.ndarray: ...  # (n, s, s, 3) uint8 -> (n, dim) float32


def resolve_runtime(runtime: str, device: str = "auto") -> str:
    """The runtime ``auto`` stands for: OpenVINO on the CPU, TensorFlow where a GPU is used."""
    check_choice(param("runtime"), runtime, RUNTIMES)
    check_choice(param("device"), device, DEVICES)
    if runtime != "auto":
        return runtime
    return "tensorflow" if gpu_in_use(device) else "openvino"


# -- TensorFlow -----------------------------------------------------------------------------
def traced(model: Any, backbone: Backbone, image_size: int, device: str | None = None) -> Any:
    """A ``tf.function`` from uint8 pixels through ``preprocess_input`` and ``model`` to float32 rows."""
    tf = import_tensorflow()
    preprocess = backbone.preprocess_input()
    place = tf.device(device) if device else contextlib.nullcontext()

    @tf.function(input_signature=[tf.TensorSpec([None, image_size, image_size, 3], tf.uint8)])
    def infer(pixels: Any) -> Any:
        with place:
            # Under mixed precision the model computes in float16; embeddings leave as float32.
            return tf.cast(model(preprocess(tf.cast(pixels, tf.float32)), training=False), tf.float32)

    return infer


class TensorFlowEngine:
    """The Keras model in one traced ``tf.function`` on TensorFlow's chosen device."""

    runtime = "tensorflow"

    def __init__(self, backbone: Backbone, weights: Weights, image_size: int, precision: str, device: str) -> None:
        import_keras("tensorflow")  # refuses a process whose Keras already runs on JAX or PyTorch
        tf = import_tensorflow()
        place = select_device(device)
        with tf.device(place), precision_policy(precision):
            self.model = build_model(backbone, weights, image_size)
        self._fn = traced(self.model, backbone, image_size, place)
        self.version = tf.__version__
        self.device = "gpu" if place.startswith("/GPU") else "cpu"
        self.model_batch = GPU_MODEL_BATCH if self.device == "gpu" else CPU_MODEL_BATCH

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return np.asarray(self._fn(pixels))


# -- OpenVINO -------------------------------------------------------------------------------
class OpenVINOEngine:
    """A cached OpenVINO model compiled for the CPU; no TensorFlow or Keras in the process.

    Compiled for throughput: one stream per core or so (two here), each call split across the
    streams and run at once. Threads are not pinned to cores: on a shared machine (other jobs,
    several Ray workers) pinned threads wait for their core, unpinned ones measured 10-20% faster.
    """

    runtime = "openvino"
    device = "cpu"
    model_batch = 2 * CPU_MODEL_BATCH  # split across the streams

    def __init__(self, backbone: Backbone, weights: Weights, image_size: int, precision: str, device: str) -> None:
        if device == "gpu":
            raise BadInputError(f"{param('runtime')} openvino runs on the CPU; use {param('runtime')} tensorflow (or auto) with "
                                f"{param('device')} gpu")
        import openvino as ov

        xml = compiled_model(backbone, weights, image_size)
        config = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "mixed" else "f32",
                  "PERFORMANCE_HINT": "THROUGHPUT", "ENABLE_CPU_PINNING": False}
        compiled = ov.Core().compile_model(str(xml), "CPU", config)
        self._streams = max(1, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self._queue = ov.AsyncInferQueue(compiled, self._streams)
        self._queue.set_callback(self._collect)
        self._dim = backbone.dim
        self._lock = threading.Lock()
        self.version = ov.get_version().split("-")[0]

    @staticmethod
    def _collect(request: Any, where: tuple[np.ndarray, int]) -> None:
        out, start = where
        rows = request.get_output_tensor(0).data
        out[start : start + len(rows)] = rows

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        out = np.empty((len(pixels), self._dim), np.float32)
        bounds = np.linspace(0, len(pixels), min(self._streams, len(pixels)) + 1).astype(int)
        with self._lock:  # one set of infer requests: one call at a time
            for start, stop in zip(bounds[:-1], bounds[1:]):
                self._queue.start_async([np.ascontiguousarray(pixels[start:stop])], (out, int(start)))
            self._queue.wait_all()
        return out


def _openvino_or_tensorflow(backbone: Backbone, weights: Weights, image_size: int, precision: str,
                            device: str) -> Engine:
    """OpenVINO; TensorFlow with a :class:`RuntimeNote` when OpenVINO cannot convert this backbone."""
    try:
        return OpenVINOEngine(backbone, weights, image_size, precision, device)
    except ConversionFailed as failed:
        warnings.warn(f"{backbone.name} does not convert to OpenVINO ({failed}); running it on TensorFlow",
                      RuntimeNote, stacklevel=2)
        return TensorFlowEngine(backbone, weights, image_size, precision, device)


# -- Keras' other backends (issue 13) --------------------------------------------------------
def _keras_backend(name: str) -> Callable[..., Engine]:
    def load(backbone: Backbone, weights: Weights, image_size: int, precision: str, device: str) -> Engine:
        try:
            module = importlib.import_module(".keras_backends", __package__)
        except ModuleNotFoundError as error:
            if error.name != f"{__package__}.keras_backends":
                raise
            raise BadInputError(f"{param('runtime')} {name} is not available in this version of imgvec") from None
        return module.load_engine(name, backbone, weights, image_size, precision, device)

    return load


# runtime -> loader(backbone, weights, image_size, precision, device)
LOADERS: dict[str, Callable[..., Engine]] = {
    "openvino": _openvino_or_tensorflow,
    "tensorflow": TensorFlowEngine,
    "jax": _keras_backend("jax"),
    "torch": _keras_backend("torch"),
}


# -- lower precision, checked -----------------------------------------------------------------
def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


class CheckedPrecision:
    """A lower-precision engine that must match float32 on the first batch it embeds, else refuses.

    The float32 reference engine is built for that one batch and dropped; a refusal sticks.
    Every batch is checked for overflow (non-finite values).
    """

    def __init__(self, engine: Engine, reference: Callable[[], Engine], backbone: str) -> None:
        self.engine, self._reference, self.backbone = engine, reference, backbone
        self.runtime, self.version, self.device = engine.runtime, engine.version, engine.device
        self.model_batch = engine.model_batch
        self._refusal: str | None = None

    def _refuse(self, why: str) -> None:
        self._refusal = f"{self.backbone} {why} under {param('precision')} mixed ({self.runtime}); use {param('precision')} float32"
        raise BadInputError(self._refusal)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        if self._refusal:
            raise BadInputError(self._refusal)
        out = self.engine(pixels)
        if not np.isfinite(out).all():
            self._refuse("overflowed (non-finite embeddings)")
        if self._reference is not None and len(out):
            if not out.any():
                self._refuse("gave all-zero embeddings (activations below the low precision's range; "
                             "seen with random weights)")
            cos = row_cosines(out, self._reference()(pixels))
            if not (cos >= PARITY_MIN_COSINE).all():
                self._refuse(f"embeddings differ from float32 on the first batch (lowest cosine "
                             f"{np.nan_to_num(cos).min():.4f} < {PARITY_MIN_COSINE})")
            self._reference = None
        return out


# -- loading, and the engines kept for the life of the process --------------------------------
_LOADED: dict[tuple[Any, ...], Engine] = {}
_LOADED_LOCK = threading.Lock()


def load_engine(runtime: str, backbone: Backbone | str, weights: Weights | str | None, image_size: int,
                precision: str = "float32", device: str = "auto") -> Engine:
    """The engine for this model, loaded once per process (see :func:`release_engines`).

    ``backbone`` is a registry name or :class:`Backbone`; ``weights`` a :class:`Weights` or what
    ``--weights`` takes. Loaders in :data:`LOADERS` receive the normalised objects.
    """
    backbone = backbone if isinstance(backbone, Backbone) else get_backbone(backbone)
    weights = weights if isinstance(weights, Weights) else parse_weights(weights)
    check_choice(param("precision"), precision, PRECISIONS)
    name = resolve_runtime(runtime, device)
    key = (name, backbone.name, weights.identity, int(image_size), precision, device)
    with _LOADED_LOCK:
        engine = _LOADED.get(key)
        if engine is None:
            load = LOADERS[name]
            args = (backbone, weights, int(image_size))
            engine = load(*args, precision, device)
            if precision != "float32":
                engine = CheckedPrecision(engine, lambda: load(*args, "float32", device), backbone.name)
            _LOADED[key] = engine
    return engine


def prepare(runtime: str, backbone: Backbone, weights: Weights, image_size: int, device: str = "auto") -> None:
    """Do once, here, what each process loading this engine would otherwise repeat: OpenVINO's
    conversion (Ray workers then only load the cached model)."""
    if resolve_runtime(runtime, device) == "openvino":
        with contextlib.suppress(ConversionFailed):  # the workers fall back to TensorFlow themselves
            compiled_model(backbone, weights, image_size)


def release_engines() -> int:
    """Forget every engine this process keeps loaded (their memory is freed); how many there were."""
    with _LOADED_LOCK:
        n = len(_LOADED)
        _LOADED.clear()
    if n and "keras" in sys.modules:
        sys.modules["keras"].backend.clear_session(free_memory=True)
    return n


# -- the compiled-model cache ----------------------------------------------------------------
class ConversionFailed(Exception):
    """OpenVINO could not convert a backbone (remembered in the cache, so it is tried once)."""


MANIFEST = "manifest.json"
FAILED = "failed.json"
FILES = ("model.xml", "model.bin")


def cache_dir() -> Path:
    """``$IMGVEC_CACHE_DIR``, else ``$XDG_CACHE_HOME/imgvec``, else ``~/.cache/imgvec``."""
    if os.environ.get("IMGVEC_CACHE_DIR"):
        return Path(os.environ["IMGVEC_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "imgvec"


def dist_version(dist: str) -> str:
    """An installed distribution's version, without importing it ('' if absent)."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return ""


def cache_key(backbone: Backbone, weights: Weights, image_size: int) -> dict[str, Any]:
    """Everything that changes a converted model's output. An ImageNet entry also records the sha256
    of the weights file Keras loaded, and is rebuilt if that file changes (see :func:`_entry_ok`)."""
    return {"backbone": backbone.name, "weights": weights.identity, "input_size": int(image_size),
            "wrapper": WRAPPER_VERSION, "openvino": dist_version("openvino"), "keras": dist_version("keras")}


def entry_path(backbone: Backbone, weights: Weights, image_size: int) -> Path:
    key = json.dumps(cache_key(backbone, weights, image_size), sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / "openvino" / f"{backbone.name}-{image_size}px-{digest}"


def _read_manifest(entry: Path, name: str = MANIFEST) -> dict[str, Any] | None:
    try:
        data = json.loads((entry / name).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _source_unchanged(source: dict[str, Any] | None) -> bool:
    """The ImageNet weights file the entry was converted from still holds the same bytes (or is gone:
    the converted model holds the weights itself). The sha256 is recomputed only when size or mtime moved."""
    if not source:
        return True
    try:
        st = os.stat(source["path"])
    except OSError:
        return True
    if (st.st_size, st.st_mtime_ns) == (source["size"], source["mtime_ns"]):
        return True
    return sha256_of(source["path"]) == source["sha256"]


def _entry_ok(entry: Path, key: dict[str, Any]) -> bool:
    """A complete entry for ``key`` whose files still have the sha256 its manifest lists."""
    manifest = _read_manifest(entry)
    if manifest is None or manifest.get("key") != key:
        return False
    try:
        if any(sha256_of(entry / name) != manifest["files"][name] for name in FILES):
            return False
    except (OSError, KeyError, TypeError):
        return False
    return _source_unchanged(manifest.get("source_weights"))


def uint8_model(model: Any, backbone: Backbone, image_size: int) -> Any:
    """A Keras model taking uint8 pixels, with the backbone's ``preprocess_input`` inside, around ``model``.

    This is what OpenVINO converts: the Keras model itself converts to a faster graph than a traced
    ``tf.function`` of it (efficientnetb0 at 224 px, batch 32, on this 2-core CPU: 134 against 51
    images/s; mobilenetv2 and resnet50 about the same either way).
    """
    keras = import_keras("tensorflow")
    pixels = keras.Input((image_size, image_size, 3), dtype="uint8")
    return keras.Model(pixels, model(backbone.preprocess_input()(keras.ops.cast(pixels, "float32"))))


def _convert(backbone: Backbone, weights: Weights, image_size: int, folder: Path) -> dict[str, Any]:
    """Convert the Keras model, preprocessing included, into ``folder``; what went in, for the manifest."""
    tf = import_tensorflow()
    import openvino as ov

    start = time.perf_counter()
    with fetched_files() as fetched:
        model = build_model(backbone, weights, image_size)
    source = None
    if weights.kind == "imagenet" and fetched:
        st = os.stat(fetched[-1])
        source = {"path": str(fetched[-1]), "sha256": sha256_of(fetched[-1]), "size": st.st_size,
                  "mtime_ns": st.st_mtime_ns}
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries results (json, csv)
            with warnings.catch_warnings():  # OpenVINO calls the model with a list where Keras expects a tensor
                warnings.filterwarnings("ignore", message="The structure of `inputs` doesn't match")
                converted = ov.convert_model(uint8_model(model, backbone, image_size))
    except Exception as error:  # OpenVINO's frontends raise many kinds; all mean "cannot convert"
        raise ConversionFailed(f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200]}") from error
    # save_model compresses weights to float16 by default: keep them exactly as Keras has them.
    ov.save_model(converted, str(folder / FILES[0]), compress_to_fp16=False)
    return {"source_weights": source, "tensorflow": tf.__version__, "convert_s": time.perf_counter() - start}


def _publish(tmp: Path, entry: Path, key: dict[str, Any]) -> None:
    """Rename the finished ``tmp`` to ``entry``. If another process got there first with a good entry,
    theirs stays; a damaged one is moved aside first. Renames are atomic: no reader sees half an entry."""
    while True:
        try:
            os.rename(tmp, entry)
            return
        except OSError as error:
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        if _entry_ok(entry, key):
            return
        trash = entry.with_name(f".trash-{entry.name}-{os.getpid()}-{time.monotonic_ns()}")
        with contextlib.suppress(FileNotFoundError):
            os.rename(entry, trash)
            shutil.rmtree(trash, ignore_errors=True)


def compiled_model(backbone: Backbone, weights: Weights, image_size: int) -> Path:
    """The cached OpenVINO model (``model.xml``) for this backbone, converting it first if the cache
    has no good entry. Raises :class:`ConversionFailed` if OpenVINO cannot convert it."""
    entry = entry_path(backbone, weights, image_size)
    key = cache_key(backbone, weights, image_size)
    if _entry_ok(entry, key):
        return entry / FILES[0]
    failed = _read_manifest(entry, FAILED)
    if failed is not None and failed.get("key") == key:
        raise ConversionFailed(failed.get("error", "conversion failed before"))
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f".tmp-{entry.name}-{os.getpid()}-{threading.get_ident()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as error:
        raise BadInputError(f"cannot write the model cache {cache_dir()}: {error.strerror or error} "
                            "(set IMGVEC_CACHE_DIR to a writable folder)") from None
    try:
        try:
            info = _convert(backbone, weights, image_size, tmp)
        except ConversionFailed as failed_now:  # remembered, so the next run falls back at once
            (tmp / FAILED).write_text(json.dumps({"key": key, "error": str(failed_now)}))
            with contextlib.suppress(OSError):
                os.rename(tmp, entry)
            raise
        manifest = {"key": key, "backbone": backbone.name, "weights": weights.describe(), "input_size": image_size,
                    "created": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
                    "files": {name: sha256_of(tmp / name) for name in FILES}, **info}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        for name in (*FILES, MANIFEST):
            fsync_path(tmp / name)
        fsync_path(tmp)
        _publish(tmp, entry, key)
        fsync_path(entry.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return entry / FILES[0]


@dataclass
class CacheEntry:
    path: Path
    backbone: str
    input_size: int
    weights: str
    bytes: int
    created: str
    age_s: float
    ok: bool  # complete and undamaged, for this OpenVINO and Keras
    error: str = ""  # why OpenVINO could not convert it (TensorFlow runs this model instead)


def cache_entries() -> list[CacheEntry]:
    """The compiled models in the cache, newest first."""
    root = cache_dir() / "openvino"
    entries = []
    for entry in sorted(root.iterdir()) if root.is_dir() else []:
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        failed = _read_manifest(entry, FAILED) or {}
        manifest = _read_manifest(entry) or failed
        key = manifest.get("key") or {}
        size = sum(f.stat().st_size for f in entry.iterdir() if f.is_file())
        ok = _entry_ok(entry, {**key, "openvino": dist_version("openvino"), "keras": dist_version("keras")})
        entries.append(CacheEntry(entry, key.get("backbone", "?"), int(key.get("input_size", 0)),
                                  str(manifest.get("weights", key.get("weights", "?"))), size,
                                  str(manifest.get("created", "")), time.time() - entry.stat().st_mtime, ok,
                                  str(failed.get("error", ""))))
    return sorted(entries, key=lambda e: e.age_s)


def clear_cache() -> tuple[int, int]:
    """Remove every compiled model (and leftovers of interrupted conversions); (entries, bytes) freed."""
    root = cache_dir() / "openvino"
    if not root.is_dir():
        return 0, 0
    entries = [e for e in root.iterdir() if e.is_dir()]
    freed = sum(f.stat().st_size for e in entries for f in e.rglob("*") if f.is_file())
    for e in entries:
        shutil.rmtree(e, ignore_errors=True)
    return sum(not e.name.startswith(".") for e in entries), freed
