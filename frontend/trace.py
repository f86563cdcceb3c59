"""The tracer: run a model on traced tensors and record the ops it performs."""

from __future__ import annotations

import inspect
import re

import numpy as np

from tensorc.errors import TraceError
from tensorc.ir import Graph, TensorType

from .module import Module
from .tensor import Tensor, Tracer


def _input_type(x) -> TensorType:
    if isinstance(x, TensorType):
        return x
    if isinstance(x, Tensor):
        return x.type
    return TensorType.of(np.asarray(x))


def trace(model, *args, **kwargs) -> Graph:
    """Trace a `Module` (its forward) or a function into a verified `Graph`.

    Positional inputs are named after the forward's parameters. Outputs are named
    by the keys of a returned dict, else by the module's `output_names`, else
    ``output`` (``output0``, ``output1``, ... for a tuple)."""
    fn = model.forward if isinstance(model, Module) else model
    params = [p.name for p in inspect.signature(fn).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(args) > len(params):
        raise TraceError(f"{len(args)} example inputs given, but {fn.__qualname__} takes "
                         f"{len(params)}: {', '.join(params)}")
    inputs = dict(zip(params, args, strict=False))
    for name in kwargs:
        if name in inputs:
            raise TraceError(f"input {name!r} is given twice")
    inputs.update(kwargs)

    name = type(model).__name__.lower() if isinstance(model, Module) else fn.__name__
    name = re.sub(r"\W", "_", name)  # e.g. "<lambda>": graph names are identifiers
    graph = Graph(name)
    names: dict[int, str] = {}
    if isinstance(model, Module):
        for pname, t in model.named_tensors():
            if t.data is None:
                raise TraceError(f"parameter {pname!r} has no data: call init_weights() "
                                 "or load_weights() first")
            names[id(t)] = pname
    tracer = Tracer(graph, names)
    traced = {k: Tensor(value=graph.add_input(k, _input_type(x)), tracer=tracer)
              for k, x in inputs.items()}

    if Tracer.current is not None:
        raise TraceError("trace() cannot be nested")
    Tracer.current = tracer
    try:
        result = model(**traced)
    finally:
        Tracer.current = None

    if isinstance(result, dict):
        outs = dict(result)
    elif isinstance(result, (tuple, list)):
        default = [f"output{i}" for i in range(len(result))]
        outs = dict(zip(getattr(model, "output_names", default), result, strict=True))
    else:
        outs = {getattr(model, "output_names", ["output"])[0]: result}
    for oname, t in outs.items():
        if not isinstance(t, Tensor) or t.tracer is not tracer:
            raise TraceError(f"output {oname!r} is not a tensor computed from the inputs")
        v = tracer.value_of(t)
        if v.producer is not None:
            graph.rename(v, oname)
        graph.outputs.append(v)
    return graph.verify()
