"""The public API: what the CLI and notebooks both call.

Each function takes paths and plain options and returns a small result object; none of
them prints. Long work reports progress through an optional ``progress(done, total)`` callback,
which is also told the phase when it takes a ``phase`` keyword (:mod:`imgvec.progress`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import numpy as np

from imgvec.files.artifact import check_partner, peek
from imgvec.backbones.registry import BACKBONES
from imgvec.analyses.comparison import compare
from imgvec.analyses.inspection import MAP_ROWS
from imgvec.embedding.embedder import EmbedConfig, Embedder
from imgvec.checks import check_choice
from imgvec.errors import BadInputError, MismatchError, param
from imgvec.fileio import check_output
from imgvec.files.images import DEFAULT_MAX_PIXELS, find_images, is_image_name
from imgvec.vectors.index import (AUTO_FLAT_MAX_ROWS, OpenIndex, can_extend, choose_kind, extend_index, index_path_for,
                    load_index, search_store, use_faiss_gpu)
from imgvec.vectors.index import build_index as _build_index
from imgvec.embedding.ingest import embed, weights_arg
from imgvec.progress import Phase, Progress
from imgvec.files.provenance import Provenance, check_compatible
from imgvec.results import (MODEL_COLUMNS, BackboneScore, CacheSummary, Chance, Comparison, DedupResult, DuplicateGroup,
                      EmbedSummary, Evaluation, FileInfo, ImageFlag, IndexSummary, InspectResult, LabelIssue, Leak,
                      MapLayout, Member, MergeSummary, ModelTable, Neighbour, Outlier, Prediction, Predictions,
                      QueryResult, QueryResults, SkippedFiles, TrainSummary, chance_levels)
from imgvec.vectors.store import Store, merge_stores, open_store

__all__ = [
    "BackboneScore", "CacheSummary", "Chance", "Comparison", "DEFAULT_MAX_PIXELS", "DedupResult", "DuplicateGroup",
    "EmbedConfig", "EmbedSummary", "Evaluation", "FileInfo", "ImageFlag", "IndexSummary", "InspectResult",
    "LabelIssue", "Leak", "MapLayout", "Member", "MergeSummary", "ModelTable", "Neighbour", "OpenIndex", "Outlier",
    "Prediction", "Predictions", "QueryResult", "QueryResults", "SkippedFiles", "TrainSummary",
    "build_index", "cache", "check_page_path", "compare", "comparison_html", "dedup", "dedup_html", "dedup_page",
    "embed", "evaluate", "evaluation_html", "image_paths", "info", "inspect", "inspect_html", "inspect_map",
    "inspect_page", "merge", "models", "open_index", "predict", "predict_html", "query", "query_html",
    "release_models", "runtimes", "skipped_files", "train",
]

PathLike = str | os.PathLike[str]


def runtimes() -> tuple[str, ...]:
    """The runtimes an embedding can run on (``runtime=``): auto, openvino, tensorflow, jax, torch."""
    from imgvec.runtime.loader import RUNTIMES

    return RUNTIMES


def choices() -> dict[str, tuple[str, ...]]:
    """The values each checked option accepts, by parameter name: what a shell completes them to."""
    from imgvec.backbones.device import DEVICES, PRECISIONS
    from imgvec.backbones.registry import BACKBONES
    from imgvec.embedding.distributed import ENGINES
    from imgvec.vectors.index import FAISS_GPU_MODES, KINDS

    return {"model": tuple(BACKBONES), "runtime": runtimes(), "device": tuple(DEVICES),
            "precision": tuple(PRECISIONS), "engine": tuple(ENGINES), "kind": tuple(KINDS),
            "faiss_gpu": tuple(FAISS_GPU_MODES), "on_duplicate": ("first", "error"), "sort": tuple(MODEL_COLUMNS)}


def check_page_path(page: PathLike | None, inputs: Sequence[PathLike | None]) -> None:
    """Check before the work where an HTML page will be written after it (a typo, or one of the ``inputs``
    named as the page, costs nothing then); None: no page."""
    if page is not None:
        check_output(page, inputs, read_under=is_image_name)


# -- embed (ingest.embed) and compare (comparison.compare) are re-exported above ------------
# -- index ------------------------------------------------------------------------------
def build_index(store: PathLike, kind: str = "auto", output: PathLike | None = None,
                rebuild: bool = False, memory_budget: int | None = None, faiss_gpu: str = "auto",
                progress: Progress | None = None) -> IndexSummary:
    """Build a FAISS index over ``store`` and save it beside it (``photos.index.h5``).

    An existing index of the same kind whose store only gained rows since is extended with
    the new rows instead of rebuilt (unless ``rebuild``). ``memory_budget`` (bytes, default
    half the RAM) is what ``auto`` lets an index hold before it picks the compact IVF-PQ.
    With ``faiss_gpu`` (auto/on/off) FAISS builds on the GPU; the saved file is always CPU-readable.
    """
    start = time.perf_counter()
    gpu = use_faiss_gpu(faiss_gpu)
    path = Path(output) if output else index_path_for(store)
    with open_store(store) as s:  # a missing store is the first thing to say
        check_output(path, [store])
        old = None
        if path.exists() and not rebuild:
            try:
                old = load_index(path, gpu, mapped=False)
            except BadInputError:  # damaged or from an older imgvec: an index is derived data, build it anew
                old = None
        wanted = choose_kind(kind, s.rows, s.dim, memory_budget)
        if old is not None and old.kind == wanted and can_extend(old, s):
            added = extend_index(old, s, progress)
            old.save(path)
            return IndexSummary(path, old.kind, old.rows, time.perf_counter() - start, True, added)
        index = _build_index(s, wanted, gpu=gpu, progress=progress)
    index.save(path)
    return IndexSummary(path, index.kind, index.rows, time.perf_counter() - start, False, index.rows)


def merge(inputs: Sequence[PathLike], output: PathLike, on_duplicate: str = "first",
          progress: Progress | None = None) -> MergeSummary:
    """Merge stores made the same way (e.g. shards from several machines) into a new store."""
    start = time.perf_counter()
    check_output(output, inputs)
    rows, duplicates = merge_stores(inputs, output, on_duplicate, progress=progress)
    return MergeSummary(Path(output), len(inputs), rows, duplicates, time.perf_counter() - start)


# -- query ------------------------------------------------------------------------------
A = TypeVar("A")
B = TypeVar("B")


def _embed_inputs(embedder: Embedder, sources: Sequence[PathLike], progress: Progress | None = None
                  ) -> tuple[list[str], np.ndarray, list[tuple[str, str]], list[str]]:
    """Embed query or prediction images: (absolute paths, embeddings, skipped, class-folder labels)."""
    files = find_images(sources).files
    names: list[str] = []
    labels: list[str] = []
    blocks: list[np.ndarray] = []
    skipped: list[tuple[str, str]] = []
    with Phase(progress, f"embedding with {embedder.backbone.name}", len(files)) as step:
        for batch in embedder.embed_files([f.path for f in files]):
            names.extend(os.path.abspath(files[i].path) for i in batch.indices)
            labels.extend(files[i].label for i in batch.indices)
            blocks.append(batch.embeddings)
            skipped.extend((os.path.abspath(s.path), s.reason) for s in batch.skipped)
            step.advance(len(batch.indices) + len(batch.skipped))
    _require_some_decoded(len(names), skipped)
    emb = np.concatenate(blocks) if blocks else np.zeros((0, embedder.dim), np.float32)
    return names, emb, skipped, labels


def _beside(first: Callable[[], A], second: Callable[[], B]) -> tuple[A, B]:
    """``first()`` on a thread of its own while ``second()`` runs here; both results. An error of ``first`` is
    raised before one of ``second``, as if ``first`` had run first (it waits for ``second`` to end); an
    interrupt (Ctrl-C) stays an interrupt."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="imgvec-beside") as pool:
        started = pool.submit(first)
        try:
            out = second()
        except Exception:
            started.result()  # its error, if any, is the one to tell
            raise
        return started.result(), out


