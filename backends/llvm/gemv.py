"""A few rows times a matrix (decode-shaped GEMM): C = act(A @ B + bias) + residual.

With M <= GEMV_MAX_M rows (a generated token per sequence) the product is bound by
reading B once: 2 flops per 4-byte weight. The packed GEMM (`gemm_ir.py`) then does
MR = 8 rows of FMAs whatever M is and packs A on every call; this path streams each
NR-column panel of B once, from its first to its last row, with all M rows of A
multiplied into it (accumulators for M rows x NR columns in registers, A read as
broadcast scalars straight from its rows: no packing), vectorised along N.

B is either a `PackedB` (panel jp at jp * K * NR, a row of a panel NR floats on) or a
row-major [K, N] array used as it is (panel jp at jp * NR, a row ldb floats on: no
packing pass for a B that changes per call); the last panel, when N is not a multiple
of NR, is read and written with masked loads and stores. Threads split the panels
(`gemm.py` makes the items); the epilogue (bias, activation, residual) runs on each
item's columns of C right after they are computed, while they are in L1.

The kernels are specialised on M (1..8: the accumulators of M rows stay in
registers, with two sets, even and odd k, when M <= 4, so that the FMA chains of
one row do not wait on each other), and live in a module of their own.
"""

from __future__ import annotations

import threading
from ctypes import c_int64, c_void_p

from llvmlite import ir

from .gemm_ir import ACTIVATIONS, NR
from .irbuild import F32, I16, I32, I64, M16, PTR, V16, FnBuilder, c64, job, vconst
from .jit import cfunc, compile_library

GEMV_MAX_M = 8
PF_AHEAD = 1 << 14   # prefetch distance in a packed B, floats (64 KiB)
PF_ROWS = 8          # in a row-major B, rows
# driver arguments: a, lda, b, kstride, pstride, k, c, ldc, n, m, bias, has_bias, res,
# ldr, has_res (then the item: jp0, jp1)
FIXED = [PTR, I64, PTR, I64, I64, I64, PTR, I64, I64, I64, PTR, I64, PTR, I64, I64]


