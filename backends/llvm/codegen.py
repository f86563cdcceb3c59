"""Kernel IR -> LLVM IR (llvmlite.ir).

Every kernel becomes `void NAME(i8** args, i64 lo, i64 hi)`: `args` holds the
buffer pointers in `Kernel.buffers` order, [lo, hi) the iterations of the
parallel loop this call runs. That one signature lets the runtime call every
kernel the same way and split it across threads. The body lives in an inlined
helper whose pointer arguments are `noalias` (the buffer plan never lets an
output overlap an input), which is what lets LLVM vectorise.

exp, tanh, erf and sigmoid on f32 are branch-free polynomials, so that loops using
them vectorise (libm calls would not): the shared maths of
`lowering/rules/elementwise.py`, built here through `LLVMMath`. Their error is a few
ulp (exp) and below 4e-7 relative (tanh, erf), far inside the 1e-4 budget.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir

from tensorc.types import DTYPES

from .. import kernel_ir as K
from ..lowering.rules import elementwise as maths

_F32 = ir.FloatType()
_I64 = ir.IntType(64)
_I32 = ir.IntType(32)
_I1 = ir.IntType(1)
_I8P = ir.IntType(8).as_pointer()

# Register types; bool is i1 in registers and one byte in memory, like numpy.
_TYPES = {"f16": ir.HalfType(), "f32": _F32, "f64": ir.DoubleType(), "i8": ir.IntType(8),
          "u8": ir.IntType(8), "i32": ir.IntType(32), "i64": _I64, "bool": _I1}
# bf16 is its 16 bits in registers and memory: kernels only move and convert it
_TYPES["bf16"] = ir.IntType(16)
_MEM = dict(_TYPES, bool=ir.IntType(8))
_FLOAT = ("f16", "f32", "f64")
_FAST = ("reassoc", "contract")   # no nnan/ninf: masks hold -inf
_FCMP = {"eq": "==", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}


def new_module(name: str = "tensorc") -> ir.Module:
    return ir.Module(name=name)


def add_kernel(module: ir.Module, kernel: K.Kernel, schedule: dict | None = None) -> None:
    """Add `kernel` (entry point plus its inlined body) to `module`, and its job for the
    native thread pool (`pool.py`): `NAME_job(block, item, tid)` with block = [args,
    extent, parts] runs part `item` of the parallel loop's [0, extent). `schedule`: its
    innermost loops' vector width and interleave count (`loop_tuning.py`; none or a
    width of 0: LLVM's choice, and no metadata)."""
    _FnGen(module, kernel, schedule or {"width": 0}).emit()
    entry = module.globals[kernel.name]
    job = ir.Function(module, ir.FunctionType(ir.VoidType(), [_I8P, _I64, _I64]),
                      name=job_name(kernel.name))
    job.attributes.add("nounwind")
    b = ir.IRBuilder(job.append_basic_block("entry"))
    words = b.bitcast(job.args[0], _I64.as_pointer())
    args, extent, parts = (b.load(b.gep(words, [ir.Constant(_I64, i)])) for i in range(3))
    item = job.args[1]
    lo = b.sdiv(b.mul(extent, item), parts)
    hi = b.sdiv(b.mul(extent, b.add(item, ir.Constant(_I64, 1))), parts)
    b.call(entry, [b.inttoptr(args, _I8P.as_pointer()), lo, hi])
    b.ret_void()


def job_name(kernel_name: str) -> str:
    return kernel_name + "_job"


def render(kernels: list[K.Kernel], schedule=None) -> str:
    """LLVM IR text of a module holding `kernels` (each name once); `schedule(kernel)`,
    if given, the schedule of each (the runtime's: `loop_tuning.kernel_schedule`, this
    host's for the kernel's class)."""
    module = new_module()
    seen = set()
    for k in kernels:
        if k.name not in seen:
            seen.add(k.name)
            add_kernel(module, k, schedule(k) if schedule else None)
    return str(module)


