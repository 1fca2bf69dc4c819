"""Where and how the backbone runs: one row per runtime, an engine per loaded model.

keras.applications is the source of every model and its weights. A runtime turns that model
into an :class:`~imgvec.runtime.engine.Engine` (:mod:`imgvec.runtime.engine`): a callable from ``(n, s, s, 3)``
uint8 pixels to ``(n, dim)`` float32 embeddings, with the backbone's own ``preprocess_input`` inside.

- ``tensorflow``: the Keras model in one traced ``tf.function`` (:mod:`imgvec.runtime.tensorflow_engine`;
  the reference; NVIDIA GPUs).
- ``openvino``: the same model converted once with ``openvino.convert_model`` and cached on disk
  (:mod:`imgvec.runtime.model_cache`), compiled for the CPU in float32 (:mod:`imgvec.runtime.openvino_engine`).
  Loading a cached model imports neither TensorFlow nor Keras, so a query starts in a fraction of a second.
- ``jax``, ``torch``: the Keras model on that Keras backend (:mod:`imgvec.runtime.keras_backends`).

``auto`` is OpenVINO on the CPU and TensorFlow where a GPU is used. A backbone OpenVINO cannot
convert falls back to TensorFlow with a one-line :class:`RuntimeNote`.

``precision="mixed"`` (float16 compute on TensorFlow, bfloat16 on OpenVINO) must agree with
float32 on the first batch it embeds (cosine >= :data:`PARITY_MIN_COSINE` per row) or it is
refused with one line. ``precision="int8"`` (OpenVINO only) is NNCF's post-training quantization on
a :class:`Calibration` (the user's own images); it is checked against float32 on a sample of them by
the embedding layer (:meth:`imgvec.embedding.embedder.Embedder.check_int8`) before a store is written.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import warnings
from typing import Any, Callable

import numpy as np

from imgvec.runtime import keras_backends
from imgvec.backbones.registry import Backbone, Weights, get_backbone, parse_weights
from imgvec.backbones.builder import resolve_weights
from imgvec.checks import check_choice
from imgvec.backbones.device import DEVICES, PRECISIONS, gpu_in_use
from imgvec.runtime.engine import CPU_MODEL_BATCH, GPU_MODEL_BATCH, Calibration, Engine, RuntimeNote
from imgvec.errors import BadInputError, param
from imgvec.runtime.model_cache import (CacheEntry, ConversionFailed, cache_dir, cache_entries, cache_key, clear_cache, compiled_model,
                          entry_path, quantized_file_model, quantized_model)
from imgvec.runtime.model_files import ModelFileEngine, PreparedModel, prepare_model_file
from imgvec.runtime.openvino_engine import OpenVINOEngine
from imgvec.runtime.tensorflow_engine import TensorFlowEngine
from imgvec.versions import dist_version

# Names other modules import from here (the embedder, the API, the CLI, benchmarks).
__all__ = ["CPU_MODEL_BATCH", "GPU_MODEL_BATCH", "CacheEntry", "Calibration", "CheckedPrecision", "ConversionFailed", "Engine",
           "LOADERS", "PARITY_MIN_COSINE", "RUNTIMES", "RuntimeNote", "cache_dir", "cache_entries", "cache_key",
           "clear_cache", "compiled_model", "dist_version", "entry_path", "load_engine", "load_model_file_engine",
           "prepare", "prepare_model_file", "PreparedModel", "release_engines", "resolve_runtime", "row_cosines"]

RUNTIMES = ("auto", "openvino", "tensorflow", "jax", "torch")
PARITY_MIN_COSINE = 0.999


def resolve_runtime(runtime: str, device: str = "auto") -> str:
    """The runtime ``auto`` stands for: OpenVINO on the CPU, TensorFlow where a GPU is used."""
    check_choice(param("runtime"), runtime, RUNTIMES)
    check_choice(param("device"), device, DEVICES)
    if runtime != "auto":
        return runtime
    return "tensorflow" if gpu_in_use(device) else "openvino"


def _openvino_or_tensorflow(backbone: Backbone, weights: Weights, image_size: int, precision: str,
                            device: str, calibration: Calibration | None = None) -> Engine:
    """OpenVINO; TensorFlow with a :class:`RuntimeNote` when OpenVINO cannot convert this backbone
    (for int8, which only OpenVINO runs, one line instead)."""
    try:
        return OpenVINOEngine(backbone, weights, image_size, precision, device, calibration)
    except ConversionFailed as failed:
        if precision == "int8":
            raise BadInputError(f"{backbone.name} does not convert to OpenVINO ({failed}), and "
                                f"{param('precision')} int8 runs on OpenVINO only; use {param('precision')} float32") from None
        warnings.warn(f"{backbone.name} does not convert to OpenVINO ({failed}); running it on TensorFlow",
                      RuntimeNote, stacklevel=2)
        return TensorFlowEngine(backbone, weights, image_size, precision, device)


def _keras_backend(name: str) -> Callable[..., Engine]:
    def load(backbone: Backbone, weights: Weights, image_size: int, precision: str, device: str) -> Engine:
        return keras_backends.load_engine(name, backbone, weights, image_size, precision, device)

    return load


# runtime -> loader(backbone, weights, image_size, precision, device). Each engine module imports its
# library (TensorFlow, OpenVINO, JAX, PyTorch) only when an engine is made.
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
                precision: str = "float32", device: str = "auto", calibration: Calibration | None = None) -> Engine:
    """The engine for this model, loaded once per process (see :func:`release_engines`).

    ``backbone`` is a registry name or :class:`Backbone`; ``weights`` a :class:`Weights` or what
    ``--weights`` takes. Loaders in :data:`LOADERS` receive the normalised objects. ``precision="int8"``
    needs the runtime to be OpenVINO and a ``calibration``.
    """
    backbone = backbone if isinstance(backbone, Backbone) else get_backbone(backbone)
    weights = resolve_weights(backbone, weights if isinstance(weights, Weights) else parse_weights(weights))
    check_choice(param("precision"), precision, PRECISIONS)
    name = resolve_runtime(runtime, device)
    if precision == "int8" and name != "openvino":
        raise BadInputError(f"{param('precision')} int8 runs on the openvino runtime (post-training quantization with "
                            f"NNCF), not {name}; use {param('runtime')} openvino (auto on a CPU)")
    if precision == "int8" and calibration is None:
        raise BadInputError(f"{param('precision')} int8 is calibrated on images, and none were given")
    key = (name, backbone.name, weights.identity, int(image_size), precision, device,
           calibration.sha256 if precision == "int8" and calibration else None)
    with _LOADED_LOCK:
        engine = _LOADED.get(key)
        if engine is None:
            load = LOADERS[name]
            args = (backbone, weights, int(image_size))
            if precision == "int8":  # checked on a sample of the user's images, not on one batch
                engine = _openvino_or_tensorflow(*args, precision, device, calibration)
                _LOADED[key] = engine
                return engine
            engine = load(*args, precision, device)
            if precision != "float32":
                engine = CheckedPrecision(engine, lambda: load(*args, "float32", device), backbone.name)
            _LOADED[key] = engine
    return engine


def load_model_file_engine(runtime: str, prepared: PreparedModel, precision: str = "float32",
                           device: str = "auto", calibration: Calibration | None = None) -> Engine:
    """The engine of a user's model file (OpenVINO on the CPU only), loaded once per process like any other.
    ``precision="int8"``: the file's model quantized on ``calibration`` (cached like a backbone's)."""
    check_choice(param("precision"), precision, PRECISIONS)
    check_choice(param("device"), device, DEVICES)
    if runtime not in ("auto", "openvino") or device == "gpu":  # auto: the CPU, even where a GPU is seen
        raise BadInputError(f"a model file runs on OpenVINO on the CPU: leave out {param('runtime')} {runtime}"
                            + (f" and {param('device')} gpu" if device == "gpu" else ""))
    if precision == "int8" and calibration is None:
        raise BadInputError(f"{param('precision')} int8 is calibrated on images, and none were given")
    spec = prepared.spec
    key = ("modelfile", prepared.sha256, spec.preprocess.spec, spec.layer, prepared.image_size, precision,
           calibration.sha256 if precision == "int8" and calibration else None)
    with _LOADED_LOCK:
        engine = _LOADED.get(key)
        if engine is None and precision == "int8" and calibration is not None:  # checked on a sample, not one batch
            identity = f"sha256={prepared.sha256}, preprocess={spec.preprocess.spec}, layer={spec.layer}"
            quantized = quantized_file_model(prepared.model, identity, prepared.image_size, spec.name, calibration,
                                             prepared.batch)
            engine = _LOADED[key] = ModelFileEngine(prepared, precision, "cpu", quantized)
        if engine is None:
            engine = ModelFileEngine(prepared, precision, "cpu")
            if precision != "float32":
                engine = CheckedPrecision(engine, lambda: ModelFileEngine(prepared, "float32", "cpu"), spec.path)
            _LOADED[key] = engine
    return engine


def prepare(runtime: str, backbone: Backbone, weights: Weights, image_size: int, device: str = "auto",
            calibration: Calibration | None = None) -> None:
    """Do once, here, what each process loading this engine would otherwise repeat: OpenVINO's
    conversion, and with a ``calibration`` the int8 quantization (Ray workers then only load the cached model).
    A model file's conversion was done when its embedder was made."""
    if weights.kind == "model":
        return
    if resolve_runtime(runtime, device) == "openvino":
        with contextlib.suppress(ConversionFailed):  # the workers fall back to TensorFlow themselves
            compiled_model(backbone, weights, image_size)
            if calibration is not None:
                quantized_model(backbone, weights, image_size, calibration, load=False)


def release_engines() -> int:
    """Forget every engine this process keeps loaded (their memory is freed); how many there were."""
    with _LOADED_LOCK:
        n = len(_LOADED)
        _LOADED.clear()
    if n and "keras" in sys.modules:
        sys.modules["keras"].backend.clear_session(free_memory=True)
    return n
