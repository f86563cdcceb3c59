"""Run a lowered Program on the CPU: one arena, JIT-compiled kernels, a thread pool.

Per shape specialisation everything is bound once: the arena (intermediates), numpy
views over it for library calls, for each kernel launch a ctypes argument block of
buffer pointers, for each library call its native argument blocks. A call then
points the buffers that move (inputs read in place, outputs) at the caller's
memory by rewriting the words that hold their addresses, and runs a list of ctypes
calls. A kernel whose parallel loop is big enough is split into ranges run by the
native pool's `TENSORC_NUM_THREADS` threads at once (`pool.py`).
"""

from __future__ import annotations

import bisect
import ctypes
import math
import threading

import numpy as np

from tensorc.errors import TensorcError
from tensorc.ops import get_op
from tensorc.ops.collective import COLLECTIVES

from ..lowering import Call, IndexCheck, KernelStep, Program, View
from . import codegen, jit, loop_tuning, pool
from .pool import num_threads

# A thread pays off only with this much work (elements touched) to do: handing work
# to a pool thread costs microseconds (tens if it slept), while one core streams ~65K
# floats x 3 passes (a [128, 512] layer_norm) in under 10 us.
MIN_WORK_PER_THREAD = 1 << 19

_ARGTYPES = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]

# A library call's operands by role: what its `patch` calls them (see LIBRARY).
ROLES = {"matmul": ("a", "b"), "attention": ("q", "k", "v", "mask"),
         "matmul_integer": ("a", "b"),
         "linear_attention": ("q", "k", "v", "features", "mask"),
         "local_attention": ("q", "k", "v", "mask"),
         "block_sparse_attention": ("q", "k", "v", "mask")}


def compile_kernels(kernels) -> dict[str, tuple[object, int]]:
    """{kernel name: (ctypes function, its pool job's address)}, one LLVM module for all
    (cached on disk), each kernel on this host's schedule for its class."""
    if not kernels:
        return {}
    names = [k.name for k in kernels]
    addrs = jit.compile_ir(codegen.render(kernels, loop_tuning.kernel_schedule),
                           names + [codegen.job_name(n) for n in names])
    return {n: (jit.cfunc(addrs[n], None, _ARGTYPES), addrs[codegen.job_name(n)])
            for n in names}


def _aligned_bytes(n: int) -> np.ndarray:
    raw = np.empty(n + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start:start + n]


