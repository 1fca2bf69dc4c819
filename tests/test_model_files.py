"""The user's own model file (--model PATH): .keras, ONNX and OpenVINO IR, checked before they run.

A registry backbone (mobilenetv3small, 64 px, random weights with calibrated BatchNorm statistics, seed 0)
exported to .keras, ONNX (Keras' own ONNX export, tf2onnx underneath) and IR (openvino.save_model) must give
the registry's vectors. Tiny pooling models written with OpenVINO's opset or onnx.helper check each
preprocessing mode, the NCHW layout, outputs and the refusals (Lambda layers, external ONNX data, forged shapes).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from imgvec.cli import app

SIZE = 64


def run(*args, code: int = 0):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
    return result


def one_line_error(result, *words: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("imgvec: error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    """mobilenetv3small at 64 px with calibrated random weights: its weights file (for the registry) and the
    same model as .keras, ONNX (where Keras can export it) and OpenVINO IR."""
    import openvino as ov

    from imgvec.backbones.builder import build_model, calibrate
    from imgvec.backbones.registry import Weights, get_backbone

    from parity_util import calibration_images

    folder = tmp_path_factory.mktemp("exported")
    backbone = get_backbone("mobilenetv3small")
    model = build_model(backbone, Weights("random", seed=0), SIZE)
    calibrate(model, backbone, calibration_images(SIZE), 0)
    files = {"weights": folder / "mnv3.weights.h5", "keras": folder / "mnv3.keras", "xml": folder / "mnv3.xml"}
    model.save_weights(files["weights"])
    model.save(files["keras"])
    ov.save_model(ov.convert_model(model), files["xml"], compress_to_fp16=False)
    try:
        pytest.importorskip("tf2onnx")
        model.export(str(folder / "mnv3.onnx"), format="onnx", verbose=False)
        files["onnx"] = folder / "mnv3.onnx"
    except Exception:  # noqa: BLE001 - the ONNX parts skip below
        pass
    return files


def stored(store: Path) -> dict[str, np.ndarray]:
    from imgvec.vectors.store import open_store

    with open_store(store) as s:
        return dict(zip(s.paths(), s.embeddings()))


@pytest.mark.slow  # builds, calibrates and exports a backbone, converts it twice: about 2 minutes on 2 loaded cores
def test_exported_registry_backbone_gives_the_registry_vectors(exported, image_dir: Path, tmp_path: Path):
    """The target: the same network from a model file embeds as the registry backbone (cosine >= 0.9999)."""
    run("embed", image_dir, "-o", tmp_path / "registry.h5", "-m", "mobilenetv3small", "--weights", exported["weights"],
        "--image-size", SIZE)
    reference = stored(tmp_path / "registry.h5")
    assert min(np.linalg.norm(v) for v in reference.values()) > 1e-3  # calibrated: activations of order 1
    formats = ["keras", "xml"] + (["onnx"] if "onnx" in exported else [])
    for fmt in formats:
        r = run("embed", image_dir, "-o", tmp_path / f"{fmt}.h5", "--model", exported[fmt], "--preprocess", "none")
        assert f"model file {exported[fmt].name}" in r.stdout and "@ 64px" in r.stdout  # the size read from the model
        found = stored(tmp_path / f"{fmt}.h5")
        assert found.keys() == reference.keys()
        worst = min(cosines(reference[k][None], found[k][None])[0] for k in reference)
        print(f"{fmt}: lowest cosine to the registry's vectors {worst:.7f}")
        assert worst >= 0.9999, (fmt, worst)
    if "onnx" not in exported:
        pytest.skip("Keras could not export ONNX here (tf2onnx missing): .keras and IR checked")


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    """A small NCHW ONNX model (channel means of the scaled image), quick to embed with."""
    return onnx_model(tmp_path_factory.mktemp("onnx") / "means.onnx", ["N", 3, SIZE, SIZE])


@pytest.fixture(scope="module")
def model_store(tmp_path_factory, image_dir: Path, small_model: Path) -> Path:
    store = tmp_path_factory.mktemp("modelstore") / "photos.h5"
    r = run("embed", image_dir, "-o", store, "--model", small_model, "--preprocess", "torch")
    assert "24 images embedded" in r.stdout and f"model file {small_model.name}" in r.stdout
    return store


def test_embed_query_with_the_model_file(model_store: Path, image_dir: Path, small_model: Path, tmp_path: Path):
    photo = image_dir / "blues" / "blues_002.png"
    info = json.loads(run("info", model_store, "-f", "json").stdout)["provenance"]
    model = small_model
    assert info["weights"] == "model" and info["backbone"] == model.name and info["input_size"] == SIZE
    assert info["model_size"] == model.stat().st_size and info["model_preprocess"] == "torch"
    assert info["model_sha256"] == __import__("hashlib").sha256(model.read_bytes()).hexdigest()
    assert info["model_input"] == "NCHW [?,3,64,64] f32" and info["dim"] == 3
    assert info["preprocessing"] == "torch: scaled to [0, 1], ImageNet mean/std normalised"
    assert "flat index over 24 rows" in run("index", model_store).stdout  # the index carries the same provenance
    assert json.loads(run("info", model_store.with_suffix(".index.h5"), "-f", "json").stdout)["provenance"] == info
    hits = json.loads(run("query", model_store, photo, "-k", "3", "-f", "json").stdout)["queries"][0]["results"]
    assert hits[0]["path"].endswith("blues_002.png") and hits[0]["score"] > 0.9999
    moved = tmp_path / "elsewhere" / model.name  # the same bytes elsewhere: --model says where
    moved.parent.mkdir()
    shutil.copy(model, moved)
    hits2 = json.loads(run("query", model_store, photo, "-k", "3", "-f", "json", "--model", moved).stdout)
    assert [h["path"] for h in hits2["queries"][0]["results"]] == [h["path"] for h in hits]


def test_query_with_another_model_file_is_refused(model_store: Path, image_dir: Path, small_model: Path, tmp_path: Path):
    photo = image_dir / "blues" / "blues_002.png"
    other = ov_pool_model(tmp_path / "other.xml", [-1, SIZE, SIZE, 3])  # the same function, another file
    r = run("query", model_store, photo, "--model", other, code=3)
    one_line_error(r, str(other), "is not the one the embeddings were made with")
    r = run("embed", image_dir, "-o", model_store, "--model", other, "--preprocess", "torch", code=3)
    one_line_error(r, "model file sha256")
    r = run("embed", image_dir, "-o", model_store, "--model", small_model, "--preprocess", "tf", code=3)
    one_line_error(r, "preprocessing: torch: scaled to [0, 1], ImageNet mean/std normalised vs tf: scaled to [-1, 1]")
    r = run("embed", image_dir, "-o", model_store, "-m", "mobilenetv3small", "--weights", "none", code=3)
    one_line_error(r, "backbone: a model file vs mobilenetv3small")
    run("embed", image_dir, "-o", model_store, "--model", small_model)  # its own preprocessing, from the store
    head = tmp_path / "head.h5"
    run("train", model_store, "-o", head, "--cv", "3")
    r = run("predict", head, photo, "--model", other, code=3)
    one_line_error(r, "is not the one the embeddings were made with")
    assert "blues" in run("predict", head, photo, "-f", "json").stdout


def test_a_model_file_changed_since_the_store_is_named(tmp_path: Path, image_dir: Path):
    model = ov_pool_model(tmp_path / "pool.xml", [-1, SIZE, SIZE, 3])
    store = tmp_path / "s.h5"
    run("embed", image_dir / "reds", "-o", store, "--model", model, "--preprocess", "none")
    weights = bytearray(model.with_suffix(".bin").read_bytes())
    weights[0] ^= 1  # one bit of one constant
    model.with_suffix(".bin").write_bytes(bytes(weights))
    r = run("query", store, image_dir / "reds", code=3)
    one_line_error(r, f"model file {model} has changed since the embeddings were made")
    r = run("embed", image_dir, "-o", store, code=3)  # resuming the store: the same
    one_line_error(r, "has changed since the embeddings were made")


def test_lambda_layer_is_refused_in_one_line_and_never_run(tmp_path: Path, image_dir: Path):
    import keras

    marker = tmp_path / "ran"

    def side_effect(x):  # would leave a file behind if Keras ever called it
        open(marker, "w").close()
        return x

    inputs = keras.Input((16, 16, 3))
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(keras.layers.Lambda(side_effect, name="sneaky")(inputs)))
    path = tmp_path / "lambda.keras"
    model.save(path)
    marker.unlink(missing_ok=True)  # building the model traced the function once
    r = run("embed", image_dir, "-o", tmp_path / "s.h5", "--model", path, "--preprocess", "none", code=2)
    one_line_error(r, "'sneaky' is a Lambda layer")
    # Keras' own safe mode, behind imgvec's check of the config, refuses it too.
    from imgvec.backbones.modelfile import ModelBytes
    from imgvec.errors import BadInputError
    from imgvec.runtime.model_cache import _load_keras_file

    with pytest.raises(BadInputError, match="Keras cannot load it safely") as refused:
        _load_keras_file(ModelBytes(str(path), "keras", path.read_bytes()), "")
    assert "\n" not in str(refused.value)
    assert not marker.exists() and not (tmp_path / "s.h5").exists()


def test_keras_object_from_another_module_is_refused(tmp_path: Path, image_dir: Path):
    import zipfile

    config = {"module": "os", "class_name": "system", "config": {"name": "x"}, "registered_name": None}
    path = tmp_path / "custom.keras"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("config.json", json.dumps({"module": "keras", "class_name": "Functional", "config": {
            "layers": [config]}}))
    r = run("embed", image_dir, "-o", tmp_path / "s.h5", "--model", path, "--preprocess", "none", code=2)
    one_line_error(r, "comes from module 'os', not from Keras")


# -- tiny models for preprocessing, layouts, outputs and refusals --------------------------------
def ov_pool_model(path: Path, shape: list[int], layout: str = "NHWC") -> Path:
    """An IR that global-average-pools its input: the embedding is the preprocessed image's channel means."""
    import openvino as ov
    import openvino.opset13 as ops

    x = ops.parameter(shape, np.float32, name="pixels")
    out = ops.reduce_mean(x, ops.constant(np.array([1, 2] if layout == "NHWC" else [2, 3], np.int64)), False)
    ov.save_model(ov.Model([out], [x], "pool"), str(path), compress_to_fp16=False)
    return path


