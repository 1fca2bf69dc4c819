"""The imgvec command end to end, through typer's CliRunner and one real subprocess."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from imgvec.cli import app

SMALL_ARGS = ["-m", "mobilenetv3small", "--weights", "none", "--image-size", "64"]


def run(*args: str, code: int = 0):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
    return result


@pytest.fixture(scope="module")
def cli_store(tmp_path_factory, image_dir: Path) -> Path:
    folder = tmp_path_factory.mktemp("cli") / "photos"
    shutil.copytree(image_dir, folder)
    (folder / "reds" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    store = folder.parent / "photos.h5"
    r = run("embed", folder, "-o", store, *SMALL_ARGS, "--batch-size", "8")
    assert "24 images embedded" in r.stdout and "1 skipped" in r.stdout
    assert "skipped reds/broken.jpg" in r.stderr and "RANDOM weights" in r.stderr
    r = run("index", store)
    assert "flat index over 24 rows" in r.stdout
    return store


def test_query_json_self_match_first(cli_store: Path):
    photo = cli_store.parent / "photos" / "blues" / "blues_002.png"
    r = run("query", cli_store, photo, "-k", "4", "--format", "json")
    data = json.loads(r.stdout)
    assert len(data) == 1 and data[0]["query"].endswith("blues/blues_002.png")
    results = data[0]["results"]
    assert [x["rank"] for x in results] == [1, 2, 3, 4]
    assert results[0]["path"] == "blues/blues_002.png" and results[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert set(results[0]) == {"rank", "path", "score"}


def test_query_table_and_csv_say_what_made_them(cli_store: Path):
    folder = cli_store.parent / "photos" / "greens"
    r = run("query", cli_store, folder, "-k", "2")
    assert "RANDOM weights" in r.stdout.splitlines()[0] and r.stdout.count("query:") == 6
    rows = list(csv.DictReader(io.StringIO(run("query", cli_store, folder, "-k", "2", "-f", "csv").stdout)))
    assert len(rows) == 12 and set(rows[0]) == {"query", "rank", "path", "score"}


def test_train_then_predict_json(cli_store: Path, holdout_dir: Path, tmp_path: Path):
    head = tmp_path / "head.h5"
    r = run("train", cli_store, "-o", head, "--cv", "3")
    assert "4 classes, 24 images" in r.stdout and "CV accuracy" in r.stdout
    for name in ("blues", "greens", "reds", "yellows"):
        assert name in r.stdout
    data = json.loads(run("predict", head, holdout_dir, "-f", "json").stdout)
    assert len(data) == 12 and set(data[0]) == {"path", "label", "probabilities"}
    correct = sum(Path(d["path"]).parent.name == d["label"] for d in data)
    assert correct >= 10
    assert sorted(data[0]["probabilities"]) == ["blues", "greens", "reds", "yellows"]


def test_models_and_info(cli_store: Path):
    models = json.loads(run("models", "-f", "json").stdout)
    assert len(models) == 40 and {"name", "input_size", "dim", "params"} <= set(models[0])
    assert {m["name"]: m["dim"] for m in models}["efficientnetb0"] == 1280
    info = json.loads(run("info", cli_store, "-f", "json").stdout)
    assert info["rows"] == 24 and info["skipped"] == 1 and info["labels"]["reds"] == 6
    assert info["provenance"]["weights"] == "random" and info["index"]["state"] == "up to date" and info["kind"] == "store"
    assert "RANDOM weights" in run("info", cli_store).stdout


@pytest.mark.parametrize("args, message", [
    (["embed", "/no/such/folder", "-o", "x.h5"], "no such file or folder"),
    (["embed", ".", "-o", "x.h5", "-m", "resnet9000"], "unknown model 'resnet9000'"),
    (["query", "/no/such.h5", "q.png"], "no such store"),
    (["predict", "/no/head.h5", "q.png"], "no such head file"),
    (["index", "/no/such.h5"], "no such store"),
    (["index", "/no/such.h5", "--faiss-gpu", "on"], "the installed faiss has no GPU support"),
])
def test_bad_input_is_one_line_and_non_zero(args, message, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert result.stderr.strip().startswith("imgvec: error:") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_appending_with_another_backbone_is_refused(tmp_path: Path, image_dir: Path):
    """One store, one embedding space: a second backbone cannot be mixed into it."""
    other = tmp_path / "other.h5"
    run("embed", image_dir, "-o", other, "-m", "mobilenetv2", "--weights", "none", "--image-size", "64")
    r = run("embed", image_dir, "-o", other, *SMALL_ARGS, code=3)
    assert "backbone: mobilenetv2 vs mobilenetv3small" in r.stderr


def test_real_process_entry_point(tmp_path: Path, image_dir: Path):
    """`python -m imgvec` works, keeps stdout clean for JSON, and --help needs no TensorFlow."""
    out = subprocess.run([sys.executable, "-m", "imgvec", "models", "-f", "json"], capture_output=True, text=True,
                         check=True)
    assert len(json.loads(out.stdout)) == 40
    code = "import sys, imgvec.cli; imgvec.cli.app(['--help'], standalone_mode=False); print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("False")


def test_real_process_stderr_has_no_tensorflow_start_up_chatter(tmp_path: Path, image_dir: Path):
    """TensorFlow's native INFO lines (oneDNN, CUDA probing) are not shown; imgvec's own lines are."""
    out = subprocess.run([sys.executable, "-m", "imgvec", "embed", str(image_dir), "-o", str(tmp_path / "s.h5"),
                          *SMALL_ARGS], capture_output=True, text=True, check=True)
    assert "RANDOM weights" in out.stderr
    for noise in ("absl::InitializeLog", "oneDNN custom operations", "cuda", "I0000"):
        assert noise not in out.stderr, out.stderr


def test_device_gpu_without_a_gpu_is_one_line(tmp_path: Path, image_dir: Path):
    result = CliRunner().invoke(app, ["embed", str(image_dir), "-o", str(tmp_path / "s.h5"), *SMALL_ARGS,
                                      "--device", "gpu"])
    assert result.exit_code == 2 and "--device gpu: TensorFlow sees no GPU" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "s.h5").exists()


def test_merge_cli(cli_store: Path, tmp_path: Path):
    r = run("merge", cli_store, cli_store, "-o", tmp_path / "all.h5")
    assert "24 rows from 2 stores (24 duplicate paths dropped" in r.stdout
    info = json.loads(run("info", tmp_path / "all.h5", "-f", "json").stdout)
    assert info["rows"] == 24 and info["provenance"]["precision"] == "float32"
