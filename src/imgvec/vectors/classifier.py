"""A multinomial logistic-regression head on frozen embeddings, saved as plain data.

:class:`LogisticHead` follows scikit-learn's conventions: parameters in ``__init__``,
learned state in attributes ending in ``_`` (set by ``fit`` only), ``check_is_fitted`` and
``n_features_in_``. Fitting standardises the features and lets stratified cross-validation
choose the regularisation strength; prediction is a few numpy lines over the saved
coefficients, so a head file never needs pickle to load. Files are written and read by the
module functions :func:`save_head` and :func:`read_head`/:func:`load_head`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from imgvec.files.artifact import create, open_checked
from imgvec.files.header import Header, get_attr
from imgvec.files.strings import create_strings, decode_keys, read_strings, strings_layout
from imgvec.files.structure import Expect, capped, check_finite, damaged, reading
from imgvec.checks import check_per_class
from imgvec.errors import BadInputError
from imgvec.progress import Phase, Progress, steps
from imgvec.files.h5format import PINNED
from imgvec.files.provenance import Provenance

# Features are standardised first, so C above ~10 is practically unregularised; with
# thousands of correlated CNN features the best C is often 1e-4..1e-2 (measured in
# benchmarks/bench_classifier.py), so the grid reaches two decades below that.
DEFAULT_CS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


class LogisticHead(ClassifierMixin, BaseEstimator):
    """Standardise, then multinomial logistic regression with C chosen by stratified CV.

    A scikit-learn estimator: ``get_params``/``set_params``/``sklearn.base.clone`` work. Like
    ``LogisticRegressionCV``, ``fit`` keeps the strengths it tried (``Cs_``) and the one chosen
    (``C_``), and records how long the C search took (``search_seconds_``) against the final fit
    (``fit_seconds_``).
    """

    def __init__(self, cv: int = 5, Cs: int | Sequence[float] = DEFAULT_CS, max_iter: int = 1000,
                 tol: float = 1e-4, cv_tol: float = 1e-3, random_state: int = 0) -> None:
        self.cv = cv
        self.Cs = Cs
        self.max_iter = max_iter
        self.tol = tol  # the final fit: scikit-learn's default
        self.cv_tol = cv_tol  # looser while choosing C, where only the ranking of the Cs matters
        self.random_state = random_state

    def _validate(self, X: np.ndarray, y: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        X, y = validate_data(self, X, y, dtype=np.float32, reset=True)
        check_classification_targets(y)
        classes, counts = np.unique(y, return_counts=True)
        if len(classes) < 2:
            raise BadInputError(f"need at least 2 classes to train, found {len(classes)}: {list(classes)}")
        check_per_class(classes, counts, self.cv)
        return X, y

    def fit(self, X: np.ndarray, y: Sequence[str], progress: Progress | None = None) -> "LogisticHead":
        """Choose C by CV, then fit on all rows; ``progress`` hears ``choosing C`` (by fold) and ``final fit``."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        X, y = self._validate(X, y)
        started = time.perf_counter()
        scaler = StandardScaler().fit(X)
        Z = scaler.transform(X).astype(np.float32)
        self._search(Z, y, progress)
        self.search_seconds_ = time.perf_counter() - started
        started = time.perf_counter()
        with Phase(progress, "final fit", 1):
            lr = LogisticRegression(C=self.C_, max_iter=self.max_iter, tol=self.tol).fit(Z, y)
        self.fit_seconds_ = time.perf_counter() - started
        self.n_iter_ = lr.n_iter_
        self.classes_ = lr.classes_
        self.mean_ = scaler.mean_.astype(np.float32)
        self.scale_ = scaler.scale_.astype(np.float32)
        # Two classes: one row, (1, d) and (1,), as scikit-learn's (the positive class's score).
        self.coef_, self.intercept_ = lr.coef_.astype(np.float32), lr.intercept_.astype(np.float32)
        self.n_train_ = int(len(y))
        return self

    def choose_C(self, X: np.ndarray, y: Sequence[str], progress: Progress | None = None) -> float:
        """Only the C search of :meth:`fit` (no final fit, so the head is not fitted): the chosen C, with
        ``C_``, ``Cs_``, ``cv_accuracy_``, ``cv_predictions_`` and ``cv_probabilities_`` set as ``fit`` sets them."""
        from sklearn.preprocessing import StandardScaler

        X, y = self._validate(X, y)
        self._search(StandardScaler().fit_transform(X).astype(np.float32, copy=False), y, progress)
        return self.C_

    def _search(self, Z: np.ndarray, y: np.ndarray, progress: Progress | None) -> None:
        from sklearn.metrics import log_loss
        from sklearn.model_selection import StratifiedKFold

        self.Cs_ = Cs = _C_grid(self.Cs)
        folds = list(StratifiedKFold(self.cv, shuffle=True, random_state=self.random_state).split(Z, y))
        # One pass per fold along the C path (warm-started) gives both the CV scores and the
        # out-of-fold predictions; LogisticRegressionCV would need a second pass for the latter.
        paths = [self._path_probabilities(Z[train], y[train], Z[test], Cs)
                 for train, test in steps(progress, "choosing C", folds)]
        classes = np.unique(y)
        predicted = [[classes[p.argmax(1)] for p in probs] for probs in paths]
        accuracy = np.array([[np.mean(p == y[test]) for p in preds] for (_, test), preds in zip(folds, predicted)])
        loss = np.array([[log_loss(y[test], p, labels=classes) for p in probs] for (_, test), probs in zip(folds, paths)])
        # Best mean accuracy; among tied Cs (common on easy data) the best log loss, so the
        # probabilities are not needlessly flattened by the strongest regularisation.
        tied = np.flatnonzero(accuracy.mean(axis=0) >= accuracy.mean(axis=0).max() - 1e-12)
        best = int(tied[np.argmin(loss.mean(axis=0)[tied])])
        self.C_ = float(Cs[best])
        self.cv_accuracy_ = float(accuracy[:, best].mean())
        self.cv_accuracy_std_ = float(accuracy[:, best].std())
        self.cv_predictions_ = np.empty(len(y), dtype=y.dtype)
        self.cv_probabilities_ = np.empty((len(y), len(classes)), np.float32)  # out-of-fold, at C_ (inspect)
        for (_, test), preds, probs in zip(folds, predicted, paths):
            self.cv_predictions_[test] = preds[best]
            self.cv_probabilities_[test] = probs[best]

    def _path_probabilities(self, Z: np.ndarray, y: np.ndarray, Zt: np.ndarray, Cs: np.ndarray) -> list[np.ndarray]:
        """Held-out class probabilities for each C, strongest regularisation first, each fit starting from the last."""
        classes, yi = np.unique(y, return_inverse=True)
        out, w0 = [], None
        for C in Cs:
            coef, intercept, _ = fit_logistic([Z], [yi], len(classes), float(C), self.cv_tol, self.max_iter, w0)
            w0 = np.concatenate([coef, intercept[:, None]], axis=1)
            out.append(logistic_probabilities(Zt, coef, intercept))
        return out

    def _logits(self, X: np.ndarray) -> np.ndarray:
        """One score per class, ``(n, classes)``: a binary head's one score z as (-z/2, z/2), whose softmax
        is exactly sigmoid(z)."""
        z = self.decision_function(X)
        return np.stack([-z / 2, z / 2], axis=1) if z.ndim == 1 else z

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """Class scores, ``(n, classes)``; for two classes the positive class's score ``(n,)``, as scikit-learn's.
        Computed in float64: from float32 inputs and parameters (any finite values, scale above 0) every
        intermediate stays below ~1e130, so no head read from a file can overflow them."""
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float32, reset=False)
        f64 = np.float64
        scores = (((X.astype(f64) - self.mean_.astype(f64)) / self.scale_.astype(f64)) @ self.coef_.T.astype(f64)
                  + self.intercept_.astype(f64))
        return scores[:, 0] if len(self.classes_) == 2 else scores

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        logits = self._logits(X)
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    def predict(self, X: np.ndarray) -> np.ndarray:
        best = np.argmax(self._logits(X), axis=1)  # checks the head is fitted first
        return self.classes_[best]


