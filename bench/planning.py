"""Snakemake's planning (dry-run DAG) time for the `cohort` protocol at 200 subjects (40 000 pairs).

    python bench/planning.py                   # chunks.cohort 16, 64 and 256: bench/results/planning.tsv
    python bench/planning.py --profile         # also cProfile the largest case (bench/results/planning_profile.txt)
    python bench/planning.py --quick           # 50 subjects, chunks 4 and 16 (bench/results/quick_planning.tsv)
    python bench/planning.py --workflow-ref d17d9fd --chunks 64 --out planning_before
                                               # the workflow files of a git revision (the library:
                                               # this checkout's)

The workflow (Snakefile, rules, scripts, config, envs, report, profiles) is copied into an empty
scratch folder, as a user's clone has it, and planned with

    snakemake -n --quiet rules --cores 2 --resources gpu=1 --configfile override.yaml

where override.yaml sets synthetic.n_subjects, inference.protocols [inhale_exhale,
all_combinations, cohort], inference.chunks.cohort and inference.save_fields none. The synthetic
cohort's subject list comes from the config (lungreg.synthetic.settings.subject_table draws ids and labels
only), so planning generates nothing: files_created counts what the dry run left under results/
(must be 0). jobs and register_network_jobs come from Snakemake's job-stats table: the job count
must grow with the chunks, never with the pairs. save_fields none declares no per-pair output:
the register rules' outputs are the chunk folder and two tables per chunk.
"""

from __future__ import annotations

import argparse
import io
import json
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPO, RESULTS, files_under, load_average, machine, write_results  # noqa: E402

WORKFLOW_FILES = ("Snakefile", "rules", "scripts", "config", "envs", "report", "profiles")


def copy_workflow(destination: Path, ref: str | None = None) -> Path:
    destination.mkdir(parents=True, exist_ok=True)
    if ref:
        names = [
            n
            for n in WORKFLOW_FILES
            if subprocess.run(["git", "cat-file", "-e", f"{ref}:{n}"], cwd=REPO).returncode == 0
        ]
        archive = subprocess.run(["git", "archive", ref, *names], cwd=REPO, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(destination)], input=archive, check=True)
        return destination
    for name in WORKFLOW_FILES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, destination / name, dirs_exist_ok=True)
        elif source.exists():
            shutil.copy2(source, destination / name)
    return destination


def override(n_subjects: int, chunks: int) -> dict:
    return {
        "synthetic": {"n_subjects": n_subjects, "n_ild": n_subjects // 2},
        "inference": {
            "protocols": ["inhale_exhale", "all_combinations", "cohort"],
            "chunks": {"inhale_exhale": 2, "all_combinations": 4, "cohort": chunks},
            "save_fields": "none",
        },
    }


def snakemake_command(configfile: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "snakemake",
        "-n",
        "--quiet",
        "rules",
        "--cores",
        "2",
        "--resources",
        "gpu=1",
        "--configfile",
        str(configfile),
    ]


def job_counts(output: str) -> dict[str, int]:
    """Snakemake's 'Job stats' table as {rule: count} (the first table printed)."""
    counts, inside = {}, False
    for line in output.splitlines():
        if line.startswith("Job stats"):
            if counts:
                break
            inside = True
            continue
        fields = line.split()
        if inside and len(fields) == 2 and fields[1].isdigit():
            counts[fields[0]] = int(fields[1])
        elif inside and counts and not line.strip():
            break
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subjects", type=int, default=200)
    parser.add_argument("--chunks", default="16,64,256", type=lambda s: [int(v) for v in s.split(",")])
    parser.add_argument("--repeats", type=int, default=3, help="dry runs per case (median reported)")
    parser.add_argument("--profile", action="store_true", help="cProfile one dry run of the largest case")
    parser.add_argument("--workflow-ref", default=None, help="plan the workflow files of this git revision")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.quick:
        args.subjects, args.chunks, args.repeats = 50, [4, 16], 1
    args.out = args.out or ("quick_planning" if args.quick else "planning")
    meta = {
        **machine(),
        "subjects": args.subjects,
        "workflow": args.workflow_ref or "working tree",
        "command": " ".join(sys.argv),
    }
    print(json.dumps(meta), flush=True)
    started = time.perf_counter()
    rows = []
    scratch = Path(tempfile.mkdtemp(prefix="lungreg-plan-"))
    try:
        workdir = copy_workflow(scratch / "workflow", args.workflow_ref)
        for chunks in args.chunks:
            configfile = workdir / f"override-{chunks}.yaml"
            configfile.write_text(yaml.safe_dump(override(args.subjects, chunks)))
            load, times, counts = load_average(), [], {}
            for _ in range(args.repeats):
                began = time.perf_counter()
                done = subprocess.run(snakemake_command(configfile), cwd=workdir, capture_output=True, text=True)
                times.append(time.perf_counter() - began)
                if done.returncode != 0:
                    raise SystemExit(f"dry run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
                counts = job_counts(done.stdout)
            pairs = args.subjects**2
            rows.append(
                {
                    "subjects": args.subjects,
                    "cohort_pairs": pairs,
                    "chunks_cohort": chunks,
                    "jobs": counts.get("total"),
                    "register_network_jobs": counts.get("register_network"),
                    "register_unregistered_jobs": counts.get("register_unregistered"),
                    "image_index_jobs": counts.get("image_index", 0),
                    "synthesize_subject_jobs": counts.get("synthesize_subject"),
                    "files_created": files_under(workdir / "results"),
                    "runs": len(times),
                    "plan_s_median": statistics.median(times),
                    "plan_s_min": min(times),
                    "load_1m_start": load,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
        if args.profile:
            configfile = workdir / f"override-{max(args.chunks)}.yaml"
            profile_path = scratch / "plan.prof"
            subprocess.run(
                [sys.executable, "-m", "cProfile", "-o", str(profile_path), *snakemake_command(configfile)[1:]],
                cwd=workdir,
                capture_output=True,
                text=True,
                check=True,
            )
            text = io.StringIO()
            pstats.Stats(str(profile_path), stream=text).sort_stats("cumulative").print_stats(40)
            RESULTS.mkdir(parents=True, exist_ok=True)
            (RESULTS / f"{args.out}_profile.txt").write_text(text.getvalue())
        meta.update({"load_1m_end": load_average(), "wall_s": round(time.perf_counter() - started)})
        print(f"wrote {write_results(rows, args.out, meta)}", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