def _require_some_decoded(decoded: int, skipped: list[tuple[str, str]]) -> None:
    """No input image could be used: an error (scripts must see it), not an empty result."""
    if decoded == 0 and skipped:
        path, reason = skipped[0]
        raise BadInputError(f"no input image could be read ({len(skipped)} skipped; first {path}: {reason})")


def open_index(store: Store, index: PathLike | None = None, gpu: bool = False) -> OpenIndex:
    """The index to search the open ``store`` with, as :func:`query` searches it (the service too).

    ``index`` None: the store's own index file beside it, or none for a small store (every row
    searched exactly). Returns ``(index, unindexed, notes)``: the index (None: search every row
    exhaustively), how many rows it lacks (searched exhaustively beside it), and notes saying so for
    stderr. An index from another store, or one that does not hold the store's vectors, is a
    :class:`~imgvec.errors.MismatchError`.
    """
    path = Path(index) if index else index_path_for(store.path)
    if not path.exists():
        if index:
            raise BadInputError(f"{path}: no such index")
        if store.rows > AUTO_FLAT_MAX_ROWS:
            raise BadInputError(f"{store.path} has no index yet; run `imgvec index {store.path}`")
        return OpenIndex(None, 0, [])  # small store: exact search of its rows is quick
    vindex = load_index(path, gpu)
    if vindex.predates_removals(store):
        return OpenIndex(None, 0, [
            f"index {path} predates rows removed from {store.path} (generation {vindex.generation}, the store is "
            f"at {store.generation}), so all {store.rows} rows were searched exhaustively; `imgvec index "
            f"{store.path}` rebuilds it"])
    unindexed = vindex.check_covers(store, f"index {path}", tail=True)
    notes = [f"{unindexed} of {store.rows} rows of {store.path} are not indexed yet (embedded after index {path} "
             f"was built): searched exhaustively beside it; `imgvec index {store.path}` adds them"] if unindexed else []
    return OpenIndex(vindex, unindexed, notes)