def _C_grid(Cs: int | Sequence[float]) -> np.ndarray:
    """The inverse regularisation strengths to try, ascending (an int means that many, log-spaced)."""
    if isinstance(Cs, (int, np.integer)):
        return np.logspace(-4, 4, int(Cs))
    return np.sort(np.asarray(Cs, dtype=float))


# -- the plain-data file ----------------------------------------------------------------------
_ARRAYS = ("coef_", "intercept_", "mean_", "scale_")
_SCALARS = {"C_": (int, float), "cv_accuracy_": (int, float), "cv_accuracy_std_": (int, float), "n_train_": int,
            "cv": int, "max_iter": int, "tol": (int, float), "cv_tol": (int, float), "random_state": int}


def save_head(head: LogisticHead, path: str | os.PathLike[str], provenance: Provenance, store_id: str = "",
              generation: int = 0, train_paths: Sequence[str] = ()) -> Path:
    """Write a fitted head's coefficients, classes, scaling and provenance to HDF5 (atomic rename).

    ``train_paths`` (absolute image paths) are kept as 8-byte digests, so ``evaluate`` can
    say how many of the images it scores the head has already seen.
    """
    check_is_fitted(head)
    if len(train_paths) not in (0, head.n_train_):  # the reader refuses any other count
        raise ValueError(f"train_paths: {len(train_paths)} paths for {head.n_train_} training rows")
    header = Header("head", provenance, store_id, generation, int(head.n_train_), provenance.dim)
    arrays = {name: getattr(head, name) for name in _ARRAYS}
    if len(head.classes_) == 2:  # the file keeps one row per class: a binary head's (-w/2, w/2), (-b/2, b/2)
        arrays["coef_"] = np.vstack([-head.coef_[0] / 2, head.coef_[0] / 2])
        arrays["intercept_"] = np.array([-head.intercept_[0] / 2, head.intercept_[0] / 2], np.float32)
    with create(path, header) as h5:
        for name in _ARRAYS:
            h5.create_dataset(name.rstrip("_"), data=arrays[name], **PINNED)
        create_strings(h5, "classes", [str(c) for c in head.classes_])
        h5.create_dataset("train_paths", data=path_digests(train_paths), **PINNED)
        for name in _SCALARS:
            h5.attrs[name] = getattr(head, name)
    return Path(path)


