"""The TensorFlow runtime: the Keras model in one traced ``tf.function`` (the reference; NVIDIA GPUs)."""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np

from imgvec.backbones.registry import Backbone, Weights
from imgvec.backbones.builder import build_model, check_weights_at_hand, preprocess_input
from imgvec.backbones.device import import_keras, import_tensorflow, precision_policy, select_device
from imgvec.runtime.engine import CPU_MODEL_BATCH, GPU_MODEL_BATCH


def traced(model: Any, backbone: Backbone, image_size: int, device: str | None = None) -> Any:
    """A ``tf.function`` from uint8 pixels through ``preprocess_input`` and ``model`` to float32 rows."""
    tf = import_tensorflow()
    preprocess = preprocess_input(backbone)
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
        check_weights_at_hand(backbone, weights, image_size)  # no network: say so before TensorFlow loads
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
