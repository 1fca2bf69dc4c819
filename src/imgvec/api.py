"""The public API: what the CLI and notebooks both call.

Each function takes paths and plain options and returns a small result object; none of
them prints. Progress is reported through an optional ``progress(done, total)`` callback.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .backbones import BACKBONES, DEFAULT_BACKBONE, DEFAULT_SEED, Backbone
from .classifier import DEFAULT_CS, LogisticHead, load_head
from .distributed import ENGINES, embed_files_on_ray
from .embedder import Embedder
from .errors import BadInputError
from .images import DEFAULT_MAX_PIXELS, find_images
from .index import (AUTO_FLAT_MAX_ROWS, VectorIndex, can_extend, choose_kind, extend_index, index_path_for,
                    load_index, use_faiss_gpu)
from .index import build_index as _build_index
from .provenance import Provenance, check_compatible
from .runtime import CacheEntry
from .store import Store, StoreWriter, merge_stores, open_store

PathLike = str | os.PathLike[str]
Progress = Callable[[int, int], None]


def _display(path: str) -> str:
    rel = os.path.relpath(path)
    return path if rel.startswith(os.pardir) else rel


# -- embed ------------------------------------------------------------------------------
@dataclass
class EmbedSummary:
    store: Path
    provenance: Provenance
    added: int
    already: int
    rows: int
    skipped: list[tuple[str, str]]
    seconds: float
    removed: int = 0

    @property
    def images_per_second(self) -> float:
        return self.added / self.seconds if self.seconds > 0 else 0.0


def embed(
    sources: Sequence[PathLike],
    output: PathLike,
    model: str | None = None,
    weights: str | None = None,
    image_size: int | None = None,
    batch_size: int = 32,
    workers: int | None = None,
    seed: int = DEFAULT_SEED,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    sync: bool = False,
    engine: str = "local",
    ray_address: str | None = None,
    ray_workers: int | None = None,
    device: str = "auto",
    precision: str | None = None,
    runtime: str = "auto",
    progress: Progress | None = None,
) -> EmbedSummary:
    """Embed every image under ``sources`` into the store ``output``.

    A new store is created; an existing one is resumed: images already in it are kept and
    not recomputed, only new ones are embedded. With ``sync``, rows whose files are no
    longer under ``sources`` are removed. Options left as ``None`` are taken from the
    existing store (or default to efficientnetb0 with ImageNet weights for a new one).
    Interrupting (Ctrl-C, kill) loses at most the batch under way: run again to go on.
    ``device`` (auto/cpu/gpu) and ``precision`` (float32/mixed; default: the store's, else
    float32) and ``runtime`` (auto/openvino/tensorflow/jax/torch; see :mod:`imgvec.runtime`) say how
    the model runs; a store made with one runtime can be extended with another. ``engine="ray"`` embeds on a Ray cluster (``ray_address``, else RAY_ADDRESS, else a local
    one) with ``ray_workers`` actors; this process still writes the store.
    """
    if engine not in ENGINES:
        raise BadInputError(f"--engine {engine!r}: expected one of {', '.join(ENGINES)}")
    output = Path(output)
    start = time.perf_counter()
    writer: StoreWriter | None = None
    try:
        if output.exists():
            writer = StoreWriter(output)
            run = dict(batch_size=batch_size, workers=workers, max_pixels=max_pixels, device=device,
                       precision=precision or writer.provenance.precision, runtime=runtime)
            embedder = _embedder_for_store(writer, model, weights, image_size, seed, run)
            collection = find_images(sources, root=writer.root)  # the model loads only if there is work
        else:
            embedder = Embedder(model or DEFAULT_BACKBONE, weights, image_size, batch_size, workers, seed, max_pixels,
                                device=device, precision=precision or "float32", runtime=runtime)
            collection = find_images(sources)
            embedder.load()  # before creating a store: missing weights must not leave an empty file
            writer = StoreWriter(output, embedder.provenance(), collection.root)
        before = len(writer.keys)
        todo = [f for f in collection.files if f.key not in writer.keys]
        removed = writer.keys - {f.key for f in collection.files} if sync else set()
        key_of = {f.path: f.key for f in todo}
        skipped: list[tuple[str, str]] = []
        finished = 0
        paths = list(key_of)
        batches = (embedder.embed_files(paths) if engine == "local"
                   else embed_files_on_ray(embedder, paths, ray_address, ray_workers))
        for batch in batches:
            rows = [todo[i] for i in batch.indices]
            skips = [(key_of[s.path], s.reason) for s in batch.skipped]
            writer.append(batch.embeddings, [f.key for f in rows], [f.label for f in rows], skips)
            skipped.extend(skips)
            finished += len(batch.indices) + len(batch.skipped)
            if progress:
                progress(finished, len(todo))
        writer.commit(drop=removed)
        return EmbedSummary(output, writer.provenance, len(writer.keys) - before + len(removed),
                            len(collection.files) - len(todo), len(writer.keys), skipped,
                            time.perf_counter() - start, len(removed))
    finally:
        if writer is not None:
            writer.close()  # on an error or Ctrl-C, what was embedded is still committed


def _embedder_for_store(store: StoreWriter, model: str | None, weights: str | None, image_size: int | None,
                        seed: int, kwargs: dict[str, Any]) -> Embedder:
    """The store's own embedder; explicit options must agree with how the store was made."""
    if model is None and weights is None and image_size is None:
        return Embedder.from_provenance(store.provenance, **kwargs)
    prov = store.provenance
    asked = Embedder(model or prov.backbone, weights if weights is not None else _weights_arg(prov),
                     image_size or prov.input_size, seed=seed, **kwargs)
    check_compatible(prov, _key_provenance(asked), f"store {store.path}", "the requested embedding",
                     fix="leave out --model/--weights/--image-size to resume with the store's own, or write a new store")
    return asked