def load_head(path: str | os.PathLike[str]) -> tuple[LogisticHead, Provenance]:
    """Read a head file written by :func:`save_head`; no code is ever executed."""
    head, header = read_head(path)
    return head, header.provenance


def read_head(path: str | os.PathLike[str]) -> tuple[LogisticHead, Header]:
    """The head and its header, validated: shapes agree with the classes and dim, values finite, scales > 0."""
    head, header, _ = _read(path)
    return head, header


def _read(path: str | os.PathLike[str]) -> tuple[LogisticHead, Header, np.ndarray]:
    """The head, its header and the digests of the paths it was trained on."""
    missing = f"no such head file (make one with imgvec train STORE -o {path})"
    with open_checked(path, "head", missing, _classes_layout) as file:
        h5, header = file.h5, file.header
        n = (file.datasets["classes/offsets"].shape[0] - 1 if header.format_version >= 3
             else file.datasets["classes"].shape[0])
        dim = header.dim
        shapes = {"coef_": (n, dim), "intercept_": (n,), "mean_": (dim,), "scale_": (dim,)}
        found = file.check({
            **{name.rstrip("_"): Expect(len(shape), "float32", shape) for name, shape in shapes.items()},
            "train_paths": Expect(1, "uint64", optional=True)})
        digests = found.get("train_paths")
        if digests is not None and digests.shape[0] not in (0, header.rows):
            raise damaged(path, "head", f"'train_paths' holds {digests.shape[0]:,} digests for "
                                        f"{header.rows:,} training rows")
        head = LogisticHead()
        with reading(path, "head"):
            for name in shapes:
                values = np.asarray(found[name.rstrip("_")][()], np.float32)
                setattr(head, name, check_finite(values, path, "head", name.rstrip("_")))
            head.classes_ = np.asarray(read_strings(h5["classes"], path, "head") if header.format_version >= 3
                                       else decode_keys(h5["classes"], n, path, "head"))
            head.n_features_in_ = dim
            train_digests = (np.asarray(digests[()], np.uint64) if digests is not None
                             else np.zeros(0, np.uint64))
            for name, typ in _SCALARS.items():
                # Version 1 files may lack a parameter added since: it keeps its default.
                default = getattr(head, name, 0) if header.format_version == 1 else ...
                setattr(head, name, get_attr(h5.attrs, name, typ, path, "head", default))
    if n < 2 or len(set(head.classes_.tolist())) != n:
        raise damaged(path, "head", f"classes {capped([str(c) for c in head.classes_])} are not 2 or more "
                                    "distinct names")
    if not (head.scale_ > 0).all():
        raise damaged(path, "head", "'scale' has zero or negative values")
    if n == 2:  # one row per class in the file; scikit-learn's one row (the positive class's) in memory
        head.coef_ = (head.coef_[1] - head.coef_[0])[None, :]
        head.intercept_ = head.intercept_[1:] - head.intercept_[:1]
    return head, header, train_digests


