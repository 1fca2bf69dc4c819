from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from sklearn.exceptions import NotFittedError
from sklearn.utils.estimator_checks import parametrize_with_checks

from imgvec.vectors.classifier import LogisticHead, load_head, save_head
from imgvec.errors import BadInputError
from imgvec.files.provenance import Provenance


def _blobs(n_per_class: int, classes: list[str], d: int = 16, spread: float = 0.5, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(classes), d)) * 3
    X = np.concatenate([c + spread * rng.normal(size=(n_per_class, d)) for c in centres]).astype(np.float32)
    y = np.repeat(classes, n_per_class)
    return X, y


def _held_out(head_X: np.ndarray, n_per_class: int, classes: list[str], spread: float, seed: int):
    """New points around the SAME class centres as ``_blobs(..., seed=0)`` made, drawn with another seed."""
    centres = np.random.default_rng(0).normal(size=(len(classes), head_X.shape[1])) * 3
    rng = np.random.default_rng(seed)
    X = np.concatenate([c + spread * rng.normal(size=(n_per_class, len(c))) for c in centres]).astype(np.float32)
    return X, np.repeat(classes, n_per_class)


def test_separates_overlapping_classes_and_generalises_to_new_points():
    # Centres 3 apart per axis, spread 2.5: the classes overlap, so accuracy is neither trivially 1
    # nor reachable by memorising the training points (the held-out points are new draws).
    X, y = _blobs(60, ["a", "b", "c"], spread=2.5)
    head = LogisticHead(cv=3).fit(X, y)
    assert 0.6 <= head.cv_accuracy_ < 1.0 and head.C_ in head.Cs_
    Xt, yt = _held_out(X, 200, ["a", "b", "c"], spread=2.5, seed=99)
    assert not np.isin(Xt, X).all(axis=1).any()  # truly held out
    assert head.score(Xt, yt) >= 0.8 and head.score(Xt, yt) >= head.cv_accuracy_ - 0.1
    assert head.score(Xt, np.roll(yt, 200)) < 0.5  # the labels matter: shuffled ones score near chance
    p = head.predict_proba(Xt)
    np.testing.assert_allclose(p.sum(axis=1), 1, rtol=1e-5)
    assert list(head.classes_) == ["a", "b", "c"]


def test_ties_in_accuracy_are_broken_by_log_loss_not_by_flattening():
    X, y = _blobs(20, ["a", "b", "c", "d"])  # every C separates these perfectly
    head = LogisticHead(cv=3).fit(X, y)
    assert head.cv_accuracy_ == 1.0 and head.C_ > min(head.Cs_)
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
    assert head.coef_.shape == ref.coef_.shape == (1, X.shape[1]) and head.intercept_.shape == (1,)
    np.testing.assert_allclose(head.decision_function(X), ref.decision_function(Z), atol=2e-2)