def _intrinsic(module: ir.Module, name: str, ty: ir.Type, nargs: int = 1) -> ir.Function:
    suffix = {"float": "f32", "double": "f64", "half": "f16"}[str(ty)]
    full = f"llvm.{name}.{suffix}"
    if full in module.globals:
        return module.globals[full]
    return ir.Function(module, ir.FunctionType(ty, [ty] * nargs), name=full)


class _FnGen:
    def __init__(self, module: ir.Module, kernel: K.Kernel, schedule: dict):
        self.module, self.k, self.schedule = module, kernel, schedule

    def emit(self):
        k, module = self.k, self.module
        ptr_types = [_MEM[b.dtype].as_pointer() for b in k.buffers]
        body_fn = ir.Function(module, ir.FunctionType(ir.VoidType(), ptr_types + [_I64, _I64]),
                              name=k.name + ".body")
        body_fn.linkage = "internal"
        body_fn.attributes.add("alwaysinline")
        body_fn.attributes.add("nounwind")
        for arg in body_fn.args[:len(ptr_types)]:
            arg.add_attribute("noalias")
        entry_fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [_I8P.as_pointer(), _I64,
                                                                       _I64]), name=k.name)
        entry_fn.attributes.add("nounwind")
        b = ir.IRBuilder(entry_fn.append_basic_block("entry"))
        args_ptr, lo, hi = entry_fn.args
        ptrs = [b.bitcast(b.load(b.gep(args_ptr, [ir.Constant(_I64, i)])), t)
                for i, t in enumerate(ptr_types)]
        b.call(body_fn, ptrs + [lo, hi])
        b.ret_void()

        self.fn = body_fn
        self.bufs = {id(buf): arg for buf, arg in zip(k.buffers, body_fn.args, strict=False)}
        self.lo, self.hi = body_fn.args[-2], body_fn.args[-1]
        self.entry = body_fn.append_basic_block("entry")
        self.b = ir.IRBuilder(self.entry)
        self.slots: dict[str, ir.Value] = {}
        start = body_fn.append_basic_block("start")
        self.b.position_at_end(start)
        self.stmts(k.body, top=True)
        self.b.ret_void()
        ir.IRBuilder(self.entry).branch(start)

    # -- statements --
    def slot(self, var: K.Var) -> ir.Value:
        if var.name not in self.slots:
            with self.b.goto_block(self.entry):
                self.slots[var.name] = self.b.alloca(_TYPES[var.dtype], name=var.name)
        return self.slots[var.name]

    def stmts(self, stmts: list[K.Stmt], top: bool = False):
        for s in stmts:
            if isinstance(s, K.Loop):
                self.loop(s, top)
            elif isinstance(s, K.Store):
                value = self.expr(s.value)
                if s.buf.dtype == "bool":
                    value = self.b.zext(value, _MEM["bool"])
                self.b.store(value, self.address(s.buf, s.index))
            elif isinstance(s, (K.Decl, K.Assign)):
                value = self.expr(s.init if isinstance(s, K.Decl) else s.value)
                self.b.store(value, self.slot(s.var))
            else:
                raise TypeError(f"unknown statement {s!r}")

    def loop(self, s: K.Loop, top: bool):
        b = self.b
        parallel = top and s.parallel
        start = self.lo if parallel else ir.Constant(_I64, 0)
        stop = self.hi if parallel else ir.Constant(_I64, s.extent)
        iv = self.slot(s.var)
        b.store(start, iv)
        cond = self.fn.append_basic_block(s.var.name + ".cond")
        body = self.fn.append_basic_block(s.var.name + ".body")
        done = self.fn.append_basic_block(s.var.name + ".done")
        b.branch(cond)
        b.position_at_end(cond)
        b.cbranch(b.icmp_signed("<", b.load(iv), stop), body, done)
        b.position_at_end(body)
        self.stmts(s.body)
        b.store(b.add(b.load(iv), ir.Constant(_I64, 1)), iv)
        latch = b.branch(cond)
        if not any(isinstance(x, K.Loop) for x in s.body):
            if self.schedule["width"]:
                latch.set_metadata("llvm.loop", self.loop_id(
                    ("llvm.loop.vectorize.width", self.schedule["width"]),
                    ("llvm.loop.interleave.count", self.schedule["interleave"])))
        elif not parallel:
            latch.set_metadata("llvm.loop", self.no_unroll())
        b.position_at_end(done)

    def loop_id(self, *hints: tuple[str, int]) -> ir.MDValue:
        """A new loop ID carrying `hints` (name, i32 value): an innermost loop's vector
        width and interleave count, when the schedule sets them. Made afresh (not
        through `add_metadata`, which reuses an equal node): each loop its own ID."""
        nodes = [self.module.add_metadata([ir.MetaDataString(self.module, name),
                                           ir.Constant(_I32, value)]) for name, value in hints]
        loop_id = ir.values.MDValue(self.module, nodes, name=str(len(self.module.metadata)))
        loop_id.operands = (loop_id, *nodes)   # a loop ID refers to itself
        return loop_id

    def no_unroll(self) -> ir.MDValue:
        """A new loop ID saying "do not unroll", for a loop of constant extent around
        other loops: fully unrolled, a few rows of a vectorised row loop make one block
        of hundreds of vector instructions that the instruction scheduler takes a second
        over (GPT's [16, 512] embedding gather: 0.8 s), for nothing at run time. (In
        the small presets only such gathers compile differently for it.)"""
        disable = self.module.add_metadata([ir.MetaDataString(self.module,
                                                              "llvm.loop.unroll.disable")])
        loop_id = self.module.add_metadata([disable])
        loop_id.operands = (loop_id, disable)   # a loop ID refers to itself
        return loop_id

    def address(self, buf: K.Buffer, index: K.Expr) -> ir.Value:
        return self.b.gep(self.bufs[id(buf)], [self.expr(index)], inbounds=True)

    # -- expressions --
    def expr(self, e: K.Expr) -> ir.Value:
        b = self.b
        if isinstance(e, K.Const):
            return self.const(e.value, e.dtype)
        if isinstance(e, K.Var):
            return b.load(self.slot(e))
        if isinstance(e, K.Load):
            v = b.load(self.address(e.buf, e.index))
            return b.icmp_unsigned("!=", v, ir.Constant(v.type, 0)) if e.dtype == "bool" else v
        if isinstance(e, K.Cast):
            return self.cast(self.expr(e.x), e.x.dtype, e.dtype)
        if isinstance(e, K.Select):
            return b.select(self.expr(e.cond), self.expr(e.a), self.expr(e.b))
        if isinstance(e, K.Unary):
            return self.unary(e.op, self.expr(e.x), e.x.dtype)
        if isinstance(e, K.Binary):
            return self.binary(e.op, self.expr(e.a), self.expr(e.b), e.a.dtype)
        raise TypeError(f"unknown expression {e!r}")

    def const(self, value, dtype: str) -> ir.Value:
        if dtype == "bf16":
            bits = np.array(value, DTYPES["bf16"]).view(np.uint16)
            return ir.Constant(_TYPES[dtype], int(bits))
        if dtype in _FLOAT:
            return ir.Constant(_TYPES[dtype], float(value))
        return ir.Constant(_TYPES[dtype], int(value))

    def cast(self, v: ir.Value, src: str, dst: str) -> ir.Value:
        b, to = self.b, _TYPES[dst]
        if src == dst:
            return v
        if src == "bf16":   # the high half of a float32: exact
            wide = b.bitcast(b.shl(b.zext(v, _I32), ir.Constant(_I32, 16)), _F32)
            return self.cast(wide, "f32", dst)
        if dst == "bf16":   # via float32, rounded to nearest even as ml_dtypes does
            return self.to_bf16(self.cast(v, src, "f32") if src != "f32" else v)
        if dst == "bool":
            if src in _FLOAT:
                return b.fcmp_unordered("!=", v, ir.Constant(v.type, 0.0))
            return b.icmp_unsigned("!=", v, ir.Constant(v.type, 0))
        if src in _FLOAT and dst in _FLOAT:
            bits = {"f16": 16, "f32": 32, "f64": 64}
            return b.fpext(v, to) if bits[dst] > bits[src] else b.fptrunc(v, to)
        if src in _FLOAT:
            return b.fptoui(v, to) if dst == "u8" else b.fptosi(v, to)
        unsigned = src in ("u8", "bool")
        if dst in _FLOAT:
            return b.uitofp(v, to) if unsigned else b.sitofp(v, to)
        if to.width > v.type.width:
            return b.zext(v, to) if unsigned else b.sext(v, to)
        return b.trunc(v, to) if to.width < v.type.width else v

    def to_bf16(self, x: ir.Value) -> ir.Value:
        """float32 -> bf16 bits, round to nearest even; a NaN stays a (quiet) NaN."""
        b = self.b
        bits = b.bitcast(x, _I32)
        odd = b.and_(b.lshr(bits, ir.Constant(_I32, 16)), ir.Constant(_I32, 1))
        rounded = b.lshr(b.add(bits, b.add(ir.Constant(_I32, 0x7FFF), odd)),
                         ir.Constant(_I32, 16))
        nan = b.or_(b.lshr(bits, ir.Constant(_I32, 16)), ir.Constant(_I32, 0x40))
        out = b.select(b.fcmp_unordered("uno", x, x), nan, rounded)
        return b.trunc(out, _TYPES["bf16"])

    def call(self, name: str, *args: ir.Value, nargs: int = 1) -> ir.Value:
        return self.b.call(_intrinsic(self.module, name, args[0].type, nargs), list(args))

    def binary(self, op: str, x: ir.Value, y: ir.Value, dtype: str) -> ir.Value:
        b = self.b
        if dtype in _FLOAT:
            if op in ("add", "sub", "mul", "div"):
                return getattr(b, "f" + op)(x, y, flags=_FAST)
            if op in ("max", "min"):  # NaN-propagating, like numpy's maximum/minimum
                return self.call(op + "imum", x, y, nargs=2)
            if op == "pow":
                return self.call("pow", x, y, nargs=2)
            if op in _FCMP:
                return b.fcmp_ordered(_FCMP[op], x, y)
        else:
            unsigned = dtype in ("u8", "bool")
            if op in ("add", "sub", "mul"):
                return getattr(b, op)(x, y)
            if op in ("div", "floordiv"):  # index math is non-negative; int div truncates
                return b.udiv(x, y) if unsigned else b.sdiv(x, y)
            if op == "mod":
                return b.urem(x, y) if unsigned else b.srem(x, y)
            if op in ("max", "min"):
                cmp = (b.icmp_unsigned if unsigned else b.icmp_signed)(
                    ">" if op == "max" else "<", x, y)
                return b.select(cmp, x, y)
            if op in _FCMP:
                return (b.icmp_unsigned if unsigned else b.icmp_signed)(_FCMP[op], x, y)
            if op == "and":
                return b.and_(x, y)
            if op == "or":
                return b.or_(x, y)
        raise TypeError(f"binary op {op} is not defined on {dtype}")

    def unary(self, op: str, x: ir.Value, dtype: str) -> ir.Value:
        b = self.b
        if dtype not in _FLOAT:
            zero = ir.Constant(x.type, 0)
            if op == "neg":
                return b.sub(zero, x)
            if op == "abs":
                return b.select(b.icmp_signed("<", x, zero), b.sub(zero, x), x)
            if op == "relu":
                return b.select(b.icmp_signed("<", x, zero), zero, x)
            if op == "not":
                return b.xor(x, ir.Constant(x.type, 1))
            raise TypeError(f"unary op {op} is not defined on {dtype}")
        if dtype == "f16" and op in ("exp", "tanh", "erf", "sigmoid"):
            return b.fptrunc(self.unary(op, b.fpext(x, _F32), "f32"), x.type)
        one = ir.Constant(x.type, 1.0)
        zero = ir.Constant(x.type, 0.0)
        if op == "neg":
            return b.fneg(x)
        if op == "relu":  # select keeps NaN, like numpy's maximum(x, 0)
            return b.select(b.fcmp_ordered("<", x, zero), zero, x)
        if op in ("abs", "sqrt", "floor", "round", "sin", "cos", "log"):
            return self.call({"abs": "fabs", "round": "roundeven"}.get(op, op), x)
        if op == "rsqrt":
            return b.fdiv(one, self.call("sqrt", x))
        if op == "reciprocal":
            return b.fdiv(one, x)
        if dtype == "f64" and op in ("exp", "tanh", "erf"):
            return self.libm(op, x)
        if op == "sigmoid" and dtype == "f64":
            return b.fdiv(one, b.fadd(one, self.libm("exp", b.fneg(x))))
        if op in ("exp", "sigmoid", "tanh", "erf"):
            return getattr(maths, op)(LLVMMath(self.module, b), x)
        raise TypeError(f"unary op {op} is not defined on {dtype}")

    def libm(self, name: str, x: ir.Value) -> ir.Value:
        fn = self.module.globals.get(name)
        if fn is None:
            fn = ir.Function(self.module, ir.FunctionType(x.type, [x.type]), name=name)
        return self.b.call(fn, [x])


