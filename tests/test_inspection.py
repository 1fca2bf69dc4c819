"""imgvec inspect: every section finds what was planted in generated images, and fails when it is not there.

One store of colour-class images (mobilenetv3small, random weights, 64 px: colour classes stay separable)
with planted label noise (images moved to another class folder), outliers (a blank and a noise image),
images that are dark, blurry, tiny or very wide, and one store split into train/ and test/ folders with
a test image copied from train (identical bytes) and one re-encoded (a near duplicate).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter
from typer.testing import CliRunner

import imgvec
from imgvec.analyses.inspection import confident_learning, find_label_issues, leaks, robust_z, stat_flags
from imgvec.results import DuplicateGroup, Member

MOVED = {"greens/moved_red0.png": "reds", "greens/moved_red1.png": "reds", "yellows/moved_blue0.png": "blues"}
OUTLIERS = ("blues/blank.png", "reds/noise.png")
FLAGGED = {"greens/dark.png": "dark", "yellows/blurry.png": "blurry", "greens/tiny.png": "tiny",
           "blues/wide.png": "extreme aspect"}


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory, small: dict) -> Path:
    from imgvec.synthetic import make_image_folder

    root = make_image_folder(tmp_path_factory.mktemp("inspect") / "photos", per_class=15, size=64, seed=0)
    for i, (new, _) in enumerate(MOVED.items()):
        old = {"greens/moved_red0.png": "reds/reds_000.png", "greens/moved_red1.png": "reds/reds_001.png",
               "yellows/moved_blue0.png": "blues/blues_000.png"}[new]
        shutil.move(root / old, root / new)
    rng = np.random.default_rng(1)
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(root / OUTLIERS[0])
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / OUTLIERS[1])
    Image.fromarray(np.full((64, 64, 3), 12, np.uint8)).save(root / "greens/dark.png")
    Image.open(root / "yellows/yellows_003.png").filter(ImageFilter.GaussianBlur(3)).save(root / "yellows/blurry.png")
    Image.open(root / "greens/greens_004.png").resize((20, 20)).save(root / "greens/tiny.png")
    Image.open(root / "blues/blues_004.png").resize((256, 64)).save(root / "blues/wide.png")
    store = root.parent / "photos.h5"
    imgvec.embed([root], store, **small)
    return store


@pytest.fixture(scope="module")
def report(planted: Path) -> imgvec.api.InspectResult:
    return imgvec.inspect(planted, map_rows=40)


@pytest.fixture(scope="module")
def split_store(tmp_path_factory: pytest.TempPathFactory, small: dict) -> Path:
    from imgvec.synthetic import make_image_folder

    root = tmp_path_factory.mktemp("splits") / "data"
    make_image_folder(root / "train", per_class=5, size=64, seed=2, classes=("reds", "blues"))
    make_image_folder(root / "test", per_class=3, size=64, seed=3, classes=("reds", "blues"))
    shutil.copy(root / "train/reds/reds_002.png", root / "test/reds/copied.png")
    Image.open(root / "train/blues/blues_001.png").save(root / "test/blues/reencoded.jpg", quality=92)
    store = root.parent / "data.h5"
    imgvec.embed([root], store, **small)
    return store


def _keys(result, section: str) -> list[str]:
    return [os.path.relpath(r["path"], result.root) for r in result.section_records(section)]


def test_planted_label_noise_is_found_with_the_right_suggestion(report):
    issues = {i.path: i for i in report.label_issues}
    top = _keys(report, "label_issues")[: 2 * len(MOVED)]
    assert set(MOVED) <= set(top), top
    for path, origin in MOVED.items():
        assert issues[path].suggested == origin
        assert issues[path].label == path.split("/")[0]
    scores = [i.score for i in report.label_issues]
    assert scores == sorted(scores, reverse=True)


def test_planted_outliers_rank_first(report):
    ranked = _keys(report, "outliers")
    assert set(OUTLIERS) <= set(ranked[:3]), ranked[:5]
    assert all(o.score > 3.5 for o in report.outliers)


def test_dark_blurry_tiny_and_wide_images_are_flagged(report):
    flags = {f.path: f.flags for f in report.image_stats}
    for path, flag in FLAGGED.items():
        assert flag in flags.get(path, []), (path, flags.get(path))
    assert "reds/reds_003.png" not in flags
    assert report.stats_missing == 0 and "image_stats" not in report.skipped_sections


def test_copies_across_splits_are_leaks_exact_copies_apart(split_store):
    r = imgvec.inspect(split_store, map_rows=None)
    found = {(x.path, x.other): x for x in r.leaks}
    exact = found.get(("test/reds/copied.png", "train/reds/reds_002.png"))
    assert exact is not None and exact.kind == "exact" and exact.across == "split" and exact.score == 1.0
    near = [x for x in r.leaks if {x.path, x.other} == {"test/blues/reencoded.jpg", "train/blues/blues_001.png"}]
    assert near and near[0].kind == "near" and near[0].across == "split", r.leaks[:5]
    assert {x.split for x in near + [exact]} | {x.other_split for x in near + [exact]} == {"train", "test"}
    assert "splits" in r.skipped_sections["label_issues"]  # the top folders are splits, not classes
    assert r.map is None


def test_the_html_report_renders_every_section(report, split_store, tmp_path):
    page = imgvec.inspect_page(report)
    for title in ("Label issues", "Outliers", "Leaks across splits", "Image statistics", "Map"):
        assert title in page
    assert "RANDOM WEIGHTS" in page and "mobilenetv3small" in page  # banner and provenance line
    assert page.count("data:image/jpeg;base64,") >= len(MOVED) + len(OUTLIERS) + len(FLAGGED)
    assert "moved_red0.png" in page and "<svg" in page and page.count("<circle") >= report.map.rows.size
    assert "→ reds?" in page
    other = imgvec.inspect(split_store, map_rows=None)
    path = imgvec.inspect_html(other, tmp_path / "split.html")
    text = path.read_text()
    assert "Not run:" in text and "splits, not classes" in text and "No outliers found." in text


def test_the_cli_json_shape(planted):
    from imgvec.cli.commands import app

    out = CliRunner().invoke(app, ["inspect", str(planted), "--format", "json", "--map-rows", "0"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert data["store"] == os.path.abspath(planted) and os.path.isabs(data["root"])
    for section in ("label_issues", "outliers", "leaks", "image_stats"):
        entries = data[section]
        assert entries, section
        assert all(os.path.isabs(e["path"]) and os.path.exists(e["path"]) for e in entries)
        scores = [e["score"] for e in entries]
        assert scores == sorted(scores, reverse=True), section
    assert all({"label", "suggested"} <= set(e) for e in data["label_issues"])
    assert data["map"] is None
    assert {os.path.relpath(e["path"], data["root"]) for e in data["label_issues"]} >= set(MOVED)


def test_the_cli_table_and_html(planted, tmp_path):
    from imgvec.cli.commands import app

    out = CliRunner().invoke(app, ["inspect", str(planted), "--map-rows", "20", "--html", str(tmp_path / "r.html")])
    assert out.exit_code == 0, out.output
    for heading in ("## label issues", "## outliers", "## leaks", "## image stats", "## map"):
        assert heading in out.stdout
    assert "moved_blue0.png" in out.stdout
    assert (tmp_path / "r.html").read_text().count("<circle") >= 20


def test_a_store_without_statistics_says_so_and_stats_adds_them(planted, tmp_path):
    import h5py

    old = tmp_path / "old.h5"
    shutil.copy(planted, old)
    with h5py.File(old, "r+") as h5:  # as a store made before embed recorded statistics
        del h5["stats"]
    before = imgvec.inspect(old, map_rows=None, check_files=False)
    assert "--stats" in before.skipped_sections["image_stats"] and before.stats_missing == before.rows
    assert before.image_stats == []
    after = imgvec.inspect(old, map_rows=None, check_files=False, stats=True)
    assert after.stats_missing == 0 and "image_stats" not in after.skipped_sections
    assert {f.path for f in after.image_stats} >= set(FLAGGED)
    with imgvec.open_store(old) as s, imgvec.open_store(planted) as p:
        np.testing.assert_allclose(s.stats(), p.stats(), rtol=1e-5)  # the same figures as embed recorded


@pytest.mark.parametrize("forge", ["inf", "negative", "half", "huge", "shape"])
def test_forged_statistics_are_refused(planted, tmp_path, forge):
    import h5py

    bad = tmp_path / "bad.h5"
    shutil.copy(planted, bad)
    with h5py.File(bad, "r+") as h5:
        stats = h5["stats"][()]
        if forge == "shape":
            del h5["stats"]
            h5.create_dataset("stats", data=stats[:, :4])
        else:
            stats[3, 2] = {"inf": np.inf, "negative": -1.0, "half": np.nan, "huge": 1e30}[forge]
            h5["stats"][:] = stats
    with pytest.raises(imgvec.BadInputError, match="stats"):
        with imgvec.open_store(bad) as s:
            s.stats()


def test_statistics_are_measured_inside_the_decoding_reservation(tmp_path):
    """load_image_stats decodes under the serve budget's reservation (house's reserve=) like load_image, counting
    the grey copy pixel_stats holds; the figures are the same with or without one."""
    from contextlib import contextmanager

    from PIL import Image

    from imgvec.files.images import decode_cost, load_image, load_image_stats

    path = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 120, 3), np.uint8)).save(path)
    held: list[int] = []
    inside: list[bool] = []

    @contextmanager
    def reserve(cost):
        held.append(cost)
        inside.append(True)
        yield
        inside.append(False)

    pixels, stats = load_image_stats(str(path), 64, reserve=reserve)
    plain, plain_stats = load_image_stats(str(path), 64)
    np.testing.assert_array_equal(pixels, plain)
    np.testing.assert_array_equal(stats, plain_stats)
    assert stats[:2].tolist() == [120, 90] and inside == [True, False]
    with Image.open(path) as im:
        assert held == [decode_cost(im, 64, path.stat().st_size, (120, 90)) + 120 * 90]
    np.testing.assert_array_equal(load_image(str(path), 64, reserve=reserve), plain)
    assert held[1] == held[0] - 120 * 90  # load_image measures nothing: no grey copy reserved


def test_confident_learning_from_the_paper():
    # Class thresholds are the mean probability of each class over its own images; off-diagonal = issues.
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.2, 0.8], [0.7, 0.3]])
    given = np.array([0, 0, 1, 1, 1])
    thresholds, joint, confident = confident_learning(probs, given)
    np.testing.assert_allclose(thresholds, [0.85, 0.6])
    assert confident.tolist() == [0, -1, 1, 1, -1]  # 0.8 < t_0 and 0.2 < t_1: no confident label
    assert joint.tolist() == [[1, 0], [0, 2]]
    noisy = np.array([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.1, 0.9], [0.95, 0.05]])
    issues, score, confident = find_label_issues(noisy, noisy, given)
    assert issues.tolist() == [4] and confident[4] == 0 and score[4] == pytest.approx(0.95)


def test_leaks_need_the_pair_itself_above_the_threshold():
    v = np.array([[1, 0, 0], [0.96, 0.28, 0], [0.85, 0.53, 0]], np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    group = DuplicateGroup("near", [Member("train/a/x.png", 1.0), Member("a/y.png", 0.96), Member("test/a/z.png", 0.85)])
    row_of = {"train/a/x.png": 0, "a/y.png": 1, "test/a/z.png": 2}
    assert leaks([group], v, row_of, ["a", "a", "a"], threshold=0.95) == []  # x~y~z, but x and z are apart
    found = leaks([group], v, row_of, ["a", "a", "a"], threshold=0.8)
    assert [(x.path, x.other, x.across) for x in found] == [("test/a/z.png", "train/a/x.png", "split")]


def test_statistics_flags_and_robust_z_units():
    stats = np.array([[640, 480, 120, 50, 300], [640, 480, 10, 5, 300], [30, 30, 120, 50, 300],
                      [1000, 100, 120, 50, 300], [640, 480, 120, 50, 2], [np.nan] * 5], np.float32)
    flags = {f.path: f.flags for f in stat_flags(stats, list("abcdef"))}
    assert flags == {"b": ["dark"], "c": ["tiny"], "d": ["extreme aspect"], "e": ["blurry"]}
    z = robust_z(np.array([1.0, 1.1, 0.9, 1.0, 5.0]))
    assert z.argmax() == 4 and z[4] > 3.5 and abs(z[0]) < 1


def test_dedup_html_says_when_the_threshold_catches_most_pairs(planted):
    d = imgvec.dedup(planted, threshold=0.1, check_files=False)
    assert d.degenerate
    assert "do not tell these images apart" in imgvec.dedup_page(d)
    assert "do not tell these images apart" not in imgvec.dedup_page(imgvec.dedup(planted, threshold=0.999,
                                                                                  check_files=False))


def test_a_trained_head_gives_its_C_and_finds_the_same_noise(planted, tmp_path):
    trained = imgvec.train(planted, tmp_path / "head.h5")
    r = imgvec.inspect(planted, head=tmp_path / "head.h5", map_rows=None, check_files=False)
    assert f"C={trained.C:g}: the head's C" in r.methods["label_issues"]
    assert set(MOVED) <= {i.path for i in r.label_issues[: 2 * len(MOVED)]}


def test_a_large_store_chooses_C_on_a_sample(planted, monkeypatch):
    from imgvec.analyses import inspection

    monkeypatch.setattr(inspection, "C_SEARCH_ROWS", 40)
    r = imgvec.inspect(planted, map_rows=None, check_files=False)
    assert "on a stratified sample of 40 images" in r.methods["label_issues"]
    assert set(MOVED) <= {i.path for i in r.label_issues[: 2 * len(MOVED)]}


def _provenance(dim: int = 8):
    from imgvec.files.provenance import Provenance

    return Provenance("mobilenetv3small", "random", 0, None, None, 64, "tf", dim)


def test_statistics_travel_through_the_journal_and_rows_before_them_are_unmeasured(tmp_path):
    from imgvec.files.journal import Record, _decode, _encode
    from imgvec.vectors.store import StoreWriter, create_store, open_store

    rng = np.random.default_rng(0)
    emb = rng.normal(size=(3, 8)).astype(np.float32)
    stats = np.array([[64, 48, 100, 20, 300]] * 3, np.float32)
    back = _decode(_encode(Record(emb, ["a", "b", "c"], ["", "", ""], stats=stats)), dim=8)
    np.testing.assert_array_equal(back.stats, stats)
    assert _decode(_encode(Record(emb, ["a", "b", "c"], ["", "", ""])), dim=8).stats is None  # older records
    bad = stats.copy()
    bad[1, 3] = np.inf
    with pytest.raises(imgvec.BadInputError, match="image statistics"):
        _decode(_encode(Record(emb, ["a", "b", "c"], ["", "", ""], stats=bad)), dim=8)

    path = tmp_path / "s.h5"
    with create_store(path, _provenance(), str(tmp_path)) as w:  # rows from before statistics were recorded
        w.append(emb, ["a", "b", "c"], ["", "", ""])
    with open_store(path) as s:
        assert not s.has_stats and s.stats() is None
    with StoreWriter(path) as w:  # resumed by an embed that records them
        w.append(emb[:2], ["d", "e"], ["", ""], stats=stats[:2])
    with open_store(path) as s:
        got = s.stats()
        assert np.isnan(got[:3]).all() and (got[3:] == stats[:2]).all()
    r = imgvec.inspect(path, map_rows=None, check_files=False)
    assert r.stats_missing == 3 and "image_stats" not in r.skipped_sections


def test_an_image_in_the_wrong_class_folder_is_no_outlier_but_one_from_elsewhere_is():
    """Outliers are far from every class: an image near another class's centroid (moved to a wrong folder: a
    label issue) ranks below one near no class at all. Measured against its own class's centroid, it ranked above."""
    from imgvec.analyses.inspection import outlier_scores

    rng = np.random.default_rng(0)
    d = 32
    axes = np.eye(d, dtype=np.float32)
    a = axes[0] + 0.05 * rng.standard_normal((40, d)).astype(np.float32)
    b = axes[1] + 0.05 * rng.standard_normal((40, d)).astype(np.float32)
    moved = axes[1] + 0.05 * rng.standard_normal(d).astype(np.float32)  # a b image in a's folder
    elsewhere = 0.6 * axes[0] + 0.8 * axes[2]  # near no class, filed as a
    x = np.vstack([a, b, moved, elsewhere]).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = ["a"] * 40 + ["b"] * 40 + ["a", "a"]
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    scores = -np.sort(-sims, axis=1)[:, :5]
    z, _, d_class = outlier_scores(x, scores, labels)
    assert np.argmax(z) == 81  # the image from elsewhere first
    assert z[80] < z[81] and d_class[80] < 0.05  # the moved one is near a class (b's)