def test_a_binary_head_file_keeps_one_row_per_class(tmp_path: Path):
    """The file format is unchanged: (2, d) rows (-w/2, w/2); in memory scikit-learn's (1, d), exactly back."""
    X, y = _blobs(12, ["cat", "dog"])
    head = LogisticHead(cv=3).fit(X, y)
    prov = Provenance("mobilenetv3small", "random", 0, None, None, 64, "in model", 16)
    save_head(head, tmp_path / "head.h5", prov, "store-1")
    with h5py.File(tmp_path / "head.h5") as h5:
        coef, intercept = h5["coef"][()], h5["intercept"][()]
    np.testing.assert_allclose(coef, np.vstack([-head.coef_[0] / 2, head.coef_[0] / 2]), rtol=1e-6)
    np.testing.assert_allclose(intercept, [-head.intercept_[0] / 2, head.intercept_[0] / 2], rtol=1e-6)
    loaded, _ = load_head(tmp_path / "head.h5")
    assert loaded.coef_.shape == (1, X.shape[1])
    np.testing.assert_allclose(loaded.coef_, head.coef_, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(loaded.decision_function(X), head.decision_function(X), rtol=1e-5, atol=1e-6)


def test_save_load_is_plain_data_and_exact(tmp_path: Path):
    X, y = _blobs(12, ["cat", "dög"])
    head = LogisticHead(cv=3).fit(X, y)
    prov = Provenance("mobilenetv3small", "random", 0, None, None, 64, "in model", 16)
    save_head(head, tmp_path / "head.h5", prov, "store-1")
    loaded, p2 = load_head(tmp_path / "head.h5")
    np.testing.assert_array_equal(loaded.predict_proba(X), head.predict_proba(X))
    assert list(loaded.classes_) == ["cat", "dög"] and p2.key() == prov.key() and loaded.C_ == head.C_
    with h5py.File(tmp_path / "head.h5") as h5:  # only numeric arrays inside: strings are bytes and offsets
        kinds: set[str] = set()
        h5.visititems(lambda name, obj: kinds.add(obj.dtype.kind) if isinstance(obj, h5py.Dataset) else None)
        assert kinds <= {"f", "u"}  # floats, uint8 bytes and uint64 offsets of the classes, uint64 path digests


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


def test_cs_are_learned_in_fit_like_logistic_regression_cv():
    X, y = _blobs(12, ["a", "b"])
    head = LogisticHead(cv=3, Cs=4)
    assert not hasattr(head, "Cs_") and not hasattr(head, "C_grid")
    head.fit(X, y)
    np.testing.assert_allclose(head.Cs_, np.logspace(-4, 4, 4))
    assert head.C_ in head.Cs_ and head.n_features_in_ == X.shape[1]
    np.testing.assert_array_equal(LogisticHead(cv=3, Cs=[1.0, 0.01]).fit(X, y).Cs_, [0.01, 1.0])


def test_unfitted_head_and_wrong_width_fail_clearly(tmp_path: Path):
    X, y = _blobs(12, ["a", "b"])
    with pytest.raises(NotFittedError):
        LogisticHead().predict(X)
    with pytest.raises(NotFittedError):
        save_head(LogisticHead(), tmp_path / "head.h5", Provenance("mobilenetv3small", "random", 0, None, None, 64,
                                                                   "in model", 16))
    head = LogisticHead(cv=3).fit(X, y)
    with pytest.raises(ValueError, match="X has 8 features, but LogisticHead is expecting 16 features"):
        head.predict(X[:, :8])
    prov = Provenance("mobilenetv3small", "random", 0, None, None, 64, "in model", 16)
    loaded, _ = load_head(save_head(head, tmp_path / "head.h5", prov))
    assert loaded.n_features_in_ == 16
    with pytest.raises(ValueError, match="X has 8 features"):  # a loaded head checks the width too
        loaded.predict_proba(X[:, :8])


# Checks that cannot apply to a head that chooses C by stratified 5-fold CV over string class names,
# each with its reason (scikit-learn runs every other check of its suite).
_CV_NEEDS_5_PER_CLASS = "fit runs stratified 5-fold CV, so each class needs 5 samples (BadInputError, by design)"
EXPECTED_FAILED = {
    "check_classifiers_one_label": "one class is refused with BadInputError (an imgvec error, one CLI line), "
                                   "not a ValueError",
    "check_fit2d_1sample": _CV_NEEDS_5_PER_CLASS,
    "check_sample_weight_equivalence_on_dense_data": "fit takes no sample_weight",
}


@parametrize_with_checks([LogisticHead(cv=2, Cs=3)],
                         expected_failed_checks=lambda est: EXPECTED_FAILED)
def test_scikit_learn_estimator_checks(estimator, check):
    check(estimator)


@pytest.mark.parametrize("n_classes", [2, 4])
def test_the_float32_folds_match_scikit_learns_logistic_regression(n_classes):
    """fit_logistic (inspect's and the C search's fits) is scikit-learn's LogisticRegression in float32: the same
    probabilities, and out_of_fold_probabilities the same as cross_val_predict on the same folds."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.preprocessing import StandardScaler

    from imgvec.vectors.classifier import fit_logistic, logistic_probabilities, out_of_fold_probabilities

    rng = np.random.default_rng(0)
    y = rng.integers(0, n_classes, 300)
    X = (rng.standard_normal((300, 24)) + 0.8 * np.eye(n_classes, 24)[y]).astype(np.float32)
    Z = StandardScaler().fit_transform(X).astype(np.float32)
    for C in (1e-3, 0.1, 10.0):
        coef, intercept, _ = fit_logistic([Z[:150], Z[150:]], [y[:150], y[150:]], n_classes, C, 1e-4, 1000)
        expected = LogisticRegression(C=C, tol=1e-4, max_iter=1000).fit(Z, y).predict_proba(Z)
        assert np.abs(logistic_probabilities(Z, coef, intercept) - expected).max() < 1e-3
    expected = cross_val_predict(LogisticRegression(C=0.1, tol=1e-3, max_iter=1000), Z, y,
                                 cv=StratifiedKFold(5, shuffle=True, random_state=0), method="predict_proba")
    assert np.abs(out_of_fold_probabilities(X, y, 0.1) - expected).max() < 1e-3
