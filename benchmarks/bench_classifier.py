"""The logistic-regression head: imgvec's LogisticHead against scikit-learn's LogisticRegressionCV.

Generated embeddings, dim 1280, 10 classes, moderately separable with some overlap (class
means in a 32-d latent space closer than their spread, mapped to 1280-d, plus noise), so
held-out accuracy is well below 1.0. Both fit on the same training split; accuracy is on
a held-out 20 %.

    python -m benchmarks.bench_classifier [--quick] [--rows 50000]
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


def make_data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    latent = 32
    means = rng.standard_normal((CLASSES, latent)).astype(np.float32) * 0.55
    proj = rng.standard_normal((latent, DIM)).astype(np.float32) / np.sqrt(latent)
    y = rng.integers(0, CLASSES, n)
    z = means[y] + rng.standard_normal((n, latent), dtype=np.float32)
    x = np.maximum(z @ proj + 0.5 * rng.standard_normal((n, DIM), dtype=np.float32), 0)  # ReLU-like, as after avg pool
    return x.astype(np.float32), np.array([f"class{c}" for c in y])


def markdown(data: dict[str, Any]) -> str:
    out = [f"{data['train_rows']:,} training + {data['test_rows']:,} held-out rows, dim {DIM}, {CLASSES} classes "
           "(generated, overlapping), 2 cores:\n\n"]
    out.append(md_table(["contender", "fit s", "held-out accuracy", "C chosen"],
                        [(r["name"], r["fit_s"], f"{r['accuracy']:.4f}", f"{r['C']:.2g}") for r in data["rows"]]))
    return "".join(out)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10k rows")
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--skip-sklearn", action="store_true")
    args = ap.parse_args(argv)
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import train_test_split

    from imgvec.classifier import LogisticHead

    n = args.rows or (10_000 if args.quick else 50_000)
    X, y = make_data(n)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.2, random_state=0, stratify=y)
    rows = []
    fit_s, head = timed(lambda: LogisticHead().fit(Xtr, ytr))
    rows.append({"name": "imgvec LogisticHead (standardise, 5-fold CV over 7 Cs on a warm-started path, out-of-fold predictions, refit)",
                 "fit_s": fit_s, "accuracy": head.score(Xte, yte), "C": head.C_})
    print(f"  LogisticHead: {fit_s:.1f}s acc {rows[-1]['accuracy']:.4f}", file=sys.stderr)
    if not args.skip_sklearn:
        fit_s, lr = timed(lambda: LogisticRegressionCV().fit(Xtr, ytr))
        rows.append({"name": "sklearn LogisticRegressionCV() defaults (raw features)", "fit_s": fit_s,
                     "accuracy": float(lr.score(Xte, yte)), "C": float(np.ravel(lr.C_)[0])})
        print(f"  LogisticRegressionCV: {fit_s:.1f}s acc {rows[-1]['accuracy']:.4f}", file=sys.stderr)
    data = {"quick": args.quick, "train_rows": len(ytr), "test_rows": len(yte), "rows": rows}
    write_result(NAME + ("-quick" if args.quick else ""), data)
    print(markdown(data))
    return data


if __name__ == "__main__":
    main()
