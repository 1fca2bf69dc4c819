"""How a set of embeddings was made, and the one place that decides whether two match.

Stores write a :class:`Provenance`; indexes and heads copy it; query and predict rebuild
the exact model from it. ``check_compatible`` is what every consumer calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from imgvec.backbones.registry import Weights
from imgvec.errors import MismatchError
from imgvec.versions import IMGVEC_VERSION


def _now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


@dataclass(frozen=True)
class Provenance:
    backbone: str
    weights: str  # "imagenet" | "random" | "file"
    weights_seed: int | None
    weights_path: str | None
    weights_sha256: str | None
    input_size: int
    preprocessing: str
    dim: int
    resize: str = "bilinear, aspect ratio not kept (as keras.utils.image_dataset_from_directory)"
    # Recorded, not compared: float32 and mixed-precision embeddings, CPU and GPU ones, and those of
    # every runtime (OpenVINO, TensorFlow, ...) are comparable. int8 is compared (see :meth:`key`).
    device: str = "cpu"
    precision: str = "float32"  # "float32" | "mixed" | "int8"; files made before int8 read as float32
    imgvec_version: str = IMGVEC_VERSION
    keras_version: str = ""
    tensorflow_version: str = ""  # empty when TensorFlow did not run the model
    runtime: str = ""  # "openvino" | "tensorflow" | "jax" | "torch"; empty in files made before runtimes
    runtime_version: str = ""
    created: str = field(default_factory=_now)
    # int8 only: the images the model was quantized on (a JSON list of keys under the store's root) and a
    # sha256 over each key and its file's bytes (runtime.engine.Calibration); empty for float precisions.
    calibration_sha256: str = ""
    calibration_keys: str = ""

    @property
    def quantization(self) -> str:
        """What the rows' model was quantized to: ``none``, or int8 and the calibration it was made on."""
        if self.precision != "int8":
            return "none"
        if not self.calibration_sha256:
            return "int8"
        return f"int8, calibrated on {len(self.calibration())} images (sha256 {self.calibration_sha256[:12]})"

    def calibration(self) -> list[str]:
        """The calibration keys, checked: a JSON list of at most :data:`MAX_CALIBRATION_KEYS` relative paths."""
        import json
        import os

        try:
            keys = json.loads(self.calibration_keys) if self.calibration_keys else []
        except (ValueError, RecursionError):
            keys = None
        if (not isinstance(keys, list) or len(keys) > MAX_CALIBRATION_KEYS
                or not all(isinstance(k, str) and k and not os.path.isabs(k) and os.pardir not in k.split("/")
                           for k in keys)):
            raise MismatchError("the int8 calibration recorded in the file is not a list of relative image paths: "
                                "the file is damaged or forged")
        return keys

    @property
    def weights_spec(self) -> Weights:
        return Weights(self.weights, self.weights_seed, self.weights_path, self.weights_sha256)

    @property
    def is_random(self) -> bool:
        return self.weights == "random"

    def key(self) -> dict[str, Any]:
        """The fields that decide whether two sets of embeddings live in the same space."""
        family = random_init_family(self.runtime)
        drawn = f" drawn by {family}" if self.is_random and family != "tensorflow" else ""
        return {
            "backbone": self.backbone,
            "weights": self.weights_spec.identity + drawn,
            "input_size": self.input_size,
            "preprocessing": self.preprocessing,
            "dim": self.dim,
            "quantization": self.quantization,
        }

    def describe(self) -> str:
        return f"{self.backbone} @ {self.input_size}px, {self.weights_spec.describe()}"


MAX_CALIBRATION_KEYS = 1000  # imgvec records at most 100


def random_init_family(runtime: str) -> str:
    """Whose random numbers seeded weights are: Keras' initialisers draw different ones on each
    backend (JAX, PyTorch, TensorFlow); OpenVINO converts TensorFlow's model, so shares its."""
    return runtime if runtime in ("jax", "torch") else "tensorflow"


def check_compatible(expected: Provenance, found: Provenance, expected_what: str, found_what: str,
                     fix: str = "") -> None:
    """Raise :class:`MismatchError` naming every field in which two provenances differ."""
    a, b = expected.key(), found.key()
    diffs = [f"{name}: {a[name]} vs {b[name]}" for name in a if a[name] != b[name]]
    if diffs:
        hint = f"; {fix}" if fix else ""
        raise MismatchError(
            f"{found_what} was not made like {expected_what} ({'; '.join(diffs)}){hint}"
        )
