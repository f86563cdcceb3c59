"""The int8 GEMM's LLVM IR (see `qgemm.py` for the layout, the paths and the schedule).

One module per path, each compiled for the target features it may use:

- `vnni`: an MR x 32 register tile of int32 accumulators, `vpdpbusd` (u8 x s8, four
  products summed into each i32 lane, no saturation) on a broadcast of A's 4 bytes
  and one 64-byte row of each of the two 16-column panels of B;
- `avxvnni`: the same with 256-bit AVX-VNNI (hosts without AVX-512), 3-row tiles;
- `portable`: the same tile with exact i16 arithmetic (A zero-extended, B
  sign-extended to i16, products summed in pairs into i32: `vpmaddwd`'s pattern, which
  cannot saturate), compiled without VNNI and AMX;
- `amx`: 32 x 32 blocks of AMX tiles (`tdpbusd`, 2 x 2 int32 C tiles, A from a copy
  padded to 64-byte rows by `tc_qpack_a`, B tiles straight from the packed panels).

Every path writes an int32 block to the thread's workspace and runs the shared
epilogue `tc_qepi` on it: the zero-point correction, then (float output) the scales,
bias, activation (gemm's maths, `FnBuilder.activation`) and residual.
"""

from __future__ import annotations

from llvmlite import ir

from .irbuild import F32, I32, I64, M16, PTR, V16, VI32, FnBuilder, c64, job

I8, I16 = ir.IntType(8), ir.IntType(16)
V64I8 = ir.VectorType(I8, 64)

MR = 8            # rows per register tile (vnni, portable): 8 x 2 x 16 i32 accumulators
PANEL = 16        # columns per packed panel of B
NR = 2 * PANEL    # columns per tile: a pair of panels
AMX_ROWS = 32     # rows per AMX block (two 16-row A tiles)
AMX_KB = 64       # k per AMX tile step (64 bytes of a tile row)
BLOCK_WORDS = AMX_ROWS * NR   # int32s of one block's sums
TILE_WORDS = 2 * BLOCK_WORDS  # a thread's workspace: two blocks (AMX: one computing)

ACT_IDS = {"none": 0, "relu": 1, "gelu_erf": 2, "gelu_tanh": 3}

# the parameter block (int64 words) every entry point reads
PARAMS = ["a", "lda", "k", "b", "kp", "n", "colsum", "out", "ldo", "out_float",
          "az", "az_kind", "az_rows", "rs", "has_rs", "rs_rows", "cs", "has_cs", "cs_stride",
          "bias", "has_bias", "act", "res", "ldr", "has_res", "ap", "m", "ldap"]
P = {name: i for i, name in enumerate(PARAMS)}


class _Params:
    """Loads of the parameter block's words."""

    def __init__(self, f: FnBuilder, block):
        self.f, self.block = f, block

    def __getitem__(self, name):
        w = self.f.b.load(self.f.at(self.block, c64(P[name]), ty=I64), typ=I64)
        return w

    def ptr(self, name):
        return self.f.b.inttoptr(self[name], PTR)


def _vi32_splat(f: FnBuilder, x):
    b = f.b
    v = b.insert_element(ir.Constant(VI32, ir.Undefined), x, ir.Constant(I32, 0))
    return b.shuffle_vector(v, ir.Constant(VI32, ir.Undefined), ir.Constant(VI32, [0] * 16))


def _mload_i32(f: FnBuilder, ptr, mask):
    fn = f.intrinsic("llvm.masked.load.v16i32.p0", VI32, [PTR, I32, M16, VI32])
    return f.b.call(fn, [ptr, ir.Constant(I32, 4), mask, ir.Constant(VI32, [0] * 16)])


def _mstore_i32(f: FnBuilder, v, ptr, mask):
    fn = f.intrinsic("llvm.masked.store.v16i32.p0", ir.VoidType(), [VI32, PTR, I32, M16])
    f.b.call(fn, [v, ptr, ir.Constant(I32, 4), mask])