def _weights_arg(prov: Provenance) -> str:
    return prov.weights_path if prov.weights == "file" else ("none" if prov.weights == "random" else "imagenet")


def _key_provenance(embedder: Embedder) -> Provenance:
    """Provenance without importing TensorFlow: enough for a compatibility check."""
    w = embedder.weights
    return Provenance(embedder.backbone.name, w.kind, w.seed, w.path, w.sha256, embedder.image_size,
                      embedder.backbone.preprocessing, embedder.dim, runtime=embedder.runtime)


# -- index ------------------------------------------------------------------------------
@dataclass
class IndexSummary:
    path: Path
    kind: str
    rows: int
    seconds: float
    updated: bool = False  # an existing index was extended rather than rebuilt
    added: int = 0


def build_index(store: PathLike, kind: str = "auto", output: PathLike | None = None,
                rebuild: bool = False, memory_budget: int | None = None, faiss_gpu: str = "auto") -> IndexSummary:
    """Build a FAISS index over ``store`` and save it beside it (``photos.index.h5``).

    An existing index of the same kind whose store only gained rows since is extended with
    the new rows instead of rebuilt (unless ``rebuild``). ``memory_budget`` (bytes, default
    half the RAM) is what ``auto`` lets an index hold before it picks the compact IVF-PQ.
    With ``faiss_gpu`` (auto/on/off) FAISS builds on the GPU; the saved file is always CPU-readable.
    """
    start = time.perf_counter()
    gpu = use_faiss_gpu(faiss_gpu)
    path = Path(output) if output else index_path_for(store)
    with open_store(store) as s:
        old = load_index(path, gpu) if path.exists() and not rebuild else None
        wanted = choose_kind(kind, s.rows, s.dim, memory_budget)
        if old is not None and old.kind == wanted and can_extend(old, s):
            added = extend_index(old, s)
            old.save(path)
            return IndexSummary(path, old.kind, old.rows, time.perf_counter() - start, True, added)
        index = _build_index(s, wanted, gpu=gpu)
    index.save(path)
    return IndexSummary(path, index.kind, index.rows, time.perf_counter() - start, False, index.rows)


