"""tensorc: a small, hackable graph compiler for transformer models.

    import tensorc
    model = tensorc.models.get("gpt", preset="tiny")
    graph = tensorc.trace(model, **model.example_inputs(batch=2, seq=16))
    exe = tensorc.compile(graph, backend="numpy", passes="O0")
    logits = exe(**model.example_inputs(batch=2, seq=16))
"""

import os as _os

# In a source checkout the subpackages (frontend/, passes/, backends/, models/) are
# folders beside this one; the install maps them inside via package-dir. Looking
# beside us too makes `python -c "import tensorc.frontend"` work from the repo root.
if not _os.path.isdir(_os.path.join(__path__[0], "frontend")):
    __path__.append(_os.path.dirname(__path__[0]))

from .errors import TensorcError  # noqa: E402
from .ir import Graph, Node, TensorType, Value  # noqa: E402
from .text import parse_graph  # noqa: E402

TensorSpec = TensorType  # what `trace` takes for an input given by shape and dtype

__version__ = "0.1.0"
__all__ = ["Graph", "Node", "TensorSpec", "TensorType", "TensorcError", "Value", "compile",
           "generate", "parse_graph", "trace", "tune"]


def __getattr__(name):
    # The shell and the layers above the core load on first use: importing the core
    # (`tensorc.ir`, which runs this file first) must not pull them in.
    import importlib
    if name in ("compile", "trace", "tune"):
        return getattr(importlib.import_module("tensorc.api"), name)
    if name == "generate":
        return importlib.import_module("tensorc.generation").generate
    if name in ("models", "frontend", "passes", "backends"):
        return importlib.import_module(f"tensorc.{name}")
    raise AttributeError(f"module 'tensorc' has no attribute {name!r}")
