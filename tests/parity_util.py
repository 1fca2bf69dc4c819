"""Weights for parity tests: a random network whose BatchNorm statistics are calibrated.

Random weights with BatchNorm's initial statistics shrink activations to ~1e-9 in deep backbones,
where a cosine between two runtimes means nothing; :func:`imgvec.backbones.builder.calibrate` (shared with the
benchmarks and the GPU check) fixes that on generated images. Any backend makes nearly the same file
(the calibration pass differs only by rounding); the ``.weights.h5`` file loads to the same numbers everywhere.

Keras has one backend per process, so the other runtimes embed in a subprocess
(:func:`embed_in_subprocess`) and the test compares the rows.
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
    """Save random ``model`` weights (``seed``) with BatchNorm calibrated on generated images to ``path``
    (:func:`imgvec.backbones.builder.calibrated_weights`). Runs on whatever backend Keras has in this process."""
    from imgvec.backbones.registry import get_backbone
    from imgvec.backbones.builder import calibrated_weights as calibrated

    return calibrated(get_backbone(model), size, calibration_images(size, seed=seed), path, seed)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row cosine similarity of two ``(n, dim)`` arrays."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def embed(runtime: str, jobs: list[tuple[str, int, str]], pixels_by_size: dict[int, np.ndarray]) -> dict[str, np.ndarray]:
    """Embed with imgvec's ``runtime`` engine on the CPU: ``{model: rows}`` for each (model, size, weights file)."""
    from imgvec.backbones.registry import get_backbone, parse_weights
    from imgvec.runtime.loader import load_engine

    return {model: load_engine(runtime, get_backbone(model), parse_weights(path), size, "float32", "cpu")(
        pixels_by_size[size]) for model, size, path in jobs}


def embed_in_subprocess(runtime: str, jobs: list[tuple[str, int, str]], pixels_by_size: dict[int, np.ndarray],
                        workdir: Path) -> dict[str, np.ndarray]:
    """:func:`embed` in a fresh process (a process has one Keras backend)."""
    import json
    import subprocess

    inputs = workdir / f"pixels-{runtime}.npz"
    np.savez(inputs, **{str(size): px for size, px in pixels_by_size.items()})
    out = workdir / f"rows-{runtime}.npz"
    done = subprocess.run([sys.executable, __file__, runtime, json.dumps(jobs), str(inputs), str(out)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(out) as rows:
        return {name: rows[name] for name in rows.files}


if __name__ == "__main__":  # python parity_util.py RUNTIME JOBS_JSON PIXELS.npz OUT.npz
    import json

    runtime, jobs, inputs, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
    with np.load(inputs) as saved:
        pixels = {int(size): saved[size] for size in saved.files}
    np.savez(out, **embed(runtime, [tuple(job) for job in jobs], pixels))