def onnx_model(path: Path, dims: list, outputs: str = "pooled", external: bool = False, forged: bool = False) -> Path:
    """An NCHW ONNX model: ``pooled`` (channel means), or also ``feature`` (a 4-D map) as a second output."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)
    axes = numpy_helper.from_array(np.array([2, 3], np.int64), "axes")
    scale = numpy_helper.from_array(np.full((1, 3, 1, 1), 2.0, np.float32), "scale")
    if forged:
        del axes.dims[:]
        axes.dims.extend([1 << 40])
    nodes = [helper.make_node("Mul", ["x", "scale"], ["feature"]),
             helper.make_node("ReduceMean", ["feature", "axes"], ["pooled"], keepdims=0)]
    outs = [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, None)]
    if outputs == "both":
        outs.append(helper.make_tensor_value_info("feature", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "g", [x], outs, initializer=[axes, scale])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=0)
    else:
        onnx.save_model(model, str(path))
    return path


@pytest.mark.parametrize("mode", ["none", "tf", "torch", "caffe"])
def test_preprocessing_modes_are_keras_ones(tmp_path: Path, mode: str):
    from keras.applications.imagenet_utils import preprocess_input

    from imgvec import Embedder

    pixels = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3)).astype(np.uint8)
    expected = (pixels.astype(np.float32) if mode == "none"
                else preprocess_input(pixels.astype(np.float32), mode=mode)).mean(axis=(1, 2))
    for layout, shape in (("NHWC", [-1, 16, 16, 3]), ("NCHW", [-1, 3, 16, 16])):
        model = ov_pool_model(tmp_path / f"pool-{layout}.xml", shape, layout)
        found = Embedder(str(model), preprocess=mode).embed_arrays(pixels)
        np.testing.assert_allclose(found, expected, rtol=1e-4, atol=1e-3)


def test_explicit_mean_std_and_onnx_nchw_with_two_outputs(tmp_path: Path):
    from imgvec import Embedder
    from imgvec.errors import BadInputError

    pixels = np.random.default_rng(1).integers(0, 256, (2, 16, 16, 3)).astype(np.uint8)
    model = onnx_model(tmp_path / "two.onnx", ["N", 3, 16, 16], outputs="both")
    with pytest.raises(BadInputError, match="has 2 outputs .*layer NAME"):
        Embedder(str(model), mean="0.5", std="0.25")
    expected = 2 * ((pixels / 255.0 - 0.5) / 0.25).mean(axis=(1, 2))
    for layer in ("pooled", "feature"):  # a 4-D output is pooled over H, W of the NCHW input
        embedder = Embedder(str(model), mean="0.5", std="0.25", layer=layer)
        np.testing.assert_allclose(embedder.embed_arrays(pixels), expected, rtol=1e-4, atol=1e-4)
        assert embedder.model_file.layout == "NCHW"
    with pytest.raises(BadInputError, match="no output or tensor of that name"):
        Embedder(str(model), preprocess="tf", layer="nothing")


def test_a_ray_worker_rebuilds_the_embedder_pinned_to_the_bytes_read(tmp_path: Path):
    """What Ray workers get (Embedder.config) names the file and pins its sha256: a file changed meanwhile is refused."""
    from imgvec import Embedder
    from imgvec.errors import MismatchError

    model = ov_pool_model(tmp_path / "pool.xml", [-1, 16, 16, 3])
    embedder = Embedder(str(model), preprocess="caffe")
    again = Embedder.from_config(embedder.config)
    assert again.key_provenance() == embedder.key_provenance() and again.model_file.sha256 == embedder.model_file.sha256
    pixels = np.full((1, 16, 16, 3), 7, np.uint8)
    np.testing.assert_array_equal(again.embed_arrays(pixels), embedder.embed_arrays(pixels))
    model.with_suffix(".bin").write_bytes(model.with_suffix(".bin").read_bytes()[::-1])
    with pytest.raises(MismatchError, match="other bytes"):
        Embedder.from_config(embedder.config)


def test_the_api_takes_model_and_preprocess(tmp_path: Path, image_dir: Path):
    import imgvec

    model = ov_pool_model(tmp_path / "pool.xml", [-1, 32, 32, 3])
    summary = imgvec.embed([image_dir / "reds"], tmp_path / "s.h5", model=str(model), mean="0.5", std="0.5")
    assert summary.added == 6 and summary.provenance.model_preprocess == "mean=0.5,0.5,0.5;std=0.5,0.5,0.5"
    assert summary.provenance.preprocessing == "custom: scaled to [0, 1], mean 0.5,0.5,0.5, std 0.5,0.5,0.5 (RGB)"
    r = imgvec.query(tmp_path / "s.h5", [image_dir / "reds"], k=1, model=model)
    assert len(r.queries) == 6 and all(q.results[0].score > 0.999 for q in r.queries)  # each finds itself (or a twin)


def test_a_model_that_fixes_its_batch_size_gets_that_many_images_a_request(tmp_path: Path):
    """A PyTorch-style export with batch 1 baked into a Reshape cannot take a dynamic batch: it runs one at a time."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    from imgvec import Embedder

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])
    consts = [numpy_helper.from_array(np.array([2, 3], np.int64), "axes"),
              numpy_helper.from_array(np.array([1, 3], np.int64), "shape")]
    nodes = [helper.make_node("ReduceMean", ["x", "axes"], ["m"], keepdims=0),
             helper.make_node("Reshape", ["m", "shape"], ["out"])]
    graph = helper.make_graph(nodes, "g", [x], [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3])],
                              initializer=consts)
    path = tmp_path / "batch1.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    embedder = Embedder(str(path), preprocess="none")
    assert embedder.model_file.batch == 1
    pixels = np.random.default_rng(2).integers(0, 256, (5, 16, 16, 3)).astype(np.uint8)
    np.testing.assert_allclose(embedder.embed_arrays(pixels), pixels.mean(axis=(1, 2)), rtol=1e-5)


