"""--precision int8: NNCF quantization on the user's own images, checked against float32, cached, recorded.

A small model (mobilenetv3small at 64 px, seeded random weights with BatchNorm calibrated on generated
images, so activations are of order 1) and 24 generated images. Random weights: the figures here say
nothing about pretrained models; on these, int8 keeps a median cosine of about 0.87 (below the 0.98 default
threshold), so stores that must be written are written with ``accept_int8``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import imgvec
from imgvec.cli import app
from imgvec.embedding import embedder as embedder_module
from imgvec.embedding.embedder import calibration_sample, check_sample, neighbour_overlap
from imgvec.errors import BadInputError, MismatchError
from imgvec.files.header import read_provenance
from imgvec.runtime import loader, model_cache
from imgvec.runtime.engine import Calibration, calibration_digest
from imgvec.vectors.store import open_store

from parity_util import calibrated_weights

pytest.importorskip("nncf")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from imgvec.synthetic import make_image_folder

    root = tmp_path_factory.mktemp("int8")
    weights = calibrated_weights("mobilenetv3small", 64, root / "w.weights.h5")
    folder = make_image_folder(root / "photos", per_class=6, size=64, seed=0)
    return {"root": root, "folder": folder, "args": ["-m", "mobilenetv3small", "--weights", str(weights),
                                                      "--image-size", "64"],
            "kw": dict(model="mobilenetv3small", weights=str(weights), image_size=64)}


@pytest.fixture()
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty model cache, no engines kept, and a count of NNCF quantizations."""
    monkeypatch.setenv("IMGVEC_CACHE_DIR", str(tmp_path / "cache"))
    loader.release_engines()
    quantized: list[int] = []
    real = model_cache._quantize
    monkeypatch.setattr(model_cache, "_quantize", lambda *a: quantized.append(1) or real(*a))
    yield quantized
    loader.release_engines()


def embed_cli(setup: dict, out: Path, *extra: str) -> object:
    return CliRunner().invoke(app, ["embed", str(setup["folder"]), "-o", str(out), *setup["args"], *extra])


def test_an_int8_store_records_its_precision_and_calibration_and_a_second_run_quantizes_nothing(setup, fresh_cache,
                                                                                               tmp_path):
    r = embed_cli(setup, tmp_path / "a.h5", "--precision", "int8", "--accept-int8")
    assert r.exit_code == 0, (r.stdout, r.stderr)
    assert fresh_cache == [1]
    # The check's figures are one note line on stderr.
    notes = [line for line in r.stderr.splitlines() if "checked against float32" in line]
    assert len(notes) == 1 and notes[0].startswith("imgvec: note: int8 mobilenetv3small, calibrated on 24 ")
    assert "median cosine to float32 0." in notes[0] and "top-10 neighbour overlap" in notes[0]
    with open_store(tmp_path / "a.h5") as s:
        prov, rows, root = s.provenance, s.embeddings(), s.root
    keys = json.loads(prov.calibration_keys)
    assert (prov.precision, prov.runtime) == ("int8", "openvino")
    assert keys == sorted(keys) and len(keys) == 24  # a folder under 100 images: all of them
    assert prov.calibration_sha256 == calibration_digest(root, keys)
    assert prov.quantization == f"int8, calibrated on 24 images (sha256 {prov.calibration_sha256[:12]})"
    assert np.isfinite(rows).all() and rows.shape == (24, 576)
    info = CliRunner().invoke(app, ["info", str(tmp_path / "a.h5")])
    assert "provenance.precision" in info.stdout and "int8" in info.stdout
    assert "24 images (listed by --format json)" in info.stdout and "reds_000" not in info.stdout
    # The quantized model is in the cache under its own entry, beside the float32 one it was made from.
    listed = {e.weights: e for e in model_cache.cache_entries()}
    assert any(w.endswith("int8 (calibrated on 24 images)") and e.ok for w, e in listed.items()), listed
    # A second run on the same images: the cached int8 model, no quantization, the same rows.
    loader.release_engines()
    r = embed_cli(setup, tmp_path / "b.h5", "--precision", "int8", "--accept-int8")
    assert r.exit_code == 0, r.stderr
    assert fresh_cache == [1]
    with open_store(tmp_path / "b.h5") as s:
        np.testing.assert_array_equal(s.embeddings(), rows)
        assert s.provenance.key() == prov.key()


def test_int8_rows_differ_from_float32_rows_but_stay_near(setup, tmp_path):
    imgvec.embed([setup["folder"]], tmp_path / "f.h5", **setup["kw"])
    imgvec.embed([setup["folder"]], tmp_path / "q.h5", precision="int8", accept_int8=True, **setup["kw"])
    with open_store(tmp_path / "f.h5") as f, open_store(tmp_path / "q.h5") as q:
        cos = loader.row_cosines(f.embeddings(), q.embeddings())
    assert 0.5 < np.median(cos) < 0.99999  # quantized (not float32 under another name), not garbage


