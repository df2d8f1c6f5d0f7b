"""kiln's packages form a one-way graph: each imports only from the layers below it (README, "How it works")."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# where each part of the kiln namespace lives in the checkout
SOURCES = {"kiln": "kiln", "kiln.flows": "flows", "kiln.tasks": "tasks", "kiln.blocks": "blocks",
           "kiln.deployments": "deployments"}  # fmt: skip

# bottom to top; a part imports only from parts of lower layers
LAYERS = [
    {"kiln.errors", "kiln.settings", "kiln.processes"},
    {"kiln.prefect_env", "kiln.schemas", "kiln.run_reports"},
    {"kiln.blocks", "kiln.store", "kiln.runtime", "kiln.job_inputs", "kiln.registry", "kiln.deployments", "kiln.sdk",
     "kiln.launcher", "kiln.files", "kiln.services", "kiln.webhooks"},
    {"kiln.tasks"},
    {"kiln.flows"},
    {"kiln.worker"},
    {"kiln.dispatch"},
    {"kiln.submission"},
    {"kiln.events"},
    {"kiln.api", "kiln.lab_simulator", "kiln.prefect_server"},
    {"kiln.cli", "kiln"},
]  # fmt: skip


def part(module: str) -> str:
    """The package (or top-level module) of the kiln namespace a module belongs to: kiln.store.db → kiln.store."""
    return ".".join(module.split(".")[:2])


def imports() -> set[tuple[str, str, str]]:
    """(importing part, imported part, file) for every import of kiln, at the top of a module or inside a function."""
    found = set()
    for package, folder in SOURCES.items():
        for path in (ROOT / folder).rglob("*.py"):
            relative = path.relative_to(ROOT / folder).with_suffix("")
            module = ".".join([package, *relative.parts]).removesuffix(".__init__")
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                elif isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                else:
                    continue
                for name in names:
                    if name.split(".")[0] == "kiln" and part(name) != part(module):
                        found.add((part(module), part(name), str(path.relative_to(ROOT))))
    return found


def test_every_part_of_kiln_has_a_layer():
    layered = set().union(*LAYERS)
    assert ("kiln.api", "kiln.store") in {(source, target) for source, target, _ in imports()}
    assert {source for source, _, _ in imports()} <= layered
    assert {target for _, target, _ in imports()} <= layered


def test_no_part_imports_from_its_own_layer_or_above():
    layer = {name: level for level, names in enumerate(LAYERS) for name in names}
    upward = sorted(f"{path}: {source} imports {target}" for source, target, path in imports()
                    if layer[target] >= layer[source])  # fmt: skip
    assert upward == []
