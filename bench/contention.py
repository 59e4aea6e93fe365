"""The whole study quiet and beside one unrelated single-thread CPU load: how much a busy core slows it.

    python bench/contention.py                                  # the default study, quiet then loaded (2 x ~10 min)
    python bench/contention.py --ref 3575d5f --out contention_before        # the same with a git revision's
                                                                # workflow and library (before a change)
    python bench/contention.py --configfile tests/config/tiny.yaml --out quick_contention   # checks the script

Each condition runs the study from scratch in its own copy of the workflow (`snakemake --cores all
--resources gpu=1`, plus --configfile), the `loaded` one beside `python -c "while True: pass"`
started a second before and stopped after (same priority, pinned to no core). Rows: the
condition, wall seconds, the summed seconds of every rule's jobs (Snakemake's benchmark files), the
training's median epoch seconds at each resolution (its log), and on the last row the ratios
loaded / quiet. The two runs' tables must be identical (timing columns aside): the load changes
speed, never results; `tables_identical` says whether they were (bench/compare_tables.py).
With --keep DIR the runs' folders stay (DIR/quiet, DIR/loaded) for bench/compare_tables.py.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pandas as pd  # noqa: E402
from _common import REPO, load_average, machine, write_results  # noqa: E402
from compare_tables import compare  # noqa: E402
from planning import copy_workflow  # noqa: E402

BUSY_LOOP = "while True: pass"


def prepare(folder: Path, ref: str | None) -> dict:
    """A copy of the workflow (of `ref`, with its library on PYTHONPATH; else the working tree's)."""
    copy_workflow(folder, ref)
    if not ref:
        return {}
    archive = subprocess.run(["git", "archive", ref, "src"], cwd=REPO, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    return {"PYTHONPATH": str(folder / "src")}


def run_study(folder: Path, env: dict, configfiles: list[str], loaded: bool, timeout_s: float) -> dict:
    command = [sys.executable, "-m", "snakemake", "--cores", "all", "--resources", "gpu=1"]
    if configfiles:
        command += ["--configfile", *[str(Path(c).resolve()) for c in configfiles]]
    busy = subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) if loaded else None
    try:
        if busy:
            time.sleep(1.0)
        load, started = load_average(), time.perf_counter()
        done = subprocess.run(
            command,
            cwd=folder,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        wall = time.perf_counter() - started
    finally:
        if busy:
            busy.kill()
            busy.wait()
    (folder / "snakemake.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"the study failed in {folder}: see {folder / 'snakemake.log'}")
    return {"wall_s": wall, "load_1m_start": load, **rule_seconds(folder / "results"), **epoch_seconds(folder)}


def rule_seconds(results: Path) -> dict:
    """Seconds summed over each rule's jobs, from Snakemake's benchmark files (results/benchmarks/RULE/...)."""
    totals: dict[str, float] = {}
    for path in sorted((results / "benchmarks").rglob("*.tsv")):
        rule = path.relative_to(results / "benchmarks").parts[0].removesuffix(".tsv")
        totals[f"{rule}_s"] = totals.get(f"{rule}_s", 0.0) + float(pd.read_csv(path, sep="\t")["s"].iloc[0])
    return totals


def epoch_seconds(folder: Path) -> dict:
    """The training's median epoch seconds per resolution (results/model/*/training_log.tsv)."""
    found = {}
    for path in sorted((folder / "results" / "model").glob("*/training_log.tsv")):
        log = pd.read_csv(path, sep="\t")
        for resolution, group in log.groupby("resolution"):
            found[f"epoch_{path.parent.name}_{resolution}_s"] = float(group["seconds"].median())
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configfile", action="append", default=[], help="layered over config/config.yaml")
    parser.add_argument("--ref", default=None, help="the workflow and library of this git revision")
    parser.add_argument("--conditions", default="quiet,loaded", help="quiet, loaded, or both (in that order)")
    parser.add_argument("--timeout-s", type=float, default=3600.0, help="per study")
    parser.add_argument("--keep", type=Path, default=None, help="keep the runs' folders here")
    parser.add_argument("--out", default="contention")
    args = parser.parse_args()
    meta = {**machine(), "ref": args.ref or "working tree", "command": " ".join(sys.argv)}
    print(json.dumps(meta), flush=True)
    scratch = args.keep or Path(tempfile.mkdtemp(prefix="lungreg-contention-"))
    rows, folders = [], {}
    try:
        for condition in args.conditions.split(","):
            folder = scratch / condition
            shutil.rmtree(folder, ignore_errors=True)
            env = prepare(folder, args.ref)
            row = {"condition": condition, "ref": meta["ref"]}
            row.update(run_study(folder, env, args.configfile, condition == "loaded", args.timeout_s))
            rows.append(row)
            folders[condition] = folder
            print(json.dumps(row), flush=True)
        if {"quiet", "loaded"} <= set(folders):
            quiet, loaded = rows[0], rows[1]
            timed = [k for k, v in quiet.items() if k.endswith("_s") and isinstance(v, float) and v and k in loaded]
            ratio = {k: loaded[k] / quiet[k] for k in timed}
            found = compare(folders["quiet"], folders["loaded"])
            identical = bool(found) and all(v == "identical" for v in found.values())
            rows.append({"condition": "loaded_over_quiet", "ref": meta["ref"], **ratio, "tables_identical": identical})
            print(json.dumps(rows[-1]), flush=True)
        meta["load_1m_end"] = load_average()
        print(f"wrote {write_results(rows, args.out, meta)}", flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
