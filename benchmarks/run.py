"""Run every benchmark, one after another, and rewrite the README's benchmark section.

    python -m benchmarks.run [--quick | --full] [--only embed,index] [--readme-only]

Each benchmark writes benchmarks/results/<name>.json (``<name>-quick.json`` with --quick).
The README section between ``<!-- bench:start -->`` and ``<!-- bench:end -->`` is rebuilt
from those files (full results preferred, quick ones otherwise); when README.md has no such
markers the section is printed and README.md is left alone.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any

from .common import RESULTS, ROOT

ORDER = ("embed", "index", "classifier", "query", "query_scale", "dedup", "scale")  # never two at once: each wants both cores
TITLES = {"embed": "Embedding", "index": "Search indexes", "classifier": "Classifier head", "query": "Query latency", "query_scale": "Query process against rows: mapped indexes", "dedup": "Near duplicates", "scale": "Past one CPU: Ray, streamed indexing, mixed precision"}
HAS_FULL = ("index", "query_scale", "scale")  # benchmarks with a 1M-row variant
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
README = ROOT.parent / "README.md"


def _load(name: str) -> dict[str, Any] | None:
    for fname in (f"{name}.json", f"{name}-quick.json"):
        path = RESULTS / fname
        if path.exists():
            return json.loads(path.read_text())
    return None


def section() -> str:
    parts = [START, "",
             "Measured with `python -m benchmarks.run` on the machine below. All models use **random "
             "weights** (`--weights none`): the numbers are about speed, not embedding quality.", ""]
    machine = None
    for name in ORDER:
        data = _load(name)
        if data is None:
            continue
        machine = machine or data.get("machine")
        mod = importlib.import_module(f"benchmarks.bench_{name}")
        quick = " (quick run)" if data.get("quick") else ""
        parts += [f"### {TITLES[name]}{quick}", "", mod.markdown(data).strip(), ""]
    if machine:
        v = machine.get("versions", {})
        parts += [f"_Machine: {machine.get('cpu')}, {machine.get('cores')} cores; Python {machine.get('python')}; "
                  + ", ".join(f"{k} {val}" for k, val in v.items()) + "._", ""]
    parts.append(END)
    return "\n".join(parts)


def update_readme(text: str) -> bool:
    if not README.exists():
        return False
    readme = README.read_text()
    if START not in readme or END not in readme:
        return False
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    README.write_text(head + text + tail)
    return True


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (minutes, not an hour)")
    ap.add_argument("--full", action="store_true", help="also the 1M-row index runs (a 5 GB store; an hour)")
    ap.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(ORDER)}")
    ap.add_argument("--readme-only", action="store_true", help="rebuild the README section from existing results")
    args = ap.parse_args(argv)
    if not args.readme_only:
        names = args.only.split(",") if args.only else list(ORDER)
        for name in names:
            print(f"## bench_{name}", file=sys.stderr)
            flags = ["--quick"] if args.quick else ["--full"] if args.full and name in HAS_FULL else []
            importlib.import_module(f"benchmarks.bench_{name}").main(flags)
    text = section()
    if update_readme(text):
        print(f"updated the benchmark section of {README}", file=sys.stderr)
    else:
        print(f"{README} has no {START} / {END} markers; the section would be:\n", file=sys.stderr)
        print(text)


if __name__ == "__main__":
    main()
