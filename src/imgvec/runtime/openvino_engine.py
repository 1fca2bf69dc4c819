"""The OpenVINO runtime: the Keras model converted once and kept compiled for this CPU
(:mod:`imgvec.runtime.model_cache`).

Loading a cached model imports neither TensorFlow nor Keras, so a query starts in a fraction of a
second. It is compiled with an explicit float32 inference precision, since OpenVINO's CPU default
on AVX-512 BF16 machines is bfloat16 (cosine 0.77 on ResNet50); ``precision="mixed"`` asks for bfloat16.
``precision="int8"`` runs the model NNCF quantized on a calibration sample (cached too,
:func:`imgvec.runtime.model_cache.quantized_model`); what is not quantized runs in float32.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

import numpy as np

from imgvec.backbones.registry import Backbone, Weights
from imgvec.runtime.engine import CPU_MODEL_BATCH, Calibration
from imgvec.errors import BadInputError, param
from imgvec.runtime.model_cache import cache_key, compiled_for_cpu, load_model, quantized_model


class OpenVINOEngine:
    """A cached OpenVINO model compiled for the CPU; no TensorFlow or Keras in the process.

    Compiled for throughput: one stream per core or so (two here), each call split across the
    streams and run at once. Threads are not pinned to cores: on a shared machine (other jobs,
    several Ray workers) pinned threads wait for their core, unpinned ones measured 10-20% faster.
    """

    runtime = "openvino"
    device = "cpu"
    model_batch = 2 * CPU_MODEL_BATCH  # split across the streams

    def __init__(self, backbone: Backbone, weights: Weights, image_size: int, precision: str, device: str,
                 calibration: Calibration | None = None) -> None:
        if device == "gpu":
            raise BadInputError(f"{param('runtime')} openvino runs on the CPU; use {param('runtime')} tensorflow (or auto) with "
                                f"{param('device')} gpu")
        if precision == "int8":
            if calibration is None:
                raise BadInputError(f"{param('precision')} int8 is calibrated on images, and none were given")
            source = functools.partial(quantized_model, backbone, weights, image_size, calibration)
        else:
            source = functools.partial(load_model, backbone, weights, image_size)
        key = cache_key(backbone, weights, image_size, calibration if precision == "int8" else None)
        # the compiled model's checked bytes, or the model's (checked, or converted / quantized) compiled
        described = weights.describe() + {"int8": ", int8", "mixed": ", bfloat16"}.get(precision, "")
        self._start(compiled_for_cpu(key, self.config(precision), source, described), backbone.dim)

    @staticmethod
    def config(precision: str) -> dict[str, Any]:
        """What the model is compiled with: float32 unless ``mixed``, streams for throughput, threads not pinned."""
        return {"INFERENCE_PRECISION_HINT": "bf16" if precision == "mixed" else "f32",
                "PERFORMANCE_HINT": "THROUGHPUT", "ENABLE_CPU_PINNING": False}

    def _start(self, compiled: Any, dim: int) -> None:
        """Set up the streams of ``compiled`` (an ``openvino.CompiledModel``)."""
        import openvino as ov

        self._streams = max(1, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self._queue = ov.AsyncInferQueue(compiled, self._streams)
        self._queue.set_callback(self._collect)
        self._dim = dim
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
