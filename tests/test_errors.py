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


def test_bad_input_and_mismatch_are_value_errors_as_scikit_learn_callers_expect(tmp_path: Path):
    """A caller that catches ValueError (as around scikit-learn or numpy) catches imgvec's refusals too;
    the file layer's damage reports share one base, and a damaged file's line is not re-wrapped as HDF5's."""
    from imgvec.errors import MismatchError, first_line
    from imgvec.files.faissblob import MalformedBlob
    from imgvec.files.h5heap import MalformedHeap
    from imgvec.files.structure import damaged, reading
    from imgvec.vectors.index import search_store

    with pytest.raises(ValueError, match="k must be at least 1, not 0"):
        search_store(None, None, 0)  # type: ignore[arg-type]
    with pytest.raises(BadInputError) as caught, reading("f.h5", "store"):
        raise damaged("f.h5", "store", "what is wrong")
    assert str(caught.value).startswith("f.h5: damaged imgvec store file (what is wrong)")
    assert issubclass(MismatchError, ValueError) and issubclass(MalformedHeap, BadInputError)
    assert issubclass(MalformedBlob, BadInputError)
    assert first_line(RuntimeError("\nfirst\nsecond")) == "first" and first_line(KeyError()) == "KeyError"
    assert first_line(OSError(""), "said nothing") == "said nothing"
