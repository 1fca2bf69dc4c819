"""Generated image folders for the demo, tests, benchmarks and notebooks.

Each class is a colour family (reds, greens, blues, yellows); each image is a random pattern
(stripes, checks, discs, rings) in shades of its class colour. Colour is what even a
random-weight backbone keeps, so the classes stay separable in tests run without ImageNet
weights, while every image still differs from the others.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

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


# -- real photos that ship in packages, and augmented copies of them ----------------------------------
# class name -> (package, loader): scikit-image's colour and grey photos, scikit-learn's two sample images.
PHOTOS = {
    "cat": ("skimage", "chelsea"), "coffee": ("skimage", "coffee"), "astronaut": ("skimage", "astronaut"),
    "rocket": ("skimage", "rocket"), "motorcycle": ("skimage", "stereo_motorcycle"), "temple": ("sklearn", "china"),
    "flower": ("sklearn", "flower"), "galaxies": ("skimage", "hubble_deep_field"),
    "cells": ("skimage", "immunohistochemistry"), "retina": ("skimage", "retina"), "cameraman": ("skimage", "camera"),
    "coins": ("skimage", "coins"),
}


def packaged_photo(name: str) -> np.ndarray:
    """The packaged photo behind class ``name`` of :data:`PHOTOS` as RGB uint8 (grey ones as three channels).
    Needs scikit-image (``pip install scikit-image``; in imgvec's dev extra) for all but ``temple``/``flower``."""
    package, loader = PHOTOS[name]
    if package == "sklearn":
        from sklearn.datasets import load_sample_image

        image = load_sample_image(f"{loader}.jpg")
    else:
        import skimage.data

        image = getattr(skimage.data, loader)()
        image = image[0] if isinstance(image, tuple) else image  # a stereo pair: the left view
    image = np.asarray(image)
    return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]


def augmented_copy(image: np.ndarray, rng: np.random.Generator, size: int = 256) -> "Any":
    """A Pillow image: a random crop (55-100% of each side), maybe mirrored, rotated up to 12 degrees,
    brightness 0.7-1.3, resized to ``size`` square. JPEG quality is chosen when it is saved."""
    from PIL import Image, ImageEnhance

    h, w = image.shape[:2]
    ch, cw = (int(round(s * rng.uniform(0.55, 1.0))) for s in (h, w))
    top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    im = Image.fromarray(np.ascontiguousarray(image[top:top + ch, left:left + cw]))
    if rng.random() < 0.5:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    im = im.rotate(float(rng.uniform(-12, 12)), resample=Image.Resampling.BILINEAR, expand=False)
    im = ImageEnhance.Brightness(im).enhance(float(rng.uniform(0.7, 1.3)))
    return im.resize((size, size), Image.Resampling.BILINEAR)


def make_photo_folder(root: str | os.PathLike[str], per_class: int = 8, size: int = 256,
                      classes: tuple[str, ...] = tuple(PHOTOS), seed: int = 0) -> Path:
    """Write ``root/<class>/<class>_NNN.jpg``: ``per_class`` augmented copies (:func:`augmented_copy`, JPEG
    quality 40-95) of each class's packaged photo (:data:`PHOTOS`), from ``seed``; returns ``root``."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    for name in classes:
        image = packaged_photo(name)
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            augmented_copy(image, rng, size).save(root / name / f"{name}_{i:03d}.jpg",
                                                  quality=int(rng.integers(40, 96)))
    return root
