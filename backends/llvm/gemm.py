"""Scheduled float32 GEMM for the LLVM CPU backend: C = act(A @ B + bias) + residual.

The schedule is the BLIS one. B is packed into NR-column panels (once, for weights:
see `PackedB`); A is packed per KC x MC block into MR-row panels that stay in L2;
an MR x NR register-blocked micro-kernel (16 zmm accumulators, `llvm.fma.v16f32`)
streams one kc x NR panel of B from L1 and prefetches the next one towards L2 (a
model's weights come cold from memory). Edges are handled by zero-padded packing
plus masked loads/stores, so any M, N, K and any row stride work. The epilogue
(bias, activation, residual) runs on the accumulators of the last K block, so a
fused `matmul + bias + gelu + residual` touches C once.

Threads: with a few rows (a transformer's tokens) and a packed weight, A is packed
once into a buffer both threads read from L2, and the column panels are cut into
small items that the threads of the native pool (`pool.py`: one hand-off per call,
workers that spin briefly instead of sleeping) claim; many rows split by rows.

`gemm()` is the numpy-level API (batched, broadcasting, threaded); `bind()` does
its checks once for arrays that never move and returns a call (the runtime's);
`gemm_range()` computes a block of rows and panels on the calling thread.
"""

from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from ctypes import c_int64, c_void_p

import numpy as np
from llvmlite import ir

from tensorc.errors import ShapeError, TensorcError

from ..lowering.rules import elementwise as maths
from . import pool
from .codegen import LLVMMath
from .jit import cfunc, compile_ir
from .pool import num_threads

MR, NR = 8, 32      # micro-tile: 8 rows x 2 zmm = 16 accumulators (14 x 32 measured no faster)
KC, MC = 256, 160  # a 256 x 32 panel of B (32 KiB) stays in L1; a 160 x 256 block of A, in L2
ALIGN = 64          # bytes; packed panels are cache-line aligned
PREPACK_A = 1 << 17  # floats: A up to half an L2 (512 KiB) is packed once and shared
ITEMS_PER_THREAD = 4  # work items per thread when threads claim column panels

ACTIVATIONS = ("none", "relu", "gelu_erf", "gelu_tanh")
_ALIASES = {None: "none", "gelu": "gelu_erf"}

F32, I64, I32, I1 = ir.FloatType(), ir.IntType(64), ir.IntType(32), ir.IntType(1)
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
    def loop(self, start, stop, step: int = 1):
        """for i in range(start, stop, step); yields i (an i64)."""
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
        b.store(b.add(i, c64(step)), slot)
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


# -- kernel generation ----------------------------------------------------------------

