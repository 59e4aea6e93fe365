"""Compare the tables of two runs of the workflow, byte for byte, the timing columns aside.

    python bench/compare_tables.py RUN_A RUN_B        # e.g. /work/runs/before /work/runs/after
    python bench/compare_tables.py RUN_A RUN_B --rtol 1e-5 --atol 1e-12   # numbers within a tolerance

RUN_A and RUN_B are working folders of finished runs (each with results/tables/*.tsv). A table is
identical when its lines are, once the columns that vary from run to run are dropped
(lungreg.evaluate.TIMING_COLUMNS: seconds, seconds_per_pair, device, threads). With --rtol / --atol
a table that is not identical may still be "within tolerance": the same rows and columns, every
text cell equal, every number within atol + rtol * |a| (numpy.isclose); the line says its largest
difference. One line per table; the exit status is 0 when every table of either run is identical
(or within the tolerance) in the other.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

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


def within_tolerance(a: Path, b: Path, rtol: float, atol: float) -> str | None:
    """None when the tables differ beyond the tolerance (or in shape or text), else their largest
    numeric difference in words."""
    x, y = (
        pd.read_csv(p, sep="\t", keep_default_na=True).drop(columns=list(TIMING_COLUMNS), errors="ignore")
        for p in (a, b)
    )
    if list(x.columns) != list(y.columns) or len(x) != len(y):
        return None
    largest, where = 0.0, ""
    for column in x.columns:
        left, right = x[column], y[column]
        if left.dtype.kind in "fiu" and right.dtype.kind in "fiu":
            left, right = left.to_numpy(float), right.to_numpy(float)
            if not np.isclose(left, right, rtol=rtol, atol=atol, equal_nan=True).all():
                return None
            difference = np.nan_to_num(np.abs(left - right), nan=0.0)
            if difference.max(initial=0.0) > largest:
                largest, where = float(difference.max()), column
        elif not (left.isna() & right.isna() | (left.astype(str) == right.astype(str))).all():
            return None
    return f"within tolerance (largest difference {largest:.3g} in {where})" if where else "within tolerance"


def compare(run_a: Path, run_b: Path, rtol: float | None = None, atol: float = 0.0) -> dict[str, str]:
    """{table file name: identical | within tolerance ... | differs: ... | missing in ...} for every
    table of either run (the tolerance only with `rtol`)."""
    names = sorted({p.name for run in (run_a, run_b) for p in (run / TABLES).glob("*.tsv")})
    results = {}
    for name in names:
        a, b = run_a / TABLES / name, run_b / TABLES / name
        if not (a.is_file() and b.is_file()):
            results[name] = f"missing in {run_b if a.is_file() else run_a}"
            continue
        found = difference(without_timing(a), without_timing(b))
        close = within_tolerance(a, b, rtol, atol) if found is not None and rtol is not None else None
        results[name] = "identical" if found is None else close or f"differs: {found}"
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    parser.add_argument("--rtol", type=float, default=None, help="numbers may differ by atol + rtol * |a|")
    parser.add_argument("--atol", type=float, default=0.0)
    args = parser.parse_args()
    results = compare(args.run_a, args.run_b, args.rtol, args.atol)
    if not results:
        print(f"no tables under {args.run_a / TABLES} or {args.run_b / TABLES}")
        return 1
    for name, result in results.items():
        print(f"{name}\t{result}")
    dropped = ", ".join(TIMING_COLUMNS)
    close = sum(r.startswith("within tolerance") for r in results.values())
    tolerance = f", {close} within rtol {args.rtol} / atol {args.atol}" if args.rtol is not None else ""
    identical = sum(r == "identical" for r in results.values())
    print(f"{identical} of {len(results)} tables identical{tolerance} ({dropped} dropped)")
    return 0 if all(r == "identical" or r.startswith("within tolerance") for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
