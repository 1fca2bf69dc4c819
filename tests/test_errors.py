"""Library errors name API parameters; the CLI names the same thing by its option."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

import imgvec
from imgvec.cli import app
from imgvec.errors import BadInputError


def test_the_library_names_parameters_and_the_cli_names_options(store_path: Path):
    with pytest.raises(BadInputError) as caught:
        imgvec.build_index(store_path, kind="nope", output=store_path.with_name("x.index.h5"))
    assert str(caught.value).startswith("kind 'nope': expected one of") and "--" not in str(caught.value)
    result = CliRunner().invoke(app, ["index", str(store_path), "--kind", "nope", "-o",
                                      str(store_path.with_name("x.index.h5"))])
    assert result.exit_code == 2 and result.stderr == "imgvec: error: --kind 'nope': expected one of auto, flat, hnsw, ivfpq\n"