@dataclass
class MergeSummary:
    store: Path
    inputs: int
    rows: int
    duplicates: int
    seconds: float


def merge(inputs: Sequence[PathLike], output: PathLike, on_duplicate: str = "first") -> MergeSummary:
    """Merge stores made the same way (e.g. shards from several machines) into a new store."""
    start = time.perf_counter()
    rows, duplicates = merge_stores(inputs, output, on_duplicate)
    return MergeSummary(Path(output), len(inputs), rows, duplicates, time.perf_counter() - start)


# -- query ------------------------------------------------------------------------------
@dataclass
class Neighbour:
    rank: int
    path: str
    score: float
    label: str = ""


@dataclass
class QueryResult:
    query: str
    results: list[Neighbour]


@dataclass
class QueryResults:
    provenance: Provenance
    queries: list[QueryResult]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    index_kind: str = ""


def _embed_inputs(embedder: Embedder, sources: Sequence[PathLike]) -> tuple[list[str], np.ndarray, list[tuple[str, str]]]:
    """Embed query or prediction images: (display paths, embeddings, skipped)."""
    files = find_images(sources).files
    names: list[str] = []
    blocks: list[np.ndarray] = []
    skipped: list[tuple[str, str]] = []
    for batch in embedder.embed_files([f.path for f in files]):
        names.extend(_display(files[i].path) for i in batch.indices)
        blocks.append(batch.embeddings)
        skipped.extend((_display(s.path), s.reason) for s in batch.skipped)
    emb = np.concatenate(blocks) if blocks else np.zeros((0, embedder.dim), np.float32)
    return names, emb, skipped


def _load_or_make_index(store: Store, index_path: PathLike | None, gpu: bool = False) -> VectorIndex:
    path = Path(index_path) if index_path else index_path_for(store.path)
    if path.exists():
        index = load_index(path, gpu)
        index.check_covers(store, f"index {path}")
        return index
    if index_path:
        raise BadInputError(f"{path}: no such index")
    if store.rows > AUTO_FLAT_MAX_ROWS:
        raise BadInputError(f"{store.path} has no index yet; run `imgvec index {store.path}`")
    return _build_index(store, "flat", gpu=gpu)  # small store: exact search in memory is quick


def query(
    store: PathLike,
    queries: Sequence[PathLike],
    k: int = 10,
    index: PathLike | None = None,
    weights: str | None = None,
    batch_size: int = 32,
    faiss_gpu: str = "auto",
    runtime: str = "auto",
) -> QueryResults:
    """The ``k`` stored images most similar to each query image (cosine similarity).

    Queries are embedded exactly as the store was (same backbone, weights and size).
    ``weights`` is only needed to point at a moved weights file. ``runtime`` need not be the
    one the store was made with. The loaded model is kept for the next call (:func:`release_models`).
    """
    with open_store(store) as s:
        vindex = _load_or_make_index(s, index, use_faiss_gpu(faiss_gpu))
        embedder = Embedder.from_provenance(s.provenance, weights_path=weights, batch_size=batch_size,
                                            runtime=runtime)
        names, emb, skipped = _embed_inputs(embedder, queries)
        keys, labels = s.paths(), s.labels()
        prov = s.provenance
    scores, ids = vindex.search(emb, k) if len(emb) else (np.zeros((0, 0)), np.zeros((0, 0), int))
    results = [
        QueryResult(name, [Neighbour(r + 1, keys[i], float(sc), labels[i])
                           for r, (i, sc) in enumerate(zip(row_ids, row_scores)) if i >= 0])
        for name, row_ids, row_scores in zip(names, ids, scores)
    ]
    return QueryResults(prov, results, skipped, vindex.kind)


