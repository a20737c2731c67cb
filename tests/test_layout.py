"""The rooms and the one-way imports between them, read from the source (no module is run).

serving/  the model path: sdserve, the model repository, the archive format, the local Triton and
          the local SageMaker-compatible endpoint. Imports neither studio, deploy nor bench.
studio/   the app and its client layer. From serving only the model table and its contract
          (sdserve modules that need neither torch nor Triton) and the process helpers it starts
          its own local endpoint with; never the Triton or endpoint code, deploy or bench.
deploy/   AWS: archives uploaded, resources, policies. Never studio or bench.
bench/    benchmarks and load tools: the one room that may import every other.
No two project files import each other in a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROOMS = ("serving", "studio", "deploy", "bench")
# sdserve modules that run only inside a model (torch, diffusers, Triton's python backend).
MODEL_ONLY = {"sdserve.pipelines", "sdserve.batch", "sdserve.triton_model"}
STUDIO_MAY_USE_FROM_SERVING = {"serving.processes"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[:2] == ["serving", "sdserve"]:
        parts = parts[1:]  # installed as the top-level package `sdserve`
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_files() -> dict[str, Path]:
    files = {}
    for room in ROOMS:
        for path in (ROOT / room).rglob("*.py"):
            if "models" in path.relative_to(ROOT).parts[1:2]:
                continue  # serving/models/*/1/model.py import the archive's own sdserve copy
            files[module_name(path)] = path
    return files


FILES = project_files()


def imported_names(path: Path, module: str) -> list[str]:
    """Every module name `path` imports, at module level or inside functions, made absolute."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                prefix = ".".join([*base, node.module] if node.module else base)
            else:
                prefix = node.module or ""
            names.extend(f"{prefix}.{alias.name}" for alias in node.names)
    return names


def project_module(name: str) -> str | None:
    """The project module a dotted name lands in (the longest known prefix), or None."""
    parts = name.split(".")
    while parts:
        if ".".join(parts) in FILES:
            return ".".join(parts)
        parts.pop()
    return None


def room_of(module: str) -> str:
    return "serving" if module.split(".")[0] == "sdserve" else module.split(".")[0]


def rule_broken(importer: str, imported: str) -> str | None:
    """Why `importer` may not import `imported` (both project modules), or None when it may."""
    source, target = room_of(importer), room_of(imported)
    if source == target or source == "bench":
        return None
    if source == "serving":
        return "serving imports neither studio, deploy nor bench"
    if source == "deploy" and target in ("studio", "bench"):
        return "deploy imports neither studio nor bench"
    if source == "studio":
        if target != "serving":
            return "studio imports neither deploy nor bench"
        allowed = imported in STUDIO_MAY_USE_FROM_SERVING or (
            imported.startswith("sdserve") and imported not in MODEL_ONLY)
        if not allowed:
            return "studio takes from serving only the model table, its contract and serving.processes"
    return None


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for module, path in FILES.items():
        targets = {project_module(name) for name in imported_names(path, module)}
        graph[module] = {target for target in targets if target and target != module}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
    return found


def test_the_rooms_exist_and_hold_their_parts():
    for module in ("sdserve.catalog", "serving.local_triton", "serving.local_endpoint", "serving.archive",
                   "studio.app", "studio.client", "deploy.cli", "bench.studio"):
        assert module in FILES, f"{module} is not where the layout says"


def test_no_import_crosses_a_room_the_wrong_way():
    broken = [f"{FILES[importer].relative_to(ROOT)} imports {imported}: {why}"
              for importer, targets in import_graph().items()
              for imported in sorted(targets)
              if (why := rule_broken(importer, imported))]
    assert broken == []


def test_no_import_circles():
    assert circles(import_graph()) == []


@pytest.mark.parametrize("importer, imported, allowed", [
    ("serving.local_endpoint.server", "studio.client", False),
    ("sdserve.catalog", "deploy.aws", False),
    ("studio.app", "serving.local_endpoint.server", False),
    ("studio.app", "serving.local_triton", False),
    ("studio.app", "sdserve.pipelines", False),
    ("studio.app", "deploy.config", False),
    ("studio.app", "bench.studio", False),
    ("deploy.cli", "studio.client", False),
    ("studio.app", "sdserve.catalog", True),
    ("studio.endpoint_launcher", "serving.processes", True),
    ("deploy.cli", "serving.archive", True),
    ("bench.studio", "studio.client", True),
    ("bench.studio", "serving.local_endpoint", True),
])
def test_the_rule_itself(importer, imported, allowed):
    assert (rule_broken(importer, imported) is None) == allowed


def test_a_circle_is_found():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []
