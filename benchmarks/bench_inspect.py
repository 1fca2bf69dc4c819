"""`imgvec inspect`: planted label noise and outliers found (confident learning beside margin-only and
kNN-only rankings), and the whole command's time, CPU time and peak memory, stage by stage, on a large
generated store.

Quality: a labelled folder is copied with 5% of its images moved to another class folder (seeded)
and 1% outliers from elsewhere added (in turn: a blank image, a noise image, and an augmented copy of
a photo of a subject that is no class), embedded with ``--model`` (default efficientnetlite0 with its
pretrained ImageNet weights, installed with imgvec: offline), and inspected. The folder (default):
``--per-class`` (40) augmented copies of each of 10 real photos packaged with scikit-image and
scikit-learn (:func:`imgvec.synthetic.make_photo_folder`; cat, coffee, astronaut, motorcycle, temple,
flower, galaxies, cells, retina, cameraman), with the rocket and the coins photos held out as the
other subjects: 400 images, 20 moved, 4 outliers. Only where scikit-image is missing, generated
colour-class images stand in (the results say so); ``--photos DIR`` takes a folder of one's own.
``--weights none`` gives random weights, which the results then say.
Label noise: recall of the moved images in the top 2 x (moved) and precision in the top (moved) of
three rankings: imgvec's (confident learning on the head's out-of-fold probabilities averaged with the
neighbours' labels; only its issues are ranked), out-of-fold margin alone (given-label probability
minus the best other, lowest first) and kNN voting alone (share of the 10 nearest neighbours with the
same label, lowest first). Outliers: the rank of each planted outlier among all images (target:
every one in the top 3%). Quality does not depend on machine load.

Scale: ``imgvec inspect`` in a fresh process on a generated labelled store (``--rows`` x 1280: 10
classes of 10 sub-clusters in a 64-dimensional latent space, lifted to 1280 dimensions, ReLU'd; see
:func:`scale_rows`) with an HNSW index, map included: wall and CPU seconds, peak RSS (VmHWM), and
each stage's wall and CPU seconds and the largest RSS seen in it (stages are the progress phases;
work between two phases is listed as such).

    python -m benchmarks.bench_inspect [--per-class 40] [--rows 100000] [--part quality|scale]
    python -m benchmarks.bench_inspect --quick
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .common import (CHILD_PEAK_RSS, OUT, RESULTS, generated_store, kept_quiet, load_average, md_table, photo_like,
                     write_result)

NAME = "inspect"
NOISE = 0.05
OUTLIER_SHARE = 0.01
SCALE_DIM = 1280
SCALE_CLASSES = 10
SCALE_CHUNK = 50_000  # rows generated at a time (the labels are remade from the same chunks)

_CHILD = CHILD_PEAK_RSS + """
cpu0 = time.process_time()
def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
stages = []  # [phase, first wall, last wall, first CPU, last CPU, largest RSS seen, started]
def progress(done, total, phase="?"):
    wall, cpu, rss = time.perf_counter() - start, time.process_time() - cpu0, rss_mb()
    if not stages or stages[-1][0] != phase or (done == 0 and stages[-1][6]):
        stages.append([phase, wall, wall, cpu, cpu, rss, False])
    s = stages[-1]
    s[2], s[4], s[5], s[6] = wall, cpu, max(s[5], rss), s[6] or done > 0
r = imgvec.inspect(sys.argv[1], check_files=False, progress=progress)
seconds, cpu = time.perf_counter() - start, time.process_time() - cpu0
progress(1, 1, "end")
out, last = [], (0.0, 0.0)
for phase, w0, w1, c0, c1, rss, _ in stages:  # each phase, and the work between two phases (no progress told)
    if w0 - last[0] > 0.05:
        out.append({"stage": "between phases, before " + phase, "seconds": round(w0 - last[0], 2),
                    "cpu_seconds": round(c0 - last[1], 2), "rss_mb": round(rss)})
    if phase != "end":
        out.append({"stage": phase, "seconds": round(w1 - w0, 2), "cpu_seconds": round(c1 - c0, 2), "rss_mb": round(rss)})
    last = (w1, c1)
json.dump({"seconds": seconds, "cpu_seconds": cpu, "peak_rss_mb": peak_rss_mb(), "label_issues": len(r.label_issues),
           "outliers": len(r.outliers), "leaks": len(r.leaks), "map": r.methods.get("map", ""),
           "label_method": r.methods.get("label_issues", r.skipped_sections.get("label_issues", "")), "stages": out},
          open(sys.argv[2], "w"))