def test_below_the_thresholds_int8_is_refused_in_one_line_and_nothing_is_written(setup, tmp_path, monkeypatch):
    out = tmp_path / "refused.h5"
    with pytest.raises(BadInputError) as refusal:
        imgvec.embed([setup["folder"]], out, precision="int8", int8_thresholds=(1.01, 1.01), **setup["kw"])
    message = str(refusal.value)
    assert message.startswith("precision int8 changes mobilenetv3small's embeddings too much: median cosine to float32 ")
    assert "(needs median cosine >= 1.01 and overlap >= 1.01)" in message and "accept_int8" in message
    assert "\n" not in message and not out.exists() and not list(tmp_path.iterdir())
    # The CLI: the default thresholds (raised here), one line naming the override, exit 2, no file.
    monkeypatch.setattr(embedder_module, "INT8_MIN_OVERLAP", 1.01)
    r = embed_cli(setup, out, "--precision", "int8")
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("imgvec: error: --precision int8 changes") and "--accept-int8" in r.stderr
    assert not out.exists() and not list(tmp_path.iterdir())
    r = embed_cli(setup, out, "--precision", "int8", "--accept-int8")  # the override writes it
    assert r.exit_code == 0 and out.exists(), r.stderr


def test_int8_and_float32_rows_never_mix(setup, tmp_path):
    f32, int8 = tmp_path / "f.h5", tmp_path / "q.h5"
    imgvec.embed([setup["folder"]], f32, **setup["kw"])
    imgvec.embed([setup["folder"]], int8, precision="int8", accept_int8=True, **setup["kw"])
    # int8 rows into a float32 store (and float32 rows into an int8 one) are refused, by the one gate.
    r = embed_cli(setup, f32, "--precision", "int8", "--accept-int8")
    assert r.exit_code == 3 and "(quantization: none vs int8)" in r.stderr, r.stderr
    with pytest.raises(MismatchError, match=r"quantization: int8, calibrated on 24 images .* vs none"):
        imgvec.embed([setup["folder"]], int8, precision="float32")
    with pytest.raises(MismatchError, match=r"quantization: none vs int8, calibrated on 24 images"):
        imgvec.merge([f32, int8], tmp_path / "m.h5")
    # A head trained on the float32 store does not label the int8 store's rows (nor the other way round).
    imgvec.train(f32, tmp_path / "head.h5", cv=2)
    with pytest.raises(MismatchError, match=r"quantization: none vs int8"):
        imgvec.predict(tmp_path / "head.h5", [int8])
    # A query of the int8 store embeds its images with the same int8 model: each finds itself.
    r = imgvec.query(int8, [setup["folder"] / "reds"], k=1)
    for q in r.queries:
        assert q.results[0].path == f"reds/{Path(q.query).name}" and q.results[0].score > 0.9999


@pytest.mark.slow  # two quantizations: about 50 s here
def test_a_query_quantizes_again_from_the_recorded_images_and_refuses_once_they_changed(setup, tmp_path,
                                                                                         fresh_cache):
    import shutil

    folder = shutil.copytree(setup["folder"], tmp_path / "photos")
    store = tmp_path / "q.h5"
    imgvec.embed([folder], store, precision="int8", accept_int8=True, **setup["kw"])
    model_cache.clear_cache()
    loader.release_engines()
    r = imgvec.query(store, [folder / "reds" / "reds_000.png"], k=1)
    assert fresh_cache == [1, 1] and r.queries[0].results[0].score > 0.9999  # the same model again
    model_cache.clear_cache()
    loader.release_engines()
    (folder / "blues" / "blues_000.png").write_bytes((folder / "reds" / "reds_000.png").read_bytes())
    with pytest.raises(MismatchError, match="calibrated on 24 images under .* which are no longer the same"):
        imgvec.query(store, [folder / "reds" / "reds_000.png"], k=1)


def test_int8_runs_on_openvino_only(setup):
    calibration = Calibration.of(str(setup["folder"]), ["reds/reds_000.png"])
    with pytest.raises(BadInputError, match="^precision int8 runs on the openvino runtime .*not tensorflow"):
        loader.load_engine("tensorflow", "mobilenetv3small", "none", 64, "int8", "cpu", calibration)
    with pytest.raises(BadInputError, match="^precision int8 is calibrated on images"):
        loader.load_engine("openvino", "mobilenetv3small", "none", 64, "int8", "cpu")


