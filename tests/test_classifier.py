from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from imgvec.classifier import LogisticHead, load_head
from imgvec.errors import BadInputError
from imgvec.provenance import Provenance


def _blobs(n_per_class: int, classes: list[str], d: int = 16, spread: float = 0.5, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(classes), d)) * 3
    X = np.concatenate([c + spread * rng.normal(size=(n_per_class, d)) for c in centres]).astype(np.float32)
    y = np.repeat(classes, n_per_class)
    return X, y


def test_separates_separable_classes_and_reports_cv():
    X, y = _blobs(30, ["a", "b", "c"])
    head = LogisticHead(cv=3).fit(X, y)
    assert head.cv_accuracy_ >= 0.98 and head.C_ > 0
    Xt, yt = _blobs(10, ["a", "b", "c"], seed=0)
    assert head.score(Xt, yt) >= 0.98
    p = head.predict_proba(Xt)
    np.testing.assert_allclose(p.sum(axis=1), 1, rtol=1e-5)
    assert list(head.classes_) == ["a", "b", "c"]


def test_ties_in_accuracy_are_broken_by_log_loss_not_by_flattening():
    X, y = _blobs(20, ["a", "b", "c", "d"])  # every C separates these perfectly
    head = LogisticHead(cv=3).fit(X, y)
    assert head.cv_accuracy_ == 1.0 and head.C_ > min(head.C_grid())
    assert head.predict_proba(X).max(axis=1).min() > 0.9  # confident, not near 1/4


def test_agrees_with_sklearn_on_noisy_data():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    X, y = _blobs(40, ["x", "y", "z", "w"], spread=3.0)
    head = LogisticHead(cv=3, Cs=[0.1]).fit(X, y)
    Z = StandardScaler().fit_transform(X)
    ref = LogisticRegression(C=0.1, max_iter=1000).fit(Z, y)
    np.testing.assert_allclose(head.predict_proba(X), ref.predict_proba(Z), atol=2e-3)


def test_binary_head_matches_sklearn_probabilities():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    X, y = _blobs(30, ["no", "yes"], spread=2.0)
    head = LogisticHead(cv=3, Cs=[1.0]).fit(X, y)
    Z = StandardScaler().fit_transform(X)
    ref = LogisticRegression(C=1.0, max_iter=1000).fit(Z, y)
    np.testing.assert_allclose(head.predict_proba(X), ref.predict_proba(Z), atol=2e-3)


def test_save_load_is_plain_data_and_exact(tmp_path: Path):
    X, y = _blobs(12, ["cat", "dög"])
    head = LogisticHead(cv=3).fit(X, y)
    prov = Provenance("mobilenetv3small", "random", 0, None, None, 64, "in model", 16)
    head.save(tmp_path / "head.h5", prov, "store-1")
    loaded, p2 = load_head(tmp_path / "head.h5")
    np.testing.assert_array_equal(loaded.predict_proba(X), head.predict_proba(X))
    assert list(loaded.classes_) == ["cat", "dög"] and p2.key() == prov.key() and loaded.C_ == head.C_
    with h5py.File(tmp_path / "head.h5") as h5:  # only numeric arrays and strings inside
        kinds = {h5[k].dtype.kind for k in h5}
        assert kinds <= {"f", "O", "u"}  # floats, strings, uint64 digests of the training paths


def test_validation_messages():
    X, y = _blobs(4, ["a", "b"])
    with pytest.raises(BadInputError, match="needs at least 5 images per class"):
        LogisticHead(cv=5).fit(X, y)
    with pytest.raises(BadInputError, match="at least 2 classes"):
        LogisticHead(cv=2).fit(X, ["a"] * len(X))


def test_is_a_scikit_learn_estimator_clone_and_params_work():
    from sklearn.base import clone
    from sklearn.model_selection import cross_val_score

    head = LogisticHead(cv=3, Cs=(0.1, 1.0), random_state=7)
    assert head.get_params()["Cs"] == (0.1, 1.0) and head.set_params(cv=2).cv == 2
    copy = clone(head)
    assert copy is not head and copy.get_params() == head.get_params() and not hasattr(copy, "coef_")
    X, y = _blobs(12, ["a", "b"])
    scores = cross_val_score(head, X, y, cv=3)  # scikit-learn clones and fits it per fold
    assert scores.mean() >= 0.9