def test_image_size_read_from_the_model_or_required(tmp_path: Path):
    from imgvec import Embedder
    from imgvec.errors import BadInputError

    fixed = ov_pool_model(tmp_path / "fixed.xml", [-1, 32, 32, 3])
    assert Embedder(str(fixed), preprocess="tf").image_size == 32
    with pytest.raises(BadInputError, match="takes 32x32 px images only"):
        Embedder(str(fixed), preprocess="tf", image_size=64)
    free = ov_pool_model(tmp_path / "free.xml", [-1, -1, -1, 3])
    with pytest.raises(BadInputError, match="give image_size"):
        Embedder(str(free), preprocess="tf")
    assert Embedder(str(free), preprocess="tf", image_size=48).embed_arrays(np.zeros((1, 48, 48, 3), np.uint8)).shape == (1, 3)
    with pytest.raises(BadInputError, match="does not say how its pixels were scaled"):
        Embedder(str(fixed))
    with pytest.raises(BadInputError, match="for a model file"):
        Embedder("mobilenetv3small", preprocess="tf")


def test_onnx_with_external_data_is_refused(tmp_path: Path, image_dir: Path):
    model = onnx_model(tmp_path / "ext.onnx", ["N", 3, 16, 16], external=True)
    assert (tmp_path / "ext.onnx.data").exists()
    r = run("embed", image_dir, "-o", tmp_path / "s.h5", "--model", model, "--preprocess", "none", code=2)
    one_line_error(r, "keeps its data in an external file")


