from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from imgvec.embedding.embedder import Embedder
from imgvec.errors import BadInputError, MismatchError
from imgvec.files.images import load_image


@pytest.fixture(scope="module")
def embedder(small) -> Embedder:
    return Embedder(**small, batch_size=4).load()


def test_files_come_back_in_order_with_bad_ones_skipped(embedder: Embedder, image_dir: Path, tmp_path: Path):
    paths = [str(p) for p in sorted(image_dir.rglob("*.png"))[:9]]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    paths.insert(5, str(bad))
    batches = list(embedder.embed_files(paths))
    assert [len(b.indices) + len(b.skipped) for b in batches] == [4, 4, 2]
    indices = np.concatenate([b.indices for b in batches])
    assert list(indices) == [i for i in range(10) if i != 5]
    assert [s.path for b in batches for s in b.skipped] == [str(bad)]
    emb = np.concatenate([b.embeddings for b in batches])
    assert emb.shape == (9, embedder.dim) and emb.dtype == np.float32
    # Same result as decoding by hand and calling the model on one batch: batching changes nothing.
    pixels = np.stack([load_image(paths[i], 64) for i in indices])
    np.testing.assert_allclose(emb, embedder.embed_arrays(pixels), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("runtime", ["openvino", "tensorflow"])
def test_cpu_model_calls_are_capped_and_change_nothing(small, runtime: str):
    from imgvec.runtime.loader import CPU_MODEL_BATCH

    big = Embedder(**small, batch_size=64, runtime=runtime).load()
    assert big.engine_.device == "cpu" and big.model_batch == big.engine_.model_batch
    assert big.model_batch in (CPU_MODEL_BATCH, 2 * CPU_MODEL_BATCH)  # OpenVINO splits its calls over two streams
    pixels = np.random.default_rng(1).integers(0, 256, (big.model_batch + 3, 64, 64, 3), dtype=np.uint8)
    assert Embedder(**small, batch_size=2, runtime=runtime).load().model_batch == 2
    one_call = np.concatenate([big.embed_arrays(pixels[i : i + 1]) for i in range(len(pixels))])
    np.testing.assert_allclose(big.embed_arrays(pixels), one_call, rtol=1e-4, atol=1e-5)


def test_embed_arrays_checks_shape(embedder: Embedder):
    with pytest.raises(BadInputError, match=r"expected images of shape \(n, 64, 64, 3\)"):
        embedder.embed_arrays(np.zeros((2, 32, 32, 3), np.uint8))
    assert embedder.embed_arrays(np.zeros((0, 64, 64, 3), np.uint8)).shape == (0, embedder.dim)


@pytest.mark.parametrize("runtime", ["tensorflow", "openvino"])
def test_preprocessing_matches_keras_preprocess_input(runtime: str):
    """Our uint8 -> preprocess_input -> model path, on either runtime, equals calling Keras the documented way."""
    from imgvec.backbones.registry import get_backbone, parse_weights
    from imgvec.backbones.builder import build_model

    e = Embedder("resnet50", "none", 32, batch_size=2, runtime=runtime).load()
    assert e.engine_.runtime == runtime
    import keras

    pixels = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    model = build_model(get_backbone("resnet50"), parse_weights("none"), 32)
    ref = model.predict(keras.applications.resnet.preprocess_input(pixels.astype("float32")), verbose=0)
    np.testing.assert_allclose(e.embed_arrays(pixels), ref, rtol=1e-4, atol=1e-4)


def test_parameters_are_validated_up_front():
    with pytest.raises(BadInputError, match="^batch_size must be at least 1"):
        Embedder("mobilenetv3small", "none", 64, batch_size=0)
    with pytest.raises(BadInputError, match="too small"):
        Embedder("xception", "none", 64)
    with pytest.raises(BadInputError, match="^runtime 'onnx': expected one of auto, openvino, tensorflow"):
        Embedder("mobilenetv3small", "none", 64, runtime="onnx")


def test_from_provenance_checks_the_weights_file(small, tmp_path: Path):
    from imgvec.backbones.registry import get_backbone, parse_weights
    from imgvec.backbones.builder import build_model

    f = tmp_path / "w.weights.h5"
    build_model(get_backbone("mobilenetv3small"), parse_weights("none"), 64).save_weights(str(f))
    e = Embedder("mobilenetv3small", parse_weights(str(f)), 64)
    prov = e.provenance()
    assert Embedder.from_provenance(prov).weights.sha256 == prov.weights_sha256
    f.rename(tmp_path / "moved.weights.h5")
    with pytest.raises(MismatchError, match="pass weights PATH"):
        Embedder.from_provenance(prov)
    assert Embedder.from_provenance(prov, weights_path=str(tmp_path / "moved.weights.h5")).weights.kind == "file"
    other = tmp_path / "other.weights.h5"
    build_model(get_backbone("mobilenetv3small"), parse_weights("none", seed=1), 64).save_weights(str(other))
    with pytest.raises(MismatchError, match="not the one the embeddings were made with"):
        Embedder.from_provenance(prov, weights_path=str(other))
