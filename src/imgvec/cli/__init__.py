"""The command line: typer commands (``commands``), their progress lines (``reporter``) and ``make demo``
(``demo``). Each command parses, calls one api function and renders its result.
"""

from imgvec.cli.commands import app, main

__all__ = ["app", "main"]
