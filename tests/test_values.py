"""Numbers read from files are checked for what they are used for: finite is not enough when a value
overflows float32 once squared (a store row scoring 0 against everything) or multiplied (a head's NaN
probabilities); and JSON never carries NaN or Infinity."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from imgvec.cli import app
from imgvec.errors import BadInputError
from imgvec.files.values import MAX_ABS_VALUE, unusable_rows


def _strict_json(text: str):
    def refuse(name: str):
        raise AssertionError(f"JSON carries {name}")

    return json.loads(text, parse_constant=refuse)


def test_unusable_rows_are_nan_inf_and_values_whose_squares_overflow():
    rows = np.ones((5, 4), np.float32)
    rows[1, 2] = np.nan
    rows[2, 0] = -np.inf
    rows[3, 3] = 1e30  # finite, but its square is inf in float32
    rows[4, 1] = -MAX_ABS_VALUE  # the bound itself is usable
    assert unusable_rows(rows).tolist() == [False, True, True, True, False]
    assert unusable_rows(np.zeros((0, 4), np.float32)).tolist() == []  # an empty batch (every image skipped)
    assert np.isfinite(np.linalg.norm(np.full((1, 4096), MAX_ABS_VALUE, np.float32), axis=1)).all()


def test_a_store_row_that_overflows_is_one_line_not_zero_scores(store_path: Path, image_dir: Path, tmp_path: Path):
    import h5py

    store = Path(shutil.copy(store_path, tmp_path / "big.h5"))
    with h5py.File(store, "r+") as h5:
        h5["embeddings"][3] = np.full(h5["embeddings"].shape[1], 1e30, np.float32)
    image = sorted((image_dir / "reds").iterdir())[0]
    for args in (["query", str(store), str(image), "-k", "3"], ["dedup", str(store)]):
        r = CliRunner().invoke(app, args)
        assert r.exit_code in (2, 3), (args, r.exit_code, r.stdout)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "out-of-range" in lines[0] and "row 3" in lines[0], r.stderr


def test_a_query_vector_that_overflows_is_refused_not_scored_zero():
    from imgvec.vectors.index import normalized

    with pytest.raises(BadInputError, match="out-of-range"):
        normalized(np.full((2, 8), 3e19, np.float32))
    ok = normalized(np.full((2, 8), 1e15, np.float32))
    assert np.allclose(np.linalg.norm(ok, axis=1), 1.0)


def test_an_index_whose_vectors_overflow_never_answers(store_path: Path):
    import faiss

    from imgvec.vectors.index import VectorIndex
    from imgvec.vectors.store import open_store

    with open_store(store_path) as store:
        prov = store.provenance
    for value in (1e30, 3e38):  # scores far from cosines, and scores that overflow
        flat = faiss.IndexFlatIP(prov.dim)
        flat.add(np.full((4, prov.dim), value, np.float32))  # a forged blob may hold this: its check reads no vector
        index = VectorIndex(flat, "flat", 4, "x", prov)
        with pytest.raises(BadInputError, match="not unit length"):
            index.search(np.ones((1, prov.dim), np.float32), 2)
    flat = faiss.IndexFlatIP(prov.dim)
    flat.add(np.eye(4, prov.dim, dtype=np.float32))
    scores, ids = VectorIndex(flat, "flat", 4, "x", prov).search(np.ones((1, prov.dim), np.float32), 2)
    assert ids.shape == (1, 2) and np.all(np.abs(scores) <= 1.0 + 1e-6)


def test_a_head_with_huge_finite_values_gives_probabilities_or_one_line(store_path: Path, holdout_dir: Path,
                                                                         tmp_path: Path):
    import h5py

    import imgvec

    head = tmp_path / "head.h5"
    imgvec.train(store_path, head, cv=2, Cs=[1.0])
    with h5py.File(head, "r+") as h5:
        coef = h5["coef"][()]
        # within the stored-value bound, yet in float32 (x - mean) / scale @ coef overflows to inf, then NaN
        h5["coef"][...] = np.sign(coef) * MAX_ABS_VALUE
        h5["scale"][...] = np.float32(1e-30)
    r = CliRunner().invoke(app, ["predict", str(head), str(holdout_dir), "-f", "json"])
    assert r.exit_code == 0, r.stderr
    for p in _strict_json(r.stdout)["predictions"]:
        probs = np.array(list(p["probabilities"].values()))
        assert np.isfinite(probs).all() and abs(probs.sum() - 1) < 1e-6, p
    with h5py.File(head, "r+") as h5:
        h5["coef"][0, 0] = np.float32(3e38)  # finite, past the bound: the head is refused, never used
    r = CliRunner().invoke(app, ["predict", str(head), str(holdout_dir), "-f", "json"])
    assert r.exit_code == 2 and "out-of-range" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_json_never_carries_nan_or_infinity():
    from imgvec.pages.report import to_json

    data = {"C": float("nan"), "rows": [1.5, float("inf"), {"x": -float("inf")}], "arr": np.array([np.nan, 2.0])}
    assert _strict_json(to_json(data)) == {"C": None, "rows": [1.5, None, {"x": None}], "arr": [None, 2.0]}
    assert _strict_json(to_json({"a": 1.0})) == {"a": 1.0}