def query(
    store: PathLike,
    queries: Sequence[PathLike],
    k: int = 10,
    index: PathLike | None = None,
    weights: str | None = None,
    batch_size: int = 32,
    faiss_gpu: str = "auto",
    runtime: str = "auto",
    progress: Progress | None = None,
    model: PathLike | None = None,
) -> QueryResults:
    """The ``k`` stored images most similar to each query image (cosine similarity).

    Queries are embedded exactly as the store was (same backbone, weights and size).
    ``weights`` is only needed to point at a moved weights file, ``model`` at a moved model file (its bytes
    must be the ones the store was made with). ``runtime`` need not be the
    one the store was made with. The loaded model is kept for the next call (:func:`release_models`).
    ``progress`` hears ``embedding with <backbone>`` (the query images).
    """
    with open_store(store) as s:
        embedder = Embedder.from_provenance(s.provenance, weights_path=weights, model_path=_path(model),
                                            batch_size=batch_size, runtime=runtime, root=s.root)
        # The index is opened and checked (on a cold cache: mostly waiting for the disk) while the model loads.
        (vindex, unindexed, notes), (names, emb, skipped, _) = _beside(
            lambda: open_index(s, index, use_faiss_gpu(faiss_gpu)), lambda: _embed_inputs(embedder, queries, progress))
        scores, ids = search_store(s, emb, k, vindex) if len(emb) else (np.zeros((0, 0)), np.zeros((0, 0), int))
        hits = sorted(set(ids[ids >= 0].tolist()))  # only the hits' paths and labels are read
        keys, labels = dict(zip(hits, s.paths_at(hits))), dict(zip(hits, s.labels_at(hits)))
        prov, root = s.provenance, s.root
    index_file = Path(index) if index else index_path_for(store)
    results = [
        QueryResult(name, [Neighbour(r + 1, keys[i], float(sc), labels[i])
                           for r, (i, sc) in enumerate(zip(row_ids.tolist(), row_scores)) if i >= 0])
        for name, row_ids, row_scores in zip(names, ids, scores)
    ]
    unused = str(index_file) if vindex is None and index_file.exists() else ""  # predates removed rows
    return QueryResults(prov, results, skipped, vindex.kind if vindex else "flat", Path(store), root,
                        str(index_file) if vindex else "", unindexed=unindexed, notes=notes, unused_index=unused)


