"""The shape of the package: one run harness, no import cycles, no private names shared across modules."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "toolkit"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _imports(path: Path):
    """(module, names) of every `import` / `from ... import` in a file, at any depth (lazy ones too)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, [a.name for a in node.names]


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {m: set() for m in modules}
    for name, path in modules.items():
        for module, names in _imports(path):
            for target in [module, *(f"{module}.{n}" for n in names)]:
                if target in modules and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles_even_through_lazy_imports():
    graph = import_graph()
    assert len(graph) > 40 and graph["toolkit.pretraining"]  # the walk saw the package
    assert cycles(graph) == []


def test_no_private_name_is_imported_from_another_module():
    shared = []
    for name, path in _modules().items():
        for module, names in _imports(path):
            if module.startswith("toolkit") and module != name:
                shared += [f"{name} <- {module}.{n}" for n in names if n.startswith("_") and not n.startswith("__")]
    assert shared == []


def test_only_the_run_harness_sets_up_training():
    """Accelerator, training loop, state gathering and publishing are called from engine/run.py alone."""
    owners: dict[str, set[str]] = {}
    for name, path in _modules().items():
        for module, names in _imports(path):
            for n in names:
                if (module, n) in {
                    ("toolkit.engine.loop", "train"),
                    ("toolkit.engine.loop", "make_accelerator"),
                    ("toolkit.engine.distributed", "full_state_dict"),
                }:
                    owners.setdefault(n, set()).add(name)
    assert owners == {
        "train": {"toolkit.engine.run"},
        "make_accelerator": {"toolkit.engine.run"},
        "full_state_dict": {"toolkit.engine.run"},
    }
