"""The keras.applications backbone on Keras' JAX or PyTorch backend, as an engine.

Same model, same weights, same ``preprocess_input`` inside the model as the TensorFlow runtime:
only the library that runs the graph changes, so neither TensorFlow nor OpenVINO is needed.
Keras picks its backend at its first import (``KERAS_BACKEND``), so a process runs one
backend; :func:`imgvec.backbones.device.import_keras` enforces that.

Batches go to the device as uint8, channels-last, exactly as decoded (a quarter of float32's
transfer), and become float32 there. JAX runs one ``jax.jit``-compiled stateless call; since XLA
compiles once per batch shape, a short batch (a run's last) is padded to the smallest size
already compiled, and compiled programs are kept in imgvec's cache folder
(``$IMGVEC_CACHE_DIR/jax``), so only a first run pays for compiling. PyTorch runs the model
eagerly under ``torch.no_grad()``. Lower precision is Keras' ``mixed_float16`` policy, checked
against float32 by :class:`imgvec.runtime.loader.CheckedPrecision`.

Seeded random weights are NOT the same numbers on every backend: Keras' initialisers draw from
each backend's own generator (measured: MobileNetV2 seed 0, largest weight difference 0.70
TensorFlow vs JAX, 0.67 vs PyTorch). A weights file gives the same vectors on every backend
(tests/test_backends.py: cosine >= 0.99999 per row); ImageNet weights are such a file, loaded the
same way, though not tested here (no download offline).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from imgvec.backbones.registry import Backbone, Weights
from imgvec.backbones.builder import build_model, check_weights_at_hand, preprocess_input
from imgvec.checks import check_choice
from imgvec.backbones.device import DEVICES, PRECISIONS, import_keras, precision_policy
from imgvec.runtime.engine import CPU_MODEL_BATCH, GPU_MODEL_BATCH
from imgvec.errors import BadInputError, param
from imgvec.runtime.model_cache import cache_dir

BACKENDS = ("jax", "torch")


@dataclass
class KerasEngine:
    """A built, compiled model: uint8 ``(n, s, s, 3)`` pixels in, float32 ``(n, dim)`` rows out."""

    runtime: str  # "jax" | "torch"
    version: str  # the backend library's version
    device: str  # "cpu" | "gpu"
    model_batch: int
    dim: int
    _call: Callable[[np.ndarray], np.ndarray]
    _compiled: set[int] | None  # batch sizes compiled so far (JAX compiles per shape), None: no padding

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
        out = np.empty((len(pixels), self.dim), np.float32)
        for start in range(0, len(pixels), self.model_batch):
            chunk = pixels[start : start + self.model_batch]
            n = len(chunk)
            if self._compiled is not None:
                size = min((s for s in self._compiled if s >= n), default=n)
                self._compiled.add(size)
                if size > n:
                    chunk = np.concatenate([chunk, np.zeros((size - n, *chunk.shape[1:]), np.uint8)])
            out[start : start + n] = self._call(chunk)[:n]
        return out


def _gpu_available(backend: str) -> bool:
    if backend == "jax":
        import jax

        return jax.default_backend() == "gpu"
    import torch

    return bool(torch.cuda.is_available())


def _persistent_compilation_cache() -> None:
    """Keep what XLA compiles (each weight initialiser, the model) in imgvec's cache folder, unless the
    user set JAX's own: building MobileNetV2 on JAX took 27 s on this 2-core machine, 3 s from the cache."""
    import jax

    if jax.config.jax_compilation_cache_dir is None:
        jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "jax"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def load_engine(backend: str, backbone: Backbone, weights: Weights, image_size: int,
                precision: str = "float32", device: str = "auto") -> KerasEngine:
    """Build ``backbone`` on Keras' ``backend`` (jax or torch), on the GPU where that backend sees one."""
    check_choice(param("runtime"), backend, BACKENDS)
    check_choice(param("device"), device, DEVICES)
    check_choice(param("precision"), precision, PRECISIONS)
    check_weights_at_hand(backbone, weights, image_size)  # no network: say so before the backend loads
    keras = import_keras(backend)
    if backend == "jax":
        _persistent_compilation_cache()
    on_gpu = device != "cpu" and _gpu_available(backend)
    if device == "gpu" and not on_gpu:
        raise BadInputError(f"{param('device')} gpu: {backend} sees no GPU (is a CUDA build of {backend} installed?); "
                            f"use {param('device')} cpu")
    # Keras' device names; PyTorch's plain "cpu" (with "cpu:0" Keras copies each weight off its Parameter,
    # and an integer weight then fails as a Parameter that requires gradients).
    scope = "gpu:0" if on_gpu else ("cpu:0" if backend == "jax" else "cpu")
    # JAX compiles each initialiser for each weight shape; on the CPU that is quicker than on a
    # GPU, and the weights move to the GPU once afterwards (_jax_call).
    with keras.device("cpu:0" if backend == "jax" else scope), precision_policy(precision):
        model = build_model(backbone, weights, image_size)
    preprocess = preprocess_input(backbone)
    make = _jax_call if backend == "jax" else _torch_call
    call, version = make(keras, model, preprocess, scope)
    return KerasEngine(
        runtime=backend, version=version, device="gpu" if on_gpu else "cpu",
        model_batch=GPU_MODEL_BATCH if on_gpu else CPU_MODEL_BATCH,
        dim=backbone.dim, _call=call,
        _compiled=set() if backend == "jax" else None,
    )


def _jax_call(keras: Any, model: Any, preprocess: Callable[[Any], Any], scope: str) -> tuple[Callable[[np.ndarray], np.ndarray], str]:
    """One jit-compiled stateless call: the weights are arguments, not constants baked into the program."""
    import jax

    target = jax.devices("gpu" if scope.startswith("gpu") else "cpu")[0]
    trainable = jax.device_put([v.value for v in model.trainable_variables], target)
    non_trainable = jax.device_put([v.value for v in model.non_trainable_variables], target)

    @jax.jit
    def infer(trainable: Any, non_trainable: Any, pixels: Any) -> Any:
        # Under mixed precision the model computes in float16; embeddings leave as float32.
        rows, _ = model.stateless_call(trainable, non_trainable, preprocess(pixels.astype("float32")),
                                       training=False)
        return rows.astype("float32")

    def call(pixels: np.ndarray) -> np.ndarray:
        return np.asarray(infer(trainable, non_trainable, jax.device_put(pixels, target)))

    return call, jax.__version__


def _torch_call(keras: Any, model: Any, preprocess: Callable[[Any], Any], scope: str) -> tuple[Callable[[np.ndarray], np.ndarray], str]:
    """The model in eval mode under ``torch.no_grad()``; pixels cross to the device as uint8."""
    import torch

    target = torch.device("cuda:0" if scope.startswith("gpu") else "cpu")
    model.eval()

    def call(pixels: np.ndarray) -> np.ndarray:
        with torch.no_grad(), keras.device(scope):  # constants inside preprocess/model go there too
            x = torch.from_numpy(pixels).to(target, non_blocking=True).float()
            rows = model(preprocess(x), training=False)
            return rows.float().cpu().numpy()

    return call, torch.__version__
