"""The package's structure: no import cycles, one TensorFlow boundary, short functions."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "drsformer_jax"
# Function-level imports allowed: the documented boundary (package docstring).
BOUNDARY = {("utils/lazy_tf.py", "tensorflow"), ("data/sources.py", "drsformer_jax.data"),
            ("benchmark.py", "torch"), ("release.py", "torch"),
            ("inference/serving.py", "jax.experimental")}


def _modules() -> dict[str, ast.Module]:
    return {str(p.relative_to(PACKAGE)): ast.parse(p.read_text()) for p in PACKAGE.rglob("*.py")}


def _name(rel: str) -> str:
    name = "drsformer_jax." + rel[:-3].replace("/", ".")
    return name.removesuffix(".__init__")


def test_no_import_cycles():
    trees = _modules()
    names = {_name(rel) for rel in trees}
    graph = {}
    for rel, tree in trees.items():
        me, deps = _name(rel), set()
        for node in tree.body:  # module-level imports run at import time
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("drsformer_"):
                deps |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        # A package's __init__ importing its own children is not a cycle.
        graph[me] = {d for d in deps & names if d != me and not me.startswith(d + ".")}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in graph[m]:
            assert state.get(d) != 1, "import cycle: " + " -> ".join(path + [m, d])
            if d not in state:
                visit(d, path + [m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])


def test_function_level_imports_only_at_the_boundary():
    found = set()
    for rel, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.Import):
                        found |= {(rel, a.name) for a in inner.names}
                    elif isinstance(inner, ast.ImportFrom):
                        found.add((rel, inner.module))
    assert found <= BOUNDARY, sorted(found - BOUNDARY)


def test_library_functions_are_short():
    long = []
    for rel, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                # The model's __call__s are the network, written out as in the paper.
                if lines > 60 and not (rel.startswith("model/") and node.name == "__call__"):
                    long.append(f"{rel}:{node.name} ({lines} lines)")
    assert not long, long
