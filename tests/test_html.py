"""HTML pages: self-contained, escaped, labelled with provenance; checked in headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import imgvec
from imgvec import html
from imgvec.cli import app

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
TRICKY = 'copy of <img src=x onerror=alert(1)> & "x".png'


@pytest.fixture(scope="module")
def gallery(tmp_path_factory, image_dir: Path, holdout_dir: Path, small) -> dict:
    root = tmp_path_factory.mktemp("html")
    folder = root / "photos"
    shutil.copytree(image_dir, folder)
    shutil.copy(folder / "reds" / "reds_000.png", folder / "reds" / TRICKY)
    store = root / "photos.h5"
    imgvec.embed([folder], store, **small)
    hits = imgvec.query(store, [folder / "reds" / TRICKY, holdout_dir / "blues"], k=4)
    page = imgvec.query_html(hits, root / "query.html", store)
    head = imgvec.train(store, root / "head.h5", cv=3).head
    preds = imgvec.predict(head, [holdout_dir])
    ppage = imgvec.predict_html(preds, root / "predict.html")
    return dict(root=root, store=store, hits=hits, page=page, head=head, preds=preds, ppage=ppage)


def test_query_page_is_self_contained_escaped_and_labelled(gallery):
    text = gallery["page"].read_text()
    hits = gallery["hits"]
    assert len(hits.queries) == 4
    assert text.count("data:image/jpeg;base64,") == 4 * 5  # each query and its 4 neighbours
    assert not re.search(r'(src|href)="(?!data:)', text), "nothing outside the page is referenced"
    assert "<script" not in text
    assert "<img src=x" not in text and "copy of &lt;img src=x onerror=alert(1)&gt; &amp; &quot;x&quot;.png" in text
    assert "RANDOM WEIGHTS" in text and "mobilenetv3small" in text and "64px" in text
    for q in hits.queries:
        for n in q.results:
            assert f"{n.score:.4f}" in text


def test_predict_page_shows_label_and_probabilities(gallery):
    text = gallery["ppage"].read_text()
    preds = gallery["preds"]
    assert text.count("data:image/jpeg;base64,") == len(preds.predictions) == 12
    for p in preds.predictions:
        best = max(p.probabilities.values())
        assert f"{html.esc(p.label)} {best:.3f}" in text
    assert "RANDOM WEIGHTS" in text


def test_unreadable_image_gets_a_placeholder(tmp_path: Path):
    bad = tmp_path / "gone.png"
    assert html.thumbnail(bad) is None
    assert "image not readable" in html._figure(str(bad), "x")
    Image.fromarray(np.zeros((300, 100, 3), np.uint8)).save(tmp_path / "tall.png")
    uri = html.thumbnail(tmp_path / "tall.png", size=160)
    assert uri and uri.startswith("data:image/jpeg;base64,")


def test_scatter_svg_is_well_formed():
    svg = html.scatter_svg([("a<b", 12.0, 0.8, 0.05), ("c", 300.0, 0.95, 0.01)], "speed", "accuracy")
    root = ET.fromstring(svg)
    assert len(root.findall("{http://www.w3.org/2000/svg}circle")) == 2
    assert "a&lt;b" in svg
    ET.fromstring(html.scatter_svg([("only", 5.0, 1.0, 0.0)], "x", "y"))  # one point, top accuracy


def test_cli_query_and_predict_write_html(gallery, holdout_dir: Path, tmp_path: Path):
    runner = CliRunner()
    out = tmp_path / "q.html"
    r = runner.invoke(app, ["query", str(gallery["store"]), str(holdout_dir / "reds"), "-k", "2", "-f", "json",
                            "--html", str(out)])
    assert r.exit_code == 0, r.stderr
    assert len(r.stdout) and r.stdout.lstrip().startswith("[")  # stdout stays clean JSON
    assert f"wrote {out}" in r.stderr and out.read_text().count("data:image/jpeg;base64,") == 3 * 3
    out = tmp_path / "p.html"
    r = runner.invoke(app, ["predict", str(gallery["head"]), str(holdout_dir), "--html", str(out)])
    assert r.exit_code == 0 and out.read_text().count("<figure") == 12


def _chromium(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp / 'profile'}",
           "--window-size=1200,900", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="headless check needs Debian's chromium package "
                                             "(.ci/run installs it: apt-get install -y chromium)")
def test_query_page_renders_in_headless_chromium(gallery, tmp_path: Path):
    page = gallery["page"]
    shot = tmp_path / "query.png"
    _chromium(f"--screenshot={shot}", page.resolve().as_uri(), tmp=tmp_path)
    assert shot.exists(), "chromium wrote no screenshot"
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (900, 1200)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 500, "the screenshot is blank"
    assert (np.abs(pixels.astype(int) - (179, 38, 30)).sum(axis=2) < 30).sum() > 5000, "no red RANDOM banner"
    shutil.copy(shot, gallery["root"] / "query-screenshot.png")  # kept in pytest's temp folder to look at
    dom = _chromium("--dump-dom", page.resolve().as_uri(), tmp=tmp_path).stdout
    assert dom.count("<img ") == 20, "only the thumbnails are elements; file names stay text"
    assert 'src="x"' not in dom and "copy of &lt;img src=x onerror=alert(1)&gt;" in dom
