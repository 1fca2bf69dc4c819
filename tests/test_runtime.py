"""Runtimes: OpenVINO against TensorFlow (parity), the compiled-model cache, and queries without TensorFlow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import imgvec
from imgvec import runtime
from imgvec.backbones import BACKBONES, get_backbone, parse_weights
from imgvec.cli import app
from imgvec.errors import BadInputError
from imgvec.runtime import cache_key, compiled_model, entry_path, load_engine, row_cosines
from imgvec.store import open_store

from parity_util import calibrated_weights  # one BatchNorm calibration for every parity test

SMALL_ARGS = ["-m", "mobilenetv3small", "--weights", "none", "--image-size", "64"]


def pixels(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def assert_parity(name: str, size: int, folder: Path) -> None:
    weights = parse_weights(str(calibrated_weights(name, size, folder / f"{name}-{size}.weights.h5")))
    x = pixels(6, size, seed=1)
    ref = load_engine("tensorflow", name, weights, size)(x)
    ours = load_engine("openvino", name, weights, size)
    assert ours.runtime == "openvino"
    out = ours(x)
    assert out.shape == ref.shape == (6, get_backbone(name).dim) and out.dtype == np.float32
    assert np.linalg.norm(ref, axis=1).min() > 1e-2, "activations vanished: the parity check would mean nothing"
    assert row_cosines(out, ref).min() >= 0.99999


@pytest.mark.parametrize("name,size", [("mobilenetv2", 96), ("efficientnetb0", 64), ("mobilenetv3small", 64)])
def test_openvino_matches_tensorflow(name: str, size: int, tmp_path: Path):
    assert_parity(name, size, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_openvino_matches_tensorflow_for_every_backbone(name: str, tmp_path: Path):
    assert_parity(name, max(get_backbone(name).min_size, 64), tmp_path)
    runtime.release_engines()


# -- choosing a runtime ------------------------------------------------------------------------
def test_auto_is_openvino_on_the_cpu_and_tensorflow_on_a_gpu():
    assert runtime.resolve_runtime("auto", "cpu") == "openvino"
    assert runtime.resolve_runtime("auto", "gpu") == "tensorflow"
    assert runtime.resolve_runtime("tensorflow", "cpu") == "tensorflow"
    with pytest.raises(BadInputError, match="^runtime 'onnx': expected one of auto, openvino, tensorflow, jax, torch"):
        runtime.resolve_runtime("onnx", "cpu")
    with pytest.raises(BadInputError, match="^runtime openvino runs on the CPU"):
        load_engine("openvino", "mobilenetv3small", "none", 64, device="gpu")


def test_keras_backends_are_table_rows_that_load_lazily(monkeypatch):
    import importlib

    real = importlib.import_module

    def missing(name: str, package: str | None = None):
        if name == ".keras_backends":
            raise ModuleNotFoundError("no module", name="imgvec.keras_backends")
        return real(name, package)

    monkeypatch.setattr(importlib, "import_module", missing)
    with pytest.raises(BadInputError, match="^runtime jax is not available in this version of imgvec$"):
        load_engine("jax", "mobilenetv3small", "none", 64)
    assert set(runtime.LOADERS) == set(runtime.RUNTIMES) - {"auto"}


def test_engines_are_kept_for_the_process_until_released():
    a = load_engine("openvino", "mobilenetv3small", "none", 64)
    assert load_engine("openvino", "mobilenetv3small", parse_weights("none"), 64) is a
    assert load_engine("openvino", "mobilenetv3small", "none", 64, device="cpu") is not a  # another key
    assert imgvec.release_models() >= 2
    assert load_engine("openvino", "mobilenetv3small", "none", 64) is not a


def test_mixed_precision_must_match_float32_on_the_first_batch(tmp_path: Path):
    """bfloat16 on OpenVINO is opt-in and refused when the first batch disagrees with float32."""
    weights = parse_weights(str(calibrated_weights("mobilenetv3small", 32, tmp_path / "w.weights.h5")))
    mixed = load_engine("openvino", "mobilenetv3small", weights, 32, precision="mixed")
    x = pixels(4, 32)
    try:
        out = mixed(x)
    except BadInputError as refusal:  # random weights lose precision in bfloat16 (MobileNetV2: cosine 0.985)
        assert "precision mixed (openvino); use precision float32" in str(refusal)
        assert "differ from float32 on the first batch" in str(refusal) and "\n" not in str(refusal)
        with pytest.raises(BadInputError, match="differ from float32"):
            mixed(x)  # the refusal sticks
    else:
        ref = load_engine("openvino", "mobilenetv3small", weights, 32)(x)
        assert row_cosines(out, ref).min() >= runtime.PARITY_MIN_COSINE


def test_a_backbone_that_does_not_convert_falls_back_to_tensorflow(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("IMGVEC_CACHE_DIR", str(tmp_path))
    calls = []

    def cannot(*args):
        calls.append(args)
        raise runtime.ConversionFailed("OpConversionFailure: no converter for op Foo")

    monkeypatch.setattr(runtime, "_convert", cannot)
    for _ in range(2):
        runtime.release_engines()
        with pytest.warns(runtime.RuntimeNote, match="mobilenetv3small does not convert to OpenVINO .*Foo.*TensorFlow"):
            engine = load_engine("auto", "mobilenetv3small", "none", 64, device="cpu")
        assert engine.runtime == "tensorflow"
    assert len(calls) == 1  # the failure is remembered in the cache: no second attempt
    (entry,) = imgvec.cache().entries
    assert not entry.ok and "no converter for op Foo" in entry.error
    runtime.release_engines()


# -- the compiled-model cache ------------------------------------------------------------------
def test_cache_folder_follows_the_conventions(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("IMGVEC_CACHE_DIR", str(tmp_path / "mine"))
    assert runtime.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("IMGVEC_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert runtime.cache_dir() == tmp_path / "xdg" / "imgvec"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert runtime.cache_dir() == tmp_path / "home" / ".cache" / "imgvec"


def test_cache_key_changes_with_everything_that_changes_the_output(monkeypatch, tmp_path: Path):
    f1, f2 = tmp_path / "a.weights.h5", tmp_path / "b.weights.h5"
    f1.write_bytes(b"one")
    f2.write_bytes(b"two")
    bb, w = get_backbone("mobilenetv2"), parse_weights("none")
    base = entry_path(bb, w, 96)
    variants = [entry_path(get_backbone("mobilenetv3small"), w, 96), entry_path(bb, parse_weights("none", 1), 96),
                entry_path(bb, parse_weights("imagenet"), 96), entry_path(bb, parse_weights(str(f1)), 96),
                entry_path(bb, parse_weights(str(f2)), 96), entry_path(bb, w, 128)]
    monkeypatch.setattr(runtime, "WRAPPER_VERSION", runtime.WRAPPER_VERSION + 1)
    variants.append(entry_path(bb, w, 96))
    monkeypatch.undo()
    for dist in ("openvino", "keras"):
        with monkeypatch.context() as m:
            m.setattr(runtime, "dist_version", lambda d, dist=dist: "0.0" if d == dist else runtime.metadata.version(d))
            variants.append(entry_path(bb, w, 96))
    assert len({base, *variants}) == len(variants) + 1
    assert entry_path(bb, parse_weights("none"), 96) == base  # and nothing else does
    moved = tmp_path / "moved.weights.h5"
    f1.rename(moved)
    assert entry_path(bb, parse_weights(str(moved)), 96) == variants[3]  # the file's bytes count, not its place
    assert cache_key(bb, w, 96)["input_size"] == 96


# The cache's own mechanics are tested with a stand-in converter that writes model files slowly
# (no TensorFlow, so fast, and slow enough that concurrent writers really overlap); the real
# conversion is what the parity tests above and the end-to-end tests below use.
FAKE_CONVERT = """
import time
from imgvec import runtime

