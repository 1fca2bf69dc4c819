"""What the public API returns: plain result objects, shared by the api, the analyses and the pages.

Nothing here runs a model or reads a file: the api (and comparison, duplicates) fill these in,
the CLI, report.py and html.py only read them. ``imgvec.api`` re-exports every name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .duplicates import DEGENERATE_SHARE, DuplicateGroup
from .provenance import Provenance


def chance_accuracies(labels: Sequence[str]) -> dict[str, float]:
    """What guessing scores on ``labels``: always the most common class, or a class drawn by the class shares."""
    _, counts = np.unique(np.asarray(labels, dtype=str), return_counts=True)
    shares = counts / max(1, counts.sum())
    return {"majority_class": float(shares.max(initial=0.0)), "stratified_random": float(np.sum(shares**2))}


CHANCE_NAMES = {"majority_class": "always the most common class", "stratified_random": "random by class shares"}


# -- embed, index, merge ------------------------------------------------------------------
@dataclass
class EmbedSummary:
    store: Path
    provenance: Provenance
    added: int
    already: int
    rows: int
    skipped: list[tuple[str, str]]
    seconds: float  # the whole run: finding files, building the model, embedding, writing
    removed: int = 0
    build_seconds: float = 0.0  # building the model (0 when nothing needed embedding)
    embed_seconds: float = 0.0  # decoding, inference and writing rows, after the build

    @property
    def images_per_second(self) -> float:
        """Throughput of the embedding itself, the model build not counted."""
        return self.added / self.embed_seconds if self.embed_seconds > 0 else 0.0


@dataclass
class IndexSummary:
    path: Path
    kind: str
    rows: int
    seconds: float
    updated: bool = False  # an existing index was extended rather than rebuilt
    added: int = 0


@dataclass
class MergeSummary:
    store: Path
    inputs: int
    rows: int
    duplicates: int
    seconds: float


# -- query ----------------------------------------------------------------------------------
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
    unindexed: int = 0  # store rows the index does not hold yet, searched exhaustively beside it
    notes: list[str] = field(default_factory=list)  # one line each for stderr: what was searched how, and the fix


# -- classify -------------------------------------------------------------------------------
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
    n_Cs: int = 0  # regularisation strengths tried
    search_seconds: float = 0.0  # choosing C by cross-validation
    fit_seconds: float = 0.0  # the one final fit at that C


@dataclass
class Prediction:
    path: str
    label: str  # the predicted class
    probabilities: dict[str, float]
    truth: str = ""  # the image's class folder, "" when it has none

    @property
    def correct(self) -> bool | None:
        return (self.label == self.truth) if self.truth else None


@dataclass
class Predictions:
    provenance: Provenance
    classes: list[str]
    predictions: list[Prediction]
    skipped: list[tuple[str, str]] = field(default_factory=list)
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
    seen_in_training: int = 0  # evaluated images the head was trained on: those are not held out
    chance: dict[str, float] = field(default_factory=dict)  # :func:`chance_accuracies` of the evaluated labels


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
class Baseline:
    """A guess that uses no image at all, scored on the same folds as the backbones."""

    name: str  # "majority_class" or "stratified_random" (see CHANCE_NAMES)
    accuracy: float
    accuracy_std: float
    fold_accuracies: list[float]

    @property
    def description(self) -> str:
        return f"chance: {CHANCE_NAMES.get(self.name, self.name)}"


@dataclass
class Comparison:
    source: str
    classes: list[str]
    n_images: int
    cv: int
    random_state: int
    rows: list[BackboneScore]
    machine: str
    seconds: float
    baselines: list[Baseline] = field(default_factory=list)
    speed_images: int = 0  # images in the speed sample

    @property
    def best(self) -> BackboneScore:
        return max(self.rows, key=lambda r: (r.accuracy, r.images_per_second))

    @property
    def speed_note(self) -> str:
        """What images/s measures here (not the same figure as `imgvec embed`'s)."""
        return (f"images/s: decoding + inference on a warm model (build and warm-up not counted), "
                f"{self.speed_images} images, one run, on {self.machine}")


# -- duplicates -----------------------------------------------------------------------------
@dataclass
class DedupResult:
    store: Path
    provenance: Provenance
    threshold: float
    rows: int
    groups: list[DuplicateGroup]  # exact groups first; near groups list one copy of identical files
    candidates: int  # pairs checked with the full vectors
    missing: list[str]  # files that could not be read for hashing
    seconds: float
    method: str = "exact"  # how pairs were searched: "exact", or the inverted-list settings
    share_above: float = 0.0  # estimated share of all pairs of images above the threshold

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

    @property
    def exact_group_of(self) -> dict[str, int]:
        """Path -> number (1-based) of the group of identical files it belongs to."""
        return {m.path: i for i, g in enumerate(self.groups, 1) if g.kind == "exact" for m in g.members}

    def found_by(self, group: DuplicateGroup) -> str:
        """What found ``group``: the file hash, or the threshold on which features."""
        if group.kind == "exact":
            return "identical files (sha256)"
        prov = self.provenance
        return (f"cosine >= {self.threshold:g} on {prov.backbone} @ {prov.input_size}px features, "
                f"{'RANDOM weights' if prov.is_random else prov.weights_spec.describe()}")


def fold_copies(groups: list[DuplicateGroup]) -> list[DuplicateGroup]:
    """Near groups without the second and later copies of identical files (listed in their exact group).

    A near group left with fewer than two images (it was only copies) is dropped.
    """
    exact_of = {m.path: i for i, g in enumerate(groups) if g.kind == "exact" for m in g.members}
    out = []
    for g in groups:
        if g.kind != "near":
            out.append(g)
            continue
        seen: set[int] = set()
        members = []
        for m in g.members:
            group = exact_of.get(m.path)
            if group is not None and group in seen:
                continue
            if group is not None:
                seen.add(group)
            members.append(m)
        if len(members) > 1:
            out.append(DuplicateGroup(g.kind, members, g.sha256))
    return out
