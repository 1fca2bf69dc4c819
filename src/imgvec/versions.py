"""Installed versions, read from package metadata without importing the packages.

imgvec's own version comes from here too (one source: pyproject.toml, as installed), so no module
needs to import the package ``__init__`` to learn it.
"""

from __future__ import annotations

from importlib import metadata


def dist_version(dist: str) -> str:
    """An installed distribution's version, without importing it ('' if absent)."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return ""


IMGVEC_VERSION = dist_version("imgvec") or "0+unknown"
