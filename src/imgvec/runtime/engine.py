"""What every runtime's engine is, and the batch sizes they share (no runtime library imported).

An engine is a callable from ``(n, s, s, 3)`` uint8 pixels to ``(n, dim)`` float32 embeddings,
with the backbone's own ``preprocess_input`` inside. Each runtime makes its engines in its own
module (:mod:`imgvec.runtime.tensorflow_engine`, :mod:`imgvec.runtime.openvino_engine`, :mod:`imgvec.runtime.keras_backends`);
:mod:`imgvec.runtime.loader` picks one.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from imgvec.errors import RuntimeNote  # noqa: F401 (defined with imgvec's errors: the CLI shows it)

# Images per model call on the CPU: calls of 8-32 run at the same speed per image, smaller ones are
# 10-40% slower, larger ones only hold more activations (benchmarks/bench_embed.py). On a GPU: the batch.
CPU_MODEL_BATCH = 16
GPU_MODEL_BATCH = 1024


class Engine(Protocol):
    runtime: str  # "openvino" | "tensorflow" | "jax" | "torch"
    version: str  # that library's version, recorded in provenance
    device: str  # "cpu" | "gpu"
    model_batch: int  # images per model call this engine prefers

    def __call__(self, pixels: np.ndarray) -> np.ndarray: ...  # (n, s, s, 3) uint8 -> (n, dim) float32
