"""Backbone comparison on the user's own labelled images.

For each backbone: embed the folder into ``<stores>/<backbone>.h5`` (an existing store is
resumed, so nothing is embedded twice), time embedding on a sample of the images, then
cross-validate a logistic-regression head. One ``StratifiedKFold`` split, made once from the
labels, is used for every backbone, with rows aligned by image path, so the accuracies are
measured on exactly the same train/test partitions.

Each fold fits :class:`~imgvec.vectors.classifier.LogisticHead` on the training part (which picks C
by its own inner cross-validation, as ``imgvec train`` does) and scores the held-out part:
the reported accuracy is a nested-CV estimate of what ``imgvec train`` would give.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from imgvec.backbones.registry import BACKBONES, Weights, get_backbone, parse_weights
from imgvec.backbones.weights import check_all_at_hand, weights_at_hand
from imgvec.checks import check_per_class
from imgvec.embedding.embedder import EmbedConfig
from imgvec.errors import BadInputError, param
from imgvec.fileio import check_writable, make_folder
from imgvec.files.images import Collection, find_images
from imgvec.embedding.ingest import embed
from imgvec.progress import Phase, Progress, steps
from imgvec.runtime.loader import entry_path, resolve_runtime
from imgvec.files.provenance import Provenance
from imgvec.results import BackboneScore, Comparison, chance_levels
from imgvec.vectors.store import open_store

__all__ = ["DEFAULT_MODELS", "BackboneScore", "Comparison", "compare", "cross_validate", "folds", "images_per_second"]

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
    check_per_class(classes, counts, cv)
    splitter = StratifiedKFold(cv, shuffle=True, random_state=random_state)
    return list(splitter.split(np.zeros(len(y)), y))


def cross_validate(X: np.ndarray, y: np.ndarray, split: list[tuple[np.ndarray, np.ndarray]], Cs: int | Sequence[float] | None = None,
                   random_state: int = 0, progress: Progress | None = None, name: str = ""
                   ) -> tuple[list[float], np.ndarray]:
    """Per-fold accuracy and out-of-fold predictions of a :class:`LogisticHead` on ``split``.

    ``progress`` hears the phase ``cross-validating <name>``, one step per fold.
    """
    from imgvec.vectors.classifier import DEFAULT_CS, LogisticHead  # scikit-learn: imported only when a head is fitted

    Cs = DEFAULT_CS if Cs is None else Cs
    predicted = np.empty(len(y), dtype=object)
    scores = []
    for train, test in steps(progress, f"cross-validating {name}".strip(), split):
        inner = max(2, min(INNER_CV, int(np.unique(y[train], return_counts=True)[1].min())))
        head = LogisticHead(cv=inner, Cs=Cs, random_state=random_state).fit(X[train], y[train])
        predicted[test] = head.predict(X[test])
        scores.append(float(np.mean(predicted[test] == y[test])))
    return scores, predicted.astype(str)


def images_per_second(provenance: Provenance, files: Sequence[str], batch_size: int = 32,
                      runtime: str = "auto") -> float:
    """Decode + embed throughput on ``files`` after one warm-up batch (model build not counted)."""
    from imgvec.embedding.embedder import Embedder

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


@dataclass
class _Embedded:
    """One backbone's store of the folder: its labelled rows by key, labels, embeddings, provenance."""

    name: str
    store: Path
    added: int
    rows: dict[str, int]
    labels: list[str]
    X: np.ndarray
    provenance: Provenance


def compare(
    labelled_dir: str | os.PathLike[str],
    models: Sequence[str] | None = None,
    config: EmbedConfig | None = None,
    *,
    cv: int = 5,
    stores: str | os.PathLike[str] = "imgvec-compare",
    random_state: int = 0,
    speed_sample: int = SPEED_SAMPLE,
    Cs: int | Sequence[float] | None = None,
    progress: Progress | None = None,
    **settings: Any,
) -> Comparison:
    """Embed ``labelled_dir`` with each backbone and cross-validate a head on each, on the same folds.

    ``config`` (or its fields by name: ``weights``, ``image_size``, ``batch_size``, ``seed``,
    ``runtime``, ...) says how every backbone embeds (``model`` is each of ``models``; weights
    default to ImageNet). Stores are written as ``<stores>/<backbone>.h5`` and resumed on the
    next run; ``Cs`` are the regularisation strengths each fold's head chooses from;
    ``speed_sample`` images are timed per backbone. Steps: plan, embed each, score each on the
    one split, summarise. ``progress`` hears each backbone's phases: ``embedding with``,
    ``cross-validating`` (by fold), ``timing`` (:mod:`imgvec.progress`).
    """
    start = time.perf_counter()
    config = replace(config or EmbedConfig(weights="imagenet"), **settings)
    _check_weights(_names(models or DEFAULT_MODELS), config)  # before _plan makes the stores' folder
    names, collection, folder = _plan(labelled_dir, models or DEFAULT_MODELS, stores)
    embedded = [_embed(labelled_dir, name, folder, collection.root, config, progress) for name in names]
    keys, y = _shared_labelled(embedded, labelled_dir)
    split = folds(y, cv, random_state)
    classes = sorted(set(y.tolist()))
    by_key = {f.key: f.path for f in collection.files}
    sample = [by_key[k] for k in keys if k in by_key][: max(1, speed_sample)]
    rows = [_score(e, keys, y, classes, split, sample, config, Cs, random_state, progress) for e in embedded]
    return Comparison(str(labelled_dir), classes, len(keys), cv, random_state, rows, machine_description(),
                      time.perf_counter() - start, chance_levels(y), len(sample))