"""


# Real photos packaged with scikit-image / scikit-learn (imgvec.synthetic.PHOTOS): ten are the classes, two
# are held out as the "other subjects" among the planted outliers.
PHOTO_CLASSES = ("cat", "coffee", "astronaut", "motorcycle", "temple", "flower", "galaxies", "cells", "retina",
                 "cameraman")
OTHER_SUBJECTS = ("rocket", "coins")


def labelled_folder(photos: Path | None, per_class: int) -> tuple[Path, str, dict[str, np.ndarray]]:
    """The labelled folder to plant noise in, what it is (words), and photos of other subjects by name.

    ``photos``: a folder of the user's. Otherwise augmented copies of the packaged real photos
    (:func:`imgvec.synthetic.make_photo_folder`); only when those are missing (no scikit-image),
    generated colour-class images, and the result says so."""
    from imgvec import synthetic

    if photos is not None:
        return photos, str(photos), {}
    try:
        others = {name: synthetic.packaged_photo(name) for name in OTHER_SUBJECTS}
        folder = OUT / f"inspect-photos-{per_class}"
        if not folder.exists():
            synthetic.make_photo_folder(folder.with_suffix(".tmp"), per_class=per_class, classes=PHOTO_CLASSES)
            folder.with_suffix(".tmp").rename(folder)
        return folder, (f"real packaged photos (imgvec.synthetic.make_photo_folder): {per_class} augmented copies "
                        f"of each of {len(PHOTO_CLASSES)} photos ({', '.join(PHOTO_CLASSES)})"), others
    except ImportError:
        folder = synthetic.make_image_folder(OUT / f"inspect-synthetic-{per_class}", per_class=per_class, size=96)
        return folder, "GENERATED colour-class images (the packaged photos are missing: no scikit-image)", {}


def planted_folder(source: Path, out: Path, others: dict[str, np.ndarray] | None = None, seed: int = 0
                   ) -> tuple[dict[str, str], dict[str, str]]:
    """Copy ``source`` (class subfolders) to ``out`` with 5% moved to another class and 1% outliers added:
    (moved key -> its true class, outlier key -> what it is). The outliers are, in turn, a blank image, a
    noise image and an augmented copy of each photo in ``others`` (subjects of no class; without
    ``others``, a generated photo-like image)."""
    from PIL import Image

    from imgvec.synthetic import augmented_copy

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
    kinds = ["blank", "noise", *(f"other subject ({name})" for name in others or {"photo-like": None})]
    outliers = {}
    size = 256
    for i in range(max(1, round(OUTLIER_SHARE * len(files)))):
        kind = kinds[i % len(kinds)]
        if kind == "blank":
            img = Image.fromarray(np.full((size, size, 3), rng.integers(0, 256, 3), np.uint8))
        elif kind == "noise":
            img = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        elif others:
            img = augmented_copy(others[kind.split("(")[1].rstrip(")")], rng, size)
        else:
            img = Image.fromarray(photo_like(rng, size, size))
        cls = classes[i % len(classes)]
        name = f"outlier_{i}_{kind.split(' (')[-1].rstrip(')').replace(' ', '-')}.jpg"
        img.save(out / cls / name, quality=90)
        outliers[f"{cls}/{name}"] = kind
    return moved, outliers


def scores(found: list[str], moved: set[str]) -> tuple[float, float]:
    """(recall of ``moved`` in the top 2 x len(moved) of ``found``, precision in its top len(moved))."""
    m = len(moved)
    return len(moved & set(found[: 2 * m])) / m, len(moved & set(found[:m])) / m


def quality(photos: Path | None, model: str, weights: str, image_size: int | None, per_class: int) -> dict[str, Any]:
    import imgvec
    from imgvec.analyses.inspection import neighbours, outlier_scores
    from imgvec.vectors.classifier import LogisticHead
    from imgvec.vectors.index import normalized

    photos, source, others = labelled_folder(photos, per_class)
    folder = OUT / "inspect-planted"
    moved, planted_outliers = planted_folder(photos, folder, others)
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
    print(f"  outlier ranks: {ranks} of {len(keys)}", file=sys.stderr)
    reported = {o.path for o in r.outliers}
    return {"images": len(keys), "classes": len(set(labels.tolist())), "moved": len(moved),
            "outliers_planted": len(planted_outliers), "outlier_kinds": planted_outliers,
            "model": model, "weights": weights, "random_weights": weights == "none",
            "source": source, "top_3pct": int(0.03 * len(keys)),
            "label_noise": methods, "outlier_ranks": ranks,
            "outliers_in_top_3pct": all(rank <= 0.03 * len(keys) for rank in ranks.values()),
            "outliers_reported": len(r.outliers),
            "planted_outliers_reported": sum(o in reported for o in planted_outliers),
            "label_method": r.methods.get("label_issues", "")}


SCALE_LATENT = 64  # the rows live near a 64-dimensional subspace, non-negative: as a CNN's pooled features do
SCALE_SUBCLUSTERS = 10  # per class
SCALE_FLIPPED = 0.02  # labels moved to another class, so the label issues have something to find


def scale_rows(start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``start .. start + n`` of the timing store and their class numbers (the same for the same start).

    10 classes, each 10 sub-clusters in a 64-dimensional latent space (classes overlap: a logistic head
    gets about 0.9-0.95 out-of-fold accuracy), lifted to 1280 dimensions by a fixed random map, plus
    noise, then ReLU'd (bench_dedup's model of pooled CNN features); 2% of the labels are another class's.
    Rows with isotropic full-rank noise around a few hundred centres (the earlier generator) are unlike
    real embeddings: they collapse onto their centres in dedup's 64-dimensional projection, so every
    same-centre pair becomes a near-duplicate candidate (25M pairs at 100k rows).
    """
    g = np.random.default_rng(0)
    classes = 0.3 * g.standard_normal((SCALE_CLASSES, SCALE_LATENT), dtype=np.float32)
    sub = np.repeat(classes, SCALE_SUBCLUSTERS, 0) + 0.9 * g.standard_normal(
        (SCALE_CLASSES * SCALE_SUBCLUSTERS, SCALE_LATENT), dtype=np.float32)
    lift = g.standard_normal((SCALE_LATENT, SCALE_DIM), dtype=np.float32) / np.float32(np.sqrt(SCALE_LATENT))
    r = np.random.default_rng([0, start])
    which = r.integers(0, len(sub), n)
    base = sub[which] + r.uniform(0.5, 1.0, (n, 1)).astype(np.float32) * r.standard_normal((n, SCALE_LATENT),
                                                                                            dtype=np.float32)
    x = np.maximum(base @ lift + np.float32(0.3) * r.standard_normal((n, SCALE_DIM), dtype=np.float32), 0)
    label = which // SCALE_SUBCLUSTERS
    flip = r.random(n) < SCALE_FLIPPED
    label[flip] = (label[flip] + r.integers(1, SCALE_CLASSES, int(flip.sum()))) % SCALE_CLASSES
    return x.astype(np.float32), label


