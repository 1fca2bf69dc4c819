from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from imgvec.backbones.registry import BACKBONES, Weights, get_backbone, parse_weights
from imgvec.backbones.builder import build_model, keras_cache_dir, preprocess_input
from imgvec.errors import BadInputError, MissingWeightsError

KERAS_ZOO = [
    "VGG16", "VGG19", "Xception", "ResNet50", "ResNet101", "ResNet152", "ResNet50V2", "ResNet101V2",
    "ResNet152V2", "InceptionV3", "InceptionResNetV2", "MobileNet", "MobileNetV2", "MobileNetV3Small",
    "MobileNetV3Large", "DenseNet121", "DenseNet169", "DenseNet201", "NASNetMobile", "NASNetLarge",
    *[f"EfficientNetB{i}" for i in range(8)],
    "EfficientNetV2B0", "EfficientNetV2B1", "EfficientNetV2B2", "EfficientNetV2B3", "EfficientNetV2S",
    "EfficientNetV2M", "EfficientNetV2L",
    "ConvNeXtTiny", "ConvNeXtSmall", "ConvNeXtBase", "ConvNeXtLarge", "ConvNeXtXLarge",
]


def test_registry_covers_the_whole_keras_zoo_with_lower_case_names():
    keras_rows = [b for b in BACKBONES.values() if b.weights_package is None]  # efficientnetlite0 is imgvec's own
    assert sorted(b.constructor for b in keras_rows) == sorted(KERAS_ZOO)
    assert all(name == name.lower() and name == b.name for name, b in BACKBONES.items())
    import keras

    for b in keras_rows:
        assert callable(getattr(keras.applications, b.constructor))
        assert preprocess_input(b) is getattr(keras.applications, b.module).preprocess_input


def test_get_backbone_is_forgiving_about_case_and_strict_about_names():
    assert get_backbone("EfficientNet-B0").name == "efficientnetb0"
    with pytest.raises(BadInputError, match="unknown model 'resnet9000'"):
        get_backbone("resnet9000")


def test_parse_weights(tmp_path: Path):
    assert parse_weights("imagenet") == Weights("imagenet")
    assert parse_weights("none", seed=3).identity == "random(seed=3)"
    f = tmp_path / "w.weights.h5"
    f.write_bytes(b"abc")
    w = parse_weights(str(f))
    assert w.kind == "file" and w.sha256 == hashlib.sha256(b"abc").hexdigest() and w.path == str(f)
    with pytest.raises(BadInputError, match="no such file"):
        parse_weights(str(tmp_path / "missing.h5"))
    with pytest.raises(BadInputError, match="expected imagenet, none"):
        parse_weights(str(tmp_path / "weights.bin"))


def test_keras_cache_dir_follows_keras_home(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    assert keras_cache_dir() == tmp_path / "models"
    monkeypatch.delenv("KERAS_HOME")
    assert keras_cache_dir() == Path.home() / ".keras" / "models"


def test_missing_imagenet_weights_names_the_file_and_where_to_put_it():
    # conftest points KERAS_HOME at an empty folder and HTTP(S) at a closed port.
    with pytest.raises(MissingWeightsError) as info:
        build_model(get_backbone("mobilenetv3small"), Weights("imagenet"), 96)
    message = str(info.value)
    assert "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5" in message
    assert str(keras_cache_dir()) in message and "weights none" in message  # the library names parameters
    assert "--weights none" in info.value.cli_message()  # the CLI, options
    assert "\n" not in message


IN_KERAS_CACHE = """
import os, sys, warnings
import numpy as np
os.environ["KERAS_HOME"] = sys.argv[1]
from imgvec.backbones.registry import Weights, get_backbone
from imgvec.backbones.builder import build_model
b = get_backbone("mobilenetv2")
reference = build_model(b, Weights("random", seed=7), 96)
os.makedirs(os.path.join(sys.argv[1], "models"))
with warnings.catch_warnings():  # Keras' ImageNet files are legacy HDF5 files
    warnings.simplefilter("ignore")
    reference.save(os.path.join(sys.argv[1], "models", sys.argv[2]))
def flat(model):
    return np.concatenate([w.ravel() for w in model.get_weights()])
built = build_model(b, Weights("imagenet"), 96)
other = build_model(b, Weights("random", seed=8), 96)
print(float(np.abs(flat(built) - flat(reference)).max()), float(np.abs(flat(other) - flat(reference)).max()))
"""


def test_imagenet_weights_found_in_keras_cache_are_used(tmp_path: Path):
    """A weights file in Keras' cache (KERAS_HOME/models) under the name Keras fetches is loaded, with no network.

    MobileNetV2's files carry no hash in Keras, so a stand-in file (random weights, seed 7) can take the
    name; the built model then holds exactly the stand-in's weights."""
    name = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_96_no_top.h5"
    out = subprocess.run([sys.executable, "-c", IN_KERAS_CACHE, str(tmp_path), name], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    same, other = map(float, out.stdout.split())
    assert same == 0.0 and other > 0.1  # every weight is the cached file's, not some other random ones


def _embedding_of_random_model(seed: int) -> np.ndarray:
    """Every weight of a seeded random model, then its output on fixed pixels, as one vector."""
    model = build_model(get_backbone("mobilenetv3small"), Weights("random", seed=seed), 64)
    x = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    parts = [w.ravel() for w in model.get_weights()] + [np.asarray(model(x, training=False)).ravel()]
    return np.concatenate(parts)


def test_random_weights_are_reproducible_across_processes():
    here = _embedding_of_random_model(0)
    code = (
        "import numpy as np, sys; sys.path.insert(0, %r); from test_backbones import _embedding_of_random_model as f; "
        "np.save(sys.stdout.buffer, f(0))" % str(Path(__file__).parent)
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True).stdout
    import io

    there = np.load(io.BytesIO(out))
    np.testing.assert_array_equal(here, there)
    assert not np.allclose(here, _embedding_of_random_model(1))


def test_local_weights_file_is_loaded(tmp_path: Path):
    source = build_model(get_backbone("mobilenetv3small"), Weights("random", seed=5), 64)
    path = tmp_path / "mine.weights.h5"
    source.save_weights(str(path))
    loaded = build_model(get_backbone("mobilenetv3small"), parse_weights(str(path)), 64)
    x = np.random.default_rng(1).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(source(x)), rtol=1e-5, atol=1e-6)


def test_wrong_weights_file_is_a_clear_error(tmp_path: Path):
    other = build_model(get_backbone("mobilenetv2"), Weights("random", seed=0), 64)
    path = tmp_path / "other.weights.h5"
    other.save_weights(str(path))
    with pytest.raises(MissingWeightsError, match="cannot load into mobilenetv3small"):
        build_model(get_backbone("mobilenetv3small"), parse_weights(str(path)), 64)


def test_too_small_input_is_refused_before_keras():
    with pytest.raises(BadInputError, match="too small for inceptionv3"):
        build_model(get_backbone("inceptionv3"), Weights("random", seed=0), 64)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_builds_with_its_table_dim_and_params(name: str):
    import keras

    b = BACKBONES[name]
    model = build_model(b, Weights("random", seed=0), max(b.min_size, 96))
    assert model.output_shape[-1] == b.dim
    assert model.count_params() == b.params
    keras.backend.clear_session()
