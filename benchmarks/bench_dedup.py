"""Near-duplicate search: `imgvec dedup` on a generated 100k-row store, inverted lists against exhaustive,
and on 2,000 near-identical vectors (every pair above the threshold), with the peak memory of each.

The store holds clustered 576-d vectors (MobileNetV3Small's size) with planted near-duplicate
groups: 1,000 originals with 1-3 copies each, perturbed to cosine about 0.98 with their
original. Both searches run through ``imgvec.dedup`` (files are not hashed: there are none).
Planted recall counts the copies that land in their original's group; "same groups" compares
the approximate search's groups with the exhaustive one's. The degenerate case is what random
weights give: 2,000 vectors within cosine 0.99 of each other, so all 1,999,000 pairs pass.
Each search runs in a fresh process, whose peak RSS (VmHWM) is reported.

    python -m benchmarks.bench_dedup [--quick] [--rows N]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .common import CHILD_PEAK_RSS, OUT, generated_store, md_table, write_result

NAME = "dedup"
DIM = 576
ORIGINALS = 1000
NEAR_ROWS = 2000

# Run in a fresh process: one dedup, then its peak RSS and groups as JSON. The peak is VmHWM,
# which starts afresh at exec (ru_maxrss would carry over the parent's peak).
_CHILD = CHILD_PEAK_RSS + """
r = imgvec.dedup(sys.argv[1], threshold=0.95, check_files=False, exact=json.loads(sys.argv[2]))
seconds = time.perf_counter() - start
json.dump({"seconds": seconds, "method": r.method, "degenerate": r.degenerate, "share_above": r.share_above,
           "peak_rss_mb": peak_rss_mb(),
           "groups": [[m.path for m in g.members] for g in r.groups]}, open(sys.argv[3], "w"))
"""


def dedup_in_child(store: Path, exact: bool | None) -> dict[str, Any]:
    """``imgvec.dedup`` in a fresh interpreter: seconds, method, peak RSS (MB), groups."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        subprocess.run([sys.executable, "-c", _CHILD, str(store), json.dumps(exact), str(out)], check=True)
        return json.loads(out.read_text())


def make_near_identical_store() -> Path:
    """2,000 vectors within cosine 0.99 of one another: what a backbone with random weights gives."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(DIM).astype(np.float32) + 0.01 * rng.standard_normal((NEAR_ROWS, DIM)).astype(np.float32)
    return generated_store(OUT / f"dedup-near-identical-{NEAR_ROWS}x{DIM}.h5", NEAR_ROWS, DIM,
                           lambda start, n: x[start : start + n])


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


def _grouping(groups: list[list[str]]) -> dict[str, frozenset[str]]:
    return {path: frozenset(g) for g in groups for path in g}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="30k rows")
    ap.add_argument("--rows", type=int, default=None)
    args = ap.parse_args(argv)

    rows = args.rows or (30_000 if args.quick else 100_000)
    store, planted = make_store(rows)
    out = []
    groupings = {}
    for label, exact in (("inverted lists (default above 20,000 rows)", False), ("exhaustive (--exact)", True)):
        result = dedup_in_child(store, exact)
        grouping = groupings[exact] = _grouping(result["groups"])
        found = sum(f"img_{o:07d}.jpg" in grouping.get(f"img_{c:07d}.jpg", ()) for c, o in planted.items())
        out.append({"search": label, "method": result["method"], "seconds": result["seconds"],
                    "groups": len(result["groups"]), "planted_recall": found / len(planted),
                    "peak_rss_mb": result["peak_rss_mb"]})
        print(f"  {label}: {result['seconds']:.1f}s, {len(result['groups'])} groups, planted recall "
              f"{out[-1]['planted_recall']:.4f}, peak RSS {result['peak_rss_mb']:.0f} MB", file=sys.stderr)
    near = dedup_in_child(make_near_identical_store(), None)
    degenerate = {"rows": NEAR_ROWS, "seconds": near["seconds"], "groups": [len(g) for g in near["groups"]],
                  "degenerate": near["degenerate"], "share_above": near["share_above"],
                  "peak_rss_mb": near["peak_rss_mb"]}
    print(f"  {NEAR_ROWS} near-identical: {near['seconds']:.1f}s, groups {degenerate['groups']}, "
          f"peak RSS {near['peak_rss_mb']:.0f} MB", file=sys.stderr)
    same = groupings[False] == groupings[True]
    data = {"quick": args.quick, "rows": rows, "dim": DIM, "planted_copies": len(planted), "threshold": 0.95,
            "same_groups": same, "searches": out, "near_identical": degenerate}
    write_result(NAME + ("-quick" if args.quick else ""), data)
    print(markdown(data))
    return data


def markdown(data: dict[str, Any]) -> str:
    head = (f"`imgvec dedup --threshold {data['threshold']}` over {data['rows']:,} generated {data['dim']}-d rows "
            f"with {data['planted_copies']:,} planted near-copies (cosine ~0.98 to their original), 2 cores; "
            "peak RSS of a fresh process:\n\n")
    table = md_table(["search", "seconds", "groups", "planted copies found", "peak RSS (MB)"],
                     [(s["search"], s["seconds"], s["groups"], f"{s['planted_recall']:.4f}", f"{s['peak_rss_mb']:.0f}")
                      for s in data["searches"]])
    near = data["near_identical"]
    return (head + table + f"\nBoth searches return the same groups: {'yes' if data['same_groups'] else 'no'}.\n"
            f"\n{near['rows']:,} near-identical vectors (every pair above the threshold): {near['seconds']:.1f}s, "
            f"groups of {', '.join(map(str, near['groups']))}, degenerate: {'yes' if near['degenerate'] else 'no'} "
            f"(~{near['share_above']:.0%} of pairs above), peak RSS {near['peak_rss_mb']:.0f} MB.\n")


if __name__ == "__main__":
    main()
