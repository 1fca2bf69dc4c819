"""How Keras builds a registry backbone: headless, global-average-pooled, with its weights.

The registry (:mod:`imgvec.backbones.registry`) says what each backbone is; this module is the one that
imports Keras to make it. Every runtime builds its model here, so seeded random weights, weights
files and ImageNet weights (with their one-line errors) are handled the same way on each.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import random
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from imgvec.backbones.registry import Backbone, Weights
from imgvec.checks import check_image_size
from imgvec.backbones.device import import_keras
from imgvec.backbones.weights import check_weights_at_hand, keras_cache_dir, missing_weights  # noqa: F401 (keras_cache_dir: re-exported)
from imgvec.errors import BadInputError, MissingWeightsError, param

if TYPE_CHECKING:  # pragma: no cover
    import keras


def preprocess_input(backbone: Backbone) -> Callable[[Any], Any]:
    """The ``preprocess_input`` of ``backbone``'s keras.applications module."""
    return getattr(import_keras().applications, backbone.module).preprocess_input


def _missing_weights(backbone: Backbone, image_size: int, error: Exception) -> MissingWeightsError:
    """A download or cache file that failed inside Keras (a hash mismatch, a refused connection, a truncated file)."""
    return missing_weights(backbone, image_size, "could not be fetched")


# -- which weights file a build used --------------------------------------------------------
_OPENED: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("imgvec_opened", default=None)
_HOOKED = False


def _record_open(event: str, args: tuple[Any, ...]) -> None:
    if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        opened = _OPENED.get()
        if opened is not None:
            opened.append(os.fsdecode(args[0]))


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    """``{path: (size, mtime_ns)}`` of the regular files in ``folder`` (empty if there is none)."""
    try:
        with os.scandir(folder) as entries:
            return {e.path: (e.stat().st_size, e.stat().st_mtime_ns) for e in entries if e.is_file()}
    except OSError:
        return {}


@contextlib.contextmanager
def keras_weights_files() -> Iterator[list[str]]:
    """The files in Keras' cache folder (:func:`keras_cache_dir`) that the build inside used, oldest first.

    Found through what Keras visibly does there: a file new or changed between a listing of the folder
    before and one after (a download), or opened meanwhile (Keras reads a cached file to check its
    hash; Python's ``open`` audit event). A converted model records which file, with which hash, it holds.
    """
    global _HOOKED
    if not _HOOKED:
        sys.addaudithook(_record_open)
        _HOOKED = True
    folder = keras_cache_dir()
    before = _listing(folder)
    found: list[str] = []
    token = _OPENED.set([])
    try:
        yield found
    finally:
        opened = _OPENED.get() or []
        _OPENED.reset(token)
        after = _listing(folder)
        changed = [path for path, st in after.items() if before.get(path) != st]
        inside = {os.path.realpath(p) for p in after}
        used = [p for p in dict.fromkeys(os.path.realpath(p) for p in opened) if p in inside]
        found.extend(dict.fromkeys(used + [p for p in changed if os.path.realpath(p) not in used]))


# -- building ---------------------------------------------------------------------------------
@contextlib.contextmanager
def _python_random(seed: int) -> Iterator[None]:
    """Seed Python's ``random`` for one build, then give the caller back its state.

    Keras 3 initializers draw their seeds from Python's ``random`` (and nothing else), so this
    makes the weights a function of ``seed`` alone, where ``keras.utils.set_random_seed`` would
    also reseed the caller's ``random``, NumPy and TensorFlow global generators for good.
    """
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


def _refused(backbone: Backbone, image_size: int, error: ValueError) -> BadInputError:
    reason = str(error).splitlines()[0] if str(error) else "refused by Keras"
    return BadInputError(f"{backbone.name} cannot be built for {image_size}px inputs: {reason}")


def build_model(backbone: Backbone, weights: Weights, image_size: int) -> "keras.Model":
    """Build ``backbone`` without its classifier, global-average-pooled, for square inputs.

    Random weights depend on ``weights.seed`` only, and building leaves every global random
    generator as it was.
    """
    check_image_size(image_size, backbone)
    check_weights_at_hand(backbone, weights, image_size)  # no network: one line now, not Keras' download attempt
    keras = import_keras()
    constructor = getattr(keras.applications, backbone.constructor)
    kwargs = dict(include_top=False, pooling="avg", input_shape=(image_size, image_size, 3))
    # Keras prints download progress on stdout; keep stdout for results (json, csv).
    with contextlib.redirect_stdout(sys.stderr), _python_random(int(weights.seed or 0)):
        if weights.kind == "imagenet":
            try:
                return constructor(weights="imagenet", **kwargs)
            except ValueError as error:
                if "hash" in str(error) or "corrupted" in str(error):  # a damaged download or cache file
                    raise _missing_weights(backbone, image_size, error) from error
                raise _refused(backbone, image_size, error) from None
            except Exception as error:  # urllib, truncated cache file ...
                raise _missing_weights(backbone, image_size, error) from error
        try:
            model = constructor(weights=None, **kwargs)
        except ValueError as error:
            raise _refused(backbone, image_size, error) from None
        if weights.kind == "file":
            try:
                with warnings.catch_warnings():
                    # Keras only warns when parts of a file match nothing; a half-loaded model is an error.
                    warnings.filterwarnings("error", message=".*(Skipping|freshly-initialized|mismatch)")
                    model.load_weights(str(weights.path))
            except Exception as error:
                raise MissingWeightsError(
                    f"{param('weights')} {weights.path}: cannot load into {backbone.name} at "
                    f"{image_size}px ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
                ) from error
    return model


# -- random weights that behave like trained ones ------------------------------------------------
def _layers(model: Any) -> Iterator[Any]:
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from _layers(layer)


def calibrate(model: "keras.Model", backbone: Backbone, pixels: np.ndarray, seed: int = 0) -> "keras.Model":
    """Give a random ``model`` kernels drawn by numpy (``seed``) and BatchNorm statistics of ``pixels``.

    Random-init BatchNorm statistics (mean 0, variance 1) shrink activations layer by layer to
    ~1e-9..1e-12 in deep backbones, where any two runtimes "agree". One training-mode pass over
    ``pixels`` (uint8 images, ``(n, s, s, 3)``) with momentum 0 and dropout off sets each BatchNorm
    layer's moving statistics to those of its input, bringing activations to order 1 as in a trained
    network. Kernels come from numpy, not Keras' initialisers (whose seeded numbers differ per
    backend), so every backend makes nearly the same weights. Parity tests, benchmarks and the GPU
    check all calibrate with this; returns ``model``.
    """
    keras = import_keras()
    rng = np.random.default_rng(seed)
    for variable in model.trainable_weights:
        if len(variable.shape) >= 2:
            fan_in = int(np.prod(variable.shape[:-1]))
            variable.assign(rng.uniform(-1, 1, variable.shape).astype(np.float32) * np.sqrt(3 / fan_in))
    for layer in _layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.0  # moving statistics := this batch's statistics
        elif isinstance(layer, keras.layers.Dropout):
            layer.rate = 0.0
    model(preprocess_input(backbone)(np.asarray(pixels, np.float32)), training=True)
    return model


def calibrated_weights(backbone: Backbone, image_size: int, pixels: np.ndarray, path: str | os.PathLike[str],
                       seed: int = 0) -> Path:
    """Save :func:`calibrate`'d random weights of ``backbone`` at ``image_size`` to ``path`` (a ``.weights.h5``)."""
    model = build_model(backbone, Weights("random", seed=seed), image_size)
    calibrate(model, backbone, pixels, seed)
    model.save_weights(str(path))
    return Path(path)
