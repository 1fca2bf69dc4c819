"""Result objects as plain data that render themselves: chance levels, records, small helpers."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import numpy as np
import pytest

from imgvec.files.provenance import Provenance
from imgvec.results import (Chance, DedupResult, DuplicateGroup, Member, Neighbour, Prediction, Predictions,
                            QueryResult, QueryResults, SkippedFiles, chance_levels, chance_sentence)

PROV = Provenance("mobilenetv3small", "random", 0, None, None, 64, "mobilenet_v3", 576)


def test_chance_levels_by_hand_on_a_small_imbalanced_set():
    # 3 'a', 1 'b': shares 3/4, 1/4. Majority: always 'a', right 3 of 4 times, exactly.
    # Random by class shares: each 'a' is right with p 3/4, the 'b' with p 1/4:
    #   expected (3 * 3/4 + 1 * 1/4) / 4 = 10/16 = 0.625 (= (3/4)**2 + (1/4)**2),
    #   variance (3 * 3/4 * 1/4 + 1 * 1/4 * 3/4) / 16 = 0.75 / 16, std = sqrt(0.75) / 4.
    majority, rand = chance_levels(["a", "b", "a", "a"])
    assert (majority.name, majority.accuracy, majority.accuracy_std) == ("majority_class", 0.75, 0.0)
    assert rand.name == "stratified_random" and rand.accuracy == pytest.approx(0.625)
    assert rand.accuracy_std == pytest.approx(math.sqrt(0.75) / 4)
    assert chance_sentence([majority, rand]) == ("chance: 0.750 always guessing the most common class, "
                                                 "0.625 ± 0.217 guessing by the class shares")


def test_chance_on_the_issue_split_matches_a_seeded_simulation():
    """44/56: the guesser expects 0.507 (not 0.527) and varies by about 0.05 (not 0.001)."""
    labels = ["cat"] * 44 + ["dog"] * 56
    majority, rand = chance_levels(labels)
    assert majority.accuracy == 0.56
    assert rand.accuracy == pytest.approx(0.44**2 + 0.56**2) and round(rand.accuracy, 3) == 0.507
    rng = np.random.default_rng(0)
    y = np.asarray(labels)
    guesses = rng.choice(["cat", "dog"], size=(20_000, len(y)), p=[0.44, 0.56])
    simulated = (guesses == y).mean(axis=1)
    assert rand.accuracy == pytest.approx(simulated.mean(), abs=0.002)
    assert rand.accuracy_std == pytest.approx(simulated.std(), rel=0.03) and rand.accuracy_std > 0.04


def test_prediction_top_k_most_probable_first():
    p = Prediction("/x/a.png", "b", {"a": 0.2, "b": 0.5, "c": 0.3})
    assert p.top(2) == [("b", 0.5), ("c", 0.3)] and p.top(10)[-1] == ("a", 0.2)


def _dedup(root: str) -> DedupResult:
    exact = DuplicateGroup("exact", [Member("reds/a.png", 1.0), Member("reds/copy.png", 1.0)], "f" * 64)
    near = DuplicateGroup("near", [Member("reds/a.png", 1.0), Member("/elsewhere/b.jpg", 0.97)])
    return DedupResult(Path("photos.h5"), PROV, 0.95, 10, [exact, near], 5, [], 0.1, root=root)


def test_dedup_identical_group_and_records(tmp_path: Path):
    d = _dedup(str(tmp_path))
    assert d.identical_group("reds/copy.png") == 1 and d.identical_group("/elsewhere/b.jpg") is None
    records = d.to_records()
    assert records["root"] == str(tmp_path) and records["store"] == str(Path("photos.h5").resolve())
    near = records["groups"][1]
    assert [i["path"] for i in near["images"]] == [str(tmp_path / "reds" / "a.png"), "/elsewhere/b.jpg"]
    assert [i["identical_files_group"] for i in near["images"]] == [1, None]  # a.png stands for its copies
    assert records["groups"][0]["images"][1]["identical_files_group"] is None  # not inside its own group
    assert [row[2] for row in d.csv_rows()] == [i["path"] for g in records["groups"] for i in g["images"]]
    assert len(d.csv_columns()) == len(d.csv_rows()[0])


def test_query_records_name_the_root_and_open_from_anywhere(tmp_path: Path):
    r = QueryResults(PROV, [QueryResult("/q/x.png", [Neighbour(1, "blues/b.png", 0.9, "blues"),
                                                      Neighbour(2, "/outside/c.png", 0.8)])],
                     [("/q/broken.jpg", "cannot identify image file")], "flat", Path("s.h5"), str(tmp_path))
    rec = r.to_records()
    assert rec["root"] == str(tmp_path) and rec["skipped"] == [{"path": "/q/broken.jpg",
                                                                "reason": "cannot identify image file"}]
    assert [n["path"] for n in rec["queries"][0]["results"]] == [str(tmp_path / "blues" / "b.png"), "/outside/c.png"]
    assert [row[2] for row in r.csv_rows()] == [str(tmp_path / "blues" / "b.png"), "/outside/c.png"]
    assert r.search == "exact search in memory (no index file)"  # no index file was searched
    json.dumps(rec)  # JSON-ready as it is: no default= needed


def test_predictions_and_skipped_files_records(tmp_path: Path):
    p = Predictions(PROV, ["a", "b"], [Prediction("/x/a/1.png", "a", {"a": 0.9, "b": 0.1}, "a")],
                    [("/x/bad.png", "empty file")], Path("head.h5"))
    rec = p.to_records()
    assert rec["skipped"] == [{"path": "/x/bad.png", "reason": "empty file"}] and rec["accuracy"] == 1.0
    assert rec["predictions"] == [{"path": "/x/a/1.png", "predicted": "a", "true": "a", "correct": True,
                                   "probabilities": {"a": 0.9, "b": 0.1}}]
    assert p.csv_columns() == ["path", "predicted", "true", "correct", "a", "b"]
    s = SkippedFiles(Path("s.h5"), str(tmp_path), [("reds/x.jpg", "truncated")])
    assert s.to_records()["skipped"] == [{"path": str(tmp_path / "reds" / "x.jpg"), "reason": "truncated"}]
    assert s.csv_rows() == [(str(tmp_path / "reds" / "x.jpg"), "truncated")]
    json.dumps(rec)


def test_results_module_is_plain_data():
    """results imports no other imgvec module at run time (so no store, index, artifact or model code)."""
    tree = ast.parse(Path(__file__).parents[1].joinpath("src/imgvec/results.py").read_text())
    runtime_imports = set()
    for node in tree.body:  # top level only: the TYPE_CHECKING block is an `if`, not an import
        if isinstance(node, ast.ImportFrom):
            runtime_imports.add(("." * node.level) + (node.module or ""))
        elif isinstance(node, ast.Import):
            runtime_imports.update(a.name for a in node.names)
    assert not {m for m in runtime_imports if m.startswith(".")}, runtime_imports
    assert runtime_imports <= {"__future__", "math", "os", "dataclasses", "pathlib", "typing", "numpy"}


def test_chance_record_shape():
    assert Chance("majority_class", 0.5, 0.0).to_record() == {
        "baseline": "majority_class", "description": "chance: always the most common class", "accuracy": 0.5,
        "accuracy_std": 0.0}
