"""`imgvec inspect`: planted label noise and outliers found (confident learning beside margin-only and
kNN-only rankings), and the whole command's time and peak memory on a large generated store.

Quality: a labelled folder (``--photos``: one subfolder per class; default: generated colour-class
images, :mod:`imgvec.synthetic`) is copied with 5% of its images moved to another class folder
(seeded) and 1% outliers added (a blank, a noise image and a photo-like image of no class, in
turn), embedded with ``--model`` (``--weights``: imagenet, or none for random weights, which the
results then say), and inspected. Label noise: recall of the moved images in the top 2 x (moved)
and precision in the top (moved) of three rankings: imgvec's (confident learning on the head's
out-of-fold probabilities averaged with the neighbours' labels; only its issues are ranked),
out-of-fold margin alone (given-label probability minus the best other, lowest first) and kNN
voting alone (share of the 10 nearest neighbours with the same label, lowest first). Outliers:
the rank of each planted outlier among all images (targets: every one in the top 3%).

Scale: ``imgvec inspect`` in a fresh process on a generated labelled store (``--rows`` x 1280,
clustered rows, 10 classes) with an HNSW index, map included; wall seconds and peak RSS (VmHWM).

    python -m benchmarks.bench_inspect --model efficientnetlite0 [--photos DIR] [--rows 100000]
    python -m benchmarks.bench_inspect --quick --model mobilenetv3small --weights none --image-size 64
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .common import CHILD_PEAK_RSS, OUT, generated_store, load_average, md_table, photo_like, write_result

NAME = "inspect"
NOISE = 0.05
OUTLIER_SHARE = 0.01
SCALE_DIM = 1280
SCALE_CLASSES = 10

_CHILD = CHILD_PEAK_RSS + """
phases = {}
def progress(done, total, phase="?"):
    now = time.perf_counter() - start
    phases.setdefault(phase, [now, now])[1] = now
r = imgvec.inspect(sys.argv[1], check_files=False, progress=progress)
seconds = time.perf_counter() - start
json.dump({"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "label_issues": len(r.label_issues),
           "outliers": len(r.outliers), "leaks": len(r.leaks), "map": r.methods.get("map", ""),
           "phases": {k: round(b - a, 2) for k, (a, b) in phases.items()}}, open(sys.argv[2], "w"))
"""


def planted_folder(source: Path, out: Path, seed: int = 0) -> tuple[dict[str, str], list[str]]:
    """Copy ``source`` (class subfolders) to ``out`` with 5% moved to another class and 1% outliers added:
    (moved key -> its true class, outlier keys)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(source, out)
    classes = sorted(p.name for p in out.iterdir() if p.is_dir())
    files = sorted(p for c in classes for p in (out / c).iterdir() if p.is_file())
    moved: dict[str, str] = {}
    for f in rng.choice(files, max(1, round(NOISE * len(files))), replace=False):
        true = f.parent.name
        wrong = str(rng.choice([c for c in classes if c != true]))
        target = out / wrong / f"moved_{true}_{f.name}"
        shutil.move(f, target)
        moved[f"{wrong}/{target.name}"] = true
    outliers = []
    for i in range(max(1, round(OUTLIER_SHARE * len(files)))):
        kind = ("blank", "noise", "photo")[i % 3]
        size = 256
        img = (np.full((size, size, 3), rng.integers(0, 256, 3), np.uint8) if kind == "blank"
               else rng.integers(0, 256, (size, size, 3), dtype=np.uint8) if kind == "noise"
               else photo_like(rng, size, size))
        cls = classes[i % len(classes)]
        Image.fromarray(img).save(out / cls / f"outlier_{kind}_{i}.png")
        outliers.append(f"{cls}/outlier_{kind}_{i}.png")
    return moved, outliers


def scores(found: list[str], moved: set[str]) -> tuple[float, float]:
    """(recall of ``moved`` in the top 2 x len(moved) of ``found``, precision in its top len(moved))."""
    m = len(moved)
    return len(moved & set(found[: 2 * m])) / m, len(moved & set(found[:m])) / m


def quality(photos: Path | None, model: str, weights: str, image_size: int | None, per_class: int) -> dict[str, Any]:
    import imgvec
    from imgvec.analyses.inspection import neighbours, outlier_scores
    from imgvec.synthetic import make_image_folder
    from imgvec.vectors.classifier import LogisticHead
    from imgvec.vectors.index import normalized

    source = str(photos) if photos is not None else "generated colour classes (imgvec.synthetic)"
    if photos is None:
        photos = make_image_folder(OUT / f"inspect-synthetic-{per_class}", per_class=per_class, size=96, seed=0)
    folder = OUT / "inspect-planted"
    moved, planted_outliers = planted_folder(photos, folder)
    store = OUT / f"inspect-planted-{model}-{weights}.h5"
    store.unlink(missing_ok=True)
    imgvec.embed([folder], store, model=model, weights=weights, image_size=image_size)
    r = imgvec.inspect(store, map_rows=None, check_files=False)
    rankings = {"confident learning + neighbours (imgvec inspect)": [i.path for i in r.label_issues]}
    with imgvec.open_store(store) as s:
        keys, labels = s.paths(), np.asarray(s.labels())
        x = normalized(s.embeddings())
        head = LogisticHead().fit(x, labels)
        p = head.cv_probabilities_
        given = np.searchsorted(head.classes_, labels)
        mine = p[np.arange(len(p)), given]
        margin = mine - np.where(np.eye(p.shape[1], dtype=bool)[given], -1, p).max(axis=1)
        rankings["out-of-fold margin alone"] = [keys[i] for i in np.argsort(margin, kind="stable")]
        sims, ids = neighbours(s, x, 10)
        agree = (labels[ids] == labels[:, None]).mean(axis=1)
        rankings["kNN voting alone (10 neighbours)"] = [keys[i] for i in np.argsort(agree, kind="stable")]
        z, _, _ = outlier_scores(x, sims, labels.tolist())
    order = [keys[i] for i in np.argsort(-z, kind="stable")]
    ranks = {o: order.index(o) + 1 for o in planted_outliers}
    methods = []
    for name, found in rankings.items():
        recall, precision = scores(found, set(moved))
        methods.append({"method": name, "recall_top_2m": recall, "precision_top_m": precision, "flagged": len(found)})
        print(f"  {name}: recall@2m {recall:.3f}, precision@m {precision:.3f}", file=sys.stderr)
    return {"images": len(keys), "moved": len(moved), "outliers_planted": len(planted_outliers),
            "model": model, "weights": weights, "random_weights": weights == "none",
            "source": source,
            "label_noise": methods, "outlier_ranks": ranks,
            "outliers_in_top_3pct": all(rank <= 0.03 * len(keys) for rank in ranks.values()),
            "outliers_reported": len(r.outliers)}