# -- classify ---------------------------------------------------------------------------
@dataclass
class TrainSummary:
    head: Path
    provenance: Provenance
    classes: list[str]
    n_train: int
    n_unlabelled: int
    C: float
    cv_accuracy: float
    cv_accuracy_std: float
    report: dict[str, Any]
    confusion: np.ndarray
    seconds: float


def train(store: PathLike, output: PathLike, cv: int = 5, Cs: int | Sequence[float] = DEFAULT_CS) -> TrainSummary:
    """Fit a logistic-regression head on the store's labelled embeddings and save it."""
    from sklearn.metrics import classification_report, confusion_matrix

    start = time.perf_counter()
    with open_store(store) as s:
        labels = np.asarray(s.labels())
        keep = labels != ""
        if not keep.any():
            raise BadInputError(
                f"{s.path} has no labels; embed one folder whose images sit in one subfolder per class")
        X = s.embeddings()[keep]
        prov, store_id = s.provenance, s.store_id
    y = labels[keep]
    head = LogisticHead(cv=cv, Cs=Cs).fit(X, y)
    path = head.save(output, prov, store_id)
    classes = [str(c) for c in head.classes_]
    report = classification_report(y, head.cv_predictions_, labels=classes, output_dict=True, zero_division=0)
    confusion = confusion_matrix(y, head.cv_predictions_, labels=classes)
    return TrainSummary(path, prov, classes, int(keep.sum()), int((~keep).sum()), head.C_, head.cv_accuracy_,
                        head.cv_accuracy_std_, report, confusion, time.perf_counter() - start)


@dataclass
class Prediction:
    path: str
    label: str
    probabilities: dict[str, float]


@dataclass
class Predictions:
    provenance: Provenance
    classes: list[str]
    predictions: list[Prediction]
    skipped: list[tuple[str, str]] = field(default_factory=list)


def predict(head: PathLike, images: Sequence[PathLike], weights: str | None = None,
            batch_size: int = 32, runtime: str = "auto") -> Predictions:
    """Label each image with the head, embedding it with the head's own backbone (on ``runtime``)."""
    model, prov = load_head(head)
    embedder = Embedder.from_provenance(prov, weights_path=weights, batch_size=batch_size, runtime=runtime)
    names, emb, skipped = _embed_inputs(embedder, images)
    classes = [str(c) for c in model.classes_]
    proba = model.predict_proba(emb) if len(emb) else np.zeros((0, len(classes)))
    preds = [Prediction(n, classes[int(np.argmax(p))], {c: float(v) for c, v in zip(classes, p)})
             for n, p in zip(names, proba)]
    return Predictions(prov, classes, preds, skipped)


# -- models kept loaded, the compiled-model cache --------------------------------------------
def release_models() -> int:
    """Free the models query/predict/evaluate/embed keep loaded between calls; how many there were."""
    from .runtime import release_engines

    return release_engines()


@dataclass
class CacheSummary:
    folder: Path
    entries: list[CacheEntry]
    cleared: int = 0  # entries removed by ``clear``
    freed: int = 0  # bytes


def cache(clear: bool = False) -> CacheSummary:
    """The compiled OpenVINO models imgvec keeps (see :func:`imgvec.runtime.cache_dir`); ``clear`` removes them."""
    from .runtime import cache_dir, cache_entries, clear_cache

    cleared, freed = clear_cache() if clear else (0, 0)
    return CacheSummary(cache_dir(), cache_entries(), cleared, freed)


# -- info -------------------------------------------------------------------------------
def models() -> list[Backbone]:
    """Every backbone imgvec knows, in table order."""
    return list(BACKBONES.values())


