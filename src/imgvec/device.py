"""Where and in what precision TensorFlow runs the backbone.

``--device auto`` uses a GPU when TensorFlow sees one; GPU memory is grown on demand rather
than grabbed whole. ``--precision mixed`` builds the model under Keras' ``mixed_float16``
policy (float16 compute, float32 variables); embeddings leave the model as float32 either way.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from .errors import BadInputError

DEVICES = ("auto", "cpu", "gpu")
PRECISIONS = ("float32", "mixed")


def check_choice(option: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise BadInputError(f"{option} {value!r}: expected one of {', '.join(choices)}")
    return value


def visible_gpus() -> list[Any]:
    from .embedder import import_tensorflow

    return list(import_tensorflow().config.list_physical_devices("GPU"))


def select_device(device: str = "auto") -> str:
    """The TensorFlow device name to build and run the model on (``/GPU:0`` or ``/CPU:0``)."""
    check_choice("--device", device, DEVICES)
    gpus = visible_gpus() if device != "cpu" else []
    if device == "gpu" and not gpus:
        raise BadInputError("--device gpu: TensorFlow sees no GPU (is a CUDA build of TensorFlow installed, "
                            "e.g. pip install 'tensorflow[and-cuda]'?); use --device cpu")
    if not gpus:
        return "/CPU:0"
    from .embedder import import_tensorflow

    tf = import_tensorflow()
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # the GPU was already initialised by an earlier model: growth is fixed by then
            pass
    return "/GPU:0"


@contextlib.contextmanager
def precision_policy(precision: str = "float32") -> Iterator[None]:
    """Build layers under ``precision``; the previous global Keras policy is restored afterwards."""
    import keras

    check_choice("--precision", precision, PRECISIONS)
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16" if precision == "mixed" else "float32")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)