# -- classify ---------------------------------------------------------------------------
def train(store: PathLike, output: PathLike, cv: int = 5, Cs: int | Sequence[float] | None = None,
          progress: Progress | None = None) -> TrainSummary:
    """Fit a logistic-regression head on the store's labelled embeddings and save it.

    ``Cs``: the regularisation strengths to choose from (default :data:`imgvec.vectors.classifier.DEFAULT_CS`).
    ``progress`` hears ``choosing C`` (one step per fold) and ``final fit``.
    """
    from imgvec.vectors.classifier import DEFAULT_CS, LogisticHead, save_head
    from sklearn.metrics import classification_report, confusion_matrix

    start = time.perf_counter()
    check_output(output, [store])
    with open_store(store) as s:
        labels = np.asarray(s.labels())
        keep = labels != ""
        if not keep.any():
            raise BadInputError(
                f"{s.path} has no labels; embed one folder whose images sit in one subfolder per class")
        X = s.embeddings()[keep]
        prov, store_id, generation = s.provenance, s.store_id, s.generation
        trained_on = [s.absolute(k) for k, kept in zip(s.paths(), keep) if kept]
    y = labels[keep]
    head = LogisticHead(cv=cv, Cs=DEFAULT_CS if Cs is None else Cs).fit(X, y, progress=progress)
    path = save_head(head, output, prov, store_id, generation, trained_on)
    classes = [str(c) for c in head.classes_]
    report = classification_report(y, head.cv_predictions_, labels=classes, output_dict=True, zero_division=0)
    confusion = confusion_matrix(y, head.cv_predictions_, labels=classes)
    return TrainSummary(path, prov, classes, int(keep.sum()), int((~keep).sum()), head.C_, head.cv_accuracy_,
                        head.cv_accuracy_std_, report, confusion, time.perf_counter() - start,
                        len(head.Cs_), head.search_seconds_, head.fit_seconds_, cv, chance_levels(y))


def predict(head: PathLike, images: Sequence[PathLike], weights: str | None = None,
            batch_size: int = 32, runtime: str = "auto", progress: Progress | None = None,
            model: PathLike | None = None) -> Predictions:
    """Label each image with the head, embedding it with the head's own backbone.

    ``images`` are image files, folders, or stores (.h5) made with the head's settings, whose
    rows are used as they are. Images in class folders (one folder of class subfolders, or class
    folders given one by one) and labelled store rows carry their label as ``truth``, so right
    and wrong can be shown.
    """
    from imgvec.vectors.classifier import load_head

    model_path = _path(model)
    model, prov = load_head(head)
    stores = [Path(p) for p in images if _is_store(p)]
    files = [p for p in images if not _is_store(p)]
    names: list[str] = []
    emb = np.zeros((0, prov.dim), np.float32)
    skipped: list[tuple[str, str]] = []
    truths: list[str] = []
    if files:
        embedder = Embedder.from_provenance(prov, weights_path=weights, model_path=model_path, batch_size=batch_size,
                                            runtime=runtime)
        names, emb, skipped, truths = _embed_inputs(embedder, files, progress)
    for path in stores:
        with open_store(path) as s:
            check_compatible(prov, s.provenance, f"head {head}", f"store {path}",
                             fix=f"predict on its images instead, or embed them with {_head_settings(prov)}")
            names += [os.path.abspath(s.absolute(k)) for k in s.paths()]
            emb = np.concatenate([emb, s.embeddings()])
            truths += s.labels()
    classes = [str(c) for c in model.classes_]
    if not set(truths) & set(classes):
        truths = [""] * len(names)  # folders that are not the head's classes say nothing about right or wrong
    proba = model.predict_proba(emb) if len(emb) else np.zeros((0, len(classes)))
    preds = [Prediction(n, classes[int(np.argmax(p))], {c: float(v) for c, v in zip(classes, p)}, t)
             for n, p, t in zip(names, proba, truths)]
    return Predictions(prov, classes, preds, skipped, Path(head), float(model.C_), float(model.cv_accuracy_),
                       float(model.cv_accuracy_std_))


# -- models kept loaded, the compiled-model cache --------------------------------------------
def release_models() -> int:
    """Free the models query/predict/evaluate/embed keep loaded between calls; how many there were."""
    from imgvec.runtime.loader import release_engines

    return release_engines()


def cache(clear: bool = False) -> CacheSummary:
    """The compiled OpenVINO models imgvec keeps (see :func:`imgvec.runtime.loader.cache_dir`); ``clear`` removes them."""
    from imgvec.runtime.loader import cache_dir, cache_entries, clear_cache

    cleared, freed = clear_cache() if clear else (0, 0)
    return CacheSummary(cache_dir(), cache_entries(), cleared, freed)


