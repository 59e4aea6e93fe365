"""Running the real workflow from tests: a copy of the workflow files in a scratch folder."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKFLOW_FILES = ("Snakefile", "rules", "scripts", "config", "envs", "report", "profiles")
TINY = REPO / "tests" / "config" / "tiny.yaml"


def copy_workflow(destination: Path) -> Path:
    """The workflow as a user's clone has it (tests must not write results/ into the repository)."""
    destination.mkdir(parents=True, exist_ok=True)
    for name in WORKFLOW_FILES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, destination / name, dirs_exist_ok=True)
        else:
            shutil.copy2(source, destination / name)
    return destination


def snakemake(
    workdir: Path, *arguments: str, check: bool = True, timeout: float = 1200, configfiles: tuple[Path, ...] = (TINY,)
) -> subprocess.CompletedProcess:
    """`snakemake --cores 2 --resources gpu=1 ARGUMENTS` in `workdir` with the tiny config."""
    command = [sys.executable, "-m", "snakemake", "--cores", "2", "--resources", "gpu=1"]
    if configfiles:
        command += ["--configfile", *map(str, configfiles)]
    result = subprocess.run([*command, *arguments], cwd=workdir, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"snakemake {' '.join(arguments)} failed ({result.returncode}):\n"
            f"{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
        )
    return result


def job_counts(output: str) -> dict[str, int]:
    """Snakemake's 'Job stats' table as {rule: count}."""
    counts, inside = {}, False
    for line in output.splitlines():
        if line.startswith("Job stats"):
            inside, counts = True, {}
            continue
        fields = line.split()
        if inside and len(fields) == 2 and fields[1].isdigit():
            counts[fields[0]] = int(fields[1])
        elif inside and counts and not line.strip():
            inside = False
    return counts


RULES_SCRIPT = """
import json, sys
from pathlib import Path
from snakemake.api import SnakemakeApi
from snakemake.settings.types import ConfigSettings, OutputSettings, ResourceSettings

with SnakemakeApi(OutputSettings()) as api:
    workflow = api.workflow(resource_settings=ResourceSettings(), config_settings=ConfigSettings(),
                            snakefile=Path("Snakefile").resolve(), workdir=Path.cwd())._workflow
    rules = {}
    for rule in workflow.rules:
        folder = Path(rule.snakefile).parent
        gpu = rule.resources.get("gpu")
        rules[rule.name] = {
            "action": not rule.norun,
            "conda": str((folder / rule.conda_env).resolve()) if isinstance(rule.conda_env, str) else rule.conda_env,
            "script": str((folder / rule.script).resolve()) if rule.script else None,
            "log": [str(f) for f in rule.log],
            "benchmark": None if rule.benchmark is None else str(rule.benchmark),
            "local": rule.name in workflow._localrules or rule.norun,
            "gpu": gpu.value if gpu is not None and isinstance(gpu.value, int) else None,
        }
print("RULES-JSON " + json.dumps(rules))
"""


def workflow_rules(workdir: Path) -> dict[str, dict]:
    """Every rule of the workflow in `workdir` as Snakemake itself reads it (in a subprocess): its
    conda env, script, log, benchmark, whether it runs locally and the GPUs it asks for. Rules built
    with `use rule ... with:`, in loops or by includes are all there, unlike a parse of rules/*.smk."""
    result = subprocess.run(
        [sys.executable, "-c", RULES_SCRIPT], cwd=workdir, capture_output=True, text=True, timeout=300
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("RULES-JSON ")]
    assert result.returncode == 0 and lines, f"loading the workflow failed:\n{result.stderr[-4000:]}"
    return json.loads(lines[-1].removeprefix("RULES-JSON "))
