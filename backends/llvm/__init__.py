"""The LLVM CPU backend: lowered kernels JIT-compiled for the host CPU.

`BACKEND.compile(graph)` returns an executable that lowers and compiles the graph
once per set of concrete input shapes (`backends/lowering/` -> kernel IR ->
`codegen.py` -> `jit.py`), then runs it with `runtime.Runner`. Matmuls go to the
scheduled GEMM (`gemm.py`), attention to the flash-attention kernel
(`attention.py`), Performer attention to `linear_attention.py`; ops without a lowering
run their numpy reference, listed in `stats()["fallbacks"]`.
"""

from __future__ import annotations

import os
import threading

from tensorc.ir import Graph

from .. import Backend, Executable, kernel_ir
from ..lowering import Program, lower

# What this target's library has: the integer GEMM (qgemm.py) takes quantized matmuls
# and their dequantize epilogue; sparse attention (sparse_attention.py) and Performer
# attention (linear_attention.py) have kernels.
LOWERING = {"int8_gemm": "weights", "sparse_attention": True, "linear_attention": True}


class LLVMExecutable(Executable):
    def __init__(self, graph: Graph, threads: int | None = None, tune: bool = False):
        super().__init__(graph)
        self.threads = threads
        self.tune = tune   # TENSORC_TUNE=1: tune each new shape set's kernels on first use
        self._runners: dict[tuple, object] = {}
        self._lock = threading.Lock()

    def specialise(self, env: dict[str, int]):
        """The runner for these symbol bindings (lowered and compiled on first use)."""
        key = tuple(sorted(env.items()))
        with self._lock:
            runner = self._runners.get(key)
            if runner is None:
                from .runtime import Runner
                program = lower(self.graph, env, **LOWERING)
                _compile_ahead(program, self.threads)
                runner = self._runners[key] = Runner(program, self.threads)
            return runner

    def execute(self, arrays, env):
        return self.specialise(env).run(arrays)

    def bind(self, env):
        if self.tune:
            return self._tune_first(env)
        return self.specialise(env).run   # run(arrays, out)

    def _tune_first(self, env):
        """run(arrays, out) whose first call records the kernels' (kernel, key) pairs,
        tunes those this host has no verdict for (within TENSORC_TUNE_BUDGET seconds),
        and binds the shape set again with the tuned schedules for the calls after."""
        from . import tuning
        budget = tuning.budget_from_env()   # a bad value fails before any work
        key = tuple(sorted(env.items()))
        bound = None

        def run(arrays, out):
            nonlocal bound
            if bound is None:
                with self._lock:   # bound (again) inside record(): its kernels are seen
                    self._runners.pop(key, None)
                with tuning.record() as seen:
                    outs = self.specialise(env).run(arrays, out)
                if any(r.chosen != r.default for r in tuning.tune_pending(seen, budget)):
                    with self._lock:   # bound again: its kernels ask for the new schedules
                        self._runners.pop(key, None)
                bound = self.specialise(env).run
                return outs
            return bound(arrays, out)
        return run

    def program(self, env: dict[str, int] | None = None) -> Program:
        return self.specialise(env or {}).program

    def stats(self, env: dict[str, int] | None = None) -> dict:
        """Kernel launches, library calls, reference fallbacks, arena bytes."""
        return self.program(env).stats()


def _compile_ahead(program: Program, threads: int | None) -> None:
    """Have a second process compile, while this one compiles the rest, the attention
    kernels `program` calls (the largest library modules, one per mask kind) and its
    GEMMs' activation epilogues (`jit.compile_ahead`): on a cold cache the two cores
    share the JIT work (a decode step's GEMV module, the attention backward too)."""
    import math

    from . import (
        attention,
        attention_grad,
        gemm,
        gemm_ir,
        gemv,
        jit,
        linear_attention,
        sparse_attention,
    )
    kinds, groups, rows, backward, sparse = {}, set(), set(), set(), set()
    linear = False
    for step in program.steps:
        if getattr(step, "fallback", True):
            continue
        if step.op == "matmul" and step.inputs[1].buf.kind == "const" \
                and math.prod(step.inputs[0].shape[:-1]) <= gemv.GEMV_MAX_M:
            rows.add(step.inputs[1].buf.dtype == "bf16")   # which GEMV module
        linear |= step.op == "linear_attention"
        if step.op in ("attention", "attention_grad"):
            mask = step.inputs[3].buf.dtype if len(step.inputs) > 3 + (
                step.op == "attention_grad") else None
            kind = {None: "none", "bool": "keep", "f32": "add"}.get(mask)
            if step.op == "attention_grad":
                backward.add(kind)
            elif kind is not None:   # the module of the schedule the call will run
                q, k, v = (x.shape for x in step.inputs[:3])
                job = attention.ahead(kind, attention.schedule_of(
                    q, k, v, step.attrs.get("causal", False), kind))
                kinds[job[0]] = job
        elif step.op in sparse_attention.OPS:
            mask = step.inputs[3].buf.dtype if len(step.inputs) > 3 else None
            sparse.add({None: "none", "bool": "keep", "f32": "add"}.get(mask))
        elif step.op == "matmul" and step.epilogue.get("activation") not in (None, "none"):
            a, b = step.inputs
            if len(b.shape) == 2 and b.buf.kind == "const":
                groups.update(g for g in gemm.library_groups(
                    math.prod(a.shape[:-1]), b.shape[0], b.shape[1],
                    step.epilogue["activation"], threads, b.buf.dtype == "bf16")
                    if not g.startswith("pack_a"))
    jit.compile_ahead([kinds[name] for name in sorted(kinds)]
                      + [gemm_ir.ahead(g) for g in sorted(groups)]
                      + [gemv.ahead(bf16) for bf16 in sorted(rows)]
                      + [attention_grad.ahead(k) for k in sorted(backward - {None})]
                      + [linear_attention.ahead()] * linear
                      + [sparse_attention.ahead(k) for k in sorted(sparse - {None})])


class LLVMBackend(Backend):
    name = "llvm"

    def compile(self, graph: Graph, threads: int | None = None) -> Executable:
        tune = os.environ.get("TENSORC_TUNE", "") not in ("", "0")   # docs/tuning.md
        return LLVMExecutable(graph, threads, tune)

    def planned_memory_bytes(self, graph: Graph, env: dict[str, int]) -> int:
        """The arena of the lowered Program: buffers packed by liveness."""
        from ..lowering import planned_memory
        return planned_memory(graph, env, **LOWERING)["arena_bytes"]

    def emit_source(self, graph: Graph, directory: str, env: dict[str, int] | None = None
                    ) -> list[str]:
        """One .ll file per generated kernel. Kernels are specialised on shapes: symbols
        not bound by `env` are taken as 1 (each file's first line says which)."""
        from tensorc.ir import dim_symbols

        from . import codegen, loop_tuning
        env = dict(env or {})
        for v in graph.inputs:
            for d in v.type.shape:
                for sym in dim_symbols(d):
                    env.setdefault(sym, 1)
        shapes = ", ".join(f"{k}={v}" for k, v in sorted(env.items())) or "static"
        os.makedirs(directory, exist_ok=True)
        paths = []
        for k in lower(graph, env, **LOWERING).kernels:
            path = os.path.join(directory, k.name + ".ll")
            with open(path, "w") as f:
                f.write(f"; tensorc kernel {k.name} ({shapes})\n")
                f.write("".join(f"; {line}\n" for line in
                                kernel_ir.format_kernel(k).splitlines()))
                f.write(codegen.render([k], loop_tuning.kernel_schedule))
            paths.append(path)
        return paths


BACKEND = LLVMBackend()