def info(store: PathLike) -> dict[str, Any]:
    """A store's provenance, counts, labels and index status, as plain data."""
    with open_store(store) as s:
        labels = s.labels()
        counts = {label: labels.count(label) for label in sorted(set(labels)) if label}
        data: dict[str, Any] = {
            "store": str(s.path), "root": s.root, "store_id": s.store_id, "rows": s.rows, "dim": s.dim,
            "skipped": len(s.skipped()), "labels": counts, "unlabelled": labels.count(""),
            "provenance": s.provenance, "index": None, "pending_rows": s.pending_rows(),
        }
        ipath = index_path_for(s.path)
        if ipath.exists():
            vindex = load_index(ipath)
            fresh = can_extend(vindex, s) and vindex.rows == s.rows
            data["index"] = {"path": str(ipath), "kind": vindex.kind, "rows": vindex.rows, "up_to_date": fresh}
    return data


# -- galleries, evaluation, backbone comparison, duplicates -----------------------------
# (HTML rendering lives in html.py, the comparison in comparison.py, duplicate search in duplicates.py.)
from .comparison import Comparison  # noqa: E402
from .duplicates import DuplicateGroup  # noqa: E402


def image_paths(store: PathLike, keys: Sequence[str]) -> list[str]:
    """Where the images a store names (``Neighbour.path``, duplicate members) are on disk."""
    with open_store(store) as s:
        return [s.absolute(k) for k in keys]


def query_html(results: QueryResults, output: PathLike, store: PathLike) -> Path:
    """Write a self-contained gallery of ``results`` (from :func:`query` on ``store``) to ``output``."""
    from . import html

    with open_store(store) as s:
        absolute = s.absolute
        return html.write(output, html.query_page(results, absolute))


def predict_html(predictions: Predictions, output: PathLike, top: int = 3) -> Path:
    """Write a self-contained page of each image with its predicted label and ``top`` probabilities."""
    from . import html

    return html.write(output, html.predict_page(predictions, top=top))


@dataclass
class Evaluation:
    head: Path
    data: str
    provenance: Provenance
    classes: list[str]  # the head's classes
    labels: list[str]  # rows/columns of ``confusion``: the head's classes, then any it does not know
    n_images: int
    accuracy: float
    report: dict[str, Any]  # scikit-learn classification_report(output_dict=True)
    confusion: np.ndarray  # rows: true label, columns: predicted label
    unknown: dict[str, int]  # labels in the data the head was not trained on (always counted wrong)
    n_unlabelled: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0


def _labelled_from_store(path: Path, prov: Provenance, head: PathLike) -> tuple[np.ndarray, np.ndarray, int]:
    with open_store(path) as s:
        check_compatible(prov, s.provenance, f"head {head}", f"store {path}",
                         fix=f"evaluate on an image folder instead, or embed it with the head's settings "
                             f"(-m {prov.backbone} --image-size {prov.input_size} --weights {_weights_arg(prov)}"
                             + (f" --seed {prov.weights_seed})" if prov.is_random else ")"))
        labels = np.asarray(s.labels(), dtype=object)
        keep = labels != ""
        X = s.embeddings()[keep] if keep.any() else np.zeros((0, s.dim), np.float32)
    return X, labels[keep].astype(str), int((~keep).sum())


def _labelled_from_folder(folder: Path, prov: Provenance, weights: str | None, batch_size: int, runtime: str
                          ) -> tuple[np.ndarray, np.ndarray, int, list[tuple[str, str]]]:
    files = find_images([folder]).files
    labelled = [f for f in files if f.label]
    embedder = Embedder.from_provenance(prov, weights_path=weights, batch_size=batch_size, runtime=runtime)
    blocks, y, skipped = [], [], []
    for batch in embedder.embed_files([f.path for f in labelled]):
        blocks.append(batch.embeddings)
        y.extend(labelled[i].label for i in batch.indices)
        skipped.extend((_display(s.path), s.reason) for s in batch.skipped)
    X = np.concatenate(blocks) if blocks else np.zeros((0, embedder.dim), np.float32)
    return X, np.asarray(y, dtype=str), len(files) - len(labelled), skipped


