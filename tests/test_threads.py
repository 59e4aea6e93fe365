"""A job's threads: never more than Snakemake granted (torch's pools, SimpleITK, the thread variables),
and the workflow's OpenMP settings in the OpenMP runtime of every job (they must be in the job's
environment before torch loads). Each check runs in a fresh interpreter: these settings are per
process and some can be made only once."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import yaml
from workflow_runner import REPO, TINY

from lungreg.workflow import OPENMP_VARIABLES, THREAD_VARIABLES

SCHEMA = yaml.safe_load((REPO / "config" / "schemas" / "config.schema.yaml").read_text())
OPENMP_DEFAULT = SCHEMA["properties"]["threads"]["properties"]["openmp"]["default"]


def python(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in (*THREAD_VARIABLES, *OPENMP_VARIABLES)}
    return subprocess.run(
        [sys.executable, "-c", code], env={**clean, **(env or {})}, capture_output=True, text=True, check=True
    )


def test_set_threads_sizes_torch_simpleitk_and_the_thread_variables():
    code = """
import json, os
import SimpleITK as sitk
import torch
from lungreg.network.device import set_threads
from lungreg.workflow import THREAD_VARIABLES
before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
set_threads(1)
print(json.dumps({
    "before": before,
    "torch": torch.get_num_threads(),
    "interop": torch.get_num_interop_threads(),
    "simpleitk": sitk.ProcessObject.GetGlobalDefaultNumberOfThreads(),
    "variables": {name: os.environ[name] for name in THREAD_VARIABLES},
}))
"""
    found = json.loads(python(code).stdout.strip().splitlines()[-1])
    assert found["before"] == os.cpu_count()  # what ITK takes unless told: every core
    assert (found["torch"], found["interop"], found["simpleitk"]) == (1, 1, 1)
    assert set(found["variables"].values()) == {"1"}


def test_the_workflows_openmp_settings_reach_the_openmp_runtime_of_the_jobs_it_starts():
    """As the workflow does it: the planning process puts the settings into its environment
    (`job_environment`), a job started from it imports torch, and libgomp reports what it read."""
    job = "import torch; torch.set_num_threads(2); (torch.randn(200, 200) @ torch.randn(200, 200)).sum()"
    planner = f"""
import os, subprocess, sys
from lungreg.workflow import job_environment
job_environment({OPENMP_DEFAULT!r})
done = subprocess.run([sys.executable, "-c", {job!r}], env={{**os.environ, "OMP_DISPLAY_ENV": "VERBOSE"}},
                      capture_output=True, text=True, check=True)
print(done.stderr)
"""
    report = python(planner).stdout
    for name, value in OPENMP_DEFAULT.items():
        assert re.search(rf"^\s*{name} = '{value}'", report, re.MULTILINE), (name, report[-2000:])
    # a user's own setting wins over the workflow's default
    overridden = python(planner, env={"GOMP_SPINCOUNT": "77"}).stdout
    assert re.search(r"^\s*GOMP_SPINCOUNT = '77'", overridden, re.MULTILINE)


def test_every_job_of_the_study_ran_with_its_rules_threads_and_the_openmp_settings(tiny_study):
    """The tiny study's job logs: every job states its threads (the rule's: 1 everywhere in the tiny
    config), torch's pools where torch runs, and the workflow's OpenMP settings."""
    tiny = yaml.safe_load(TINY.read_text())
    granted = {tiny["threads"]["gpu_jobs"], tiny["threads"]["baselines"], 1}
    assert granted == {1}
    logs = sorted((tiny_study / "results" / "logs").rglob("*.log"))
    openmp = ", ".join(f"{name}={value}" for name, value in OPENMP_DEFAULT.items())
    assert logs
    for path in logs:
        text = path.read_text()
        lines = re.findall(r"threads: (\d+) \(SimpleITK (\d+); OpenMP: (.*)\)$", text, re.MULTILINE)
        assert lines, f"{path}: no threads line"
        assert all(t == s == "1" for t, s, _ in lines), path
        assert all(found == openmp for *_, found in lines), (path, lines)
        if any(part in path.parts for part in ("train", "register")):
            assert "torch threads: 1, inter-op 1" in text, path


def test_the_slurm_profile_leaves_each_jobs_cpus_to_its_threads():
    """sbatch --cpus-per-task comes from each rule's threads (the config's `threads:`, the same
    numbers as a local run) unless the profile overrides them: it must not."""
    profile = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    overrides = {"cpus_per_task", "cpus_per_gpu", "threads"}
    assert not overrides & set(profile.get("default-resources", {}))
    for rule, resources in profile.get("set-resources", {}).items():
        assert not overrides & set(resources), rule
    assert not {"set-threads", "max-threads", "cores"} & set(profile)
    from snakemake_executor_plugin_slurm.partitions import get_job_cpu_requirement

    class Job:  # what the plugin reads of a job
        threads = 2
        resources = {"gpu": 1}

    assert get_job_cpu_requirement(Job) == (2, "task")
