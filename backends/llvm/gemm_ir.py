"""The GEMM's LLVM IR: the mr x 16 nv micro-kernel with its epilogues, the
macro-kernel over one kc x mc block, the packing routines and their pool jobs, each
generated for a `Tile` (see `gemm.py` for the schedule, `gemm_space.py` for the tiles
the tuner tries)."""

from __future__ import annotations

import re
import threading
from ctypes import c_int64, c_void_p
from typing import NamedTuple

from llvmlite import ir

from .irbuild import F32, I16, I32, I64, M16, PTR, V16, VI32, FnBuilder, c64, job, vconst
from .jit import cfunc, compile_library

NR = 32             # columns of a packed panel of B (the layout every kernel reads)
ALIGN = 64          # bytes; packed panels are cache-line aligned


class Tile(NamedTuple):
    """A GEMM schedule: the micro-tile is mr rows x nv 16-lane vectors of columns (a
    panel of NR = 32 columns is multiplied as NR / (16 nv) sub-panels), K is blocked by
    kc, rows by mc (a multiple of mr). The packing of B does not depend on it. Only the
    micro-tile is compiled in (`code`: one module per shape); the blocking is passed at
    run time, and `split`, how threads share the work (`gemm._schedule`), is "auto"
    (the hand-made rule), "shared" (all of A packed once, threads claim panels),
    "rows", "panels", or "blocks" (a per-call B packed per K block by each thread)."""
    mr: int
    nv: int
    kc: int
    mc: int
    split: str = "auto"

    @property
    def tag(self) -> str:
        return f"m{self.mr}v{self.nv}k{self.kc}c{self.mc}"

    @property
    def code(self) -> str:   # what the modules are generated for
        return f"m{self.mr}v{self.nv}"

    @property
    def width(self) -> int:   # columns of the micro-tile
        return 16 * self.nv

    @classmethod
    def parse(cls, code: str) -> Tile:
        """The micro-tile of a module name's `code` (no blocking)."""
        m = re.fullmatch(r"m(\d+)v(\d+)", code)
        if m is None:
            raise ValueError(f"not a GEMM micro-tile: {code!r}")
        return cls(*map(int, m.groups()), 0, 0)


# The hand-picked schedules. AVX-512: 8 rows x 2 zmm = 16 accumulators (14 x 32
# measured no faster), a 256 x 32 panel of B (32 KiB) stays in L1, a 160 x 256 block of
# A in L2. AVX2 has 16 ymm registers, each 16-lane vector takes two: 6 x 16 is 12
# accumulators (8 x 32 would be 32 and spill).
AVX512_TILE = Tile(8, 2, 256, 160)
AVX2_TILE = Tile(6, 1, 256, 120)
KC_MAX, MC_MAX = 512, 256   # the tuner's largest blocks (the workspaces' sizes)
PREPACK_A = 1 << 17  # floats: A up to half an L2 (512 KiB) is packed once and shared
WS_A = MC_MAX * KC_MAX  # floats: a thread's block of packed A (any tile's)
ITEMS_PER_THREAD = 4  # work items per thread when threads claim column panels

ACTIVATIONS = ("none", "relu", "gelu_erf", "gelu_tanh")
_ALIASES = {None: "none", "gelu": "gelu_erf"}


# -- kernel generation ----------------------------------------------------------------

