"""How a set of embeddings was made, and the one place that decides whether two match.

Stores write a :class:`Provenance`; indexes and heads copy it; query and predict rebuild
the exact model from it. ``check_compatible`` is what every consumer calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
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

    # A model file (--model PATH; weights "model"): None for a registry backbone, and then not written, so
    # older imgvec reads such files as before. ``backbone`` is then the file's name.
    model_format: str | None = None  # keras | onnx | openvino
    model_path: str | None = None  # where it was (absolute); query/predict look there unless told
    model_size: int | None = None  # bytes (an IR: .xml and .bin together)
    model_sha256: str | None = None  # an IR: sha256 of the .xml's sha256 digest followed by the .bin's
    model_preprocess: str | None = None  # what --preprocess (or --mean/--std) reproduces ``preprocessing``
    model_layer: str | None = None  # the output or tensor taken (--layer); "" for the model's output
    model_input: str | None = None  # the model's input as read from it: layout, shape, type
    model_output: str | None = None  # the embedding: which output, its shape, and whether it was pooled

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

    @property
    def is_model_file(self) -> bool:
        return self.weights == "model"

    def json_fields(self) -> dict[str, Any]:
        """Its fields as JSON prints them; a registry backbone's without the (unset) model-file fields."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if not (f.name.startswith("model_") and getattr(self, f.name) is None)}

    def key(self) -> dict[str, Any]:
        """The fields that decide whether two sets of embeddings live in the same space."""
        family = random_init_family(self.runtime)
        drawn = f" drawn by {family}" if self.is_random and family != "tensorflow" else ""
        key = {
            "backbone": "a model file" if self.is_model_file else self.backbone,
            "weights": self.weights_spec.identity + drawn,
            "input_size": self.input_size,
            "preprocessing": self.preprocessing,
            "dim": self.dim,
            "quantization": self.quantization,
        }
        if self.is_model_file:  # the file's content, not its name or place, and which of its outputs
            key.update({"model file sha256": self.model_sha256, "layer": self.model_layer or "its output"})
        return key

    def describe(self) -> str:
        if self.is_model_file:
            return (f"model file {self.backbone} (sha256 {str(self.model_sha256)[:12]}...) @ {self.input_size}px, "
                    f"preprocessing {self.model_preprocess}")
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
    diffs = [f"{name}: {a.get(name, 'none')} vs {b.get(name, 'none')}" for name in {**a, **b}
             if a.get(name, "none") != b.get(name, "none")]
    if diffs:
        hint = f"; {fix}" if fix else ""
        raise MismatchError(
            f"{found_what} was not made like {expected_what} ({'; '.join(diffs)}){hint}"
        )
