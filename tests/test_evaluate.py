"""Evaluating a head on held-out data: a folder or a store, refusing other backbones."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import imgvec
from imgvec.cli import app


@pytest.fixture(scope="module")
def head(tmp_path_factory, store_path: Path) -> Path:
    return imgvec.train(store_path, tmp_path_factory.mktemp("eval") / "head.h5", cv=3).head


def test_evaluate_on_a_folder(head: Path, holdout_dir: Path):
    e = imgvec.evaluate(head, holdout_dir)
    assert e.n_images == 12 and e.accuracy >= 0.9 and e.labels == e.classes == ["blues", "greens", "reds", "yellows"]
    assert e.confusion.shape == (4, 4) and e.confusion.sum() == 12 and e.confusion.trace() == round(e.accuracy * 12)
    tp = np.diag(e.confusion)
    f1 = 2 * tp / (e.confusion.sum(axis=0) + e.confusion.sum(axis=1))  # per class, from the confusion matrix
    assert e.report["reds"]["support"] == 3 and e.report["macro avg"]["f1-score"] == pytest.approx(f1.mean())
    assert e.provenance.is_random and e.unknown == {}
    # 4 classes, 3 images each: the majority guess is right 1/4 of the time; a random guess by the class shares
    # expects 4 * (1/4)**2 = 1/4, spread sqrt(12 * 1/4 * 3/4) / 12 = 0.125
    assert [(c.name, c.accuracy, c.accuracy_std) for c in e.chance] == [
        ("majority_class", 0.25, 0.0), ("stratified_random", 0.25, pytest.approx(0.125))]


def test_evaluate_on_a_store_made_the_same_way(head: Path, holdout_dir: Path, tmp_path: Path, small):
    store = tmp_path / "holdout.h5"
    imgvec.embed([holdout_dir], store, **small)
    assert imgvec.evaluate(head, store).accuracy == pytest.approx(imgvec.evaluate(head, holdout_dir).accuracy)


def test_predict_on_a_labelled_store_marks_right_and_wrong(head: Path, holdout_dir: Path, tmp_path: Path, small):
    """A store of labelled images needs no embedding: its rows are predicted, its labels are the truth."""
    store = tmp_path / "holdout.h5"
    imgvec.embed([holdout_dir], store, **small)
    preds = imgvec.predict(head, [store])
    assert len(preds.predictions) == 12 and all(p.truth == Path(p.path).parent.name for p in preds.predictions)
    assert preds.accuracy == pytest.approx(imgvec.evaluate(head, store).accuracy)
    r = CliRunner().invoke(app, ["predict", str(head), str(store)])
    assert r.exit_code == 0 and f"accuracy {preds.accuracy:.3f}" in r.stdout
    other = tmp_path / "other.h5"
    imgvec.embed([holdout_dir / "reds"], other, model="mobilenetv2", weights="none", image_size=64)
    r = CliRunner().invoke(app, ["predict", str(head), str(other)])
    assert r.exit_code == 3 and "predict on its images instead" in r.stderr


def test_store_from_another_backbone_is_refused(head: Path, holdout_dir: Path, tmp_path: Path):
    other = tmp_path / "other.h5"
    imgvec.embed([holdout_dir], other, model="mobilenetv2", weights="none", image_size=64)
    with pytest.raises(imgvec.MismatchError, match="backbone: mobilenetv3small vs mobilenetv2"):
        imgvec.evaluate(head, other)
    r = CliRunner().invoke(app, ["evaluate", str(head), str(other)])
    assert r.exit_code == 3 and "(--model mobilenetv3small, --image-size 64, --weights none, --seed 0)" in r.stderr


def test_unknown_classes_count_as_wrong(head: Path, holdout_dir: Path, tmp_path: Path):
    folder = tmp_path / "holdout"
    shutil.copytree(holdout_dir, folder)
    shutil.copytree(holdout_dir / "reds", folder / "purples")
    e = imgvec.evaluate(head, folder)
    assert e.unknown == {"purples": 3} and e.labels[-1] == "purples" and e.n_images == 15
    assert e.confusion[-1].sum() == 3 and e.confusion[-1, -1] == 0 and e.accuracy <= 12 / 15
    assert e.chance[0].accuracy == pytest.approx(3 / 15)


def test_evaluate_cli_table_json_html(head: Path, holdout_dir: Path, tmp_path: Path):
    runner = CliRunner()
    out = tmp_path / "eval.html"
    r = runner.invoke(app, ["evaluate", str(head), str(holdout_dir), "--html", str(out)])
    assert r.exit_code == 0, r.stderr
    assert "precision" in r.stdout and "confusion matrix" in r.stdout and r.stdout.strip().splitlines()[-1].startswith(
        "accuracy ") and "on 12 images" in r.stdout
    assert r.stdout.strip().splitlines()[-1].endswith("on 12 images (chance: 0.250 always guessing the most common "
                                                      "class, 0.250 ± 0.125 guessing by the class shares)")
    page = out.read_text()
    assert '<table class="cm">' in page and "RANDOM WEIGHTS" in page
    assert "Chance on the same images: 0.250 always guessing the most common class, 0.250 &#177; 0.125" in page
    data = json.loads(runner.invoke(app, ["evaluate", str(head), str(holdout_dir), "-f", "json"]).stdout)
    assert data["images"] == 12 and len(data["confusion"]) == 4 and "reds" in data["report"]
    assert [(c["baseline"], c["accuracy"], c["accuracy_std"]) for c in data["chance"]] == [
        ("majority_class", 0.25, 0.0), ("stratified_random", 0.25, 0.125)]
    assert data["head"] == str(head) and data["data"] == str(holdout_dir) and data["skipped"] == []
    for args, message in [([str(tmp_path / "nope")], "no such file or folder"), ([str(head)], "is an imgvec head file, not a store")]:
        r = runner.invoke(app, ["evaluate", str(head), *args])
        assert r.exit_code == 2 and message in r.stderr


def test_empty_label_folder_is_refused(head: Path, holdout_dir: Path, tmp_path: Path):
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(holdout_dir / "reds" / "reds_000.png", flat / "a.png")
    with pytest.raises(imgvec.BadInputError, match="no labelled images"):
        imgvec.evaluate(head, flat)
