"""Run every benchmark, one after another, then regenerate the docs' tables from their results.

    python -m benchmarks.run [--quick | --full] [--only embed,index] [--readme-only]

Each benchmark writes benchmarks/results/<name>.json (``<name>-quick.json`` with --quick).
docs/performance.md's generated section is rebuilt from those files (full results preferred,
quick ones otherwise) by benchmarks/docs.py, which also keeps every other generated table fresh.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import docs

ORDER = docs.BENCH_ORDER  # never two at once: each wants both cores
HAS_FULL = ("index", "query_scale", "scale", "serve")  # benchmarks with a 1M-row variant


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (minutes, not an hour)")
    ap.add_argument("--full", action="store_true", help="also the 1M-row index runs (a 5 GB store; an hour)")
    ap.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(ORDER)}")
    ap.add_argument("--readme-only", action="store_true", help="only regenerate the docs from existing results")
    args = ap.parse_args(argv)
    if not args.readme_only:
        names = args.only.split(",") if args.only else list(ORDER)
        for name in names:
            print(f"## bench_{name}", file=sys.stderr)
            flags = ["--quick"] if args.quick else ["--full"] if args.full and name in HAS_FULL else []
            importlib.import_module(f"benchmarks.bench_{name}").main(flags)
            if name == "embed":  # and int8 against float32 (embed-int8.json), backbones of bench_embed.INT8_MODELS
                print("## bench_embed --int8", file=sys.stderr)
                importlib.import_module("benchmarks.bench_embed").main(["--int8", "default", *flags])
    for path in docs.write():
        print(f"rewrote {path.relative_to(docs.REPO)}", file=sys.stderr)


if __name__ == "__main__":
    main()
