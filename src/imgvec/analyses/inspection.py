"""What is wrong with a store's images: label issues, outliers, leaks, image statistics, a 2-D map.

Everything comes from what the store holds (rows, labels, the optional ``/stats`` dataset, its
index): no image is embedded again.

**Label issues** are found by confident learning (Northcutt, Jiang and Chuang, "Confident
Learning: Estimating Uncertainty in Dataset Labels", JAIR 70, 2021), written here from the paper
(cleanlab, its authors' library, is AGPL-3.0; imgvec is Apache-2.0 and does not use it). Each
labelled image gets out-of-fold class probabilities from the logistic head (the folds and the C
``imgvec train`` uses: :class:`~imgvec.vectors.classifier.LogisticHead`; a trained head's C when one is
given; above :data:`C_SEARCH_ROWS` labelled images C is chosen on a stratified sample of that many, then
the out-of-fold probabilities of every image are made at that C), averaged with the label
shares of its k nearest labelled neighbours. Per class j, the threshold t_j is the mean
probability of j over the images labelled j; an image's confident label is the most probable
class among those whose probability reaches their threshold. The confident joint counts
(given label, confident label); its off-diagonal images are the issues, ranked by
``1 - probability of the given label`` (self-confidence, lowest first).

**Outliers**: for each row, d_knn = 1 - mean cosine to its k nearest neighbours and, for labelled
rows, d_class = 1 - cosine to the nearest class centroid (any class: an image near another class's
centroid is a label issue, not an outlier; measured on the planted benchmark, its own class's centroid
ranked moved images above images from elsewhere). Each is turned into a robust z-score
(median and 1.4826 x MAD over the store, the modified z-score of Iglewicz and Hoaglin); the
score is the larger of the two, and rows scoring above :data:`OUTLIER_Z` (3.5) are reported.

**Leaks** are duplicate groups (found by :mod:`imgvec.analyses.duplicates`, passed in by the api)
whose members sit in different class folders or different splits.

**Image statistics** (recorded by ``embed``; see :func:`imgvec.files.images.pixel_stats`) are
flagged against the thresholds in :data:`STAT_LIMITS`.

**The map** is PCA to 50 dimensions, then t-SNE (scikit-learn) to 2, on at most ``map_rows`` rows
(a seeded random sample above that).
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np

from imgvec.progress import Phase, Progress
from imgvec.files.images import STATS_COLUMNS
from imgvec.results import (DuplicateGroup, ImageFlag, InspectResult, LabelIssue, Leak, MapLayout,
                            Outlier)
from imgvec.vectors.index import VectorIndex, normalized, search_store
from imgvec.vectors.store import Store

K = 10  # neighbours per image for label voting and outlier distances
OUTLIER_Z = 3.5  # modified z-score above which a row is an outlier (Iglewicz and Hoaglin's cut-off)
MAD_SCALE = 1.4826  # MAD -> standard deviation for normal data
SEARCH_BLOCK = 4096  # query rows per neighbour search
# An HNSW index's search breadth for every row's neighbours (queries use 128), then the rows whose search missed
# the row itself searched again at 128. Measured on 100k x 1280 generated rows (benchmarks/bench_inspect.py): at 24,
# recall@10 against exact search 0.974 for 40% of the CPU time of 128, but the searches that went astray (1.2% of
# rows, each missing itself) made 1,070 outliers of the 72 found at 128; searched again, 89, for 1 more CPU second.
HNSW_EF_NEIGHBOURS = 24
MAP_ROWS = 3_000  # the map lays out at most this many rows (a seeded sample above): t-SNE's cost bounds it
TSNE_ITERATIONS = 500  # scikit-learn's default is 1000; the layout is settled well before on a few thousand points
MAP_PCA_DIM = 50
C_SEARCH_ROWS = 3_000  # above this many labelled images, C is chosen on a stratified sample of this many
LEAK_GROUP_MAX = 5000  # members of one duplicate group compared pairwise for leaks (a bigger group: degenerate)
SPLIT_NAMES = ("train", "training", "val", "valid", "validation", "dev", "test", "testing")
# Image statistics flags: (column, comparison, limit, worst value, flag)
STAT_LIMITS = {
    "dark": ("brightness", "<", 40.0, 0.0),  # mean grey level of 0..255
    "bright": ("brightness", ">", 220.0, 255.0),
    "blurry": ("sharpness", "<", 30.0, 0.0),  # variance of the Laplacian on a grey copy at most 256 px a side
    "tiny": ("min_side", "<", 64.0, 1.0),  # shorter side in pixels
    "extreme aspect": ("aspect", ">", 3.0, 20.0),  # longer side / shorter side
}


def neighbours(store: Store, vectors: np.ndarray, k: int, index: VectorIndex | None = None,
               progress: Progress | None = None, ef_search: int | None = HNSW_EF_NEIGHBOURS
               ) -> tuple[np.ndarray, np.ndarray]:
    """Cosine scores and rows of each row's ``k`` nearest other rows (the store's index where given,
    else exact search), ``(n, k)`` each; -1 where fewer were found.

    ``ef_search``: an HNSW index's search breadth for this search (at least ``k + 1``; None: the index's
    own); a row whose search did not find the row itself went astray, and is searched again at the
    index's own breadth (see :data:`HNSW_EF_NEIGHBOURS`)."""
    n = len(vectors)
    k = max(1, min(k, n - 1))
    scores = np.full((n, k), -1.0, np.float32)
    ids = np.full((n, k), -1, np.int64)
    hnsw = None
    if index is not None and index.kind == "hnsw" and ef_search:
        import faiss

        hnsw = faiss.downcast_index(index.faiss_index).hnsw
        kept, hnsw.efSearch = hnsw.efSearch, max(ef_search, k + 1)
    try:
        with Phase(progress, "finding neighbours", n) as step:
            found_self = _search_rows(store, vectors, np.arange(n), k, index, scores, ids, step)
        if hnsw is not None and hnsw.efSearch < kept:
            hnsw.efSearch = kept
            astray = np.flatnonzero(~found_self)
            with Phase(progress, "finding neighbours again", len(astray)) as step:
                _search_rows(store, vectors, astray, k, index, scores, ids, step)
    finally:
        if hnsw is not None:
            hnsw.efSearch = kept
    return scores, ids


