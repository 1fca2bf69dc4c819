"""What every runtime's engine is, and the batch sizes they share (no runtime library imported).

An engine is a callable from ``(n, s, s, 3)`` uint8 pixels to ``(n, dim)`` float32 embeddings,
with the backbone's own ``preprocess_input`` inside. Each runtime makes its engines in its own
module (:mod:`imgvec.runtime.tensorflow_engine`, :mod:`imgvec.runtime.openvino_engine`, :mod:`imgvec.runtime.keras_backends`);
:mod:`imgvec.runtime.loader` picks one.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Protocol, Sequence

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


@dataclass(frozen=True)
class Calibration:
    """The images an int8 model is calibrated on: their keys under ``root`` and a sha256 over each key and
    its file's bytes (what the store's provenance and the model cache record). Picklable, for Ray workers.

    :meth:`pixels` decodes them as embedding does, after checking the files still hold those bytes, so a
    model rebuilt from a store's provenance (the cache was cleared) is calibrated on the same images.
    """

    root: str
    keys: tuple[str, ...]
    sha256: str
    max_pixels: int = 89_478_485  # files.images.DEFAULT_MAX_PIXELS

    @classmethod
    def of(cls, root: str, keys: Sequence[str], max_pixels: int = 89_478_485) -> "Calibration":
        """The calibration on ``keys`` (files under ``root``), its digest computed from their bytes now."""
        keys = tuple(keys)
        return cls(str(root), keys, calibration_digest(str(root), keys), max_pixels)

    def pixels(self, image_size: int) -> np.ndarray:
        """The sample decoded at ``image_size`` (files that do not decode are left out), ``(n, s, s, 3)`` uint8."""
        from imgvec.errors import BadInputError, ImageSkipped, MismatchError
        from imgvec.files.images import load_image

        if not self.root:
            raise MismatchError(f"the int8 model (calibrated on {len(self.keys)} images, sha256 {self.sha256[:12]}) is "
                                "not in the model cache; query the store itself, or run imgvec embed on its folder "
                                "again, to quantize it again from the images it recorded")
        try:
            same = calibration_digest(self.root, self.keys) == self.sha256
        except OSError as error:
            same, why = False, f"{error.filename or ''}: {error.strerror or error}"
        else:
            why = "their bytes changed"
        if not same:
            raise MismatchError(f"the int8 model was calibrated on {len(self.keys)} images under {self.root or '?'} "
                                f"(sha256 {self.sha256[:12]}), which are no longer the same ({why}) and it is not "
                                "in the model cache; embed into a new store with --precision int8")
        decoded = []
        for key in self.keys:
            try:
                decoded.append(load_image(os.path.join(self.root, key), image_size, self.max_pixels))
            except ImageSkipped:
                continue
        if not decoded:
            raise BadInputError(f"none of the {len(self.keys)} calibration images decodes: int8 needs at least one")
        return np.stack(decoded)


def calibration_digest(root: str, keys: Sequence[str]) -> str:
    """sha256 over each key and the sha256 of its file's bytes (OSError if one cannot be read)."""
    from imgvec.fileio import sha256_file

    listed = [[key, sha256_file(os.path.join(root, key))] for key in keys]
    return hashlib.sha256(json.dumps(listed).encode()).hexdigest()
