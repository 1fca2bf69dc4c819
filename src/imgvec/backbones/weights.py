"""Whether a backbone's ImageNet weights are at hand, and whether there is a network to fetch them.

Keras downloads a backbone's weights the first time it is built and keeps them in its cache
(:func:`keras_cache_dir`). This module knows, without importing Keras, which file a build loads
(:func:`imagenet_weights_file`), so a command can tell before anything slow happens whether it
needs a download, and a machine without a network gets one line at once instead of Keras'
"Downloading data from ..." and a failure seconds later (:func:`check_weights_at_hand`). The
network is asked once per process: a TCP connection to the weights' host (or the HTTPS proxy
urllib would use) within :data:`PROBE_SECONDS`. ``IMGVEC_OFFLINE=1`` says there is none without
asking, ``IMGVEC_OFFLINE=0`` skips the question (Keras then tries the download itself).
"""

from __future__ import annotations

import functools
import os
import socket
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Sequence

from imgvec.backbones.registry import Backbone, Weights
from imgvec.errors import MissingWeightsError, param

PROBE_SECONDS = 0.5
OFFLINE_ENV = "IMGVEC_OFFLINE"
_KERAS = "https://storage.googleapis.com/tensorflow/keras-applications/"


def keras_cache_dir() -> Path:
    """Where Keras caches downloaded weights: $KERAS_HOME/models, else ~/.keras/models."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(home) / "models"


def _kernels(stem: str, folder: str) -> tuple[str, str]:
    name = f"{stem}_weights_tf_dim_ordering_tf_kernels_notop.h5"
    return name, f"{_KERAS}{folder}/{name}"


def imagenet_weights_file(backbone: Backbone, image_size: int | None = None) -> tuple[str, str] | None:
    """(file name in :func:`keras_cache_dir`, URL) of the no-top ImageNet weights Keras loads to build
    ``backbone`` at ``image_size`` (as keras.applications names them); None where Keras downloads nothing.

    tests/test_backbones.py checks these against what Keras itself asks for.
    """
    size = int(image_size or backbone.input_size)
    name, module = backbone.name, backbone.module
    if module in ("vgg16", "vgg19", "xception", "inception_v3", "inception_resnet_v2"):
        return _kernels(module, module)
    if module == "densenet":
        return _kernels(name, "densenet")
    if module in ("resnet", "resnet_v2"):
        return _kernels(name, "resnet")
    if module == "mobilenet":  # other sizes load the 224 px weights (Keras warns)
        rows = size if size in (128, 160, 192, 224) else 224
        file = f"mobilenet_1_0_{rows}_tf_no_top.h5"
        return file, f"{_KERAS}mobilenet/{file}"
    if module == "mobilenet_v2":
        rows = size if size in (96, 128, 160, 192, 224) else 224
        file = f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_{rows}_no_top.h5"
        return file, f"{_KERAS}mobilenet_v2/{file}"
    if module == "mobilenet_v3":
        file = f"weights_mobilenet_v3_{name.removeprefix('mobilenetv3')}_224_1.0_float_no_top_v2.h5"
        return file, f"{_KERAS}mobilenet_v3/{file}"
    if module == "nasnet":
        kind = name.removeprefix("nasnet")
        return f"nasnet_{kind}_no_top.h5", f"{_KERAS}nasnet/NASNet-{kind}-no-top.h5"
    if module == "efficientnet":
        return f"{name}_notop.h5", f"https://storage.googleapis.com/keras-applications/{name}_notop.h5"
    if module == "efficientnet_v2":
        file = f"efficientnetv2-{name.removeprefix('efficientnetv2')}_notop.h5"
        return file, f"{_KERAS}efficientnet_v2/{file}"
    if module == "convnext":
        file = f"convnext_{name.removeprefix('convnext')}_notop.h5"
        return file, f"{_KERAS}convnext/{file}"
    return None


def weights_at_hand(backbone: Backbone, image_size: int | None = None) -> bool:
    """Whether ``backbone`` builds with ImageNet weights without a download: its file is in Keras' cache,
    or Keras downloads nothing for it. What a default backbone for machines without a network needs."""
    file = imagenet_weights_file(backbone, image_size)
    return file is None or (keras_cache_dir() / file[0]).is_file()


def _proxy_for(url: str) -> tuple[str, int] | None:
    """The (host, port) of the proxy urllib would send ``url`` through, or None."""
    host = urllib.parse.urlsplit(url).hostname or ""
    proxy = urllib.request.getproxies().get(urllib.parse.urlsplit(url).scheme)
    if not proxy or urllib.request.proxy_bypass(host):
        return None
    parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    return (parts.hostname or "", parts.port or 80) if parts.hostname else None


@functools.lru_cache(maxsize=None)
def _unreachable(host: str, port: int, what: str) -> str | None:
    try:
        with socket.create_connection((host, port), timeout=PROBE_SECONDS):
            return None
    except OSError as error:
        why = "timed out" if isinstance(error, TimeoutError) else (error.strerror or type(error).__name__)
        return f"no connection to {what}{host}:{port}: {why}"


def no_network(url: str) -> str | None:
    """Why ``url`` cannot be fetched here (no network), or None when it can be tried.

    Asked once per process and host: a TCP connection within :data:`PROBE_SECONDS`, through the
    proxy urllib would use. ``IMGVEC_OFFLINE=1`` answers "offline" and ``IMGVEC_OFFLINE=0`` None, without asking.
    """
    setting = os.environ.get(OFFLINE_ENV, "").strip()
    if setting == "1":
        return f"{OFFLINE_ENV}=1 is set"
    if setting == "0":
        return None
    proxy = _proxy_for(url)
    if proxy is not None:
        return _unreachable(*proxy, "the HTTPS proxy ")
    parts = urllib.parse.urlsplit(url)
    return _unreachable(parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80), "")


def missing_weights(backbone: Backbone, image_size: int | None, reason: str,
                    alternatives: str | None = None) -> MissingWeightsError:
    """The one-line error for ImageNet weights of ``backbone`` that cannot be had, ``reason`` saying why.

    ``alternatives`` replaces the usual remedies (a weights file, or random weights) where a command takes others.
    """
    file = imagenet_weights_file(backbone, image_size)
    fname = f"{file[0]} (from {file[1]})" if file else f"the {backbone.constructor} no-top file"
    return MissingWeightsError(
        f"ImageNet weights for {backbone.name} {reason}: put {fname} in {keras_cache_dir()}/ "
        "(set KERAS_HOME to move it), or "
        + (alternatives or f"pass {param('weights')} PATH to a local weights file, or {param('weights')} none "
           "for random (not pretrained) weights")
    )


def check_weights_at_hand(backbone: Backbone, weights: Weights, image_size: int | None = None,
                          alternatives: str | None = None) -> None:
    """Refuse at once, before Keras is imported, a build that needs ImageNet weights from a network there is not."""
    check_all_at_hand([(backbone, image_size)], weights, alternatives)


def check_all_at_hand(builds: Sequence[tuple[Backbone, int | None]], weights: Weights,
                      alternatives: str | None = None) -> None:
    """:func:`check_weights_at_hand` for several builds (``(backbone, image_size)``): one line naming every file missing."""
    if weights.kind != "imagenet":
        return
    missing = [(b, size) for b, size in builds if not weights_at_hand(b, size)]
    files = [imagenet_weights_file(b, size) for b, size in missing]
    reason = next((r for r in (no_network(f[1]) for f in files if f) if r), None)
    if not missing or reason is None:
        return
    why = f"are not in Keras' cache and there is no network to download them ({reason})"
    if len(missing) == 1:
        raise missing_weights(*missing[0], why, alternatives)
    names = ", ".join(b.name for b, _ in missing)
    shown = ", ".join(f[0] for f in files if f)
    raise MissingWeightsError(f"ImageNet weights for {names} {why}: put {shown} in {keras_cache_dir()}/ "
                              f"(set KERAS_HOME to move it), or "
                              + (alternatives or f"{param('weights')} none for random (not pretrained) weights"))