class LLVMMath:
    """The arithmetic the shared maths (`lowering/rules/elementwise.py`) is built with,
    on float32 scalars or vectors (`ty`) at the builder's position."""

    def __init__(self, module: ir.Module, builder: ir.IRBuilder, ty: ir.Type = _F32):
        self.module, self.b, self.ty = module, builder, ty
        lanes = getattr(ty, "count", None)
        self.suffix = f"v{lanes}f32" if lanes else "f32"
        self.ity = ir.VectorType(ir.IntType(32), lanes) if lanes else ir.IntType(32)

    def c(self, value: float) -> ir.Constant:
        return ir.Constant(self.ty, [value] * self.ty.count if self.suffix != "f32" else value)

    def _ci(self, value: int) -> ir.Constant:
        return ir.Constant(self.ity, [value] * self.ty.count if self.suffix != "f32" else value)

    def call(self, name: str, *args):
        full = f"llvm.{name}.{self.suffix}"
        fn = self.module.globals.get(full) or ir.Function(
            self.module, ir.FunctionType(self.ty, [self.ty] * len(args)), name=full)
        return self.b.call(fn, list(args))

    # No fast-math flags: reassociation would undo exp's two-part ln2 reduction.
    def add(self, a, b):
        return self.b.fadd(a, b)

    def sub(self, a, b):
        return self.b.fsub(a, b)

    def mul(self, a, b):
        return self.b.fmul(a, b)

    def div(self, a, b):
        return self.b.fdiv(a, b)

    def fma(self, a, b, c):
        return self.call("fma", a, b, c)

    def min(self, a, b):
        return self.call("minnum", a, b)

    def max(self, a, b):
        return self.call("maxnum", a, b)

    def abs(self, x):
        return self.call("fabs", x)

    def rint(self, x):
        return self.call("rint", x)

    def copysign(self, a, b):
        return self.call("copysign", a, b)

    def lt(self, a, b):
        return self.b.fcmp_ordered("<", a, b)

    def isnan(self, x):
        return self.b.fcmp_unordered("uno", x, x)

    def select(self, cond, a, b):
        return self.b.select(cond, a, b)

    def scale2(self, y, n):
        """y * 2^n for integral n, the result normal: n added to y's exponent bits."""
        b = self.b
        bits = b.add(b.bitcast(y, self.ity), b.shl(b.fptosi(n, self.ity), self._ci(23)))
        return b.bitcast(bits, self.ty)

    def exp(self, x):
        return maths.exp(self, x)
