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
from imgvec.analyses import duplicates
from imgvec.analyses.duplicates import UnionFind, candidate_blocks, cosines, link_similar
from imgvec.vectors.index import normalized

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


def _components(n: int, pairs) -> list[list[int]]:
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    pairs = np.asarray(sorted(pairs), dtype=np.int64).reshape(-1, 2)
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    return sorted(g for g in (np.flatnonzero(label == c).tolist() for c in np.unique(label)) if len(g) > 1)


def _groups(x: np.ndarray, t: float, exact: bool | None = None) -> tuple[list[list[int]], duplicates.NearSearch]:
    sets = UnionFind(len(x))
    found = link_similar(x, t, sets, exact=exact)
    return sorted(g.tolist() for g in sets.groups()), found


def _confirmed(x: np.ndarray, t: float, exact: bool | None = None) -> set[tuple[int, int]]:
    _, blocks = candidate_blocks(x, t, exact=exact)
    got = set()
    for i, j in blocks:
        ok = cosines(x, i, j) >= t
        got.update(zip(i[ok].tolist(), j[ok].tolist()))
    return got


@pytest.mark.parametrize("dim, t", [(256, 0.9), (256, 0.97), (40, 0.95)])
def test_groups_are_exactly_the_brute_force_groups(dim: int, t: float):
    x = _clustered(3000, dim)
    want = _brute(x, t)
    assert len(want) > 20 and _confirmed(x, t) == want  # the projected search misses no pair
    groups, found = _groups(x, t)
    assert groups == _components(len(x), want)
    assert found.method == "exact" and len(want) <= found.candidates and found.checked <= found.candidates


def test_inverted_lists_find_near_duplicates_and_nothing_false():
    x = _clustered(5000, 256, seed=4)
    got, want = _confirmed(x, 0.95, exact=False), _brute(x, 0.95)
    assert got <= want and len(got) >= 0.99 * len(want) > 50
    assert _groups(x, 0.95, exact=False)[1].method.startswith("inverted lists")
    assert _groups(x[:100], 0.95)[1].method == "exact"


def test_union_find_makes_transitive_groups():
    sets = UnionFind(12)
    sets.union(np.array([0, 5]), np.array([1, 6]))
    sets.union(np.array([1, 8, 9]), np.array([2, 9, 5]))
    assert sorted(g.tolist() for g in sets.groups()) == [[0, 1, 2], [5, 6, 8, 9]]
    assert UnionFind(5).groups() == []


def test_threshold_out_of_range_is_refused():
    with pytest.raises(imgvec.BadInputError, match="between -1 and 1"):
        link_similar(np.eye(3, dtype=np.float32), 1.5, UnionFind(3))


@pytest.fixture(scope="module")
def near_identical_store(tmp_path_factory) -> Path:
    """2,000 vectors all within cosine 0.99 of each other: every one of the 1,999,000 pairs is a near duplicate."""
    from imgvec.files.provenance import Provenance
    from imgvec.vectors.store import StoreWriter

    path = tmp_path_factory.mktemp("near") / "near.h5"
    rng = np.random.default_rng(0)
    x = rng.standard_normal(576).astype(np.float32) + 0.01 * rng.standard_normal((2000, 576)).astype(np.float32)
    with StoreWriter(path, Provenance("mobilenetv2", "random", 0, None, None, 224, "tf", 576), str(path.parent)) as w:
        w.append(x, [f"img_{i:04d}.jpg" for i in range(2000)], [""] * 2000)
    return path


def test_degenerate_store_is_one_group_without_holding_its_pairs(near_identical_store: Path, monkeypatch):
    """Memory is bounded by blocks, not by the 1,999,000 pairs: counted through the pair hooks."""
    monkeypatch.setattr(duplicates, "TILE", 200)  # tiles of at most 40,000 pairs
    blocks, confirmed = [], []
    real_blocks, real_cosines = duplicates.candidate_blocks, duplicates.cosines

    def counted_blocks(*args, **kwargs):
        method, it = real_blocks(*args, **kwargs)
        return method, ((blocks.append(len(i)), (i, j))[1] for i, j in it)

    def counted_cosines(vectors, i, j):
        confirmed.append(len(i))
        return real_cosines(vectors, i, j)

    monkeypatch.setattr(duplicates, "candidate_blocks", counted_blocks)
    monkeypatch.setattr(duplicates, "cosines", counted_cosines)
    d = imgvec.dedup(near_identical_store, threshold=0.95, check_files=False)
    assert [len(g.members) for g in d.groups] == [2000] and d.groups[0].members[0].path == "img_0000.jpg"
    assert all(0.95 <= m.score <= 1.0 for m in d.groups[0].members)
    assert d.degenerate and d.share_above == 1.0
    assert sum(blocks) == 1_999_000 and max(blocks) <= 200 * 200 and len(blocks) == 55  # every pair seen, tile by tile
    assert sum(confirmed) - duplicates.DEGENERATE_SAMPLE < 1_999_000 / 10  # pairs already grouped: not confirmed
    r = CliRunner().invoke(app, ["dedup", str(near_identical_store), "--no-hash", "-f", "json"])
    assert r.exit_code == 0 and len(json.loads(r.stdout)["groups"][0]["images"]) == 2000
    assert "100% of all pairs of images are above --threshold 0.95" in r.stderr


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
    data = json.loads(r.stdout)["groups"]
    assert [g["kind"] for g in data] == ["exact", "near"]
    assert data[0]["images"][0]["path"] == str(dup_store.parent / "photos" / "reds" / TRICKY)
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
def test_100k_vectors_on_inverted_lists():
    x = _clustered(100_000, 576, seed=1)
    groups, found = _groups(x, 0.95)  # inverted lists above 20,000 rows
    assert found.method.startswith("inverted lists") and sum(len(g) - 1 for g in groups) >= 3000


def test_large_groups_list_the_rest_by_name(dup_store: Path, monkeypatch):
    from imgvec.pages import html

    monkeypatch.setattr(html, "GROUP_THUMBNAILS", 1)
    page = imgvec.dedup_page(imgvec.dedup(dup_store, threshold=0.99))
    assert page.count("data:image/jpeg;base64,") == 2 and page.count("and 1 more:") == 2
    assert "blues/blues_001_resaved.jpg" in page
