"""The two entry points: `trace` (model -> Graph) and `compile` (Graph -> Executable)."""

from __future__ import annotations

from .ir import Graph


def trace(model, *example_inputs, **named_inputs) -> Graph:
    """Trace a `Module` or function into a verified `Graph`.

    Inputs are numpy arrays or `TensorSpec(shape, dtype)`, positional (named after the
    forward's parameters) or by name. Shapes may hold symbols such as "batch"."""
    from tensorc.frontend.trace import trace as _trace
    return _trace(model, *example_inputs, **named_inputs)


def compile(graph: Graph, backend: str = "numpy", passes: str = "O0"):
    """Rewrite `graph` with the pass pipeline `passes`, then compile it for `backend`."""
    from tensorc.backends import get_backend
    from tensorc.passes import run_pipeline
    return get_backend(backend).compile(run_pipeline(graph, passes))
