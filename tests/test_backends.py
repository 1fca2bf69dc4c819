"""Keras' JAX and PyTorch backends as runtimes: parity with TensorFlow, and imgvec without TensorFlow.

A process has one Keras backend, and this one runs TensorFlow, so JAX and PyTorch run in
subprocesses. Parity uses BatchNorm-calibrated random weights saved to a file
(tests/parity_util.py): seeded random weights are different numbers on each backend.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from imgvec.backbones.registry import BACKBONES, get_backbone, parse_weights
from imgvec.errors import BadInputError
from imgvec.runtime.loader import PARITY_MIN_COSINE

sys.path.insert(0, str(Path(__file__).parent))
from parity_util import calibrated_weights, calibration_images, cosines, embed_in_subprocess  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HAS_TORCH = importlib.util.find_spec("torch") is not None
RUNTIMES = ["jax", pytest.param("torch", marks=pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed "
                                                                   "(pip install 'imgvec[torch]')"))]
SMALL_SET = [("mobilenetv3small", 64), ("mobilenetv2", 64), ("efficientnetb0", 96)]
PARITY = 0.99999

# Run imgvec's CLI with `import tensorflow` and `import openvino` failing, as where neither is installed.
WITHOUT_TF = """
import sys
class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "openvino"):
            raise ImportError(f"No module named {name!r}")
sys.meta_path.insert(0, Absent())
"""


def _reference(jobs: list[tuple[str, int]], folder: Path) -> tuple[list[tuple[str, int, str]], dict, dict]:
    """Calibrated weights files, the images, and TensorFlow's rows for them."""
    from imgvec.runtime.loader import load_engine

    pixels = {size: calibration_images(size, n=6, seed=1) for _, size in jobs}
    files = [(m, s, str(calibrated_weights(m, s, folder / f"{m}-{s}.weights.h5"))) for m, s in jobs]
    rows = {m: load_engine("tensorflow", get_backbone(m), parse_weights(p), s, "float32", "cpu")(pixels[s])
            for m, s, p in files}
    return files, pixels, rows


def _check_parity(reference: tuple[list, dict, dict], runtime: str, tmp_path: Path,
                  models: tuple[str, ...] | None = None) -> None:
    files, pixels, ours = reference
    files = [job for job in files if models is None or job[0] in models]
    theirs = embed_in_subprocess(runtime, files, pixels, tmp_path)
    for model, _, _ in files:
        assert np.abs(ours[model]).mean() > 1e-3, f"{model}: activations too small for a meaningful cosine"
        cos = cosines(ours[model], theirs[model])
        assert cos.min() >= PARITY, f"{model} {runtime}: lowest cosine {cos.min():.8f}"


@pytest.fixture(scope="module")
def small_reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[list, dict, dict]:
    return _reference(SMALL_SET, tmp_path_factory.mktemp("parity"))


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_same_vectors_as_tensorflow(small_reference: tuple[list, dict, dict], runtime: str, tmp_path: Path) -> None:
    # JAX compiles every weight initialiser (~20-60 s a model on a busy 2-core machine): two models here,
    # mobilenetv2 in the GPU check's dry run, all of them in the slow suite.
    _check_parity(small_reference, runtime, tmp_path, ("mobilenetv3small", "efficientnetb0") if runtime == "jax" else None)


@pytest.mark.slow
@pytest.mark.parametrize("model", sorted(BACKBONES))
def test_every_backbone_same_vectors_as_tensorflow(model: str, tmp_path: Path) -> None:
    reference = _reference([(model, max(96, BACKBONES[model].min_size))], tmp_path)
    for runtime in ["jax", "torch"] if HAS_TORCH else ["jax"]:
        _check_parity(reference, runtime, tmp_path)


def test_one_keras_backend_per_process() -> None:
    from imgvec.backbones.device import import_keras

    import_keras("tensorflow")
    with pytest.raises(BadInputError, match="already runs on tensorflow.*new process"):
        import_keras("jax")