def _ukernel(module: ir.Module, act: str, t: Tile, bf16: bool = False) -> ir.Function:
    """C[mrem, nrem] (+)= Ap[kc, mr] @ Bp[kc, 16 nv] (rows of Bp NR floats apart: a
    sub-panel of a packed panel), epilogue on the last K block. bf16 (nv = 2): Bp holds
    bf16 weights (pairwise, see `FnBuilder.bf16_pair`), widened to float32 in
    registers; A, the products and the sums stay float32."""
    MR, NV = t.mr, t.nv
    f = FnBuilder(module, f"tc_ukernel_{act}", [
        ("kc", I64), ("ap", PTR), ("bp", PTR), ("c", PTR), ("ldc", I64), ("mrem", I64),
        ("nrem", I64), ("first", I64), ("last", I64), ("bias", PTR), ("has_bias", I64),
        ("res", PTR), ("ldr", I64), ("has_res", I64), ("pf", PTR)], internal=True)
    b, g = f.b, f.arg
    f.fn.attributes.add("alwaysinline")
    acc = [[f.var(V16, vconst(0.0)) for _ in range(NV)] for _ in range(MR)]
    prefetch = f.intrinsic("llvm.prefetch.p0", ir.VoidType(), [PTR, I32, I32, I32])
    with f.loop(0, g["kc"]) as k:
        # the next panel of B towards L2, while this one is reused from L1: a model's
        # weights come cold from memory
        bty = I16 if bf16 else F32   # a bf16 row of a panel is one cache line
        for v in range(NV // (1 + bf16)):
            b.call(prefetch, [f.at(g["pf"], f.mul(k, NR), c64(16 * v), ty=bty),
                              ir.Constant(I32, 0), ir.Constant(I32, 2), ir.Constant(I32, 1)])
        bk = f.at(g["bp"], f.mul(k, NR), ty=bty)
        bv = f.bf16_pair(bk, 64) if bf16 else \
            [f.vload(f.at(bk, c64(16 * v)), align=64) for v in range(NV)]
        ak = f.at(g["ap"], f.mul(k, MR))
        for r in range(MR):
            s = f.splat(b.load(f.at(ak, c64(r)), typ=F32))
            for v in range(NV):
                b.store(f.fma(s, bv[v], b.load(acc[r][v], typ=V16)), acc[r][v])

    def flag(name):
        return b.icmp_signed("!=", g[name], c64(0))

    none = ir.Constant(M16, [0] * 16)
    masks = [f.lanes_below(b.sub(g["nrem"], c64(16 * v))) for v in range(NV)]
    cmask = [b.select(flag("first"), none, m) for m in masks]  # first K block: C not read

    def store_rows(epilogue):
        for r in range(MR):
            row_ok = b.icmp_signed("<", c64(r), g["mrem"])
            with b.if_then(row_ok, likely=True):
                crow = f.at(g["c"], f.mul(c64(r), g["ldc"]))
                for v in range(NV):
                    ptr = f.at(crow, c64(16 * v))
                    val = b.fadd(b.load(acc[r][v], typ=V16), f.mload(ptr, cmask[v]))
                    f.mstore(epilogue(r, v, val), ptr, masks[v])

    with b.if_else(flag("last")) as (then, otherwise):
        with then:
            bmask = [b.select(flag("has_bias"), m, none) for m in masks]
            rmask = [b.select(flag("has_res"), m, none) for m in masks]
            bias = [f.mload(f.at(g["bias"], c64(16 * v)), bmask[v]) for v in range(NV)]

            def epilogue(r, v, val):
                val = f.activation(act, b.fadd(val, bias[v]))
                rptr = f.at(g["res"], f.mul(c64(r), g["ldr"]), c64(16 * v))
                return b.fadd(val, f.mload(rptr, rmask[v]))
            store_rows(epilogue)
        with otherwise:
            store_rows(lambda r, v, val: val)
    return f.finish()


def _emit_pack_a(f: FnBuilder, MR: int, a, lda, row0, row_end, col0, kc, dst, npan,
                 stride=None, ldka=None) -> None:
    """A[row0:row_end, col0:col0+kc] into npan MR-row panels Ap[ip][kk][MR] at dst,
    `stride` (default kc * MR) floats apart; rows past row_end zero. A[i, k] is at
    a + i * lda + k * ldka: ldka 1 (rows), or lda 1 (A transposed, a weight
    gradient's x^T: a panel's MR floats of one k are then contiguous in memory)."""
    b = f.b
    if ldka is None:
        _emit_pack_a_rows(f, MR, a, lda, row0, row_end, col0, kc, dst, npan, stride)
        return
    with b.if_else(b.icmp_signed("==", ldka, c64(1))) as (plain, trans):
        with plain:
            _emit_pack_a_rows(f, MR, a, lda, row0, row_end, col0, kc, dst, npan, stride)
        with trans:
            _emit_pack_at(f, MR, a, ldka, row0, row_end, col0, kc, dst, npan, stride)


def _emit_pack_at(f: FnBuilder, MR: int, a, ldka, row0, row_end, col0, kc, dst, npan,
                  stride=None) -> None:
    """`_emit_pack_a` for A given transposed (A[i, k] at a + k * ldka + i): masked
    loads for the rows past row_end; with MR = 8 two k's per 16-lane store."""
    b = f.b
    if MR != 8:
        with f.loop(0, npan) as ip:
            first = b.add(row0, f.mul(ip, MR))
            panel = f.at(dst, f.mul(ip, stride or f.mul(kc, MR)))
            rmask = f.lanes_below(f.min(c64(MR), b.sub(row_end, first)))
            with f.loop(0, kc) as kk:
                f.mstore(f.mload(f.at(a, f.mul(b.add(col0, kk), ldka), first), rmask),
                         f.at(panel, f.mul(kk, MR)), f.lanes_below(c64(MR)))
        return
    none = ir.Constant(M16, [0] * 16)
    cat = ir.Constant(VI32, list(range(8)) + list(range(16, 24)))
    with f.loop(0, npan) as ip:
        first = b.add(row0, f.mul(ip, MR))
        panel = f.at(dst, f.mul(ip, stride or f.mul(kc, MR)))
        rmask = f.lanes_below(f.min(c64(MR), b.sub(row_end, first)))
        with f.loop(0, kc, 2) as kk:
            src = f.at(a, f.mul(b.add(col0, kk), ldka), first)
            x = f.mload(src, rmask)
            more = b.icmp_signed("<", b.add(kk, c64(1)), kc)
            y = f.mload(f.at(src, ldka), b.select(more, rmask, none))
            f.mstore(b.shuffle_vector(x, y, cat), f.at(panel, f.mul(kk, MR)),
                     f.lanes_below(f.mul(b.sub(kc, kk), MR)))


def _emit_pack_a_rows(f: FnBuilder, MR: int, a, lda, row0, row_end, col0, kc, dst, npan,
                      stride=None) -> None:
    """`_emit_pack_a` for A in rows (unit stride along k)."""
    b = f.b
    with f.loop(0, npan) as ip:
        first = b.add(row0, f.mul(ip, MR))
        panel = f.at(dst, f.mul(ip, stride or f.mul(kc, MR)))
        whole = b.icmp_signed("<=", b.add(first, c64(MR)), row_end)
        # whole panels: 16 columns of the MR rows at a time, transposed in registers
        # (MR 16-lane stores instead of one per element: 2.5x faster)
        whole16 = b.select(whole, f.mul(b.sdiv(kc, c64(16)), 16), c64(0))
        srcs = [f.at(a, f.mul(b.add(first, c64(r)), lda), col0) for r in range(MR)]
        with f.loop(0, whole16, 16) as kk:
            rows = [f.vload(f.at(src, kk)) for src in srcs]
            rows += [ir.Constant(V16, ir.Undefined)] * ((1 << (MR - 1).bit_length()) - MR)
            while len(rows) > 1:   # concatenate: lane r * 16 + c is A[first + r, kk + c]
                n = rows[0].type.count
                rows = [b.shuffle_vector(x, y, ir.Constant(ir.VectorType(I32, 2 * n),
                                                           list(range(2 * n))))
                        for x, y in zip(rows[::2], rows[1::2], strict=True)]
            lanes = rows[0]
            for q in range(MR):   # floats 16q.. of the 16 MR the 16 columns pack into
                idx = [(e % MR) * 16 + e // MR for e in range(16 * q, 16 * q + 16)]
                f.vstore(b.shuffle_vector(lanes, ir.Constant(lanes.type, ir.Undefined),
                                          ir.Constant(VI32, idx)),
                         f.at(panel, b.add(f.mul(kk, MR), c64(16 * q))))
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


def _macro_kernel(module: ir.Module, act: str, uk: ir.Function, t: Tile,
                  prepacked: bool = False, bf16: bool = False) -> ir.Function:
    """Rows [m0, m1) x panels [jp0, jp1) of C = A @ Bp with the `act` epilogue.

    `ap` is a workspace for packed blocks of A, or with `prepacked` all of A already
    packed by `tc_pack_a` (shared by threads that split the panels; m0 = 0). bf16: Bp's
    panels hold bf16 (`uk` widens them)."""
    MR = t.mr
    bty = I16 if bf16 else F32
    f = FnBuilder(module, f"tc_gemm_{'pa_' if prepacked else ''}{'bf16_' if bf16 else ''}{act}", [
        ("a", PTR), ("lda", I64), ("bp", PTR), ("k", I64), ("c", PTR), ("ldc", I64),
        ("n", I64), ("bias", PTR), ("has_bias", I64), ("res", PTR), ("ldr", I64),
        ("has_res", I64), ("ldka", I64), ("kcb", I64), ("mcb", I64), ("ap", PTR),
        ("m0", I64), ("m1", I64), ("jp0", I64), ("jp1", I64)])
    b, g = f.b, f.arg
    K, KC, MC = g["k"], g["kcb"], g["mcb"]   # the blocking: run-time values
    with f.loop(0, K, KC) as pc:
        kc = f.min(KC, b.sub(K, pc))
        first = b.zext(b.icmp_signed("==", pc, c64(0)), I64)
        last = b.zext(b.icmp_signed(">=", b.add(pc, kc), K), I64)
        with f.loop(g["m0"], g["m1"], MC) as ic:
            mc = f.min(MC, b.sub(g["m1"], ic))
            npan = b.sdiv(b.add(mc, c64(MR - 1)), c64(MR))
            panel = f.mul(KC, MR) if prepacked else f.mul(kc, MR)
            # prepacked: K block pc of row panel ip at ((pc / KC) * panels(m1) + ip) * KC * MR
            mt = b.sdiv(b.add(g["m1"], c64(MR - 1)), c64(MR))
            ap = f.at(g["ap"], f.mul(b.add(f.mul(b.sdiv(pc, KC), mt),
                                           b.sdiv(ic, c64(MR))), panel)) \
                if prepacked else g["ap"]
            if not prepacked:
                _emit_pack_a(f, MR, g["a"], g["lda"], ic, b.add(ic, mc), pc, kc, g["ap"],
                             npan, ldka=g["ldka"])
            with f.loop(g["jp0"], g["jp1"]) as jp:
                # prefetch: the next panel, after the last one the first of the next
                # K block
                wrap = b.icmp_signed(">=", b.add(jp, c64(1)), g["jp1"])
                pf_jp = b.select(wrap, g["jp0"], b.add(jp, c64(1)))
                pf_pc = b.select(b.and_(wrap, b.icmp_signed("<", b.add(pc, KC), K)),
                                 b.add(pc, KC), pc)
                for h in range(NR // t.width):   # the panel's sub-panels
                    n0 = b.add(f.mul(jp, NR), c64(h * t.width))
                    nrem = f.min(c64(t.width), b.sub(g["n"], n0))
                    bpan = f.at(g["bp"], f.mul(b.add(f.mul(jp, K), pc), NR), c64(h * t.width),
                                ty=bty)
                    pf = f.at(g["bp"], f.mul(b.add(f.mul(pf_jp, K), pf_pc), NR),
                              c64(h * t.width), ty=bty)
                    with b.if_then(b.icmp_signed(">", nrem, c64(0))), f.loop(0, npan) as ip:
                        m = b.add(ic, f.mul(ip, MR))
                        b.call(uk, [
                            kc, f.at(ap, f.mul(ip, panel)), bpan,
                            f.at(g["c"], f.mul(m, g["ldc"]), n0), g["ldc"],
                            f.min(c64(MR), b.sub(b.add(ic, mc), m)), nrem, first, last,
                            f.at(g["bias"], n0), g["has_bias"],
                            f.at(g["res"], f.mul(m, g["ldr"]), n0), g["ldr"], g["has_res"], pf])
    return f.finish()


PACK_KB = 16   # rows of B per block when packing (see _pack_b, _pack_bt)
NCP = 16       # panels of a per-call B packed per K block by `tc_gemm_pb`: 512 KiB


def _emit_pack_b(f: FnBuilder, src, ldb, k0, kc, n, jp0, jp1, dst, pstride,
                 trans) -> None:
    """Rows [k0, k0 + kc) of column panels [jp0, jp1) of B (row-major K x N with row
    stride ldb; `trans` (an i1): B given transposed, N x K) into dst + (jp - jp0) *
    pstride + kk * NR, columns past n zero."""
    b = f.b
    with b.if_else(trans) as (t, plain):
        with t:
            _emit_pack_bt(f, src, ldb, k0, kc, n, jp0, jp1, dst, pstride)
        with plain:
            _emit_pack_b_rows(f, src, ldb, k0, kc, n, jp0, jp1, dst, pstride)


def _emit_pack_b_rows(f: FnBuilder, src, ldb, k0, kc, n, jp0, jp1, dst, pstride) -> None:
    """`_emit_pack_b` from rows: PACK_KB rows at a time across all the panels, so each
    row of B is read contiguously (panel by panel down the whole K, the rows' stride
    of a wide B is a new page and the same cache set every row: 3x slower for N =
    2048)."""
    b = f.b
    with f.loop(0, kc, PACK_KB) as kb:
        kend = f.min(b.add(kb, c64(PACK_KB)), kc)
        with f.loop(jp0, jp1) as jp:
            n0 = f.mul(jp, NR)
            masks = [f.lanes_below(b.sub(n, b.add(n0, c64(16 * v))))
                     for v in range(NR // 16)]
            panel = f.at(dst, f.mul(b.sub(jp, jp0), pstride))
            with f.loop(kb, kend) as k:
                row = f.at(src, f.mul(b.add(k0, k), ldb), n0)
                out = f.at(panel, f.mul(k, NR))
                for v in range(NR // 16):
                    f.vstore(f.mload(f.at(row, c64(16 * v)), masks[v]),
                             f.at(out, c64(16 * v)), 64)


def _transpose16(f: FnBuilder, rows: list) -> list:
    """16 vectors of 16 lanes transposed (lane c of vector r -> lane r of vector c): the
    off-diagonal blocks swapped at each scale, 64 two-source shuffles."""
    b = f.b
    for d in (8, 4, 2, 1):
        new = list(rows)
        for i in range(16):
            if i & d:
                continue
            j = i + d
            lo = [(16 + c - d) if c & d else c for c in range(16)]
            hi = [(16 + c) if c & d else c + d for c in range(16)]
            new[i] = b.shuffle_vector(rows[i], rows[j], ir.Constant(VI32, lo))
            new[j] = b.shuffle_vector(rows[i], rows[j], ir.Constant(VI32, hi))
        rows = new
    return rows


def _emit_pack_bt(f: FnBuilder, src, ldb, k0, kc, n, jp0, jp1, dst, pstride) -> None:
    """`_emit_pack_b` from B given transposed (N x K): a panel's NR columns are NR rows
    of the source, read 16 floats of K at a time and transposed in registers (16 x 16
    blocks), so that loads and stores are whole vectors."""
    b = f.b
    none = ir.Constant(M16, [0] * 16)
    with f.loop(jp0, jp1) as jp:
        base = f.at(dst, f.mul(b.sub(jp, jp0), pstride))
        with f.loop(0, kc, 16) as kb:
            krem = b.sub(kc, kb)
            kmask = f.lanes_below(krem)
            for h in range(NR // 16):
                rows = []
                for r in range(16):
                    col = b.add(f.mul(jp, NR), c64(16 * h + r))
                    mask = b.select(b.icmp_signed("<", col, n), kmask, none)
                    rows.append(f.mload(f.at(src, f.mul(col, ldb), b.add(k0, kb)), mask))
                cols = _transpose16(f, rows)
                for c in range(16):
                    out = f.at(base, f.mul(b.add(kb, c64(c)), NR), c64(16 * h))
                    if c == 0:
                        f.vstore(cols[c], out, 64)
                        continue
                    with b.if_then(b.icmp_signed("<", c64(c), krem), likely=True):
                        f.vstore(cols[c], out, 64)


def _pack_b(module: ir.Module, trans: bool) -> ir.Function:
    """Panels [jp0, jp1) of B (row-major K x N, row stride ldb; `trans`: given as N x K)
    into Bp[jp][k][NR]."""
    f = FnBuilder(module, "tc_pack_bt" if trans else "tc_pack_b", [
        ("b", PTR), ("ldb", I64), ("k", I64), ("n", I64), ("bp", PTR), ("jp0", I64),
        ("jp1", I64)])
    g = f.arg
    emit = _emit_pack_bt if trans else _emit_pack_b_rows
    emit(f, g["b"], g["ldb"], c64(0), g["k"], g["n"], g["jp0"], g["jp1"],
         f.at(g["bp"], f.mul(f.mul(g["jp0"], g["k"]), NR)), f.mul(g["k"], NR))
    return f.finish()


def _pack_bt(module: ir.Module) -> ir.Function:
    """`tc_pack_bt` (attention's modules pack K^T panels with it too)."""
    return _pack_b(module, True)


def _macro_kernel_pb(module: ir.Module, act: str, uk: ir.Function, t: Tile) -> ir.Function:
    """`_macro_kernel` for a B that changes every call (an activation; in training a
    weight, or W^T), packed here as BLIS does: per K block, NCP panels at a time into
    the thread's workspace (after its block of A), multiplied while they are in its
    L2. B is read from memory once, not read, written packed and read again. Threads
    split the panels (each packs its own A blocks)."""
    MR = t.mr
    f = FnBuilder(module, f"tc_gemm_pb_{act}", [
        ("a", PTR), ("lda", I64), ("bp", PTR), ("k", I64), ("c", PTR), ("ldc", I64),
        ("n", I64), ("bias", PTR), ("has_bias", I64), ("res", PTR), ("ldr", I64),
        ("has_res", I64), ("ldka", I64), ("kcb", I64), ("mcb", I64), ("bsrc", PTR),
        ("ldb", I64), ("btrans", I64), ("ws", PTR), ("m0", I64), ("m1", I64), ("jp0", I64),
        ("jp1", I64)])
    b, g = f.b, f.arg
    K, KC, MC = g["k"], g["kcb"], g["mcb"]
    ap = g["ws"]
    bbuf = f.at(g["ws"], c64(WS_A))
    trans = b.icmp_signed("!=", g["btrans"], c64(0))
    with f.loop(g["jp0"], g["jp1"], NCP) as jc:
        jce = f.min(b.add(jc, c64(NCP)), g["jp1"])
        with f.loop(0, K, KC) as pc:
            kc = f.min(KC, b.sub(K, pc))
            first = b.zext(b.icmp_signed("==", pc, c64(0)), I64)
            last = b.zext(b.icmp_signed(">=", b.add(pc, kc), K), I64)
            pstride = f.mul(kc, NR)
            _emit_pack_b(f, g["bsrc"], g["ldb"], pc, kc, g["n"], jc, jce, bbuf, pstride,
                         trans)
            with f.loop(g["m0"], g["m1"], MC) as ic:
                mc = f.min(MC, b.sub(g["m1"], ic))
                npan = b.sdiv(b.add(mc, c64(MR - 1)), c64(MR))
                _emit_pack_a(f, MR, g["a"], g["lda"], ic, b.add(ic, mc), pc, kc, ap, npan,
                             ldka=g["ldka"])
                with f.loop(jc, jce) as jp:
                    nxt = b.add(jp, c64(1))
                    pf_pan = f.at(bbuf, f.mul(b.sub(b.select(
                        b.icmp_signed("<", nxt, jce), nxt, jp), jc), pstride))
                    for h in range(NR // t.width):
                        n0 = b.add(f.mul(jp, NR), c64(h * t.width))
                        nrem = f.min(c64(t.width), b.sub(g["n"], n0))
                        bpan = f.at(bbuf, f.mul(b.sub(jp, jc), pstride), c64(h * t.width))
                        pf = f.at(pf_pan, c64(h * t.width))
                        with b.if_then(b.icmp_signed(">", nrem, c64(0))), \
                                f.loop(0, npan) as ip:
                            m = b.add(ic, f.mul(ip, MR))
                            b.call(uk, [
                                kc, f.at(ap, f.mul(ip, f.mul(kc, MR))), bpan,
                                f.at(g["c"], f.mul(m, g["ldc"]), n0), g["ldc"],
                                f.min(c64(MR), b.sub(b.add(ic, mc), m)), nrem, first, last,
                                f.at(g["bias"], n0), g["has_bias"],
                                f.at(g["res"], f.mul(m, g["ldr"]), n0), g["ldr"],
                                g["has_res"], pf])
    return f.finish()


FIXED = [PTR, I64, PTR, I64, PTR, I64, I64, PTR, I64, PTR, I64, I64, I64, I64, I64]  # gemm._args
PB_FIXED = [PTR, I64, I64]   # tc_gemm_pb's: B's source, its row stride, 1 if transposed
PB_WORKSPACE = WS_A + KC_MAX * NCP * NR   # floats: its blocks of A and of B


def build_module(group: str) -> ir.Module:
    """The module of one group of entry points: a name of `GROUPS`, with its tile's tag
    after an "@" but for "pack_b" (see `group_name`)."""
    module = ir.Module(name=f"tensorc_gemm_{group}")
    base, _, tag = group.partition("@")
    t = Tile.parse(tag) if tag else None
    if base == "pack_b":
        for name, pack in (("tc_pack_b", _pack_b(module, False)),
                           ("tc_pack_bt", _pack_b(module, True))):
            job(module, name + "_job", pack, [PTR, I64, I64, I64, PTR], 2, work=None)
    elif base == "pack_a":   # ap: the workspace
        job(module, "tc_pack_a_job", _pack_a(module, t), [PTR, I64, I64, I64, I64, I64], 2)
    else:
        kind, act = base.split(":")
        bf16 = kind.endswith("bf16")   # "bf16", "pa_bf16": a packed bf16 weight
        kind = kind.removesuffix("bf16").rstrip("_") or "plain"
        uk = _ukernel(module, act, t, bf16)
        if kind == "pb":
            job(module, f"tc_gemm_pb_job_{act}", _macro_kernel_pb(module, act, uk, t),
                FIXED + PB_FIXED, 4)
        else:
            job(module, f"tc_gemm_{'pa_' if kind == 'pa' else ''}{'bf16_' if bf16 else ''}"
                f"job_{act}", _macro_kernel(module, act, uk, t, kind == "pa", bf16), FIXED, 4)
    return module


def _pack_a(module: ir.Module, t: Tile) -> ir.Function:
    """Row panels [ip0, ip1) of A (M x K, A[i, k] at a + i * lda + k * ldka: one of
    them 1, see `_emit_pack_a`), rows past M zero, into the
    layout `_macro_kernel(prepacked=True)` reads: Ap[pc / KC][ip][kk][MR], KC * MR
    floats per panel, so that one K block's panels are contiguous (panels K * MR
    apart would share cache sets when K is a large power of two)."""
    MR = t.mr
    f = FnBuilder(module, "tc_pack_a", [("a", PTR), ("lda", I64), ("k", I64), ("m", I64),
                                        ("ldka", I64), ("kcb", I64), ("ap", PTR),
                                        ("ip0", I64), ("ip1", I64)])
    b, g = f.b, f.arg
    KC = g["kcb"]
    mt = b.sdiv(b.add(g["m"], c64(MR - 1)), c64(MR))
    with f.loop(0, g["k"], KC) as pc:
        dst = f.at(g["ap"], f.mul(b.add(f.mul(b.sdiv(pc, KC), mt), g["ip0"]), f.mul(KC, MR)))
        _emit_pack_a(f, MR, g["a"], g["lda"], f.mul(g["ip0"], MR), g["m"], pc,
                     f.min(KC, b.sub(g["k"], pc)), dst, b.sub(g["ip1"], g["ip0"]),
                     f.mul(KC, MR), ldka=g["ldka"])
    return f.finish()


_P, _I = c_void_p, c_int64
_PACK_ARGS = [_P, _I, _I, _I, _P, _I, _I]
_GEMM_ARGS = [_P, _I, _P, _I, _P, _I, _I, _P, _I, _P, _I, _I, _I, _I, _I, _P, _I, _I, _I, _I]

# Entry points come in groups, one LLVM module (and cache entry) each per tile, compiled
# on first use: a model compiles the activations, paths and tiles it runs, not all.
# group -> {entry: (symbol, ctypes argument types, or None for a pool job's address)}
GROUPS = {"pack_b": {"pack_b": ("tc_pack_b", _PACK_ARGS), "pack_bt": ("tc_pack_bt", _PACK_ARGS),
                     "tc_pack_b_job": ("tc_pack_b_job", None),
                     "tc_pack_bt_job": ("tc_pack_bt_job", None)},
          "pack_a": {"tc_pack_a_job": ("tc_pack_a_job", None)}}
for _a in ACTIVATIONS:
    GROUPS[f"plain:{_a}"] = {_a: (f"tc_gemm_{_a}", _GEMM_ARGS),
                             f"tc_gemm_job_{_a}": (f"tc_gemm_job_{_a}", None)}
    GROUPS[f"pa:{_a}"] = {f"tc_gemm_pa_job_{_a}": (f"tc_gemm_pa_job_{_a}", None)}
    GROUPS[f"pb:{_a}"] = {f"tc_gemm_pb_job_{_a}": (f"tc_gemm_pb_job_{_a}", None)}
    # a bf16 weight's (PackedB of bf16): the same schedules, B widened in the micro-kernel
    GROUPS[f"bf16:{_a}"] = {f"bf16_{_a}": (f"tc_gemm_bf16_{_a}", _GEMM_ARGS),
                            f"tc_gemm_bf16_job_{_a}": (f"tc_gemm_bf16_job_{_a}", None)}
    GROUPS[f"pa_bf16:{_a}"] = {f"tc_gemm_pa_bf16_job_{_a}": (f"tc_gemm_pa_bf16_job_{_a}",
                                                             None)}


def group_name(group: str, t: Tile) -> str:
    """A group's module name for tile t's micro-tile (packing B depends on none)."""
    return group if group == "pack_b" else f"{group}@{t.code}"


class _Lazy(dict):
    """A dict of one tile's entry points whose missing keys are compiled (with their
    group)."""

    def __init__(self, tile: Tile, jobs: bool):
        super().__init__()
        self.tile = tile
        self._where = {e: g for g, entries in GROUPS.items() for e, (_, argt) in entries.items()
                       if (argt is None) == jobs}

    def __missing__(self, entry):
        if entry not in self._where:
            raise KeyError(entry)
        compile_group(self._where[entry], self.tile)
        return dict.__getitem__(self, entry)


_lib_lock = threading.Lock()
_libs: dict[Tile, _Lazy] = {}


def compile_group(group: str, t: Tile) -> None:
    """Compile one group for tile t (object code cached on disk) and add its entry
    points."""
    lib = kernels(t)
    with _lib_lock:
        entries = GROUPS[group]
        if all(e in lib or e in lib["jobs"] for e in entries):
            return
        name, build, vectorize, unroll = ahead(group_name(group, t))
        addrs = compile_library(name, build, [sym for sym, _ in entries.values()],
                                vectorize, unroll)
        for entry, (sym, argtypes) in entries.items():
            if argtypes is None:
                dict.__setitem__(lib["jobs"], entry, addrs[sym])
            else:
                dict.__setitem__(lib, entry, cfunc(addrs[sym], None, argtypes))


def ahead(group: str) -> tuple:
    """The `jit.compile_ahead` job of a group's module (`group_name`; built without
    LLVM's loop passes: see `jit.compile_library`)."""
    return (f"gemm/{group}", lambda: build_module(group), False, False)


def kernels(t: Tile = AVX512_TILE) -> dict:
    """The entry points of tile t's micro-tile: "pack_b", "pack_bt" and each activation's
    `tc_gemm_<act>` as ctypes functions, "jobs" the pool jobs' addresses; each compiled
    on first use (object code cached on disk)."""
    t = Tile.parse(t.code)   # the same code whatever the blocking and split
    lib = _libs.get(t)
    if lib is None:
        with _lib_lock:
            lib = _libs.setdefault(t, _Lazy(t, jobs=False))
            if "jobs" not in lib:
                dict.__setitem__(lib, "jobs", _Lazy(t, jobs=True))
    return lib
