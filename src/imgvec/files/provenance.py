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
    # every runtime (OpenVINO, TensorFlow, ...) are comparable.
    device: str = "cpu"
    precision: str = "float32"
    imgvec_version: str = IMGVEC_VERSION
    keras_version: str = ""
    tensorflow_version: str = ""  # empty when TensorFlow did not run the model
    runtime: str = ""  # "openvino" | "tensorflow" | "jax" | "torch"; empty in files made before runtimes
    runtime_version: str = ""
    created: str = field(default_factory=_now)

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
        }

    def describe(self) -> str:
        return f"{self.backbone} @ {self.input_size}px, {self.weights_spec.describe()}"


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
