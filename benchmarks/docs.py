"""Every table of figures in README.md and docs/ is generated here, from one source each.

    python -m benchmarks.docs            # rewrite the generated sections (``make docs``)
    python -m benchmarks.docs --check    # exit 1 naming each stale section (``make test`` runs this check)

A generated section sits between ``<!-- generated:NAME -->`` and ``<!-- end:NAME -->``; NAME is
one of :data:`SECTIONS`: ``backbones`` (the registry, imgvec.backbones.registry: the same figures as
``imgvec models``), ``performance`` (the committed benchmarks/results/*.json, through each
benchmark's own ``markdown``), ``quality`` (benchmarks/results/quality.json: pretrained against random
weights, the one benchmark not about speed), ``cli`` (the typer app's commands and options), ``layers``
(docs/design.md: pyproject.toml's import-linter contracts and each package's docstring).
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable

from .common import RESULTS, ROOT

REPO = ROOT.parent
FILES = ("README.md", "docs/*.md")
MARKER = re.compile(r"(<!-- generated:([a-z-]+) -->\n)(.*?)(<!-- end:\2 -->)", re.S)

BENCH_ORDER = ("embed", "index", "classifier", "query", "query_scale", "dedup", "inspect", "scale", "serve", "quality")
QUALITY = "quality"  # its own section (pretrained weights), not part of ``performance`` (random weights)
BENCH_TITLES = {"embed": "Embedding", "index": "Search indexes", "classifier": "Classifier head",
                "query_scale": "Query process against rows: mapped indexes",
                "query": "Query latency", "dedup": "Near duplicates",
                "inspect": "imgvec inspect: planted label noise and outliers; 100k rows",
                "scale": "Past one CPU: Ray, streamed indexing, mixed precision",
                "serve": "imgvec serve under load"}


def _cell(value: Any) -> str:
    return "" if value is None else str(value)


def backbones() -> str:
    """The registry as a table: what ``imgvec models`` prints, with Keras' published figures."""
    from imgvec.backbones.registry import BACKBONES
    from imgvec.results import MODEL_COLUMNS, model_cell

    rows = ["| name | keras.applications | input | dim | params | preprocess_input | ImageNet top-1 | top-5 | "
            "size (MB) | depth | images/s |",
            "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for b in BACKBONES.values():
        pre = b.preprocessing.split(":")[0]
        cell = {c: model_cell(c, getattr(b, c)) for c in MODEL_COLUMNS if c != "weights_offline"}  # as `imgvec models` prints them
        rows.append(f"| {b.name} | {b.constructor} | {cell['input_size']} | {cell['dim']} | {cell['params']} | "
                    f"{b.module}: {pre} | {cell['top1']} | {cell['top5']} | {cell['size_mb']} | {cell['depth']} | "
                    f"{cell['images_per_second']} |")
    return "\n".join(rows) + "\n"


def _load(name: str) -> dict[str, Any] | None:
    for fname in (f"{name}.json", f"{name}-quick.json"):
        path = RESULTS / fname
        if path.exists():
            return json.loads(path.read_text())
    return None


def performance() -> str:
    """Every committed benchmark result, each rendered by its own benchmark's ``markdown``."""
    parts = ["Measured with `make bench` (`python -m benchmarks.run`); each section says when, at which commit and "
             "on which machine (results from different machines are not compared with each other). The "
             "speed figures use **random weights** (`--weights none`): they are about speed, not embedding "
             "quality. imgvec inspect's planted label noise and outliers are embedded with the weights its "
             "section names (pretrained by default).", ""]
    machine = None
    for name in BENCH_ORDER:
        data = _load(name) if name != QUALITY else None
        if data is None:
            continue
        machine = machine or data.get("machine")
        module = importlib.import_module(f"benchmarks.bench_{name}")
        quick = " (quick run)" if data.get("quick") else ""
        parts += [f"### {BENCH_TITLES[name]}{quick}", "", module.markdown(data).strip(), "", measured(data), ""]
        int8 = _load("embed-int8") if name == "embed" else None
        if int8 is not None:  # bench_embed --int8: its own results file, rendered after the embed section
            quick = " (quick run)" if int8.get("quick") else ""
            parts += [f"### int8 against float32{quick}", "", module.markdown_int8(int8).strip(), "", measured(int8), ""]
    if machine:
        versions = ", ".join(f"{k} {v}" for k, v in machine.get("versions", {}).items())
        parts += [f"_Versions (first section's run): Python {machine.get('python')}; {versions}._", ""]
    return "\n".join(parts)


def measured(data: dict[str, Any]) -> str:
    """One line under a section: when, at which commit, on which machine, and what ran beside it."""
    m = data.get("machine") or {}
    beside = f"; beside it: {data['beside']}" if data.get("beside") else ""
    return (f"_Measured {data.get('date', '?')} at commit {data.get('commit', '?')} on {m.get('cpu', '?')}, "
            f"{m.get('cores', '?')} cores{beside}._")


def quality() -> str:
    """Precision@10 of finding a photo's augmented copies: pretrained efficientnetlite0 against random weights."""
    data = _load(QUALITY)
    if data is None:
        return "_Not measured yet: `python -m benchmarks.bench_quality`._\n"
    from . import bench_quality

    quick = " (quick run)" if data.get("quick") else ""
    return f"Measured with `python -m benchmarks.bench_quality`{quick} ({data.get('date')}).\n\n" + bench_quality.markdown(data)


def cli() -> str:
    """Each command of the typer app: its usage, what it does, and a table of its arguments and options."""
    import typer.main

    from imgvec.cli import app

    group = typer.main.get_command(app)
    out = []
    for name, command in group.commands.items():
        ctx = group.make_context("imgvec", [name, "--help"], resilient_parsing=True)
        usage = " ".join(command.collect_usage_pieces(ctx))
        out += [f"### `imgvec {name}`", "", (command.help or "").strip().replace("\n", " "), "",
                "```", f"imgvec {name} {usage}", "```", "",
                "| argument or option | value | default | meaning |", "|---|---|---|---|"]
        for p in command.params:
            if p.name == "help":
                continue
            option = p.param_type_name == "option"
            flag = option and p.is_flag
            names = ", ".join(f"`{o}`" for o in [*p.opts, *p.secondary_opts]) if option else f"`{p.name.upper()}`"
            value = "" if flag or not option else p.display_type(ctx).strip("<>")
            default = "" if p.required or p.default in (None, "") or (flag and not p.secondary_opts) else p.default
            if flag and p.secondary_opts:
                default = p.opts[0] if p.default else p.secondary_opts[0]
            meaning = (getattr(p, "help", None) or "").replace("|", "\\|").replace("\n", " ")
            required = " (required)" if p.required else ""
            out.append(f"| {names} | {value} | {_cell(default)} | {meaning}{required} |")
        out.append("")
    return "\n".join(out)


def _docstring(name: str) -> str:
    """The first paragraph of ``imgvec.<name>``'s docstring (a package's ``__init__``), read without importing it."""
    import ast

    src = REPO / "src" / "imgvec"
    path = src / name / "__init__.py" if (src / name).is_dir() else src / f"{name}.py"
    doc = " ".join((ast.get_docstring(ast.parse(path.read_text())) or "").split("\n\n")[0].split())
    doc = re.sub(r":[a-z]+:`~?([^`]+)`", r"`\1`", doc).replace("``", "`")  # reST roles and literals -> Markdown
    return doc.replace("|", "\\|")


def _modules(name: str, inner: dict[str, list[str]]) -> tuple[str, str]:
    """How ``imgvec.<name>`` is shown (a package with a slash), and its modules in their contract's order
    (a package without a layers contract: its modules by name)."""
    folder = REPO / "src" / "imgvec" / name
    if not folder.is_dir():
        return f"`{name}`", ""
    if name in inner:
        return f"`{name}/`", _layers_of(inner[name])
    return f"`{name}/`", ", ".join(f"`{p.stem}`" for p in sorted(folder.glob("*.py")) if p.stem != "__init__")


def _layers_of(layers: list[str]) -> str:
    """A layers contract's order in words: ``a -> b, c -> d`` (a comma: independent of each other)."""
    return " -> ".join(", ".join(f"`{m.strip()}`" for m in layer.split("|")) for layer in layers)


def layers() -> str:
    """The packages and modules in the order of pyproject.toml's import-linter contracts, each with what its
    docstring says it holds: the layers as the contracts (run by tests/test_layers.py) enforce them."""
    import tomllib

    contracts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    top = next(c for c in contracts if c["type"] == "layers" and c["containers"] == ["imgvec"])
    inner = {c["containers"][0].removeprefix("imgvec."): c["layers"] for c in contracts
             if c["type"] == "layers" and c["containers"] != ["imgvec"]}
    out = ["| layer | package or module | holds | its modules (each imports only those after it) |",
           "|---|---|---|---|"]
    for i, layer in enumerate(top["layers"], 1):
        for name in (n.strip() for n in layer.split("|")):
            shown, modules = _modules(name, inner)
            out.append(f"| {i} | {shown} | {_docstring(name)} | {modules} |")
    out += ["", "Beside the stack (the layers contract leaves them out; the contracts below hold them):", "",
            "| package or module | holds | its modules |", "|---|---|---|"]
    for name in top.get("exhaustive_ignores", []):
        shown, modules = _modules(name, inner)
        out.append(f"| {shown} | {_docstring(name)} | {modules} |")
    out += ["", "| contract | rule |", "|---|---|"]
    for c in contracts:
        if c["type"] == "forbidden":
            how = "directly (through the api is how it works)" if c.get("allow_indirect_imports") else "at all"
            rule = (f"{', '.join(f'`{m}`' for m in c['source_modules'])} never import "
                    f"{', '.join(f'`{m}`' for m in c['forbidden_modules'])} {how}")
        elif c["type"] == "independence":
            rule = f"{', '.join(f'`{m}`' for m in c['modules'])} import none of each other"
        else:
            continue
        out.append(f"| {c['name']} | {rule} |")
    return "\n".join(out)


SECTIONS: dict[str, Callable[[], str]] = {"backbones": backbones, "performance": performance, "quality": quality,
                                          "cli": cli, "layers": layers}


def doc_files() -> list[Path]:
    files: list[Path] = []
    for pattern in FILES:
        files += sorted(REPO.glob(pattern))
    return files


def render(text: str) -> str:
    """``text`` with every generated section rebuilt from its source."""
    cache: dict[str, str] = {}

    def fill(m: re.Match[str]) -> str:
        name = m.group(2)
        if name not in SECTIONS:
            raise SystemExit(f"unknown generated section {name!r}; known: {', '.join(SECTIONS)}")
        if name not in cache:
            cache[name] = SECTIONS[name]().rstrip("\n") + "\n"
        return f"{m.group(1)}{cache[name]}{m.group(4)}"

    return MARKER.sub(fill, text)


def _changed() -> list[tuple[Path, str, str]]:
    """(file, its text, the text with fresh sections) for every file a source has moved away from."""
    texts = [(path, path.read_text()) for path in doc_files()]
    return [(path, text, fresh) for path, text in texts if (fresh := render(text)) != text]


def stale() -> list[str]:
    """``file: section`` for every generated section that differs from what its source gives now."""
    found = []
    for path, text, fresh in _changed():
        old = {m.group(2): m.group(3) for m in MARKER.finditer(text)}
        new = {m.group(2): m.group(3) for m in MARKER.finditer(fresh)}
        found += [f"{path.relative_to(REPO)}: {name}" for name in old if old[name] != new.get(name)]
    return found


def write() -> list[Path]:
    """Rewrite every stale file; returns those changed."""
    changed = _changed()
    for path, _, fresh in changed:
        path.write_text(fresh)
    return [path for path, _, _ in changed]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only say which generated sections are stale (exit 1)")
    args = ap.parse_args(argv)
    if args.check:
        old = stale()
        for line in old:
            print(f"stale: {line} (run `make docs`)", file=sys.stderr)
        sys.exit(1 if old else 0)
    for path in write():
        print(f"rewrote {path.relative_to(REPO)}", file=sys.stderr)


if __name__ == "__main__":
    main()
