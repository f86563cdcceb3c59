"""LLVM IR building blocks shared by the library kernels (GEMM, flash attention):
types, `FnBuilder` (counted loops, pointers, 16-lane vectors, the shared maths) and
`job`, the entry point the native pool (`pool.py`) calls."""

from __future__ import annotations

from contextlib import contextmanager

from llvmlite import ir

from ..lowering.rules import elementwise as maths
from .codegen import LLVMMath

F32, I64, I32, I1 = ir.FloatType(), ir.IntType(64), ir.IntType(32), ir.IntType(1)
I16 = ir.IntType(16)
PTR = ir.PointerType()
V16, M16 = ir.VectorType(F32, 16), ir.VectorType(I1, 16)
VI32 = ir.VectorType(I32, 16)


def c64(x: int) -> ir.Constant:
    return ir.Constant(I64, x)


def vconst(x: float) -> ir.Constant:
    return ir.Constant(V16, [x] * 16)


class FnBuilder:
    """Builds one function: an alloca block, counted loops, pointer and vector helpers.

    Loop counters and accumulators live in allocas; mem2reg/SROA turn them into
    registers at O3, which keeps this generator free of hand-written phi nodes.
    """

    def __init__(self, module: ir.Module, name: str, args: list[tuple[str, ir.Type]],
                 internal: bool = False):
        self.module = module
        self.fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [t for _, t in args]), name)
        if internal:
            self.fn.linkage = "internal"
        for arg, (n, _) in zip(self.fn.args, args, strict=True):
            arg.name = n
        self.arg = {n: a for a, (n, _) in zip(self.fn.args, args, strict=True)}
        self._entry = self.fn.append_basic_block("entry")
        self._allocas = ir.IRBuilder(self._entry)
        self.b = ir.IRBuilder(self.fn.append_basic_block("body"))

    def finish(self) -> ir.Function:
        self.b.ret_void()
        self._allocas.branch(self.fn.basic_blocks[1])
        return self.fn

    # -- scalars and control flow ------------------------------------------------
    def var(self, ty: ir.Type, init=None):
        slot = self._allocas.alloca(ty)
        if init is not None:
            self.b.store(init, slot)
        return slot

    @contextmanager
    def loop(self, start, stop, step=1):
        """for i in range(start, stop, step); yields i (an i64; step an int or an i64
        value)."""
        b = self.b
        slot = self.var(I64, start if isinstance(start, ir.Value) else c64(start))
        cond, body, end = (self.fn.append_basic_block(s) for s in ("cond", "loop", "end"))
        b.branch(cond)
        b.position_at_end(cond)
        i = b.load(slot, typ=I64)
        b.cbranch(b.icmp_signed("<", i, stop if isinstance(stop, ir.Value) else c64(stop)),
                  body, end)
        b.position_at_end(body)
        yield i
        b.store(b.add(i, step if isinstance(step, ir.Value) else c64(step)), slot)
        b.branch(cond)
        b.position_at_end(end)

    def min(self, x, y):
        return self.b.select(self.b.icmp_signed("<", x, y), x, y)

    def at(self, base, *offsets, ty=F32):
        """Address base + sum(offsets) elements of `ty`."""
        off = offsets[0]
        for o in offsets[1:]:
            off = self.b.add(off, o)
        return self.b.gep(base, [off], source_etype=ty)

    def mul(self, x, y):
        return self.b.mul(x, y if isinstance(y, ir.Value) else c64(y))

    # -- vectors -------------------------------------------------------------------
    def intrinsic(self, name: str, ret: ir.Type, args: list[ir.Type]) -> ir.Function:
        try:
            return self.module.get_global(name)
        except KeyError:
            return ir.Function(self.module, ir.FunctionType(ret, args), name)

    def splat(self, x):
        b = self.b
        v = b.insert_element(ir.Constant(V16, ir.Undefined), x, ir.Constant(I32, 0))
        return b.shuffle_vector(v, ir.Constant(V16, ir.Undefined), ir.Constant(VI32, [0] * 16))

    def fma(self, a, b, c):
        return self.b.call(self.intrinsic("llvm.fma.v16f32", V16, [V16] * 3), [a, b, c])

    def vload(self, ptr, align=4):
        return self.b.load(ptr, typ=V16, align=align)

    def vstore(self, v, ptr, align=4):
        self.b.store(v, ptr, align=align)

    def bf16_pair(self, ptr, align=4):
        """Two 16-lane float32 vectors from 32 bf16 at `ptr` stored pairwise: word w
        (32 bits) holds column w in its low half and column w + 16 in its high half
        (`gemm.PackedB`'s bf16 panels). bf16 is the high half of a float32, so one
        load and a shift (low) or a mask (high) widen them exactly, on any x86 with
        AVX2 or AVX-512 (no AVX512_BF16 needed)."""
        b = self.b
        w = b.load(ptr, typ=VI32, align=align)
        lo = b.shl(w, ir.Constant(VI32, [16] * 16))
        hi = b.and_(w, ir.Constant(VI32, [-65536] * 16))
        return [b.bitcast(lo, V16), b.bitcast(hi, V16)]

    def lanes_below(self, n):
        """Mask of lanes i with i < n (n an i64; any value, clamped by the compare)."""
        n32 = self.b.trunc(self.min(self.b.select(self.b.icmp_signed("<", n, c64(0)), c64(0), n),
                                    c64(16)), I32)
        return self.b.icmp_signed("<", ir.Constant(VI32, list(range(16))),
                                  self.b.shuffle_vector(
                                      self.b.insert_element(ir.Constant(VI32, ir.Undefined), n32,
                                                            ir.Constant(I32, 0)),
                                      ir.Constant(VI32, ir.Undefined),
                                      ir.Constant(VI32, [0] * 16)))

    def mload(self, ptr, mask, passthru=None):
        fn = self.intrinsic("llvm.masked.load.v16f32.p0", V16, [PTR, I32, M16, V16])
        return self.b.call(fn, [ptr, ir.Constant(I32, 4), mask, passthru or vconst(0.0)])

    def mstore(self, v, ptr, mask):
        fn = self.intrinsic("llvm.masked.store.v16f32.p0", ir.VoidType(), [V16, PTR, I32, M16])
        self.b.call(fn, [v, ptr, ir.Constant(I32, 4), mask])

    def vcall(self, name, *args):
        return self.b.call(self.intrinsic(f"llvm.{name}.v16f32", V16, [V16] * len(args)),
                           list(args))

    def exp(self, x):
        """exp on 16 lanes: the shared maths (`lowering/rules/elementwise.py`)."""
        return maths.exp(LLVMMath(self.module, self.b, V16), x)

    def activation(self, name: str, x):
        b = self.b
        if name == "none":
            return x
        if name == "relu":  # a select, not maxnum, so that NaN stays NaN as in numpy
            return b.select(b.fcmp_ordered("<", x, vconst(0.0)), vconst(0.0), x)
        return maths.gelu(LLVMMath(self.module, b, V16), x,
                          "tanh" if name == "gelu_tanh" else "none")