def _plan(labelled_dir: str | os.PathLike[str], models: Sequence[str], stores: str | os.PathLike[str]
          ) -> tuple[list[str], Collection, Path]:
    """Check everything that can fail before the first backbone runs: names, labels, every store writable."""
    names = _names(models)
    collection = find_images([labelled_dir])
    if not collection.labelled:
        raise BadInputError(f"{labelled_dir}: no labels; put the images in one subfolder per class")
    folder = make_folder(stores)
    for name in names:
        path = check_writable(folder / f"{name}.h5")
        if path.exists():
            with open_store(path) as s:
                if os.path.abspath(s.root) != os.path.abspath(collection.root):
                    raise BadInputError(f"{path} was made from {s.root}, not {labelled_dir}; "
                                        f"pass another {param('stores')} folder for this data set")
    return names, collection, folder


def _names(models: Sequence[str]) -> list[str]:
    """The backbones' registry names; unknown names, none, or one twice fail before any work."""
    names = [get_backbone(m).name for m in models]
    if not names:
        raise BadInputError(f"{param('models')}: give at least one backbone")
    if len(set(names)) != len(names):
        raise BadInputError(f"{param('models')} lists a backbone twice: {', '.join(names)}")
    return names


def _check_weights(names: Sequence[str], config: EmbedConfig) -> None:
    """Before any backbone runs: a weights file fits one backbone only, and ImageNet weights that must be
    downloaded on a machine without a network are one line now (every missing file named), not a failure later."""
    weights = parse_weights(config.weights if config.weights is not None else "imagenet", config.seed) \
        if not isinstance(config.weights, Weights) else config.weights
    if weights.kind == "file" and len(names) > 1:
        raise BadInputError(f"{param('weights')} {weights.path}: a weights file fits one backbone, and "
                            f"{param('models')} names {len(names)}; compare one backbone with it, or use "
                            f"{param('weights')} imagenet or none")
    runtime = resolve_runtime(config.runtime, config.device)
    builds = [(b, config.image_size) for b in map(get_backbone, names)
              if not (runtime == "openvino" and entry_path(b, weights, config.image_size or b.input_size).exists())]
    at_hand = [b.name for b in BACKBONES.values() if weights_at_hand(b)]
    check_all_at_hand(builds, weights, f"choose {param('models')} among backbones whose weights are there ("
                      f"{', '.join(at_hand) or 'none is'}), or pass {param('weights')} none for random "
                      "(not pretrained) weights")


def _embed(labelled_dir: str | os.PathLike[str], name: str, folder: Path, root: str, config: EmbedConfig,
           progress: Progress | None) -> _Embedded:
    """Embed (or resume) the folder into ``<folder>/<name>.h5`` and read its labelled rows back."""
    path = folder / f"{name}.h5"
    summary = embed([labelled_dir], path, replace(config, model=name), progress=progress)
    rows, labels, X, prov = load_labelled(path)
    return _Embedded(name, path, summary.added, rows, labels, X, prov)


def _shared_labelled(embedded: list[_Embedded], labelled_dir: str | os.PathLike[str]) -> tuple[list[str], np.ndarray]:
    """The labelled images every backbone embedded, sorted, and their labels: same images, same order."""
    keys = sorted(set.intersection(*(set(e.rows) for e in embedded)))
    if not keys:
        raise BadInputError(f"{labelled_dir}: no labelled image could be embedded by every backbone")
    first = embedded[0]
    return keys, np.asarray([first.labels[first.rows[k]] for k in keys])


def _score(e: _Embedded, keys: list[str], y: np.ndarray, classes: list[str], split: list[tuple[np.ndarray, np.ndarray]],
           sample: list[str], config: EmbedConfig, Cs: int | Sequence[float] | None, random_state: int,
           progress: Progress | None = None) -> BackboneScore:
    """Cross-validate a head on one backbone's rows and time its embedding."""
    from sklearn.metrics import classification_report, confusion_matrix

    scores, predicted = cross_validate(e.X[[e.rows[k] for k in keys]], y, split, Cs=Cs, random_state=random_state,
                                       progress=progress, name=e.name)
    report = classification_report(y, predicted, labels=classes, output_dict=True, zero_division=0)
    with Phase(progress, f"timing {e.name}", 1):
        ips = images_per_second(e.provenance, sample, config.batch_size, config.runtime)
    return BackboneScore(e.name, get_backbone(e.name).params, e.provenance.dim, ips, float(np.mean(scores)),
                         float(np.std(scores)), scores, report, confusion_matrix(y, predicted, labels=classes),
                         e.store, e.provenance, e.added)
