"""GPU code paths as far as a CPU-only machine can run them."""

from __future__ import annotations

import numpy as np
import pytest

from imgvec.backbones.device import precision_policy, select_device, visible_gpus
from imgvec.embedding.embedder import Embedder
from imgvec.errors import BadInputError

pytestmark = pytest.mark.skipif(bool(visible_gpus()), reason="these tests describe a machine without a GPU")


def test_device_choice_without_a_gpu():
    assert select_device("auto") == "/CPU:0" and select_device("cpu") == "/CPU:0"
    with pytest.raises(BadInputError, match="^device gpu: TensorFlow sees no GPU"):
        select_device("gpu")
    with pytest.raises(BadInputError, match="expected one of auto, cpu, gpu"):
        Embedder("mobilenetv3small", "none", 64, device="tpu")


def test_precision_policy_is_set_and_restored():
    import keras

    before = keras.mixed_precision.global_policy().name
    with precision_policy("mixed"):
        assert keras.mixed_precision.global_policy().name == "mixed_float16"
    assert keras.mixed_precision.global_policy().name == before
    with pytest.raises(BadInputError, match="expected one of float32, mixed"):
        with precision_policy("bfloat8"):
            pass


def test_mixed_precision_gives_float32_embeddings_close_to_float32():
    import keras

    pixels = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    # resnet50: its random-init features are large enough for float16 (MobileNets' underflow to 0)
    full = Embedder("resnet50", "none", 32, runtime="tensorflow").embed_arrays(pixels)
    mixed_embedder = Embedder("resnet50", "none", 32, precision="mixed", runtime="tensorflow")
    mixed = mixed_embedder.embed_arrays(pixels)  # the first batch passes the parity check against float32
    assert mixed.dtype == np.float32 and mixed.shape == full.shape
    assert keras.mixed_precision.global_policy().name == "float32"
    assert mixed_embedder.engine_.engine.model.layers[2].compute_dtype == "float16"
    cos = np.sum(full * mixed, 1) / (np.linalg.norm(full, axis=1) * np.linalg.norm(mixed, axis=1))
    assert cos.min() >= 0.999
    prov = mixed_embedder.provenance()
    assert (prov.device, prov.precision, prov.runtime) == ("cpu", "mixed", "tensorflow")


def test_mixed_precision_refuses_activations_float16_cannot_hold():
    # Random-weight MobileNetV2's activations shrink to ~1e-11, below float16's smallest value.
    pixels = np.random.default_rng(0).integers(0, 256, (2, 96, 96, 3), dtype=np.uint8)
    assert np.abs(Embedder("mobilenetv2", "none", 96, runtime="tensorflow").embed_arrays(pixels)).max() < 1e-8
    mixed = Embedder("mobilenetv2", "none", 96, precision="mixed", runtime="tensorflow")
    for _ in range(2):  # the refusal sticks: a second batch is not let through unchecked
        with pytest.raises(BadInputError, match="all-zero embeddings .*under precision mixed"):
            mixed.embed_arrays(pixels)
