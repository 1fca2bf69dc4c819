"""Backbone comparison: same folds for every backbone, stores reused, table/JSON/HTML."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import imgvec
from imgvec.backbones.registry import get_backbone
from imgvec.cli import app
from imgvec.analyses.comparison import cross_validate, folds
from imgvec.results import chance_levels

MODELS = ["mobilenetv3small", "mobilenetv2"]


def test_one_split_is_reused_and_checked():
    y = np.array(["a"] * 6 + ["b"] * 6 + ["c"] * 4)
    first, again = folds(y, 3), folds(y, 3)
    assert len(first) == 3 and all(np.array_equal(a[1], b[1]) for a, b in zip(first, again))
    assert sorted(np.concatenate([test for _, test in first]).tolist()) == list(range(16))
    with pytest.raises(imgvec.BadInputError, match="too few in 'c' \\(4\\)"):
        folds(y, 5)
    with pytest.raises(imgvec.BadInputError, match="at least 2 classes"):
        folds(["a"] * 5, 2)


def test_cross_validate_separable_data():
    rng = np.random.default_rng(0)
    y = np.repeat(["a", "b", "c"], 10)
    X = rng.normal(0, 0.3, (30, 8)) + np.repeat(np.eye(3, 8) * 3, 10, axis=0)
    scores, predicted = cross_validate(X, y, folds(y, 5), Cs=3)
    assert len(scores) == 5 and np.mean(scores) == 1.0 and (predicted == y).all()


def test_chance_rows_come_from_the_class_counts():
    """Shares 1/2, 1/4, 1/4: the majority guess is right 1/2 of the time, a guess by the shares sum(p^2) = 3/8,
    with spread sqrt(sum n_c p_c (1 - p_c)) / N over the 24 images (not from repeated folds)."""
    y = np.array(["a"] * 12 + ["b"] * 6 + ["c"] * 6)
    majority, stratified = chance_levels(y)
    assert (majority.name, majority.accuracy, majority.accuracy_std) == ("majority_class", 0.5, 0.0)
    assert majority.description == "chance: always the most common class"
    assert stratified.accuracy == pytest.approx(0.375)
    assert stratified.accuracy_std == pytest.approx(np.sqrt(12 * 0.5 * 0.5 + 2 * 6 * 0.25 * 0.75) / 24)


@pytest.fixture(scope="module")
def compared(tmp_path_factory, image_dir: Path) -> tuple[imgvec.api.Comparison, Path]:
    stores = tmp_path_factory.mktemp("compare") / "stores"
    c = imgvec.compare(image_dir, MODELS, cv=3, stores=stores, weights="none", image_size=64, speed_sample=8,
                       runtime="tensorflow")
    return c, stores


def test_compare_scores_each_backbone_on_the_same_images(compared, image_dir: Path):
    c, stores = compared
    assert [r.backbone for r in c.rows] == MODELS and c.n_images == 24 and c.cv == 3
    assert c.classes == ["blues", "greens", "reds", "yellows"]
    for r in c.rows:
        b = get_backbone(r.backbone)
        assert (r.params, r.dim) == (b.params, b.dim) and r.provenance.is_random
        assert r.provenance.runtime == "tensorflow"  # the runtime asked for embeds every backbone
        assert r.images_per_second > 0 and r.embedded == 24 and r.store == stores / f"{r.backbone}.h5"
        assert len(r.fold_accuracies) == 3 and r.accuracy == pytest.approx(np.mean(r.fold_accuracies))
        assert r.confusion.shape == (4, 4) and r.confusion.sum() == 24
        assert set(r.per_class_f1) == set(c.classes) and r.weakest_f1 == min(r.per_class_f1.values())
    assert c.rows[0].accuracy >= 0.9  # colour classes stay separable even with random weights
    assert [b.name for b in c.chance] == ["majority_class", "stratified_random"]
    assert c.chance[0].accuracy == pytest.approx(0.25) and c.speed_images == 8
    assert c.chance[1].accuracy_std == pytest.approx(np.sqrt(24 * 0.25 * 0.75) / 24)  # from the counts, not folds
    assert "8 images" in c.speed_note and "build and warm-up not counted" in c.speed_note


def test_second_run_reuses_stores_and_gives_the_same_numbers(compared, image_dir: Path, tmp_path: Path):
    c, stores = compared
    out = tmp_path / "report.html"
    r = CliRunner().invoke(app, ["compare", str(image_dir), "--models", ",".join(MODELS), "--cv", "3",
                                 "--stores", str(stores), "--weights", "none", "--image-size", "64",
                                 "-f", "json", "--html", str(out)])
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    backbones = data["backbones"]
    assert [d["new_images_embedded"] for d in backbones] == [0, 0]
    assert [d["accuracy"] for d in backbones] == pytest.approx([x.accuracy for x in c.rows])
    assert [d["fold_accuracies"] for d in backbones] == [x.fold_accuracies for x in c.rows]
    assert all(d["weights"].startswith("RANDOM weights") for d in backbones)
    assert [b["baseline"] for b in data["chance"]] == ["majority_class", "stratified_random"]
    assert data["chance"][0]["accuracy"] == pytest.approx(0.25) and "warm model" in data["images_per_second_measures"]
    page = out.read_text()
    assert page.count('<table class="cm">') == 2 and page.count("<circle") == 2 and "RANDOM WEIGHTS" in page
    assert "chance: always the most common class" in page and "chance (most common class) 0.250" in page



def test_table_and_csv(compared, image_dir: Path, monkeypatch):
    c, _ = compared
    monkeypatch.setattr(imgvec.api, "compare", lambda *a, **k: c)  # the CLI only renders what the API returns
    table = CliRunner().invoke(app, ["compare", str(image_dir), "-m", ",".join(MODELS)])
    assert table.exit_code == 0, table.stderr
    for header in ("backbone", "weights", "parameters", "embedding size", "images/s", "CV accuracy", "weakest class"):
        assert header in table.stdout
    assert "939,120" in table.stdout and "±" in table.stdout
    for name in MODELS:  # every backbone says, in the table and on stderr, that its weights are random
        assert [line for line in table.stdout.splitlines() if f" {name} " in line][0].count("RANDOM (seed 0)") == 1
        assert f"{name} has RANDOM weights" in table.stderr
    assert "chance: always the most common class" in table.stdout and "chance: random by class shares" in table.stdout
    assert "0.250 ± 0.000" in table.stdout  # four balanced classes: the most common class is right a quarter of the time
    assert "images/s: decoding + inference on a warm model (build and warm-up not counted), 8 images" in table.stdout
    rows = CliRunner().invoke(app, ["compare", str(image_dir), "-f", "csv"]).stdout.splitlines()
    assert rows[0].startswith("backbone,weights,params,dim,images_per_second,accuracy,accuracy_std,weakest_class,"
                              "weakest_f1,f1_blues") and len(rows) == 5
    assert rows[3].startswith("chance: always the most common class,,,,,0.250000")


def test_compare_refuses_bad_input(compared, holdout_dir: Path, tmp_path: Path):
    _, stores = compared
    with pytest.raises(imgvec.BadInputError, match="was made from"):
        imgvec.compare(holdout_dir, MODELS[:1], cv=3, stores=stores, weights="none", image_size=64)
    with pytest.raises(imgvec.BadInputError, match="unknown model"):
        imgvec.compare(holdout_dir, ["resnet9000"], stores=tmp_path)
    with pytest.raises(imgvec.BadInputError, match="twice"):
        imgvec.compare(holdout_dir, MODELS[:1] * 2, stores=tmp_path)
    r = CliRunner().invoke(app, ["compare", str(holdout_dir), "-m", "mobilenetv3small", "--cv", "5",
                                 "--stores", str(tmp_path / "s"), "--weights", "none", "--image-size", "64"])
    assert r.exit_code == 2 and "needs at least 5 images per class" in r.stderr