def _epilogue(module: ir.Module) -> ir.Function:
    """tc_qepi(params, tile, m, i0, n0): rows [i0, i0 + m) x columns [n0, n0 + 32) of
    the result from an int32 block (32 per row) of sum_k a * b."""
    f = FnBuilder(module, "tc_qepi", [("params", PTR), ("tile", PTR), ("m", I64),
                                      ("i0", I64), ("n0", I64)], internal=True)
    f.fn.attributes.add("noinline")
    b, g = f.b, f.arg
    p = _Params(f, g["params"])

    def flag(name):
        return b.icmp_signed("!=", p[name], c64(0))
    n, colsum, out, ldo = p["n"], p.ptr("colsum"), p.ptr("out"), p["ldo"]
    az_kind, is_float = p["az_kind"], flag("out_float")
    has_rs, has_cs, has_bias, has_res = (flag(x) for x in ("has_rs", "has_cs", "has_bias",
                                                           "has_res"))
    act = p["act"]
    masks = [f.lanes_below(b.sub(n, b.add(g["n0"], c64(16 * v)))) for v in range(2)]
    cols = [b.add(g["n0"], c64(16 * v)) for v in range(2)]
    csum = [b.load(f.at(colsum, cols[v], ty=I32), typ=VI32, align=4) for v in range(2)]
    def row_index(i, rows):
        """i modulo an operand's rows (1: a scalar; M, or every row: mostly i itself),
        without a division in the common cases."""
        slot = f.var(I64, c64(0))
        with b.if_then(b.icmp_signed("!=", rows, c64(1))):
            with b.if_else(b.icmp_signed("<", i, rows)) as (inside, wrap):
                with inside:
                    b.store(i, slot)
                with wrap:
                    b.store(b.urem(i, rows), slot)
        return b.load(slot, typ=I64)

    with f.loop(0, g["m"]) as r:
        i = b.add(g["i0"], r)
        # the activation zero point of row i (u8 or i32; i modulo the array's rows)
        zslot = f.var(I32, ir.Constant(I32, 0))
        with b.if_then(b.icmp_signed("!=", az_kind, c64(0))):
            zi = row_index(i, p["az_rows"])
            with b.if_else(b.icmp_signed("==", az_kind, c64(1))) as (u8, i32):
                with u8:
                    b.store(b.zext(b.load(f.at(p.ptr("az"), zi, ty=I8), typ=I8), I32), zslot)
                with i32:
                    b.store(b.load(f.at(p.ptr("az"), zi, ty=I32), typ=I32), zslot)
        z = _vi32_splat(f, b.load(zslot, typ=I32))
        for v in range(2):
            x = b.load(f.at(g["tile"], b.add(f.mul(r, NR), c64(16 * v)), ty=I32), typ=VI32,
                       align=4)
            x = b.sub(x, b.mul(z, csum[v]))
            orow = b.add(f.mul(i, ldo), cols[v])
            with b.if_else(is_float) as (fl, integer):
                with integer:
                    _mstore_i32(f, x, f.at(out, orow, ty=I32), masks[v])
                with fl:
                    y = f.var(V16, b.sitofp(x, V16))
                    with b.if_then(has_rs):
                        s = b.load(f.at(p.ptr("rs"), row_index(i, p["rs_rows"])), typ=F32)
                        b.store(b.fmul(b.load(y, typ=V16), f.splat(s)), y)
                    with b.if_then(has_cs):
                        with b.if_else(b.icmp_signed("==", p["cs_stride"], c64(0))) \
                                as (scalar, vec):
                            with scalar:
                                s = f.splat(b.load(p.ptr("cs"), typ=F32))
                                b.store(b.fmul(b.load(y, typ=V16), s), y)
                            with vec:
                                s = f.mload(f.at(p.ptr("cs"), cols[v]), masks[v])
                                b.store(b.fmul(b.load(y, typ=V16), s), y)
                    with b.if_then(has_bias):
                        s = f.mload(f.at(p.ptr("bias"), cols[v]), masks[v])
                        b.store(b.fadd(b.load(y, typ=V16), s), y)
                    for name, aid in ACT_IDS.items():
                        if aid == 0:
                            continue
                        with b.if_then(b.icmp_signed("==", act, c64(aid))):
                            b.store(f.activation(name, b.load(y, typ=V16)), y)
                    with b.if_then(has_res):
                        rptr = f.at(p.ptr("res"), f.mul(i, p["ldr"]), cols[v])
                        b.store(b.fadd(b.load(y, typ=V16), f.mload(rptr, masks[v])), y)
                    f.mstore(b.load(y, typ=V16), f.at(out, orow), masks[v])
    return f.finish()