def scale(rows: int) -> dict[str, Any]:
    import imgvec
    from imgvec.vectors.index import index_path_for

    path = OUT / f"inspect-classes-{rows}x{SCALE_DIM}.h5"
    generated_store(path, rows, SCALE_DIM, lambda start, n: scale_rows(start, n)[0], chunk=SCALE_CHUNK)
    _write_labels(path)
    if not index_path_for(path).exists():
        imgvec.build_index(path, kind="hnsw")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        subprocess.run([sys.executable, "-c", _CHILD, str(path), str(out)], check=True)
        result = json.loads(out.read_text())
    print(f"  {rows:,} x {SCALE_DIM}: {result['seconds']:.1f}s ({result['cpu_seconds']:.1f} CPU s), "
          f"peak RSS {result['peak_rss_mb']:.0f} MB", file=sys.stderr)
    for stage in result["stages"]:
        print(f"    {stage['stage']}: {stage['seconds']:.1f}s, {stage['cpu_seconds']:.1f} CPU s, "
              f"RSS up to {stage['rss_mb']:.0f} MB", file=sys.stderr)
    threads = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS") if k in os.environ}
    return {"rows": rows, "dim": SCALE_DIM, "classes": SCALE_CLASSES, "index": "hnsw", "threads": threads,
            "store": "10 classes of 10 sub-clusters in a 64-d latent space, lifted to 1280-d, ReLU (2% labels "
                     "flipped)", **result}