def _ukernel(module: ir.Module, act: str) -> ir.Function:
    """C[mrem, nrem] (+)= Ap[kc, MR] @ Bp[kc, NR], epilogue on the last K block."""
    f = FnBuilder(module, f"tc_ukernel_{act}", [
        ("kc", I64), ("ap", PTR), ("bp", PTR), ("c", PTR), ("ldc", I64), ("mrem", I64),
        ("nrem", I64), ("first", I64), ("last", I64), ("bias", PTR), ("has_bias", I64),
        ("res", PTR), ("ldr", I64), ("has_res", I64), ("pf", PTR)], internal=True)
    b, g = f.b, f.arg
    f.fn.attributes.add("alwaysinline")
    acc = [[f.var(V16, vconst(0.0)) for _ in range(NR // 16)] for _ in range(MR)]
    prefetch = f.intrinsic("llvm.prefetch.p0", ir.VoidType(), [PTR, I32, I32, I32])
    with f.loop(0, g["kc"]) as k:
        # the next panel of B towards L2, while this one is reused from L1: a model's
        # weights come cold from memory
        for v in range(NR // 16):
            b.call(prefetch, [f.at(g["pf"], f.mul(k, NR), c64(16 * v)),
                              ir.Constant(I32, 0), ir.Constant(I32, 2), ir.Constant(I32, 1)])
        bk = f.at(g["bp"], f.mul(k, NR))
        bv = [f.vload(f.at(bk, c64(16 * v)), align=64) for v in range(NR // 16)]
        ak = f.at(g["ap"], f.mul(k, MR))
        for r in range(MR):
            s = f.splat(b.load(f.at(ak, c64(r)), typ=F32))
            for v in range(NR // 16):
                b.store(f.fma(s, bv[v], b.load(acc[r][v], typ=V16)), acc[r][v])

    def flag(name):
        return b.icmp_signed("!=", g[name], c64(0))

    none = ir.Constant(M16, [0] * 16)
    masks = [f.lanes_below(b.sub(g["nrem"], c64(16 * v))) for v in range(NR // 16)]
    cmask = [b.select(flag("first"), none, m) for m in masks]  # first K block: C not read

    def store_rows(epilogue):
        for r in range(MR):
            row_ok = b.icmp_signed("<", c64(r), g["mrem"])
            with b.if_then(row_ok, likely=True):
                crow = f.at(g["c"], f.mul(c64(r), g["ldc"]))
                for v in range(NR // 16):
                    ptr = f.at(crow, c64(16 * v))
                    val = b.fadd(b.load(acc[r][v], typ=V16), f.mload(ptr, cmask[v]))
                    f.mstore(epilogue(r, v, val), ptr, masks[v])

    with b.if_else(flag("last")) as (then, otherwise):
        with then:
            bmask = [b.select(flag("has_bias"), m, none) for m in masks]
            rmask = [b.select(flag("has_res"), m, none) for m in masks]
            bias = [f.mload(f.at(g["bias"], c64(16 * v)), bmask[v]) for v in range(NR // 16)]

            def epilogue(r, v, val):
                val = f.activation(act, b.fadd(val, bias[v]))
                rptr = f.at(g["res"], f.mul(c64(r), g["ldr"]), c64(16 * v))
                return b.fadd(val, f.mload(rptr, rmask[v]))
            store_rows(epilogue)
        with otherwise:
            store_rows(lambda r, v, val: val)
    return f.finish()


def _emit_pack_a(f: FnBuilder, a, lda, row0, row_end, col0, kc, dst, npan,
                 stride=None) -> None:
    """A[row0:row_end, col0:col0+kc] into npan MR-row panels Ap[ip][kk][MR] at dst,
    `stride` (default kc * MR) floats apart; rows past row_end zero."""
    b = f.b
    with f.loop(0, npan) as ip:
        first = b.add(row0, f.mul(ip, MR))
        panel = f.at(dst, f.mul(ip, stride or f.mul(kc, MR)))
        whole = b.icmp_signed("<=", b.add(first, c64(MR)), row_end)
        # whole panels: 16 columns of the MR = 8 rows at a time, transposed in
        # registers (a store per two columns instead of one per element: 2.5x faster)
        whole16 = b.select(whole, f.mul(b.sdiv(kc, c64(16)), 16), c64(0))
        srcs = [f.at(a, f.mul(b.add(first, c64(r)), lda), col0) for r in range(MR)]
        with f.loop(0, whole16, 16) as kk:
            rows = [f.vload(f.at(src, kk)) for src in srcs]
            while len(rows) > 1:   # concatenate: lane r * 16 + c is A[first + r, kk + c]
                n = rows[0].type.count
                rows = [b.shuffle_vector(x, y, ir.Constant(ir.VectorType(I32, 2 * n),
                                                           list(range(2 * n))))
                        for x, y in zip(rows[::2], rows[1::2], strict=True)]
            lanes = rows[0]
            for j in range(8):   # columns kk + 2j and kk + 2j + 1, MR rows each
                idx = [(e % MR) * 16 + 2 * j + e // MR for e in range(16)]
                f.vstore(b.shuffle_vector(lanes, ir.Constant(lanes.type, ir.Undefined),
                                          ir.Constant(VI32, idx)),
                         f.at(panel, f.mul(b.add(kk, c64(2 * j)), MR)))
        with f.loop(0, MR) as r:   # the rest, and panels with rows past row_end
            row = b.add(first, r)
            out = f.at(panel, r)
            with b.if_else(b.icmp_signed("<", row, row_end)) as (inside, outside):
                with inside:
                    src = f.at(a, f.mul(row, lda), col0)
                    with f.loop(whole16, kc) as kk:
                        b.store(b.load(f.at(src, kk), typ=F32), f.at(out, f.mul(kk, MR)))
                with outside:
                    with f.loop(0, kc) as kk:
                        b.store(ir.Constant(F32, 0.0), f.at(out, f.mul(kk, MR)))


def _macro_kernel(module: ir.Module, act: str, uk: ir.Function,
                  prepacked: bool = False) -> ir.Function:
    """Rows [m0, m1) x panels [jp0, jp1) of C = A @ Bp with the `act` epilogue.

    `ap` is a workspace for packed blocks of A, or with `prepacked` all of A already
    packed by `tc_pack_a` (shared by threads that split the panels; m0 = 0)."""
    f = FnBuilder(module, f"tc_gemm_{'pa_' if prepacked else ''}{act}", [
        ("a", PTR), ("lda", I64), ("bp", PTR), ("k", I64), ("c", PTR), ("ldc", I64),
        ("n", I64), ("bias", PTR), ("has_bias", I64), ("res", PTR), ("ldr", I64),
        ("has_res", I64), ("ap", PTR), ("m0", I64), ("m1", I64), ("jp0", I64), ("jp1", I64)])
    b, g = f.b, f.arg
    K = g["k"]
    with f.loop(0, K, KC) as pc:
        kc = f.min(c64(KC), b.sub(K, pc))
        first = b.zext(b.icmp_signed("==", pc, c64(0)), I64)
        last = b.zext(b.icmp_signed(">=", b.add(pc, kc), K), I64)
        with f.loop(g["m0"], g["m1"], MC) as ic:
            mc = f.min(c64(MC), b.sub(g["m1"], ic))
            npan = b.sdiv(b.add(mc, c64(MR - 1)), c64(MR))
            panel = c64(KC * MR) if prepacked else f.mul(kc, MR)
            # prepacked: K block pc of row panel ip at ((pc / KC) * panels(m1) + ip) * KC * MR
            mt = b.sdiv(b.add(g["m1"], c64(MR - 1)), c64(MR))
            ap = f.at(g["ap"], f.mul(b.add(f.mul(b.sdiv(pc, c64(KC)), mt),
                                           b.sdiv(ic, c64(MR))), KC * MR)) \
                if prepacked else g["ap"]
            if not prepacked:
                _emit_pack_a(f, g["a"], g["lda"], ic, b.add(ic, mc), pc, kc, g["ap"], npan)
            with f.loop(g["jp0"], g["jp1"]) as jp:
                n0 = f.mul(jp, NR)
                nrem = f.min(c64(NR), b.sub(g["n"], n0))
                bpan = f.at(g["bp"], f.mul(b.add(f.mul(jp, K), pc), NR))
                # prefetch: the next panel, after the last one the first of the next
                # K block
                wrap = b.icmp_signed(">=", b.add(jp, c64(1)), g["jp1"])
                pf_jp = b.select(wrap, g["jp0"], b.add(jp, c64(1)))
                pf_pc = b.select(b.and_(wrap, b.icmp_signed("<", b.add(pc, c64(KC)), K)),
                                 b.add(pc, c64(KC)), pc)
                pf = f.at(g["bp"], f.mul(b.add(f.mul(pf_jp, K), pf_pc), NR))
                with f.loop(0, npan) as ip:
                    m = b.add(ic, f.mul(ip, MR))
                    b.call(uk, [
                        kc, f.at(ap, f.mul(ip, panel)), bpan,
                        f.at(g["c"], f.mul(m, g["ldc"]), n0), g["ldc"],
                        f.min(c64(MR), b.sub(b.add(ic, mc), m)), nrem, first, last,
                        f.at(g["bias"], n0), g["has_bias"],
                        f.at(g["res"], f.mul(m, g["ldr"]), n0), g["ldr"], g["has_res"], pf])
    return f.finish()


def _job(module: ir.Module, name: str, target: ir.Function, fixed: list[ir.Type],
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


def _pack_b(module: ir.Module) -> ir.Function:
    """Panels [jp0, jp1) of B (row-major K x N, row stride ldb) into Bp[jp][k][NR]."""
    f = FnBuilder(module, "tc_pack_b", [("b", PTR), ("ldb", I64), ("k", I64), ("n", I64),
                                        ("bp", PTR), ("jp0", I64), ("jp1", I64)])
    b, g = f.b, f.arg
    with f.loop(g["jp0"], g["jp1"]) as jp:
        n0 = f.mul(jp, NR)
        masks = [f.lanes_below(b.sub(g["n"], b.add(n0, c64(16 * v)))) for v in range(NR // 16)]
        with f.loop(0, g["k"]) as k:
            src = f.at(g["b"], f.mul(k, g["ldb"]), n0)
            dst = f.at(g["bp"], f.mul(b.add(f.mul(jp, g["k"]), k), NR))
            for v in range(NR // 16):
                f.vstore(f.mload(f.at(src, c64(16 * v)), masks[v]), f.at(dst, c64(16 * v)), 64)
    return f.finish()


def _pack_bt(module: ir.Module) -> ir.Function:
    """The same panels from B given transposed (N x K, row stride ldb)."""
    f = FnBuilder(module, "tc_pack_bt", [("b", PTR), ("ldb", I64), ("k", I64), ("n", I64),
                                         ("bp", PTR), ("jp0", I64), ("jp1", I64)])
    b, g = f.b, f.arg
    with f.loop(g["jp0"], g["jp1"]) as jp:
        base = f.at(g["bp"], f.mul(f.mul(jp, g["k"]), NR))
        with f.loop(0, NR) as col:
            n = b.add(f.mul(jp, NR), col)
            with b.if_else(b.icmp_signed("<", n, g["n"])) as (inside, outside):
                with inside:
                    src = f.at(g["b"], f.mul(n, g["ldb"]))
                    with f.loop(0, g["k"]) as k:
                        b.store(b.load(f.at(src, k), typ=F32), f.at(base, f.mul(k, NR), col))
                with outside:
                    with f.loop(0, g["k"]) as k:
                        b.store(ir.Constant(F32, 0.0), f.at(base, f.mul(k, NR), col))
    return f.finish()


def build_module() -> ir.Module:
    module = ir.Module(name="tensorc_gemm")
    for name, pack in (("tc_pack_b", _pack_b(module)), ("tc_pack_bt", _pack_bt(module))):
        _job(module, name + "_job", pack, [PTR, I64, I64, I64, PTR], 2, work=None)
    _job(module, "tc_pack_a_job", _pack_a(module), [PTR, I64, I64, I64], 2)  # ap: workspace
    fixed = [PTR, I64, PTR, I64, PTR, I64, I64, PTR, I64, PTR, I64, I64]
    for act in ACTIVATIONS:
        uk = _ukernel(module, act)
        _job(module, f"tc_gemm_job_{act}", _macro_kernel(module, act, uk), fixed, 4)
        _job(module, f"tc_gemm_pa_job_{act}", _macro_kernel(module, act, uk, True), fixed, 4)
    return module


def _pack_a(module: ir.Module) -> ir.Function:
    """Row panels [ip0, ip1) of A (M x K, row stride lda), rows past M zero, into the
    layout `_macro_kernel(prepacked=True)` reads: Ap[pc / KC][ip][kk][MR], KC * MR
    floats per panel, so that one K block's panels are contiguous (panels K * MR
    apart would share cache sets when K is a large power of two)."""
    f = FnBuilder(module, "tc_pack_a", [("a", PTR), ("lda", I64), ("k", I64), ("m", I64),
                                        ("ap", PTR), ("ip0", I64), ("ip1", I64)])
    b, g = f.b, f.arg
    mt = b.sdiv(b.add(g["m"], c64(MR - 1)), c64(MR))
    with f.loop(0, g["k"], KC) as pc:
        dst = f.at(g["ap"], f.mul(b.add(f.mul(b.sdiv(pc, c64(KC)), mt), g["ip0"]), KC * MR))
        _emit_pack_a(f, g["a"], g["lda"], f.mul(g["ip0"], MR), g["m"], pc,
                     f.min(c64(KC), b.sub(g["k"], pc)), dst, b.sub(g["ip1"], g["ip0"]),
                     c64(KC * MR))
    return f.finish()


_P, _I = c_void_p, c_int64
_lib_lock = threading.Lock()
_lib: dict | None = None


def kernels() -> dict:
    """The compiled entry points (compiled once per process; object code cached on disk)."""
    global _lib
    with _lib_lock:
        if _lib is None:
            jobs = [f"tc_gemm_{p}job_{a}" for a in ACTIVATIONS for p in ("", "pa_")]
            jobs += ["tc_pack_a_job", "tc_pack_b_job", "tc_pack_bt_job"]
            names = ["tc_pack_b", "tc_pack_bt"] + [f"tc_gemm_{a}" for a in ACTIVATIONS] + jobs
            addrs = compile_ir(build_module(), names)
            pack_args = [_P, _I, _I, _I, _P, _I, _I]
            gemm_args = [_P, _I, _P, _I, _P, _I, _I, _P, _I, _P, _I, _I, _P, _I, _I, _I, _I]
            _lib = {"pack_b": cfunc(addrs["tc_pack_b"], None, pack_args),
                    "pack_bt": cfunc(addrs["tc_pack_bt"], None, pack_args)}
            _lib.update({a: cfunc(addrs[f"tc_gemm_{a}"], None, gemm_args) for a in ACTIVATIONS})
            _lib["jobs"] = {j: addrs[j] for j in jobs}
        return _lib


# -- numpy-level API ------------------------------------------------------------------



_tls = threading.local()   # per thread: scratch buffers


def run_jobs(steps: list, threads: int) -> None:
    """Native jobs (see pool.py), one after the other, on up to `threads` threads:
    steps are (job address, fixed arguments, items, workspace), workspace "ap" (every
    thread reads this thread's packed A) or (name, floats): a buffer per thread.
    Serial when the pool is taken (another caller is using it)."""
    if threads > 1:
        workers = pool.get(threads)
        if workers.lock.acquire(blocking=False):
            try:
                for job, fixed, items, ws in steps:
                    block = _block(fixed, _workspaces(ws, workers), items)
                    workers.run(job, block.ctypes.data, len(items))
            finally:
                workers.lock.release()
            return
    for job, fixed, items, ws in steps:
        block = _block(fixed, _workspaces(ws), items)
        pool.serial(job, block.ctypes.data, len(items))


def _workspaces(ws, workers: pool.Pool | None = None) -> list[int]:
    """Workspace addresses for this thread, then for each of the pool's workers."""
    n = workers.threads if workers else 1
    if ws is None:
        return [0] * n
    if ws == "ap":
        return [_prepacked_a()] * n
    name, size = ws
    ptrs = [_scratch(name, size).ctypes.data]
    for t in range(1, n):
        buf = workers.scratch.get((name, t))
        if buf is None or buf.size < size:
            buf = workers.scratch[name, t] = aligned_empty(size)
        ptrs.append(buf.ctypes.data)
    return ptrs


def _block(fixed: list[int], works: list[int], items) -> np.ndarray:
    """A job's argument block: fixed arguments, workspaces, items (see `_job`)."""
    return np.array([*fixed, len(works), *works, *[x for it in items for x in it]], np.int64)


def aligned_empty(n: int) -> np.ndarray:
    """A float32 buffer of n elements starting on an ALIGN-byte boundary."""
    raw = np.empty(n + ALIGN // 4, np.float32)
    start = (-raw.ctypes.data % ALIGN) // 4
    return raw[start:start + n]


def _workspace() -> int:
    """Address of this thread's buffer for packed blocks of A."""
    ptr = getattr(_tls, "a_ptr", None)
    if ptr is None:
        ptr = _tls.a_ptr = _scratch("a", MC * KC).ctypes.data
    return ptr


def _prepacked_size(m: int, k: int) -> int:
    """Floats of A [m, k] packed by tc_pack_a (rows to MR, K to KC, zero padded)."""
    return -(-m // MR) * MR * -(-k // KC) * KC


def _prepacked_a() -> int:
    """Address of this thread's buffer for all of a small A, packed (PREPACK_A floats:
    allocated at full size once, so its address never changes)."""
    ptr = getattr(_tls, "ap_ptr", None)
    if ptr is None:
        ptr = _tls.ap_ptr = _scratch("ap", PREPACK_A).ctypes.data
    return ptr


def _scratch(name: str, size: int) -> np.ndarray:
    """This thread's reusable aligned buffer `name`, grown to at least `size` floats."""
    buf = getattr(_tls, name, None)
    if buf is None or buf.size < size:
        buf = aligned_empty(size)
        setattr(_tls, name, buf)
    return buf[:size]


def _split(total: int, parts: int, quantum: int) -> list[tuple[int, int]]:
    """[0, total) cut into <= parts ranges whose starts are multiples of quantum."""
    units = -(-total // quantum)
    parts = max(1, min(parts, units))
    cuts = [min(total, (units * i // parts) * quantum) for i in range(parts + 1)]
    return [(a, b) for a, b in zip(cuts, cuts[1:], strict=False) if b > a]


def _f32(x, what: str) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype != np.float32:
        raise TensorcError(f"gemm: {what} must be float32, got {x.dtype}")
    return x


def _rows(x: np.ndarray) -> np.ndarray:
    """x with unit stride along its last axis and a non-negative row stride."""
    if x.strides[-1] != 4 or any(s < 0 or s % 4 for s in x.strides):
        return np.ascontiguousarray(x)
    return x


class PackedB:
    """B [K, N] (or [N, K] with trans_b) packed into NR-column panels.

    Pack a constant weight once and pass the PackedB to `gemm` on every call."""

    ndim = 2

    def __init__(self, b, trans_b: bool = False, threads: int | None = None,
                 scratch: bool = False, fill: bool = True):
        b = _rows(_f32(b, "b"))
        if b.ndim != 2:
            raise ShapeError(f"gemm: can only pack a 2-D B, got shape {b.shape}")
        self.k, self.n = (b.shape[1], b.shape[0]) if trans_b else b.shape
        self.panels = -(-self.n // NR)
        size = max(1, self.panels * NR * self.k)
        # scratch: reuse this thread's buffer (valid until its next scratch pack), which
        # spares a per-call B the page faults of fresh memory
        self.data = _scratch("b", size) if scratch else aligned_empty(size)
        self.ptr = self.data.ctypes.data
        self._source = (b, kernels()["pack_bt" if trans_b else "pack_b"])
        if fill:   # else the caller packs panels with fill_panels, e.g. in its threads
            threads = num_threads() if threads is None else threads
            many = threads > 1 and self.k * self.n >= 1 << 18
            self.fill_jobs(threads if many else 1)

    def fill_jobs(self, threads: int) -> None:
        """Pack every panel, split across the pool's threads."""
        if self.k and self.panels:
            run_jobs([self.pack_step(_split(self.panels, threads, 1))], threads)

    def pack_step(self, ranges) -> tuple:
        """The native job (see `run_jobs`) packing these panel ranges."""
        b, pack = self._source
        job = kernels()["jobs"]["tc_pack_bt_job" if pack is kernels()["pack_bt"]
                                else "tc_pack_b_job"]
        return (job, [b.ctypes.data, b.strides[0] // 4, self.k, self.n, self.ptr],
                list(ranges), None)

    def fill_panels(self, jp0: int, jp1: int) -> None:
        """Pack column panels [jp0, jp1) (thread safe for disjoint ranges)."""
        b, pack = self._source
        if self.k and jp1 > jp0:
            pack(b.ctypes.data, b.strides[0] // 4, self.k, self.n, self.ptr, jp0, jp1)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.k, self.n)


def gemm_range(a: np.ndarray, packed: PackedB, out: np.ndarray, m0: int, m1: int,
               jp0: int, jp1: int, bias: np.ndarray | None = None, activation: str = "none",
               residual: np.ndarray | None = None) -> None:
    """Rows [m0, m1) x column panels [jp0, jp1) (NR columns each) of the fused GEMM.

    Low level and thread safe: `a`, `out`, `residual` are 2-D float32 with unit inner
    stride (residual's row stride may be 0), bias is contiguous [N]; not checked here.
    Threads may call it at once on disjoint ranges."""
    fn, args = _call(a, packed, out, bias, activation, residual)
    fn(*args, _workspace(), m0, m1, jp0, jp1)


def _call(a, packed, out, bias, activation, residual):
    """The kernel and its arguments but for the ranges and the workspace, so that
    threads only add their ranges (the GIL is held for as short as possible)."""
    res = residual if residual is not None else out
    return kernels()[activation], (
        a.ctypes.data, a.strides[0] // 4, packed.ptr, packed.k, out.ctypes.data,
        out.strides[0] // 4, packed.n, (bias if bias is not None else out).ctypes.data,
        int(bias is not None), res.ctypes.data, res.strides[0] // 4, int(residual is not None))


def _activation_name(activation) -> str:
    act = _ALIASES.get(activation, activation)
    if act not in ACTIVATIONS:
        raise TensorcError(f"gemm: unknown activation {activation!r}; "
                           f"known: {', '.join(a for a in ACTIVATIONS if a != 'none')}, gelu")
    return act


def _numpy_epilogue(z, bias, act, residual):
    """The epilogue on an already computed product (used when K == 0)."""
    from tensorc.ops.elementwise import gelu
    if bias is not None:
        z = z + bias
    z = {"none": lambda x: x, "relu": lambda x: np.maximum(x, np.float32(0)),
         "gelu_erf": gelu, "gelu_tanh": lambda x: gelu(x, "tanh")}[act](z)
    return z + residual if residual is not None else z


def _shares_a(m: int, k: int, panels: int, threads: int) -> bool:
    """A few rows (a transformer's tokens): pack all of A once into a buffer read from
    L2 by every thread, and cut the panels into small items that threads claim, so
    that each panel of B is read once and a thread that is slow to start (a busy
    machine) takes fewer. In GPT small this beat splitting the rows by 4% on a busy
    machine; with A over half an L2 it lost to it."""
    return _prepacked_size(m, k) <= PREPACK_A and panels >= 2 * threads


def _gemm2d(a, packed, out, bias, act, residual, threads, fill=False):
    """out = epilogue(a @ packed); fill: the panels still need packing (B per call)."""
    M, N = a.shape[0], packed.n
    if M == 0 or N == 0:
        return out
    if packed.k == 0:
        out[...] = _numpy_epilogue(np.zeros((M, N), np.float32), bias, act, residual)
        return out
    panels = packed.panels

    fn, args = _call(a, packed, out, bias, act, residual)

    def block(m0, m1, jp0, jp1):
        fn(*args, _workspace(), m0, m1, jp0, jp1)

    if threads == 1 or M * N * packed.k < 1 << 21:
        if fill:
            packed.fill_panels(0, panels)
        block(0, M, 0, panels)
        return out
    # A per-call B: each thread packs the panels it then multiplies (they stay in its
    # caches). A packed weight: see _shares_a; else split rows when each thread gets a
    # few row tiles and B is small enough to share from L3 (no A packed twice), else
    # split the panels, so that each thread streams only its part of B.
    steps = _schedule(a, packed, out, bias, act, residual, threads)
    if fill:
        steps.insert(0, packed.pack_step(_split(panels, threads, 1)))
    run_jobs(steps, threads)
    return out


def _schedule(a, packed, out, bias, act, residual, threads) -> list:
    """The native jobs (see `run_jobs`) of a threaded GEMM with a packed B."""
    M, K, panels = a.shape[0], packed.k, packed.panels
    mt = -(-M // MR)
    jobs = kernels()["jobs"]
    fixed = list(_call(a, packed, out, bias, act, residual)[1])
    if _shares_a(M, K, panels, threads):
        items = [(0, M, *r) for r in _split(panels, ITEMS_PER_THREAD * threads, 1)]
        return [(jobs["tc_pack_a_job"], [a.ctypes.data, a.strides[0] // 4, K, M],
                 _split(mt, threads, 1), "ap"),
                (jobs[f"tc_gemm_pa_job_{act}"], fixed, items, "ap")]
    if mt >= 4 * threads and packed.data.nbytes <= 8 << 20 or mt > panels:
        items = [(m0, m1, 0, panels) for m0, m1 in _split(M, threads, MR)]
    else:
        items = [(0, M, *r) for r in _split(panels, threads, 1)]
    return [(jobs[f"tc_gemm_job_{act}"], fixed, items, ("a", MC * KC))]


def gemm(a, b, out: np.ndarray | None = None, *, bias=None, activation: str | None = None,
         residual=None, trans_b: bool = False, threads: int | None = None) -> np.ndarray:
    """act(a @ b + bias) + residual in float32, like np.matmul (batched, broadcasting).

    b is an array ([..., K, N], or [..., N, K] with trans_b) or a `PackedB`.
    activation: None, "relu", "gelu" (= "gelu_erf") or "gelu_tanh". bias is [N];
    residual broadcasts to the output shape. threads defaults to `num_threads()`."""
    act = _activation_name(activation)
    threads = num_threads() if threads is None else max(1, int(threads))
    a = _f32(a, "a")
    b = b if isinstance(b, PackedB) else _f32(b, "b")
    if a.ndim == 0 or b.ndim == 0:
        raise ShapeError("gemm: cannot multiply scalars")
    if a.ndim == 1 or b.ndim == 1:  # numpy's vector rules: promote, then drop the axis
        if out is not None:
            raise TensorcError("gemm: out= needs matrix operands, got a vector")
        a2 = a[None, :] if a.ndim == 1 else a
        b2 = b if b.ndim > 1 else b[None, :] if trans_b else b[:, None]
        z = gemm(a2, b2, bias=bias, activation=activation, trans_b=trans_b, threads=threads)
        z = z[..., 0] if b.ndim == 1 else z
        z = z[..., 0, :] if a.ndim == 1 else z
        return z if residual is None else np.add(z, _f32(residual, "residual"), dtype=np.float32)
    bk, bn = (b.shape[-1], b.shape[-2]) if trans_b and not isinstance(b, PackedB) \
        else b.shape[-2:]
    if a.shape[-1] != bk:
        raise ShapeError(f"gemm: inner dims differ: a {a.shape} @ b {b.shape}"
                         + (" (trans_b)" if trans_b else ""))
    bias = None if bias is None else np.ascontiguousarray(_f32(bias, "bias"))
    if bias is not None and bias.shape != (bn,):
        raise ShapeError(f"gemm: bias shape {bias.shape} should be ({bn},)")
    b_batch = () if isinstance(b, PackedB) else b.shape[:-2]
    try:
        batch = np.broadcast_shapes(a.shape[:-2], b_batch) if b_batch else a.shape[:-2]
    except ValueError:
        raise ShapeError(f"gemm: batch dims do not broadcast: a {a.shape} @ b {b.shape}") \
            from None
    shape = batch + (a.shape[-2], bn)
    if out is None:
        out = np.empty(shape, np.float32)
    elif out.shape != shape or out.dtype != np.float32 or out.strides[-1] != 4 \
            or not out.flags.writeable:
        raise TensorcError(f"gemm: out must be a writeable float32 {shape} array with unit "
                           f"inner stride, got {out.dtype} {out.shape}")
    if residual is not None:
        residual = _f32(residual, "residual")
        try:
            residual = residual if residual.shape == shape else np.broadcast_to(residual, shape)
        except ValueError:
            raise ShapeError(f"gemm: residual {residual.shape} does not broadcast to "
                             f"{shape}") from None
        if np.may_share_memory(residual, out):  # C holds partial sums before the epilogue
            residual = residual.copy()
    if np.may_share_memory(a, out):
        a = a.copy()
    if not isinstance(b, PackedB) and np.may_share_memory(b, out):
        b = b.copy()

    if not b_batch:  # one B for every row of a: a single big GEMM
        fill = not isinstance(b, PackedB)
        packed = PackedB(b, trans_b, threads, scratch=True, fill=False) if fill else b
        rows = math.prod(shape[:-1])
        a2 = _rows(a if a.ndim == 2 else a.reshape(rows, a.shape[-1]))
        r2 = None if residual is None else \
            _rows(residual if residual.ndim == 2 else residual.reshape(rows, bn))
        if len(shape) == 2 and out.strides[0] >= 0 and out.strides[0] % 4 == 0:
            _gemm2d(a2, packed, out, bias, act, r2, threads, fill)
        elif out.flags.c_contiguous:
            _gemm2d(a2, packed, out.reshape(rows, bn), bias, act, r2, threads, fill)
        else:
            out[...] = _gemm2d(a2, packed, np.empty((rows, bn), np.float32), bias, act, r2,
                               threads, fill).reshape(shape)
        return out

    a_b = np.broadcast_to(a, batch + a.shape[-2:])
    b_b = np.broadcast_to(b, batch + b.shape[-2:])
    r_b = residual
    for idx in np.ndindex(*batch):   # each product threads itself when big enough
        packed = PackedB(b_b[idx], trans_b, 1, scratch=True, fill=False)
        r = None if r_b is None else _rows(r_b[idx])
        _gemm2d(_rows(a_b[idx]), packed, out[idx], bias, act, r, threads, fill=True)
    return out



def bind(a: np.ndarray, b, out: np.ndarray, *, bias=None, activation: str | None = None,
         residual=None, threads: int | None = None):
    """A zero-argument function that computes gemm(a, b, out=out, ...) into `out`.

    For arrays that never move (the runtime's arena views): a threaded product with
    a packed weight has its checks, schedule and argument blocks made here once,
    which leaves one or two native pool calls per run; anything else runs `gemm`."""
    threads = num_threads() if threads is None else max(1, int(threads))
    act = _activation_name(activation)

    def general():
        gemm(a, b, out=out, bias=bias, activation=activation, residual=residual,
             threads=threads)

    def rows(x):   # 2-D float32, unit inner stride, non-negative row stride
        return x.ndim == 2 and x.dtype == np.float32 and x.strides[1] == 4 \
            and x.strides[0] >= 0 and x.strides[0] % 4 == 0

    def flat(x):   # [..., rows, n] as a 2-D view of the same memory, if there is one
        if x is None or x.ndim < 3:
            return x
        try:
            view = x.view()
            view.shape = (-1, x.shape[-1])   # raises where only a copy would do
            return view
        except AttributeError:
            return x
    a2, out2, res2 = flat(a), flat(out), flat(residual)   # `general` keeps the originals
    if not (isinstance(b, PackedB) and threads > 1 and rows(a2) and rows(out2)
            and out2.flags.writeable and a2.shape == (out2.shape[0], b.k)
            and out2.shape[1] == b.n and (bias is None or bias.dtype == np.float32 and
                                          bias.shape == (b.n,) and bias.flags.c_contiguous)
            and (res2 is None or rows(res2) and res2.shape == out2.shape
                 and not np.may_share_memory(res2, out2))
            and not np.may_share_memory(a2, out2)):
        return general
    if a2.shape[0] * b.n * b.k < 1 << 21:   # as gemm: one thread
        return general
    workers = pool.get(threads)
    steps = _schedule(a2, b, out2, bias, act, res2, workers.threads)
    state = {}

    def prepare(key):   # argument blocks with this thread's workspaces
        blocks = [(job, _block(fixed, _workspaces(ws, workers), items), len(items))
                  for job, fixed, items, ws in steps]
        state.update(key=key, blocks=blocks,
                     launch=[(job, blk.ctypes.data, n) for job, blk, n in blocks])

    def run():
        key = (_prepacked_a(), _workspace())   # a call may come from another thread
        if key != state.get("key"):
            prepare(key)
        if not workers.lock.acquire(blocking=False):
            general()
            return
        try:
            for launch in state["launch"]:
                workers.run(*launch)
        finally:
            workers.lock.release()
    return run
