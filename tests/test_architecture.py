"""The package's architecture, pinned: imports run one way, from the ground floor up, with no
circle; the modules the workflow imports while it plans stay free of torch; imports sit at the top
of a module unless they are genuinely optional. README.md, "Architecture", draws the same layers."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from workflow_runner import REPO

PACKAGE = REPO / "src" / "lungreg"

# Lowest first. A module imports from its own layer or a lower one, never from a higher one.
LAYERS = [
    ["lungreg.io", "lungreg.geometry", "lungreg.config", "lungreg.study", "lungreg.workflow"],  # the vocabulary
    ["lungreg.metrics", "lungreg.lungmask", "lungreg.manifest", "lungreg.torch_io", "lungreg.plots"],  # shared tools
    ["lungreg.preprocess", "lungreg.synthetic", "lungreg.network"],  # the data and the network
    ["lungreg.evaluate"],  # scoring one pair, the same for every method
    ["lungreg.registration", "lungreg.classify", "lungreg.tables"],  # methods, classifiers, tables
    ["lungreg.cli"],  # the command line
]
# Inside a subpackage, lowest first: a module imports only modules listed before it.
PACKAGE_ORDER = {
    "lungreg.synthetic": ["settings", "anatomy", "render", "calibration"],
    "lungreg.network": ["device", "transform", "scoring", "model", "losses", "refine", "train"],
    "lungreg.registration": ["base", "network", "baselines", "chunk", "budget", "pair"],
    "lungreg.registration.baselines": ["common", "sitk", "ants", "convexadam", "elastix", "registrar"],
    "lungreg.classify": ["folds", "features", "cnn", "tabular", "crossval", "summary"],
}
# Imports that may sit inside a function: genuinely optional or deferred on purpose (each says why
# in a comment where it is).
INNER_IMPORTS = {
    ("lungreg.registration.baselines.ants", "ants"),  # heavy, only syn needs it, not in envs/torch.yaml
    ("lungreg.registration.baselines.ants", "ants.internal"),
    # only convexadam needs it, not in envs/torch.yaml; its import silences warnings process-wide
    ("lungreg.registration.baselines.convexadam", "convexAdam.apply_convex"),
    ("lungreg.registration.baselines.convexadam", "convexAdam.convex_adam_MIND"),
    ("lungreg.registration.baselines.elastix", "itk"),  # only elastix needs ITK Python (seconds to load)
    ("lungreg.manifest", "nibabel"),  # a fast path; whatever fails falls back to SimpleITK
    ("lungreg.cli", "lungreg.io"),  # `lungreg --help` answers without loading torch
    ("lungreg.cli", "lungreg.registration.pair"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(module: str) -> list[tuple[str, bool]]:
    """(imported module, at module level?) of every import statement of `module`, relative ones
    resolved; `from package import name` counts as importing `package.name` when that is a module."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(filter(None, [*parent, base]))
            names = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES]
            found += [(name, id(node) in top) for name in names or [base]]
    return [(name, level) for name, level in found if name != "__future__"]


def internal_graph() -> dict[str, set[str]]:
    return {m: {name for name, _ in imports(m) if name in MODULES and name != m} for m in MODULES}


def layer(module: str) -> int:
    ranks = [
        (len(prefix), rank)
        for rank, group in enumerate(LAYERS)
        for prefix in group
        if module == prefix or module.startswith(prefix + ".")
    ]
    assert ranks, f"{module} has no layer in tests/test_architecture.py (and README's Architecture)"
    return max(ranks)[1]


def test_every_module_has_a_layer_and_every_subpackage_an_order():
    for module in MODULES:
        if module != "lungreg":
            layer(module)
    for package, order in PACKAGE_ORDER.items():
        children = {m.rsplit(".", 1)[1] for m in MODULES if m.rpartition(".")[0] == package}
        assert children == set(order), f"{package}: modules {sorted(children)} != the order {order}"


def test_the_import_graph_has_no_circle():
    graph = internal_graph()
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                pytest.fail("import circle: " + " -> ".join(path[path.index(target) :] + [target]))
            if target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_no_module_imports_from_a_higher_layer():
    upward = []
    for module, targets in internal_graph().items():
        for target in targets:
            if layer(target) > layer(module):
                upward.append(f"{module} (layer {layer(module)}) imports {target} (layer {layer(target)})")
            package, name = module.rpartition(".")[0], module.rpartition(".")[2]
            order = PACKAGE_ORDER.get(package)
            if order and target.startswith(package + "."):
                sibling = target[len(package) + 1 :].split(".")[0]
                if order.index(sibling) > order.index(name):
                    upward.append(f"{module} imports {target}, listed after it in {package}")
    assert not upward, "\n".join(sorted(upward))


def test_imports_sit_at_the_top_unless_genuinely_optional():
    inner = {(module, name) for module in MODULES for name, at_top in imports(module) if not at_top}
    assert inner <= INNER_IMPORTS, f"imports inside functions: {sorted(inner - INNER_IMPORTS)}"


def planning_modules() -> list[str]:
    """The library modules the workflow imports while Snakemake plans it (Snakefile, rules/*.smk)."""
    found = set()
    for path in [REPO / "Snakefile", *sorted((REPO / "rules").glob("*.smk"))]:
        for line in path.read_text().splitlines():
            if match := re.match(r"\s*from (lungreg[\w.]*) import ([\w, ]+)", line):
                base = match.group(1)
                found |= {
                    f"{base}.{n.strip()}" if f"{base}.{n.strip()}" in MODULES else base
                    for n in match.group(2).split(",")
                }
            elif match := re.match(r"\s*import (lungreg[\w.]*)", line):
                found.add(match.group(1))
    return sorted(found)


def test_planning_imports_no_torch():
    modules = planning_modules()
    assert {"lungreg.study", "lungreg.manifest", "lungreg.synthetic.settings"} <= set(modules), modules
    check = (
        f"import sys\nimport {', '.join(modules)}\n"
        "print(sorted(m for m in ('torch', 'matplotlib') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", check],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(PACKAGE.parent)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[0] == "[]", f"planning ({', '.join(modules)}) imports {result.stdout.strip()}"


def test_the_registries_and_their_implementations_agree():
    from lungreg.registration.baselines.registrar import OPTIONS
    from lungreg.study import BASELINE_METHODS, METHODS

    assert tuple(OPTIONS) == BASELINE_METHODS
    assert {m.kind for m in METHODS} == {"identity", "network", "instance", "baseline"}
