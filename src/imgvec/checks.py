"""Argument checks shared by the library's entry points, each raising one :class:`BadInputError`.

A check lives here once and is called wherever the argument arrives (the API, the embedder, the
head, the duplicate search), so every entry point refuses the same values with the same words.
"""

from __future__ import annotations

from typing import Any, Sequence, TypeVar

from imgvec.errors import BadInputError, did_you_mean, param

T = TypeVar("T")
MAX_IMAGE_SIZE = 2048  # ~3x the largest native input of any backbone (600 px): beyond it, memory and no gain


def check_choice(option: str, value: T, choices: Sequence[T]) -> T:
    """``value`` if it is one of ``choices``; ``option`` names it in the error (``param(...)``)."""
    if value not in choices:
        names = [str(c) for c in choices]
        raise BadInputError(f"{option} {value!r}: expected one of {', '.join(names)}{did_you_mean(str(value), names)}")
    return value


def check_at_least(name: str, value: int, least: int = 1) -> int:
    """``value`` if it is at least ``least``; ``name`` is the parameter (``k``, ``batch_size``, ``workers``...)."""
    if value < least:
        raise BadInputError(f"{param(name)} must be at least {least}, not {value}")
    return value


def check_image_size(image_size: int, backbone: Any) -> int:
    """``image_size`` if ``backbone`` (a registry :class:`~imgvec.backbones.registry.Backbone`) can be built for it,
    and is at most :data:`MAX_IMAGE_SIZE`."""
    if image_size < backbone.min_size:
        raise BadInputError(
            f"{param('image_size')} {image_size} is too small for {backbone.name} (at least {backbone.min_size})"
        )
    if image_size > MAX_IMAGE_SIZE:
        raise BadInputError(f"{param('image_size')} {image_size} is too large (at most {MAX_IMAGE_SIZE}; "
                            f"{backbone.name} was trained at {backbone.input_size})")
    return image_size


def check_threshold(threshold: float) -> float:
    """A cosine similarity threshold, between -1 and 1."""
    if not -1.0 <= threshold <= 1.0:
        raise BadInputError(f"threshold must be between -1 and 1, not {threshold}")
    return threshold


def check_per_class(classes: Sequence[Any], counts: Sequence[int], cv: int) -> None:
    """``cv`` folds of stratified cross-validation need at least ``cv`` labelled images in each class."""
    check_at_least("cv", cv, 2)
    small = [f"{str(c)!r} ({n})" for c, n in zip(classes, counts) if n < cv]
    if small:
        raise BadInputError(f"{param('cv')} {cv} needs at least {cv} images per class; too few in {', '.join(small)}")
