"""Embedding quality: find the other augmented copies of a real photo (precision@10), pretrained against random.

The photos are the ones that ship in packages (imgvec.synthetic.PHOTOS: scikit-image's cat, cup,
astronaut, rocket, motorcycle, galaxies, cells, retina, cameraman, coins; scikit-learn's temple and
flower). Each becomes ``copies`` augmented copies (imgvec.synthetic.augmented_copy: a random crop of
55-100% of each side, a mirror half the time, a rotation up to 12 degrees, brightness 0.7-1.3, JPEG
quality 40-95; 256 px, fixed seed). Every copy is a query; the relevant images are the other copies of
the same photo, and precision@10 is the share of them among its 10 nearest other images (cosine).

Contenders, each through imgvec's own embedder (decoding, resizing and the backbone's
``preprocess_input``; OpenVINO, float32) at 224 px: ``efficientnetlite0`` with its pretrained
ImageNet weights (installed with imgvec), the same network with random weights (``--weights none``,
seed 0), and two registry backbones with random weights, ``mobilenetv2`` and ``efficientnetb0``.
Quality does not depend on machine load. Also timed, side by side on the same pre-decoded pixels
(the OpenVINO engine alone, 32 images a call, best of the rounds): ``efficientnetlite0`` against
``efficientnetb0``; those seconds were taken on a shared machine and say so (the load average is kept).

    python -m benchmarks.bench_quality [--quick] [--copies 20] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from .common import OUT, best, interleaved, kept_quiet, load_average, md_table, quiet_tf, write_result

NAME = "quality"
K = 10
SIZE = 224
CONTENDERS = (("efficientnetlite0", "imagenet"), ("efficientnetlite0", "none"), ("mobilenetv2", "none"),
              ("efficientnetb0", "none"))
TARGET = 0.9  # precision@10 of pretrained efficientnetlite0 (issue 25)


def make_copies(folder: Path, copies: int, classes: tuple[str, ...], seed: int = 0) -> list[Path]:
    """``copies`` augmented copies of each packaged photo in ``folder/<photo>/``; the files, sorted."""
    from imgvec.synthetic import make_photo_folder

    shutil.rmtree(folder, ignore_errors=True)
    make_photo_folder(folder, per_class=copies, size=256, classes=classes, seed=seed)
    return sorted(folder.rglob("*.jpg"))


def embed(model: str, weights: str, paths: list[Path]) -> np.ndarray:
    """Rows of ``paths`` in order, embedded by imgvec (OpenVINO, float32)."""
    from imgvec.embedding.embedder import Embedder

    embedder = Embedder(model, weights, SIZE, runtime="openvino")
    rows = np.zeros((len(paths), embedder.dim), np.float32)
    for batch in embedder.embed_files([str(p) for p in paths]):
        assert not batch.skipped, batch.skipped
        rows[batch.indices] = batch.embeddings
    return rows


def precision_at_k(rows: np.ndarray, labels: np.ndarray, k: int = K) -> np.ndarray:
    """Per query: the share of its ``k`` nearest other rows (cosine) with its label."""
    unit = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)  # a query is not its own neighbour
    nearest = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return (labels[nearest] == labels[:, None]).mean(axis=1)


def speed(rounds: int, n: int = 64) -> dict[str, Any]:
    """Seconds per ``n`` pre-decoded images through each OpenVINO engine, side by side, best of ``rounds``."""
    from imgvec.runtime.loader import load_engine

    pixels = np.random.default_rng(0).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)
    engines = {"efficientnetlite0": load_engine("openvino", "efficientnetlite0", "imagenet", SIZE, device="cpu"),
               "efficientnetb0": load_engine("openvino", "efficientnetb0", "none", SIZE, device="cpu")}

    def run(engine: Any) -> None:
        for i in range(0, n, 32):
            engine(pixels[i:i + 32])

    for engine in engines.values():
        run(engine)  # warm-up
    before = load_average()
    times = interleaved({name: (lambda e=engine: run(e)) for name, engine in engines.items()}, rounds)
    return {"images": n, "rounds": rounds, "load_before": before, "load_after": load_average(),
            "images_per_s": {name: n / best(ts) for name, ts in times.items()}, "seconds": times}


def markdown(data: dict[str, Any]) -> str:
    rows = [(r["model"], "pretrained (packaged ImageNet)" if r["weights"] == "imagenet" else "random (seed 0)",
             f"{r['precision_at_10']:.3f}", f"{min(r['per_photo'].values()):.3f} ({min(r['per_photo'], key=r['per_photo'].get)})")
            for r in data["rows"]]
    lite = data["rows"][0]
    out = [f"Find the other copies of a photo: {len(data['photos'])} real photos that ship in packages (scikit-image, "
           f"scikit-learn), {data['copies']} augmented copies each (crops, mirrors, rotations, brightness, JPEG "
           f"quality), {data['images']} queries; precision@{K} is the share of the other copies of the query's photo "
           f"among its {K} nearest images (cosine), averaged over every query. imgvec's embedder at {SIZE} px on "
           "OpenVINO (float32). Target for pretrained efficientnetlite0: >= "
           f"{TARGET} ({'met' if lite['precision_at_10'] >= TARGET else 'NOT met'}). The task asks whether features "
           "survive crops, mirrors and recompression, not whether they group different photos of one kind of "
           "thing; random weights keep colour and layout, which finds some copies.\n\n",
           md_table(["backbone", "weights", f"precision@{K}", "worst photo"], rows)]
    s = data.get("speed")
    if s:
        lite_s, b0_s = s["images_per_s"]["efficientnetlite0"], s["images_per_s"]["efficientnetb0"]
        out.append(f"\nSpeed, the OpenVINO engine alone on {s['images']} pre-decoded {SIZE} px images (best of "
                   f"{s['rounds']} side-by-side rounds): efficientnetlite0 {lite_s:.1f} images/s, efficientnetb0 "
                   f"{b0_s:.1f} images/s ({lite_s / b0_s:.2f}x). "
                   + (f"Nothing else ran (load average {s['load_before'][0]:.1f} before, {s['load_after'][0]:.1f} "
                      "after: the benchmark's own).\n" if kept_quiet(data) else
                      f"**Measured under load** (load average {s['load_before'][0]:.1f} before, "
                      f"{s['load_after'][0]:.1f} after, on 2 shared cores): the ratio is indicative, the images/s "
                      "are not figures for this machine.\n"))
    return "".join(out)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="6 photos x 11 copies, 2 timing rounds")
    ap.add_argument("--copies", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--no-speed", action="store_true", help="precision only")
    args = ap.parse_args(argv)
    quiet_tf()
    os.environ.setdefault("IMGVEC_CACHE_DIR", str(OUT / "model-cache"))  # the benchmarks' compiled models
    from imgvec.synthetic import PHOTOS

    classes = tuple(PHOTOS)[:6] if args.quick else tuple(PHOTOS)
    copies = args.copies or (11 if args.quick else 20)  # at least K + 1: K other copies to find
    paths = make_copies(OUT / "quality-photos", copies, classes)
    labels = np.array([p.parent.name for p in paths])
    rows = []
    for model, weights in CONTENDERS:
        p = precision_at_k(embed(model, weights, paths), labels)
        rows.append({"model": model, "weights": weights, "precision_at_10": float(p.mean()),
                     "per_photo": {c: float(p[labels == c].mean()) for c in classes}})
        print(f"{model} {weights}: precision@{K} {p.mean():.3f}", flush=True)
    data: dict[str, Any] = {"quick": args.quick, "photos": list(classes), "copies": copies, "images": len(paths),
                            "image_size": SIZE, "k": K, "rows": rows}
    if not args.no_speed:
        data["speed"] = speed(args.rounds or (2 if args.quick else 5))
    write_result(NAME + ("-quick" if args.quick else ""), data)
    print(markdown(data))
    return data


if __name__ == "__main__":
    main()