# -- the register-tile paths (vnni, portable) -------------------------------------------

class _Vnni:
    """acc (i32 x 16) += 4-byte dot products of A's broadcast u8 and B's s8 lanes."""

    rows = MR
    regs = 16   # accumulator registers (of 32 zmm)

    def init(self, f):
        return [f.var(VI32, ir.Constant(VI32, [0] * 16))]

    def step(self, f, acc, a4, bv):
        fn = f.intrinsic("llvm.x86.avx512.vpdpbusd.512", VI32, [VI32] * 3)
        f.b.store(f.b.call(fn, [f.b.load(acc[0], typ=VI32), a4, bv]), acc[0])

    def final(self, f, acc):
        return f.b.load(acc[0], typ=VI32)


class _Portable:
    """The same sums in i16 products summed in pairs into i32 (exact: |255 * -128| and
    two of them fit; the pattern LLVM compiles to `vpmaddwd`), two accumulators per
    panel (columns 0-7 and 8-15, each column's sum split over two lanes). Tiles of 4
    rows: 16 accumulators (8 rows' 32 spilled)."""

    rows = MR // 2
    regs = 16

    def init(self, f):
        return [f.var(VI32, ir.Constant(VI32, [0] * 16)) for _ in range(2)]

    def a16(self, f, a4):   # A's 4 bytes, zero-extended, repeated for 8 columns
        b = f.b
        bytes4 = b.bitcast(b.extract_element(a4, ir.Constant(I32, 0)), ir.VectorType(I8, 4))
        wide = b.zext(bytes4, ir.VectorType(I16, 4))
        return b.shuffle_vector(wide, ir.Constant(wide.type, ir.Undefined),
                                ir.Constant(ir.VectorType(I32, 32), [0, 1, 2, 3] * 8))

    def step(self, f, acc, a4, bv):
        b = f.b
        a16 = self.a16(f, a4)
        b16 = b.sext(b.bitcast(bv, V64I8), ir.VectorType(I16, 64))
        v32i32 = ir.VectorType(I32, 32)
        a32 = b.sext(a16, v32i32)
        for h in range(2):
            half = b.shuffle_vector(b16, ir.Constant(b16.type, ir.Undefined),
                                    ir.Constant(v32i32, list(range(32 * h, 32 * h + 32))))
            prod = b.mul(a32, b.sext(half, v32i32))
            even = b.shuffle_vector(prod, ir.Constant(v32i32, ir.Undefined),
                                    ir.Constant(VI32, list(range(0, 32, 2))))
            odd = b.shuffle_vector(prod, ir.Constant(v32i32, ir.Undefined),
                                   ir.Constant(VI32, list(range(1, 32, 2))))
            b.store(b.add(b.load(acc[h], typ=VI32), b.add(even, odd)), acc[h])

    def final(self, f, acc):
        b = f.b
        lo, hi = (b.load(x, typ=VI32) for x in acc)
        even = b.shuffle_vector(lo, hi, ir.Constant(VI32, list(range(0, 32, 2))))
        odd = b.shuffle_vector(lo, hi, ir.Constant(VI32, list(range(1, 32, 2))))
        return b.add(even, odd)


class _AvxVnni:
    """AVX-VNNI (VEX, 256-bit: hosts with it but without AVX-512): each panel's 16
    columns in two i32 x 8 accumulators; 16 ymm registers, so tiles of 3 rows (12
    accumulators, B's rows read as `vpdpbusd`'s memory operand)."""

    rows = 3
    regs = 12
    V8 = ir.VectorType(I32, 8)

    def init(self, f):
        return [f.var(self.V8, ir.Constant(self.V8, [0] * 8)) for _ in range(2)]

    def step(self, f, acc, a4, bv):
        b = f.b
        fn = f.intrinsic("llvm.x86.avx512.vpdpbusd.256", self.V8, [self.V8] * 3)
        undef = ir.Constant(VI32, ir.Undefined)
        a8 = b.shuffle_vector(a4, undef, ir.Constant(self.V8, [0] * 8))
        for h in range(2):
            half = b.shuffle_vector(bv, undef, ir.Constant(self.V8, list(range(8 * h, 8 * h + 8))))
            b.store(b.call(fn, [b.load(acc[h], typ=self.V8), a8, half]), acc[h])

    def final(self, f, acc):
        lo, hi = (f.b.load(x, typ=self.V8) for x in acc)
        return f.b.shuffle_vector(lo, hi, ir.Constant(VI32, list(range(16))))


