"""File names are any bytes a file system allows: stored exactly, shown safely everywhere.

A name may hold bytes that are not UTF-8, terminal escape sequences, a newline that would start
a forged ``imgvec: error:`` line. End to end through the CLI: the store keeps each name exactly,
JSON gives the exact bytes back, and tables, CSV, error lines and HTML pages show the names with
those characters made visible (``\\x1b``, ``\\n``, ``\\xff``), never acting on them, never crashing.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path

import pytest

from imgvec.vectors.store import open_store

from test_faults import SMALL, run_steps

# Stored image names (relative to the store's root) as bytes, each a copy of a real image.
BAD_UTF8 = b"reds/bad\xff.png"
ESCAPE = b"reds/esc\x1b[31mred.png"
NEWLINE = b"reds/nl\nimgvec: error: forged.png"
BIDI = "reds/gnp.\u202eexe.png".encode()
ESC_LABEL = b"es\x1bc"  # a class folder: its name is the label
BROKEN = b"reds/broken\x1b]0;pwned\x07.png"  # not an image: skipped, named in a warning


def _raw(text: str) -> bytes:
    """What a terminal would receive for ``text`` (names not UTF-8 as their own bytes)."""
    return text.encode("utf-8", "surrogateescape")


def _no_raw_controls(text: str) -> None:
    """Nothing in ``text`` can start an escape sequence, a forged line or reorder what follows."""
    assert not any(c in text for c in "\x1b\x07\x9b\u202e\r"), ascii(text)
    assert not any(0xD800 <= ord(c) <= 0xDFFF for c in text), ascii(text)
    assert not [line for line in text.splitlines() if line.startswith("imgvec: error: forged")], text


@pytest.fixture(scope="module")
def named(tmp_path_factory: pytest.TempPathFactory, image_dir: Path) -> Path:
    """A copy of ``image_dir`` with hostile names added (``es\\x1bc`` is a fifth class of three images)."""
    folder = tmp_path_factory.mktemp("names") / "photos"
    shutil.copytree(image_dir, folder)
    root = os.fsencode(folder)
    red = os.fsencode(image_dir / "reds" / "reds_000.png")
    for name in (BAD_UTF8, ESCAPE, NEWLINE, BIDI):
        shutil.copyfile(red, root + b"/" + name)
    os.mkdir(root + b"/" + ESC_LABEL)
    for i in range(3):
        shutil.copyfile(os.fsencode(image_dir / "blues" / f"blues_00{i}.png"), root + b"/" + ESC_LABEL + b"/%d.png" % i)
    with open(root + b"/" + BROKEN, "wb") as fh:
        fh.write(b"not an image")
    return folder


def test_names_are_stored_exactly_and_shown_safely_everywhere(named: Path, tmp_path: Path):
    store, head = tmp_path / "s.h5", tmp_path / "h.h5"
    query_page, predict_page = tmp_path / "q.html", tmp_path / "p.html"
    bad = os.fsdecode(os.fsencode(named) + b"/" + BAD_UTF8)
    steps = [
        ["embed", str(named), "-o", str(store), *SMALL],
        ["query", str(store), str(named / "reds"), "-k", "30", "-f", "json"],
        ["query", str(store), bad, "-k", "30"],
        ["query", str(store), bad, "-k", "30", "-f", "csv"],
        ["query", str(store), bad, "-k", "30", "--html", str(query_page)],
        ["train", str(store), "-o", str(head), "--cv", "2"],
        ["predict", str(head), str(named), "-f", "csv", "--html", str(predict_page)],
        ["predict", str(head), str(named)],
    ]
    embed, query_json, table, query_csv, query_html, train, predict_csv, predict_table = run_steps(steps)
    for r in (embed, query_json, table, query_csv, query_html, train, predict_csv, predict_table):
        assert r["code"] == 0, r
        _no_raw_controls(r["stdout"] + r["stderr"])

    # stored exactly: the store's keys are the file names, byte for byte
    with open_store(store) as s:
        keys = {_raw(k) for k in s.paths()}
        labels = set(s.labels())
    assert {BAD_UTF8, ESCAPE, NEWLINE, BIDI} <= keys and ESC_LABEL + b"/0.png" in keys
    assert os.fsdecode(ESC_LABEL) in labels
    # the skipped file is one warning line with its escapes visible
    assert "imgvec: warning: skipped reds/broken\\x1b]0;pwned\\x07.png: not a recognised image" in embed["stderr"]

    # JSON: valid, and exact: os.fsencode gives the bytes of every name back
    data = json.loads(query_json["stdout"])
    keys = {os.fsencode(os.path.relpath(n["path"], data["root"])) for q in data["queries"] for n in q["results"]}
    assert keys >= {BAD_UTF8, ESCAPE, NEWLINE, BIDI}  # paths that open: the store's root, then the name exactly
    assert os.fsencode(data["queries"][0]["query"]).startswith(os.fsencode(named))
    query_json["stdout"].encode("utf-8")  # no lone surrogate in the text itself

    # table and CSV: every name visible, one line each
    for visible in ("reds/bad\\xff.png", "reds/esc\\x1b[31mred.png", "reds/nl\\nimgvec: error: forged.png",
                    "reds/gnp.\\u202eexe.png", "es\\x1bc/0.png"):
        assert visible in table["stdout"], visible
    assert "query: " + str(named) + "/reds/bad\\xff.png" in table["stdout"]
    rows = list(csv.DictReader(io.StringIO(query_csv["stdout"])))
    assert {os.path.relpath(r["path"], named) for r in rows} >= {"reds/bad\\xff.png", "reds/esc\\x1b[31mred.png",
                                                                 "es\\x1bc/0.png"}
    assert {r["label"] for r in rows} >= {"reds", "es\\x1bc"}  # the escape made visible, not stripped
    predicted = list(csv.DictReader(io.StringIO(predict_csv["stdout"])))
    assert "es\\x1bc" in predicted[0] and any(r["true"] == "es\\x1bc" for r in predicted)
    assert "es\\x1bc" in predict_table["stdout"]

    # pages: written (not a UnicodeEncodeError), valid UTF-8, names visible and escaped
    for page in (query_page, predict_page):
        text = page.read_bytes().decode("utf-8")
        _no_raw_controls(text)
        assert "bad\\xff.png" in text and "esc\\x1b[31mred.png" in text and "nl\\nimgvec: error: forged.png" in text
    page = query_page.read_text()
    assert page.count("<figure") == page.count("data:image/jpeg;base64,") == 1 + 30  # every odd name has its image
    assert "imgvec: wrote" in query_html["stderr"]


def test_an_error_quoting_a_name_stays_one_line(named: Path, store_path: Path, tmp_path: Path):
    odd = os.fsencode(tmp_path) + b"/x\nimgvec: error: forged\x1b[2J.png"
    with open(odd, "wb") as fh:
        fh.write(b"not an image")
    [r] = run_steps([["query", str(store_path), os.fsdecode(odd)]])
    lines = r["stderr"].strip().splitlines()
    assert r["code"] == 2 and lines[-1].startswith("imgvec: error: no input image could be read"), r
    assert "x\\nimgvec: error: forged\\x1b[2J.png: not a recognised image" in lines[-1]
    _no_raw_controls(r["stderr"])


def test_shown_makes_every_unsafe_character_visible():
    from imgvec.pages.report import shown

    assert shown("a\x1b[31mb") == "a\\x1b[31mb"
    assert shown("a\nb\r\tc\x00\x7f\x9b") == "a\\nb\\r\\tc\\x00\\x7f\\x9b"
    assert shown(os.fsdecode(b"bad\xff\xfe")) == "bad\\xff\\xfe"
    assert shown("l\u2028r\u202eo\u2066") == "l\\u2028r\\u202eo\\u2066"
    assert shown("\ud800") == "\\ud800"  # a surrogate that is not an undecodable byte
    assert shown("été 日本 🙂 a\\b") == "été 日本 🙂 a\\b"  # everything else as it is
    assert shown(Path("x\x1b")) == "x\\x1b"


def test_json_is_exact_and_csv_is_visible():
    from imgvec.pages.report import to_csv, to_json

    names = [os.fsdecode(b"bad\xff.png"), "esc\x1b.png", "nl\n.png", "c1\x9b.png", "rlo\u202e.png", "été.png"]
    text = to_json({"paths": names})
    assert json.loads(text) == {"paths": names}
    assert [os.fsencode(n) for n in json.loads(text)["paths"]][0] == b"bad\xff.png"
    text.encode("utf-8")  # valid UTF-8: the lone surrogate is written as the escape \udcff
    assert "\\udcff" in text and "\\u009b" in text and "\\u202e" in text and "été" in text
    rows = list(csv.reader(io.StringIO(to_csv(["path"], [[n] for n in names]))))
    assert [r[0] for r in rows[1:]] == ["bad\\xff.png", "esc\\x1b.png", "nl\\n.png", "c1\\x9b.png", "rlo\\u202e.png",
                                        "été.png"]
