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
from imgvec.runtime import keras_backends
from imgvec.runtime import model_cache
from imgvec.runtime import loader as runtime
from imgvec.backbones.registry import BACKBONES, get_backbone, parse_weights
from imgvec.cli import app
from imgvec.errors import BadInputError
from imgvec.runtime.engine import RuntimeNote
from imgvec.runtime.loader import cache_key, compiled_model, entry_path, load_engine, row_cosines
from imgvec.vectors.store import open_store

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


def test_every_runtime_is_a_table_row_whose_library_loads_only_when_used(monkeypatch):
    assert set(runtime.LOADERS) == set(runtime.RUNTIMES) - {"auto"}
    # Importing the runtimes' table imports none of their libraries ...
    code = ("import sys, imgvec.runtime.loader\n"
            "print([m for m in ('tensorflow', 'keras', 'openvino', 'jax', 'torch') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr
    # ... and the jax row reaches the Keras-backend engine, which refuses a second backend in this process.
    from imgvec.backbones.device import import_keras

    import_keras("tensorflow")
    calls = []
    monkeypatch.setattr(keras_backends, "_persistent_compilation_cache", lambda: calls.append("jax cache"))
    with pytest.raises(BadInputError, match="^Keras already runs on tensorflow in this process"):
        load_engine("jax", "mobilenetv3small", "none", 64)
    assert calls == []  # refused before anything JAX-specific ran


def test_engines_are_kept_for_the_process_until_released():
    a = load_engine("openvino", "mobilenetv3small", "none", 64)
    assert load_engine("openvino", "mobilenetv3small", parse_weights("none"), 64) is a
    assert load_engine("openvino", "mobilenetv3small", "none", 64, device="cpu") is not a  # another key
    assert imgvec.release_models() >= 2
    assert load_engine("openvino", "mobilenetv3small", "none", 64) is not a


class _Perturbed:
    """A float32 engine whose rows get noise of a chosen size: a stand-in for a lower precision."""

    def __init__(self, engine, noise: float) -> None:
        self.engine, self.noise, self.calls = engine, noise, 0
        self.runtime, self.version, self.device, self.model_batch = "openvino", "x", "cpu", 32

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        self.calls += 1
        out = self.engine(pixels)
        rng = np.random.default_rng(self.calls)
        return out + self.noise * np.abs(out).mean() * rng.standard_normal(out.shape).astype(np.float32)


@pytest.fixture(scope="module")
def calibrated_32(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One calibrated mobilenetv3small at 32 px for both mixed-precision cases: converted once, not per case
    (calibrating anew writes other bytes, so another cache entry and another conversion)."""
    return str(calibrated_weights("mobilenetv3small", 32, tmp_path_factory.mktemp("mixed") / "w.weights.h5"))


@pytest.mark.parametrize("noise,accepted", [(1e-4, True), (0.5, False)])
def test_mixed_precision_must_match_float32_on_the_first_batch(noise: float, accepted: bool, calibrated_32: str):
    """A lower precision is kept when its first batch agrees with float32 (cosine >= 0.999 per row), else refused for good."""
    float32 = load_engine("openvino", "mobilenetv3small", parse_weights(calibrated_32), 32)
    references = []

    def reference():
        references.append(1)
        return float32

    mixed = runtime.CheckedPrecision(_Perturbed(float32, noise), reference, "mobilenetv3small")
    x = pixels(4, 32)
    if accepted:
        assert row_cosines(mixed(x), float32(x)).min() >= runtime.PARITY_MIN_COSINE
        mixed(pixels(4, 32, seed=1))
        assert references == [1]  # only the first batch is compared: the reference is then dropped
    else:
        with pytest.raises(BadInputError) as refusal:
            mixed(x)
        assert "precision mixed (openvino); use precision float32" in str(refusal.value)
        assert "differ from float32 on the first batch" in str(refusal.value) and "\n" not in str(refusal.value)
        with pytest.raises(BadInputError, match="differ from float32"):
            mixed(pixels(4, 32, seed=1))  # the refusal sticks
        assert mixed.engine.calls == 1  # without running the model again


def test_mixed_precision_engines_are_checked_against_their_own_float32(tmp_path: Path):
    mixed = load_engine("openvino", "mobilenetv3small", "none", 32, precision="mixed")
    assert isinstance(mixed, runtime.CheckedPrecision) and mixed.runtime == "openvino"
    assert mixed._reference().runtime == "openvino"  # the float32 reference runs on the same runtime
    assert load_engine("openvino", "mobilenetv3small", "none", 32) is not mixed.engine


def test_a_backbone_that_does_not_convert_falls_back_to_tensorflow(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("IMGVEC_CACHE_DIR", str(tmp_path))
    calls = []

    def cannot(*args):
        calls.append(args)
        raise runtime.ConversionFailed("OpConversionFailure: no converter for op Foo")

    monkeypatch.setattr(model_cache, "_convert", cannot)
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
    monkeypatch.setattr(model_cache, "WRAPPER_VERSION", model_cache.WRAPPER_VERSION + 1)
    variants.append(entry_path(bb, w, 96))
    monkeypatch.undo()
    for dist in ("openvino", "keras"):
        with monkeypatch.context() as m:
            m.setattr(model_cache, "dist_version", lambda d, dist=dist: "0.0" if d == dist else runtime.dist_version(d))
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
from imgvec.runtime import model_cache

SOURCE = None  # what the conversion records as the ImageNet weights file it read

def fake_convert(backbone, weights, image_size):
    return (backbone, weights, image_size), {"source_weights": SOURCE, "tensorflow": "", "convert_s": 0.2}

def fake_save(model, folder):
    backbone, weights, image_size = model
    for name in model_cache.FILES:
        with open(folder / name, "wb") as fh:
            for i in range(20):
                fh.write(f"{backbone.name} {image_size} {weights.identity} {i}\\n".encode() * 5000)
                fh.flush()
                time.sleep(0.01)
"""


@pytest.fixture
def fake_cache(tmp_path: Path, monkeypatch) -> Path:
    namespace: dict = {}
    exec(FAKE_CONVERT, namespace)
    monkeypatch.setattr(model_cache, "_convert", namespace["fake_convert"])
    monkeypatch.setattr(model_cache, "_save", namespace["fake_save"])
    monkeypatch.setenv("IMGVEC_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_two_processes_converting_at_once_leave_one_good_entry(fake_cache: Path):
    code = FAKE_CONVERT + ("model_cache._convert, model_cache._save = fake_convert, fake_save\n"
                           "from imgvec.backbones.registry import get_backbone, parse_weights\n"
                           "print(model_cache.compiled_model(get_backbone('mobilenetv3small'), parse_weights('none'), 32))")
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


@pytest.mark.parametrize("manifest", [
    {"source_weights": "not a record"},
    {"source_weights": {"path": 7, "sha256": "x", "size": 1, "mtime_ns": 1}},
    {"files": ["model.xml", "model.bin"]},
    {"key": ["not", "a", "dict"]},
    "a string, not an object",
    {"key": {"input_size": "ninety-six"}},
], ids=["source-str", "source-path-int", "files-list", "key-list", "not-object", "key-size-str"])
def test_a_malformed_manifest_is_listed_and_the_entry_rebuilt(fake_cache: Path, manifest):
    """Valid JSON that is not what imgvec writes: `imgvec cache` lists the entry as not ok, the next use rebuilds it."""
    bb, w = get_backbone("mobilenetv3small"), parse_weights("none")
    xml = compiled_model(bb, w, 32)
    good = json.loads((xml.parent / "manifest.json").read_text())
    forged = {**good, **manifest} if isinstance(manifest, dict) else manifest
    if isinstance(manifest, dict) and "key" in manifest and isinstance(manifest["key"], dict):
        forged["key"] = {**good["key"], **manifest["key"]}
    (xml.parent / "manifest.json").write_text(json.dumps(forged))
    listed = CliRunner().invoke(app, ["cache", "-f", "json"])
    assert listed.exit_code == 0 and listed.exception is None, listed.output
    assert [row["ok"] for row in json.loads(listed.stdout)] == ["no (rebuilt on next use)"]
    assert compiled_model(bb, w, 32) == xml
    assert json.loads((xml.parent / "manifest.json").read_text())["key"] == good["key"]
    assert imgvec.cache().entries[0].ok


def test_a_manifest_that_is_a_fifo_or_huge_is_not_read(fake_cache: Path):
    import os

    bb, w = get_backbone("mobilenetv3small"), parse_weights("none")
    xml = compiled_model(bb, w, 32)
    manifest = xml.parent / "manifest.json"
    manifest.unlink()
    os.mkfifo(manifest)  # reading it would block forever
    assert not imgvec.cache().entries[0].ok
    assert compiled_model(bb, w, 32) == xml and imgvec.cache().entries[0].ok
    good = manifest.read_text()
    manifest.write_text(good[:-1] + " " * (2 << 20) + "}")  # valid JSON, but no manifest imgvec writes is 2 MB
    assert not imgvec.cache().entries[0].ok


def test_an_imagenet_entry_is_rebuilt_when_the_weights_file_changes(fake_cache: Path, tmp_path: Path, monkeypatch):
    import os

    weights_file = tmp_path / "keras" / "models" / "mobilenet_v3_small_no_top.h5"
    weights_file.parent.mkdir(parents=True)
    weights_file.write_bytes(b"imagenet weights, version 1")
    st = os.stat(weights_file)
    monkeypatch.setitem(model_cache._convert.__globals__, "SOURCE", {
        "path": str(weights_file), "sha256": model_cache.sha256_file(weights_file), "size": st.st_size,
        "mtime_ns": st.st_mtime_ns})
    bb, w = get_backbone("mobilenetv3small"), parse_weights("imagenet")
    xml = compiled_model(bb, w, 32)
    assert imgvec.cache().entries[0].ok
    os.utime(weights_file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched, same bytes: still good
    assert imgvec.cache().entries[0].ok
    weights_file.write_bytes(b"imagenet weights, version 2")  # Keras fetched a new file: the entry is stale
    assert not imgvec.cache().entries[0].ok
    converted = []

    def convert_again(*args):
        converted.append(args)
        return args, {"source_weights": None, "tensorflow": "", "convert_s": 0.1}

    monkeypatch.setattr(model_cache, "_convert", convert_again)
    assert compiled_model(bb, w, 32) == xml and len(converted) == 1 and imgvec.cache().entries[0].ok
    weights_file.unlink()  # gone: the converted model holds the weights itself
    assert compiled_model(bb, w, 32) == xml and len(converted) == 1


def test_the_weights_file_a_build_used_is_found_in_the_keras_cache(tmp_path: Path, monkeypatch):
    """Downloaded (new in the folder) or read (Keras checks a cached file's hash): both are found, nothing else."""
    from imgvec.backbones.builder import keras_weights_files

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "other.h5").write_bytes(b"another model's weights")
    (folder / "cached.h5").write_bytes(b"cached weights")
    with keras_weights_files() as found:
        (folder / "downloaded.h5").write_bytes(b"new weights")
    assert found == [str(folder / "downloaded.h5")]
    with keras_weights_files() as found:
        with open(folder / "cached.h5", "rb") as fh:
            fh.read()
        with open(tmp_path / "elsewhere.txt", "w") as fh:
            fh.write("not in Keras' cache")
    assert found == [str(folder / "cached.h5")]
    with keras_weights_files() as found:
        pass
    assert found == []


def test_a_killed_conversion_leaves_a_folder_that_is_listed_and_then_removed(fake_cache: Path):
    import os
    import signal

    bb, w = get_backbone("mobilenetv3small"), parse_weights("none")
    code = FAKE_CONVERT + ("import time\n"
                           "def slow_save(model, folder):\n"
                           "    (folder / 'model.xml').write_text('half')\n"
                           "    print('writing', flush=True); time.sleep(60)\n"
                           "model_cache._convert, model_cache._save = fake_convert, slow_save\n"
                           "from imgvec.backbones.registry import get_backbone, parse_weights\n"
                           "model_cache.compiled_model(get_backbone('mobilenetv3small'), parse_weights('none'), 32)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    (temp,) = [e for e in imgvec.cache().entries]
    assert temp.state == f"no: being converted by process {proc.pid}" and ".tmp-" in temp.path.name
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    (temp,) = imgvec.cache().entries
    assert temp.leftover and temp.backbone == "mobilenetv3small" and temp.input_size == 32
    listed = CliRunner().invoke(app, ["cache", "-f", "json"])
    (row,) = json.loads(listed.stdout)
    assert row["ok"].startswith("no: left by an interrupted conversion") and row["path"] == str(temp.path)
    xml = compiled_model(bb, w, 32)  # the next conversion removes it
    assert [e.name for e in (fake_cache / "openvino").iterdir()] == [xml.parent.name]
    temp.path.mkdir()  # and so does `imgvec cache --clear`
    cleared = CliRunner().invoke(app, ["cache", "--clear"])
    assert cleared.exit_code == 0 and not any((fake_cache / "openvino").iterdir())



def test_the_cache_names_its_temporary_folders_like_every_writer_and_leaves_another_machines(fake_cache: Path):
    """One temp/leftover scheme (fileio's): a conversion's folder carries host and pid, so on a cache shared by
    several machines a dead writer's folder from this one is removed and a live one's elsewhere is not."""
    import os

    from imgvec.fileio import temp_name, temp_path

    root = fake_cache / "openvino"
    entry = entry_path(get_backbone("mobilenetv3small"), parse_weights("none"), 32)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    mine = temp_path(entry)
    mine = mine.with_name(mine.name.replace(f"-{os.getpid()}-", f"-{dead}-"))
    elsewhere = root / f".{entry.name}.tmp-00000000-{dead}-feed"
    for folder in (mine, elsewhere):
        folder.mkdir(parents=True)
    assert temp_name(mine.name).stale and not temp_name(elsewhere.name).stale
    states = {e.path.name: e.state for e in imgvec.cache().entries}
    assert states[elsewhere.name] == f"no: being converted by process {dead} on another machine"
    assert states[mine.name].startswith("no: left by an interrupted conversion")
    assert model_cache.remove_leftovers(root) == 1 and sorted(p.name for p in root.iterdir()) == [elsewhere.name]


FULL_DISK = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
from imgvec.cli import main
sys.argv = ["imgvec", *sys.argv[2:]]
main()
"""


def test_the_cache_on_a_full_disk_costs_one_line_and_the_embed_still_runs(tmp_path: Path, image_dir: Path):
    """No file may grow past 1 MB: the converted model (4 MB) cannot be cached, the small store can be written."""
    env = {**__import__("os").environ, "IMGVEC_CACHE_DIR": str(tmp_path / "cache")}
    store = tmp_path / "s.h5"
    out = subprocess.run([sys.executable, "-c", FULL_DISK, str(1 << 20), "embed", str(image_dir), "-o", str(store),
                          "-m", "mobilenetv3small", "--weights", "none", "--image-size", "32", "--runtime", "openvino"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    (note,) = [line for line in out.stderr.splitlines() if "model cache" in line]
    assert "cannot write the model cache" in note and "converted in memory" in note
    with open_store(store) as s:
        assert s.rows == 24 and s.provenance.runtime == "openvino"
    assert not [p for p in (tmp_path / "cache" / "openvino").iterdir()]  # no half-written entry or temp left


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


# -- the cache as a file from elsewhere: folders others can write, entries edited, the key kept outside ---------
def test_an_entry_edited_with_its_manifest_recomputed_is_rebuilt_with_a_note(fake_cache: Path):
    """Whoever can write the cache can recompute the sha256 beside the files; not the HMAC of this user's key."""
    import hashlib

    bb, w = get_backbone("mobilenetv3small"), parse_weights("none")
    xml = compiled_model(bb, w, 32)
    entry, good = xml.parent, (xml.parent / "model.bin").read_bytes()
    (entry / "model.bin").write_bytes(b"other weights" + good[13:])
    manifest = json.loads((entry / "manifest.json").read_text())
    manifest["files"]["model.bin"] = hashlib.sha256((entry / "model.bin").read_bytes()).hexdigest()
    (entry / "manifest.json").write_text(json.dumps(manifest))
    assert not imgvec.cache().entries[0].ok
    with pytest.warns(RuntimeNote, match="did not verify"):
        assert compiled_model(bb, w, 32) == xml
    assert (entry / "model.bin").read_bytes() == good and imgvec.cache().entries[0].ok
    manifest.pop("mac")  # an entry without the HMAC (an older imgvec's, or forged) is not used either
    (entry / "manifest.json").write_text(json.dumps(manifest))
    assert not imgvec.cache().entries[0].ok


@pytest.mark.parametrize("what", ["cache", "parent", "key"])
def test_a_cache_others_can_write_is_not_used(fake_cache: Path, tmp_path: Path, what: str):
    import os

    from imgvec.runtime.model_cache import key_path

    bb, w = get_backbone("mobilenetv3small"), parse_weights("none")
    xml = compiled_model(bb, w, 32)  # a good entry, made while the cache was private
    target = {"cache": fake_cache, "parent": tmp_path, "key": key_path()}[what]
    mode = os.stat(target).st_mode & 0o7777
    os.chmod(target, 0o666 if what == "key" else 0o777)
    try:
        with pytest.warns(RuntimeNote, match="model cache is not used"):
            model = compiled_model(bb, w, 32)
        assert model != xml and model[0] is bb  # converted in memory (the stand-in converter's model)
    finally:
        os.chmod(target, mode)
    assert compiled_model(bb, w, 32) == xml  # private again: the entry is used


def test_a_sticky_shared_folder_above_the_cache_is_fine(tmp_path: Path):
    import os

    from imgvec.runtime.model_cache import untrusted

    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # as /tmp: others cannot rename what is ours
    (shared / "cache").mkdir(mode=0o700)
    assert untrusted(shared / "cache") is None
    assert "writable by other users" in untrusted(shared)  # but the cache folder itself may not be so


def test_openvino_runs_the_checked_bytes_not_a_path(tmp_path: Path, monkeypatch):
    """load_model reads the entry once and hands OpenVINO those bytes: the files can change afterwards."""
    import numpy as np

    from imgvec.runtime import model_cache

    monkeypatch.setenv("IMGVEC_CACHE_DIR", str(tmp_path / "cache"))
    bb, w = get_backbone("mobilenetv3small"), parse_weights("none")
    xml = compiled_model(bb, w, 32)
    model = model_cache.load_model(bb, w, 32)
    (xml.parent / "model.bin").write_bytes(b"\0" * 64)  # changed after the check: not what runs
    import openvino as ov

    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    pixels = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    out = compiled(pixels)[0]
    reference = ov.Core().compile_model(model_cache._convert(bb, w, 32)[0], "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    assert np.allclose(out, reference(pixels)[0], atol=1e-5)


def test_a_compiled_model_is_imported_next_time_and_compiled_again_when_edited_or_for_another_cpu(
        tmp_path: Path, monkeypatch):
    """The model compiled for this CPU is cached (checked like every entry): the next process imports it, and
    gives the same rows; an edited blob is never imported, and another CPU gets its own compiled model."""
    import openvino as ov

    monkeypatch.setenv("IMGVEC_CACHE_DIR", str(tmp_path / "cache"))
    compiles: list[int] = []
    real = ov.Core.compile_model
    monkeypatch.setattr(ov.Core, "compile_model", lambda *a, **k: compiles.append(1) or real(*a, **k))
    x = pixels(6, 32)

    def rows() -> np.ndarray:
        runtime.release_engines()
        return load_engine("openvino", "mobilenetv3small", "none", 32)(x)

    first = rows()
    assert compiles == [1]
    entries = imgvec.cache().entries
    (blob,) = [e for e in entries if (e.path / model_cache.BLOB).exists()]
    assert all(e.ok for e in entries) and len(entries) == 2 and blob.weights.endswith(", compiled for this CPU")
    np.testing.assert_array_equal(rows(), first)
    assert compiles == [1]  # imported, not compiled
    edited = blob.path / model_cache.BLOB
    edited.write_bytes(edited.read_bytes()[:-1] + bytes([edited.read_bytes()[-1] ^ 1]))
    with pytest.warns(RuntimeNote, match="did not verify .*compiled again"):
        np.testing.assert_array_equal(rows(), first)
    assert compiles == [1, 1] and all(e.ok for e in imgvec.cache().entries)
    monkeypatch.setattr(model_cache, "cpu_identity", lambda: "another CPU; 64 cores; flags sha256 0")
    np.testing.assert_array_equal(rows(), first)
    assert compiles == [1, 1, 1] and len(imgvec.cache().entries) == 3
    states = [e.state for e in imgvec.cache().entries]  # the first machine's compiled model, seen from the second
    assert sum(s.startswith("no: compiled for another CPU (") for s in states) == 1 and states.count("yes") == 2
    runtime.release_engines()
