"""Shared fixtures: small generated images and one small store, built once per session.

Tests use mobilenetv3small with random weights (seed 0) at 64 px: fast on two cores, and
colour classes stay separable even without ImageNet weights. Nothing is downloaded:
KERAS_HOME points at an empty folder and HTTP(S) goes to a closed local port. The
compiled-model cache (IMGVEC_CACHE_DIR) is a fresh temporary folder per session.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_KERAS_HOME = tempfile.mkdtemp(prefix="imgvec-keras-home-")
os.environ["KERAS_HOME"] = _KERAS_HOME
# Compiled OpenVINO models: one fresh cache per test session, shared by its subprocesses.
os.environ["IMGVEC_CACHE_DIR"] = tempfile.mkdtemp(prefix="imgvec-cache-")
os.environ["XDG_CONFIG_HOME"] = tempfile.mkdtemp(prefix="imgvec-config-")  # the cache's key, made per session
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
    os.environ[var] = "http://127.0.0.1:9"  # discard port: any download attempt fails at once
os.environ.pop("NO_PROXY", None)
os.environ.pop("no_proxy", None)

SMALL = dict(model="mobilenetv3small", weights="none", image_size=64)


@pytest.fixture(scope="session")
def small() -> dict:
    return dict(SMALL)


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from imgvec.synthetic import make_image_folder

    return make_image_folder(tmp_path_factory.mktemp("images") / "photos", per_class=6, size=64, seed=0)


@pytest.fixture(scope="session")
def holdout_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from imgvec.synthetic import make_image_folder

    return make_image_folder(tmp_path_factory.mktemp("holdout") / "photos", per_class=3, size=64, seed=1)


@pytest.fixture(scope="session")
def store_path(tmp_path_factory: pytest.TempPathFactory, image_dir: Path) -> Path:
    """A store of ``image_dir`` (24 labelled images); tests must not modify it."""
    import imgvec

    path = tmp_path_factory.mktemp("store") / "photos.h5"
    imgvec.embed([image_dir], path, **SMALL)
    return path
