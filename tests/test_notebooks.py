"""The notebooks in notebooks/ run top to bottom on small generated images with random weights.

They are executed with nbclient in a fresh kernel, the way CI does, with the notebooks' own
environment switch (IMGVEC_NOTEBOOK_*) selecting random weights, 64 px and small backbones.
The committed files must carry no outputs, so what is in the repository is never stale.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from imgvec.synthetic import CLASSES

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
nbformat = pytest.importorskip("nbformat", reason="notebook tests need the dev extra (nbformat, nbclient, ipykernel)")
nbclient = pytest.importorskip("nbclient", reason="notebook tests need the dev extra (nbclient, ipykernel)")


def test_three_notebooks_committed_without_outputs():
    assert [p.name for p in NOTEBOOKS] == ["01_search_a_folder.ipynb", "02_classify.ipynb",
                                           "03_compare_backbones.ipynb"]
    for path in NOTEBOOKS:
        book = nbformat.read(path, as_version=4)
        nbformat.validate(book)
        for cell in book.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{path.name} has stored outputs"
                assert "!imgvec" not in cell.source and "subprocess" not in cell.source, "use the Python API"


def _run(path: Path, tmp_path: Path, monkeypatch) -> "nbformat.NotebookNode":
    env = {"IMGVEC_NOTEBOOK_WEIGHTS": "none", "IMGVEC_NOTEBOOK_IMAGE_SIZE": "64",
           "IMGVEC_NOTEBOOK_MODEL": "mobilenetv3small", "IMGVEC_NOTEBOOK_MODELS": "mobilenetv3small,mobilenetv2",
           "IMGVEC_NOTEBOOK_WORK": str(tmp_path / "work"), "TF_CPP_MIN_LOG_LEVEL": "2"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)  # the kernel inherits this process's environment
    book = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(book, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    return book


def _text(book) -> str:
    out = []
    for cell in book.cells:
        for o in cell.get("outputs", []):
            out.append(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")))
    return "\n".join(out)


def _images(book) -> int:
    return sum("image/png" in o.get("data", {}) for c in book.cells for o in c.get("outputs", []))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_on_generated_data_with_random_weights(path: Path, tmp_path: Path, monkeypatch):
    book = _run(path, tmp_path, monkeypatch)
    text = _text(book)
    assert "RANDOM weights" in text
    assert _images(book) == 1, "each notebook draws one figure"
    work = tmp_path / "work"
    if path.name.startswith("01"):
        assert text.count("   5. ") == 4  # four queries, five neighbours each
        assert (work / "search" / "query.html").stat().st_size > 10_000
        assert "exact [('blues/blues_000.png', 1.0), ('blues/copy_of_blues_000.png', 1.0)]" in text
    elif path.name.startswith("02"):
        assert "held-out accuracy" in text
        page = (work / "classify" / "predictions.html").read_text()
        assert page.count("<img") >= 1 and all(c in page for c in CLASSES)  # thumbnails and every label
    else:
        assert "mobilenetv3small" in text and "mobilenetv2" in text
        page = (work / "compare" / "compare.html").read_text()
        assert "mobilenetv3small" in page and "mobilenetv2" in page and "<svg" in page  # both rows and the plot
        assert sorted(p.name for p in (work / "compare" / "stores").glob("*.h5")) == ["mobilenetv2.h5",
                                                                                    "mobilenetv3small.h5"]