def job(module: ir.Module, name: str, target: ir.Function, fixed: list[ir.Type],
         ranges: int, work: str | None = "first") -> None:
    """`name(block, item, tid)` for the native pool (see pool.py): calls `target` with
    the `fixed` arguments from block[0:len(fixed)] (f32 ones as bits), then the
    workspace of thread `tid` from block[len(fixed) + 1 + tid] (block[len(fixed)] says
    how many there are), then `ranges` i64s of the item; `work` "last" passes the
    workspace after them, None not at all. The items follow the workspaces."""
    f = FnBuilder(module, name, [("block", PTR), ("item", I64), ("tid", I64)])
    b, g = f.b, f.arg

    def word(i):
        return b.load(f.at(g["block"], i, ty=I64), typ=I64)
    args = []
    for i, ty in enumerate(fixed):
        w = word(c64(i))
        args.append(b.inttoptr(w, PTR) if ty == PTR else
                    b.bitcast(b.trunc(w, I32), F32) if ty == F32 else w)
    nf = len(fixed)
    workspace = b.inttoptr(word(b.add(c64(nf + 1), g["tid"])), PTR)
    items = b.add(c64(nf + 1), word(c64(nf)))
    args += [workspace] if work == "first" else []
    args += [word(b.add(items, b.add(f.mul(g["item"], ranges), c64(r)))) for r in range(ranges)]
    b.call(target, args + [workspace] if work == "last" else args)
    f.finish()


