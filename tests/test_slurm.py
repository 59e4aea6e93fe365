"""The tiny study through `--profile profiles/slurm` on a real one-node SLURM.

tests/slurm/start-local-slurm.sh installs slurm-wlm and munge (apt-get, as root) and starts a
one-node cluster on this machine (its CPUs, one fake GPU generic resource, no accounting
database); the module's fixture stops it again. Skipped, with the reason, when that is not
possible (not root, no apt-get, packages not installable, daemons not coming up) or when
LUNGREG_SLURM_SKIP is set. Not part of the default run (pyproject: -m "not slurm"):

    python -m pytest -m slurm -rs tests/test_slurm.py
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml
from workflow_runner import REPO, TINY, copy_workflow, job_counts, workflow_rules

from lungreg.evaluate import TIMING_COLUMNS

pytestmark = pytest.mark.slurm

SCRIPTS = REPO / "tests" / "slurm"
# The profile's lines a user changes (marked CHANGE in profiles/slurm/config.yaml)
ACCOUNT_PLACEHOLDER = '"my_account"'
PARTITION_PLACEHOLDERS = ('"my_partition"', '"my_gpu_partition"')
TEST_ACCOUNT = "lungreg"  # without an accounting database SLURM accepts any account name
# the plugin's line for every submitted job (snakemake-executor-plugin-slurm 2.8)
SUBMITTED = re.compile(r"^Job (\d+) has been submitted with SLURM jobid (\d+) \(log: (.+)\)\.$", re.M)


def unavailable_reason() -> str | None:
    """Why this machine cannot run the local SLURM, or None when it can try."""
    if os.environ.get("LUNGREG_SLURM_SKIP"):
        return f"LUNGREG_SLURM_SKIP={os.environ['LUNGREG_SLURM_SKIP']} is set"
    if os.geteuid() != 0:
        return "not root (the local SLURM needs root to install slurm-wlm and munge and to start its daemons)"
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        return "SLURM is not installed and there is no apt-get to install slurm-wlm and munge"
    return None


def point_profile_at(profile: Path, account: str, partition: str) -> None:
    """Edit the profile's CHANGE lines as a user would: account and (CPU and GPU) partitions."""
    text = profile.read_text()
    for placeholder, value in ((ACCOUNT_PLACEHOLDER, account), *((p, partition) for p in PARTITION_PLACEHOLDERS)):
        assert placeholder in text, f"{profile} lost its placeholder {placeholder}"
        text = text.replace(placeholder, f'"{value}"')
    profile.write_text(text)


def local_rules(workdir: Path) -> set[str]:
    """Rules Snakemake runs itself instead of submitting: `all`, `localrules` and `localrule: True`."""
    return {name for name, rule in workflow_rules(workdir).items() if rule["local"]}


def workflow_gpu_rules(workdir: Path) -> set[str]:
    """Rules with `resources: gpu=...` (their own or through `use rule ... with:`)."""
    return {name for name, rule in workflow_rules(workdir).items() if rule["gpu"]}


def profile_gpu_rules(profile: Path) -> set[str]:
    settings = yaml.safe_load(profile.read_text())
    return {rule for rule, resources in settings.get("set-resources", {}).items() if resources.get("gpu")}


def rule_of(logfile: Path) -> str:
    """The rule of a submission: the plugin logs to .snakemake/slurm_logs/rule_<rule>/..."""
    return next(part.removeprefix("rule_") for part in logfile.parts if part.startswith("rule_"))


def slurm(*command: str) -> str:
    return subprocess.run(command, capture_output=True, text=True, check=True, timeout=60).stdout