# -- info -------------------------------------------------------------------------------
def models(sort: str | None = None) -> ModelTable:
    """Every backbone imgvec knows, in table order or sorted by a column of :data:`MODEL_COLUMNS`
    (numbers largest first, names A to Z; backbones without a value for it last)."""
    from imgvec.backbones.builder import offline_weights

    backbones = list(BACKBONES.values())
    table = ModelTable(backbones, {b.name: w for b in backbones if (w := offline_weights(b))})
    if sort:
        check_choice(param("sort"), sort, MODEL_COLUMNS)
        numeric = sort not in ("name", "preprocessing", "weights_offline")
        filled = [b for b in backbones if table.value(b, sort) is not None]
        table.backbones = (sorted(filled, key=lambda b: table.value(b, sort), reverse=numeric)
                           + [b for b in backbones if table.value(b, sort) is None])
    return table


def info(path: PathLike) -> FileInfo:
    """What an imgvec file (store, index or head) is and holds, from its header (``to_records()``: plain data).

    Reads attributes and small datasets only: an index is never deserialised, a store's
    embeddings are never read. For a store, its index (``photos.index.h5``) is reported too.
    """
    from imgvec.vectors.classifier import read_head

    kind, header, extra = peek(path)
    data: dict[str, Any] = {"file": str(path), "kind": kind, "format_version": header.format_version,
                            "store_id": header.store_id, "generation": header.generation,
                            "rows": header.rows, "dim": header.dim}
    if kind == "store":
        with open_store(path) as s:
            labels = s.labels()
            data.update(root=s.root, skipped=len(s.skipped()), pending_rows=s.pending_rows(),
                        labels={label: labels.count(label) for label in sorted(set(labels)) if label},
                        unlabelled=labels.count(""), index=_index_status(s))
    elif kind == "index":
        data.update(index_kind=extra.get("index_kind"), metric=extra.get("metric"),
                    faiss_version=extra.get("faiss_version"), bytes=os.path.getsize(path))
    else:
        head, _ = read_head(path)
        data.update(classes=[str(c) for c in head.classes_], C=float(head.C_), cv=int(head.cv),
                    cv_accuracy=float(head.cv_accuracy_), cv_accuracy_std=float(head.cv_accuracy_std_))
    return FileInfo(data, header.provenance)


def skipped_files(store: PathLike) -> SkippedFiles:
    """The files embed runs skipped for ``store``, with the reason for each (decoding errors, sizes, ...)."""
    with open_store(store) as s:
        return SkippedFiles(Path(store), s.root, s.skipped())


def _index_status(store: Store) -> dict[str, Any] | None:
    """The store's default index file, from its header alone: kind, rows, whether it covers the store."""
    ipath = index_path_for(store.path)
    if not ipath.exists():
        return None
    try:
        kind, header, extra = peek(ipath)
        if kind != "index":
            raise BadInputError(f"{ipath}: is an imgvec {kind} file, not an index")
        check_partner(header, store.current_header(), "index", "store", "")
        state = "up to date"
    except MismatchError as error:
        state = f"stale: {error}"
    except BadInputError as error:
        return {"path": str(ipath), "state": f"unusable: {error}"}
    return {"path": str(ipath), "kind": extra.get("index_kind"), "rows": header.rows, "state": state}


# -- galleries, evaluation, backbone comparison, duplicates -----------------------------
# (HTML rendering lives in html.py, the comparison in comparison.py, duplicate search in duplicates.py.)


def image_paths(store: PathLike, keys: Sequence[str]) -> list[str]:
    """Where the images a store names (``Neighbour.path``, duplicate members) are on disk."""
    with open_store(store) as s:
        return [s.absolute(k) for k in keys]


def query_html(results: QueryResults, output: PathLike, store: PathLike) -> Path:
    """Write a self-contained gallery of ``results`` (from :func:`query` on ``store``) to ``output``."""
    from imgvec.pages import html

    with open_store(store) as s:
        check_output(output, [store, index_path_for(store), s.root, *(q.query for q in results.queries)],
                     read_under=is_image_name)
        return html.write(output, html.query_page(results, s.absolute, s.root))


def predict_html(predictions: Predictions, output: PathLike, top: int = 3) -> Path:
    """Write a self-contained page of each image with its predicted label and ``top`` probabilities."""
    from imgvec.pages import html

    check_output(output, [predictions.head, *(p.path for p in predictions.predictions)], read_under=is_image_name)
    return html.write(output, html.predict_page(predictions, top=top))


def _is_store(path: PathLike) -> bool:
    return Path(path).suffix.lower() in (".h5", ".hdf5") and Path(path).is_file()


def _path(path: PathLike | None) -> str | None:
    return None if path is None else os.fspath(path)


