"""The user's next steps that had no test: extending approximate indexes, a chosen index file, the memory
budget, merging stores, exact dedup, the "NOT a held-out estimate" warning, a forged embedding size, and
JAX's padded last batch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import imgvec
from imgvec.cli import app
from imgvec.errors import BadInputError, MismatchError
from imgvec.vectors.index import load_index
from imgvec.files.provenance import Provenance
from imgvec.vectors.store import StoreWriter, create_store, open_store

from parity_util import calibrated_weights, calibration_images, cosines


def _run(*args, code: int = 0):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
    return result


def _clustered(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(40, d))
    return (centres[rng.integers(0, 40, n)] + 0.3 * rng.normal(size=(n, d))).astype(np.float32)


# -- indexes -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, min_self_recall", [("hnsw", 0.98), ("ivfpq", 0.5)])
def test_an_approximate_index_is_extended_and_finds_the_new_rows(tmp_path: Path, kind: str, min_self_recall: float):
    x = _clustered(3000, 32)
    path = tmp_path / "s.h5"
    prov = Provenance("mobilenetv3small", "random", 0, None, None, 64, "in model", 32)
    with create_store(path, prov, str(tmp_path)) as w:
        w.append(x[:2500], [f"{i}.png" for i in range(2500)], [""] * 2500)
    built = imgvec.build_index(path, kind)
    assert (built.kind, built.rows, built.updated) == (kind, 2500, False)
    with StoreWriter(path) as w:
        w.append(x[2500:], [f"{i}.png" for i in range(2500, 3000)], [""] * 500)
    extended = imgvec.build_index(path, kind)
    assert (extended.kind, extended.rows, extended.updated, extended.added) == (kind, 3000, True, 500)
    index = load_index(extended.path)
    with open_store(path) as s:
        index.check_covers(s)  # the next query accepts it
    new = np.arange(2500, 3000)
    _, ids = index.search(x[new], 1)
    assert (ids[:, 0] == new).mean() >= min_self_recall  # the added rows are found as themselves


def test_query_uses_the_index_named_by_index(store_path: Path, image_dir: Path, tmp_path: Path):
    custom = tmp_path / "elsewhere.index.h5"
    _run("index", store_path, "--kind", "flat", "-o", custom)
    image = sorted(image_dir.rglob("*.png"))[5]
    top = json.loads(_run("query", store_path, image, "-k", "1", "-f", "json", "--index", custom).stdout)
    assert top["queries"][0]["results"][0]["path"] == str(image)
    missing = _run("query", store_path, image, "--index", tmp_path / "nothing.index.h5", code=2)
    assert "nothing.index.h5" in missing.stderr and "Traceback" not in missing.stderr
    other = tmp_path / "other.h5"  # an index of another store is refused, naming the option's file
    x = _clustered(30, 576)
    with create_store(other, Provenance("mobilenetv3small", "random", 0, None, None, 64, "in model", 576),
                      str(tmp_path)) as w:
        w.append(x, [f"{i}.png" for i in range(30)], [""] * 30)
    _run("index", other, "--kind", "flat")
    refused = _run("query", store_path, image, "--index", tmp_path / "other.index.h5", code=3)
    assert "another store" in refused.stderr and refused.stderr.count("\n") == 1


def test_memory_budget_is_given_in_gib_and_reaches_the_kind_choice(store_path: Path, tmp_path: Path, monkeypatch):
    from imgvec import api

    seen = []
    real = api.choose_kind
    monkeypatch.setattr(api, "choose_kind", lambda kind, rows, dim, budget: seen.append(budget) or real(kind, rows, dim,
                                                                                                          budget))
    summary = _run("index", store_path, "-o", tmp_path / "i.index.h5", "--memory-budget", "0.5")
    assert seen == [2**29] and "flat" in summary.stdout  # 24 rows: exact search whatever the budget


# -- stores ------------------------------------------------------------------------------------
def test_merge_joins_two_stores_and_the_result_is_queried(image_dir: Path, tmp_path: Path, small):
    import shutil

    halves = [tmp_path / "a", tmp_path / "b"]
    for i, half in enumerate(halves):
        for cls in sorted(p for p in image_dir.iterdir() if p.is_dir()):
            for f in sorted(cls.glob("*.png"))[i::2]:
                (half / cls.name).mkdir(parents=True, exist_ok=True)
                shutil.copy(f, half / cls.name / f.name)
    stores = [tmp_path / "a.h5", tmp_path / "b.h5"]
    for half, store in zip(halves, stores):
        imgvec.embed([half], store, **small)
    merged = imgvec.merge(stores, tmp_path / "all.h5")
    assert (merged.rows, merged.inputs) == (24, 2) and "merge" in imgvec.__all__
    with open_store(tmp_path / "all.h5") as s:
        assert s.rows == 24 and sorted(set(s.labels())) == ["blues", "greens", "reds", "yellows"]
    image = sorted((tmp_path / "b").rglob("*.png"))[0]
    r = imgvec.query(tmp_path / "all.h5", [image], k=1)
    assert r.queries[0].results[0].score == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(BadInputError, match="already exists"):
        imgvec.merge(stores, tmp_path / "all.h5")


def test_dedup_exact_searches_every_pair_where_the_default_would_not(store_path: Path, monkeypatch):
    from imgvec.analyses import duplicates

    monkeypatch.setattr(duplicates, "EXACT_MAX_ROWS", 10)  # 24 rows: above it, the default uses inverted lists
    default = json.loads(_run("dedup", store_path, "-f", "json", "--threshold", "0.9").stdout)["groups"]
    exact = _run("dedup", store_path, "--threshold", "0.9", "--exact")
    assert "exact search" in exact.stdout
    assert "exact search" not in _run("dedup", store_path, "--threshold", "0.9").stdout
    as_json = json.loads(_run("dedup", store_path, "-f", "json", "--threshold", "0.9", "--exact").stdout)["groups"]
    assert {tuple(sorted(m["path"] for m in g["images"])) for g in as_json} >= {
        tuple(sorted(m["path"] for m in g["images"])) for g in default}  # exact finds at least what lists find


# -- heads -------------------------------------------------------------------------------------
def test_evaluating_on_training_images_warns_it_is_not_held_out(store_path: Path, image_dir: Path,
                                                                 tmp_path: Path):
    head = tmp_path / "head.h5"
    _run("train", store_path, "-o", head, "--cv", "2")
    seen = _run("evaluate", head, image_dir)
    (warning,) = [line for line in seen.stderr.splitlines() if "WARNING" in line]
    assert "trained on 24 of these 24 images" in warning and "NOT a held-out estimate" in warning


def test_evaluating_on_new_images_does_not_warn(store_path: Path, holdout_dir: Path, tmp_path: Path):
    head = tmp_path / "head.h5"
    _run("train", store_path, "-o", head, "--cv", "2")
    assert "held-out" not in _run("evaluate", head, holdout_dir).stderr


# -- embeddings --------------------------------------------------------------------------------
def test_a_forged_embedding_size_is_refused_before_any_model_is_built():
    forged = Provenance("mobilenetv3small", "random", 0, None, None, 64, "in model", 4096)
    with pytest.raises(MismatchError, match="recorded as 4096-d from mobilenetv3small, which makes 576-d ones"):
        imgvec.Embedder.from_provenance(forged)


PADDED = """
import json, sys
import numpy as np
from imgvec.runtime.keras_backends import load_engine
from imgvec.backbones.registry import get_backbone, parse_weights
engine = load_engine("jax", get_backbone("mobilenetv3small"), parse_weights(sys.argv[1]), 32, "float32", "cpu")
pixels = np.load(sys.argv[2])
full = engine(pixels)            # 8 images: JAX compiles for 8
short = engine(pixels[:5])       # 5 images: padded with zeros to the 8 already compiled
alone = engine(pixels[5:6])      # 1 image: padded to 8 as well
np.savez(sys.argv[3], full=full, short=short, alone=alone, compiled=np.array(sorted(engine._compiled)))
"""


def test_jax_rows_of_a_padded_short_batch_equal_the_unpadded_ones(tmp_path: Path):
    pytest.importorskip("jax")
    weights = calibrated_weights("mobilenetv3small", 32, tmp_path / "w.weights.h5")
    np.save(tmp_path / "pixels.npy", calibration_images(32, n=8, seed=3))
    done = subprocess.run([sys.executable, "-c", PADDED, str(weights), str(tmp_path / "pixels.npy"),
                           str(tmp_path / "rows.npz")], capture_output=True, text=True, timeout=900,
                          env={**__import__("os").environ, "KERAS_BACKEND": "jax"})
    assert done.returncode == 0, done.stderr[-3000:]
    rows = np.load(tmp_path / "rows.npz")
    assert rows["compiled"].tolist() == [8]  # the short batches really were padded, not compiled anew
    assert rows["short"].shape == (5, 576) and rows["alone"].shape == (1, 576)
    assert np.abs(rows["full"]).mean() > 1e-3  # activations of order 1: the cosines mean something
    assert cosines(rows["short"], rows["full"][:5]).min() >= 0.99999
    assert cosines(rows["alone"], rows["full"][5:6]).min() >= 0.99999
