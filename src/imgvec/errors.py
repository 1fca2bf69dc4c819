"""imgvec's own exceptions: each carries a message a user can act on.

The CLI prints ``str(error)`` as one line and exits non-zero; library users catch
:class:`ImgvecError` (or one of its kinds) instead of parsing messages.
"""

from __future__ import annotations


class ImgvecError(Exception):
    """Base class for every error imgvec raises on purpose."""

    exit_code = 1


class BadInputError(ImgvecError):
    """A path, option or file the user gave cannot be used as given."""

    exit_code = 2


class MismatchError(ImgvecError):
    """Files made in different ways (backbone, weights, store rows) were used together."""

    exit_code = 3


class MissingWeightsError(ImgvecError):
    """Pretrained weights could not be found or fetched."""

    exit_code = 4


class ImageSkipped(ImgvecError):
    """One image could not be decoded; the run goes on without it."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason
