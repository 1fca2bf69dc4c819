"""Weights for parity tests: a random network whose BatchNorm statistics are calibrated.

Random weights with BatchNorm's initial statistics (mean 0, variance 1) shrink activations
layer by layer to ~1e-9..1e-12 in deep backbones, where a cosine between two runtimes means
nothing. Calibrating each BatchNorm layer's moving mean and variance to the statistics of the
batch it sees (one training-mode pass with momentum 0 and dropout off) brings activations to
order 1, as in a trained network. The result is saved as a ``.weights.h5`` file, which every
Keras backend loads to the same numbers (seeded random initialisers differ per backend).

Also runnable: ``python tests/parity_util.py MODEL SIZE OUT.weights.h5`` (on TensorFlow).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def calibration_images(size: int, n: int = 16, seed: int = 0) -> np.ndarray:
    """Generated uint8 images (imgvec.synthetic's patterns in random colours), ``(n, size, size, 3)``."""
    from imgvec.synthetic import PATTERNS, pattern

    rng = np.random.default_rng(seed)
    return np.stack([pattern(PATTERNS[i % len(PATTERNS)], size, rng) for i in range(n)])


def calibrated_weights(model: str, size: int, path: str | Path, seed: int = 0) -> Path:
    """Save random ``model`` weights (``seed``) with BatchNorm calibrated on generated images to ``path``."""
    from imgvec.backbones import Weights, build_model, get_backbone
    from imgvec.device import import_keras

    keras = import_keras()
    backbone = get_backbone(model)
    net = build_model(backbone, Weights("random", seed=seed), size)
    norms = [layer for layer in _layers(net) if isinstance(layer, keras.layers.BatchNormalization)]
    drops = [layer for layer in _layers(net) if isinstance(layer, keras.layers.Dropout)]
    for layer in norms:
        layer.momentum = 0.0  # moving statistics := this batch's statistics
    for layer in drops:
        layer.rate = 0.0
    pixels = calibration_images(size, seed=seed).astype(np.float32)
    net(backbone.preprocess_input()(pixels), training=True)
    path = Path(path)
    net.save_weights(str(path))
    return path


def _layers(model):
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from _layers(layer)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row cosine similarity of two ``(n, dim)`` arrays."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


if __name__ == "__main__":
    print(calibrated_weights(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