def _write_labels(path: Path) -> None:
    """Give the generated rows their class labels (as ``scale_rows`` made them), in place, once."""
    import h5py

    from imgvec.files.strings import set_strings

    with h5py.File(path, "r") as h5:  # read-only first: a reader elsewhere does not stop the check
        if h5["labels/names/offsets"].shape[0] > 1:
            return
    with h5py.File(path, "r+") as h5:
        set_strings(h5["labels/names"], [f"class{c}" for c in range(SCALE_CLASSES)])  # code c: class c
        for start in range(0, h5["embeddings"].shape[0], SCALE_CHUNK):
            n = min(SCALE_CHUNK, h5["embeddings"].shape[0] - start)
            h5["labels/codes"][start : start + n] = np.asarray(scale_rows(start, n)[1], np.int32)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="efficientnetlite0", help="backbone (default: efficientnetlite0, pretrained "
                    "weights installed with imgvec)")
    ap.add_argument("--weights", default="imagenet", help="imagenet, or none (random: the results say so)")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--photos", type=Path, default=None, help="labelled photos, one subfolder per class "
                    "(default: augmented copies of the real packaged photos)")
    ap.add_argument("--per-class", type=int, default=40, help="images per class without --photos")
    ap.add_argument("--rows", type=int, default=100_000, help="rows of the generated store for the timing")
    ap.add_argument("--part", choices=("quality", "scale"), default=None, help="run one part only (the results "
                    "file keeps the other part from its last run)")
    ap.add_argument("--quick", action="store_true", help="a tiny run that shows the benchmark works")
    args = ap.parse_args(argv)
    if args.quick:
        args.per_class, args.rows = min(args.per_class, 10), min(args.rows, 3000)
    name = NAME + ("-quick" if args.quick else "")
    data = {"quick": args.quick, "load_average": load_average()}
    if args.part is not None and (RESULTS / f"{name}.json").exists():
        old = json.loads((RESULTS / f"{name}.json").read_text())
        data.update({k: old[k] for k in ("quality", "scale") if k in old})
    if args.part in (None, "quality"):
        data["quality"] = quality(args.photos, args.model, args.weights, args.image_size, args.per_class)
    if args.part in (None, "scale"):
        data["scale"] = scale(args.rows)
        data["scale"]["load_average"] = load_average()
    write_result(name, data)
    print(markdown(data))
    return data


def _met(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def markdown(data: dict[str, Any]) -> str:
    parts = []
    q, s = data.get("quality"), data.get("scale")
    if q is not None:
        weights = ("RANDOM weights (the pipeline, not a quality claim)" if q["random_weights"]
                   else f"pretrained {q['weights']} weights")
        m = q["moved"]
        parts.append(f"Planted label noise: {m} of {q['images']} images ({q['source']}) moved to another class folder, "
                     f"embedded with {q['model']}, {weights}. Recall of the moved images in the top 2 x {m} of each "
                     f"ranking and precision in its top {m} (targets: recall >= 0.8, precision >= 0.7):\n")
        parts.append(md_table(["ranking", "recall (top 2m)", "precision (top m)", "images ranked", "target"],
                              [(x["method"], f"{x['recall_top_2m']:.3f}", f"{x['precision_top_m']:.3f}", x["flagged"],
                                _met(x["recall_top_2m"] >= 0.8 and x["precision_top_m"] >= 0.7)
                                if x["method"].endswith("(imgvec inspect)") else "")
                               for x in q["label_noise"]]))
        kinds = q.get("outlier_kinds", {})
        ranks = ", ".join(f"{kinds.get(k, k.rsplit('/', 1)[-1])} #{v}" for k, v in q["outlier_ranks"].items())
        parts.append(f"Planted outliers ({q['outliers_planted']}, from elsewhere): outlier ranks {ranks} of "
                     f"{q['images']} (top 3%: the first {int(0.03 * q['images'])}); all in the top 3%: "
                     f"{_met(q['outliers_in_top_3pct'])}.\n")
    if s is not None:
        load = s.get("load_average", data["load_average"])
        # the other core busy too, with other work: the wall seconds are the load's, not inspect's
        loaded = max(load) > 1.5 and not kept_quiet(data)
        parts.append(f"`imgvec inspect` on {s['rows']:,} x {s['dim']} generated labelled rows ({s.get('store', '')}) "
                     f"with an {s['index']} index, map included: {s['seconds']:.1f}s wall "
                     f"({s.get('cpu_seconds', float('nan')):.1f} CPU s), peak RSS {s['peak_rss_mb']:.0f} MB; load "
                     f"average {', '.join(map(str, load))} when run. Targets: 60 s {_met(s['seconds'] <= 60)}"
                     + (" (on a loaded machine: rerun quietly)" if loaded and s["seconds"] > 60 else "")
                     + f", 2 GB {_met(s['peak_rss_mb'] <= 2048)}. "
                     + (f"Threads limited: {', '.join(f'{k}={v}' for k, v in s['threads'].items())}. "
                        if s.get("threads") else "")
                     + f"Map: {s['map']}. By stage:\n")
        parts.append(md_table(["stage", "wall s", "CPU s", "largest RSS seen (MB)"],
                              [(x["stage"], f"{x['seconds']:.1f}", f"{x['cpu_seconds']:.1f}", x["rss_mb"])
                               for x in s.get("stages", [])]))
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    main()
