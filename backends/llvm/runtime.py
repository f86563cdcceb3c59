"""Run a lowered Program on the CPU: one arena, JIT-compiled kernels, a thread pool.

Per shape specialisation everything is fixed once: the arena (all intermediates,
inputs copied in at each call), numpy views over it for library calls, and for
each kernel launch a ctypes argument block of buffer pointers. A call is then a
list of ctypes calls. ctypes releases the GIL, so a kernel whose parallel loop is
big enough is split into ranges run by `TENSORC_NUM_THREADS` threads at once.
"""

from __future__ import annotations

import ctypes
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from tensorc.errors import TensorcError
from tensorc.ops import get_op

from ..lowering import Call, IndexCheck, KernelStep, Program, View
from . import codegen, jit
from .pool import num_threads

# A thread pays off only with this much work (elements touched) to do: waking a pool
# thread costs about 10-15 us, while one core streams ~65K floats x 3 passes (a
# [128, 512] layer_norm) in under 10 us.
MIN_WORK_PER_THREAD = 1 << 19

_ARGTYPES = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]


_pools: dict[int, ThreadPoolExecutor] = {}
_pool_lock = threading.Lock()


def pool(threads: int) -> ThreadPoolExecutor:
    with _pool_lock:
        if threads not in _pools:
            _pools[threads] = ThreadPoolExecutor(threads - 1, "tensorc-llvm")
        return _pools[threads]


def parallel_for(fn, extent: int, threads: int) -> None:
    """fn(lo, hi) over [0, extent) in `threads` near-equal ranges, this thread included."""
    threads = max(1, min(threads, extent))
    if threads == 1:
        fn(0, extent)
        return
    cuts = [extent * i // threads for i in range(threads + 1)]
    futures = [pool(threads).submit(fn, lo, hi) for lo, hi in zip(cuts[1:-1], cuts[2:],
                                                                   strict=True)]
    fn(cuts[0], cuts[1])
    for f in futures:
        f.result()


def compile_kernels(kernels) -> dict[str, object]:
    """{kernel name: ctypes function}, one LLVM module for all (cached on disk)."""
    if not kernels:
        return {}
    addrs = jit.compile_ir(codegen.render(kernels), [k.name for k in kernels])
    return {name: jit.cfunc(a, None, _ARGTYPES) for name, a in addrs.items()}


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
            fn = self.fns[step.kernel.name]
            args = (ctypes.c_void_p * max(len(step.args), 1))(*[self.pointer(b)
                                                                for b in step.args])
            self._keep.append(args)
            address = ctypes.addressof(args)
            extent = step.kernel.parallel_extent
            threads = min(self.threads, max(1, step.work // MIN_WORK_PER_THREAD))
            if threads > 1 and extent > 1:
                return lambda: parallel_for(lambda lo, hi: fn(address, lo, hi), extent, threads)
            return lambda: fn(address, 0, extent)
        if isinstance(step, IndexCheck):
            idx, n, where = self.array(step.view), step.n, step.where

            def check():
                if idx.size and (idx.min() < -n or idx.max() >= n):
                    bad = idx.max() if idx.max() >= n else idx.min()
                    raise TensorcError(f"{where}: index {bad} is out of range for an axis "
                                       f"of size {n}")
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
    a, b = ins
    if a.dtype != np.float32 or b.dtype != np.float32:
        def numpy_matmul():  # the scheduled GEMM is float32 only
            np.matmul(a, b, out=out)
        return numpy_matmul
    from .gemm import PackedB, bind
    if b.ndim == 2 and not b.flags.writeable:  # a weight: pack it once, here
        b = PackedB(b, threads=threads)
    kwargs = {k: epilogue[k] for k in ("bias", "activation", "residual") if k in epilogue}
    return bind(a, b, out, threads=threads, **kwargs)  # checks and arguments made once


def _attention(attrs, ins, out, epilogue, threads):
    from .attention import bind
    return bind(*ins, **attrs, threads=threads, out=out)  # writes into the arena


LIBRARY = {"matmul": _matmul, "attention": _attention}
