"""Data flows one way: the import graph of tensorc, read from the source with `ast`
(every `import`, at module level or inside a function; `if TYPE_CHECKING:` imports, which
never run, aside), has layers and no circles.

Layers, bottom to top (a module may import its own layer and those below):

    core      tensorc/: errors < types < ops/ < printer, verify < ir < text
    passes    passes/                        (Graph -> Graph)
    backends  backends/                      (Graph -> Program -> run)
    frontend  frontend/                      (DSL, tracer, ONNX; onnx.backend runs backends)
    models    models/                        (written in the DSL)
    shell     tensorc/__init__, api, cli, loading, artifact, generation, data, optim, training
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"tensorc": "tensorc", "passes": "tensorc.passes", "backends": "tensorc.backends",
            "frontend": "tensorc.frontend", "models": "tensorc.models"}
LAYERS = ["core", "passes", "backends", "frontend", "models", "shell"]
SHELL = {"tensorc", "tensorc.api", "tensorc.cli", "tensorc.cli_args", "tensorc.cli_train",
         "tensorc.cli_tune", "tensorc.loading", "tensorc.artifact", "tensorc.generation",
         "tensorc.data", "tensorc.optim", "tensorc.training", "tensorc.pruning",
         "tensorc.parallel", "tensorc.__main__"}

def _modules() -> dict[str, tuple[Path, bool]]:
    mods = {}
    for folder, pkg in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join([pkg, *parts])] = (path, path.name == "__init__.py")
    return mods


def _imports(name: str, path: Path, is_pkg: bool, mods) -> set[str]:
    here = name if is_pkg else name.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text())
    for block in ast.walk(tree):   # type hints only: `if TYPE_CHECKING:` imports never run
        if isinstance(block, ast.If) and getattr(block.test, "id", "") == "TYPE_CHECKING":
            block.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = here.split(".")[:len(here.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                       for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in mods:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _graph() -> nx.DiGraph:
    mods = _modules()
    g = nx.DiGraph()
    for name, (path, is_pkg) in mods.items():
        g.add_node(name)
        g.add_edges_from((name, t) for t in _imports(name, path, is_pkg, mods))
    return g


def _layer(module: str) -> str:
    if module in SHELL or module.startswith("tensorc.parallel."):
        return "shell"
    part = module.split(".")[1] if "." in module else ""
    return part if part in LAYERS else "core"


def test_the_import_graph_was_read():
    g = _graph()
    assert {"tensorc.ir", "tensorc.backends.lowering.walk", "tensorc.cli"} <= set(g)
    assert g.has_edge("tensorc.backends.lowering.walk", "tensorc.backends.lowering.rules")
    assert g.has_edge("tensorc.cli", "tensorc.loading")


def test_no_module_imports_a_layer_above_its_own():
    g = _graph()
    upward = [f"{a} ({_layer(a)}) imports {b} ({_layer(b)})" for a, b in g.edges
              if LAYERS.index(_layer(b)) > LAYERS.index(_layer(a))]
    assert upward == []


def test_no_import_circles():
    assert [c for c in nx.strongly_connected_components(_graph()) if len(c) > 1] == []


def test_the_core_is_layered_too():
    """errors < types < ops (registry, definitions) < printer, verify < ir < text."""
    order = ["tensorc.errors", "tensorc.types", "tensorc.ops", "tensorc.printer",
             "tensorc.ir", "tensorc.text"]
    g = _graph()
    for i, low in enumerate(order):
        for high in order[i + 1:]:
            assert not nx.has_path(g, low, high), f"{low} reaches {high}"


def test_importing_the_core_loads_nothing_above_it():
    code = ("import sys, tensorc.ir, tensorc.ops, tensorc.text, tensorc.verify\n"
            "print(' '.join(m for m in sys.modules if m.startswith('tensorc')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout.split()
    assert {_layer(m) for m in out} == {"core", "shell"} and set(out) & SHELL == {"tensorc"}