def evaluate(head: PathLike, data: PathLike, weights: str | None = None, batch_size: int = 32,
             runtime: str = "auto") -> Evaluation:
    """Score a head on held-out labelled data: a folder (one subfolder per class) or a store.

    A folder is embedded exactly as the head's training data was. A store must have been made
    with the head's backbone, weights and input size, or it is refused (:class:`MismatchError`).
    """
    from sklearn.metrics import classification_report, confusion_matrix

    start = time.perf_counter()
    model, prov = load_head(head)
    data = Path(data)
    skipped: list[tuple[str, str]] = []
    if data.is_file() and data.suffix.lower() in (".h5", ".hdf5"):
        X, y, n_unlabelled = _labelled_from_store(data, prov, head)
    elif data.is_dir():
        X, y, n_unlabelled, skipped = _labelled_from_folder(data, prov, weights, batch_size, runtime)
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
                      confusion, unknown, n_unlabelled, skipped, time.perf_counter() - start)


def evaluation_html(evaluation: Evaluation, output: PathLike) -> Path:
    from . import html

    return html.write(output, html.evaluation_page(evaluation))


def compare(labelled_dir: PathLike, models: Sequence[str] | None = None, cv: int = 5,
            stores: PathLike = "imgvec-compare", weights: str | None = "imagenet", image_size: int | None = None,
            batch_size: int = 32, seed: int = DEFAULT_SEED, random_state: int = 0, speed_sample: int = 64,
            progress: Callable[[str, int, int], None] | None = None) -> Comparison:
    """Compare backbones on a labelled folder: same folds, one row per backbone (see comparison.py).

    Stores are written as ``<stores>/<backbone>.h5`` and resumed on the next run.
    """
    from .comparison import DEFAULT_MODELS
    from .comparison import compare as _compare

    return _compare(labelled_dir, models or DEFAULT_MODELS, cv=cv, stores=stores, weights=weights,
                    image_size=image_size, batch_size=batch_size, seed=seed, random_state=random_state,
                    speed_sample=speed_sample, progress=progress)


def comparison_html(comparison: Comparison, output: PathLike) -> Path:
    from . import html

    return html.write(output, html.compare_page(comparison))


@dataclass
class DedupResult:
    store: Path
    provenance: Provenance
    threshold: float
    rows: int
    groups: list[DuplicateGroup]
    candidates: int  # pairs checked with the full vectors
    missing: list[str]  # files that could not be read for hashing
    seconds: float
    method: str = "exact"  # how pairs were searched: "exact", or the inverted-list settings

    @property
    def exact_groups(self) -> int:
        return sum(g.kind == "exact" for g in self.groups)

    @property
    def near_groups(self) -> int:
        return sum(g.kind == "near" for g in self.groups)


def dedup(store: PathLike, threshold: float = 0.95, check_files: bool = True, exact: bool | None = None,
          progress: Progress | None = None) -> DedupResult:
    """Groups of identical files (sha256) and of near duplicates (cosine >= ``threshold``).

    The search is exhaustive up to 20,000 images (or with ``exact=True``) and uses inverted
    lists above (see duplicates.py); the store is read in chunks.
    """
    from .duplicates import find_duplicates

    start = time.perf_counter()
    with open_store(store) as s:
        found = find_duplicates(s, threshold, check_files=check_files, exact=exact, progress=progress)
        return DedupResult(Path(store), s.provenance, threshold, s.rows, found.groups, found.candidates,
                           found.missing, time.perf_counter() - start, found.method)


def dedup_page(result: DedupResult) -> str:
    """The self-contained HTML page of ``result`` (thumbnails of every group), as a string."""
    from . import html

    with open_store(result.store) as s:
        return html.dedup_page(result, s.absolute)


def dedup_html(result: DedupResult, output: PathLike) -> Path:
    from . import html

    return html.write(output, dedup_page(result))

