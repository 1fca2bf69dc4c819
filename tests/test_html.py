"""HTML pages: self-contained, escaped, labelled with provenance; checked in headless Chromium."""

from __future__ import annotations

import json

import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import imgvec
from imgvec.pages import html
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
    assert "<img src=x" not in text and "copy of &lt;img src=x onerror=alert(1)&gt; &amp; &#34;x&#34;.png" in text
    assert "RANDOM WEIGHTS" in text and "mobilenetv3small" in text and "64px" in text
    for q in hits.queries:
        for n in q.results:
            assert f"{n.score:.4f}" in text


def test_predict_page_shows_truth_right_wrong_accuracy_and_the_head(gallery):
    text = gallery["ppage"].read_text()
    preds = gallery["preds"]
    assert text.count("data:image/jpeg;base64,") == len(preds.predictions) == 12
    for p in preds.predictions:
        best = max(p.probabilities.values())
        assert f"{p.label} {best:.3f}" in text and p.truth == Path(p.path).parent.name
    right = sum(p.label == p.truth for p in preds.predictions)
    assert f"Accuracy {right / 12:.3f}: {right} of 12 images in class folders predicted right" in text
    assert text.count("true: ") == 12 and text.count("right ✓") == right and text.count("wrong ✗") == 12 - right
    assert f"C={preds.C:.4g}, cross-validated accuracy {preds.cv_accuracy:.3f}" in text
    assert "4 classes (blues, greens, reds, yellows)" in text and "RANDOM WEIGHTS" in text


def test_unreadable_image_gets_a_placeholder(tmp_path: Path):
    bad = tmp_path / "gone.png"
    assert html.thumbnail(bad) is None
    assert "image not readable" in html.render("query.html", title="t", provenances=[], subtitle=[], skipped=[],
                                               queries=[dict(name="q", columns=1, cards=[html.card(str(bad), head="q", label="")])])
    Image.fromarray(np.zeros((300, 100, 3), np.uint8)).save(tmp_path / "tall.png")
    uri = html.thumbnail(tmp_path / "tall.png", size=160)
    assert uri and uri.startswith("data:image/jpeg;base64,")


