"""The layering docs/architecture.md describes: no import cycle inside act/, modules of a readable size, and the
trainer free of the orchestration layers that plug into it."""

import ast
from collections import defaultdict

from conftest import REPO

PACKAGES = ("act", "teachers", "families")
MAX_LINES = 500


def _modules():
    mods = {}
    for pkg in PACKAGES:
        for p in (REPO / pkg).glob("**/*.py"):
            name = ".".join(p.with_suffix("").relative_to(REPO).parts)
            mods[name[: -len(".__init__")] if name.endswith(".__init__") else name] = p
    return mods


def import_graph():
    """module -> the project modules it imports (at the top or inside functions; a submodule importing its own
    package is not an edge: Python has initialised the package by then)."""
    mods = _modules()
    edges = defaultdict(set)
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for t in targets:
                if t in mods and t != name and not name.startswith(t + "."):
                    edges[name].add(t)
    return mods, edges


def cycles(nodes, edges):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in nodes:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    mods, edges = import_graph()
    assert cycles(list(mods), edges) == []


def test_the_cycle_check_finds_a_cycle():
    edges = defaultdict(set, {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})
    assert cycles(["a", "b", "c", "d"], edges) == [["a", "b", "c"]]


def test_trainer_knows_no_orchestration():
    """The loop is extended through act.hooks, never by importing what extends it."""
    mods, edges = import_graph()
    below = {"act.trainer", "act.run", "act.build", "act.runstate", "act.deliver", "act.stream", "act.ptq"}
    above = {"act.stages", "act.stage_kinds", "act.strategy", "act.analyze", "act.compress", "act.cli"}

    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for w in edges[todo.pop()]:
                if w not in seen:
                    seen.add(w)
                    todo.append(w)
        return seen

    for m in below:
        assert not reach(m) & above, (m, reach(m) & above)


def test_modules_stay_small():
    big = {n: len(p.read_text().splitlines()) for n, p in _modules().items()}
    assert {n: k for n, k in big.items() if k > MAX_LINES} == {}