def _cli(script: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    code = script + "\nfrom imgvec.cli import main\nsys.argv = ['imgvec', *sys.argv[1:]]\nmain()\n"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def test_keras_backend_set_by_user_is_respected(image_dir: Path, tmp_path: Path) -> None:
    done = _cli("import sys", "embed", str(image_dir), "-o", str(tmp_path / "s.h5"), "--weights", "none",
                "--runtime", "jax", env={"KERAS_BACKEND": "torch"})
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == ("imgvec: error: KERAS_BACKEND=torch is set, but the jax runtime "
                                                    "needs Keras on jax; unset KERAS_BACKEND or choose --runtime torch")


def test_missing_backend_package_names_the_extra(image_dir: Path, tmp_path: Path) -> None:
    absent_jax = WITHOUT_TF.replace('("tensorflow", "openvino")', '("jax", "jaxlib")')
    done = _cli(absent_jax, "embed", str(image_dir), "-o", str(tmp_path / "s.h5"), "--weights", "none",
                "--runtime", "jax")
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("imgvec: error: the jax runtime needs the jax package") and "pip install 'imgvec[jax]'" in last


def test_end_to_end_on_jax_without_tensorflow(image_dir: Path, holdout_dir: Path, tmp_path: Path) -> None:
    """embed -> index -> query -> train -> predict on JAX, TensorFlow and OpenVINO unimportable."""
    store, head = tmp_path / "s.h5", tmp_path / "head.h5"
    some_image = sorted(image_dir.rglob("*.png"))[0]
    steps = [
        ["embed", str(image_dir), "-o", str(store), "--model", "mobilenetv3small", "--weights", "none",
         "--image-size", "64", "--runtime", "jax"],
        ["index", str(store)],
        ["query", str(store), str(some_image), "-k", "3", "-f", "json", "--runtime", "jax"],
        ["train", str(store), "-o", str(head), "--cv", "3"],
        ["predict", str(head), str(holdout_dir), "-f", "json", "--runtime", "jax"],
        ["info", str(store), "-f", "json"],
        # seeded random weights are other numbers on TensorFlow's side: a query through it is refused
        ["query", str(store), str(some_image), "--runtime", "openvino"],
    ]
    # One process, so one model build: CliRunner runs each command; the outcomes come back as JSON.
    code = WITHOUT_TF + f"""
import json
from typer.testing import CliRunner
from imgvec.cli import app
results = []
for args in {json.dumps(steps)}:
    r = CliRunner().invoke(app, args)
    results.append(dict(code=r.exit_code, out=r.stdout, err=r.stderr))
results.append(sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "openvino", "jax")))
print(json.dumps(results))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    *runs, modules = json.loads(done.stdout.strip().splitlines()[-1])
    for args, run in zip(steps[:-1], runs):
        assert run["code"] == 0, (args[0], run)
    assert modules and all(m.split(".")[0] == "jax" for m in modules), modules

    results = json.loads(runs[2]["out"])["queries"][0]["results"]
    assert results[0]["path"].endswith(some_image.name) and results[0]["score"] == pytest.approx(1.0, abs=1e-4)
    predictions = json.loads(runs[4]["out"])["predictions"]
    assert len(predictions) == 12 and sum(Path(p["path"]).parent.name == p["predicted"] for p in predictions) >= 9
    provenance = json.loads(runs[5]["out"])["provenance"]
    assert provenance["runtime"] == "jax" and provenance["runtime_version"] and provenance["tensorflow_version"] == ""

    refused = runs[6]
    assert refused["code"] == 3 and "drawn by jax" in refused["err"] and "--runtime jax" in refused["err"]


def test_gpu_check_dry_run(tmp_path: Path) -> None:
    """benchmarks/gpu_check.sh --dry: the GPU check's whole path on the CPU, on a tiny set."""
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry"], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_check_dry.json").read_text())
    assert results["dry"] and results["machine"]["cpu_count"] and results["images"]["count"] == 32
    decode = results["decode"]  # figures from the clock: held to each other, never to a speed
    assert decode["workers"] == os.cpu_count()
    assert min(decode["pool_images_per_s"], decode["one_thread_images_per_s"]) > 0
    assert decode["pool_speedup"] == pytest.approx(decode["pool_images_per_s"] / decode["one_thread_images_per_s"],
                                                   rel=0.05, abs=0.01)
    assert [b["backend"] for b in results["backends"]] == ["torch", "jax"]
    for entry in results["backends"]:
        if entry["backend"] == "torch" and not HAS_TORCH:
            assert "needs the torch package" in entry["error"]
            continue
        assert "error" not in entry, entry.get("stderr_tail")
        runs = {r["precision"]: r for r in entry["runs"]}
        assert runs["float32"]["images"] == 32 and runs["float32"]["cosine_vs_cpu_min"] >= PARITY
        f32 = runs["float32"]  # throughput over the wall against inside the model: the share spent outside it
        assert 0 <= f32["share_outside_model"] < 1 and 0 < f32["images_per_s"] <= f32["model_images_per_s"]
        assert f32["images_per_s"] / f32["model_images_per_s"] == pytest.approx(1 - f32["share_outside_model"],
                                                                                rel=0.05, abs=0.02)
        # imgvec's verdict on mixed precision agrees with how far those rows really are from float32's
        # (0.999 is its bar, against the backend's own float32; these cosines are against TensorFlow's).
        mixed = runs["mixed"]
        assert mixed["images"] == 32
        if mixed["imgvec_verdict"] == "accepted":
            assert mixed["cosine_vs_cpu_min"] >= PARITY_MIN_COSINE - 1e-4, mixed
        else:
            assert mixed["imgvec_verdict"].startswith("refused: ") and "precision mixed" in mixed["imgvec_verdict"]
            assert (mixed["cosine_vs_cpu_min"] < PARITY_MIN_COSINE + 1e-4 or "overflowed" in mixed["imgvec_verdict"]
                    or "all-zero" in mixed["imgvec_verdict"]), mixed
