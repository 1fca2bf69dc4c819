"""Rendering results for people and programs: rich tables, JSON and CSV.

Every renderer returns a string; nothing here prints. CSV text cells that a spreadsheet
would run as a formula (leading ``= + - @``) are prefixed with a quote; numbers are left as they are.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict
from typing import Any, Iterable, Sequence

FORMATS = ("table", "json", "csv")

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> str:
    """Numbers as they are; text that would start a spreadsheet formula gets a leading quote."""
    if isinstance(value, (int, float)):
        return f"{value:.6f}" if isinstance(value, float) else str(value)
    text = str(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


def plural(count: int, noun: str, many: str | None = None) -> str:
    """'1 group', '2 groups'; ``many`` for a noun that does not just take an s ('1 query', '2 queries')."""
    return f"{count} {noun if count == 1 else many or noun + 's'}"


def to_csv(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([csv_cell(h) for h in header])  # class names become column names: defused as well
    writer.writerows([csv_cell(v) for v in row] for row in rows)
    return out.getvalue()


def to_json(data: Any) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False, default=_jsonable)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    return str(value)


def table(title: str | None, header: Sequence[str], rows: Iterable[Sequence[Any]],
          justify: Sequence[str] | None = None) -> str:
    """A rich table rendered to plain text (no colour codes), as wide as its content."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    t = Table()
    for i, name in enumerate(header):
        t.add_column(name, justify=(justify[i] if justify else "left"), overflow="fold")  # type: ignore[arg-type]
    for row in rows:
        t.add_row(*[escape(f"{v:.4f}" if isinstance(v, float) else str(v)) for v in row])
    console = Console(file=io.StringIO(), width=200, color_system=None, force_terminal=False)
    if title:
        console.print(escape(title), soft_wrap=True)
    console.print(t)
    return console.file.getvalue()  # type: ignore[attr-defined]


def render(fmt: str, json_data: Any, header: Sequence[str], rows: Sequence[Sequence[Any]],
           title: str | None = None, justify: Sequence[str] | None = None) -> str:
    """One result in the format the user asked for."""
    if fmt == "json":
        return to_json(json_data)
    if fmt == "csv":
        return to_csv(header, rows)
    return table(title, header, rows, justify)
