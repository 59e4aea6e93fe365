"""Compare the tables of two runs of the workflow, byte for byte, the timing columns aside.

    python bench/compare_tables.py RUN_A RUN_B        # e.g. /work/runs/before /work/runs/after

RUN_A and RUN_B are working folders of finished runs (each with results/tables/*.tsv). A table is
identical when its lines are, once the columns that vary from run to run are dropped
(lungreg.evaluate.TIMING_COLUMNS: seconds, seconds_per_pair, device, threads). One line per table;
the exit status is 0 when every table of either run is identical in the other.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lungreg.evaluate import TIMING_COLUMNS

TABLES = Path("results") / "tables"


def without_timing(path: Path) -> list[str]:
    """The table's lines, byte for byte, without the timing columns."""
    lines = path.read_bytes().decode().split("\n")
    header = lines[0].split("\t")
    keep = [i for i, column in enumerate(header) if column not in TIMING_COLUMNS]
    return [
        "\t".join(fields[i] for i in keep) if len(fields := line.split("\t")) == len(header) else line for line in lines
    ]


def difference(a: list[str], b: list[str]) -> str | None:
    """None when equal, else the first differing line and its differing columns."""
    if a == b:
        return None
    line = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    if line >= min(len(a), len(b)):
        return f"{len(a)} lines against {len(b)}"
    header, x, y = a[0].split("\t"), a[line].split("\t"), b[line].split("\t")
    columns = [header[i] for i in range(min(len(x), len(y), len(header))) if x[i] != y[i]]
    return f"line {line + 1} differs in column(s) {', '.join(columns) or '?'}"


def compare(run_a: Path, run_b: Path) -> dict[str, str]:
    """{table file name: identical | differs: ... | missing in ...} for every table of either run."""
    names = sorted({p.name for run in (run_a, run_b) for p in (run / TABLES).glob("*.tsv")})
    results = {}
    for name in names:
        a, b = run_a / TABLES / name, run_b / TABLES / name
        if not (a.is_file() and b.is_file()):
            results[name] = f"missing in {run_b if a.is_file() else run_a}"
            continue
        found = difference(without_timing(a), without_timing(b))
        results[name] = "identical" if found is None else f"differs: {found}"
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    args = parser.parse_args()
    results = compare(args.run_a, args.run_b)
    if not results:
        print(f"no tables under {args.run_a / TABLES} or {args.run_b / TABLES}")
        return 1
    for name, result in results.items():
        print(f"{name}\t{result}")
    dropped = ", ".join(TIMING_COLUMNS)
    print(f"{sum(r == 'identical' for r in results.values())} of {len(results)} tables identical ({dropped} dropped)")
    return 0 if all(r == "identical" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
