"""Rendering results for people and programs: rich tables, JSON and CSV.

Every renderer returns a string; nothing here prints. CSV text cells that a spreadsheet
would run as a formula (leading ``= + - @``) are prefixed with a quote; numbers are left as they are.

File names are any bytes a file system allows (Python holds bytes that are not UTF-8 as
lone surrogates, PEP 383). :func:`shown` makes a name safe to show: what could start a new
line, an escape sequence or reorder the text becomes visible as an escape (``\\x1b``, ``\\n``,
``\\xff`` for an undecodable byte), so a table, a CSV cell, an error line or a page shows the
name, never acts on it. JSON keeps names exact: the same characters are written as JSON's
own ``\\uXXXX`` escapes, an undecodable byte as ``\\udcXX`` (``os.fsencode(json.loads(...))``
gives the file's bytes back).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import asdict
from typing import Any, Iterable, Sequence

from imgvec.results import Table

FORMATS = ("table", "json", "csv")

# Control characters (C0, DEL, C1), line and paragraph separators, bidirectional overrides, surrogates;
# json.dumps escapes C0 itself (a raw newline in its text is its own indentation), the rest is left to us.
_UNSAFE_BEYOND_C0 = "\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff"
_UNSAFE = re.compile(f"[\x00-\x1f{_UNSAFE_BEYOND_C0}]")
_UNSAFE_IN_JSON = re.compile(f"[{_UNSAFE_BEYOND_C0}]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _visible(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that is not UTF-8, as os.fsdecode holds it: the byte itself
        return f"\\x{code - 0xDC00:02x}"
    return _NAMED.get(char) or (f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}")


def shown(text: Any) -> str:
    """``text`` safe to show on a terminal, in a CSV cell or a page: one line, no escape sequence, valid UTF-8.

    Control characters, line separators, bidirectional overrides and undecodable bytes become
    visible escapes (``\\x1b``, ``\\n``, ``\\u202e``, ``\\xff``); everything else is left as it is.
    """
    return _UNSAFE.sub(_visible, str(text))


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> str:
    """Numbers as they are; text that would start a spreadsheet formula gets a leading quote."""
    if isinstance(value, (int, float)):
        return f"{value:.6f}" if isinstance(value, float) else str(value)
    text = shown(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


def to_csv(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([csv_cell(h) for h in header])  # class names become column names: defused as well
    writer.writerows([csv_cell(v) for v in row] for row in rows)
    return out.getvalue()


def to_json(data: Any) -> str:
    """JSON text whose strings are exact (see the module's docstring) and safe to print: unsafe characters escaped.
    A number that is not finite (a figure that does not apply, such as a head's unknown C) is ``null``: JSON has
    no NaN or Infinity, and strict parsers refuse them."""
    try:
        text = json.dumps(data, indent=2, ensure_ascii=False, default=_jsonable, allow_nan=False)
    except ValueError:
        plain = json.loads(json.dumps(data, default=_jsonable))
        text = json.dumps(_finite_or_null(plain), indent=2, ensure_ascii=False, allow_nan=False)
    return _UNSAFE_IN_JSON.sub(lambda m: f"\\u{ord(m.group()):04x}", text)  # outside strings JSON is ASCII


def _finite_or_null(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_null(v) for v in value]
    return value


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "json_fields"):  # a record that leaves out what it does not hold (Provenance)
        return value.json_fields()
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
        t.add_row(*[escape(f"{v:.4f}" if isinstance(v, float) else shown(v)) for v in row])
    console = Console(file=io.StringIO(), width=200, color_system=None, force_terminal=False)
    if title:
        console.print(escape(shown(title)), soft_wrap=True)
    console.print(t)
    return console.file.getvalue()  # type: ignore[attr-defined]


def render(result: Table) -> str:
    """A result's :class:`~imgvec.results.Table` as text: its lines before, each section drawn by :func:`table`,
    its lines after (the one renderer of every CLI table)."""
    return ("".join(line + "\n" for line in result.head)
            + "".join(table(s.title, s.columns, s.rows, s.justify) for s in result.sections)
            + "".join(line + "\n" for line in result.tail))
