"""Backbone comparison on the user's own labelled images.

For each backbone: embed the folder into ``<stores>/<backbone>.h5`` (an existing store is
resumed, so nothing is embedded twice), time embedding on a sample of the images, then
cross-validate a logistic-regression head. One ``StratifiedKFold`` split, made once from the
labels, is used for every backbone, with rows aligned by image path, so the accuracies are
measured on exactly the same train/test partitions.

Each fold fits :class:`~imgvec.classifier.LogisticHead` on the training part (which picks C
by its own inner cross-validation, as ``imgvec train`` does) and scores the held-out part:
the reported accuracy is a nested-CV estimate of what ``imgvec train`` would give.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from .backbones import get_backbone
from .errors import BadInputError, param
from .ingest import embed
from .progress import Phase, Progress, steps
from .provenance import Provenance
from .results import Baseline, BackboneScore, Comparison
from .store import open_store

__all__ = ["DEFAULT_MODELS", "Baseline", "BackboneScore", "Comparison", "chance_baselines", "compare",
           "cross_validate", "folds", "images_per_second"]

DEFAULT_MODELS = ("vgg16", "inceptionv3", "resnet50", "efficientnetb0")
SPEED_SAMPLE = 64
INNER_CV = 3


def machine_description() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}"


def folds(labels: Sequence[str], cv: int, random_state: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """The one stratified split every backbone is scored on."""
    from sklearn.model_selection import StratifiedKFold

    y = np.asarray(labels)
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        raise BadInputError(f"need at least 2 classes (subfolders) to compare, found {len(classes)}")
    if cv < 2:
        raise BadInputError(f"{param('cv')} must be at least 2, not {cv}")
    small = [f"{str(c)!r} ({n})" for c, n in zip(classes, counts) if n < cv]
    if small:
        raise BadInputError(f"{param('cv')} {cv} needs at least {cv} images per class; too few in {', '.join(small)}")
    splitter = StratifiedKFold(cv, shuffle=True, random_state=random_state)
    return list(splitter.split(np.zeros(len(y)), y))


def cross_validate(X: np.ndarray, y: np.ndarray, split: list[tuple[np.ndarray, np.ndarray]], Cs: int | Sequence[float] | None = None,
                   random_state: int = 0, progress: Progress | None = None, name: str = "") -> tuple[list[float], np.ndarray]:
    """Per-fold accuracy and out-of-fold predictions of a :class:`LogisticHead` on ``split``.

    ``progress`` hears the phase ``cross-validating <name>``, one step per fold.
    """
    from .classifier import DEFAULT_CS, LogisticHead  # scikit-learn: imported only when a head is fitted

    Cs = DEFAULT_CS if Cs is None else Cs
    predicted = np.empty(len(y), dtype=object)
    scores = []
    for train, test in steps(progress, f"cross-validating {name}".strip(), split):
        inner = max(2, min(INNER_CV, int(np.unique(y[train], return_counts=True)[1].min())))
        head = LogisticHead(cv=inner, Cs=Cs, random_state=random_state).fit(X[train], y[train])
        predicted[test] = head.predict(X[test])
        scores.append(float(np.mean(predicted[test] == y[test])))
    return scores, predicted.astype(str)


def chance_baselines(y: np.ndarray, split: list[tuple[np.ndarray, np.ndarray]], random_state: int = 0
                     ) -> list[Baseline]:
    """Accuracy of guesses that never look at an image, on ``split``: what a backbone's accuracy must beat."""
    from sklearn.dummy import DummyClassifier

    out = []
    for name, strategy in (("majority_class", "most_frequent"), ("stratified_random", "stratified")):
        scores = []
        for train, test in split:
            dummy = DummyClassifier(strategy=strategy, random_state=random_state).fit(np.zeros((len(train), 1)), y[train])
            scores.append(float(dummy.score(np.zeros((len(test), 1)), y[test])))
        out.append(Baseline(name, float(np.mean(scores)), float(np.std(scores)), scores))
    return out


def images_per_second(provenance: Provenance, files: Sequence[str], batch_size: int = 32,
                      runtime: str = "auto") -> float:
    """Decode + embed throughput on ``files`` after one warm-up batch (model build not counted)."""
    from .embedder import Embedder

    embedder = Embedder.from_provenance(provenance, batch_size=batch_size, runtime=runtime).load()
    warm = list(files[: min(len(files), 4)])
    for _ in embedder.embed_files(warm):
        pass
    start = time.perf_counter()
    done = 0
    for batch in embedder.embed_files(list(files)):
        done += len(batch.indices)
    seconds = time.perf_counter() - start
    return done / seconds if seconds > 0 else 0.0


