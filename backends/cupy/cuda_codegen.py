"""Render kernel IR (`tensorc.backends.kernel_ir`) as CUDA C.

One `Kernel` becomes one `extern "C" __global__` function named after the kernel,
taking its buffers in order and then `lo, hi`, the range of the (collapsed)
parallel loop to run. The parallel loop, together with every loop perfectly nested
directly inside it, is flattened into one index space, and each CUDA thread runs
one point of it (grid-stride, so any grid covers any range): an elementwise
kernel written as `for i parallel { for j { ... } }` gets one thread per element.
Loops below that, and reductions, run sequentially inside the thread.

The text has no #include, so it compiles under NVRTC (cupy.RawModule) and nvcc.
Float semantics follow the kernel IR's rules: no fast math, NaN propagates through
max/min/relu as in numpy, -inf is a value.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tensorc.errors import TensorcError
from tensorc.types import DTYPES

from .. import kernel_ir as K
from .kernels import PRELUDE

# f16 is stored as its raw bits: lowering gives kernels no f16 arithmetic (numpy rounds
# f16 per op), only loads, stores, selects and constants, which move bits exactly.
C_TYPES = {"f32": "float", "f64": "double", "i64": "long long", "i32": "int",
           "i8": "signed char", "u8": "unsigned char", "bool": "bool", "f16": "unsigned short",
           "bf16": "unsigned short"}   # bf16 too: only moved, and converted to/from f32

# Helpers the rendered kernels call. NaN-propagating max/min/relu like numpy's
# maximum/minimum; the reference's rsqrt and sigmoid are exact divisions.
CODEGEN_PRELUDE = r"""
#ifndef TC_CODEGEN_PRELUDE
#define TC_CODEGEN_PRELUDE
template <class T> __device__ __forceinline__ T tc_max(T a, T b) {
    return a != a ? a : (b != b ? b : (a > b ? a : b));
}
template <class T> __device__ __forceinline__ T tc_min(T a, T b) {
    return a != a ? a : (b != b ? b : (a < b ? a : b));
}
template <class T> __device__ __forceinline__ T tc_relu(T x) {
    return x > T(0) ? x : (x != x ? x : T(0));
}
template <class T> __device__ __forceinline__ T tc_abs(T x) { return x < T(0) ? -x : x; }
// bf16 <-> float32 on the bits: widening is exact; narrowing rounds to nearest even
// (as ml_dtypes), a NaN staying a quiet NaN.
__device__ __forceinline__ float tc_from_bf16(unsigned short x) {
    return __uint_as_float(((unsigned int)x) << 16);
}
__device__ __forceinline__ unsigned short tc_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if (f != f) return (unsigned short)((u >> 16) | 0x40u);
    return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