def _search_rows(store: Store, vectors: np.ndarray, rows: np.ndarray, k: int, index: VectorIndex | None,
                 scores: np.ndarray, ids: np.ndarray, step: Phase) -> np.ndarray:
    """Fill ``scores``/``ids`` at ``rows`` with their ``k`` nearest other rows, :data:`SEARCH_BLOCK` rows a
    search; whether each row's search found the row itself."""
    found_self = np.zeros(len(rows), bool)
    for start in range(0, len(rows), SEARCH_BLOCK):
        part = rows[start : start + SEARCH_BLOCK]
        s, i = search_store(store, vectors[part], k + 1, index)
        mine = i == part[:, None]  # the row itself (or an exact copy ranked before it) is dropped
        found_self[start : start + len(part)] = mine.any(axis=1)
        keep = np.argsort(mine, axis=1, kind="stable")[:, :k]  # non-self first, in score order
        scores[part] = np.take_along_axis(s, keep, 1)
        ids[part] = np.take_along_axis(i, keep, 1)
        step.update(start + len(part))
    return found_self


def robust_z(values: np.ndarray) -> np.ndarray:
    """Modified z-scores: (v - median) / (1.4826 MAD). Where more than half the values are equal (MAD 0), the
    mean absolute deviation stands in for the MAD (and 1 when every value is the same)."""
    med = np.median(values)
    mad = MAD_SCALE * np.median(np.abs(values - med))
    if mad == 0:
        mad = MAD_SCALE * np.mean(np.abs(values - med)) or 1.0
    return (values - med) / mad