def _head_settings(prov: Provenance) -> str:
    """The embed options that reproduce a head's embeddings."""
    if prov.is_model_file:
        return (f"the head's settings ({param('model')} {prov.model_path}, {param('preprocess')} {prov.model_preprocess}"
                + (f", {param('layer')} {prov.model_layer}" if prov.model_layer else "")
                + f", {param('image_size')} {prov.input_size})")
    return (f"the head's settings ({param('model')} {prov.backbone}, {param('image_size')} {prov.input_size}, "
            f"{param('weights')} {weights_arg(prov)}"
            + (f", {param('seed')} {prov.weights_seed})" if prov.is_random else ")"))


def _labelled_from_store(path: Path, prov: Provenance, head: PathLike
                         ) -> tuple[np.ndarray, np.ndarray, int, list[str]]:
    with open_store(path) as s:
        check_compatible(prov, s.provenance, f"head {head}", f"store {path}",
                         fix=f"evaluate on an image folder instead, or embed it with {_head_settings(prov)}")
        labels = np.asarray(s.labels(), dtype=object)
        keep = labels != ""
        X = s.embeddings()[keep] if keep.any() else np.zeros((0, s.dim), np.float32)
        paths = [s.absolute(k) for k, kept in zip(s.paths(), keep) if kept]
    return X, labels[keep].astype(str), int((~keep).sum()), paths


def _labelled_from_folder(folder: Path, prov: Provenance, weights: str | None, batch_size: int, runtime: str,
                          progress: Progress | None = None, model: PathLike | None = None
                          ) -> tuple[np.ndarray, np.ndarray, int, list[tuple[str, str]], list[str]]:
    files = find_images([folder]).files
    labelled = [f for f in files if f.label]
    embedder = Embedder.from_provenance(prov, weights_path=weights, model_path=_path(model), batch_size=batch_size,
                                        runtime=runtime)
    blocks, y, skipped, paths = [], [], [], []
    with Phase(progress, f"embedding with {embedder.backbone.name}", len(labelled)) as step:
        for batch in embedder.embed_files([f.path for f in labelled]):
            blocks.append(batch.embeddings)
            y.extend(labelled[i].label for i in batch.indices)
            paths.extend(os.path.abspath(labelled[i].path) for i in batch.indices)
            skipped.extend((os.path.abspath(s.path), s.reason) for s in batch.skipped)
            step.advance(len(batch.indices) + len(batch.skipped))
    _require_some_decoded(len(y), skipped)
    X = np.concatenate(blocks) if blocks else np.zeros((0, embedder.dim), np.float32)
    return X, np.asarray(y, dtype=str), len(files) - len(labelled), skipped, paths


def evaluate(head: PathLike, data: PathLike, weights: str | None = None, batch_size: int = 32,
             runtime: str = "auto", progress: Progress | None = None, model: PathLike | None = None) -> Evaluation:
    """Score a head on held-out labelled data: a folder (one subfolder per class) or a store.

    A folder is embedded exactly as the head's training data was. A store must have been made
    with the head's backbone, weights and input size, or it is refused (:class:`MismatchError`).
    """
    from imgvec.vectors.classifier import load_head, seen_in_training

    from sklearn.metrics import classification_report, confusion_matrix

    start = time.perf_counter()
    model_path = _path(model)
    model, prov = load_head(head)
    data = Path(data)
    skipped: list[tuple[str, str]] = []
    if data.is_file() and data.suffix.lower() in (".h5", ".hdf5"):
        X, y, n_unlabelled, paths = _labelled_from_store(data, prov, head)
    elif data.is_dir():
        X, y, n_unlabelled, skipped, paths = _labelled_from_folder(data, prov, weights, batch_size, runtime, progress,
                                                                   model_path)
    elif data.exists():
        raise BadInputError(f"{data}: expected a folder of labelled images or an imgvec store (.h5)")
    else:
        raise BadInputError(f"{data}: no such file or folder")
    if len(y) == 0:
        raise BadInputError(f"{data}: no labelled images; put them in one subfolder per class")
    classes = [str(c) for c in model.classes_]
    unknown_labels = sorted(set(y.tolist()) - set(classes))
    labels = classes + unknown_labels
    predicted = model.predict(X)
    report = classification_report(y, predicted, labels=labels, output_dict=True, zero_division=0)
    confusion = confusion_matrix(y, predicted, labels=labels)
    unknown = {c: int((y == c).sum()) for c in unknown_labels}
    return Evaluation(Path(head), str(data), prov, classes, labels, len(y), float(np.mean(predicted == y)), report,
                      confusion, unknown, n_unlabelled, skipped, time.perf_counter() - start,
                      seen_in_training(head, paths), chance_levels(y))