struct tc_op_add { template <class T> __device__ static T f(T a, T b) { return a + b; } };
struct tc_op_max { template <class T> __device__ static T f(T a, T b) { return tc_max(a, b); } };
struct tc_op_min { template <class T> __device__ static T f(T a, T b) { return tc_min(a, b); } };
// Combine one partial per thread over the block; every thread gets the result.
template <class OP, class T> __device__ __forceinline__ T tc_block_reduce(T v) {
    __shared__ T scratch[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int nwarps = (blockDim.x + 31) >> 5;
    for (int o = 16; o > 0; o >>= 1) v = OP::f(v, __shfl_xor_sync(0xffffffffu, v, o));
    __syncthreads();  // the previous reduction's reads of scratch are done
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    T r = scratch[0];
    for (int w = 1; w < nwarps; ++w) r = OP::f(r, scratch[w]);
    return r;
}
#endif
"""

# (f32 form, f64 form, integer form or None); {0} is the operand.
UNARY = {
    "neg": ("(-{0})", "(-{0})", "(-{0})"),
    "abs": ("fabsf({0})", "fabs({0})", "tc_abs({0})"),
    "exp": ("expf({0})", "exp({0})", None),
    "log": ("logf({0})", "log({0})", None),
    "sqrt": ("sqrtf({0})", "sqrt({0})", None),
    "rsqrt": ("(1.0f / sqrtf({0}))", "(1.0 / sqrt({0}))", None),
    "reciprocal": ("(1.0f / {0})", "(1.0 / {0})", None),
    "tanh": ("tanhf({0})", "tanh({0})", None),
    "erf": ("erff({0})", "erf({0})", None),
    "sigmoid": ("(1.0f / (1.0f + expf(-{0})))", "(1.0 / (1.0 + exp(-{0})))", None),
    "relu": ("tc_relu({0})", "tc_relu({0})", "tc_relu({0})"),
    "sin": ("sinf({0})", "sin({0})", None),
    "cos": ("cosf({0})", "cos({0})", None),
    "floor": ("floorf({0})", "floor({0})", None),
    "round": ("rintf({0})", "rint({0})", None),   # half to even in the default mode
    "not": ("(!{0})", "(!{0})", "(!{0})"),
}

INFIX = {"add": "+", "sub": "-", "mul": "*", "div": "/", "mod": "%", "floordiv": "/",
         "eq": "==", "lt": "<", "le": "<=", "gt": ">", "ge": ">=", "and": "&&", "or": "||"}
CALLS = {"max": "tc_max", "min": "tc_min"}


def c_type(dtype: str) -> str:
    try:
        return C_TYPES[dtype]
    except KeyError:
        raise TensorcError(f"the CUDA backend has no kernels for dtype {dtype} "
                           f"(supported: {', '.join(C_TYPES)})") from None


def literal(value, dtype: str) -> str:
    """An exact C literal: f32 through its shortest round-trip decimal, inf/nan by bits."""
    if dtype == "bool":
        return "true" if value else "false"
    if dtype == "f16":
        return f"((unsigned short)0x{int(np.float16(value).view(np.uint16)):04x})"
    if dtype == "bf16":
        bits = np.array(value, DTYPES["bf16"]).view(np.uint16)
        return f"((unsigned short)0x{int(bits):04x})"
    if dtype in ("f32", "f64"):
        v = np.float32(value) if dtype == "f32" else np.float64(value)
        if not np.isfinite(v):
            bits = v.view(np.uint32 if dtype == "f32" else np.uint64)
            return (f"__int_as_float(0x{int(bits):08x})" if dtype == "f32"
                    else f"__longlong_as_double(0x{int(bits):016x}ll)")
        text = np.format_float_scientific(v, unique=True, trim="-")  # "3.5e-01", "1e+20"
        return f"{text}f" if dtype == "f32" else text
    c = c_type(dtype)
    return f"{int(value)}ll" if dtype == "i64" else f"(({c}){int(value)})"


class _Renderer:
    def __init__(self, kernel: K.Kernel):
        self.k = kernel
        self.names: dict[K.Buffer, str] = {}
        for i, b in enumerate(kernel.buffers):
            self.names[b] = f"tc_b{i}"

    def expr(self, e: K.Expr) -> str:
        if isinstance(e, K.Const):
            return literal(e.value, e.dtype)
        if isinstance(e, K.Var):
            return e.name
        if isinstance(e, K.Load):
            return f"{self.names[e.buf]}[{self.expr(e.index)}]"
        if isinstance(e, (K.Unary, K.Binary, K.Cast)) and "f16" in (
                getattr(e, "x", e).dtype, getattr(e, "a", e).dtype, e.dtype):
            what = getattr(e, "op", "cast")
            raise TensorcError(f"kernel {self.k.name}: f16 arithmetic ({what}) has no CUDA "
                               "form; f16 values may only be moved")
        if isinstance(e, K.Unary):
            forms = UNARY.get(e.op)
            if forms is None:
                raise TensorcError(f"kernel {self.k.name}: unary op {e.op!r} has no CUDA form")
            dt = e.x.dtype
            form = forms[0] if dt == "f32" else forms[1] if dt == "f64" else forms[2]
            if form is None:
                raise TensorcError(f"kernel {self.k.name}: {e.op} of {dt} has no CUDA form")
            return form.format(self.expr(e.x))
        if isinstance(e, K.Binary):
            a, b = self.expr(e.a), self.expr(e.b)
            if e.op in CALLS:
                return f"{CALLS[e.op]}({a}, {b})"
            if e.op == "pow":
                return f"powf({a}, {b})" if e.a.dtype == "f32" else f"pow({a}, {b})"
            if e.op not in INFIX:
                raise TensorcError(f"kernel {self.k.name}: binary op {e.op!r} has no CUDA form")
            return f"({a} {INFIX[e.op]} {b})"
        if isinstance(e, K.Select):
            return f"({self.expr(e.cond)} ? {self.expr(e.a)} : {self.expr(e.b)})"
        if isinstance(e, K.Cast):
            inner = self.expr(e.x)
            if e.x.dtype == "bf16":   # via float32
                inner = f"tc_from_bf16({inner})"
                if e.dtype == "f32":
                    return inner
            if e.dtype == "bf16":
                return f"tc_to_bf16((float){inner})"
            if e.dtype == "bool":
                return f"({inner} != 0)"
            return f"(({c_type(e.dtype)}){inner})"
        raise TensorcError(f"kernel {self.k.name}: not a kernel IR expression: {e!r}")

    def stmts(self, stmts: list[K.Stmt], ind: str) -> list[str]:
        out = []
        for s in stmts:
            if isinstance(s, K.Loop):
                v = s.var.name
                out.append(f"{ind}for (long long {v} = 0; {v} < {s.extent}ll; ++{v}) {{")
                out += self.stmts(s.body, ind + "    ")
                out.append(ind + "}")
            elif isinstance(s, K.Store):
                out.append(f"{ind}{self.names[s.buf]}[{self.expr(s.index)}] = "
                           f"{self.expr(s.value)};")
            elif isinstance(s, K.Decl):   # declared once at the top: see `locals`
                out.append(f"{ind}{s.var.name} = {self.expr(s.init)};")
            elif isinstance(s, K.Assign):
                out.append(f"{ind}{s.var.name} = {self.expr(s.value)};")
            else:
                raise TensorcError(f"kernel {self.k.name}: not a kernel IR statement: {s!r}")
        return out


def _locals(stmts: list[K.Stmt], found: dict[str, str], kernel: K.Kernel) -> dict[str, str]:
    """Every Decl'd scalar, name -> dtype. Like the LLVM renderer's one slot per name,
    a name declared twice (two reductions in a row) is one variable, so the C text
    declares each once, at the top of the thread's body."""
    for s in stmts:
        if isinstance(s, K.Decl):
            if found.setdefault(s.var.name, s.var.dtype) != s.var.dtype:
                raise TensorcError(f"kernel {kernel.name}: local {s.var.name} is declared "
                                   f"as both {found[s.var.name]} and {s.var.dtype}")
        elif isinstance(s, K.Loop):
            _locals(s.body, found, kernel)
    return found


def parallel_nest(kernel: K.Kernel) -> tuple[list[K.Loop], list[K.Stmt]]:
    """The parallel loop plus the loops perfectly nested in it (what the grid covers),
    and the statements left for each thread."""
    body = kernel.body
    if not (len(body) == 1 and isinstance(body[0], K.Loop) and body[0].parallel):
        if any(isinstance(s, K.Loop) and s.parallel for s in body):
            raise TensorcError(f"kernel {kernel.name}: the parallel loop must be the only "
                               "top-level statement")
        return [], body
    nest = [body[0]]
    while len(nest[-1].body) == 1 and isinstance(nest[-1].body[0], K.Loop):
        nest.append(nest[-1].body[0])
    return nest, nest[-1].body


# --- block-per-row schedule for reductions -------------------------------------------

REDUCE_OPS = {"add": ("tc_op_add", 0.0), "max": ("tc_op_max", float("-inf")),
              "min": ("tc_op_min", float("inf"))}
COOPERATIVE_MIN_EXTENT = 32   # shorter rows keep one thread per row
MAX_ROW_THREADS = 256


def _vars_in(e: K.Expr) -> set[str]:
    if isinstance(e, K.Var):
        return {e.name}
    kids = [getattr(e, a) for a in ("x", "a", "b", "cond", "index") if hasattr(e, a)]
    return set().union(*[_vars_in(k) for k in kids if isinstance(k, K.Expr)]) if kids else set()


def _loads_of(e: K.Expr) -> set:
    """The buffers `e` loads from."""
    here = {e.buf} if isinstance(e, K.Load) else set()
    kids = [getattr(e, a) for a in ("x", "a", "b", "cond", "index") if hasattr(e, a)]
    return here.union(*[_loads_of(k) for k in kids if isinstance(k, K.Expr)])


def _loop_reductions(loop: K.Loop, row_locals: set[str]) -> dict[str, str] | None:
    """{accumulator: op} of a row-level loop whose body only stores and accumulates
    (`acc = op(acc, e)` with op add/max/min, e not reading any accumulator), or None.
    Its iterations are split across threads, so each must store where no other does:
    a store whose address does not depend on the loop's variable, or that reads back
    the buffer it writes (memory as an accumulator, as a column-block reduction keeps
    its sums), refuses the split."""
    accs: dict[str, str] = {}
    reads: set[str] = set()

    def walk(stmts) -> bool:
        for st in stmts:
            if isinstance(st, K.Loop):
                if not walk(st.body):
                    return False
            elif isinstance(st, K.Store):
                if loop.var.name not in _vars_in(st.index) or st.buf in _loads_of(st.value):
                    return False
                reads.update(_vars_in(st.index) | _vars_in(st.value))
            elif isinstance(st, K.Assign):
                v, e = st.var.name, st.value
                if not (v in row_locals and isinstance(e, K.Binary) and e.op in REDUCE_OPS
                        and isinstance(e.a, K.Var) and e.a.name == v
                        and accs.setdefault(v, e.op) == e.op):
                    return False
                reads.update(_vars_in(e.b))
            else:
                return False
        return True
    return accs if walk(loop.body) and not (reads & set(accs)) else None


def cooperative_plan(rest: list[K.Stmt], kernel: K.Kernel) -> dict[int, dict[str, str]] | None:
    """For a row body (what one parallel iteration runs), the reductions of each
    top-level loop if the whole row can be split across a block, else None."""
    decls = {st.var.name: st.init for st in rest if isinstance(st, K.Decl)}
    loops = [st for st in rest if isinstance(st, K.Loop)]
    if not loops or max(lp.extent for lp in loops) < COOPERATIVE_MIN_EXTENT:
        return None
    plan = {}
    for i, st in enumerate(rest):
        if isinstance(st, K.Assign):
            return None
        if isinstance(st, K.Loop):
            accs = _loop_reductions(st, set(decls))
            if accs is None:
                return None
            for v, op in accs.items():   # partials start from the op's identity
                init = decls[v]
                if not (isinstance(init, K.Const) and init.dtype in ("f32", "f64")
                        and float(init.value) == REDUCE_OPS[op][1]):
                    return None
            plan[i] = accs
    return plan


@dataclass(frozen=True)
class CudaKernel:
    """A rendered kernel: its source, parameters (C type, name) and the size of the
    index space its grid covers (`extent`)."""
    name: str
    source: str
    params: tuple[tuple[str, str], ...]
    extent: int
    row_threads: int = 0      # > 0: block-per-row schedule with this many threads

    @property
    def cooperative(self) -> bool:
        """Whether the threads of a block work together (barriers, shuffles)."""
        return self.row_threads > 0

    @property
    def launch(self) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """(grid, block) covering the whole index space."""
        if self.row_threads:
            return (max(1, min(self.extent, 65535 * 32)), 1, 1), (self.row_threads, 1, 1)
        blocks, threads = launch_config(self.extent)
        return (blocks, 1, 1), (threads, 1, 1)


def render_kernel(kernel: K.Kernel) -> CudaKernel:
    """Render one kernel as a complete CUDA translation unit (helpers included)."""
    r = _Renderer(kernel)
    params = tuple((("const " if b.readonly else "") + c_type(b.dtype) + "*", r.names[b])
                   for b in kernel.buffers) + (("long long", "tc_lo"), ("long long", "tc_hi"))
    nest, rest = parallel_nest(kernel)
    extent = int(np.prod([lp.extent for lp in nest], dtype=np.int64)) if nest else 1
    sig = ", ".join(f"{t} __restrict__ {n}" if t.endswith("*") else f"{t} {n}"
                    for t, n in params)
    head = [f"// {kernel.kind}: kernel IR, rendered for CUDA",
            *("// " + line for line in K.format_kernel(kernel).splitlines())]
    plan = cooperative_plan(rest, kernel) if len(nest) == 1 else None
    if plan is not None:
        return _render_cooperative(kernel, r, params, sig, head, nest[0], rest, plan)
    lines = [*head,
             f'extern "C" __global__ void {kernel.name}({sig}) {{',
             "    const long long tc_stride = (long long)gridDim.x * blockDim.x;",
             "    for (long long tc_t = tc_lo + (long long)blockIdx.x * blockDim.x + threadIdx.x;"
             " tc_t < tc_hi; tc_t += tc_stride) {"]
    # Unflatten t into the nest's loop variables, innermost fastest.
    rem, ind = "tc_t", "        "
    for i, lp in enumerate(reversed(nest)):
        last = i == len(nest) - 1
        lines.append(f"{ind}const long long {lp.var.name} = "
                     + (rem if last else f"{rem} % {lp.extent}ll") + ";")
        if not last:
            lines.append(f"{ind}const long long tc_t{i} = {rem} / {lp.extent}ll;")
            rem = f"tc_t{i}"
    lines += [f"{ind}{c_type(dt)} {name};" for name, dt in _locals(rest, {}, kernel).items()]
    lines += r.stmts(rest, ind)
    lines += ["    }", "}"]
    return CudaKernel(kernel.name, PRELUDE + CODEGEN_PRELUDE + "\n".join(lines) + "\n",
                      params, extent)


def _render_cooperative(kernel, r: _Renderer, params, sig, head, row: K.Loop, rest, plan
                        ) -> CudaKernel:
    """One block per row: each top-level loop of the row is split across the block's
    threads (strided, so reads coalesce), accumulators are combined with a block
    reduction after their loop, and row-level stores are done by thread 0."""
    longest = max(st.extent for st in rest if isinstance(st, K.Loop))
    threads = min(MAX_ROW_THREADS, 32 * -(-longest // 32))
    ind = "        "
    lines = [*head, f'extern "C" __global__ void __launch_bounds__({MAX_ROW_THREADS}) '
             f'{kernel.name}({sig}) {{',
             "    for (long long tc_row = tc_lo + blockIdx.x; tc_row < tc_hi;"
             " tc_row += gridDim.x) {",
             f"{ind}const long long {row.var.name} = tc_row;"]
    lines += [f"{ind}{c_type(dt)} {name};" for name, dt in _locals(rest, {}, kernel).items()]
    for i, st in enumerate(rest):
        if isinstance(st, K.Loop):
            v = st.var.name
            lines.append(f"{ind}for (long long {v} = threadIdx.x; {v} < {st.extent}ll; "
                         f"{v} += blockDim.x) {{")
            lines += r.stmts(st.body, ind + "    ")
            lines.append(ind + "}")
            for acc, op in plan[i].items():
                lines.append(f"{ind}{acc} = tc_block_reduce<{REDUCE_OPS[op][0]}>({acc});")
            lines.append(f"{ind}__syncthreads();  // this loop's stores are visible to the next")
        elif isinstance(st, K.Store):
            lines += [f"{ind}if (threadIdx.x == 0) {{", *r.stmts([st], ind + "    "), ind + "}"]
        else:
            lines += r.stmts([st], ind)
    lines += ["    }", "}"]
    return CudaKernel(kernel.name, PRELUDE + CODEGEN_PRELUDE + "\n".join(lines) + "\n",
                      params, row.extent, threads)


def launch_config(extent: int, threads: int = 256) -> tuple[int, int]:
    """(blocks, threads per block) for an index space of `extent` points: a multiple
    of 32 threads, no more than needed, and enough blocks to cover it once."""
    threads = min(threads, 32 * max(1, -(-extent // 32)))
    return max(1, -(-extent // threads)), threads