def fake_convert(backbone, weights, image_size, folder):
    for name in runtime.FILES:
        with open(folder / name, "wb") as fh:
            for i in range(20):
                fh.write(f"{backbone.name} {image_size} {weights.identity} {i}\\n".encode() * 5000)
                fh.flush()
                time.sleep(0.01)
    return {"source_weights": None, "tensorflow": "", "convert_s": 0.2}
"""


@pytest.fixture
def fake_cache(tmp_path: Path, monkeypatch) -> Path:
    namespace: dict = {}
    exec(FAKE_CONVERT, namespace)
    monkeypatch.setattr(runtime, "_convert", namespace["fake_convert"])
    monkeypatch.setenv("IMGVEC_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_two_processes_converting_at_once_leave_one_good_entry(fake_cache: Path):
    code = FAKE_CONVERT + ("runtime._convert = fake_convert\n"
                           "from imgvec.backbones import get_backbone, parse_weights\n"
                           "print(runtime.compiled_model(get_backbone('mobilenetv3small'), parse_weights('none'), 32))")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    entry = entry_path(get_backbone("mobilenetv3small"), parse_weights("none"), 32)
    assert {out.strip() for out, _ in outs} == {str(entry / "model.xml")}
    assert [e.name for e in (fake_cache / "openvino").iterdir()] == [entry.name]  # no temporary folders left
    (listed,) = imgvec.cache().entries
    assert listed.ok and listed.backbone == "mobilenetv3small" and listed.input_size == 32


def test_a_damaged_entry_is_detected_and_rebuilt(fake_cache: Path):
    bb, w = get_backbone("mobilenetv3small"), parse_weights("none")
    xml = compiled_model(bb, w, 32)
    entry, good = xml.parent, (xml.parent / "model.bin").read_bytes()

    def flip_a_weight_byte() -> None:
        data = bytearray(good)
        data[len(data) // 2] ^= 0xFF
        (entry / "model.bin").write_bytes(bytes(data))

    for damage in (flip_a_weight_byte, lambda: (entry / "manifest.json").write_text('{"key": {"backb'),
                   lambda: (entry / "model.xml").unlink(), lambda: (entry / "model.bin").write_bytes(good[:100])):
        damage()
        assert not imgvec.cache().entries[0].ok
        assert compiled_model(bb, w, 32) == xml
        assert (entry / "model.bin").read_bytes() == good and imgvec.cache().entries[0].ok


def test_imgvec_cache_lists_and_clears(fake_cache: Path):
    compiled_model(get_backbone("mobilenetv3small"), parse_weights("none"), 32)
    runner = CliRunner()
    listed = runner.invoke(app, ["cache", "-f", "json"])
    assert listed.exit_code == 0, listed.output
    (row,) = json.loads(listed.stdout)
    assert (row["backbone"], row["input_size"], row["ok"]) == ("mobilenetv3small", 32, "yes")
    assert row["weights"].startswith("RANDOM weights (seed 0)") and row["mb"] > 0.1
    assert f"# {fake_cache}: 1 compiled model," in runner.invoke(app, ["cache"]).stdout
    cleared = runner.invoke(app, ["cache", "--clear"])
    assert cleared.exit_code == 0 and "removed 1 cached model (" in cleared.stderr
    assert ": 0 compiled models" in cleared.stdout and not any((fake_cache / "openvino").iterdir())


# -- end to end --------------------------------------------------------------------------------
def test_cached_query_predict_evaluate_never_import_tensorflow(store_path: Path, image_dir: Path,
                                                                holdout_dir: Path, tmp_path: Path):
    head = tmp_path / "head.h5"
    imgvec.train(store_path, head, cv=2)
    load_engine("auto", "mobilenetv3small", "none", 64)  # the store's model is in the session's cache
    image = sorted(image_dir.rglob("*.png"))[0]
    code = ("import sys, imgvec\n"
            "r = imgvec.query(sys.argv[1], [sys.argv[2]], k=1)\n"
            "p = imgvec.predict(sys.argv[3], [sys.argv[2]])\n"
            "e = imgvec.evaluate(sys.argv[3], sys.argv[4])\n"
            "heavy = [m for m in ('tensorflow', 'keras') if m in sys.modules]\n"
            "print(r.queries[0].results[0].score, p.predictions[0].label, e.n_images, heavy)")
    out = subprocess.run([sys.executable, "-c", code, str(store_path), str(image), str(head), str(holdout_dir)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    score, label, n, heavy = out.stdout.split(maxsplit=3)
    assert float(score) == pytest.approx(1.0, abs=1e-4) and label == image.parent.name and int(n) == 12
    assert heavy.strip() == "[]"


def _run(*args, code: int = 0):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
    return result


def test_openvino_store_indexes_queries_and_predicts(tmp_path: Path, image_dir: Path):
    store = tmp_path / "ov.h5"
    _run("embed", image_dir, "-o", store, *SMALL_ARGS, "--runtime", "openvino")
    with open_store(store) as s:
        assert (s.provenance.runtime, s.rows) == ("openvino", 24)
    _run("index", store)
    image = sorted(image_dir.rglob("*.png"))[3]
    top = json.loads(_run("query", store, image, "-k", "1", "-f", "json", "--runtime", "openvino").stdout)
    assert top["queries"][0]["results"][0]["path"] == str(image)
    _run("train", store, "-o", tmp_path / "head.h5", "--cv", "2")
    preds = json.loads(_run("predict", tmp_path / "head.h5", image, "-f", "json", "--runtime", "openvino").stdout)
    assert preds["predictions"][0]["predicted"] == image.parent.name


def test_a_tensorflow_store_is_extended_and_queried_with_openvino(tmp_path: Path, image_dir: Path):
    import shutil

    folder = tmp_path / "photos"
    shutil.copytree(image_dir, folder)
    later = sorted(folder.rglob("*.png"))[::4]
    for p in later:
        p.rename(p.with_suffix(".later"))
    store = tmp_path / "mixed.h5"
    _run("embed", folder, "-o", store, *SMALL_ARGS, "--runtime", "tensorflow")
    for p in later:
        p.with_suffix(".later").rename(p)
    out = _run("embed", folder, "-o", store, "--runtime", "openvino").stdout
    assert f"{len(later)} images embedded, {24 - len(later)} already there" in out
    with open_store(store) as s:
        assert s.provenance.runtime == "tensorflow" and s.rows == 24  # the store's own record stays
        rows = dict(zip(s.paths(), s.embeddings()))
    for p in later:  # rows made by OpenVINO, queried with TensorFlow: each finds itself first
        r = imgvec.query(store, [p], k=1, runtime="tensorflow")
        assert r.queries[0].results[0].path == str(p.relative_to(folder))
        assert r.queries[0].results[0].score == pytest.approx(1.0, abs=1e-4)
    assert len(rows) == 24
