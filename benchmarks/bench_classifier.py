"""The logistic-regression head: imgvec's LogisticHead against the scikit-learn pipeline a competent user would write.

The baseline is ``make_pipeline(StandardScaler(), LogisticRegressionCV(...))`` over the same C grid
(``imgvec.vectors.classifier.DEFAULT_CS``), the same folds (5-fold ``StratifiedKFold``, shuffled, the same
``random_state``), accuracy as the CV score (what the head ranks Cs by) and the same ``max_iter``;
everything else is scikit-learn's default (``tol=1e-4`` throughout; the head searches with
``cv_tol=1e-3`` and refits with ``tol=1e-4``). Both standardise on the whole training split and run
on one thread of control (``n_jobs=None``).

Two generated feature sets, dim 1280, 10 classes: class means in a 32-d latent space mapped to
1280-d, plus noise, then ReLU (as after average pooling). ``hard``: means closer than their spread,
so held-out accuracy is ~0.7; ``easy``: well separated, ~0.99. Both contenders fit the same
training split and are scored on the same held-out 20 %; they run side by side, alternating which
goes first, and each fit is timed once per round (the best of the rounds is reported).

    python -m benchmarks.bench_classifier [--quick] [--full] [--rows N] [--rounds R]
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np

from .common import md_table, timed, write_result

NAME = "classifier"
DIM = 1280
CLASSES = 10
LATENT = 32
# Spread of the class means in the latent space (unit noise around each): the difficulty.
SEPARATION = {"hard": 0.4, "easy": 0.8}


def make_data(n: int, separation: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((CLASSES, LATENT)).astype(np.float32) * separation
    proj = rng.standard_normal((LATENT, DIM)).astype(np.float32) / np.sqrt(LATENT)
    y = rng.integers(0, CLASSES, n)
    z = means[y] + rng.standard_normal((n, LATENT), dtype=np.float32)
    x = np.maximum(z @ proj + 0.5 * rng.standard_normal((n, DIM), dtype=np.float32), 0)  # ReLU-like, as after avg pool
    return x.astype(np.float32), np.array([f"class{c}" for c in y])


def sklearn_pipeline(head: Any) -> Any:
    """StandardScaler + LogisticRegressionCV over ``head``'s C grid, folds, max_iter and CV metric (an int ``Cs`` is the same log-spaced grid in both)."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    folds = StratifiedKFold(head.cv, shuffle=True, random_state=head.random_state)
    return make_pipeline(StandardScaler(), LogisticRegressionCV(
        Cs=head.Cs if isinstance(head.Cs, int) else list(head.Cs), cv=folds, scoring="accuracy", max_iter=head.max_iter, l1_ratios=(0.0,),
        use_legacy_attributes=False))


def bench_set(name: str, n: int, rounds: int) -> dict[str, Any]:
    from sklearn.model_selection import train_test_split

    from imgvec.vectors.classifier import DEFAULT_CS, LogisticHead

    X, y = make_data(n, SEPARATION[name])
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.2, random_state=0, stratify=y)
    contenders = {"imgvec": lambda: LogisticHead().fit(Xtr, ytr),
                  "sklearn": lambda: sklearn_pipeline(LogisticHead()).fit(Xtr, ytr)}
    runs: dict[str, list[tuple[float, Any]]] = {k: [] for k in contenders}
    for r in range(rounds):
        for key in (list(contenders) if r % 2 == 0 else list(contenders)[::-1]):
            runs[key].append(timed(contenders[key]))
            print(f"  {name} {key}: {runs[key][-1][0]:.1f}s", file=sys.stderr)
    head = min(runs["imgvec"], key=lambda t: t[0])[1]
    pipe = min(runs["sklearn"], key=lambda t: t[0])[1]
    lr = pipe[-1]
    rows = [
        {"name": "imgvec LogisticHead", "fit_s": [t for t, _ in runs["imgvec"]], "accuracy": head.score(Xte, yte),
         "C": head.C_, "cv_accuracy": head.cv_accuracy_, "search_s": head.search_seconds_,
         "final_fit_s": head.fit_seconds_},
        {"name": "sklearn StandardScaler + LogisticRegressionCV", "fit_s": [t for t, _ in runs["sklearn"]],
         "accuracy": float(pipe.score(Xte, yte)), "C": float(np.ravel(lr.C_)[0]),
         "cv_accuracy": float(np.max(np.mean(lr.scores_, axis=0)))},
    ]
    for row in rows:
        print(f"  {name} {row['name']}: best {min(row['fit_s']):.1f}s acc {row['accuracy']:.4f} C {row['C']:.2g}",
              file=sys.stderr)
    return {"set": name, "separation": SEPARATION[name], "train_rows": len(ytr), "test_rows": len(yte),
            "Cs": list(DEFAULT_CS), "rows": rows}


def markdown(data: dict[str, Any]) -> str:
    out = [f"Generated features, dim {DIM}, {CLASSES} classes; the same training split, the same held-out 20 %, "
           f"the same C grid ({', '.join(f'{c:g}' for c in data['sets'][0]['Cs'])}) and the same 5 shuffled "
           "stratified folds for both; scikit-learn is `make_pipeline(StandardScaler(), LogisticRegressionCV("
           "Cs=..., cv=StratifiedKFold(...), scoring='accuracy', max_iter=1000))`. Both "
           "standardise on the whole training split; scikit-learn keeps its default `tol=1e-4` during the C search, "
           "the head searches with `cv_tol=1e-3` (only the ranking of the Cs matters there) and refits with 1e-4. "
           f"Fit seconds: the best of {len(data['sets'][0]['rows'][0]['fit_s'])} side-by-side round(s) on 2 shared "
           "cores.\n\n"]
    table = []
    for s in data["sets"]:
        for r in s["rows"]:
            split = (f"{r['search_s']:.1f} + {r['final_fit_s']:.1f}" if "search_s" in r else "-")
            table.append((f"{s['set']} ({s['train_rows']:,} + {s['test_rows']:,} rows)", r["name"], min(r["fit_s"]),
                          split, f"{r['accuracy']:.4f}", f"{r['C']:g}"))
    out.append(md_table(["features", "contender", "fit s", "C search + final fit s", "held-out accuracy",
                         "C chosen"], table))
    out.append("\n")
    for s in data["sets"]:
        head, sk = s["rows"]
        ratio = min(sk["fit_s"]) / min(head["fit_s"])
        diff = head["accuracy"] - sk["accuracy"]
        out.append(f"- **{s['set']}** features: the head fits {ratio:.2f}x as fast as the scikit-learn pipeline, "
                   f"held-out accuracy {head['accuracy']:.4f} vs {sk['accuracy']:.4f} ({diff:+.4f}), C {head['C']:g} "
                   f"vs {sk['C']:g}.\n")
    return "".join(out)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3k rows")
    ap.add_argument("--full", action="store_true", help="50k rows")
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None)
    args = ap.parse_args(argv)
    n = args.rows or (3_000 if args.quick else 50_000 if args.full else 10_000)
    rounds = args.rounds or 1
    data = {"quick": args.quick, "rows_generated": n, "sets": [bench_set(name, n, rounds) for name in SEPARATION]}
    write_result(NAME + ("-quick" if args.quick else ""), data)
    print(markdown(data))
    return data


if __name__ == "__main__":
    main()
