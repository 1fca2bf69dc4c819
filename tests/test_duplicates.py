"""Near-duplicate search: exact against brute force, groups, files, CLI formats."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import imgvec
from imgvec.cli import app
from imgvec.duplicates import components, similar_pairs
from imgvec.index import normalized

SMALL_ARGS = ["-m", "mobilenetv3small", "--weights", "none", "--image-size", "64"]
TRICKY = 'copy of <img src=x onerror=alert(1)> & "x".png'


def _clustered(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """Low-rank structure plus noise, with planted near copies at several distances."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n, 16)) @ rng.standard_normal((16, dim)) + 0.5 * rng.standard_normal((n, dim))
    x = normalized(base)
    copies = rng.choice(n, n // 10, replace=False)
    x[copies[: len(copies) // 2]] = normalized(x[copies[len(copies) // 2:]] + rng.uniform(0.05, 0.5, (len(copies) // 2, 1))
                                               * normalized(rng.standard_normal((len(copies) // 2, dim))))
    return normalized(x)


def _brute(x: np.ndarray, t: float) -> set[tuple[int, int]]:
    sims = x @ x.T
    i, j = np.nonzero(np.triu(sims >= t, k=1))
    return set(zip(i.tolist(), j.tolist()))


@pytest.mark.parametrize("dim, t", [(256, 0.9), (256, 0.97), (40, 0.95)])
def test_pairs_are_exactly_the_brute_force_pairs(dim: int, t: float):
    x = _clustered(3000, dim)
    found = similar_pairs(x, t)
    got = set(map(tuple, found.pairs.tolist()))
    want = _brute(x, t)
    assert len(want) > 20 and got == want
    assert np.all(found.scores >= t) and found.candidates >= len(want)


def test_inverted_lists_find_near_duplicates_and_nothing_false():
    x = _clustered(5000, 256, seed=4)
    found = similar_pairs(x, 0.95, exact=False)
    got, want = set(map(tuple, found.pairs.tolist())), _brute(x, 0.95)
    assert found.method.startswith("inverted lists") and similar_pairs(x[:100], 0.95).method == "exact"
    assert got <= want and len(got) >= 0.99 * len(want) > 50


def test_components_are_transitive_groups():
    pairs = np.array([[0, 1], [1, 2], [5, 6], [8, 9], [9, 5]])
    groups = sorted(g.tolist() for g in components(12, pairs))
    assert groups == [[0, 1, 2], [5, 6, 8, 9]]
    assert components(5, np.zeros((0, 2), np.int64)) == []


def test_threshold_out_of_range_is_refused():
    with pytest.raises(imgvec.BadInputError, match="between -1 and 1"):
        similar_pairs(np.eye(3, dtype=np.float32), 1.5)


@pytest.fixture(scope="module")
def dup_store(tmp_path_factory, image_dir: Path, small) -> Path:
    folder = tmp_path_factory.mktemp("dedup") / "photos"
    shutil.copytree(image_dir, folder)
    shutil.copy(folder / "reds" / "reds_000.png", folder / "reds" / TRICKY)  # byte-identical
    Image.open(folder / "blues" / "blues_001.png").save(folder / "blues" / "blues_001_resaved.jpg", quality=90)
    store = folder.parent / "photos.h5"
    imgvec.embed([folder], store, **small)
    return store


def test_exact_and_near_duplicates_in_a_store(dup_store: Path):
    d = imgvec.dedup(dup_store, threshold=0.99)
    assert d.rows == 26 and not d.missing
    assert [(g.kind, g.paths) for g in d.groups] == [
        ("exact", [f"reds/{TRICKY}", "reds/reds_000.png"]),
        ("near", ["blues/blues_001.png", "blues/blues_001_resaved.jpg"]),
    ]
    assert len(d.groups[0].sha256) == 64 and d.groups[1].members[1].score >= 0.99
    assert (d.exact_groups, d.near_groups) == (1, 1)
    # Without hashing, the identical files are found as near duplicates (similarity 1).
    nohash = imgvec.dedup(dup_store, threshold=0.99, check_files=False)
    assert {tuple(g.paths) for g in nohash.groups} == {tuple(g.paths) for g in d.groups}
    assert all(g.kind == "near" for g in nohash.groups)


def test_dedup_cli_formats(dup_store: Path):
    runner = CliRunner()
    r = runner.invoke(app, ["dedup", str(dup_store), "--threshold", "0.99", "-f", "json"])
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    assert [g["kind"] for g in data] == ["exact", "near"] and data[0]["images"][0]["path"] == f"reds/{TRICKY}"
    r = runner.invoke(app, ["dedup", str(dup_store), "-t", "0.99", "-f", "csv"])
    assert r.stdout.splitlines()[0] == "group,kind,path,score,sha256,identical_files_group,found_by"
    assert len(r.stdout.splitlines()) == 5
    r = runner.invoke(app, ["dedup", str(dup_store), "-t", "0.99"])
    assert "1 group of identical files (sha256), 1 group of near duplicates" in r.stdout and "RANDOM" in r.stderr
    r = runner.invoke(app, ["dedup", str(dup_store), "-t", "0.99", "-f", "html"])
    assert r.stdout.startswith("<!DOCTYPE html>") and "&lt;img src=x onerror=alert(1)&gt;" in r.stdout
    assert "<img src=x" not in r.stdout and r.stdout.count("data:image/jpeg;base64,") == 4
    r = runner.invoke(app, ["dedup", str(dup_store), "-f", "xml"])
    assert r.exit_code == 2


@pytest.mark.slow
def test_100k_vectors_in_reasonable_time():
    import time

    x = _clustered(100_000, 576, seed=1)
    start = time.perf_counter()
    found = similar_pairs(x, 0.95)  # inverted lists above 20,000 rows
    assert time.perf_counter() - start < 60 and len(found.pairs) >= 3000


def test_large_groups_list_the_rest_by_name(dup_store: Path, monkeypatch):
    from imgvec import html

    monkeypatch.setattr(html, "GROUP_THUMBNAILS", 1)
    page = imgvec.dedup_page(imgvec.dedup(dup_store, threshold=0.99))
    assert page.count("data:image/jpeg;base64,") == 2 and page.count("and 1 more:") == 2
    assert "blues/blues_001_resaved.jpg" in page
