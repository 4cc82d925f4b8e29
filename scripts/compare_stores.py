"""Compare two run directories' result stores row by row (every column but timings and the
attack's parameter JSON, which gains keys as attacks gain options): the check that a redesign
did not change behaviour. Prints the keys only one side has and, per column, how many rows
differ and the largest relative difference of float columns.

    python scripts/compare_stores.py RUN_A RUN_B [--ignore col ...]
"""

from __future__ import annotations

import argparse
import math

from crossres.store import ResultStore

IGNORED = ("seconds", "params")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_a")
    p.add_argument("run_b")
    p.add_argument("--ignore", nargs="*", default=[], help="more columns to skip")
    args = p.parse_args(argv)
    a = {r.key: r for r in ResultStore(args.run_a).rows()}
    b = {r.key: r for r in ResultStore(args.run_b).rows()}
    skip = set(IGNORED) | set(args.ignore)
    print(
        f"rows: {len(a)} vs {len(b)}; only in A: {len(a.keys() - b.keys())}, "
        f"only in B: {len(b.keys() - a.keys())}"
    )
    differing: dict[str, int] = {}
    worst: dict[str, float] = {}
    for key in a.keys() & b.keys():
        x, y = a[key], b[key]
        for name in x.__dataclass_fields__:
            if name in skip or name not in y.__dataclass_fields__:
                continue
            u, v = getattr(x, name), getattr(y, name)
            if isinstance(u, float) and isinstance(v, float):
                if math.isnan(u) and math.isnan(v):
                    continue
                rel = abs(u - v) / max(abs(u), 1e-12)
                worst[name] = max(worst.get(name, 0.0), rel)
                same = rel == 0.0
            else:
                same = u == v
            if not same:
                differing[name] = differing.get(name, 0) + 1
    print("columns with differing rows:", differing or "none")
    print("largest relative float difference:", {k: f"{v:.1e}" for k, v in worst.items()})
    return 0 if not differing and a.keys() == b.keys() else 1


if __name__ == "__main__":
    raise SystemExit(main())