def _classes_layout(header: Header) -> dict[str, Expect]:
    """The classes' names: bytes and offsets since format 3, variable-length strings before."""
    return strings_layout("classes") if header.format_version >= 3 else {"classes": Expect(1, "str")}


def seen_in_training(head: str | os.PathLike[str], paths: Sequence[str]) -> int:
    """How many of ``paths`` (absolute image paths) the head in file ``head`` was trained on."""
    digests = _read(head)[2]
    if not len(digests) or not len(paths):
        return 0
    return int(np.isin(path_digests(paths), digests).sum())


def path_digests(paths: Iterable[str]) -> np.ndarray:
    """8-byte BLAKE2b digests of absolute image paths: what a head remembers of its training images."""
    import hashlib

    return np.array([int.from_bytes(hashlib.blake2b(os.fsencode(p), digest_size=8).digest(), "little")
                     for p in paths], dtype=np.uint64)


def out_of_fold_probabilities(X: np.ndarray, y: np.ndarray, C: float, cv: int = 5, random_state: int = 0,
                              max_iter: int = 1000, tol: float = 1e-3, progress: Progress | None = None,
                              overwrite: bool = False) -> np.ndarray:
    """Held-out class probabilities (columns: ``np.unique(y)``) of the head at a fixed ``C``, made as
    :class:`LogisticHead` makes them while choosing C: features standardised, then one logistic regression per
    fold of ``StratifiedKFold(cv, shuffle=True, random_state)`` (:func:`fit_logistic`, scikit-learn's objective
    and L-BFGS settings in float32).

    Memory: one standardised copy of ``X``, its rows ordered fold by fold, so that each fold's training rows
    are two slices of it (no per-fold copy); ``overwrite``: ``X`` may be freed by the caller once this
    starts (it is only read to make that copy)."""
    from sklearn.model_selection import StratifiedKFold

    X = np.asarray(X, np.float32)
    classes, yi = np.unique(np.asarray(y), return_inverse=True)
    folds = [test for _, test in StratifiedKFold(cv, shuffle=True, random_state=random_state).split(X, yi)]
    order = np.concatenate(folds)
    bounds = np.cumsum([0] + [len(f) for f in folds])
    mean = X.mean(axis=0, dtype=np.float64)
    scale = np.sqrt(np.maximum(np.einsum("ij,ij->j", X, X, dtype=np.float64) / len(X) - mean**2, 0))
    scale[scale == 0] = 1.0  # StandardScaler's rule for constant features
    Z = np.empty_like(X)
    for start in range(0, len(X), 8192):  # standardised in blocks, in fold order
        part = order[start : start + 8192]
        Z[start : start + len(part)] = (X[part] - mean) / scale
    yz = yi[order]
    out = np.empty((len(X), len(classes)), np.float32)
    with Phase(progress, "out-of-fold probabilities", cv) as step:
        for f in range(cv):
            a, b = bounds[f], bounds[f + 1]
            coef, intercept, _ = fit_logistic([Z[:a], Z[b:]], [yz[:a], yz[b:]], len(classes), C, tol, max_iter)
            out[order[a:b]] = logistic_probabilities(Z[a:b], coef, intercept)
            step.update(f + 1)
    return out