@pytest.fixture(scope="module")
def local_slurm():
    """A running one-node SLURM: {account, partition}; stopped after the module."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"SLURM integration test skipped: {reason}")
    try:
        started = subprocess.run(
            ["bash", str(SCRIPTS / "start-local-slurm.sh")], capture_output=True, text=True, timeout=900
        )
    except subprocess.TimeoutExpired:
        subprocess.run(["bash", str(SCRIPTS / "stop-local-slurm.sh")], capture_output=True, timeout=120)
        pytest.skip("SLURM integration test skipped: start-local-slurm.sh took longer than 15 minutes")
    if started.returncode != 0:
        subprocess.run(["bash", str(SCRIPTS / "stop-local-slurm.sh")], capture_output=True, timeout=120)
        what = {
            3: "slurm-wlm/munge could not be installed",
            4: "SLURM did not come up",
            5: "this machine has a SLURM configuration of its own",
        }.get(started.returncode, "start failed")
        pytest.skip(
            f"SLURM integration test skipped: {what} (start-local-slurm.sh exit {started.returncode}): "
            f"{(started.stderr or started.stdout).strip()[-800:]}"
        )
    try:
        partition = slurm("sinfo", "-h", "-o", "%P").split()[0].rstrip("*")
        yield SimpleNamespace(account=TEST_ACCOUNT, partition=partition)
    finally:
        # the cluster is this fixture's own: cancel whatever is left of its jobs, then stop it
        subprocess.run(["scancel", "--user", str(os.geteuid())], capture_output=True, timeout=60)
        subprocess.run(["bash", str(SCRIPTS / "stop-local-slurm.sh")], capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def slurm_study(local_slurm, tmp_path_factory, request):
    """The tiny study run through the SLURM profile: workdir, Snakemake's log and the wall time."""
    workdir = copy_workflow(tmp_path_factory.mktemp("slurm_study"))
    profile = workdir / "profiles" / "slurm" / "config.yaml"
    point_profile_at(profile, local_slurm.account, local_slurm.partition)
    # the README's command; jobs run `sys.executable -m snakemake` (sbatch --export=ALL). Every job's
    # scheduler output goes to a temporary folder, never into the checkout.
    job_output = tmp_path_factory.mktemp("slurm_job_output")
    command = [
        sys.executable,
        "-m",
        "snakemake",
        "--profile",
        "profiles/slurm",
        "--configfile",
        str(TINY),
        "--slurm-logdir",
        str(job_output),
    ]
    start = time.monotonic()
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=3600)
    seconds = time.monotonic() - start
    if result.returncode != 0:
        raise AssertionError(
            f"snakemake --profile profiles/slurm failed ({result.returncode}) after {seconds:.0f} s:\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-8000:]}"
        )
    log = result.stdout + result.stderr
    submitted = [(int(job), int(slurm_id), Path(logfile)) for job, slurm_id, logfile in SUBMITTED.findall(log)]
    # what the scheduler knows of every job (finished jobs stay listed: MinJobAge=3600)
    listed = slurm("squeue", "--noheader", "--states=all", "--Format=JobID:20,State:20,tres-per-job:60")
    jobs = {
        int(fields[0]): SimpleNamespace(state=fields[1], tres=fields[2])
        for fields in map(str.split, listed.splitlines())
        if len(fields) == 3
    }
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():  # shown without -s
        print(
            f"\nSLURM run of the tiny study: {seconds:.0f} s wall time, {len(submitted)} jobs submitted through "
            f"SLURM ({len(jobs)} jobs listed by squeue)",
            flush=True,
        )
    return SimpleNamespace(
        workdir=workdir,
        profile=profile,
        log=log,
        submitted=submitted,
        jobs=jobs,
        seconds=seconds,
        job_output=job_output,
    )


def test_skip_reason_names_what_is_missing(monkeypatch):
    monkeypatch.delenv("LUNGREG_SLURM_SKIP", raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert "not root" in unavailable_reason()
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert "no apt-get" in unavailable_reason()
    monkeypatch.setenv("LUNGREG_SLURM_SKIP", "1")
    assert "LUNGREG_SLURM_SKIP=1" in unavailable_reason()


def test_every_job_but_the_local_rules_went_through_slurm(slurm_study):
    counts = job_counts(slurm_study.log)
    assert counts, "no 'Job stats' table in Snakemake's log"
    local = local_rules(slurm_study.workdir)
    expected = Counter({rule: n for rule, n in counts.items() if rule != "total" and rule not in local})
    assert sum(expected.values()) == counts["total"] - sum(counts.get(rule, 0) for rule in local)
    submitted_rules = Counter(rule_of(logfile) for _, _, logfile in slurm_study.submitted)
    assert submitted_rules == expected
    assert len({job for job, _, _ in slurm_study.submitted}) == len(slurm_study.submitted)
    slurm_ids = [slurm_id for _, slurm_id, _ in slurm_study.submitted]
    assert len(set(slurm_ids)) == len(slurm_ids)
    # the scheduler ran every one of them to completion
    assert {slurm_study.jobs[i].state if i in slurm_study.jobs else "not listed" for i in slurm_ids} == {"COMPLETED"}


def test_gpu_rules_asked_slurm_for_one_gpu_and_cpu_rules_for_none(slurm_study):
    gpu = workflow_gpu_rules(slurm_study.workdir)
    assert (
        gpu and profile_gpu_rules(slurm_study.profile) == gpu
    )  # the profile sends every GPU rule to the GPU partition
    tres = {i: job.tres for i, job in slurm_study.jobs.items()}
    requested = {(rule_of(logfile), tres.get(slurm_id, "not listed")) for _, slurm_id, logfile in slurm_study.submitted}
    assert requested == {(rule, "gres:gpu:1" if rule in gpu else "N/A") for rule, _ in requested}
    assert {rule for rule, _ in requested} >= gpu  # the tiny study has every GPU rule


def test_job_output_goes_to_a_temporary_folder_not_the_checkout(slurm_study):
    assert all(Path(logfile).is_relative_to(slurm_study.job_output) for _, _, logfile in slurm_study.submitted)
    stray = [p for folder in (REPO, SCRIPTS, slurm_study.workdir) for p in folder.glob("slurm-*.out")]
    assert not stray, f"scheduler output outside the temporary folder: {stray}"


def test_slurm_tables_equal_the_local_run(slurm_study, request):
    # after the SLURM run (a skip above must not wait for the local run first)
    local_study = request.getfixturevalue("tiny_study")
    folder = Path("results") / "tables"
    names = sorted(p.name for p in (local_study / folder).glob("*.tsv"))
    assert names and names == sorted(p.name for p in (slurm_study.workdir / folder).glob("*.tsv"))
    for name in names:
        local = pd.read_csv(local_study / folder / name, sep="\t")
        remote = pd.read_csv(slurm_study.workdir / folder / name, sep="\t")
        timing = [c for c in TIMING_COLUMNS if c in local.columns]
        pd.testing.assert_frame_equal(
            remote.drop(columns=timing), local.drop(columns=timing), check_exact=True, obj=name
        )
