"""Run a lowered Program on the CPU: one arena, JIT-compiled kernels, a thread pool.

Per shape specialisation everything is fixed once: the arena (all intermediates,
inputs copied in at each call), numpy views over it for library calls, and for
each kernel launch a ctypes argument block of buffer pointers. A call is then a
list of ctypes calls. A kernel whose parallel loop is big enough is split into
ranges run by the native pool's `TENSORC_NUM_THREADS` threads at once (`pool.py`).
"""

from __future__ import annotations

import ctypes
import threading

import numpy as np

from tensorc.errors import TensorcError
from tensorc.ops import get_op

from ..lowering import Call, IndexCheck, KernelStep, Program, View
from . import codegen, jit, pool
from .pool import num_threads

# A thread pays off only with this much work (elements touched) to do: handing work
# to a pool thread costs microseconds (tens if it slept), while one core streams ~65K
# floats x 3 passes (a [128, 512] layer_norm) in under 10 us.
MIN_WORK_PER_THREAD = 1 << 19

_ARGTYPES = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]


def compile_kernels(kernels) -> dict[str, tuple[object, int]]:
    """{kernel name: (ctypes function, its pool job's address)}, one LLVM module for all
    (cached on disk)."""
    if not kernels:
        return {}
    names = [k.name for k in kernels]
    addrs = jit.compile_ir(codegen.render(kernels),
                           names + [codegen.job_name(n) for n in names])
    return {n: (jit.cfunc(addrs[n], None, _ARGTYPES), addrs[codegen.job_name(n)])
            for n in names}


def _aligned_bytes(n: int) -> np.ndarray:
    raw = np.empty(n + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start:start + n]


class Runner:
    """A Program bound to memory: call `run(arrays)` to get the output arrays."""

    def __init__(self, program: Program, threads: int | None = None):
        self.program = program
        self.threads = threads or num_threads()
        self.arena = _aligned_bytes(max(program.arena_bytes, 1))
        self.fns = compile_kernels(program.kernels)
        self._keep = []
        self._lock = threading.Lock()
        self.inputs = [self.array(View(b, 0, (b.numel,), (1,))) for b in program.inputs]
        self.outputs = [self.array(v) for v in program.outputs]
        self.steps = [self.bind(s) for s in program.steps]

    def array(self, v: View) -> np.ndarray:
        """A numpy view of a planned view (over the arena, or a constant's data)."""
        dtype = np.dtype(_np(v.buf.dtype))
        if v.buf.kind == "const":
            base, start = v.buf.data.reshape(-1).view(dtype), v.offset
        else:
            base, start = self.arena[v.buf.offset:v.buf.offset + v.buf.nbytes].view(dtype), \
                v.offset
        arr = np.lib.stride_tricks.as_strided(
            base[start:], v.shape, tuple(s * dtype.itemsize for s in v.strides))
        if v.buf.kind == "const":
            arr.flags.writeable = False  # marks weights (GEMM packs them once)
        return arr

    def pointer(self, buf) -> int:
        if buf.kind == "const":
            return buf.data.ctypes.data
        return self.arena.ctypes.data + buf.offset

    def bind(self, step):
        if isinstance(step, KernelStep):
            fn, job = self.fns[step.kernel.name]
            args = (ctypes.c_void_p * max(len(step.args), 1))(*[self.pointer(b)
                                                                for b in step.args])
            self._keep.append(args)
            address = ctypes.addressof(args)
            extent = step.kernel.parallel_extent
            threads = min(self.threads, extent, max(1, step.work // MIN_WORK_PER_THREAD))
            if threads > 1:
                block = np.array([address, extent, threads], np.int64)
                self._keep.append(block)
                return lambda: pool.run(job, block.ctypes.data, threads, threads)
            return lambda: fn(address, 0, extent)
        if isinstance(step, IndexCheck):
            idx = self.array(step.view)

            def check():
                problem = idx.size and step.problem(int(idx.min()), int(idx.max()))
                if problem:
                    raise TensorcError(problem)
            return check
        if isinstance(step, Call):
            ins = [self.array(v) for v in step.inputs]
            outs = [self.array(v) for v in step.outputs]
            if step.fallback:
                opdef = get_op(step.op)

                def reference():
                    for o, r in zip(outs, opdef.evaluate(ins, step.attrs), strict=True):
                        np.copyto(o, r, casting="unsafe")
                return reference
            epilogue = {k: self.array(v) if isinstance(v, View) else v
                        for k, v in step.epilogue.items()}
            return LIBRARY[step.op](step.attrs, ins, outs[0], epilogue, self.threads)
        raise TypeError(f"unknown step {step!r}")

    def run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        with self._lock:  # one arena: calls on one executable take turns
            return self._run(arrays)

    def _run(self, arrays):
        for dst, a in zip(self.inputs, arrays, strict=True):
            dst[...] = np.asarray(a).reshape(-1)
        for step in self.steps:
            step()
        return [np.array(o) for o in self.outputs]


def _np(dtype: str):
    from tensorc.ir import DTYPES
    return DTYPES[dtype]


# --- library calls: op -> bind(attrs, inputs, out, epilogue, threads) -> step ----------

def _matmul(attrs, ins, out, epilogue, threads):
    a, b = ins   # float32: lowering generates kernels for other types
    from .gemm import PackedB, bind
    if b.ndim == 2 and not b.flags.writeable:  # a weight: pack it once, here
        b = PackedB(b, threads=threads)
    kwargs = {k: epilogue[k] for k in ("bias", "activation", "residual") if k in epilogue}
    return bind(a, b, out, threads=threads, **kwargs)  # checks and arguments made once


def _attention(attrs, ins, out, epilogue, threads):
    from .attention import bind
    return bind(*ins, **attrs, threads=threads, out=out)  # writes into the arena


LIBRARY = {"matmul": _matmul, "attention": _attention}