def test_files_made_before_int8_read_as_float32_and_a_forged_calibration_is_damage():
    base = {"backbone": "mobilenetv3small", "weights": "random", "weights_seed": 0, "input_size": 64,
            "preprocessing": "x", "dim": 576}
    old = read_provenance(base)
    assert (old.precision, old.calibration_sha256, old.quantization) == ("float32", "", "none")
    assert old.key() == read_provenance({**base, "precision": "mixed"}).key()  # mixed still compares as float
    with pytest.raises(BadInputError, match="precision int8 without a calibration_sha256"):
        read_provenance({**base, "precision": "int8"})
    for forged in ('["../../etc/passwd"]', '{"a": 1}', "[1, 2]", "not json", json.dumps(["a"] * 1001)):
        with pytest.raises(BadInputError, match="the int8 calibration recorded in the file is not a list"):
            read_provenance({**base, "precision": "int8", "calibration_sha256": "ab", "calibration_keys": forged})


def test_samples_are_spread_over_the_folder_and_overlap_counts_neighbours_kept():
    keys = [f"c{c}/{i:03d}.jpg" for c in range(4) for i in range(100)]
    sample = calibration_sample(keys[::-1], 100)
    assert len(sample) == 100 and sample == sorted(sample) and {k[:2] for k in sample} == {"c0", "c1", "c2", "c3"}
    checked = check_sample(keys, sample, 200)
    assert len(checked) == 200 and not set(checked) & set(sample)
    assert check_sample(keys[:20], keys[:20], 200) == sorted(keys[:20])  # too few others: any of them
    x = np.random.default_rng(0).standard_normal((50, 8))
    assert neighbour_overlap(x, x, 10) == 1.0
    assert neighbour_overlap(x, x + 1e-9, 10) == 1.0
    assert neighbour_overlap(x, np.random.default_rng(1).standard_normal((50, 8)), 10) < 0.5


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(__import__("imgvec.backbones.registry", fromlist=["BACKBONES"]).BACKBONES))
def test_every_backbone_quantizes(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """NNCF quantizes every registry backbone (BatchNorm-calibrated random weights, 8 generated images):
    finite int8 rows that are not float32's under another name."""
    from imgvec.backbones.registry import get_backbone, parse_weights
    from imgvec.synthetic import make_image_folder

    monkeypatch.setenv("IMGVEC_CACHE_DIR", str(tmp_path / "cache"))
    size = max(get_backbone(name).min_size, 64)
    weights = parse_weights(str(calibrated_weights(name, size, tmp_path / "w.weights.h5")))
    folder = make_image_folder(tmp_path / "photos", per_class=2, size=size, seed=2)
    keys = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.png"))
    calibration = Calibration.of(str(folder), keys)
    pixels = calibration.pixels(size)
    int8 = loader.load_engine("openvino", name, weights, size, "int8", "cpu", calibration)(pixels)
    f32 = loader.load_engine("openvino", name, weights, size, "float32", "cpu")(pixels)
    cos = loader.row_cosines(int8, f32)
    assert np.isfinite(int8).all() and int8.shape == f32.shape
    assert np.median(cos) > 0.5 and not np.array_equal(int8, f32)
    loader.release_engines()


# -- the HMAC-checked cache, and model files ------------------------------------------------------
def _int8_entry() -> Path:
    entries = [e for e in model_cache.cache_entries() if ", int8 (calibrated on " in e.weights]
    assert len(entries) == 1, entries
    return entries[0].path


def test_an_edited_int8_entry_is_quantized_again_and_an_untrusted_cache_is_not_used(setup, fresh_cache, recwarn):
    """The int8 entry is checked like every compiled model (sha256 and HMAC): edited bytes are never run."""
    import os
    import stat

    from imgvec.backbones.registry import parse_weights

    weights = parse_weights(setup["kw"]["weights"])
    keys = sorted(str(p.relative_to(setup["folder"])) for p in Path(setup["folder"]).rglob("*.png"))[::3]
    calibration = Calibration.of(str(setup["folder"]), keys)
    pixels = calibration.pixels(64)

    def rows() -> np.ndarray:
        loader.release_engines()
        recwarn.clear()
        return loader.load_engine("openvino", "mobilenetv3small", weights, 64, "int8", "cpu", calibration)(pixels)

    first = rows()
    assert fresh_cache == [1]
    np.testing.assert_array_equal(rows(), first)  # the entry's checked bytes, nothing quantized
    assert fresh_cache == [1]
    entry = _int8_entry()
    blob = bytearray((entry / "model.bin").read_bytes())
    blob[-4:] = b"\x00\x00\x80\x7f"  # a weight set to +inf
    (entry / "model.bin").write_bytes(bytes(blob))
    compiled = [e for e in model_cache.cache_entries() if (e.path / model_cache.BLOB).exists()]
    assert len(compiled) == 1 and ", int8, compiled for this CPU" in compiled[0].weights  # the int8 model, compiled
    edited = compiled[0].path / model_cache.BLOB
    edited.write_bytes(edited.read_bytes()[:-1] + b"\x00")
    np.testing.assert_array_equal(rows(), first)  # quantized and compiled again, not run from the edited bytes
    assert fresh_cache == [1, 1]
    assert any("did not verify" in str(w.message) and "quantized again" in str(w.message) for w in recwarn.list)
    assert any("did not verify" in str(w.message) and "compiled again" in str(w.message) for w in recwarn.list)
    assert all(e.ok for e in model_cache.cache_entries())
    # A cache folder others can write is not used: quantized in memory, with one note, and nothing written there.
    cache = Path(os.environ["IMGVEC_CACHE_DIR"])
    before = sorted(p.name for p in (cache / "openvino").iterdir())
    cache.chmod(cache.stat().st_mode | stat.S_IWOTH)
    try:
        np.testing.assert_array_equal(rows(), first)
        assert any("the model cache is not used" in str(w.message) and "quantized in memory" in str(w.message)
                   for w in recwarn.list)
        assert fresh_cache == [1, 1, 1] and sorted(p.name for p in (cache / "openvino").iterdir()) == before
    finally:
        cache.chmod(cache.stat().st_mode & ~stat.S_IWOTH)


def conv_model(path: Path, size: int = 64) -> Path:
    """A small NCHW IR with two convolutions (what NNCF quantizes), pooled: a model file to quantize."""
    import openvino as ov
    import openvino.opset13 as ops

    rng = np.random.default_rng(0)
    x = ops.parameter([-1, 3, size, size], np.float32, name="pixels")
    h = ops.relu(ops.convolution(x, ops.constant(rng.standard_normal((16, 3, 3, 3)).astype(np.float32) * 0.3),
                                 [2, 2], [1, 1], [1, 1], [1, 1]))
    h = ops.relu(ops.convolution(h, ops.constant(rng.standard_normal((32, 16, 3, 3)).astype(np.float32) * 0.1),
                                 [1, 1], [1, 1], [1, 1], [1, 1]))
    out = ops.reduce_mean(h, ops.constant(np.array([2, 3], np.int64)), False)
    ov.save_model(ov.Model([out], [x], "convs"), str(path), compress_to_fp16=False)
    return path


def test_a_model_file_quantizes_to_int8_records_both_and_is_cached(setup, fresh_cache, tmp_path):
    model = conv_model(tmp_path / "convs.xml")
    args = ["--model", str(model), "--preprocess", "torch", "--precision", "int8", "--accept-int8"]
    r = CliRunner().invoke(app, ["embed", str(setup["folder"]), "-o", str(tmp_path / "a.h5"), *args])
    assert r.exit_code == 0, (r.stdout, r.stderr)
    assert fresh_cache == [1] and "int8 convs.xml, calibrated on 24 of your images" in r.stderr
    with open_store(tmp_path / "a.h5") as s:
        prov, rows = s.provenance, s.embeddings()
    assert (prov.precision, prov.weights, prov.model_preprocess) == ("int8", "model", "torch")
    assert prov.quantization.startswith("int8, calibrated on 24 images") and rows.shape == (24, 32)
    assert prov.key()["model file sha256"] == prov.model_sha256
    info = CliRunner().invoke(app, ["info", str(tmp_path / "a.h5")])
    assert "provenance.quantization" in info.stdout and "24 images (listed by --format json)" in info.stdout
    # Cached under its own entry: a second store quantizes nothing and gets the same rows.
    assert any(e.ok and e.weights.startswith("model file convs.xml, int8") for e in model_cache.cache_entries())
    loader.release_engines()
    r = CliRunner().invoke(app, ["embed", str(setup["folder"]), "-o", str(tmp_path / "b.h5"), *args])
    assert r.exit_code == 0 and fresh_cache == [1], r.stderr
    with open_store(tmp_path / "b.h5") as s:
        np.testing.assert_array_equal(s.embeddings(), rows)
    # Not float32 under another name, and a query embeds with the same int8 model: each image finds itself.
    f32 = imgvec.embed([setup["folder"]], tmp_path / "f.h5", model=str(model), preprocess="torch")
    with open_store(f32.store) as s:
        assert not np.array_equal(s.embeddings(), rows)
    hits = imgvec.query(tmp_path / "a.h5", [setup["folder"] / "reds"], k=1)
    for q in hits.queries:
        assert q.results[0].path == f"reds/{Path(q.query).name}" and q.results[0].score > 0.9999
    # int8 rows never join the float32 store of the same model file.
    r = CliRunner().invoke(app, ["embed", str(setup["folder"]), "-o", str(f32.store), *args])
    assert r.exit_code == 3 and "quantization: none vs int8" in r.stderr, r.stderr