def scale(rows: int) -> dict[str, Any]:
    import imgvec

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(SCALE_CLASSES * 20, SCALE_DIM)).astype(np.float32)

    def fill(start: int, n: int) -> np.ndarray:
        r = np.random.default_rng([0, start])
        return centres[r.integers(0, len(centres), n)] + r.normal(0, 0.7, (n, SCALE_DIM)).astype(np.float32)

    path = generated_store(OUT / f"inspect-{rows}x{SCALE_DIM}.h5", rows, SCALE_DIM, fill)
    _label_by_cluster(path, centres)
    imgvec.build_index(path, kind="hnsw")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        subprocess.run([sys.executable, "-c", _CHILD, str(path), str(out)], check=True)
        result = json.loads(out.read_text())
    print(f"  {rows:,} x {SCALE_DIM}: {result['seconds']:.1f}s, peak RSS {result['peak_rss_mb']:.0f} MB",
          file=sys.stderr)
    return {"rows": rows, "dim": SCALE_DIM, "classes": SCALE_CLASSES, "index": "hnsw", **result}


def _label_by_cluster(path: Path, centres: np.ndarray) -> None:
    """Give the generated rows labels (their nearest centre's class), in place, once."""
    import h5py

    from imgvec.files.strings import set_strings

    with h5py.File(path, "r+") as h5:
        if h5["labels/names/offsets"].shape[0] > 1:
            return
        set_strings(h5["labels/names"], [f"class{c}" for c in range(SCALE_CLASSES)])  # code c: class c
        for start in range(0, h5["embeddings"].shape[0], 50_000):
            x = h5["embeddings"][start : start + 50_000]
            h5["labels/codes"][start : start + len(x)] = (np.argmax(x @ centres.T, axis=1) % SCALE_CLASSES).astype(np.int32)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="backbone, e.g. efficientnetlite0 (pretrained)")
    ap.add_argument("--weights", default="imagenet", help="imagenet, or none (random: the results say so)")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--photos", type=Path, default=None, help="labelled photos, one subfolder per class "
                    "(default: generated colour classes)")
    ap.add_argument("--per-class", type=int, default=100, help="generated images per class without --photos")
    ap.add_argument("--rows", type=int, default=100_000, help="rows of the generated store for the timing")
    ap.add_argument("--quick", action="store_true", help="a tiny run that shows the benchmark works")
    args = ap.parse_args(argv)
    if args.quick:
        args.per_class, args.rows = min(args.per_class, 25), min(args.rows, 3000)
    data = {"quick": args.quick, "load_average": load_average(),
            "quality": quality(args.photos, args.model, args.weights, args.image_size, args.per_class),
            "scale": scale(args.rows)}
    write_result(NAME + ("-quick" if args.quick else ""), data)
    print(markdown(data))
    return data


def markdown(data: dict[str, Any]) -> str:
    q, s = data["quality"], data["scale"]
    weights = "RANDOM weights (the pipeline, not a quality claim)" if q["random_weights"] else f"{q['weights']} weights"
    head = (f"Planted label noise: {q['moved']} of {q['images']} images ({q['source']}) moved to another class "
            f"folder, embedded with {q['model']}, {weights}; recall of the moved images in the top 2 x {q['moved']} "
            f"of each ranking and precision in its top {q['moved']} (targets: recall >= 0.8, precision >= 0.7):\n\n")
    table = md_table(["ranking", "recall (top 2m)", "precision (top m)", "images ranked"],
                     [(m["method"], f"{m['recall_top_2m']:.3f}", f"{m['precision_top_m']:.3f}", m["flagged"])
                      for m in q["label_noise"]])
    ranks = ", ".join(f"{k.rsplit('/', 1)[-1]} #{v}" for k, v in q["outlier_ranks"].items())
    return (head + table + f"\nPlanted outliers ({q['outliers_planted']}): ranks {ranks} of {q['images']}; all in the "
            f"top 3%: {'yes' if q['outliers_in_top_3pct'] else 'no'}.\n\n"
            f"`imgvec inspect` on {s['rows']:,} x {s['dim']} generated labelled rows with an {s['index']} index, map "
            f"included: {s['seconds']:.1f}s, peak RSS {s['peak_rss_mb']:.0f} MB (targets: 60 s, 2 GB; load average "
            f"{', '.join(map(str, data['load_average']))} when run); by phase: "
            + ", ".join(f"{k} {v:.1f}s" for k, v in s.get("phases", {}).items()) + ".\n")


if __name__ == "__main__":
    main()
