"""``make demo``: the whole job on a small set of real photos, through the public API, offline.

Makes labelled images from photos that ship in packages (scikit-image's cat, cup, astronaut ...,
scikit-learn's temple and flower: one class per photo, augmented copies of it), embeds them, builds
an index, queries it with held-out copies and counts how many neighbours are of the query's class,
trains a head and evaluates it on the held-out images. The backbone is the default,
``efficientnetlite0``, whose pretrained ImageNet weights come with imgvec (no download). Where they
cannot be loaded it says plainly that it falls back to random weights (the results then show the
pipeline working, not pretrained quality); without scikit-image it uses generated colour images.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from imgvec import api
from imgvec.pages import report
from imgvec.results import chance_levels, chance_sentence
from imgvec.backbones.registry import DEFAULT_BACKBONE
from imgvec.embedding.embedder import Embedder
from imgvec.errors import MissingWeightsError
from imgvec.synthetic import make_image_folder, make_photo_folder

BACKBONE = DEFAULT_BACKBONE  # efficientnetlite0: its ImageNet weights are installed with imgvec


def _say(text: str = "") -> None:
    print(text, flush=True)


def choose_weights(backbone: str = BACKBONE) -> str:
    """``imagenet`` when the backbone's ImageNet weights load (packaged, cached or downloaded), else ``none``."""
    try:
        Embedder(backbone, "imagenet").load()
        return "imagenet"
    except MissingWeightsError as error:
        _say(f"NOTE: {error.cli_message()}")  # the demo speaks command-line options
        _say("NOTE: falling back to RANDOM weights (seed 0): the numbers below show the pipeline, "
             "not what pretrained features achieve.\n")
        return "none"


def main(out: str = "demo-out") -> int:
    root = Path(out)
    if root.exists():
        shutil.rmtree(root)
    train_dir, holdout_dir = root / "images" / "train", root / "images" / "holdout"
    try:
        make_photo_folder(train_dir, per_class=8, seed=0)
        make_photo_folder(holdout_dir, per_class=3, seed=1)
        what = "augmented copies of packaged photos (one class per photo)"
    except ImportError as error:
        _say(f"NOTE: no packaged photos ({error}; pip install scikit-image): generated colour images instead")
        shutil.rmtree(root / "images", ignore_errors=True)
        make_image_folder(train_dir, per_class=12, size=160, seed=0)
        make_image_folder(holdout_dir, per_class=4, size=160, seed=1)
        what = "generated colour images"
    train_files, holdout_files = (sorted(p for p in d.rglob("*") if p.suffix in (".jpg", ".png"))
                                  for d in (train_dir, holdout_dir))
    _say(f"1. made {len(train_files)} labelled images in {train_dir} and {len(holdout_files)} held-out ones "
         f"in {holdout_dir}: {what}")

    weights = choose_weights()
    store = root / "demo.h5"
    summary = api.embed([train_dir], store, model=BACKBONE, weights=weights)
    _say(f"2. embedded {summary.added} images with {summary.provenance.describe()} "
         f"into {store} ({summary.images_per_second:.1f} images/s)")

    built = api.build_index(store)
    _say(f"3. built a {built.kind} FAISS index over {built.rows} rows: {built.path}")

    found = api.query(store, holdout_files, k=5)
    same = sum(Path(n.path).parent.name == Path(q.query).parent.name for q in found.queries for n in q.results)
    shown = found.queries[::len(found.queries) // 2][:2]  # two queries of different classes
    _say(f"4. nearest stored images of the {len(found.queries)} held-out images: {same} of their "
         f"{5 * len(found.queries)} top-5 neighbours are of the query's class "
         f"({same / (5 * len(found.queries)):.3f}); two of them:")
    for q in shown:
        _say(report.table(f"query: {os.path.relpath(q.query)}", ["rank", "score", "path"],
                          [(n.rank, n.score, n.path) for n in q.results], ["right", "right", "left"]))

    trained = api.train(store, root / "head.h5", cv=3)
    _say(f"5. trained a logistic-regression head: {len(trained.classes)} classes, "
         f"3-fold CV accuracy {trained.cv_accuracy:.3f} ± {trained.cv_accuracy_std:.3f} "
         f"({chance_sentence(trained.chance)}), saved to {trained.head}")

    preds = api.predict(trained.head, [holdout_dir])
    shown = preds.predictions[::2]  # every other held-out image, so each class shows
    _say(f"6. held-out accuracy: {preds.accuracy:.3f} on {len(preds.predictions)} images "
         f"({chance_sentence(chance_levels([p.truth for p in preds.predictions]))})")
    _say(report.table(f"{len(shown)} of the {len(preds.predictions)} held-out images (every other one):",
                      ["path", "true", "predicted", "p"],
                      [(os.path.relpath(p.path), p.truth, p.label, p.probabilities[p.label]) for p in shown]))
    if weights == "none":
        _say("Weights were RANDOM: put the ImageNet file in Keras' cache or pass --weights PATH for real features.")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