# -- label issues --------------------------------------------------------------------------
def confident_learning(probs: np.ndarray, given: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class thresholds t_j, the confident joint (given x confident label), and each row's confident
    label (-1 where no class reaches its threshold), from probabilities ``probs`` and labels ``given`` (ints)."""
    n, m = probs.shape
    thresholds = np.array([probs[given == j, j].mean() if (given == j).any() else 1.0 for j in range(m)])
    above = probs >= thresholds[None, :] - 1e-9
    confident = np.where(above.any(axis=1), np.argmax(np.where(above, probs, -np.inf), axis=1), -1)
    joint = np.zeros((m, m), np.int64)
    ok = confident >= 0
    np.add.at(joint, (given[ok], confident[ok]), 1)
    return thresholds, joint, confident


def find_label_issues(oof: np.ndarray, knn_shares: np.ndarray, given: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows whose confident label is not their given one (off the confident joint's diagonal), most
    suspicious first; with each row's score (1 - combined self-confidence) and suggested class index."""
    probs = (oof + knn_shares) / 2
    _, _, confident = confident_learning(probs, given)
    score = 1.0 - probs[np.arange(len(given)), given]
    issues = np.flatnonzero((confident >= 0) & (confident != given))
    issues = issues[np.argsort(-score[issues], kind="stable")]
    return issues, score, confident


def label_issues(vectors: np.ndarray, labels: Sequence[str], keys: Sequence[str], ids: np.ndarray,
                 C: float | None = None, cv: int = 5, progress: Progress | None = None
                 ) -> tuple[list[LabelIssue], str]:
    """Label issues among the labelled rows; and how they were found, in words.

    ``ids``: each row's nearest neighbours (store rows). ``C``: the head's regularisation (None: chosen
    by cross-validation as ``imgvec train`` chooses it).
    """
    from imgvec.vectors.classifier import LogisticHead, out_of_fold_probabilities

    labels = np.asarray(labels, dtype=object)
    rows = np.flatnonzero(labels != "")
    classes, given = np.unique(labels[rows].astype(str), return_inverse=True)
    how_C = "the head's C"
    if C is None:  # chosen as train chooses it; on a stratified sample of a large store (the C search dominates)
        sample = rows
        if len(rows) > C_SEARCH_ROWS:
            from sklearn.model_selection import train_test_split

            sample = np.sort(train_test_split(np.arange(len(rows)), train_size=C_SEARCH_ROWS, stratify=given,
                                              random_state=0)[0])
        head = LogisticHead(cv=cv)
        C = head.choose_C(vectors[rows[sample]], classes[given[sample]], progress=progress)
        how_C = (f"C chosen by {cv}-fold cross-validation as train chooses it"
                 + (f", on a stratified sample of {len(sample):,} images" if len(sample) < len(rows) else ""))
        oof = head.cv_probabilities_ if len(sample) == len(rows) else None
    else:
        oof = None
    if oof is None:
        labelled = vectors if len(rows) == len(vectors) else vectors[rows]  # no copy when every row is labelled
        oof = out_of_fold_probabilities(labelled, classes[given], C, cv, progress=progress)
        del labelled
    oof = np.asarray(oof, np.float64)
    accuracy = float(np.mean(oof.argmax(axis=1) == given))
    # Neighbours among labelled rows only: map store rows to positions in ``rows`` (-1: unlabelled).
    position = np.full(len(labels), -1, np.int64)
    position[rows] = np.arange(len(rows))
    nb = ids[rows]
    nb_given = np.where(nb >= 0, position[np.where(nb >= 0, nb, 0)], -1)
    nb_labels = np.where(nb_given >= 0, given[np.where(nb_given >= 0, nb_given, 0)], -1)
    shares = _shares_of(nb_labels, len(classes))
    issues, score, confident = find_label_issues(oof, shares, given)
    self_conf = oof[np.arange(len(given)), given]
    agree = shares[np.arange(len(given)), given]
    found = [LabelIssue(keys[rows[i]], str(classes[given[i]]), str(classes[confident[i]]), float(score[i]),
                        float(self_conf[i]), float(agree[i])) for i in issues]
    how = (f"confident learning (Northcutt et al. 2021) on the mean of out-of-fold probabilities of the logistic "
           f"head ({cv} folds, C={C:g}: {how_C}; out-of-fold accuracy {accuracy:.3f}) and the label shares of "
           f"the {ids.shape[1]} nearest labelled neighbours; per-class thresholds are the mean probability of each "
           "class over the images labelled with it; issues are the off-diagonal of the confident joint, ranked by "
           "1 - the combined probability of the given label")
    return found, how


def _shares_of(neighbour_labels: np.ndarray, n_classes: int) -> np.ndarray:
    counts = np.stack([(neighbour_labels == j).sum(axis=1) for j in range(n_classes)], axis=1).astype(np.float64)
    total = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, total, out=np.full_like(counts, 1.0 / n_classes), where=total > 0)


