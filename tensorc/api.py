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


def tune(model, inputs: dict, budget: float = 60.0, passes: str = "O2", repeat: int = 5,
         min_seconds: float = 1.0, report=None) -> dict:
    """Tune, on this host and within `budget` seconds, the kernel schedules a model (a
    `Module`, traced on `inputs`, or a `Graph`) runs at the shapes of `inputs` (a dict of
    arrays by input name), and save them to the per-host cache that every later llvm
    compile reads. Executables bound before keep their schedules: compile again.

    Returns the report: per (kernel, key) the default and chosen schedules and their
    times, and the model's end-to-end latency untuned vs tuned (median of at least
    `repeat` runs each, interleaved, for at least `min_seconds`). `report(result)` is
    called as each kernel is done."""
    import math
    import statistics
    import time

    from tensorc.backends.llvm import LLVMExecutable, tuning
    from tensorc.passes import run_pipeline

    from .errors import TensorcError
    if not (isinstance(budget, int | float) and budget > 0 and math.isfinite(budget)):
        raise TensorcError(f"the tuning budget must be a positive number of seconds, "
                           f"got {budget!r}")
    graph = run_pipeline(model if isinstance(model, Graph) else trace(model, **inputs), passes)
    start = time.perf_counter()
    with tuning.defaults():   # bound (on first call) with the default schedules
        untuned = LLVMExecutable(graph)   # not tensorc.compile: TENSORC_TUNE plays no part
        with tuning.record() as seen:
            untuned(**inputs)
    search = time.perf_counter()
    results = tuning.tune(seen, budget, report=report)
    search = time.perf_counter() - search
    tuned = LLVMExecutable(graph)   # bound with the table tune() just filled
    tuned(**inputs)
    total = time.perf_counter() - start
    times: tuple[list, list] = ([], [])
    until = time.perf_counter() + min_seconds
    while len(times[0]) < repeat or time.perf_counter() < until:
        for exe, ts in ((untuned, times[0]), (tuned, times[1])):   # interleaved: drift
            t = time.perf_counter()                                # favours neither
            exe(**inputs)
            ts.append(time.perf_counter() - t)
    return {"host": tuning.host(), "cache": str(tuning.cache_path()), "budget_s": budget,
            "search_s": search, "total_s": total, "kernels": [r.as_dict() for r in results],
            "changed": sum(r.chosen != r.default for r in results),
            "latency_ms": {"untuned": statistics.median(times[0]) * 1e3,
                           "tuned": statistics.median(times[1]) * 1e3, "runs": len(times[0])}}
