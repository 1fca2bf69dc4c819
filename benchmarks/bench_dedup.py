"""Near-duplicate search: `imgvec dedup` on a generated 100k-row store, inverted lists against exhaustive.

The store holds clustered 576-d vectors (MobileNetV3Small's size) with planted near-duplicate
groups: 1,000 originals with 1-3 copies each, perturbed to cosine about 0.98 with their
original. Both searches run through ``imgvec.dedup`` (files are not hashed: there are none).
Planted recall counts the copies that land in their original's group; "same groups" compares
the approximate search's groups with the exhaustive one's.

    python -m benchmarks.bench_dedup [--quick] [--rows N]
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np

from .common import OUT, generated_store, md_table, timed, write_result

NAME = "dedup"
DIM = 576
ORIGINALS = 1000


def make_store(rows: int) -> tuple[Any, dict[int, int]]:
    """The store, and for every planted copy the row of its original."""
    rng = np.random.default_rng(0)
    latent = 64
    centres = rng.standard_normal((500, latent), dtype=np.float32)
    proj = rng.standard_normal((latent, DIM), dtype=np.float32) / np.sqrt(latent)
    base = centres[rng.integers(0, 500, rows)] + rng.uniform(0.5, 1.0, (rows, 1)) * rng.standard_normal(
        (rows, latent), dtype=np.float32)
    x = np.maximum(base @ proj + 0.3 * rng.standard_normal((rows, DIM), dtype=np.float32), 0).astype(np.float32)
    originals = rng.choice(rows // 2, ORIGINALS, replace=False)
    copy_rows = iter(rng.permutation(np.arange(rows // 2, rows)))
    planted: dict[int, int] = {}
    for o in originals:
        for _ in range(rng.integers(1, 4)):
            c = int(next(copy_rows))
            noise = rng.standard_normal(DIM).astype(np.float32)
            x[c] = x[o] + 0.2 * np.linalg.norm(x[o]) / np.sqrt(DIM) * noise
            planted[c] = int(o)
    path = generated_store(OUT / f"dedup-{rows}x{DIM}.h5", rows, DIM, lambda start, n: x[start : start + n])
    return path, planted


def _grouping(result: Any) -> dict[str, frozenset[str]]:
    return {m.path: frozenset(k.path for k in g.members) for g in result.groups for m in g.members}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="30k rows")
    ap.add_argument("--rows", type=int, default=None)
    args = ap.parse_args(argv)
    import imgvec

    rows = args.rows or (30_000 if args.quick else 100_000)
    store, planted = make_store(rows)
    out = []
    groupings = {}
    for label, exact in (("inverted lists (default above 20,000 rows)", False), ("exhaustive (--exact)", True)):
        seconds, result = timed(lambda: imgvec.dedup(store, threshold=0.95, check_files=False, exact=exact))
        grouping = groupings[exact] = _grouping(result)
        found = sum(f"img_{o:07d}.jpg" in grouping.get(f"img_{c:07d}.jpg", ()) for c, o in planted.items())
        out.append({"search": label, "method": result.method, "seconds": seconds, "groups": len(result.groups),
                    "planted_recall": found / len(planted)})
        print(f"  {label}: {seconds:.1f}s, {len(result.groups)} groups, planted recall {out[-1]['planted_recall']:.4f}",
              file=sys.stderr)
    same = groupings[False] == groupings[True]
    data = {"quick": args.quick, "rows": rows, "dim": DIM, "planted_copies": len(planted), "threshold": 0.95,
            "same_groups": same, "searches": out}
    write_result(NAME + ("-quick" if args.quick else ""), data)
    print(markdown(data))
    return data


def markdown(data: dict[str, Any]) -> str:
    head = (f"`imgvec dedup --threshold {data['threshold']}` over {data['rows']:,} generated {data['dim']}-d rows "
            f"with {data['planted_copies']:,} planted near-copies (cosine ~0.98 to their original), 2 cores:\n\n")
    table = md_table(["search", "seconds", "groups", "planted copies found"],
                     [(s["search"], s["seconds"], s["groups"], f"{s['planted_recall']:.4f}") for s in data["searches"]])
    return head + table + (f"\nBoth searches return the same groups: {'yes' if data['same_groups'] else 'no'}.\n")


if __name__ == "__main__":
    main()
