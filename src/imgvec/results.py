"""What the public API returns: plain result objects that render themselves as records.

Nothing here runs a model or reads a file: the api (and comparison, duplicates) fill these in.
Each answer has one result type, and each type says what it is as JSON-ready records
(:meth:`to_records`, what ``--format json`` prints and what an HTTP service returns), as
CSV (:meth:`csv_columns`, :meth:`csv_rows`) and as a text table (:meth:`to_table`: plain rows and
columns the CLI's one renderer, :func:`imgvec.pages.report.render`, draws), so a notebook, the CLI
and a service see the same data.

Paths in records open from anywhere: they are absolute (an image a store names by a key relative
to its root is joined to that root, which the records also name).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:  # results only read provenance values; they never need the module at run time
    from imgvec.backbones.registry import Backbone
    from imgvec.files.provenance import Provenance

DEGENERATE_SHARE = 0.5  # dedup: more than this share of all pairs above the threshold means degenerate features


def file_path(root: str, key: str) -> str:
    """Where the image a store names ``key`` is: absolute (keys are relative to the store's ``root``)."""
    return os.path.abspath(key if os.path.isabs(key) else os.path.join(root, key))


def skipped_records(skipped: Sequence[tuple[str, str]], root: str = "") -> list[dict[str, str]]:
    """Skipped inputs as ``{"path", "reason"}`` records (keys joined to ``root`` when given)."""
    return [{"path": file_path(root, path) if root else os.path.abspath(path), "reason": reason}
            for path, reason in skipped]


def plural(count: int, noun: str, many: str | None = None) -> str:
    """'1 group', '2 groups'; ``many`` for a noun that does not just take an s ('1 query', '2 queries')."""
    return f"{count} {noun if count == 1 else many or noun + 's'}"


def shown_path(path: str) -> str:
    """A path as a table shows it: relative to the working folder when under it, else absolute."""
    rel = os.path.relpath(path)
    return path if rel == os.pardir or rel.startswith(os.pardir + os.sep) else rel


def random_weights_note(provenance: Provenance) -> str | None:
    """The note every result made with random weights carries (the CLI prints it on stderr), else None."""
    if not provenance.is_random:
        return None
    return (f"{provenance.backbone} has RANDOM weights (seed {provenance.weights_seed}), not pretrained: "
            "results show the pipeline, not real similarity")


# -- text tables ------------------------------------------------------------------------------
@dataclass
class Section:
    """One titled table: column names, rows of cells, and how each column is aligned (default left);
    ``lines`` of text under the title."""

    title: str | None
    columns: list[str]
    rows: list[Sequence[Any]]
    justify: list[str] | None = None
    lines: list[str] = field(default_factory=list)  # text between the title and the table (no columns: no table)


@dataclass
class Table:
    """A result as text, as plain data: lines before, its sections, lines after (the CLI draws it)."""

    head: list[str] = field(default_factory=list)
    sections: list[Section] = field(default_factory=list)
    tail: list[str] = field(default_factory=list)


def _class_section(rows: list[tuple[str, float, float, float, int]]) -> Section:
    return Section(None, ["class", "precision", "recall", "f1", "images"], list(rows),
                   ["left", "right", "right", "right", "right"])


class Records:
    """A result that renders itself: JSON-ready records, CSV rows and a text table (one shape for every caller)."""

    def to_records(self) -> Any:
        """What ``--format json`` prints: dicts, lists, strings and numbers only."""
        raise NotImplementedError

    def csv_columns(self) -> list[str]:
        raise NotImplementedError

    def csv_rows(self) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def to_table(self) -> Table:
        """What the CLI prints without ``--format``."""
        raise NotImplementedError


# -- chance -----------------------------------------------------------------------------------
CHANCE_NAMES = {"majority_class": "always the most common class", "stratified_random": "random by class shares"}


@dataclass(frozen=True)
class Chance:
    """What a guess that never looks at an image scores on a set of labels: expected accuracy and its spread.

    ``majority_class`` always names the most common class: its accuracy is that class's share,
    exactly (spread 0). ``stratified_random`` draws each guess independently with the class
    shares p_c = n_c / N: each image is right with probability p of its class, so the expected
    accuracy is sum_c p_c**2 and its standard deviation over the N images is
    sqrt(sum_c n_c p_c (1 - p_c)) / N.
    """

    name: str  # "majority_class" or "stratified_random" (see CHANCE_NAMES)
    accuracy: float  # expected accuracy
    accuracy_std: float  # standard deviation of the accuracy over the N images

    @property
    def description(self) -> str:
        return f"chance: {CHANCE_NAMES.get(self.name, self.name)}"

    def to_record(self) -> dict[str, Any]:
        return {"baseline": self.name, "description": self.description, "accuracy": self.accuracy,
                "accuracy_std": self.accuracy_std}


def chance_levels(labels: Sequence[str]) -> list[Chance]:
    """The two chance levels of ``labels`` (majority class, random by class shares), from the class counts."""
    _, counts = np.unique(np.asarray(labels, dtype=str), return_counts=True)
    n = int(counts.sum())
    if n == 0:
        return [Chance("majority_class", 0.0, 0.0), Chance("stratified_random", 0.0, 0.0)]
    shares = counts / n
    spread = math.sqrt(float(np.sum(counts * shares * (1 - shares)))) / n
    return [Chance("majority_class", float(shares.max()), 0.0),
            Chance("stratified_random", float(np.sum(shares**2)), spread)]


def chance_sentence(chance: Sequence[Chance]) -> str:
    """'chance: 0.560 always guessing the most common class, 0.507 ± 0.050 guessing by the class shares'."""
    by = {c.name: c for c in chance}
    major, rand = by["majority_class"], by["stratified_random"]
    return (f"chance: {major.accuracy:.3f} always guessing the most common class, "
            f"{rand.accuracy:.3f} ± {rand.accuracy_std:.3f} guessing by the class shares")


# -- embed, index, merge ------------------------------------------------------------------
@dataclass
class EmbedSummary(Records):
    """What ``embed`` did: rows added, kept and skipped, how long it took."""

    store: Path
    provenance: Provenance
    added: int
    already: int
    rows: int
    skipped: list[tuple[str, str]]  # (store key, reason)
    seconds: float  # the whole run: finding files, building the model, embedding, writing
    removed: int = 0
    build_seconds: float = 0.0  # building the model (0 when nothing needed embedding)
    embed_seconds: float = 0.0  # decoding, inference and writing rows, after the build

    @property
    def images_per_second(self) -> float:
        """Throughput of the embedding itself, the model build not counted."""
        return self.added / self.embed_seconds if self.embed_seconds > 0 else 0.0

    def to_records(self) -> dict[str, Any]:
        return {"store": os.path.abspath(self.store), "added": self.added, "already": self.already,
                "removed": self.removed, "rows": self.rows, "skipped": skipped_records(self.skipped),
                "seconds": self.seconds, "build_seconds": self.build_seconds, "embed_seconds": self.embed_seconds,
                "images_per_second": self.images_per_second, "provenance": asdict(self.provenance)}

    def to_table(self, sync: bool = False) -> Table:
        """One line; ``sync``: say how many rows were removed (``embed --sync``)."""
        removed = f", {self.removed} removed" if sync else ""
        built = f"model built in {self.build_seconds:.1f}s, then " if self.build_seconds else ""
        speed = f": {built}{self.images_per_second:.1f} images/s" if self.added else ""
        return Table(tail=[f"{self.store}: {plural(self.added, 'image')} embedded, {self.already} already there, "
                           f"{len(self.skipped)} skipped{removed}, {plural(self.rows, 'row')} in all "
                           f"({self.provenance.describe()}; {self.seconds:.1f}s{speed})"])


@dataclass
class IndexSummary(Records):
    """What ``build_index`` did: a new index, or an existing one extended."""

    path: Path
    kind: str
    rows: int
    seconds: float
    updated: bool = False  # an existing index was extended rather than rebuilt
    added: int = 0

    def to_records(self) -> dict[str, Any]:
        return {"index": os.path.abspath(self.path), "kind": self.kind, "rows": self.rows, "seconds": self.seconds,
                "updated": self.updated, "added": self.added}

    def to_table(self) -> Table:
        how = f"added {self.added} new rows to the" if self.updated else "built a"
        return Table(tail=[f"{self.path}: {how} {self.kind} index over {self.rows} rows ({self.seconds:.1f}s)"])


@dataclass
class MergeSummary(Records):
    """What ``merge`` wrote: rows from how many stores, duplicates dropped."""

    store: Path
    inputs: int
    rows: int
    duplicates: int
    seconds: float

    def to_records(self) -> dict[str, Any]:
        return {"store": os.path.abspath(self.store), "inputs": self.inputs, "rows": self.rows,
                "duplicates": self.duplicates, "seconds": self.seconds}

    def to_table(self) -> Table:
        return Table(tail=[f"{self.store}: {self.rows} rows from {self.inputs} stores ({self.duplicates} duplicate "
                           f"paths dropped; {self.seconds:.1f}s); run `imgvec index {self.store}` to search it"])


@dataclass
class FileInfo(Records):
    """What an imgvec file (store, index or head) is and holds (``info``): header fields in order, what its kind
    adds (a store's labels and index, an index's FAISS kind, a head's classes), and its provenance."""

    fields: dict[str, Any]
    provenance: Provenance

    @property
    def kind(self) -> str:
        return str(self.fields["kind"])

    def to_records(self) -> dict[str, Any]:
        return {**self.fields, "provenance": asdict(self.provenance)}

    def to_table(self) -> Table:
        data = dict(self.fields)
        if self.provenance.is_random:
            data["WARNING"] = "RANDOM weights: not pretrained"
        made = {"created": "created (when the embeddings were made)"}  # a head's or index's own time is not recorded
        prov = self.provenance
        shown = dict(vars(prov))
        if prov.calibration_keys:  # up to 100 paths: too long for a table cell
            shown["calibration_keys"] = f"{len(prov.calibration())} images (listed by --format json)"
        if prov.precision == "int8":
            shown["quantization"] = prov.quantization
        rows = _flat(data) + [(f"provenance.{made.get(k, k)}", v) for k, v in shown.items() if v not in (None, "")]
        return Table(sections=[Section(None, ["field", "value"], rows)])


def _flat(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested dicts as dotted names, lists joined: values a person reads, not Python reprs."""
    rows: list[tuple[str, Any]] = []
    for key, value in data.items():
        if isinstance(value, dict):
            rows.extend(_flat(value, f"{prefix}{key}.") if value else [(f"{prefix}{key}", "none")])
        elif isinstance(value, (list, tuple)):
            rows.append((f"{prefix}{key}", ", ".join(map(str, value))))
        else:
            rows.append((f"{prefix}{key}", "none" if value is None else value))
    return rows


@dataclass
class SkippedFiles(Records):
    """The files a store's embed runs skipped, with the reason each time (``imgvec info --skipped``)."""

    store: Path
    root: str
    skipped: list[tuple[str, str]]  # (store key, reason)

    def to_records(self) -> dict[str, Any]:
        return {"store": os.path.abspath(self.store), "root": self.root,
                "skipped": skipped_records(self.skipped, self.root)}

    def csv_columns(self) -> list[str]:
        return ["path", "reason"]

    def csv_rows(self) -> list[tuple[Any, ...]]:
        return [(r["path"], r["reason"]) for r in skipped_records(self.skipped, self.root)]

    def to_table(self) -> Table:
        return Table([f"# {plural(len(self.skipped), 'file')} skipped; paths relative to {self.root}"],
                     [Section(None, ["path", "reason"], list(self.skipped))])


# -- query ----------------------------------------------------------------------------------
@dataclass
class Neighbour:
    rank: int
    path: str  # the store's key: relative to the store's root (absolute for a file outside it)
    score: float
    label: str = ""


@dataclass
class QueryResult:
    query: str  # the query image, absolute
    results: list[Neighbour]


@dataclass
class QueryResults(Records):
    provenance: Provenance
    queries: list[QueryResult]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # query images that could not be used
    index_kind: str = ""
    store: Path | None = None
    root: str = ""  # the store's root: neighbours' paths are relative to it
    index: str = ""  # the index file searched; "" when there was none (exact search in memory)
    unindexed: int = 0  # store rows the index does not hold yet, searched exhaustively beside it
    notes: list[str] = field(default_factory=list)  # one line each for stderr: what was searched how, and the fix
    unused_index: str = ""  # an index file there but not searched: it predates rows removed from the store

    def file(self, neighbour: Neighbour) -> str:
        """Where ``neighbour``'s image is (absolute)."""
        return file_path(self.root, neighbour.path)

    @property
    def search(self) -> str:
        """How the neighbours were searched, in words."""
        if self.index:
            return f"{self.index_kind} index {self.index}"
        if self.unused_index:
            return (f"exact search in memory (index {self.unused_index} not used: it predates rows removed from "
                    "the store)")
        return "exact search in memory (no index file)"

    def to_records(self) -> dict[str, Any]:
        return {
            "store": os.path.abspath(self.store) if self.store else None, "root": self.root,
            "queries": [{"query": q.query, "results": [{"rank": n.rank, "path": self.file(n), "score": n.score,
                                                        "label": n.label} for n in q.results]}
                        for q in self.queries],
            "skipped": skipped_records(self.skipped),
        }

    def csv_columns(self) -> list[str]:
        return ["query", "rank", "path", "score", "label"]

    def csv_rows(self) -> list[tuple[Any, ...]]:
        return [(q.query, n.rank, self.file(n), n.score, n.label) for q in self.queries for n in q.results]

    def to_table(self) -> Table:
        return Table([f"# {self.provenance.describe()}; {self.search}; paths relative to {self.root}"],
                     [Section(f"query: {shown_path(q.query)}", ["rank", "score", "path", "label"],
                              [(n.rank, n.score, n.path, n.label) for n in q.results],
                              ["right", "right", "left", "left"]) for q in self.queries])


# -- classify -------------------------------------------------------------------------------
def _report_rows(report: dict[str, Any], labels: Sequence[str]) -> list[tuple[str, float, float, float, int]]:
    """(class, precision, recall, f1, images) of a classification report, in ``labels`` order."""
    return [(c, report[c]["precision"], report[c]["recall"], report[c]["f1-score"], int(report[c]["support"]))
            for c in labels]


@dataclass
class TrainSummary(Records):
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
    n_Cs: int = 0  # regularisation strengths tried
    search_seconds: float = 0.0  # choosing C by cross-validation
    fit_seconds: float = 0.0  # the one final fit at that C
    cv: int = 0  # folds
    chance: list[Chance] = field(default_factory=list)  # :func:`chance_levels` of the training labels

    def per_class(self) -> list[tuple[str, float, float, float, int]]:
        return _report_rows(self.report, self.classes)

    def to_records(self) -> dict[str, Any]:
        return {"head": os.path.abspath(self.head), "classes": self.classes, "images": self.n_train,
                "unlabelled": self.n_unlabelled, "C": self.C, "cv": self.cv, "cv_accuracy": self.cv_accuracy,
                "cv_accuracy_std": self.cv_accuracy_std, "chance": [c.to_record() for c in self.chance],
                "report": self.report, "confusion": self.confusion.tolist()}

    def csv_columns(self) -> list[str]:
        return ["class", "precision", "recall", "f1", "images"]

    def csv_rows(self) -> list[tuple[Any, ...]]:
        return list(self.per_class())

    def to_table(self) -> Table:
        unlabelled = f", {self.n_unlabelled} unlabelled rows left out" if self.n_unlabelled else ""
        return Table(sections=[_class_section(self.per_class())], tail=[
            f"{self.head}: {len(self.classes)} classes, {plural(self.n_train, 'image')}{unlabelled}; C={self.C:.4g}; "
            f"{self.cv}-fold CV accuracy {self.cv_accuracy:.3f} ± {self.cv_accuracy_std:.3f} ({self.seconds:.1f}s: "
            f"choosing C among {self.n_Cs} values by {self.cv}-fold CV {self.search_seconds:.1f}s, the final fit "
            f"{self.fit_seconds:.1f}s)",
            f"{chance_sentence(self.chance)} (on the {plural(self.n_train, 'training image')})"])


@dataclass
class Prediction:
    path: str  # the image, absolute
    label: str  # the predicted class
    probabilities: dict[str, float]
    truth: str = ""  # the image's class folder, "" when it has none

    @property
    def correct(self) -> bool | None:
        return (self.label == self.truth) if self.truth else None

    def top(self, k: int) -> list[tuple[str, float]]:
        """The ``k`` most probable classes, most probable first (ties by name)."""
        return sorted(self.probabilities.items(), key=lambda kv: (-kv[1], kv[0]))[:k]


@dataclass
class Predictions(Records):
    provenance: Provenance
    classes: list[str]
    predictions: list[Prediction]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # input images that could not be used
    head: Path | None = None
    C: float = math.nan  # the head's regularisation, chosen by its cross-validation
    cv_accuracy: float = math.nan  # the head's cross-validated accuracy on its training store
    cv_accuracy_std: float = math.nan

    @property
    def labelled(self) -> list[Prediction]:
        """Predictions whose image sits in a class folder (the true label is known)."""
        return [p for p in self.predictions if p.truth]

    @property
    def accuracy(self) -> float | None:
        """Share of labelled images predicted right (a folder the head does not know counts wrong)."""
        known = self.labelled
        return sum(bool(p.correct) for p in known) / len(known) if known else None

    @property
    def chance(self) -> list[Chance]:
        """:func:`chance_levels` of the labelled images' true classes (empty when none is labelled)."""
        known = self.labelled
        return chance_levels([p.truth for p in known]) if known else []

    def _record(self, p: Prediction, truth: bool) -> dict[str, Any]:
        return {"path": p.path, "predicted": p.label, **({"true": p.truth, "correct": p.correct} if truth else {}),
                "probabilities": p.probabilities}

    def to_records(self) -> dict[str, Any]:
        truth = bool(self.labelled)  # images in class folders: the true label beside the predicted one
        return {"head": os.path.abspath(self.head) if self.head else None, "classes": self.classes,
                "accuracy": self.accuracy, "chance": [c.to_record() for c in self.chance],
                "predictions": [self._record(p, truth) for p in self.predictions],
                "skipped": skipped_records(self.skipped)}

    def csv_columns(self) -> list[str]:
        return ["path", "predicted", *(["true", "correct"] if self.labelled else []), *self.classes]

    def csv_rows(self) -> list[tuple[Any, ...]]:
        truth = bool(self.labelled)
        return [(p.path, p.label, *((p.truth, p.correct) if truth else ()), *(p.probabilities[c] for c in self.classes))
                for p in self.predictions]

    def to_table(self, top: int = 3) -> Table:
        """The predicted class and the ``top`` most probable classes of each image; right or wrong where known."""
        def best(p: Prediction) -> str:
            return ", ".join(f"{c} {v:.3f}" for c, v in p.top(top))

        head = [f"# {self.provenance.describe()}; head: {len(self.classes)} classes, C={self.C:.4g}, "
                f"cross-validated accuracy {self.cv_accuracy:.3f} ± {self.cv_accuracy_std:.3f}"]
        if not self.labelled:
            return Table(head, [Section(None, ["path", "predicted", "probabilities"],
                                        [(shown_path(p.path), p.label, best(p)) for p in self.predictions])])
        marks = {None: "", True: "right", False: "WRONG"}
        right = sum(bool(p.correct) for p in self.labelled)
        return Table(head, [Section(None, ["path", "predicted", "true", "", "probabilities"],
                                    [(shown_path(p.path), p.label, p.truth, marks[p.correct], best(p))
                                     for p in self.predictions])],
                     [f"accuracy {self.accuracy:.3f}: {right} of {plural(len(self.labelled), 'image')} in class "
                      f"folders predicted right ({chance_sentence(self.chance)})"])


@dataclass
class Evaluation(Records):
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
    seen_in_training: int = 0  # evaluated images the head was trained on: those are not held out
    chance: list[Chance] = field(default_factory=list)  # :func:`chance_levels` of the evaluated labels

    def per_class(self) -> list[tuple[str, float, float, float, int]]:
        return _report_rows(self.report, self.labels)

    def to_records(self) -> dict[str, Any]:
        return {"head": os.path.abspath(self.head), "data": os.path.abspath(self.data), "accuracy": self.accuracy,
                "chance": [c.to_record() for c in self.chance], "images": self.n_images, "labels": self.labels,
                "report": self.report, "confusion": self.confusion.tolist(), "unknown_labels": self.unknown,
                "seen_in_training": self.seen_in_training, "skipped": skipped_records(self.skipped)}

    def csv_columns(self) -> list[str]:
        return ["class", "precision", "recall", "f1", "images"]

    def csv_rows(self) -> list[tuple[Any, ...]]:
        return list(self.per_class())

    def to_table(self) -> Table:
        confusion = Section("confusion matrix (rows: true, columns: predicted)", ["true \\ predicted", *self.labels],
                            [(c, *map(int, row)) for c, row in zip(self.labels, self.confusion)],
                            ["left"] + ["right"] * len(self.labels))
        return Table([f"# {self.provenance.describe()}"], [_class_section(self.per_class()), confusion],
                     [f"accuracy {self.accuracy:.3f} on {plural(self.n_images, 'image')} "
                      f"({chance_sentence(self.chance)})"])


# -- compare --------------------------------------------------------------------------------
@dataclass
class BackboneScore:
    backbone: str
    params: int
    dim: int
    images_per_second: float  # see Comparison.speed_note
    accuracy: float
    accuracy_std: float
    fold_accuracies: list[float]
    report: dict[str, Any]  # scikit-learn classification_report(output_dict=True), out-of-fold
    confusion: np.ndarray  # rows: true class, columns: predicted, in ``Comparison.classes`` order
    store: Path
    provenance: Provenance
    embedded: int  # images embedded by this run (0 when the store already had them all)

    @property
    def per_class_f1(self) -> dict[str, float]:
        return {c: float(v["f1-score"]) for c, v in self.report.items() if isinstance(v, dict) and "support" in v
                and c not in ("macro avg", "weighted avg")}

    @property
    def weakest_class(self) -> str:
        f1 = self.per_class_f1
        return min(f1, key=lambda c: (f1[c], c)) if f1 else ""

    @property
    def weakest_f1(self) -> float:
        return self.per_class_f1.get(self.weakest_class, float("nan"))


@dataclass
class Comparison(Records):
    source: str
    classes: list[str]
    n_images: int
    cv: int
    random_state: int
    rows: list[BackboneScore]
    machine: str
    seconds: float
    chance: list[Chance] = field(default_factory=list)  # :func:`chance_levels` of the compared labels
    speed_images: int = 0  # images in the speed sample

    @property
    def speed_note(self) -> str:
        """What images/s measures here (not the same figure as `imgvec embed`'s)."""
        return (f"images/s: decoding + inference on a warm model (build and warm-up not counted), "
                f"{self.speed_images} images, one run, on {self.machine}")

    def to_records(self) -> dict[str, Any]:
        return {
            "images": self.n_images, "classes": self.classes, "cv": self.cv,
            "images_per_second_measures": self.speed_note,
            "backbones": [{
                "backbone": r.backbone, "weights": r.provenance.weights_spec.describe(), "params": r.params,
                "dim": r.dim, "images_per_second": r.images_per_second, "accuracy": r.accuracy,
                "accuracy_std": r.accuracy_std, "fold_accuracies": r.fold_accuracies, "per_class_f1": r.per_class_f1,
                "store": os.path.abspath(r.store), "new_images_embedded": r.embedded,
            } for r in self.rows],
            "chance": [c.to_record() for c in self.chance],
        }

    def csv_columns(self) -> list[str]:
        return ["backbone", "weights", "params", "dim", "images_per_second", "accuracy", "accuracy_std",
                "weakest_class", "weakest_f1", *(f"f1_{k}" for k in self.classes)]

    def csv_rows(self) -> list[tuple[Any, ...]]:
        return [*[(r.backbone, r.provenance.weights_spec.describe(), r.params, r.dim, r.images_per_second,
                   r.accuracy, r.accuracy_std, r.weakest_class, r.weakest_f1,
                   *(r.per_class_f1.get(k, 0.0) for k in self.classes)) for r in self.rows],
                *[(c.description, "", "", "", "", c.accuracy, c.accuracy_std, "", "", *[""] * len(self.classes))
                  for c in self.chance]]

    def to_table(self) -> Table:
        def weights(prov: Provenance) -> str:
            return f"RANDOM (seed {prov.weights_seed})" if prov.is_random else prov.weights_spec.describe()

        rows = [(r.backbone, weights(r.provenance), f"{r.params:,}", r.dim, f"{r.images_per_second:.1f}",
                 f"{r.accuracy:.3f} ± {r.accuracy_std:.3f}", f"{r.weakest_class} ({r.weakest_f1:.3f})")
                for r in self.rows]
        rows += [(c.description, "", "", "", "", f"{c.accuracy:.3f} ± {c.accuracy_std:.3f}", "") for c in self.chance]
        return Table([f"# {plural(self.n_images, 'image')}, {len(self.classes)} classes; {self.cv}-fold CV, the same "
                      "folds for every backbone; chance: expected accuracy ± its spread over these images, from the "
                      "class counts", f"# {self.speed_note}"],
                     [Section(None, ["backbone", "weights", "parameters", "embedding size", "images/s", "CV accuracy",
                                     "weakest class (F1)"], rows,
                              ["left", "left", "right", "right", "right", "right", "left"])])


# -- duplicates -----------------------------------------------------------------------------
@dataclass
class Member:
    path: str  # the store's key for the image
    score: float  # cosine similarity to the group's first member


@dataclass
class DuplicateGroup:
    kind: str  # "exact": identical files; "near": embeddings within the threshold
    members: list[Member]
    sha256: str = ""  # for exact groups

    @property
    def paths(self) -> list[str]:
        return [m.path for m in self.members]


@dataclass
class DedupResult(Records):
    store: Path
    provenance: Provenance
    threshold: float
    rows: int
    groups: list[DuplicateGroup]  # exact groups first; near groups list one copy of identical files
    candidates: int  # pairs the search proposed
    missing: list[str]  # files that could not be read for hashing
    seconds: float
    method: str = "exact"  # how pairs were searched: "exact", or the inverted-list settings
    share_above: float = 0.0  # estimated share of all pairs of images above the threshold
    checked: int = 0  # of the candidates, pairs confirmed with the full vectors (the rest were already grouped)
    root: str = ""  # the store's root: members' paths are relative to it

    @property
    def degenerate(self) -> bool:
        """Most pairs are above the threshold: the features cannot tell images apart (random
        weights, a wrong backbone) and the groups mean little."""
        return self.share_above > DEGENERATE_SHARE

    @property
    def exact_groups(self) -> int:
        return sum(g.kind == "exact" for g in self.groups)

    @property
    def near_groups(self) -> int:
        return sum(g.kind == "near" for g in self.groups)

    def identical_group(self, path: str) -> int | None:
        """The number (1-based) of the group of identical files ``path`` (a store key) belongs to, or None."""
        return next((i for i, g in enumerate(self.groups, 1) if g.kind == "exact" and path in g.paths), None)

    def copies_of(self, group: DuplicateGroup, member: Member) -> int | None:
        """In a near group, the group of identical files ``member`` stands for (its copies are not repeated)."""
        return self.identical_group(member.path) if group.kind == "near" else None

    def found_by(self, group: DuplicateGroup) -> str:
        """What found ``group``: the file hash, or the threshold on which features."""
        if group.kind == "exact":
            return "identical files (sha256)"
        prov = self.provenance
        return (f"cosine >= {self.threshold:g} on {prov.backbone} @ {prov.input_size}px features, "
                f"{'RANDOM weights' if prov.is_random else prov.weights_spec.describe()}")

    def file(self, path: str) -> str:
        """Where the image the store names ``path`` is (absolute)."""
        return file_path(self.root, path)

    def to_records(self) -> dict[str, Any]:
        return {
            "store": os.path.abspath(self.store), "root": self.root, "threshold": self.threshold,
            "method": self.method,
            "groups": [{"group": i, "kind": g.kind, "found_by": self.found_by(g), "sha256": g.sha256 or None,
                        "images": [{"path": self.file(m.path), "score": m.score,
                                    "identical_files_group": self.copies_of(g, m)} for m in g.members]}
                       for i, g in enumerate(self.groups, 1)],
            "missing": [self.file(p) for p in self.missing],
        }

    def csv_columns(self) -> list[str]:
        return ["group", "kind", "path", "score", "sha256", "identical_files_group", "found_by"]

    def csv_rows(self) -> list[tuple[Any, ...]]:
        return [(i, g.kind, self.file(m.path), m.score, g.sha256, self.copies_of(g, m) or "", self.found_by(g))
                for i, g in enumerate(self.groups, 1) for m in g.members]

    def to_table(self) -> Table:
        def shown(g: DuplicateGroup, m: Member) -> str:
            copies = self.copies_of(g, m)
            return m.path + (f"  (identical files: group {copies})" if copies else "")

        return Table([f"# {plural(self.rows, 'image')}: {plural(self.exact_groups, 'group')} of identical files "
                      f"(sha256), {plural(self.near_groups, 'group')} of near duplicates: cosine >= "
                      f"{self.threshold:g} on the store's features ({self.provenance.describe()}); {self.method} "
                      f"search, {self.seconds:.1f}s; paths relative to {self.root}"],
                     [Section(None, ["group", "kind", "similarity", "path"],
                              [(i, g.kind, m.score, shown(g, m)) for i, g in enumerate(self.groups, 1)
                               for m in g.members], ["right", "left", "right", "left"])])


# -- models, the compiled-model cache ---------------------------------------------------------
MODEL_COLUMNS = ["name", "input_size", "dim", "params", "top1", "top5", "size_mb", "depth", "images_per_second",
                 "preprocessing", "weights_offline"]


def model_cell(column: str, value: Any) -> str:
    """A value of :data:`MODEL_COLUMNS` as people read it: the one format of `imgvec models`' table and
    docs/backbones.md (``29.2`` images/s, ``0.771`` top-1, ``4.0M`` parameters; blank when unknown)."""
    if value is None:
        return ""
    if column == "params":
        return f"{value / 1e6:.1f}M"
    if column in ("top1", "top5"):
        return f"{value:.3f}"
    if column == "images_per_second":
        return f"{value:.1f}"
    return str(value)


@dataclass
class ModelTable(Records):
    """The backbones imgvec knows, in the order asked for."""

    backbones: list[Backbone]
    # name -> where its ImageNet weights are without a network ("package", "keras cache"); absent: nowhere
    offline: dict[str, str] = field(default_factory=dict)

    def value(self, backbone: Backbone, column: str) -> Any:
        return self.offline.get(backbone.name) if column == "weights_offline" else getattr(backbone, column)

    def to_records(self) -> list[dict[str, Any]]:
        return [{c: self.value(b, c) for c in MODEL_COLUMNS} for b in self.backbones]

    def csv_columns(self) -> list[str]:
        return list(MODEL_COLUMNS)

    def csv_rows(self) -> list[tuple[Any, ...]]:
        return [tuple("" if v is None else v for v in r.values()) for r in self.to_records()]

    def to_table(self) -> Table:
        return Table(["# top1/top5: ImageNet validation accuracy and size_mb/depth as published by Keras "
                      "(keras.io/api/applications); images_per_second: `imgvec embed` on a 2-core CPU at 224 px "
                      "(benchmarks/results/embed.json); weights_offline: where ImageNet weights are without a "
                      "network (package: installed with imgvec; keras cache: downloaded before); blank: not "
                      "published, not measured or not at hand"],
                     [Section(None, list(MODEL_COLUMNS), [[model_cell(c, r[c]) for c in MODEL_COLUMNS]
                                                          for r in self.to_records()],
                              ["left"] + ["right"] * 8 + ["left", "left"])])


@dataclass
class CacheSummary(Records):
    folder: Path
    entries: list[Any]  # model_cache.CacheEntry: read, never imported (results stay plain data)
    cleared: int = 0  # entries removed by ``clear``
    freed: int = 0  # bytes

    @property
    def bytes(self) -> int:
        return sum(e.bytes for e in self.entries)

    def to_records(self) -> list[dict[str, Any]]:
        return [{"backbone": e.backbone, "input_size": e.input_size, "weights": e.weights,
                 "mb": round(e.bytes / 1e6, 1), "age_days": round(e.age_s / 86400, 1),
                 "ok": e.state,
                 "path": str(e.path)} for e in self.entries]

    def csv_columns(self) -> list[str]:
        return ["backbone", "input_size", "weights", "mb", "age_days", "ok", "path"]

    def csv_rows(self) -> list[tuple[Any, ...]]:
        return [tuple(r.values()) for r in self.to_records()]

    def to_table(self) -> Table:
        rows = [(r["backbone"], r["input_size"], r["weights"], f"{r['mb']:.1f}", f"{r['age_days']:.1f}", r["ok"],
                 r["path"]) for r in self.to_records()]
        return Table([f"# {self.folder}: {plural(len(rows), 'compiled model')}, {self.bytes / 1e6:.1f} MB"],
                     [Section(None, self.csv_columns(), rows)])

# -- inspect --------------------------------------------------------------------------------


@dataclass
class LabelIssue:
    path: str  # the store's key
    label: str  # the class folder it is filed under
    suggested: str  # the class the evidence points to
    score: float  # 1 - combined self-confidence: higher is more suspicious
    self_confidence: float  # out-of-fold probability of the given label (logistic head)
    neighbours_agree: float  # share of its k nearest labelled neighbours with the same label


@dataclass
class Outlier:
    path: str
    label: str
    score: float  # the larger robust z-score of the two distances below
    neighbour_distance: float  # 1 - mean cosine to its k nearest neighbours
    class_distance: float | None  # 1 - cosine to the nearest class centroid (None: unlabelled)


@dataclass
class Leak:
    path: str
    other: str  # the image it duplicates across a boundary
    kind: str  # "exact" (same bytes, sha256) or "near" (cosine >= threshold)
    across: str  # "split" or "class"
    score: float  # cosine similarity of the two (1.0 for identical files)
    label: str = ""
    other_label: str = ""
    split: str = ""
    other_split: str = ""


@dataclass
class ImageFlag:
    path: str
    flags: list[str]  # "dark", "bright", "blurry", "tiny", "extreme aspect"
    score: float  # how far past its worst threshold, 0..1 (1: as far as it can be)
    stats: dict[str, float]  # width, height, brightness, contrast, sharpness (files.images.STATS_COLUMNS)


@dataclass
class MapLayout:
    """A 2-D layout of (a sample of) the store's rows, for a scatter: ``xy[i]`` is row ``rows[i]``."""

    rows: np.ndarray  # store rows drawn, ascending
    xy: np.ndarray  # (len(rows), 2) float32, scaled into [0, 1]
    total: int  # rows in the store
    method: str  # how it was made, in words (PCA dimensions, t-SNE settings, sample)

    @property
    def sampled(self) -> bool:
        return len(self.rows) < self.total


@dataclass
class InspectResult(Records):
    """What ``imgvec inspect`` found in a store: each list most suspicious first."""

    store: Path
    root: str
    provenance: Provenance
    rows: int
    labelled: int
    classes: list[str]
    label_issues: list[LabelIssue]
    outliers: list[Outlier]
    leaks: list[Leak]
    image_stats: list[ImageFlag]
    methods: dict[str, str]  # section -> how it was found and the thresholds, in words
    skipped_sections: dict[str, str] = field(default_factory=dict)  # section -> why it was not run
    stats_missing: int = 0  # rows without image statistics (stores made before they were recorded)
    map: MapLayout | None = None
    map_paths: list[str] = field(default_factory=list)  # the store's keys of ``map.rows``
    map_labels: list[str] = field(default_factory=list)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)  # one line each for stderr (degenerate features, ...)

    SECTIONS = ("label_issues", "outliers", "leaks", "image_stats")

    def file(self, key: str) -> str:
        return file_path(self.root, key)

    def section_records(self, section: str) -> list[dict[str, Any]]:
        f = self.file
        if section == "label_issues":
            return [{"path": f(i.path), "score": i.score, "label": i.label, "suggested": i.suggested,
                     "self_confidence": i.self_confidence, "neighbours_agree": i.neighbours_agree}
                    for i in self.label_issues]
        if section == "outliers":
            return [{"path": f(o.path), "score": o.score, "label": o.label,
                     "neighbour_distance": o.neighbour_distance, "class_distance": o.class_distance}
                    for o in self.outliers]
        if section == "leaks":
            return [{"path": f(x.path), "score": x.score, "other": f(x.other), "kind": x.kind, "across": x.across,
                     "label": x.label, "other_label": x.other_label, "split": x.split, "other_split": x.other_split}
                    for x in self.leaks]
        return [{"path": f(s.path), "score": s.score, "flags": s.flags, **s.stats} for s in self.image_stats]

    def map_records(self) -> dict[str, Any] | None:
        """The map's points (absolute paths, x and y in [0, 1], labels): what a page or the service draws."""
        if self.map is None:
            return None
        return {"method": self.map.method, "rows": self.map.total, "sampled": self.map.sampled,
                "points": [{"path": self.file(p), "x": float(x), "y": float(y), "label": lab}
                           for p, (x, y), lab in zip(self.map_paths, self.map.xy.tolist(), self.map_labels)]}

    def to_records(self) -> dict[str, Any]:
        return {"store": os.path.abspath(self.store), "root": self.root, "rows": self.rows,
                "labelled": self.labelled, "classes": self.classes,
                **{s: self.section_records(s) for s in self.SECTIONS},
                "methods": self.methods, "not_run": self.skipped_sections, "stats_missing": self.stats_missing,
                "map": self.map_records()}

    def csv_columns(self) -> list[str]:
        return ["section", "path", "score", "label", "suggested", "other", "detail"]

    def csv_rows(self) -> list[tuple[Any, ...]]:
        f = self.file
        return ([("label_issues", f(i.path), i.score, i.label, i.suggested, "",
                  f"self-confidence {i.self_confidence:.3f}, neighbours agree {i.neighbours_agree:.2f}")
                 for i in self.label_issues]
                + [("outliers", f(o.path), o.score, o.label, "", "", f"neighbour distance {o.neighbour_distance:.4f}"
                    + ("" if o.class_distance is None else f", class distance {o.class_distance:.4f}"))
                   for o in self.outliers]
                + [("leaks", f(x.path), x.score, x.label, "", f(x.other),
                    f"{x.kind} copy across {x.across}: " + (f"{x.split} / {x.other_split}" if x.across == "split"
                                                            else f"{x.label} / {x.other_label}"))
                   for x in self.leaks]
                + [("image_stats", f(s.path), s.score, "", "", "", ", ".join(s.flags)) for s in self.image_stats])

    def to_table(self, top: int = 20) -> Table:
        """Each section's first ``top`` entries, most suspicious first, with how it was found; paths as
        :func:`shown_path` shows them."""
        def rows(section: str) -> list[tuple[Any, ...]]:
            recs = self.section_records(section)[:top]
            if section == "label_issues":
                return [(f"{x['score']:.3f}", x["label"], x["suggested"], shown_path(x["path"])) for x in recs]
            if section == "outliers":
                return [(f"{x['score']:.2f}", x["label"], shown_path(x["path"])) for x in recs]
            if section == "leaks":
                return [(f"{x['score']:.4f}", f"{x['kind']} across {x['across']}", shown_path(x["path"]),
                         shown_path(x["other"])) for x in recs]
            return [(f"{x['score']:.2f}", ", ".join(x["flags"]), shown_path(x["path"])) for x in recs]

        heads = {"label_issues": ["score", "label", "suggested", "path"], "outliers": ["score", "label", "path"],
                 "leaks": ["similarity", "kind", "path", "copy"], "image_stats": ["score", "flags", "path"]}
        sections = []
        for section in self.SECTIONS:
            items = getattr(self, section)
            name = section.replace("_", " ")
            if section in self.skipped_sections:
                sections.append(Section(f"## {name}: not run: {self.skipped_sections[section]}", [], []))
                continue
            lines = [f"# {self.methods.get(section, '')}"]
            if section == "image_stats" and self.stats_missing:
                lines.append(f"# {plural(self.stats_missing, 'image')} without statistics (stored before embed "
                             "recorded them): --stats measures them")
            if not items:
                lines.append("none found")
            sections.append(Section(f"## {name}: {len(items)}" + (f" (the first {top} shown)" if len(items) > top
                                                                    else ""),
                                    heads[section] if items else [], rows(section), lines=lines))
        return Table([f"# {self.store}: {plural(self.rows, 'image')}, {plural(len(self.classes), 'class', 'classes')} "
                      f"({self.provenance.describe()}; {self.seconds:.1f}s)"], sections,
                     [f"## map: {self.map.method} (--html draws it; --format json lists its points)"]
                     if self.map is not None else [])
