"""Glue between Snakemake and the library: logging to the rule's log file, a job's threads and its
OpenMP settings (torch's threads: `network.device`), and the problems of a run in one line each
(`run_problems`, for the Snakefile's onsuccess / onerror)."""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import re
import time
from pathlib import Path
from typing import Iterator, Mapping

import SimpleITK as sitk

log = logging.getLogger(__name__)

# Variables that size a library's thread pool: Snakemake sets the first six for each job; ANTs
# (through ITK) reads the last when it loads.
THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "GOTO_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS",
)
OPENMP_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def job_environment(openmp: Mapping[str, str]) -> None:
    """The OpenMP settings of every job (`threads.openmp` in the config), put into this process's
    environment where not set already, so that the jobs it starts inherit them: OpenMP reads them
    once, when it loads (with torch), which is before any of a job's own code runs. Called while
    the workflow plans; a job on a cluster plans again, so its process gets them too."""
    for name, value in openmp.items():
        os.environ.setdefault(name, str(value))


def limit_threads(threads: int) -> None:
    """Give this job's libraries exactly `threads` threads, the cores Snakemake granted: SimpleITK's
    global default (ITK would take every core), and the variables of THREAD_VARIABLES for what loads
    later (Snakemake already sets the OpenMP / BLAS ones for a job; a library loaded before this
    call has read them already). Logs the job's threads and OpenMP settings."""
    threads = max(1, int(threads))
    for name in THREAD_VARIABLES:
        os.environ[name] = str(threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    openmp = ", ".join(f"{name}={os.environ[name]}" for name in OPENMP_VARIABLES if name in os.environ)
    log.info("threads: %d (SimpleITK %d; OpenMP: %s)", threads, threads, openmp or "defaults")


@contextlib.contextmanager
def log_to(path: str | Path) -> Iterator[logging.Logger]:
    """Send logging, stdout and stderr (tracebacks included) to the rule's log file."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", buffering=1) as stream:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        try:
            with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
                try:
                    yield root
                except BaseException:
                    logging.getLogger("lungreg").exception("job failed")
                    raise
        finally:
            root.removeHandler(handler)


# ------------------------------------------------------------------ the run's problems

LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d+ (WARNING|ERROR|CRITICAL) [\w.]+: (.*)$")
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit)\b: (.+)$")
JOB_FAILED = "job failed"  # log_to's line before a traceback


def _problems_in_log(path: Path, since: float) -> list[str]:
    """WARNING and ERROR messages logged at or after `since` (epoch seconds); for a job that failed
    without logging an error of its own, its exception's message."""
    threshold = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(int(since)))
    lines = path.read_text(errors="replace").splitlines()
    found, failures = [], []
    for number, line in enumerate(lines):
        match = LOG_LINE.match(line)
        if not match or match.group(1) < threshold:
            continue
        if match.group(3) != JOB_FAILED:
            found.append((match.group(2), match.group(3)))
            continue
        exception = next((m.group(2) for m in map(EXCEPTION_LINE.match, lines[number + 1 :]) if m), "see the log")
        failures.append(f"job failed: {exception}")
    errors_logged = any(level != "WARNING" for level, _ in found)
    return [message for _, message in found] + ([] if errors_logged else failures)


def run_problems(log_folder: str | Path, since: float, qc_table: str | Path | None = None) -> list[str]:
    """One line per problem of the run that started at `since`: every problem row of `qc_table`
    (when this run wrote it) and every WARNING / ERROR a job logged under `log_folder` since then,
    each once, with where it comes from."""
    problems: dict[str, str] = {}
    qc = Path(qc_table) if qc_table else None
    if qc is not None and qc.is_file() and qc.stat().st_mtime >= since:
        with open(qc, newline="") as handle:
            for row in csv.DictReader(handle, delimiter="\t"):
                if row.get("problem") == "True":
                    problems.setdefault(qc_message(row), str(qc))
    folder = Path(log_folder)
    for path in sorted(folder.rglob("*.log")) if folder.is_dir() else []:
        if path.stat().st_mtime >= since:
            for message in _problems_in_log(path, since):
                problems.setdefault(message, str(path))
    return [f"{message} [{source}]" for message, source in problems.items()]


def qc_message(row: dict) -> str:
    """A problem row of qc.tsv in words (the same words the job logged)."""
    if row.get("method"):
        return f"{row['method']} {row['protocol']} {row['pair']}: {row['message']}"
    return f"subject {row['subject']}, {row['message']}"