class Runner:
    """A Program bound to memory: `run(arrays, out)` returns the output arrays.

    Inputs are read where the caller keeps them (zero-copy) when the array has the
    buffer's dtype, is C-contiguous and aligned to its item size, and no step writes
    into its buffer; otherwise they are copied into the arena first. The last rule
    is a promise to lowerings: a step may update a graph input's buffer in place, and
    the caller's array is never written. Outputs are computed straight into fresh
    arrays the caller then owns (or into the caller's `out` arrays): an output's
    buffer moves there, later steps that read it included. Only an output that is a
    part of a larger buffer (a slice) is copied out of the arena. The one way a
    caller's input is written: an `out` that is the very input array the Program
    lists as that output's alias (a donated key/value cache, `Program.aliases`: the
    copy between them is then skipped, `KernelStep.skip_if_same`) or as an input its
    kernel may overwrite (`Program.in_place`: an elementwise update, an optimizer's).
    """

    def __init__(self, program: Program, threads: int | None = None):
        self.program = program
        self.threads = threads or num_threads()
        self.arena = _aligned_bytes(max(program.arena_bytes, 1))
        self.fns = compile_kernels(program.kernels)
        self._keep = []
        self._lock = threading.Lock()
        self.collectives = any(isinstance(s, Call) and s.op in COLLECTIVES and s.fallback
                               is False for s in program.steps)
        self._packed: dict[Call, object] = {}   # a weight's PackedB, made once
        # The zero-copy rule: an input buffer that any step writes is always copied.
        written = program.written()
        self.in_place = [b not in written for b in program.inputs]
        self.dtypes = [np.dtype(_np(b.dtype)) for b in program.inputs]
        # output index -> the indices of the inputs it may be donated from
        # (Program.aliases, Program.in_place)
        self._alias_of: dict[int, list[int]] = {}
        for i, b in program.aliases.items():
            self._alias_of.setdefault(i, []).append(program.inputs.index(b))
        for i, bufs in program.in_place.items():
            self._alias_of.setdefault(i, []).extend(program.inputs.index(b) for b in bufs)
        self.homes = [self.array(View(b, 0, (b.numel,), (1,))) for b in program.inputs]
        self.out_dtypes = [np.dtype(_np(v.buf.dtype)) for v in program.outputs]
        # an output view that is all of its buffer: the buffer itself moves to the result
        self.direct = [v.buf.numel == math.prod(v.shape) for v in program.outputs]
        moving = [b for b, ok in zip(program.inputs, self.in_place, strict=True) if ok]
        moving += [v.buf for v, ok in zip(program.outputs, self.direct, strict=True) if ok]
        # per moving buffer: its memory now (an array, its address; the arena at first)
        # and what holds its address: argument-block words, library `patch`es, and
        # steps that hold numpy views of it (bound again when it moves)
        self._base = {b: self.array(View(b, 0, (b.numel,), (1,))) for b in moving}
        self._addr = {b: self.pointer(b) for b in moving}
        self._words: dict = {b: [] for b in moving}
        self._patches: dict = {b: [] for b in moving}
        self._rebind: dict = {b: [] for b in moving}
        self.steps = [self.bind(s, i) for i, s in enumerate(program.steps)]
        self.outputs = [self.array(v) for v in program.outputs]   # for `copied` outputs

    def array(self, v: View) -> np.ndarray:
        """A numpy view of a planned view (over the arena, a constant's data, or the
        memory a moving buffer is in now)."""
        dtype = np.dtype(_np(v.buf.dtype))
        if v.buf.kind == "const":
            base = v.buf.data.reshape(-1).view(dtype)
        elif v.buf in getattr(self, "_base", ()):
            base = self._base[v.buf].reshape(-1).view(dtype)
        else:
            base = self.arena[v.buf.offset:v.buf.offset + v.buf.nbytes].view(dtype)
        arr = np.lib.stride_tricks.as_strided(
            base[v.offset:], v.shape, tuple(s * dtype.itemsize for s in v.strides))
        if v.buf.kind == "const":
            arr.flags.writeable = False
        return arr

    def pointer(self, buf) -> int:
        if buf.kind == "const":
            return buf.data.ctypes.data
        if buf in getattr(self, "_addr", ()):
            return self._addr[buf]
        return self.arena.ctypes.data + buf.offset

    def bind(self, step, index: int, register: bool = True):
        """A zero-argument function running `step`; `register`: note, for each moving
        buffer it uses, how to follow that buffer when it moves."""
        if isinstance(step, KernelStep):
            fn, job = self.fns[step.kernel.name]
            args = (ctypes.c_void_p * max(len(step.args), 1))(*[self.pointer(b)
                                                                for b in step.args])
            self._keep.append(args)
            for i, b in enumerate(step.args):
                if b in self._words:
                    self._words[b].append((args, i))
            address = ctypes.addressof(args)
            extent = step.kernel.parallel_extent
            threads = min(self.threads, extent, max(1, step.work // MIN_WORK_PER_THREAD))
            if threads > 1:
                block = np.array([address, extent, threads], np.int64)
                self._keep.append(block)
                run = pool.launcher(job, block.ctypes.data, threads, threads)
            else:
                def run():
                    fn(address, 0, extent)
            if step.skip_if_same is None:
                return run
            src, dst = step.skip_if_same

            def copy():   # nothing to do where the caller donated the input as the output
                if self.pointer(src) != self.pointer(dst):
                    run()
            return copy
        if register and any(b in self._rebind for b in step.reads() + step.writes()):
            fn = self.bind(step, index, register=False)
            patch = getattr(fn, "patch", None)
            roles = []
            if isinstance(step, Call) and patch is not None:
                roles = list(zip(ROLES[step.op], step.inputs, strict=False))
                roles += [("out", step.outputs[0])]
                roles += [(k, v) for k, v in step.epilogue.items() if isinstance(v, View)]
            moving = set(step.reads() + step.writes()) & self._rebind.keys()
            if moving <= {v.buf for _, v in roles}:   # every use of them has a role
                for role, v in roles:
                    if v.buf in self._patches:
                        self._patches[v.buf].append(
                            (patch, role, v.offset * np.dtype(_np(v.buf.dtype)).itemsize))
            else:   # numpy views of a moving buffer: made again when it moves
                for b in moving:
                    self._rebind[b].append(index)
            return fn
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
                return _reference(step.op, step.attrs, ins, outs)
            if step.op == "matmul" and step.inputs[1].buf.kind == "const" \
                    and len(step.inputs[1].shape) == 2:   # a weight: packed once, here
                if step not in self._packed:   # mostly zeros: the sparse kernel's CSC
                    from .sparse_gemm import pack_weight
                    self._packed[step] = pack_weight(ins[1], self.threads,
                                                     step.epilogue.get("activation"))
                ins[1] = self._packed[step]
            if step.op == "matmul_integer" and step.inputs[1].buf.kind == "const" \
                    and len(step.inputs[1].shape) == 2:   # an int8 weight: packed once
                if step not in self._packed:
                    from .qgemm import PackedQB
                    self._packed[step] = PackedQB(ins[1], threads=self.threads)
                ins[1] = self._packed[step]
            epilogue = {k: self.array(v) if isinstance(v, View) else v
                        for k, v in step.epilogue.items()}
            return LIBRARY[step.op](step.attrs, ins, outs, epilogue, self.threads)
        raise TypeError(f"unknown step {step!r}")

    def move(self, buf, memory: np.ndarray, rebind: set) -> None:
        """Point `buf`'s users at `memory` (an array with buf's layout)."""
        address = memory.ctypes.data
        if address == self._addr[buf]:
            return
        self._addr[buf] = address
        if self._rebind[buf]:   # only then: else the caller's array is not kept alive
            self._base[buf] = memory
        for args, i in self._words[buf]:
            args[i] = address
        for patch, role, offset in self._patches[buf]:
            patch(role, address + offset)
        rebind.update(self._rebind[buf])

    def _donated(self, i: int, o, arrays):
        """The input array the caller passed again as output i's `out`, where the Program
        lets output i share that input's memory (`Program.aliases`: a cache updated in
        place; `Program.in_place`: an elementwise update) and the input is read in
        place; else None."""
        if o is None:
            return None
        for j in self._alias_of.get(i, ()):
            buf, a = self.program.inputs[j], arrays[j]
            if a.ctypes.data == o.ctypes.data and a.nbytes == o.nbytes \
                    and self.pointer(buf) == a.ctypes.data:
                return a
        return None

    def run(self, arrays: list[np.ndarray], out: list | None = None) -> list[np.ndarray]:
        """The outputs for these inputs (checked by the caller: shapes and dtype names);
        `out`: per output, an array to write it into (C-contiguous, its dtype and shape),
        or None."""
        if self.collectives and not self._lock.acquire(blocking=False):
            # waiting would deadlock: the caller holding the arena is in a collective
            # that needs this rank
            raise TensorcError("an llvm executable with collectives is running on another "
                               "thread: compile one executable per rank")
        elif not self.collectives:
            self._lock.acquire()
        try:   # one arena: calls on one executable take turns
            return self._run(arrays, out)
        finally:
            self._lock.release()

    def _run(self, arrays, out):
        rebind: set = set()
        for buf, a, home, dtype, ok in zip(self.program.inputs, arrays, self.homes,
                                           self.dtypes, self.in_place, strict=True):
            if ok and a.dtype == dtype and a.flags.c_contiguous and a.flags.aligned:
                self.move(buf, a, rebind)
            else:
                home[...] = np.asarray(a).reshape(-1)
                if ok:
                    self.move(buf, home, rebind)
        results, spans = [], None
        for i, (v, dtype, direct) in enumerate(zip(self.program.outputs, self.out_dtypes,
                                                   self.direct, strict=True)):
            o = out[i] if out is not None else None
            if o is not None:
                if spans is None:
                    spans = _Spans(arrays)
                donated = self._donated(i, o, arrays)
                if not o.flags.aligned or spans.overlaps(o, donated):
                    o = None
                else:
                    spans.add(o)
            if o is None:
                o = np.empty(v.shape, dtype)   # else the caller's array, checked
            if direct:
                self.move(v.buf, o, rebind)
            results.append(o)
        for i in rebind:
            self.steps[i] = self.bind(self.program.steps[i], i, register=False)
        for step in self.steps:
            step()
        for i, (o, direct) in enumerate(zip(results, self.direct, strict=True)):
            if not direct:
                o[...] = self.outputs[i]
            elif out is not None and out[i] is not None and o is not out[i]:
                out[i][...] = o   # the caller's `out` overlapped an input: computed aside
                results[i] = out[i]
        return results


class _Spans:
    """Which memory a call's arrays hold, for the `out` overlap test: the inputs' and the
    `out` arrays taken so far. np.may_share_memory's bounds test, in O(log n) per array
    instead of a pass over all of them (a graph with hundreds of inputs and outputs, an
    optimizer's update, paid milliseconds per call for the pairs)."""

    def __init__(self, arrays):
        spans = sorted((lo, hi, k) for k, a in enumerate(arrays)
                       for lo, hi in [_bounds(a)] if hi > lo)
        self.arrays = arrays
        self.starts = [lo for lo, _, _ in spans]
        self.spans = spans
        self.reach, top = [], -1   # the furthest end among spans[:j + 1]
        for _, hi, _ in spans:
            top = max(top, hi)
            self.reach.append(top)
        self.taken_starts: list[int] = []   # `out` arrays taken: disjoint, sorted
        self.taken_ends: list[int] = []

    def overlaps(self, o: np.ndarray, donated) -> bool:
        """Whether `o` overlaps an input other than `donated` or an `out` taken before."""
        lo, hi = _bounds(o)
        if hi <= lo:
            return False
        j = bisect.bisect_left(self.taken_starts, hi)
        if j and self.taken_ends[j - 1] > lo:
            return True
        j = bisect.bisect_left(self.starts, hi) - 1
        while j >= 0 and self.reach[j] > lo:   # spans[j] may end past lo
            _, s_hi, k = self.spans[j]
            if s_hi > lo and self.arrays[k] is not donated:
                return True
            j -= 1
        return False

    def add(self, o: np.ndarray) -> None:
        lo, hi = _bounds(o)
        if hi > lo:
            j = bisect.bisect_left(self.taken_starts, lo)
            self.taken_starts.insert(j, lo)
            self.taken_ends.insert(j, hi)


def _bounds(a: np.ndarray) -> tuple[int, int]:
    """[first byte, past the last byte) of an array's memory (np.byte_bounds)."""
    if a.flags.c_contiguous:
        lo = a.ctypes.data
        return lo, lo + a.nbytes
    return _byte_bounds(a)


try:
    from numpy.lib.array_utils import byte_bounds as _byte_bounds
except ImportError:   # numpy < 2
    _byte_bounds = np.byte_bounds


def _np(dtype: str):
    from tensorc.ir import DTYPES
    return DTYPES[dtype]


def _reference(op: str, attrs: dict, ins: list, outs: list):
    """A step running the op's numpy reference on views of the buffers."""
    opdef = get_op(op)

    def reference():
        for o, r in zip(outs, opdef.evaluate(ins, attrs), strict=True):
            np.copyto(o, r, casting="unsafe")
    return reference


# --- library calls: op -> bind(attrs, inputs, outputs, epilogue, threads) -> step ------

def _matmul(attrs, ins, outs, epilogue, threads):
    # float32: lowering generates kernels for other types; a weight's B comes packed
    # (Runner.bind)
    from .gemm import bind
    a, b = ins
    kwargs = {k: epilogue[k] for k in ("bias", "activation", "residual") if k in epilogue}
    if getattr(b, "sparse", False):   # a pruned weight (sparse_gemm.pack_weight)
        from .sparse_gemm import bind
    return bind(a, b, outs[0], threads=threads, **kwargs)  # checks and arguments made once


def _attention(attrs, ins, outs, epilogue, threads):
    from .attention import bind
    return bind(*ins, **attrs, threads=threads, out=outs[0])


def _sparse_attention(op):
    def binder(attrs, ins, outs, epilogue, threads):
        from .sparse_attention import bind
        return bind(op, *ins, **attrs, threads=threads, out=outs[0])
    return binder


def _attention_grad(attrs, ins, outs, epilogue, threads):
    # no `patch`: the runner binds it again when an operand's buffer moves
    from .attention_grad import bind
    q, k, v, *mask, dy = ins
    return bind(q, k, v, dy, *mask, **attrs, threads=threads, out=outs)


def _matmul_integer(attrs, ins, outs, epilogue, threads):
    # u8 A x s8 B (a weight's comes packed: Runner.bind); int32 out, or float32 with the
    # scales (and bias, activation, residual) of the epilogue
    from .qgemm import bind
    a, b = ins
    kwargs = {k: epilogue[k] for k in ("a_zero", "row_scale", "col_scale", "bias",
                                       "activation", "residual") if k in epilogue}
    return bind(a, b, outs[0], threads=threads, **kwargs)


def _linear_attention(attrs, ins, outs, epilogue, threads):
    from .linear_attention import bind
    return bind(*ins, **attrs, threads=threads, out=outs[0])


def _collective(op: str):
    # the reference runs the collective on the running rank's communicator
    # (ops.collective.group): the buffers' views go straight to it
    return lambda attrs, ins, outs, epilogue, threads: _reference(op, attrs, ins, outs)


LIBRARY = {"matmul": _matmul, "attention": _attention, "attention_grad": _attention_grad,
           "matmul_integer": _matmul_integer, "linear_attention": _linear_attention,
           "local_attention": _sparse_attention("local_attention"),
           "block_sparse_attention": _sparse_attention("block_sparse_attention")}
LIBRARY.update({op: _collective(op) for op in COLLECTIVES})