def test_thumbnail_never_opens_a_fifo_or_a_device(tmp_path: Path):
    """A stored image replaced by a FIFO or a link to /dev/zero shows as missing instead of hanging the page."""
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    code = ("import sys; from imgvec.pages import html; "
            "print([html.thumbnail(p) for p in sys.argv[1:]])")
    out = subprocess.run([sys.executable, "-c", code, str(fifo), str(tmp_path / "zero.png")], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[None, None]", out.stderr


def test_scatter_svg_is_well_formed_with_round_ticks():
    svg = html.scatter_svg([("a<b", 12.0, 0.8, 0.05), ("c", 300.0, 0.95, 0.01)], "speed", "accuracy",
                           lines=[("chance", 0.25)])
    root = ET.fromstring(svg)
    assert len(root.findall("{http://www.w3.org/2000/svg}circle")) == 2
    assert "a&lt;b" in svg
    ET.fromstring(html.scatter_svg([("only", 5.0, 1.0, 0.0)], "x", "y"))  # one point, top accuracy
    for points in ([("a", 41.3, 0.613, 0.04), ("b", 55.7, 0.672, 0.02)], [("a", 3.3, 0.573, 0.1)],
                   [("a", 12.0, 0.8, 0.05), ("c", 300.0, 0.95, 0.01)]):
        root = ET.fromstring(html.scatter_svg(points, "x", "y"))
        ticks = {cls: [float(t.text) for t in root.iter("{http://www.w3.org/2000/svg}text") if t.get("class") == cls]
                 for cls in ("xtick", "ytick")}
        assert len(ticks["xtick"]) >= 2 and len(ticks["ytick"]) >= 3, ticks
        for value in ticks["xtick"] + ticks["ytick"]:  # 1, 2, 2.5 or 5 times a power of ten, times an integer
            mantissa = f"{value:.2e}".split("e")[0]
            assert mantissa.rstrip("0").rstrip(".") in {str(m) for m in range(1, 10)} | {"2.5", "7.5", "1.5", "1.2",
                                                                                          "3.5", "4.5", "5.5", "6.5",
                                                                                          "8.5", "9.5"}, ticks
        steps = np.diff(ticks["ytick"])
        assert np.allclose(steps, steps[0]) and round(steps[0], 6) in {0.01, 0.02, 0.025, 0.05, 0.1, 0.2, 0.25}, ticks


# -- every page escapes every value ---------------------------------------------------------
EVIL = '<script>alert(1)</script>"><img src=x onerror=alert(2)>'


def _forged() -> dict:
    """Result objects whose every text field (provenance attributes included) carries markup."""
    from imgvec.files.provenance import Provenance
    from imgvec.results import (BackboneScore, Chance, Comparison, DedupResult, DuplicateGroup, Evaluation, Member,
                                Neighbour, Prediction, Predictions, QueryResult, QueryResults, chance_levels)

    prov = Provenance(EVIL, "random", 0, EVIL, EVIL, EVIL, EVIL, EVIL, resize=EVIL, device=EVIL, precision=EVIL,
                      imgvec_version=EVIL, keras_version=EVIL, tensorflow_version=EVIL, runtime=EVIL, runtime_version=EVIL,
                      created=EVIL)
    labels = [EVIL, "b"]
    report = {EVIL: {"precision": 1.0, "recall": 1.0, "f1-score": 1.0, "support": 2},
              "b": {"precision": 0.0, "recall": 0.0, "f1-score": 0.0, "support": 1}}
    confusion = np.array([[2, 0], [1, 0]])
    path = f"{EVIL}/{EVIL}.png"
    return dict(
        query=html.query_page(QueryResults(prov, [QueryResult(path, [Neighbour(1, path, 0.5, EVIL)])],
                                           [(path, EVIL)], EVIL), lambda p: p, EVIL),
        predict=html.predict_page(Predictions(prov, labels, [Prediction(path, EVIL, {EVIL: 0.9, "b": 0.1}, EVIL)],
                                              [(path, EVIL)], Path(EVIL), 1.0, 0.5, 0.1)),
        evaluate=html.evaluation_page(Evaluation(Path(EVIL), EVIL, prov, labels, labels, 3, 2 / 3, report, confusion,
                                                 {}, 0, chance=chance_levels([EVIL, EVIL, "b"]))),
        compare=html.compare_page(Comparison(EVIL, labels, 3, 2, 0, [
            BackboneScore(EVIL, 1, 2, 3.0, 0.5, 0.1, [0.5], report, confusion, Path(EVIL), prov, 0)], EVIL, 1.0,
            [Chance("majority_class", 0.6, 0.0)], 3)),
        dedup=html.dedup_page(DedupResult(Path(EVIL), prov, 0.9, 3, [
            DuplicateGroup("exact", [Member(path, 1.0), Member(path + "2", 1.0)], EVIL),
            DuplicateGroup("near", [Member(path, 1.0), Member(EVIL, 0.95)])], 1, [EVIL], 0.1), lambda p: p),
    )


@pytest.mark.parametrize("page", ["query", "predict", "evaluate", "compare", "dedup"])
def test_every_value_reaches_every_page_escaped(page):
    text = _forged()[page]
    assert "<script" not in text and "<img src=x" not in text and '"><img' not in text
    assert "&lt;script&gt;alert(1)&lt;/" in text  # shown, as text
    assert text.count("<img") == 0  # no readable image here: every thumbnail is the placeholder
    if page == "compare":
        ET.fromstring(text[text.index("<svg"):text.index("</svg>") + 6])  # the plot stays well-formed XML


def test_templates_ship_with_the_package():
    """Every template the pages render exists, compiles, and is matched by the package-data globs."""
    import fnmatch
    import re
    import tomllib
    from importlib.resources import files

    folder = files("imgvec.pages").joinpath("templates")
    shipped = {p.name for p in folder.iterdir()}
    env = html.environment()
    for name in shipped:
        env.get_template(name)  # parses: a syntax error in any template fails here
    source = Path(html.__file__).read_text()
    rendered = set(re.findall(r"(?:_page|render)\(\"([\w.]+)\"", source))
    assert len(rendered) >= 6 and rendered <= shipped, rendered - shipped
    config = tomllib.loads(Path(__file__).parents[1].joinpath("pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["imgvec.pages"]
    assert all(any(fnmatch.fnmatch(f"templates/{name}", g) for g in globs) for name in shipped)


def test_cli_query_and_predict_write_html(gallery, holdout_dir: Path, tmp_path: Path):
    runner = CliRunner()
    out = tmp_path / "q.html"
    r = runner.invoke(app, ["query", str(gallery["store"]), str(holdout_dir / "reds"), "-k", "2", "-f", "json",
                            "--html", str(out)])
    assert r.exit_code == 0, r.stderr
    assert len(json.loads(r.stdout)["queries"]) == 3  # stdout stays clean JSON
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


_LAYOUT_SCRIPT = """<script>
document.body.setAttribute('data-layout', JSON.stringify([...document.querySelectorAll('main .grid')].map(
  g => [...g.querySelectorAll('figure')].map(f => { const r = f.getBoundingClientRect();
    return [Math.round(r.top), Math.round(r.height), Math.round(r.right)]; }))));
</script></body>"""


@pytest.mark.skipif(CHROMIUM is None, reason="headless check needs Debian's chromium package "
                                             "(.ci/run installs it: apt-get install -y chromium)")
@pytest.mark.parametrize("width", [1280, 1920])
def test_query_cards_share_one_row_and_one_height(gallery, tmp_path: Path, width: int):
    """k=10: the query and its ten neighbours sit on one row, all the same height, inside the window."""
    import json

    hits = imgvec.query(gallery["store"], [gallery["root"] / "photos" / "reds"], k=10)
    page = imgvec.query_html(hits, tmp_path / "q.html", gallery["store"])
    probe = tmp_path / "probe.html"  # the page itself has no script: a copy measures its layout
    probe.write_text(page.read_text().replace("</body>", _LAYOUT_SCRIPT))
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           f"--user-data-dir={tmp_path / 'profile'}", f"--window-size={width},900", "--dump-dom", probe.as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    layout = json.loads(html_unescape(re.search(r'data-layout="([^"]*)"', dom).group(1)))
    assert len(layout) == 7
    for row in layout:
        assert len(row) == 11
        assert len({top for top, _, _ in row}) == 1, f"cards wrap onto a second row at {width}px: {row}"
        assert len({h for _, h, _ in row}) == 1, f"cards of one query differ in height: {row}"
        assert max(right for _, _, right in row) <= width
    if width == 1280:
        _chromium(f"--screenshot={gallery['root'] / 'query-k10.png'}", page.resolve().as_uri(), tmp=tmp_path)


def html_unescape(text: str) -> str:
    import html as std_html

    return std_html.unescape(text)
