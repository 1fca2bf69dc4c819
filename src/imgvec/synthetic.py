"""Generated image folders for the demo, tests, benchmarks and notebooks.

Each class is a colour family (reds, greens, blues, yellows); each image is a random pattern
(stripes, checks, discs, rings) in shades of its class colour. Colour is what even a
random-weight backbone keeps, so the classes stay separable in tests run without ImageNet
weights, while every image still differs from the others.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

PATTERNS = ("stripes", "checks", "discs", "rings")
COLOURS = {"reds": (200, 40, 40), "greens": (40, 190, 60), "blues": (40, 60, 210), "yellows": (220, 200, 40)}
CLASSES = tuple(COLOURS)


def pattern(kind: str, size: int, rng: np.random.Generator, colour: tuple[int, int, int] | None = None) -> np.ndarray:
    """One ``size x size`` RGB uint8 image: pattern ``kind`` in shades of ``colour`` (random if None)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    period = rng.uniform(0.08, 0.2)
    if kind == "stripes":
        angle = rng.uniform(0, np.pi)
        mask = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) / period * 2 * np.pi) > 0
    elif kind == "checks":
        mask = (np.floor(xx / period) + np.floor(yy / period)) % 2 == 0
    elif kind == "discs":
        cx, cy = rng.uniform(0.3, 0.7, 2)
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 < rng.uniform(0.05, 0.12)
    elif kind == "rings":
        cx, cy = rng.uniform(0.3, 0.7, 2)
        mask = np.sin(np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) / period * 2 * np.pi) > 0
    else:
        raise ValueError(f"unknown pattern {kind!r}")
    base = np.array(colour if colour is not None else rng.integers(0, 256, 3), np.float32)
    fg = base + rng.normal(0, 20, 3)
    bg = base * rng.uniform(0.5, 0.8) + rng.normal(0, 10, 3)
    img = np.where(mask[..., None], fg, bg).astype(np.float32)
    img += rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_image_folder(root: str | os.PathLike[str], per_class: int = 8, size: int = 64,
                      classes: tuple[str, ...] = CLASSES, seed: int = 0, fmt: str = "png") -> Path:
    """Write ``root/<class>/<class>_NNN.<fmt>`` for each class; returns ``root``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    root = Path(root)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = pattern(PATTERNS[rng.integers(len(PATTERNS))], size, rng, COLOURS[name])
            Image.fromarray(img).save(root / name / f"{name}_{i:03d}.{fmt}")
    return root
