"""The import graph: imports run one way, and only sandbox/ talks to Docker.

    cli -> run -> agents -> tools -> experiment / workbench / session -> runner / ledger -> sandbox

Every import counts, wherever it is written: inside a function or under TYPE_CHECKING, a cycle is still a
cycle (it is only hidden). The graph is read from the source with `ast`, so the check needs no engine.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("harness", "sandbox", "trainer")
# Each harness module of the flow, by layer: a module may import modules of lower layers only (a higher
# number). Modules not named here (config, text, lab, ...) are leaves that anything may use; they are
# still covered by the cycle check.
FLOW = {
    "harness.cli": 0,
    "harness.run": 1,
    "harness.agents": 2, "harness.agents.claude": 2, "harness.agents.offline": 2,
    "harness.tools": 3,
    "harness.experiment": 4, "harness.workbench": 4, "harness.session": 4,
    "harness.runner": 5, "harness.ledger": 5,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


def imports_of(path: Path, known: set[str], roots: tuple[str, ...] = PACKAGES) -> set[str]:
    """The project modules `path` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from harness import history` names a module; `from harness.ledger import Ledger` a name in one.
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name.split(".")[0] in roots:
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(path, known) - {name} for name, path in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in edges.get(node, ()):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_the_checker_sees_a_hidden_cycle(tmp_path):
    """The check itself: a cycle closed by an import under TYPE_CHECKING is found."""
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from a import thing\n")
    known = {"a", "b"}
    edges = {name: imports_of(tmp_path / f"{name}.py", known, roots=("a", "b")) for name in known}
    assert cycles(edges) == [["a", "b"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_harness_sandbox_and_trainer():
    assert cycles(graph()) == []


def test_sandbox_and_trainer_import_nothing_above_them():
    edges = graph()
    upward = {(m, t) for m, targets in edges.items() for t in targets
              if (m.startswith("sandbox") and not t.startswith("sandbox"))
              or (m.startswith("trainer") and not t.startswith("trainer"))}
    assert upward == set()


def test_the_harness_flow_runs_one_way():
    edges = graph()
    against = sorted((m, t) for m, targets in edges.items() if m in FLOW for t in targets
                     if t in FLOW and FLOW[t] < FLOW[m])
    assert against == []


@pytest.mark.parametrize("package", ["harness", "trainer", "bench"])
def test_only_sandbox_imports_docker(package):
    offenders = []
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] == "docker"]
    assert offenders == []


def test_the_module_map_names_every_module():
    """docs/architecture.md says what each module owns: a module it does not name is a map out of date."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    missing = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT / package).as_posix()
            if path.name == "__init__.py" and path.parent.name != "agents":
                continue  # package markers (sandbox's re-exports its public names)
            if f"`{rel}`" not in text:
                missing.append(f"{package}/{rel}")
    assert missing == []
