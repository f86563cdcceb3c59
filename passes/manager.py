"""The pass manager: the registry of passes, pipelines and explainers, and running a
pipeline. Pass modules register into it; nothing here imports them (passes/__init__
does, below nothing)."""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable

from tensorc.errors import TensorcError
from tensorc.ir import Graph
from tensorc.text import parse_scalar

PASSES: dict[str, Callable[..., Graph]] = {}
PIPELINES: dict[str, list[str]] = {"O0": []}
# Explainers say why a rewrite did not fire: explain(graph) -> lines, for `inspect --explain`.
EXPLAINERS: dict[str, Callable[[Graph], list[str]]] = {}


def explain(graph: Graph) -> list[str]:
    """Every registered explainer's report on `graph`."""
    return [line for fn in EXPLAINERS.values() for line in fn(graph)]


def register_pass(name: str):
    def deco(fn: Callable[..., Graph]) -> Callable[..., Graph]:
        if name in PASSES:
            raise TensorcError(f"pass {name!r} is registered twice")
        PASSES[name] = fn
        return fn
    return deco


def parse_pipeline(spec: str) -> list[tuple[str, dict]]:
    """``"O1,foo:k=1:j=x"`` -> the flat list of (pass name, kwargs). A first argument
    without ``=`` is the value of the pass's first option (``cast-weights:bf16``)."""
    steps: list[tuple[str, dict]] = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, *args = item.split(":")
        if name in PIPELINES:
            if args:
                raise TensorcError(f"pipeline {name} takes no arguments")
            steps += parse_pipeline(",".join(PIPELINES[name]))
            continue
        if name not in PASSES:
            known = ", ".join(list(PIPELINES) + sorted(PASSES))
            raise TensorcError(f"unknown pass or pipeline {name!r} (known: {known})")
        kwargs = {}
        for i, a in enumerate(args):
            key, eq, val = a.partition("=")
            if not eq and i == 0:   # a bare first argument sets the pass's first option:
                key, val = _first_option(name, a), a   # cast-weights:bf16 = ...:dtype=bf16
            elif not eq:
                raise TensorcError(f"pass argument {a!r} of {name} should be key=value")
            kwargs[key.replace("-", "_")] = parse_scalar(val)
        try:
            inspect.signature(PASSES[name]).bind(None, **kwargs)
        except TypeError as e:
            raise TensorcError(f"pass {name}: {e}") from None
        steps.append((name, kwargs))
    return steps


def _first_option(name: str, arg: str) -> str:
    """The name of pass `name`'s first option (the parameter after the graph)."""
    params = list(inspect.signature(PASSES[name]).parameters.values())[1:]
    named = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if not named:
        raise TensorcError(f"pass {name} takes no arguments, got {arg!r}")
    return named[0]


def run_pipeline(graph: Graph, spec: str, *, verify: bool = False, disable=(),
                 after: Callable[[str, Graph, float], None] | None = None,
                 options: dict[str, dict] | None = None) -> Graph:
    """Run the passes of `spec` in order. `verify` checks the graph after each pass;
    `after(name, graph, seconds)` is called after each pass (for --print-after,
    --time-passes and per-pass comparison). `options`: keyword arguments per pass name
    that text cannot carry (the calibration batches the CLI loaded), under those the
    spec gives."""
    for name, kwargs in parse_pipeline(spec):
        if name in disable:
            continue
        kwargs = {**(options or {}).get(name, {}), **kwargs}
        t0 = time.perf_counter()
        graph = PASSES[name](graph, **kwargs)
        if verify:
            graph.verify()
        if after:
            after(name, graph, time.perf_counter() - t0)
    return graph
