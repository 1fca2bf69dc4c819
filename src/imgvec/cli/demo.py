"""``make demo``: the whole job on a small generated image set, through the public API.

Generates labelled images, embeds them, builds an index, queries it, trains a head and
evaluates it on held-out images. Uses ImageNet weights when Keras can load them and says
plainly when it falls back to random weights (the results then show the pipeline working,
not pretrained quality).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from imgvec import api
from imgvec.pages import report
from imgvec.results import chance_levels, chance_sentence
from imgvec.embedding.embedder import Embedder
from imgvec.errors import MissingWeightsError
from imgvec.synthetic import make_image_folder

BACKBONE = "efficientnetb0"


def _say(text: str = "") -> None:
    print(text, flush=True)


def choose_weights(backbone: str = BACKBONE) -> str:
    """``imagenet`` when Keras can load the weights (cache or download), else ``none``."""
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
    train_dir = make_image_folder(root / "images" / "train", per_class=12, size=160, seed=0)
    holdout_dir = make_image_folder(root / "images" / "holdout", per_class=4, size=160, seed=1)
    _say(f"1. generated {len(list(train_dir.rglob('*.png')))} labelled images in {train_dir} "
         f"and {len(list(holdout_dir.rglob('*.png')))} held-out ones in {holdout_dir}")

    weights = choose_weights()
    store = root / "demo.h5"
    summary = api.embed([train_dir], store, model=BACKBONE, weights=weights)
    _say(f"2. embedded {summary.added} images with {summary.provenance.describe()} "
         f"into {store} ({summary.images_per_second:.1f} images/s)")

    built = api.build_index(store)
    _say(f"3. built a {built.kind} FAISS index over {built.rows} rows: {built.path}")

    queries = sorted(holdout_dir.rglob("*.png"))[::4][:2]
    found = api.query(store, queries, k=5)
    _say("4. nearest stored images for two held-out queries:")
    for q in found.queries:
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