def evaluation_html(evaluation: Evaluation, output: PathLike) -> Path:
    from imgvec.pages import html

    check_output(output, [evaluation.head, evaluation.data], read_under=is_image_name)
    return html.write(output, html.evaluation_page(evaluation))


def comparison_html(comparison: Comparison, output: PathLike) -> Path:
    from imgvec.pages import html

    check_output(output, [comparison.source, *(r.store for r in comparison.rows)], read_under=is_image_name)
    return html.write(output, html.compare_page(comparison))


def dedup(store: PathLike, threshold: float = 0.95, check_files: bool = True, exact: bool | None = None,
          progress: Progress | None = None) -> DedupResult:
    """Groups of identical files (sha256) and of near duplicates (cosine >= ``threshold``).

    The search is exhaustive up to 20,000 images (or with ``exact=True``) and uses inverted
    lists above (see duplicates.py); the store is read in chunks.
    """
    from imgvec.analyses.duplicates import find_duplicates

    with open_store(store) as s:
        return find_duplicates(s, threshold, check_files=check_files, exact=exact, progress=progress)


def _store_page(result: Any, render: Callable[[Any, Callable[[str], str]], str]) -> str:
    """``render(result, absolute)``: a page about rows of ``result.store``, whose thumbnails need their files."""
    with open_store(result.store) as s:
        return render(result, s.absolute)


def _write_store_page(result: Any, output: PathLike, page: Callable[[Any], str]) -> Path:
    """``page(result)`` written to ``output``, which may not be the store, or a file below the store's root
    that is an image."""
    from imgvec.pages import html

    with open_store(result.store) as s:
        check_output(output, [result.store, s.root], read_under=is_image_name)
    return html.write(output, page(result))


def dedup_page(result: DedupResult) -> str:
    """The self-contained HTML page of ``result`` (thumbnails of every group), as a string."""
    from imgvec.pages import html

    return _store_page(result, html.dedup_page)


def dedup_html(result: DedupResult, output: PathLike) -> Path:
    return _write_store_page(result, output, dedup_page)



# -- inspect ----------------------------------------------------------------------------
def inspect(store: PathLike, head: PathLike | None = None, cv: int = 5, k: int = 10, threshold: float = 0.95,
            splits: Sequence[str] | None = None, check_files: bool = True, map_rows: int | None = MAP_ROWS,
            stats: bool = False, index: PathLike | None = None, progress: Progress | None = None) -> InspectResult:
    """What is wrong with the store's images, from what it holds (nothing is embedded again).

    Label issues (confident learning on the head's out-of-fold probabilities and the neighbours'
    labels), outliers, leaks (duplicates across splits or class folders: :func:`dedup`'s search at
    ``threshold``; identical files too unless ``check_files`` is off), flagged image statistics and a
    2-D map of at most ``map_rows`` rows (None: no map). ``head``: a head trained on this store, whose C
    is used (else C is chosen by cross-validation, as ``train`` does). ``splits``: the folder names
    that are splits (default train/val/test and their usual spellings). ``stats``: first measure the
    statistics the store lacks by decoding its images again (see :func:`imgvec.analyses.inspection.measure_stats`).
    Methods and thresholds are in ``result.methods``; see :mod:`imgvec.analyses.inspection`.
    """
    from imgvec.analyses.duplicates import find_duplicates
    from imgvec.analyses.inspection import measure_stats, inspect_store, neighbours, read_normalized

    notes: list[str] = []
    if stats:
        measured, failed = measure_stats(store, progress=progress)
        notes.append(f"measured the image statistics of {measured} images"
                     + (f"; {len(failed)} could not be read, e.g. {failed[0][0]}: {failed[0][1]}" if failed else ""))
    C = None
    with open_store(store) as s:
        if head is not None:
            from imgvec.vectors.classifier import load_head

            model, prov = load_head(head)
            check_compatible(prov, s.provenance, f"head {head}", f"store {store}",
                             fix="pass a head trained on this store, or none")
            C, cv = float(model.C_), int(model.cv)
        vectors = read_normalized(s, progress)  # once, for both searches (the store's one copy in memory)
        dups = (find_duplicates(s, threshold, check_files=check_files, progress=progress, vectors=vectors)
                if s.rows >= 2 else None)
        if dups is not None and dups.degenerate:
            notes.append(f"about {dups.share_above:.0%} of all pairs of images are above the near-duplicate threshold "
                         f"{threshold:g}: the embeddings do not tell these images apart (random weights or an "
                         "unsuitable backbone?), so near-duplicate leaks mean little")
        if index is None and not index_path_for(s.path).exists():  # exact neighbours, however many rows
            vindex, index_notes = None, ([f"{s.path} has no index: neighbours were searched exhaustively; "
                                          f"`imgvec index {s.path}` makes this faster"]
                                         if s.rows > AUTO_FLAT_MAX_ROWS else [])
        else:
            vindex, _, index_notes = open_index(s, index)
        # The neighbours first, so that the index (as big as the store's rows) is let go before the head's folds.
        knn = neighbours(s, vectors, k, vindex, progress) if s.rows >= 3 else None
        del vindex
        result = inspect_store(s, dups.groups if dups is not None else None, None, C, cv, k, splits, map_rows,
                               threshold, progress, vectors=vectors, knn=knn)
    result.notes = notes + index_notes + result.notes
    return result


