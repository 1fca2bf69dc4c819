"""Where and in what precision TensorFlow runs the backbone.

``--device auto`` uses a GPU when TensorFlow sees one (asked only when the kernel has an NVIDIA
GPU, so CPU-only machines never import TensorFlow to decide); GPU memory is grown on demand rather
than grabbed whole. ``--precision mixed`` builds the model under Keras' ``mixed_float16``
policy (float16 compute, float32 variables); embeddings leave the model as float32 either way.
``--precision int8`` is OpenVINO's post-training quantization (:mod:`imgvec.runtime.model_cache`),
not a Keras policy: Keras runtimes refuse it.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import tempfile
from typing import Any, Iterator

from imgvec.checks import check_choice
from imgvec.errors import BadInputError, param

DEVICES = ("auto", "cpu", "gpu")
PRECISIONS = ("float32", "mixed", "int8")


@contextlib.contextmanager
def _native_stderr_muted() -> Iterator[None]:
    """Send what native code writes to file descriptor 2 to a temporary file; replay it on error."""
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to protect
        yield
        return
    sys.stderr.flush()
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except KeyboardInterrupt:  # the user stopped it: TensorFlow's start-up lines explain nothing
            raise
        except BaseException:
            os.dup2(saved, 2)
            sink.seek(0)
            sys.stderr.write(sink.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def import_tensorflow() -> Any:
    """Import TensorFlow once, without its native start-up chatter on stderr.

    TensorFlow's C++ code logs (oneDNN, CUDA probing) before absl logging is set up, where
    TF_CPP_MIN_LOG_LEVEL does not reach it (tensorflow/tensorflow#100442); those lines are
    kept from the user unless the import itself fails.
    """
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        with _native_stderr_muted():
            import tensorflow as tf

            tf.config.list_physical_devices("GPU")  # the CUDA probe logs on machines without a GPU
    except ImportError as error:
        raise missing_package("tensorflow", "tensorflow", error) from None
    return tf


# The pip extra that installs each Keras backend's package.
BACKEND_EXTRAS = {"jax": "jax", "torch": "torch"}


def missing_package(package: str, backend: str, error: ImportError) -> BadInputError:
    """The one-line error for a Keras backend whose package is not installed."""
    install = f"pip install 'imgvec[{BACKEND_EXTRAS[backend]}]'" if backend in BACKEND_EXTRAS else f"pip install {package}"
    return BadInputError(f"the {backend} runtime needs the {package} package, which is not installed "
                         f"({error}); {install}")


def import_keras(backend: str | None = None) -> Any:
    """Keras running on ``backend`` (tensorflow, jax or torch).

    Keras fixes its backend when it is first imported, so a process has one: the first call
    sets ``KERAS_BACKEND`` (a value the user set is respected, and a different one refused),
    later calls must ask for the same one. ``None`` means the backend Keras already runs on,
    or TensorFlow if Keras is not imported yet. TensorFlow is imported quietly first.
    """
    if "keras" in sys.modules:
        keras = sys.modules["keras"]
        running = keras.backend.backend()
        if backend not in (None, running):
            raise BadInputError(f"Keras already runs on {running} in this process and a process has one Keras "
                                f"backend; run the {backend} runtime in a new process")
        return keras
    wanted = os.environ.get("KERAS_BACKEND")
    backend = backend or wanted or "tensorflow"
    if wanted and wanted != backend:
        raise BadInputError(f"KERAS_BACKEND={wanted} is set, but the {backend} runtime needs Keras on {backend}; "
                            f"unset KERAS_BACKEND or choose {param('runtime')} {wanted}")
    if backend == "tensorflow":
        import_tensorflow()
    else:
        if backend == "jax":  # like TensorFlow's memory growth: GPU memory as needed, not 75% of it up front
            os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        try:
            importlib.import_module(backend)
        except ImportError as error:
            raise missing_package(backend, backend, error) from None
    os.environ["KERAS_BACKEND"] = backend
    try:
        import keras
    finally:  # Keras reads it once, at import; subprocesses must not inherit imgvec's choice as the user's
        if wanted is None:
            del os.environ["KERAS_BACKEND"]
        else:
            os.environ["KERAS_BACKEND"] = wanted
    return keras


def visible_gpus() -> list[Any]:
    return list(import_tensorflow().config.list_physical_devices("GPU"))


def nvidia_driver_loaded() -> bool:
    """Whether this machine has an NVIDIA driver with a GPU, asked of the kernel, not of TensorFlow."""
    try:
        return bool(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return False


def gpu_in_use(device: str = "auto") -> bool:
    """Whether ``--device`` means a GPU: ``gpu``, or ``auto`` where TensorFlow sees one.

    TensorFlow is only asked (and imported) when the kernel has an NVIDIA GPU, so ``auto`` on a
    CPU-only machine decides without importing it.
    """
    check_choice(param("device"), device, DEVICES)
    return device == "gpu" or (device == "auto" and nvidia_driver_loaded() and bool(visible_gpus()))


def select_device(device: str = "auto") -> str:
    """The TensorFlow device name to build and run the model on (``/GPU:0`` or ``/CPU:0``)."""
    check_choice(param("device"), device, DEVICES)
    gpus = visible_gpus() if device != "cpu" else []
    if device == "gpu" and not gpus:
        raise BadInputError(f"{param('device')} gpu: TensorFlow sees no GPU (is a CUDA build of TensorFlow installed, "
                            f"e.g. pip install 'tensorflow[and-cuda]'?); use {param('device')} cpu")
    if not gpus:
        return "/CPU:0"
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
    keras = import_keras()
    check_choice(param("precision"), precision, PRECISIONS)
    if precision == "int8":
        raise BadInputError(f"{param('precision')} int8 runs on the openvino runtime only; use {param('runtime')} openvino")
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16" if precision == "mixed" else "float32")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)