@pytest.mark.parametrize("case", ["huge input", "rank 3", "two channels", "forged tensor", "not onnx", "ir outside bin"])
def test_forged_shapes_are_refused_before_anything_runs(tmp_path: Path, image_dir: Path, case: str):
    if case == "huge input":
        model, words = ov_pool_model(tmp_path / "m.xml", [1, 100_000, 100_000, 3]), "claims 100000x100000 px inputs"
    elif case == "rank 3":
        model, words = ov_pool_model(tmp_path / "m.xml", [-1, 64, 3]), "not a 4-D image batch"
    elif case == "two channels":
        model, words = ov_pool_model(tmp_path / "m.xml", [-1, 64, 64, 2]), "cannot tell the channels"
    elif case == "forged tensor":
        model, words = onnx_model(tmp_path / "m.onnx", ["N", 3, 16, 16], forged=True), "more data than the whole file"
    elif case == "not onnx":
        model, words = tmp_path / "m.onnx", "not a readable ONNX model"
        model.write_bytes(b"\xff" * 64)
    else:
        model = ov_pool_model(tmp_path / "m.xml", [-1, 16, 16, 3])
        text = model.read_text()
        model.write_text(text.replace('offset="0"', 'offset="1000000"', 1))
        words = "of a 16-byte .bin: forged or damaged"
    r = run("embed", image_dir, "-o", tmp_path / "s.h5", "--model", model, "--preprocess", "none", code=2)
    one_line_error(r, words)
    assert not (tmp_path / "s.h5").exists()