def _rows_kernel(module: ir.Module, m: int, bf16: bool = False) -> ir.Function:
    """tc_gemv_m<m>: C[0:m, panels jp0..jp1) = A[0:m, :] @ B, no epilogue. bf16: B is a
    PackedB of bf16 (pairwise, see `FnBuilder.bf16_pair`; its panels are zero padded,
    so the last one is read whole), widened in registers; strides count bf16s."""
    bty = I16 if bf16 else F32
    f = FnBuilder(module, f"tc_gemv_m{m}", [
        ("a", PTR), ("lda", I64), ("b", PTR), ("kstride", I64), ("pstride", I64),
        ("k", I64), ("c", PTR), ("ldc", I64), ("n", I64), ("jp0", I64), ("jp1", I64)],
        internal=True)
    b, g = f.b, f.arg
    nv = NR // 16
    sets = 2 if m <= 4 else 1
    K = g["k"]
    prefetch = f.intrinsic("llvm.prefetch.p0", ir.VoidType(), [PTR, I32, I32, I32])
    arow = [f.at(g["a"], f.mul(c64(r), g["lda"])) for r in range(m)]
    full = b.sdiv(g["n"], c64(NR))   # panels with all NR columns inside N
    pf_ahead = b.select(b.icmp_signed("==", g["kstride"], c64(NR)), c64(PF_AHEAD),
                        f.mul(g["kstride"], PF_ROWS))

    def panel(jp, masked: bool):
        bpan = f.at(g["b"], f.mul(jp, g["pstride"]), ty=bty)
        n0 = f.mul(jp, NR)
        masks = [f.lanes_below(b.sub(g["n"], b.add(n0, c64(16 * v)))) for v in range(nv)] \
            if masked else None
        acc = [[[f.var(V16, vconst(0.0)) for _ in range(nv)] for _ in range(m)]
               for _ in range(sets)]

        def step(kk, s):
            brow = f.at(bpan, f.mul(kk, g["kstride"]), ty=bty)
            # PF_AHEAD floats further on in a thread's stream of panels, towards L2: a
            # weight comes cold from memory. 2 KiB-ahead L1 prefetches and none at
            # all measured ~40 % slower with M = 8 than the next panel, and 16-64 KiB
            # ahead 5-8 % faster than the next panel (K x NR floats, 256 KiB at
            # K = 2048); a row-major B: PF_ROWS rows ahead
            for v in range(nv // (1 + bf16)):   # a bf16 row is one cache line
                b.call(prefetch, [f.at(brow, pf_ahead, c64(16 * v), ty=bty),
                                  ir.Constant(I32, 0), ir.Constant(I32, 2), ir.Constant(I32, 1)])
            if bf16:
                bv = f.bf16_pair(brow)
            else:
                bv = [f.mload(f.at(brow, c64(16 * v)), masks[v]) if masked
                      else f.vload(f.at(brow, c64(16 * v))) for v in range(nv)]
            for r in range(m):
                x = f.splat(b.load(f.at(arow[r], kk), typ=F32))
                for v in range(nv):
                    b.store(f.fma(x, bv[v], b.load(acc[s][r][v], typ=V16)), acc[s][r][v])

        kmain = f.mul(b.sdiv(K, c64(sets)), sets)
        with f.loop(0, kmain, sets) as kk:
            for s in range(sets):
                step(b.add(kk, c64(s)), s)
        with f.loop(kmain, K) as kk:   # K odd with two sets: the last row
            step(kk, 0)
        for r in range(m):
            crow = f.at(g["c"], f.mul(c64(r), g["ldc"]), n0)
            for v in range(nv):
                val = b.load(acc[0][r][v], typ=V16)
                for s in range(1, sets):
                    val = b.fadd(val, b.load(acc[s][r][v], typ=V16))
                if masked:
                    f.mstore(val, f.at(crow, c64(16 * v)), masks[v])
                else:
                    f.vstore(val, f.at(crow, c64(16 * v)))

    with f.loop(g["jp0"], f.min(g["jp1"], full)) as jp:
        panel(jp, False)
    start = b.select(b.icmp_signed(">", g["jp0"], full), g["jp0"], full)
    with f.loop(start, g["jp1"]) as jp:
        panel(jp, True)
    return f.finish()


def _epilogue(module: ir.Module, act: str) -> ir.Function:
    """tc_gemv_epi_<act>: C[0:m, n0:n1] = act(C + bias) + residual, in place."""
    f = FnBuilder(module, f"tc_gemv_epi_{act}", [
        ("c", PTR), ("ldc", I64), ("m", I64), ("n0", I64), ("n1", I64), ("bias", PTR),
        ("has_bias", I64), ("res", PTR), ("ldr", I64), ("has_res", I64)], internal=True)
    b, g = f.b, f.arg
    none = ir.Constant(M16, [0] * 16)
    has_bias = b.icmp_signed("!=", g["has_bias"], c64(0))
    has_res = b.icmp_signed("!=", g["has_res"], c64(0))
    with f.loop(0, g["m"]) as r:
        crow = f.at(g["c"], f.mul(r, g["ldc"]))
        rrow = f.at(g["res"], f.mul(r, g["ldr"]))
        with f.loop(g["n0"], g["n1"], 16) as j:
            lanes = f.lanes_below(b.sub(g["n1"], j))
            val = f.mload(f.at(crow, j), lanes)
            val = b.fadd(val, f.mload(f.at(g["bias"], j), b.select(has_bias, lanes, none)))
            val = f.activation(act, val)
            val = b.fadd(val, f.mload(f.at(rrow, j), b.select(has_res, lanes, none)))
            f.mstore(val, f.at(crow, j), lanes)
    return f.finish()


def _driver(module: ir.Module, act: str, rows: list[ir.Function], tag: str = "") -> ir.Function:
    """tc_gemv_<act>: panels [jp0, jp1) of C = act(A @ B + bias) + residual, M <= 8."""
    names = ["a", "lda", "b", "kstride", "pstride", "k", "c", "ldc", "n", "m", "bias",
             "has_bias", "res", "ldr", "has_res"]
    f = FnBuilder(module, f"tc_gemv_{tag}{act}",
                  list(zip(names, FIXED, strict=True)) + [("jp0", I64), ("jp1", I64)])
    b, g = f.b, f.arg
    args = [g[x] for x in ("a", "lda", "b", "kstride", "pstride", "k", "c", "ldc", "n",
                           "jp0", "jp1")]
    after = f.fn.append_basic_block("epilogue")
    switch = b.switch(g["m"], after)
    for m, fn in enumerate(rows, start=1):
        block = f.fn.append_basic_block(f"m{m}")
        switch.add_case(c64(m), block)
        b.position_at_end(block)
        b.call(fn, args)
        b.branch(after)
    b.position_at_end(after)
    n1 = f.min(f.mul(g["jp1"], NR), g["n"])
    epi = b.or_(b.icmp_signed("!=", b.or_(g["has_bias"], g["has_res"]), c64(0)),
                ir.Constant(ir.IntType(1), int(act != "none")))
    with b.if_then(epi):
        b.call(module.get_global(f"tc_gemv_epi_{act}"), [
            g["c"], g["ldc"], g["m"], f.mul(g["jp0"], NR), n1, g["bias"], g["has_bias"],
            g["res"], g["ldr"], g["has_res"]])
    return f.finish()


def build_module(bf16: bool = False) -> ir.Module:
    """The GEMV module; bf16: the one for bf16 weights (`tc_gemv_bf16_[job_]<act>`)."""
    module = ir.Module(name="tensorc_gemv_bf16" if bf16 else "tensorc_gemv")
    rows = [_rows_kernel(module, m, bf16) for m in range(1, GEMV_MAX_M + 1)]
    for act in ACTIVATIONS:
        _epilogue(module, act)
        drv = _driver(module, act, rows, "bf16_" if bf16 else "")
        job(module, f"tc_gemv_{'bf16_' if bf16 else ''}job_{act}", drv, FIXED, 2, work=None)
    return module


_lib_lock = threading.Lock()
_lib: dict = {}


def kernels(bf16: bool = False) -> dict:
    """{"tc_gemv_<act>" and "tc_gemv_job_<act>": address} (compiled once per process);
    bf16: {"tc_gemv_bf16_<act>", "tc_gemv_bf16_job_<act>"}, the bf16 weights' module."""
    with _lib_lock:
        if bf16 not in _lib:
            _lib[bf16] = compile_library(*ahead(bf16)[:2], names(bf16))
        return _lib[bf16]


def names(bf16: bool = False) -> list[str]:
    tag = "bf16_" if bf16 else ""
    return [f"tc_gemv_{tag}{p}{a}" for a in ACTIVATIONS for p in ("", "job_")]


NAMES = names()


def ahead(bf16: bool = False) -> tuple:
    """The `jit.compile_ahead` job of the GEMV module (see `jit.compile_library`)."""
    if bf16:
        return ("gemv_bf16", lambda: build_module(True), True, True)
    return ("gemv", build_module, True, True)


_drivers: dict = {}


def driver(act: str):
    """The ctypes function of tc_gemv_<act> (FIXED's arguments, then jp0, jp1)."""
    fn = _drivers.get(act)
    if fn is None:
        types = [c_void_p if t == PTR else c_int64 for t in FIXED] + [c_int64, c_int64]
        fn = _drivers[act] = cfunc(kernels()[f"tc_gemv_{act}"], None, types)
    return fn