def load_labelled(store_path: Path) -> tuple[dict[str, int], list[str], np.ndarray, Provenance]:
    """Row of each labelled key, labels and embeddings of a store."""
    with open_store(store_path) as s:
        keys, labels = s.paths(), s.labels()
        X = s.embeddings()
        prov = s.provenance
    return {k: i for i, (k, lab) in enumerate(zip(keys, labels)) if lab}, labels, X, prov


def compare(
    labelled_dir: str | os.PathLike[str],
    models: Sequence[str] = DEFAULT_MODELS,
    cv: int = 5,
    stores: str | os.PathLike[str] = "imgvec-compare",
    weights: str | None = "imagenet",
    image_size: int | None = None,
    batch_size: int = 32,
    seed: int = 0,
    random_state: int = 0,
    speed_sample: int = SPEED_SAMPLE,
    Cs: int | Sequence[float] | None = None,
    runtime: str = "auto",
    progress: Progress | None = None,
) -> Comparison:
    """Embed ``labelled_dir`` with each backbone and cross-validate a head on each, same folds.

    ``progress`` hears each backbone's phases: ``embedding with``, ``cross-validating`` (by fold), ``timing``.
    """
    from sklearn.metrics import classification_report, confusion_matrix

    from .images import find_images

    start = time.perf_counter()
    models = [get_backbone(m).name for m in models]  # unknown names fail before any work
    if not models:
        raise BadInputError(f"{param('models')}: give at least one backbone")
    if len(set(models)) != len(models):
        raise BadInputError(f"{param('models')} lists a backbone twice: {', '.join(models)}")
    collection = find_images([labelled_dir])
    if not collection.labelled:
        raise BadInputError(f"{labelled_dir}: no labels; put the images in one subfolder per class")
    stores = Path(stores)
    stores.mkdir(parents=True, exist_ok=True)
    wanted = {f.key for f in collection.files if f.label}
    loaded = []
    for name in models:
        path = stores / f"{name}.h5"
        if path.exists():
            with open_store(path) as s:
                if os.path.abspath(s.root) != os.path.abspath(collection.root):
                    raise BadInputError(f"{path} was made from {s.root}, not {labelled_dir}; "
                                        f"pass another {param('stores')} folder for this data set")
        summary = embed([labelled_dir], path, model=name, weights=weights, image_size=image_size,
                            batch_size=batch_size, seed=seed, runtime=runtime, progress=progress)
        rows, labels, X, prov = load_labelled(path)
        loaded.append((name, path, summary.added, rows, labels, X, prov))
        wanted &= set(rows)
    # Same images, same order, same folds for every backbone.
    keys = sorted(wanted)
    if not keys:
        raise BadInputError(f"{labelled_dir}: no labelled image could be embedded by every backbone")
    first_rows, first_labels = loaded[0][3], loaded[0][4]
    y = np.asarray([first_labels[first_rows[k]] for k in keys])
    split = folds(y, cv, random_state)
    classes = sorted(set(y.tolist()))
    by_key = {f.key: f.path for f in collection.files}
    sample_files = [by_key[k] for k in keys if k in by_key][: max(1, speed_sample)]
    results = []
    for name, path, added, rows, labels, X, prov in loaded:
        Xa = X[[rows[k] for k in keys]]
        scores, predicted = cross_validate(Xa, y, split, Cs=Cs, random_state=random_state, progress=progress, name=name)
        report = classification_report(y, predicted, labels=classes, output_dict=True, zero_division=0)
        b = get_backbone(name)
        with Phase(progress, f"timing {name}", 1):
            ips = images_per_second(prov, sample_files, batch_size, runtime)
        results.append(BackboneScore(name, b.params, prov.dim, ips, float(np.mean(scores)), float(np.std(scores)),
                                     scores, report, confusion_matrix(y, predicted, labels=classes), path, prov,
                                     added))
    return Comparison(str(labelled_dir), classes, len(keys), cv, random_state, results, machine_description(),
                      time.perf_counter() - start, chance_baselines(y, split, random_state), len(sample_files))
