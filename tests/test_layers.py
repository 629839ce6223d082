"""Dependencies go one way: tokenlimit → accounts → quotas → gateway → telemetry → api → portal
→ limiter_site.

Every import counts, at module level, inside functions and under TYPE_CHECKING alike (hiding
an import does not remove the dependency). A package may import its own layer and the ones
below it, never one above; no two modules import each other, directly or round a loop. The
SGLang simulator (sglang_sim) stands beside the product: it may use tokenlimit, and no product
module may use it except the command that starts it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = (
    "tokenlimit",
    "accounts",
    "quotas",
    "gateway",
    "telemetry",
    "api",
    "portal",
    "limiter_site",
)
SIMULATOR = "sglang_sim"
# The one way into the simulator from the product: `manage.py simulate_sglang`.
SIMULATOR_ENTRY = "gateway.management.commands.simulate_sglang"


def modules() -> dict[str, Path]:
    found = {}
    for package in (*LAYERS, SIMULATOR):
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `path` imports (`from a import b` counts b if b is a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        found.update(name for name in names if name in known)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, known) - {name} for name, path in known.items()}


def rank(module: str) -> int:
    package = module.split(".")[0]
    return LAYERS.index(package) if package in LAYERS else -1


def test_no_package_imports_a_layer_above_it() -> None:
    edges = graph()
    # The scan sees the project's imports (downward ones are many): an empty graph passes
    # nothing by accident.
    assert sum(len(targets) for targets in edges.values()) > 100
    assert "quotas.services" in edges["gateway.app"]
    upward = [
        f"{module} → {target}"
        for module, targets in edges.items()
        if module.split(".")[0] in LAYERS
        for target in targets
        if target.split(".")[0] in LAYERS and rank(target) > rank(module)
    ]
    assert upward == []


def test_the_simulator_stands_apart() -> None:
    edges = graph()
    into = [
        f"{m} → {t}"
        for m, ts in edges.items()
        for t in ts
        if t.startswith(SIMULATOR) and not m.startswith(SIMULATOR) and m != SIMULATOR_ENTRY
    ]
    out_of = [
        f"{m} → {t}"
        for m, ts in edges.items()
        if m.startswith(SIMULATOR)
        for t in ts
        if not t.startswith((SIMULATOR, "tokenlimit"))
    ]
    assert into == [] and out_of == []


def test_no_import_cycles_between_modules() -> None:
    edges = graph()
    assert strongly_connected(edges) == []


def strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iteratively; returns the components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = 0
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
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
                    cycles.append(sorted(component))
    return cycles


def test_the_cycle_finder_finds_cycles() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e2"}, "e2": set()}
    assert strongly_connected(edges) == [["a", "b", "c"]]