def test_model_file_provenance_reads_without_the_registry_and_is_checked():
    from imgvec.errors import BadInputError, MismatchError
    from imgvec.files.header import read_provenance
    from imgvec.files.provenance import Provenance, check_compatible

    made = Provenance("mine.onnx", "model", None, None, None, 64, "tf: scaled to [-1, 1]", 576, model_format="onnx",
                      model_path="/m/mine.onnx", model_size=1000, model_sha256="a" * 64, model_preprocess="tf",
                      model_layer="", model_input="NCHW [?,3,64,64] f32", model_output="'out' [?,576]")
    attrs = {k: v for k, v in vars(made).items() if v is not None}
    assert read_provenance(attrs, "x.h5") == made
    with pytest.raises(BadInputError, match="model_sha256"):
        read_provenance({**attrs, "model_sha256": "not a digest"}, "x.h5")
    with pytest.raises(BadInputError, match="model-file attributes on a mobilenetv3small"):
        read_provenance({**attrs, "backbone": "mobilenetv3small", "weights": "imagenet"}, "x.h5")
    renamed = Provenance(**{**vars(made), "backbone": "renamed.onnx", "model_path": "/elsewhere/renamed.onnx"})
    check_compatible(made, renamed, "store", "query")  # the content decides, not the name or place
    other = Provenance(**{**vars(made), "model_sha256": "b" * 64})
    with pytest.raises(MismatchError, match="model file sha256"):
        check_compatible(made, other, "store", "query")
    registry = Provenance("mobilenetv3small", "random", 0, None, None, 64, "in model", 576)
    with pytest.raises(MismatchError, match="backbone: a model file vs mobilenetv3small"):
        check_compatible(made, registry, "store", "query")
    assert "model_sha256" not in registry.json_fields() and made.json_fields()["model_sha256"] == "a" * 64


def test_a_query_with_an_onnx_model_file_never_imports_tensorflow(model_store: Path, image_dir: Path):
    import subprocess
    import sys

    code = ("import sys, imgvec; r = imgvec.query(sys.argv[1], [sys.argv[2]], k=1); "
            "print(len(r.queries), 'tensorflow' in sys.modules, 'keras' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(model_store), str(image_dir / "reds")], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["6", "False", "False"]
