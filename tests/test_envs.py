"""The workflow's software: every rule has conda/log/benchmark, envs/*.yaml pin what pyproject.toml
pins, each rule's environment holds what its script imports, and `snakemake --lint` is clean.

The rules are read with Snakemake's own API (in a subprocess, on a copy of the workflow), not by
parsing rules/*.smk: that sees rules built in loops, unpack()/report() wrappers and includes.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from workflow_runner import REPO, copy_workflow, snakemake, workflow_rules

# conda-forge names that differ from the PyPI names pyproject.toml uses (canonical, lower case)
CONDA_TO_PIP = {
    "pytorch": "torch",
    "pytorch-cpu": "torch",
    "pytorch-gpu": "torch",
    "simpleitk": "simpleitk",
    "py-opencv": "opencv-python",
    "matplotlib-base": "matplotlib",
    "snakemake-minimal": "snakemake",
}
# top-level import names whose distribution is named otherwise
MODULE_TO_PIP = {
    "SimpleITK": "simpleitk",
    "sklearn": "scikit-learn",
    "yaml": "pyyaml",
    "ants": "antspyx",
    "PIL": "pillow",
    "skimage": "scikit-image",
}
# provided by the Snakemake that runs the job (the script preamble), not by the rule's env
PROVIDED = {"snakemake", "lungreg"}
NOT_PACKAGES = {"python", "pip"}


# ------------------------------------------------------------------------------ parsing


def canonical(name: str) -> str:
    """PEP 503 name without extras, conda names mapped to PyPI ones."""
    name = re.sub(r"[-_.]+", "-", name.split("[")[0].strip()).lower()
    return CONDA_TO_PIP.get(name, name)


def parse_pip_requirement(text: str) -> tuple[str, str | None]:
    """'SimpleITK==2.5.7' -> ('simpleitk', '2.5.7'); None unless pinned exactly with ==."""
    match = re.fullmatch(r"\s*([A-Za-z0-9][A-Za-z0-9._\-\[\], ]*?)\s*(?:==\s*([^\s;,]+))?\s*(?:[<>=!~].*)?(;.*)?", text)
    if not match:
        raise ValueError(f"cannot parse requirement {text!r}")
    return canonical(match.group(1)), match.group(2)


def parse_conda_requirement(text: str) -> tuple[str, str | None]:
    """'numpy=2.4.6', 'numpy==2.4.6', 'numpy 2.4.6', 'conda-forge::numpy=2.4.6=py311_0' -> exact pin."""
    text = text.split("::")[-1].strip()
    match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._\-]*)(?:(?:\s*==?\s*|\s+)([0-9][^=\s*]*))?(?:=\S+)?\s*(.*)", text)
    if not match:
        raise ValueError(f"cannot parse conda dependency {text!r}")
    name, version, rest = match.groups()
    exact = version if version and not rest and "*" not in text else None
    return canonical(name), exact


def env_pins(path: Path) -> dict[str, tuple[str | None, str]]:
    """{package: (exact version or None, 'conda'|'pip')} of an environment file."""
    spec = yaml.safe_load(path.read_text())
    pins: dict[str, tuple[str | None, str]] = {}
    for entry in spec.get("dependencies") or []:
        if isinstance(entry, dict):
            for requirement in entry.get("pip") or []:
                name, version = parse_pip_requirement(requirement)
                pins[name] = (version, "pip")
        else:
            name, version = parse_conda_requirement(str(entry))
            pins[name] = (version, "conda")
    return pins


def pyproject_pins() -> dict[str, str | None]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return dict(parse_pip_requirement(r) for r in project["dependencies"])


def pin_disagreements(env: dict[str, tuple[str | None, str]], pyproject: dict[str, str | None]) -> list[str]:
    problems = []
    for name, (version, section) in sorted(env.items()):
        if name in NOT_PACKAGES:
            continue
        if version is None:
            problems.append(f"{name} ({section}) is not pinned to one version")
        elif name in pyproject and version != pyproject[name]:
            problems.append(f"{name} ({section}) {version} != pyproject {pyproject[name]}")
    return problems


# ------------------------------------------------------------------------ imports of a script


def _module_file(module: str) -> Path | None:
    parts = module.split(".")
    if parts[0] != "lungreg":
        return None
    base = REPO / "src" / Path(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path, module: str | None, top_level_only: bool) -> set[str]:
    """Absolute module names imported by a file (relative imports resolved inside lungreg)."""
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    package = module if module and path.name == "__init__.py" else (module.rpartition(".")[0] if module else "")
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(filter(None, [*parent, base]))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names if _module_file(f"{base}.{alias.name}")}
    return found


def third_party_imports(script: Path) -> set[str]:
    """Top-level distributions a script needs at import time: its own imports (anywhere in it) and
    the module-level imports of every lungreg module they reach, transitively."""
    seen: set[str] = set()
    pending = list(_imports(script, None, top_level_only=False))
    needed = set()
    while pending:
        module = pending.pop()
        if module in seen:
            continue
        seen.add(module)
        parts = module.split(".")
        if parts[0] == "lungreg":
            for depth in range(1, len(parts) + 1):  # importing a.b.c runs a, a.b, a.b.c
                name = ".".join(parts[:depth])
                if (file := _module_file(name)) and name not in seen | {module}:
                    pending.append(name)
            if file := _module_file(module):
                pending += list(_imports(file, module, top_level_only=True))
        elif parts[0] and parts[0] not in sys.stdlib_module_names:
            needed.add(MODULE_TO_PIP.get(parts[0], canonical(parts[0])))
    return needed - PROVIDED


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def workflow_copy(tmp_path_factory) -> Path:
    return copy_workflow(tmp_path_factory.mktemp("envs"))


@pytest.fixture(scope="module")
def rules(workflow_copy) -> dict[str, dict]:
    loaded = workflow_rules(workflow_copy)
    assert len(loaded) > 10
    return loaded


# --------------------------------------------------------------------------------- tests


def test_every_rule_has_conda_log_and_benchmark(rules):
    actions = {name: rule for name, rule in rules.items() if rule["action"]}
    exempt = sorted(set(rules) - set(actions))
    assert exempt == ["all"], f"rules without an action (exempt): {exempt}"
    problems = []
    for name, rule in sorted(actions.items()):
        if not rule["conda"]:
            problems.append(f"{name}: no conda:")
        elif not Path(rule["conda"]).is_file() or Path(rule["conda"]).parent.name != "envs":
            problems.append(f"{name}: conda: {rule['conda']} is not a file of envs/")
        if not rule["log"]:
            problems.append(f"{name}: no log:")
        if not rule["benchmark"]:
            problems.append(f"{name}: no benchmark:")
    assert not problems, "\n".join(problems)


def test_every_env_file_is_used_by_a_rule(rules):
    used = {Path(rule["conda"]).name for rule in rules.values() if rule["conda"]}
    assert used == {path.name for path in (REPO / "envs").glob("*.yaml")}


def test_pyproject_pins_every_dependency_exactly():
    unpinned = [name for name, version in pyproject_pins().items() if version is None]
    assert not unpinned, f"pyproject.toml dependencies without == pins: {unpinned}"


@pytest.mark.parametrize("env", sorted(p.name for p in (REPO / "envs").glob("*.yaml")))
def test_env_pins_agree_with_pyproject(env):
    path = REPO / "envs" / env
    pins = env_pins(path)
    assert "python" in pins, f"{env}: no python"
    problems = pin_disagreements(pins, pyproject_pins())
    assert not problems, f"{env}:\n" + "\n".join(problems)
    python = pins["python"][0] or ""
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    minimum = tuple(int(v) for v in re.findall(r"\d+", requires)[:2])
    assert tuple(int(v) for v in python.split(".")[:2]) >= minimum, f"{env}: python {python} vs {requires}"


def test_pin_checker_catches_conda_and_pip_disagreements(tmp_path):
    env = tmp_path / "env.yaml"
    env.write_text(
        "channels: [conda-forge]\ndependencies:\n  - python=3.11\n  - pytorch=2.0.1\n"
        "  - conda-forge::simpleitk==2.5.7=py311h_0\n  - scipy>=1\n"
        "  - pip:\n      - scikit_learn==1.0\n      - nibabel==5.4.2\n      - antspyx\n"
    )
    pins = env_pins(env)
    assert pins["torch"] == ("2.0.1", "conda") and pins["simpleitk"] == ("2.5.7", "conda")
    problems = pin_disagreements(pins, pyproject_pins())
    assert problems == [
        "antspyx (pip) is not pinned to one version",
        "scikit-learn (pip) 1.0 != pyproject 1.9.1",
        "scipy (conda) is not pinned to one version",
        "torch (conda) 2.0.1 != pyproject 2.13.0",
    ]


def test_each_rule_env_provides_what_its_script_imports(rules):
    problems = []
    for name, rule in sorted(rules.items()):
        if not rule["script"]:
            continue
        provided = set(env_pins(Path(rule["conda"])))
        missing = third_party_imports(Path(rule["script"])) - provided
        if missing:
            problems.append(
                f"{name}: {Path(rule['conda']).name} lacks {sorted(missing)} (imported by {Path(rule['script']).name})"
            )
    assert not problems, "\n".join(problems)


def test_import_scan_follows_the_library():
    needed = third_party_imports(REPO / "scripts" / "register_chunk.py")
    assert {"torch", "simpleitk", "numpy", "pandas"} <= needed
    assert "antspyx" not in needed  # baselines are imported lazily, only by register_baseline


def test_snakemake_lint_reports_nothing(workflow_copy):
    result = snakemake(workflow_copy, "--lint", check=False, configfiles=(), timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "Lints for" not in output, output[-6000:]