KINDS = {"vnni": _Vnni, "avxvnni": _AvxVnni, "portable": _Portable}


def _ukernel(module: ir.Module, kind, m: int, name: str) -> ir.Function:
    """{name}_m{m}(params, ws, i0, q): rows [i0, i0 + m) x panel pair q into ws (int32,
    NR per row), then the epilogue."""
    f = FnBuilder(module, f"{name}_m{m}", [("params", PTR), ("ws", PTR), ("i0", I64),
                                           ("q", I64)], internal=True)
    b, g = f.b, f.arg
    p = _Params(f, g["params"])
    K, lda = p["k"], p["lda"]
    pstride = f.mul(p["kp"], PANEL)   # bytes per panel
    bp = [f.at(p.ptr("b"), b.add(f.mul(f.mul(g["q"], 2), pstride), f.mul(pstride, v)), ty=I8)
          for v in range(2)]
    arow = [f.at(p.ptr("a"), f.mul(b.add(g["i0"], c64(r)), lda), ty=I8) for r in range(m)]
    # few rows: 2 or 4 sets of accumulators (even/odd groups of k), so that each
    # accumulator's chain of dependent dot products does not wait on its latency
    # (as many as the kind's accumulator registers allow, at most 4)
    sets = min(4, max(1, kind.regs // (m * 2 * len(kind.init(f)))))
    accs = [[[kind.init(f) for _ in range(2)] for _ in range(m)] for _ in range(sets)]
    groups = b.sdiv(K, c64(4))
    prefetch = f.intrinsic("llvm.prefetch.p0", ir.VoidType(), [PTR, I32, I32, I32])

    def step(gi, a_words, s=0):
        acc = accs[s]
        off = f.mul(gi, 64)
        bv = [b.load(f.at(bp[v], off, ty=I8), typ=VI32, align=64) for v in range(2)]
        if m <= 2:   # a decode step streams B: fetch ahead towards L2
            for v in range(2):
                b.call(prefetch, [f.at(bp[v], off, c64(4096), ty=I8), ir.Constant(I32, 0),
                                  ir.Constant(I32, 2), ir.Constant(I32, 1)])
        for r in range(m):
            a4 = _vi32_splat(f, a_words(r))
            for v in range(2):
                kind.step(f, acc[r][v], a4, bv[v])

    def a_word(gi):
        return lambda r: b.load(f.at(arow[r], f.mul(gi, 4), ty=I8), typ=I32, align=1)
    main = f.mul(b.sdiv(groups, c64(sets)), sets)
    with f.loop(0, main, sets) as gi:
        for s in range(sets):
            step(b.add(gi, c64(s)), a_word(b.add(gi, c64(s))), s)
    with f.loop(main, groups) as gi:
        step(gi, a_word(gi))
    # K not a multiple of 4: the last group's bytes one by one (B's padding is zero)
    with b.if_then(b.icmp_signed("<", f.mul(groups, 4), K)):
        k0 = f.mul(groups, 4)
        words = []
        for r in range(m):
            w = f.var(I32, ir.Constant(I32, 0))
            for t in range(4):
                with b.if_then(b.icmp_signed("<", b.add(k0, c64(t)), K)):
                    byte = b.zext(b.load(f.at(arow[r], b.add(k0, c64(t)), ty=I8), typ=I8), I32)
                    b.store(b.or_(b.load(w, typ=I32), b.shl(byte, ir.Constant(I32, 8 * t))), w)
            words.append(b.load(w, typ=I32))
        step(groups, lambda r: words[r])
    for r in range(m):
        for v in range(2):
            total = kind.final(f, accs[0][r][v])
            for s in range(1, sets):
                total = b.add(total, kind.final(f, accs[s][r][v]))
            b.store(total,
                    f.at(g["ws"], c64(r * NR + 16 * v), ty=I32), align=4)
    b.call(module.get_global("tc_qepi"), [g["params"], g["ws"], c64(m), g["i0"],
                                          f.mul(g["q"], NR)])
    return f.finish()


def _tiles(module: ir.Module, kind, name: str) -> ir.Function:
    """{name}(params, ws, m0, m1, q0, q1): rows [m0, m1) x panel pairs [q0, q1)."""
    rows = kind.rows
    uks = [_ukernel(module, kind, m, name) for m in range(1, rows + 1)]
    f = FnBuilder(module, name, [("params", PTR), ("ws", PTR), ("m0", I64), ("m1", I64),
                                 ("q0", I64), ("q1", I64)])
    b, g = f.b, f.arg
    with f.loop(g["q0"], g["q1"]) as q:
        with f.loop(g["m0"], g["m1"], rows) as i:
            rem = f.min(c64(rows), b.sub(g["m1"], i))
            after = f.fn.append_basic_block("after")
            switch = b.switch(rem, after)
            for m, uk in enumerate(uks, start=1):
                block = f.fn.append_basic_block(f"m{m}")
                switch.add_case(c64(m), block)
                b.position_at_end(block)
                b.call(uk, [g["params"], g["ws"], i, q])
                b.branch(after)
            b.position_at_end(after)
    return f.finish()


# -- AMX -------------------------------------------------------------------------------

def _amx_config(module: ir.Module) -> ir.GlobalVariable:
    """The tile configuration: palette 1, tiles 0-7 each 16 rows x 64 bytes."""
    cfg = bytearray(64)
    cfg[0] = 1
    for t in range(8):
        cfg[16 + 2 * t] = 64    # colsb, little-endian u16
        cfg[48 + t] = 16        # rows
    ty = ir.ArrayType(I8, 64)
    g = ir.GlobalVariable(module, ty, "tc_qamx_cfg")
    g.global_constant = True
    g.linkage = "internal"
    g.align = 64
    g.initializer = ir.Constant(ty, bytearray(cfg))
    return g


def _amx(module: ir.Module) -> ir.Function:
    """tc_qgemm_amx(params, ws, m0, m1, q0, q1): 32 x 32 blocks, each four int32 tiles
    (C) from two A tiles (16 rows x 64 k of `ap`, rows `ldap` bytes apart: the padded
    copy, or A itself when its rows need no padding) and two B tiles (16 groups of 4 k
    x 16 columns: 1 KiB of one packed panel) per 64 k."""
    f = FnBuilder(module, "tc_qgemm_amx", [("params", PTR), ("ws", PTR), ("m0", I64),
                                           ("m1", I64), ("q0", I64), ("q1", I64)])
    b, g = f.b, f.arg
    p = _Params(f, g["params"])
    void = ir.VoidType()
    cfgload = f.intrinsic("llvm.x86.ldtilecfg", void, [PTR])
    zero = f.intrinsic("llvm.x86.tilezero", void, [I8])
    load = f.intrinsic("llvm.x86.tileloadd64", void, [I8, PTR, I64])
    dot = f.intrinsic("llvm.x86.tdpbusd", void, [I8, I8, I8])
    store = f.intrinsic("llvm.x86.tilestored64", void, [I8, PTR, I64])
    release = f.intrinsic("llvm.x86.tilerelease", void, [])

    def t(x):
        return ir.Constant(I8, x)
    b.call(cfgload, [_amx_config(module)])
    kp, ap, ldap = p["kp"], p.ptr("ap"), p["ldap"]
    pending, parity = f.var(I64, c64(0)), f.var(I64, c64(0))
    pend_ws = f.var(PTR, g["ws"])
    pend_m, pend_i, pend_n0 = (f.var(I64, c64(0)) for _ in range(3))

    def finish_pending():
        with b.if_then(b.icmp_signed("!=", b.load(pending, typ=I64), c64(0))):
            b.call(module.get_global("tc_qepi"), [
                g["params"], b.load(pend_ws, typ=PTR), b.load(pend_m, typ=I64),
                b.load(pend_i, typ=I64), b.load(pend_n0, typ=I64)])
            b.store(c64(0), pending)
    pstride = f.mul(kp, PANEL)
    with f.loop(g["q0"], g["q1"]) as q:
        bp = [f.at(p.ptr("b"), b.add(f.mul(f.mul(q, 2), pstride), f.mul(pstride, v)), ty=I8)
              for v in range(2)]
        with f.loop(g["m0"], g["m1"], AMX_ROWS) as i:
            for c in range(4):
                b.call(zero, [t(c)])
            arow = [f.at(ap, f.mul(b.add(i, c64(16 * h)), ldap), ty=I8) for h in range(2)]
            with f.loop(0, kp, AMX_KB) as kk:
                for h in range(2):
                    b.call(load, [t(4 + h), f.at(arow[h], kk, ty=I8), ldap])
                for v in range(2):
                    b.call(load, [t(6 + v), f.at(bp[v], f.mul(kk, PANEL), ty=I8), c64(64)])
                for h in range(2):
                    for v in range(2):
                        b.call(dot, [t(2 * h + v), t(4 + h), t(6 + v)])
            # the previous block's epilogue (vector code) runs while the tiles compute
            # this one, then this block's sums go to the other half of the workspace
            finish_pending()
            half = b.load(parity, typ=I64)
            dst = f.at(g["ws"], f.mul(half, BLOCK_WORDS), ty=I32)
            for h in range(2):
                for v in range(2):
                    b.call(store, [t(2 * h + v), f.at(dst, c64(16 * h * NR + 16 * v), ty=I32),
                                   c64(NR * 4)])
            for slot, val in ((pend_ws, dst), (pend_m, f.min(c64(AMX_ROWS), b.sub(g["m1"], i))),
                              (pend_i, i), (pend_n0, f.mul(q, NR)), (pending, c64(1)),
                              (parity, b.sub(c64(1), half))):
                b.store(val, slot)
    finish_pending()
    b.call(release, [])
    return f.finish()


def _amx_pack_a(module: ir.Module) -> ir.Function:
    """tc_qpack_a(params, ws, r0, r1): rows [r0, r1) of A into the AMX copy (`ap`, rows
    kp bytes apart), zero past K and past M."""
    f = FnBuilder(module, "tc_qpack_a", [("params", PTR), ("ws", PTR), ("r0", I64),
                                         ("r1", I64)])
    b, g = f.b, f.arg
    p = _Params(f, g["params"])
    memcpy = f.intrinsic("llvm.memcpy.p0.p0.i64", ir.VoidType(), [PTR, PTR, I64, ir.IntType(1)])
    memset = f.intrinsic("llvm.memset.p0.i64", ir.VoidType(), [PTR, I8, I64, ir.IntType(1)])
    K, kp, M = p["k"], p["kp"], p["m"]
    no = ir.Constant(ir.IntType(1), 0)
    with f.loop(g["r0"], g["r1"]) as i:
        dst = f.at(p.ptr("ap"), f.mul(i, kp), ty=I8)
        with b.if_else(b.icmp_signed("<", i, M)) as (inside, outside):
            with inside:
                b.call(memcpy, [dst, f.at(p.ptr("a"), f.mul(i, p["lda"]), ty=I8), K, no])
                b.call(memset, [f.at(dst, K, ty=I8), ir.Constant(I8, 0), b.sub(kp, K), no])
            with outside:
                b.call(memset, [dst, ir.Constant(I8, 0), kp, no])
    return f.finish()


def build_module(path: str) -> ir.Module:
    """The module of one path: `tc_qgemm_<path>_job` (and for amx `tc_qpack_a_job`)."""
    module = ir.Module(name=f"tensorc_qgemm_{path}")
    _epilogue(module)
    if path == "amx":
        job(module, "tc_qgemm_amx_job", _amx(module), [PTR], 4)
        job(module, "tc_qpack_a_job", _amx_pack_a(module), [PTR], 2)
    else:
        kind = KINDS[path]()
        job(module, f"tc_qgemm_{path}_job", _tiles(module, kind, f"tc_qgemm_{path}"), [PTR], 4)
    return module


def symbols(path: str) -> list[str]:
    return [f"tc_qgemm_{path}_job"] + (["tc_qpack_a_job"] if path == "amx" else [])
