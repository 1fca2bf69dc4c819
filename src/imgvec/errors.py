"""imgvec's own exceptions: each carries a message a user can act on.

The CLI prints ``str(error)`` as one line and exits non-zero; library users catch
:class:`ImgvecError` (or one of its kinds) instead of parsing messages.
"""

from __future__ import annotations

import difflib
import re
from typing import Iterable, Mapping

_PARAM = re.compile(r"\{param:([a-z0-9_]+)\}")


def param(name: str) -> str:
    """A parameter's name inside a message: ``name`` for Python callers, ``--name`` on the command line.

    The library names what went wrong by the API's parameter names and never by CLI flags; the
    CLI prints :meth:`ImgvecError.cli_message`, which turns each into its option.
    """
    return "{param:%s}" % name


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean X?)`` for the nearest of ``choices`` to a mistyped ``word``, else ``""``.

    The one place imgvec suggests names: backbones, runtimes, devices, formats.
    """
    close = difflib.get_close_matches(str(word).strip().lower(), list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def first_line(error: BaseException, default: str | None = None, limit: int | None = None) -> str:
    """The first line of ``error``'s message, cut to ``limit`` characters: what a one-line message quotes of
    another library's error (``default``, else the exception's type name, when it says nothing)."""
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else (type(error).__name__ if default is None else default)
    return text if limit is None else text[:limit]


class ImgvecError(Exception):
    """Base class for every error imgvec raises on purpose."""

    exit_code = 1

    def __str__(self) -> str:
        return _PARAM.sub(lambda m: m.group(1), super().__str__())

    def cli_message(self, options: Mapping[str, str] | None = None) -> str:
        """The message with parameters named as the command line's options.

        ``options`` maps a parameter to its option where that is not ``--name`` (``k`` -> ``-k``).
        """
        options = options or {}
        return _PARAM.sub(lambda m: options.get(m.group(1)) or "--" + m.group(1).replace("_", "-"),
                          super().__str__())


class BadInputError(ImgvecError, ValueError):
    """A path, option or file the user gave cannot be used as given (a ``ValueError``, as scikit-learn and
    numpy callers expect)."""

    exit_code = 2


class MismatchError(ImgvecError, ValueError):
    """Files made in different ways (backbone, weights, store rows) were used together (a ``ValueError`` too)."""

    exit_code = 3


class MissingWeightsError(ImgvecError):
    """Pretrained weights could not be found or fetched."""

    exit_code = 4


class FileNote(UserWarning):
    """Something left out of a file from elsewhere (a journal record dropped); the CLI prints one line."""


class ImageSkipped(ImgvecError):
    """One image could not be decoded; the run goes on without it."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class RuntimeNote(UserWarning):
    """Something a user should know about how the model runs (a fallback); the CLI prints one line."""
