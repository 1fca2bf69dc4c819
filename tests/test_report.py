from __future__ import annotations

import csv
import io
import json

from imgvec.pages.report import table as report_table, to_csv, to_json


def test_csv_defuses_formulas_and_keeps_odd_names_intact():
    text = to_csv(["path", "score"], [["=cmd|' /C calc'!A0.jpg", 0.5], ["a,b\"c.jpg", -1.0], ["@x.png", 1.0], ["-rf.png", 2]])
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[1] == ["'=cmd|' /C calc'!A0.jpg", "0.500000"]
    assert rows[2] == ['a,b"c.jpg', "-1.000000"]  # numbers stay numbers
    assert rows[3][0] == "'@x.png" and rows[4] == ["'-rf.png", "2"]


def test_csv_header_is_defused_too():
    """Class names become CSV column names (predict): a class named like a formula must not run."""
    rows = list(csv.reader(io.StringIO(to_csv(["path", "=cmd|' /C calc'!A0", "+x"], [["a.png", 0.5, 0.5]]))))
    assert rows[0] == ["path", "'=cmd|' /C calc'!A0", "'+x"]


def test_json_and_table_formats():
    data = [{"name": "<script>.jpg", "score": 0.25}]
    assert json.loads(to_json(data)) == data
    table = report_table(None, ["name", "score"], [("[bold]x[/bold].jpg", 0.25)])
    assert "[bold]x[/bold].jpg" in table and "0.2500" in table  # rich markup in names is shown, not applied


def test_plural():
    from imgvec.results import plural

    assert (plural(0, "group"), plural(1, "group"), plural(2, "group")) == ("0 groups", "1 group", "2 groups")


def test_pages_and_analyses_never_import_the_api():
    """One way down: cli -> api -> (comparison, duplicates, html, report, ...); nothing below imports the api."""
    import ast
    from pathlib import Path

    import imgvec

    src = Path(imgvec.__file__).parent
    for name in ("pages/html.py", "pages/report.py", "results.py", "analyses/comparison.py", "analyses/duplicates.py",
                 "embedding/ingest.py"):
        tree = ast.parse((src / name).read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                imported.add(node.module or "")
                imported.update(f"{node.module or ''}.{a.name}".lstrip(".") for a in node.names)
            elif isinstance(node, ast.Import):
                imported.update(a.name for a in node.names)
        assert not {m for m in imported if m.split(".")[-1] in ("api", "cli")
                    or m.startswith(("imgvec.api", "imgvec.cli"))}, name