def inspect_map(store: PathLike, map_rows: int = MAP_ROWS, seed: int = 0) -> InspectResult:
    """Only the 2-D map of ``store`` (``result.map_records()``: absolute paths, x, y in [0, 1], labels), for a page
    or the service to draw; PCA then t-SNE on at most ``map_rows`` rows (a seeded sample above)."""
    with open_store(store) as s:
        keys, labels = s.paths(), s.labels()
        rows, vectors = map_sample(s, map_rows, seed)
        layout = layout_map(rows, vectors, s.rows, seed)
        return InspectResult(Path(store), s.root, s.provenance, s.rows, sum(1 for x in labels if x),
                             sorted(set(labels) - {""}), [], [], [], [], {"map": layout.method} if layout else {},
                             map=layout, map_paths=[keys[i] for i in layout.rows] if layout else [],
                             map_labels=[labels[i] for i in layout.rows] if layout else [])


MAP_READ_ROWS = 4096  # rows read at once for the map (a store's own chunk would be bigger than the map needs)


def map_sample(store: Store, map_rows: int = MAP_ROWS, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The rows the map of ``store`` lays out (ascending) and their vectors, L2-normalised: every row up to
    ``map_rows``, else the seeded sample :func:`imgvec.analyses.inspection.layout_2d` draws from all of them.
    Only those rows are read (memory: ``map_rows`` x dim floats, however big the store)."""
    from imgvec.analyses.inspection import sample_rows
    from imgvec.vectors.index import normalized

    rows = sample_rows(store.rows, map_rows, seed)
    vectors = np.empty((len(rows), store.dim), np.float32)
    at = 0
    for run in np.split(rows, np.flatnonzero(np.diff(rows) != 1) + 1) if len(rows) else []:
        for part in (run[i : i + MAP_READ_ROWS] for i in range(0, len(run), MAP_READ_ROWS)):
            vectors[at : at + len(part)] = normalized(store.embeddings(int(part[0]), int(part[-1]) + 1))
            at += len(part)
    return rows, vectors


def layout_map(rows: np.ndarray, vectors: np.ndarray, total: int, seed: int = 0) -> MapLayout | None:
    """The 2-D layout of :func:`map_sample`'s ``rows`` and ``vectors`` out of a store of ``total`` rows (None: under
    two rows): :func:`imgvec.analyses.inspection.layout_2d` of the whole store at the same seed, without reading it."""
    from imgvec.analyses.inspection import layout_2d

    if len(rows) < 2:
        return None
    layout = layout_2d(vectors, len(rows), seed)
    method = layout.method
    if len(rows) < total:  # layout_2d saw only the sample: say what it is a sample of, as it says it
        method = (method.rsplit(", ", 1)[0]
                  + f", a random sample of {len(rows):,} of {total:,} rows (seed {seed})")
    return MapLayout(rows[layout.rows], layout.xy, total, method)


def inspect_page(result: InspectResult) -> str:
    """The self-contained HTML report of ``result``: every section with thumbnails and scores, and the map."""
    from imgvec.pages import html

    return _store_page(result, html.inspect_page)


def inspect_html(result: InspectResult, output: PathLike) -> Path:
    return _write_store_page(result, output, inspect_page)
