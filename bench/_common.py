"""Shared helpers of the benchmarks: machine description, load, result tables, child processes."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pandas as pd

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
# LUNGREG_BENCH_RESULTS: another folder for the tables (bench/gpu_check.sh writes into its output folder)
RESULTS = Path(os.environ.get("LUNGREG_BENCH_RESULTS") or BENCH / "results")


def load_average() -> float:
    """The 1-minute load average now (2 cores: above ~2 means the timings are contended)."""
    return round(os.getloadavg()[0], 2)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def vector_flags() -> str:
    """The CPU's AVX flags (AVX2-only machines run the same step 2-4x slower than AVX-512 ones)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return " ".join(sorted(f for f in line.split(":", 1)[1].split() if f.startswith("avx")))
    except OSError:
        pass
    return "unknown"


def machine() -> dict:
    """What a reader needs to judge the figures: CPU, cores, memory, GPU, versions, date, load."""
    import torch

    memory_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory_gb = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_flags": vector_flags(),
        "cores": os.cpu_count(),
        "memory_gb": memory_gb,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_1m": load_average(),
    }


def _merged(base: dict, overlay: dict) -> dict:
    """`overlay` over `base`, nested sections merged key by key (as Snakemake layers --configfile)."""
    merged = dict(base)
    for key, value in overlay.items():
        nested = isinstance(value, dict) and isinstance(base.get(key), dict)
        merged[key] = _merged(base[key], value) if nested else value
    return merged


def workflow_config(*overlays: str | Path) -> dict:
    """config/config.yaml, then each overlay file (e.g. config/paper.yaml), with the schema's
    defaults filled in: the configuration the workflow sees with those --configfile options."""
    import yaml
    from snakemake.utils import validate

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    for overlay in overlays:
        config = _merged(config, yaml.safe_load(Path(overlay).read_text()) or {})
    validate(config, str(REPO / "config" / "schemas" / "config.schema.yaml"))
    return config


def available_memory_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable"):
            return int(line.split()[1]) / 2**20
    return 0.0


def write_results(rows: list[dict], name: str, meta: dict) -> Path:
    """bench/results/NAME.tsv (one row per measurement) and NAME.json (the run's machine/date)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.tsv"
    frame = pd.DataFrame(rows)
    for column in frame.columns:  # counts stay integers even when a skipped row leaves them empty
        values = pd.to_numeric(frame[column], errors="coerce").dropna()
        if len(values) and frame[column].dtype.kind == "f" and (values == values.round()).all():
            frame[column] = frame[column].astype("Int64")
    frame.to_csv(path, sep="\t", index=False, float_format="%.4g")
    (RESULTS / f"{name}.json").write_text(json.dumps(meta, indent=2) + "\n")
    return path


def timed_runs(
    step: Callable[[], None], warmup: int, repeats: int, budget_s: float, sync: Callable[[], None] = lambda: None
) -> list[float]:
    """Wall seconds of `repeats` calls after `warmup` untimed ones, each synchronised; stops early
    (after at least one timed call) once the timed calls add up to `budget_s`."""
    for _ in range(warmup):
        step()
        sync()
    times: list[float] = []
    while len(times) < max(1, repeats):
        sync()
        started = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - started)
        if sum(times) >= budget_s:
            break
    return times


def summary(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "runs": len(times)}


def run_child(script: Path, config: dict, timeout_s: float) -> dict:
    """Run `script --child CONFIG_JSON` in a fresh interpreter; its last stdout line is a JSON
    result. A failure, a kill (out of memory) or a timeout gives {'status': 'skipped: ...'}."""
    command = [sys.executable, str(script), "--child", json.dumps(config)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"status": f"skipped: timed out after {timeout_s:.0f} s"}
    if done.returncode != 0:
        if done.returncode < 0:
            reason = f"killed by signal {-done.returncode}" + (" (out of memory?)" if done.returncode == -9 else "")
        else:
            lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
            reason = lines[-1][:200] if lines else f"exit status {done.returncode}"
        return {"status": f"skipped: {reason}"}
    lines = [line for line in done.stdout.strip().splitlines() if line.startswith("{")]
    if not lines:
        return {"status": "skipped: no result printed"}
    return json.loads(lines[-1])


def markdown(path: str | Path, columns: list[str] | None = None) -> str:
    """A results table as Markdown (for bench/README.md): python bench/_common.py results/NAME.tsv"""
    frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    frame = frame[columns] if columns else frame
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


if __name__ == "__main__":
    for name in sys.argv[1:]:
        print(markdown(name if Path(name).exists() else RESULTS / name), end="\n\n")


def files_under(folder: Path) -> int:
    """Files below `folder` (0 when it does not exist): what a run wrote."""
    return sum(1 for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0