def fit_logistic(parts: Sequence[np.ndarray], targets: Sequence[np.ndarray], n_classes: int, C: float,
                 tol: float = 1e-4, max_iter: int = 1000, w0: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray, int]:
    """L2-regularised logistic regression on the rows of ``parts`` (float32 blocks, read in place) with class
    indices ``targets``: ``(coef, intercept, iterations)``; multinomial above two classes, else one binomial
    score for class 1, as scikit-learn's ``LogisticRegression(C=C, tol=tol, max_iter=max_iter)``.

    The same objective (mean loss + ||coef||^2 / (2 C n), intercept unpenalised) and the same L-BFGS-B
    settings as scikit-learn's lbfgs solver, but the matrix products run in float32: scikit-learn's
    takes float64 weights from the optimiser, so each evaluation makes a float64 copy of the features (two
    copies of 100k x 1280 per step, measured: most of inspect's time in its out-of-fold fits).
    ``w0``: a starting point, ``(k, d + 1)`` (warm start), as returned in ``coef``/``intercept``."""
    from scipy.optimize import minimize
    from scipy.special import expit

    d = parts[0].shape[1]
    k = 1 if n_classes == 2 else n_classes
    n = sum(len(t) for t in targets)
    l2 = 1.0 / (C * n)

    def loss_grad(w: np.ndarray) -> tuple[float, np.ndarray]:
        W = w.reshape(k, d + 1)
        coef32, b = W[:, :d].astype(np.float32), W[:, d]
        loss = 0.0
        grad = np.zeros((k, d + 1))
        for Z, t in zip(parts, targets):
            if not len(t):
                continue
            raw = (Z @ coef32.T).astype(np.float64) + b
            if k == 1:
                r = raw[:, 0]
                loss += float(np.sum(np.logaddexp(0, r) - t * r))
                g = (expit(r) - t)[:, None]
            else:
                top = raw.max(axis=1, keepdims=True)
                e = np.exp(raw - top)
                total = e.sum(axis=1, keepdims=True)
                loss += float(np.sum(np.log(total[:, 0]) + top[:, 0] - raw[np.arange(len(t)), t]))
                g = e / total
                g[np.arange(len(t)), t] -= 1.0
            grad[:, :d] += (g.astype(np.float32).T @ Z) / n
            grad[:, d] += g.sum(axis=0) / n
        loss = loss / n + 0.5 * l2 * float(np.sum(W[:, :d] ** 2))
        grad[:, :d] += l2 * W[:, :d]
        return loss, grad.ravel()

    start = np.zeros(k * (d + 1)) if w0 is None else np.asarray(w0, np.float64).ravel()
    result = minimize(loss_grad, start, method="L-BFGS-B", jac=True,
                      options={"maxiter": max_iter, "maxls": 50, "gtol": tol, "ftol": 64 * np.finfo(float).eps})
    W = result.x.reshape(k, d + 1)
    return W[:, :d].copy(), W[:, d].copy(), int(result.nit)


def logistic_probabilities(Z: np.ndarray, coef: np.ndarray, intercept: np.ndarray) -> np.ndarray:
    """Class probabilities ``(n, classes)`` of standardised rows ``Z`` under :func:`fit_logistic`'s parameters."""
    raw = (Z @ coef.T.astype(np.float32)).astype(np.float64) + intercept
    if coef.shape[0] == 1:
        raw = np.concatenate([-raw / 2, raw / 2], axis=1)  # softmax of (-z/2, z/2) is sigmoid(z)
    raw -= raw.max(axis=1, keepdims=True)
    p = np.exp(raw)
    return p / p.sum(axis=1, keepdims=True)