# -- outliers -----------------------------------------------------------------------------
def outlier_scores(vectors: np.ndarray, scores: np.ndarray, labels: Sequence[str]
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(score, neighbour distance, class distance) per row: see the module docstring. Class distance is
    NaN for unlabelled rows, whose score is their neighbour distance's z-score alone."""
    valid = scores > -1.0
    mean_cos = np.where(valid, scores, 0).sum(axis=1) / np.maximum(valid.sum(axis=1), 1)
    d_knn = 1.0 - mean_cos
    z = robust_z(d_knn)
    labels = np.asarray(labels, dtype=object)
    d_class = np.full(len(vectors), np.nan)
    classes = sorted(set(labels.tolist()) - {""})
    if classes:
        from scipy.sparse import csr_matrix

        labelled = np.flatnonzero(labels != "")
        member = csr_matrix((np.ones(len(labelled), np.float32),
                             (np.searchsorted(classes, labels[labelled].astype(str)), labelled)),
                            shape=(len(classes), len(vectors)))
        centres = normalized(np.asarray(member @ vectors, np.float32))  # each class's sum of rows, no copy of them
        for start in range(0, len(labelled), SEARCH_BLOCK):  # a block of rows against every centroid at a time
            part = labelled[start : start + SEARCH_BLOCK]
            d_class[part] = 1.0 - (vectors[part] @ centres.T).max(axis=1)
    has = ~np.isnan(d_class)
    if has.any():
        zc = np.full(len(vectors), -np.inf)
        zc[has] = robust_z(d_class[has])
        z = np.maximum(z, zc)
    return z, d_knn, d_class


def outliers(vectors: np.ndarray, scores: np.ndarray, labels: Sequence[str], keys: Sequence[str],
             threshold: float = OUTLIER_Z) -> tuple[list[Outlier], str]:
    z, d_knn, d_class = outlier_scores(vectors, scores, labels)
    order = np.argsort(-z, kind="stable")
    found = [Outlier(keys[i], labels[i], float(z[i]), float(d_knn[i]),
                     None if math.isnan(d_class[i]) else float(d_class[i])) for i in order if z[i] > threshold]
    how = (f"robust z-score (median, 1.4826 x MAD) of 1 - mean cosine to the {scores.shape[1]} nearest neighbours and "
           f"of 1 - cosine to the nearest class centroid; the larger of the two, reported above {threshold:g}")
    return found, how


# -- leaks --------------------------------------------------------------------------------
def split_of(key: str, names: Sequence[str] | None = None) -> str:
    """The split folder a store key sits under: the first folder in it named one of ``names`` (default
    :data:`SPLIT_NAMES`, any case); "" when none."""
    wanted = {n.lower() for n in (names or SPLIT_NAMES)}
    for part in key.replace(os.sep, "/").split("/")[:-1]:
        if part.lower() in wanted:
            return part
    return ""


def leaks(groups: Sequence[DuplicateGroup], vectors: np.ndarray, row_of: dict[str, int], labels: Sequence[str],
          splits: Sequence[str] | None = None, threshold: float = 0.95) -> list[Leak]:
    """Duplicates across a boundary: within each group, every image paired with its most similar member in
    another split (else in another class folder), when that pair itself is identical files or at ``threshold``
    (a group is transitive: its members are not all that close to each other). Each pair once, closest first."""
    found: list[Leak] = []
    seen: set[tuple[str, str]] = set()
    for g in groups:
        members = [m.path for m in g.members if m.path in row_of][:LEAK_GROUP_MAX]
        rows = np.array([row_of[m] for m in members])
        split = np.array([split_of(m, splits) for m in members], dtype=object)
        label = np.array([labels[r] for r in rows], dtype=object)
        sims = np.ones((len(rows), len(rows))) if g.kind == "exact" else vectors[rows] @ vectors[rows].T
        for across, part in (("split", split), ("class", label)):
            apart = (part[:, None] != part[None, :]) & (part[:, None] != "") & (part[None, :] != "")
            if across == "class":
                apart &= split[:, None] == split[None, :]  # copies across splits are reported as such
            masked = np.where(apart, sims, -np.inf)
            best = np.argmax(masked, axis=1)
            for i, j in enumerate(best):
                score = float(min(1.0, masked[i, j]))
                pair = (min(members[i], members[j]), max(members[i], members[j]))
                if not apart[i, j] or score < threshold - 1e-6 or pair in seen:
                    continue
                seen.add(pair)
                a, b = pair
                ra, rb = row_of[a], row_of[b]
                found.append(Leak(a, b, g.kind, across, score, labels[ra], labels[rb], split_of(a, splits),
                                  split_of(b, splits)))
    found.sort(key=lambda x: (-x.score, x.across != "split", x.path))
    return found


# -- image statistics ----------------------------------------------------------------------
def stat_flags(stats: np.ndarray, keys: Sequence[str]) -> list[ImageFlag]:
    """Rows whose statistics pass a limit of :data:`STAT_LIMITS`, worst first (rows with NaN stats left out)."""
    width, height = stats[:, 0], stats[:, 1]
    derived = {"brightness": stats[:, 2], "sharpness": stats[:, 4], "min_side": np.minimum(width, height),
               "aspect": np.maximum(width, height) / np.maximum(np.minimum(width, height), 1)}
    known = np.isfinite(stats).all(axis=1)
    flags: dict[int, list[str]] = {}
    worst = np.zeros(len(stats))
    for flag, (column, op, limit, extreme) in STAT_LIMITS.items():
        v = derived[column]
        hit = known & ((v < limit) if op == "<" else (v > limit))
        depth = np.clip(np.abs(v - limit) / max(abs(extreme - limit), 1e-9), 0, 1)
        for i in np.flatnonzero(hit):
            flags.setdefault(int(i), []).append(flag)
            worst[i] = max(worst[i], depth[i])
    order = sorted(flags, key=lambda i: (-worst[i], keys[i]))
    return [ImageFlag(keys[i], flags[i], float(worst[i]), dict(zip(STATS_COLUMNS, map(float, stats[i]))))
            for i in order]


def stats_method() -> str:
    parts = [f"{flag}: {column.replace('_', ' ')} {op} {limit:g}" for flag, (column, op, limit, _) in STAT_LIMITS.items()]
    return ("recorded by embed from the decoded pixels; brightness is the mean grey level (0-255), sharpness the "
            "variance of the Laplacian of a grey copy at most 256 px a side; flagged: " + "; ".join(parts)
            + "; score: how far past its worst limit (0-1)")


# -- the map ------------------------------------------------------------------------------
def sample_rows(n: int, max_rows: int = MAP_ROWS, seed: int = 0) -> np.ndarray:
    """The rows of ``n`` the map lays out, ascending: all of them up to ``max_rows``, else a seeded sample."""
    return np.arange(n) if n <= max_rows else np.sort(np.random.default_rng(seed).choice(n, max_rows, replace=False))


def layout_2d(vectors: np.ndarray, max_rows: int = MAP_ROWS, seed: int = 0) -> MapLayout:
    """PCA to 50 dimensions then t-SNE to 2 of (a seeded sample of at most ``max_rows`` of) ``vectors``."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    n = len(vectors)
    rows = sample_rows(n, max_rows, seed)
    x = vectors[rows]
    dim = min(MAP_PCA_DIM, x.shape[1], len(rows))
    reduced = PCA(dim, random_state=seed).fit_transform(x) if dim < x.shape[1] else x
    perplexity = float(min(30.0, max(2.0, (len(rows) - 1) / 3)))
    if len(rows) < 4:
        xy = np.zeros((len(rows), 2)) if len(rows) < 2 else reduced[:, :2]
    else:
        xy = TSNE(2, perplexity=perplexity, init="pca", max_iter=TSNE_ITERATIONS, random_state=seed,
                  n_jobs=1).fit_transform(reduced)
    xy = np.asarray(xy, np.float64)
    lo, span = xy.min(axis=0) if len(xy) else 0, np.ptp(xy, axis=0) if len(xy) else 1
    xy = (xy - lo) / np.where(span > 0, span, 1)
    sample = (f"a random sample of {len(rows):,} of {n:,} rows (seed {seed})" if len(rows) < n else f"all {n:,} rows")
    return MapLayout(rows, xy.astype(np.float32), n,
                     f"PCA to {dim} dimensions, then t-SNE to 2 (perplexity {perplexity:.3g}, {TSNE_ITERATIONS} iterations, "
                     f"scikit-learn), {sample}")


def read_normalized(store: Store, progress: Progress | None = None) -> np.ndarray:
    """Every row of ``store``, L2-normalised, read in chunks (never two copies of the whole store)."""
    vectors = np.empty((store.rows, store.dim), np.float32)
    with Phase(progress, "reading the store", store.rows) as step:
        for start, block in store.iter_embeddings():
            vectors[start : start + len(block)] = normalized(block)
            step.update(start + len(block))
    return vectors


def inspect_store(store: Store, groups: Sequence[DuplicateGroup] | None = None, index: VectorIndex | None = None,
                  C: float | None = None, cv: int = 5, k: int = K, splits: Sequence[str] | None = None,
                  map_rows: int | None = MAP_ROWS, threshold: float = 0.95,
                  progress: Progress | None = None, *, vectors: np.ndarray | None = None,
                  knn: tuple[np.ndarray, np.ndarray] | None = None) -> InspectResult:
    """Every section of the report on ``store``; ``groups``: its duplicate groups (None: leaks not looked for).

    ``index``: the store's index, used for the neighbour search (None: exact search). ``C``: the head's
    regularisation (None: chosen by cross-validation). ``map_rows``: the map's largest sample (None: no map).
    ``vectors``: the store's rows as :func:`read_normalized` reads them, when the caller has them already;
    ``knn``: each row's ``k`` neighbours as :func:`neighbours` finds them, when the caller found them already
    (so that it can let go of the index first).
    """
    import time

    began = time.perf_counter()
    keys, labels = store.paths(), store.labels()
    n = len(keys)
    methods: dict[str, str] = {}
    skipped: dict[str, str] = {}
    if vectors is None:
        vectors = read_normalized(store, progress)
    classes = sorted(set(labels) - {""})
    issues: list[LabelIssue] = []
    found_outliers: list[Outlier] = []
    if n >= 3:
        scores, ids = knn if knn is not None else neighbours(store, vectors, k, index, progress)
        found_outliers, methods["outliers"] = outliers(vectors, scores, labels, keys)
        counts = [labels.count(c) for c in classes]
        if len(classes) < 2:
            skipped["label_issues"] = "the store has no class folders (labels)" if not classes else \
                f"only one class ({classes[0]}): nothing to confuse it with"
        elif min(counts) < cv:
            skipped["label_issues"] = (f"class {classes[int(np.argmin(counts))]!r} has {min(counts)} images, "
                                       f"fewer than the {cv} cross-validation folds")
        elif all(split_of(c + "/x", splits) for c in classes):
            skipped["label_issues"] = f"the top folders ({', '.join(classes)}) are splits, not classes"
        else:
            issues, methods["label_issues"] = label_issues(vectors, labels, keys, ids, C, cv, progress)
    else:
        skipped["label_issues"] = skipped["outliers"] = f"{n} rows: too few to compare"
    found_leaks: list[Leak] = []
    if groups is None:
        skipped["leaks"] = "not searched"
    else:
        row_of = {key: i for i, key in enumerate(keys)}
        found_leaks = leaks(groups, vectors, row_of, labels, splits, threshold)
        names = ", ".join(splits) if splits else "train/val/test folder names"
        methods["leaks"] = (f"identical files (sha256) and near duplicates (cosine >= {threshold:g}, imgvec dedup's "
                            f"search) whose members are in different splits ({names}) or different class folders")
    stats = store.stats()
    missing = n if stats is None else int((~np.isfinite(stats).all(axis=1)).sum())
    flags = stat_flags(stats, keys) if stats is not None else []
    methods["image_stats"] = stats_method()
    if missing == n and n:
        skipped["image_stats"] = (f"the store holds no image statistics (made before embed recorded them): "
                                  f"`imgvec inspect {store.path} --stats` reads the images again to add them, "
                                  "without embedding")
    layout = None
    if map_rows and n >= 2:
        with Phase(progress, "laying out the map", 1):
            layout = layout_2d(vectors, map_rows)
        methods["map"] = layout.method
    return InspectResult(store.path, store.root, store.provenance, n, sum(1 for x in labels if x), classes, issues,
                         found_outliers, found_leaks, flags, methods, skipped, missing, layout,
                         [keys[i] for i in layout.rows] if layout else [],
                         [labels[i] for i in layout.rows] if layout else [], time.perf_counter() - began)


def measure_stats(path: str | os.PathLike[str], workers: int | None = None, progress: Progress | None = None
                  ) -> tuple[int, list[tuple[str, str]]]:
    """Decode the images of store ``path`` whose statistics are missing and store them (no embedding):
    how many were measured, and the images that could not be read (left unmeasured) with the reason.

    Each image is decoded as ``embed`` decodes it (the store's input size), under the store's writer
    lock, and the statistics are published atomically with the rest of the store unchanged.
    """
    from concurrent.futures import ThreadPoolExecutor

    from imgvec.errors import ImageSkipped
    from imgvec.files.images import load_image_stats
    from imgvec.vectors.store import StoreWriter, open_store

    with StoreWriter(path) as writer:
        writer.commit()
        with open_store(path) as store:
            keys, size, old = store.paths(), store.provenance.input_size, store.stats()
            files = [store.absolute(k) for k in keys]
        stats = np.full((len(keys), len(STATS_COLUMNS)), np.nan, np.float32) if old is None else old.copy()
        todo = np.flatnonzero(~np.isfinite(stats).all(axis=1))

        def one(i: int) -> np.ndarray | ImageSkipped:
            try:
                return load_image_stats(files[i], size)[1]  # type: ignore[return-value]
            except ImageSkipped as skipped:
                return skipped

        failed: list[tuple[str, str]] = []
        with Phase(progress, "measuring images", len(todo)) as step, \
                ThreadPoolExecutor(workers or min(8, (os.cpu_count() or 1) * 2)) as pool:
            for done, (i, got) in enumerate(zip(todo, pool.map(one, todo.tolist(), chunksize=32)), 1):
                if isinstance(got, ImageSkipped):
                    failed.append((keys[i], got.reason))
                else:
                    stats[i] = got
                step.update(done)
        if len(todo) > len(failed):
            writer.set_stats(keys, stats)
    return len(todo) - len(failed), failed
