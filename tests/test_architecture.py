"""The layering docs/architecture.md describes, enforced: every import of act/, families/, teachers/ and tools/
points down the layer order (or stays inside its layer), no import cycle, modules of a readable size, and the
trainer free of the orchestration layers that plug into it."""

import ast
from collections import defaultdict

from conftest import REPO

PACKAGES = ("act", "teachers", "families", "tools")
# The layers, lowest first: a module may import its own layer and the layers before it, never one after it.
LAYERS = [
    ("core", ("act.core", "act")),  # `act` itself: the lazy facade (its public names load on first use)
    ("model families and teachers", ("families", "teachers")),
    ("building blocks", ("act.blocks",)),
    ("export and deployment", ("act.deploy",)),
    ("one run", ("act.run",)),
    ("orchestration", ("act.orchestrate",)),
    ("surfaces", ("act.cli", "act.__main__")),
    ("tools", ("tools",)),
]


def layer_of(module: str) -> int:
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > best[1]):
                best = (i, len(p))
    assert best is not None, f"{module} belongs to no layer: add it to LAYERS (tests/test_architecture.py)"
    return best[0]
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


def test_imports_point_down_the_layers():
    mods, edges = import_graph()
    upward = sorted(f"{m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})"
                    for m in mods for t in edges[m] if layer_of(t) > layer_of(m))
    assert upward == []


def test_every_layer_package_says_what_it_is():
    for _, prefixes in LAYERS:
        for p in prefixes:
            init = REPO / p.replace(".", "/") / "__init__.py"
            if init.is_file() and p.startswith("act."):
                doc = ast.get_docstring(ast.parse(init.read_text()))
                assert doc and len(doc) > 80, f"{init} needs a one-paragraph docstring"


def test_the_layer_check_finds_an_upward_import():
    assert layer_of("act.core.config.sections") < layer_of("act.blocks.losses") < layer_of("act.run.trainer")
    assert layer_of("families.ultralytics.yolo") < layer_of("act.blocks.quant.placement")


def test_no_import_cycles():
    mods, edges = import_graph()
    assert cycles(list(mods), edges) == []


def test_the_cycle_check_finds_a_cycle():
    edges = defaultdict(set, {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})
    assert cycles(["a", "b", "c", "d"], edges) == [["a", "b", "c"]]


def test_trainer_knows_no_orchestration():
    """The loop is extended through act.run.hooks, never by importing what extends it."""
    mods, edges = import_graph()
    below = {"act.run.trainer", "act.run.runner", "act.run.build", "act.run.runstate", "act.run.deliver", "act.run.stream", "act.run.ptq"}
    above = {"act.orchestrate.staged_run", "act.orchestrate.stage_kinds", "act.orchestrate.strategy", "act.orchestrate.analyze", "act.orchestrate.compress", "act.cli.main"}

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
    big = {n: len(p.read_text().splitlines()) for n, p in _modules().items() if not n.startswith("tools.")}
    assert {n: k for n, k in big.items() if k > MAX_LINES} == {}
