"""Flash attention for the LLVM CPU backend (float32), with the `attention` op's meaning.

    out = softmax(scale * q @ k^T, causal / mask applied) @ v
    q [b, h, t, d], k [bk, hk, s, d], v [bk, hk, s, dv] -> [b, h, t, dv]

(bk is b or 1; hk divides h: query head i reads key/value head i // (h / hk), so
grouped-query attention reads each shared head in place, never a repeated copy.)

See `tensorc/ops/attention.py` for the exact semantics (top-left causal, boolean
keep-masks replace scores with `mask_value`, float masks add). The kernel never
holds the t x s scores: per head it packs K^T into 32-key panels (the GEMM's
B-panel layout), then for each block of 8 query rows walks the key tiles with an
online softmax (running max m and sum l per row):

    S = Qblk @ Ktile^T        8 x 32 scores in 16 zmm accumulators
    m' = max(m, rowmax S);  P = exp(S - m');  c = exp(m - m')
    l = l c + rowsum P;     O = O c + P @ Vtile

and writes O / l at the end. With causal masking and mask_value = -inf, key
tiles entirely above the diagonal are skipped (they would only add zeros).
Threads split the heads, or the query rows when there are fewer heads than threads.
The same builder with `sparse=True` makes the sparse-attention kernel
(`sparse_attention.py`: local and block-sparse patterns), which visits only the key
tiles of a pattern's intervals.
"""

from __future__ import annotations

import math
import threading
from ctypes import c_float, c_int64, c_void_p

import numpy as np
from llvmlite import ir

from tensorc.errors import ShapeError, TensorcError

from . import tuning
from .attention_operands import _estrides, _f32_bits, _unit_last, bound_job, kernel_mask
from .attention_schedule import (
    BC,
    BR,
    GROUP,
    candidates,
    checked,
    default,
    median_seconds,
    module_params,
    operands,
)
from .attention_schedule import key as schedule_key
from .gemm import _split, num_threads, run_jobs
from .gemm_ir import _pack_bt
from .irbuild import F32, I32, I64, M16, PTR, V16, VI32, FnBuilder, c64, job, vconst
from .jit import cfunc, compile_library

PANEL = 32       # keys per packed K^T panel (tc_pack_bt's width); a tile is one or half
MASKS = ("none", "add", "keep")
META = ("heads", "t", "s", "d", "dv", "q_b", "q_h", "q_t", "k_b", "k_h", "k_t",
        "v_b", "v_h", "v_t", "o_b", "o_h", "o_t", "m_b", "m_h", "m_t", "group")
# the sparse kernel's band; META then holds `DIL_BITS` words: word x (x < min(dilation,
# 32)) has bit l set where l = x (mod dilation), the lanes of a 32-key tile a row keeps
SPARSE_META = ("before", "after", "dilation")
DIL_BITS = 32
I8 = ir.IntType(8)
I16 = ir.IntType(16)
V16I8 = ir.VectorType(I8, 16)
NEG_INF = float("-inf")


def _heads(f, g, m, hh, mask_kind):
    """Pointers to item hh's (batch, head) of q, k, v, out and the mask; a query head
    reads key/value head hi // group (grouped-query attention, in place)."""
    b = f.b
    bi, hi = b.sdiv(hh, m["heads"]), b.srem(hh, m["heads"])
    hkv = b.sdiv(hi, m["group"])

    def head(ptr, pre, ty=F32):
        h_of = hkv if pre in "kv" else hi
        return f.at(ptr, f.mul(bi, m[pre + "_b"]), f.mul(h_of, m[pre + "_h"]), ty=ty)
    return (*(head(g[n], n) for n in "qkvo"),
            head(g["mask"], "m", I8 if mask_kind == "keep" else F32))


def _entry(module: ir.Module, name: str, sparse: bool = False):
    """A kernel's function (both dense kernels take the same arguments; the sparse one
    adds the interval table and an item's intervals) and its META values."""
    pattern = [("ivs", PTR)] if sparse else []
    ranges = [("iv0", I64), ("iv1", I64)] if sparse else []
    f = FnBuilder(module, name, [
        ("q", PTR), ("k", PTR), ("v", PTR), ("o", PTR), ("mask", PTR), ("meta", PTR),
        *pattern, ("scale", F32), ("mask_value", F32), ("causal", I64),
        ("h0", I64), ("h1", I64), ("i0", I64), ("i1", I64), *ranges, ("work", PTR)])
    b = f.b
    return f, {n: b.load(f.at(f.arg["meta"], c64(i), ty=I64), typ=I64)
               for i, n in enumerate(META + (SPARSE_META if sparse else ()))}


def _kernel(module: ir.Module, mask_kind: str, sparse: bool = False, br: int = BR,
            bc: int = BC) -> ir.Function:
    """tc_attention_<mask_kind>: heads [h0, h1) x query rows [i0, i1).

    `sparse` (tc_sparse_attention_<mask_kind>): the rows see only the keys of the
    intervals [iv0, iv1) of the table `ivs` (lo, hi, banded words; `sparse_attention.py`
    plans them from the op's Pattern), banded ones only within the band before / after
    of META (and every dilation-th key); causal keeps j <= i. Per 8-row block, an
    interval's key tiles are clipped to what some row of the block sees, so the tiles
    outside the pattern are never visited; excluded pairs get no weight (-inf) whatever
    mask_value is. The dense kernel's IR is unchanged by this (the `sparse` parts are
    emitted only for the sparse one).

    The schedule: `br` query rows per block, `bc` keys per tile (32: a packed panel,
    16: half of one); br x bc / 16 score accumulators live in registers."""
    f, m = _entry(module, f"tc_{'sparse_' if sparse else ''}attention_{mask_kind}", sparse)
    b, g = f.b, f.arg
    s, d, dv = m["s"], m["d"], m["dv"]
    vecs = bc // 16                                    # 16-lane vectors of a tile's row
    tiles = b.sdiv(b.add(s, c64(PANEL - 1)), c64(PANEL))
    chunks = b.sdiv(b.add(dv, c64(15)), c64(16))       # 16-lane chunks of a row of V / O
    kt = g["work"]                                     # K^T panels [tiles][d][PANEL]
    qp = f.at(kt, f.mul(f.mul(tiles, PANEL), d))       # scaled Q block, [d][br]
    q_up = _q_rounding(br)                             # d rounded up: 64-byte aligned
    qp_size = f.mul(b.sdiv(b.add(d, c64(q_up - 1)), c64(q_up)), q_up * br)
    ob = f.at(qp, qp_size)                             # O accumulators, [br][chunks][16]
    pb = f.at(ob, f.mul(f.mul(chunks, 16), br))        # P tile, [br][bc]
    mv = g["mask_value"]
    mv_vec = f.splat(mv)
    causal = b.icmp_signed("!=", g["causal"], c64(0))
    skip_tiles = b.and_(causal, b.fcmp_ordered("==", mv, ir.Constant(F32, NEG_INF)))
    iota = ir.Constant(VI32, list(range(16)))
    pack_bt = module.get_global("tc_pack_bt")

    splat_i32, vmax, reduce_max, reduce_sum = vector_helpers(f)

    def imax(x, y):
        return b.select(b.icmp_signed(">", x, y), x, y)

    def interval(iv, first, last):
        """Interval iv's (lo, hi, banded) and the keys [lo', hi') it holds for some row
        of first..last (lo' >= hi' when none)."""
        lo, hi, banded = (b.load(f.at(g["ivs"], f.mul(iv, 3), c64(w), ty=I64), typ=I64)
                          for w in range(3))
        banded = b.icmp_signed("!=", banded, c64(0))
        lo_c = b.select(banded, imax(lo, b.sub(first, m["before"])), lo)
        hi_c = b.select(banded, f.min(hi, b.add(b.add(last, m["after"]), c64(1))), hi)
        hi_c = b.select(causal, f.min(hi_c, b.add(last, c64(1))), hi_c)
        return lo, hi, banded, lo_c, hi_c

    with f.loop(g["h0"], g["h1"]) as hh:
        qh, kh, vh, oh, mh = _heads(f, g, m, hh, mask_kind)
        if not sparse:
            b.call(pack_bt, [kh, m["k_t"], d, s, kt, c64(0), tiles])
        else:   # only the tiles an interval holds for these rows (a tile two share
            # is packed twice: cheaper than packing the gaps between, e.g. a window's
            # and a global key's at the end)
            with f.loop(g["iv0"], g["iv1"]) as iv:
                _, _, _, lo_c, hi_c = interval(iv, g["i0"], b.sub(g["i1"], c64(1)))
                with b.if_then(b.icmp_signed("<", lo_c, hi_c)):
                    b.call(pack_bt, [kh, m["k_t"], d, s, kt, b.sdiv(lo_c, c64(PANEL)),
                                     b.sdiv(b.add(hi_c, c64(PANEL - 1)), c64(PANEL))])

        with f.loop(g["i0"], g["i1"], br) as i:
            rows = f.min(c64(br), b.sub(g["i1"], i))
            # rows past the end repeat the last real row; they are never stored
            row = [b.add(i, f.min(c64(r), b.sub(rows, c64(1)))) for r in range(br)]
            with f.loop(0, d) as kk:
                for r in range(br):
                    x = b.load(f.at(qh, f.mul(row[r], m["q_t"]), kk), typ=F32)
                    b.store(b.fmul(x, g["scale"]), f.at(qp, f.mul(kk, br), c64(r)))
            m_run = [f.var(F32, ir.Constant(F32, NEG_INF)) for _ in range(br)]
            l_run = [f.var(V16, vconst(0.0)) for _ in range(br)]
            corr = [f.var(F32) for _ in range(br)]
            with f.loop(0, b.mul(chunks, c64(br))) as c:
                f.vstore(vconst(0.0), f.at(ob, f.mul(c, 16)), 64)
            last_row = b.add(i, b.sub(rows, c64(1)))

            def tile(j0, jend, keys=None, dil=None):
                """One key tile at j0 (keys from jend on are not read); `keys`: per row,
                the i32 range [a, b) of keys it sees, `dil`: per row, the lane bits
                the dilation keeps (sparse)."""
                # S = Qblk @ Ktile^T
                acc = [[f.var(V16, vconst(0.0)) for _ in range(vecs)] for _ in range(br)]
                ktile = f.at(kt, f.mul(f.mul(b.sdiv(j0, c64(PANEL)), d), PANEL))
                if bc < PANEL:   # the tile is part of its panel's columns
                    ktile = f.at(ktile, b.srem(j0, c64(PANEL)))
                with f.loop(0, d) as kk:
                    kv = [f.vload(f.at(ktile, f.mul(kk, PANEL), c64(16 * u)), 64)
                          for u in range(vecs)]
                    for r in range(br):
                        qs = f.splat(b.load(f.at(qp, f.mul(kk, br), c64(r)), typ=F32))
                        for u in range(vecs):
                            b.store(f.fma(qs, kv[u], b.load(acc[r][u], typ=V16)), acc[r][u])
                # mask, then the online softmax update of each row
                valid = [f.lanes_below(b.sub(s, b.add(j0, c64(16 * u)))) for u in range(vecs)]
                cols = [b.add(splat_i32(b.add(j0, c64(16 * u))), iota) for u in range(vecs)]
                scores, bases, delta = [], [], vconst(0.0)
                for r in range(br):
                    sv = []
                    if dil is not None:
                        bits = b.load(dil[r], typ=I32)
                    for u in range(vecs):
                        x = b.load(acc[r][u], typ=V16)
                        if not sparse:
                            above = b.icmp_signed(">", cols[u], splat_i32(row[r]))
                            x = b.select(b.and_(above, _splat_i1(b, causal)), mv_vec, x)
                        mp = f.at(mh, f.mul(row[r], m["m_t"]), j0, c64(16 * u),
                                  ty=I8 if mask_kind == "keep" else F32)
                        if mask_kind == "add":
                            x = b.fadd(x, f.mload(mp, valid[u]))
                        elif mask_kind == "keep":
                            keep = b.icmp_unsigned("!=", _mload_i8(f, mp, valid[u]),
                                                   ir.Constant(V16I8, [0] * 16))
                            x = b.select(keep, x, mv_vec)
                        if sparse:   # the pattern: keys [a, b) of the row, the dilation
                            a_r, b_r = keys[r]
                            seen = b.and_(b.icmp_signed(">=", cols[u], a_r),
                                          b.icmp_signed("<", cols[u], b_r))
                            half = b.trunc(b.lshr(bits, ir.Constant(I32, 16 * u)), I16)
                            seen = b.and_(seen, b.bitcast(half, M16))
                            sv.append(b.select(seen, x, vconst(NEG_INF)))
                        else:
                            sv.append(b.select(valid[u], x, vconst(NEG_INF)))
                    m_old = b.load(m_run[r], typ=F32)
                    m_new = b.call(f.intrinsic("llvm.maxnum.f32", F32, [F32, F32]),
                                   [m_old, reduce_max(sv[0] if vecs == 1 else vmax(*sv))])
                    base = b.select(b.fcmp_ordered("==", m_new, ir.Constant(F32, NEG_INF)),
                                    ir.Constant(F32, 0.0), m_new)
                    b.store(m_new, m_run[r])
                    delta = b.insert_element(delta, b.fsub(m_old, base), ir.Constant(I32, r))
                    scores.append(sv)
                    bases.append(base)
                corr_all = f.exp(delta)            # the block's rows' rescale factors in one exp
                for r in range(br):
                    cr = b.extract_element(corr_all, ir.Constant(I32, r))
                    b.store(cr, corr[r])
                    p = [f.exp(b.fsub(x, f.splat(bases[r]))) for x in scores[r]]
                    l_new = b.fadd(b.fmul(b.load(l_run[r], typ=V16), f.splat(cr)),
                                   p[0] if vecs == 1 else b.fadd(p[0], p[1]))
                    b.store(l_new, l_run[r])    # lane-wise sums: one reduction at the end
                    for u in range(vecs):
                        f.vstore(p[u], f.at(pb, c64(r * bc + 16 * u)), 64)
                # O = O * corr + P @ Vtile, one 16-lane chunk of dv at a time
                jn = f.min(c64(bc), b.sub(jend, j0))
                with f.loop(0, chunks) as c:
                    lanes = f.lanes_below(b.sub(dv, f.mul(c, 16)))
                    optr = [f.at(ob, f.mul(b.add(f.mul(c64(r), chunks), c), 16))
                            for r in range(br)]
                    o = [f.var(V16, b.fmul(f.vload(optr[r], 64),
                                           f.splat(b.load(corr[r], typ=F32))))
                         for r in range(br)]

                    def pv(j):
                        vrow = f.at(vh, f.mul(b.add(j0, j), m["v_t"]), f.mul(c, 16))
                        vv = f.mload(vrow, lanes)
                        for r in range(br):
                            pj = f.splat(b.load(f.at(pb, c64(r * bc), j), typ=F32))
                            b.store(f.fma(pj, vv, b.load(o[r], typ=V16)), o[r])
                    # two keys a step (unrolled here: the module is built without LLVM's
                    # loop unrolling, which costs far more compile time than it gains)
                    jn2 = b.and_(jn, c64(-2))
                    with f.loop(0, jn2, 2) as j:
                        pv(j)
                        pv(b.add(j, c64(1)))
                    with f.loop(jn2, jn) as j:
                        pv(j)
                    for r in range(br):
                        f.vstore(b.load(o[r], typ=V16), optr[r], 64)

            if not sparse:
                jend = b.select(skip_tiles, f.min(s, b.add(last_row, c64(1))), s)
                with f.loop(0, jend, bc) as j0:
                    tile(j0, s)
            else:
                dil = [f.var(I32) for _ in range(br)]
                visits = f.at(pb, c64(br * bc))   # an i64: tiles visited (for tests)
                dilated = b.icmp_signed(">", m["dilation"], c64(1))
                with f.loop(g["iv0"], g["iv1"]) as iv:
                    lo, hi, banded, lo_c, hi_c = interval(iv, i, last_row)
                    # the many intervals a block does not reach cost a compare
                    with b.if_then(b.icmp_signed("<", lo_c, hi_c)):
                        keys = []
                        for r in range(br):   # the row's own keys of the interval
                            a_r = b.select(banded, imax(lo, b.sub(row[r], m["before"])), lo)
                            b_r = b.select(banded, f.min(hi, b.add(b.add(row[r], m["after"]),
                                                                    c64(1))), hi)
                            b_r = b.select(causal, f.min(b_r, b.add(row[r], c64(1))), b_r)
                            b_r = imax(a_r, b_r)   # empty stays empty within i32
                            keys.append((splat_i32(a_r), splat_i32(b_r)))
                        start = f.mul(b.sdiv(lo_c, c64(bc)), bc)
                        with f.loop(start, hi_c, bc) as j0:
                            b.store(b.add(b.load(visits, typ=I64), c64(1)), visits)
                            for r in range(br):
                                b.store(ir.Constant(I32, -1), dil[r])
                            with b.if_then(b.and_(banded, dilated)):
                                for r in range(br):   # lanes l = row - j0 (mod dilation)
                                    x = b.srem(b.sub(row[r], j0), m["dilation"])
                                    x = b.select(b.icmp_signed("<", x, c64(0)),
                                                 b.add(x, m["dilation"]), x)
                                    word = b.load(f.at(g["meta"], c64(len(META) + 3),
                                                       f.min(x, c64(DIL_BITS - 1)), ty=I64),
                                                  typ=I64)
                                    word = b.select(b.icmp_signed("<", x, c64(DIL_BITS)),
                                                    word, c64(0))
                                    b.store(b.trunc(word, I32), dil[r])
                            tile(j0, hi_c, keys, dil)

            # out rows = O / l
            for r in range(br):
                with b.if_then(b.icmp_signed("<", c64(r), rows), likely=True):
                    l_sum = reduce_sum(b.load(l_run[r], typ=V16))
                    inv = f.splat(b.fdiv(ir.Constant(F32, 1.0), l_sum))
                    with f.loop(0, chunks) as c:
                        src = f.at(ob, f.mul(b.add(f.mul(c64(r), chunks), c), 16))
                        dst = f.at(oh, f.mul(row[r], m["o_t"]), f.mul(c, 16))
                        f.mstore(b.fmul(f.vload(src, 64), inv), dst,
                                 f.lanes_below(b.sub(dv, f.mul(c, 16))))
    return f.finish()


def _decode_kernel(module: ir.Module, mask_kind: str, group: int = GROUP) -> ir.Function:
    """tc_attention_decode_<mask_kind>: heads [h0, h1) x query rows [i0, i1), one row
    at a time, for a decode step's few rows (by default t <= DECODE_T) over s cached
    keys.

    The flash blocks above pack K^T per head and compute br (8) rows whatever t is;
    here each row reads K and V once, straight from their rows: scores[j] = q . k_j
    (scaled q in registers, a horizontal sum per key) into the workspace with the
    row's max, then p = exp(scores - max) 16 keys at a time, then O = sum_j p_j v_j
    with `group` (1, 2 or 4) chunks of the row of V per pass, and O / sum p. Same
    arguments and meaning as `_kernel`; the workspace holds the scaled row of Q and
    the s scores."""
    f, m = _entry(module, f"tc_attention_decode_{mask_kind}")
    b, g = f.b, f.arg
    s, d, dv = m["s"], m["d"], m["dv"]
    def up(x, n):   # x rounded up to a multiple of n
        return f.mul(b.sdiv(b.add(x, c64(n - 1)), c64(n)), n)
    qbuf = g["work"]                       # scaled row of Q, zero up to a whole group
    sbuf = f.at(qbuf, up(d, 16 * group))   # scores, then weights, [s]
    mv = g["mask_value"]
    causal = b.icmp_signed("!=", g["causal"], c64(0))
    skip_tail = b.and_(causal, b.fcmp_ordered("==", mv, ir.Constant(F32, NEG_INF)))
    neg_inf = ir.Constant(F32, NEG_INF)

    reduce_sum = vector_helpers(f)[3]

    def lanes(n, c):   # lanes of 16-lane chunk c below n
        return f.lanes_below(b.sub(n, f.mul(c, 16)))

    with f.loop(g["h0"], g["h1"]) as hh:
        qh, kh, vh, oh, mh = _heads(f, g, m, hh, mask_kind)

        with f.loop(g["i0"], g["i1"]) as i:
            qrow = f.at(qh, f.mul(i, m["q_t"]))
            with f.loop(0, up(d, 16 * group), 16) as c:   # zero past d
                x = f.mload(f.at(qrow, c), f.lanes_below(b.sub(d, c)))
                f.vstore(b.fmul(x, f.splat(g["scale"])), f.at(qbuf, c), 64)
            jend = b.select(skip_tail, f.min(s, b.add(i, c64(1))), s)
            mrow = f.at(mh, f.mul(i, m["m_t"]), ty=I8 if mask_kind == "keep" else F32)
            mx = f.var(F32, neg_inf)
            with f.loop(0, jend) as j:   # scores and their max
                krow = f.at(kh, f.mul(j, m["k_t"]))
                acc = f.var(V16, vconst(0.0))
                with f.loop(0, d, 16 * group) as c0:
                    parts = []
                    for u in range(group):
                        c = b.add(c0, c64(16 * u))
                        kv = f.mload(f.at(krow, c), f.lanes_below(b.sub(d, c)))
                        parts.append(b.fmul(f.vload(f.at(qbuf, c), 64), kv))
                    while len(parts) > 1:
                        parts = [b.fadd(x, y) for x, y in zip(parts[::2], parts[1::2],
                                                             strict=True)]
                    b.store(b.fadd(b.load(acc, typ=V16), parts[0]), acc)
                sc = reduce_sum(b.load(acc, typ=V16))
                sc = b.select(b.and_(causal, b.icmp_signed(">", j, i)), mv, sc)
                if mask_kind == "keep":
                    keep = b.icmp_unsigned("!=", b.load(f.at(mrow, j, ty=I8), typ=I8),
                                           ir.Constant(I8, 0))
                    sc = b.select(keep, sc, mv)
                elif mask_kind == "add":
                    sc = b.fadd(sc, b.load(f.at(mrow, j), typ=F32))
                b.store(sc, f.at(sbuf, j))
                old = b.load(mx, typ=F32)
                b.store(b.select(b.fcmp_ordered(">", sc, old), sc, old), mx)
            mxv = b.load(mx, typ=F32)
            base = f.splat(b.select(b.fcmp_ordered("==", mxv, neg_inf),
                                    ir.Constant(F32, 0.0), mxv))
            lsum = f.var(V16, vconst(0.0))
            with f.loop(0, jend, 16) as j:   # weights p = exp(scores - max), their sum
                ok = f.lanes_below(b.sub(jend, j))
                p = f.exp(b.fsub(f.mload(f.at(sbuf, j), ok), base))
                p = b.select(ok, p, vconst(0.0))
                f.mstore(p, f.at(sbuf, j), ok)
                b.store(b.fadd(b.load(lsum, typ=V16), p), lsum)
            inv = f.splat(b.fdiv(ir.Constant(F32, 1.0), reduce_sum(b.load(lsum, typ=V16))))
            orow = f.at(oh, f.mul(i, m["o_t"]))
            with f.loop(0, dv, 16 * group) as c0:   # O = sum_j p_j v_j, / sum p
                cs = [b.add(c0, c64(16 * u)) for u in range(group)]
                masks = [f.lanes_below(b.sub(dv, c)) for c in cs]
                o = [f.var(V16, vconst(0.0)) for _ in range(group)]
                with f.loop(0, jend) as j:
                    pj = f.splat(b.load(f.at(sbuf, j), typ=F32))
                    vrow = f.at(vh, f.mul(j, m["v_t"]))
                    for u in range(group):
                        vv = f.mload(f.at(vrow, cs[u]), masks[u])
                        b.store(f.fma(pj, vv, b.load(o[u], typ=V16)), o[u])
                for u in range(group):
                    f.mstore(b.fmul(b.load(o[u], typ=V16), inv), f.at(orow, cs[u]), masks[u])
    return f.finish()


def vector_helpers(f: FnBuilder):
    """(splat_i32, vmax, reduce_max, reduce_sum) over 16 lanes, for the kernels of `f`
    (flash attention, decode, the backward)."""
    b = f.b

    def splat_i32(x):
        v = b.insert_element(ir.Constant(VI32, ir.Undefined), b.trunc(x, I32),
                             ir.Constant(I32, 0))
        return b.shuffle_vector(v, ir.Constant(VI32, ir.Undefined), ir.Constant(VI32, [0] * 16))

    def vmax(x, y):
        return b.select(b.fcmp_ordered(">", x, y), x, y)

    def reduce_max(vec):
        # a shuffle tree of `a > b ? a : b` (one vmaxps each); the NaN-exact
        # llvm.vector.reduce.fmax costs far more, and a NaN score reaches the output
        # through exp() anyway
        for half in (8, 4, 2, 1):
            hi = b.shuffle_vector(vec, ir.Constant(V16, ir.Undefined),
                                  ir.Constant(VI32, [(i + half) % 16 for i in range(16)]))
            vec = vmax(vec, hi)
        return b.extract_element(vec, ir.Constant(I32, 0))

    def reduce_sum(vec):
        fn = f.intrinsic("llvm.vector.reduce.fadd.v16f32", F32, [F32, V16])
        return b.call(fn, [ir.Constant(F32, 0.0), vec], fastmath=("reassoc",))
    return splat_i32, vmax, reduce_max, reduce_sum


def _splat_i1(b: ir.IRBuilder, flag):
    v = b.insert_element(ir.Constant(M16, ir.Undefined), flag, ir.Constant(I32, 0))
    return b.shuffle_vector(v, ir.Constant(M16, ir.Undefined), ir.Constant(VI32, [0] * 16))


def _mload_i8(f: FnBuilder, ptr, mask):
    fn = f.intrinsic("llvm.masked.load.v16i8.p0", V16I8, [PTR, I32, M16, V16I8])
    return f.b.call(fn, [ptr, ir.Constant(I32, 1), mask, ir.Constant(V16I8, [0] * 16)])


def build_module(kinds=MASKS, params: tuple = (BR, BC, GROUP)) -> ir.Module:
    """The flash and decode kernels of mask `kinds` at `params` (br, bc, group)."""
    br, bc, group = params
    module = ir.Module(name=f"tensorc_attention_{'_'.join(kinds)}_{br}x{bc}g{group}")
    _pack_bt(module)
    for kind in kinds:
        job(module, f"tc_attention_job_{kind}", _kernel(module, kind, br=br, bc=bc),
             [PTR] * 6 + [F32, F32, I64], 4, work="last")
        job(module, f"tc_attention_decode_job_{kind}", _decode_kernel(module, kind, group),
            [PTR] * 6 + [F32, F32, I64], 4, work="last")
    return module


_lock = threading.Lock()
_ARGS = [c_void_p] * 6 + [c_float, c_float] + [c_int64] * 5 + [c_void_p]
_libs: dict[tuple, dict] = {}   # (kind, br, bc, group) -> the module's entry points


def ahead(kind: str, sched: dict | None = None) -> tuple:
    """The `jit.compile_ahead` job of the module of a mask kind and schedule (None: the
    8 x 32 flash blocks'); its name holds the module's schedule, so schedules never
    share a cache entry."""
    params = module_params(sched) if sched else (BR, BC, GROUP)
    br, bc, group = params
    return (f"attention/{kind}/{br}x{bc}/g{group}", lambda: build_module((kind,), params),
            True, False)


def library(kind: str, sched: dict | None = None) -> dict:
    """The module of mask `kind` that runs `sched` (None: as for `ahead`), compiled on
    first use (object code cached on disk): "fn" the flash kernel (ctypes), "job" /
    "decode_job" the pool jobs of the flash / few-query-rows kernel."""
    if kind not in MASKS:
        raise KeyError(kind)
    lib_key = (kind, *(module_params(sched) if sched else (BR, BC, GROUP)))
    with _lock:
        if lib_key not in _libs:
            names = [f"tc_attention_{kind}", f"tc_attention_job_{kind}",
                     f"tc_attention_decode_job_{kind}"]
            name, build, vectorize, unroll = ahead(kind, sched)   # see compile_library
            addrs = compile_library(name, build, names, vectorize, unroll)
            _libs[lib_key] = {"fn": cfunc(addrs[names[0]], None, _ARGS),
                              "job": addrs[names[1]], "decode_job": addrs[names[2]]}
        return _libs[lib_key]


def schedule_of(q_shape, k_shape, v_shape, causal: bool, kind: str) -> dict:
    """The schedule a call with these operand shapes runs (`tuning`'s for its key)."""
    (B, H, T, D), S, DV = q_shape, k_shape[2], v_shape[3]
    return tuning.schedule("attention", schedule_key(B * H, T, S, D, DV, causal, kind))


def measure(key: tuple, sched: dict, repeat: int) -> float:
    """The attention Space's timing: median seconds of `repeat` bound calls of `sched`
    on random operands of key's shape."""
    q, k, v, mask, out = operands(key)
    return median_seconds(bind(q, k, v, mask, 1 / math.sqrt(key[3]), bool(key[5]), out=out,
                               schedule=sched), repeat)


SPACE = tuning.register(tuning.Space("attention", default, candidates, measure))


def attention(q, k, v, mask=None, scale: float = 1.0, causal: bool = False,
              mask_value: float = -math.inf, threads: int | None = None,
              out: np.ndarray | None = None, schedule: dict | None = None) -> np.ndarray:
    """softmax(scale * q @ k^T, masked) @ v without materialising the scores.

    q [b,h,t,d], k [bk,hk,s,d], v [bk,hk,s,dv] (bk: b or 1; hk divides h); mask
    broadcasts to [b,h,t,s]: bool keeps True, float is added. float32 only. `out`, if
    given, is a float32 [b,h,t,dv] array with unit inner stride to write into.
    `schedule`: one of `attention_schedule`'s (default: this host's for the shape)."""
    arrays = [np.asarray(x) for x in (q, k, v)]
    if any(x.dtype != np.float32 for x in arrays):
        raise TensorcError("attention: q, k, v must be float32, got "
                           + ", ".join(str(x.dtype) for x in arrays))
    q, k, v = arrays
    if schedule is not None:
        checked(schedule)
    if not q.ndim == k.ndim == v.ndim == 4:
        raise ShapeError(f"attention expects q [b,h,t,d], k [b,h,s,d], v [b,h,s,dv]: "
                         f"got {q.shape}, {k.shape}, {v.shape}")
    B, H, T, D = q.shape
    S, DV = k.shape[2], v.shape[3]
    if k.shape[3] != D or v.shape[:3] != k.shape[:3] or k.shape[0] not in (1, B) \
            or k.shape[1] == 0 or H % k.shape[1]:
        raise ShapeError(f"attention: k {k.shape} and v {v.shape} do not fit q {q.shape}")
    if out is None:
        out = np.empty((B, H, T, DV), np.float32)
    elif out.shape != (B, H, T, DV) or out.dtype != np.float32 or not out.flags.writeable \
            or out.strides[-1] != 4 or any(st < 0 or st % 4 for st in out.strides):
        raise TensorcError(f"attention: out must be a writeable float32 {(B, H, T, DV)} array "
                           f"with unit inner stride, got {out.dtype} {out.shape}")
    if any(np.may_share_memory(out, x) for x in (q, k, v)):  # rows would clobber inputs
        out[...] = attention(q, k, v, mask, scale, causal, mask_value, threads,
                             schedule=schedule)
        return out
    if out.size == 0:
        return out
    if S == 0:  # softmax over no keys: 0 / 0, as the reference computes
        out.fill(np.nan)
        return out
    job, fixed, items, threads, work_size, _ = _plan(q, k, v, mask, scale, causal, mask_value,
                                                     threads, out, schedule)
    run_jobs([(job, fixed, items, ("attention", work_size))], threads)
    return out


def _plan(q, k, v, mask, scale, causal, mask_value, threads, out, schedule=None):
    """The kernel, its fixed arguments, the work items, the thread count, the workspace
    size and the arrays that must stay alive while it runs (inputs already checked);
    the schedule is `schedule`, else the one `tuning` has for the call's key."""
    B, H, T, D = q.shape
    S, DV = k.shape[2], v.shape[3]
    HK = k.shape[1]
    q = _unit_last(q)
    k = np.broadcast_to(_unit_last(k), (B, HK, S, D))
    v = np.broadcast_to(_unit_last(v), (B, HK, S, DV))

    kind, m = "none", out  # `out` stands in for an absent mask; never read then
    if mask is not None:
        kind, m = kernel_mask(mask, (B, H, T, S), "attention")
        if kind == "keep":
            m = m.view(np.uint8)
    meta = np.array([H, T, S, D, DV, *_estrides(q), *_estrides(k), *_estrides(v),
                     *_estrides(out), *_estrides(m), H // HK], np.int64)
    sched = checked(schedule) if schedule is not None else \
        schedule_of(q.shape, k.shape, v.shape, causal, kind)
    threads = num_threads() if threads is None else max(1, int(threads))
    if sched["path"] == "decode":   # a decode step's few rows: `_decode_kernel`
        return _decode_plan(q, k, v, out, m, meta, kind, scale, mask_value, causal, threads,
                            sched)
    br, bc = sched["br"], sched["bc"]
    q_up = _q_rounding(br)
    work_size = -(-S // PANEL) * PANEL * D + -(-D // q_up) * q_up * br \
        + br * -(-DV // 16) * 16 + br * bc
    if B * H * T * S * (D + DV) < 1 << 20:
        threads = 1
    if B * H >= threads:   # a head per item: threads claim them as they finish
        items = [(h, h + 1, 0, T) for h in range(B * H)] if threads > 1 else [(0, B * H, 0, T)]
    elif causal:   # row i costs ~i key tiles: cut where the cumulative work ~i^2 splits evenly
        cuts = [0] + [min(T, round(T * math.sqrt(p / threads) / br) * br)
                      for p in range(1, threads)] + [T]
        items = [(0, B * H, i0, i1) for i0, i1 in zip(cuts, cuts[1:], strict=False) if i1 > i0]
    else:
        items = [(0, B * H, i0, i1) for i0, i1 in _split(T, threads, br)]
    fixed = [q.ctypes.data, k.ctypes.data, v.ctypes.data, out.ctypes.data, m.ctypes.data,
             meta.ctypes.data, _f32_bits(scale), _f32_bits(mask_value), int(bool(causal))]
    return library(kind, sched)["job"], fixed, items, threads, work_size, (q, k, v, m, meta)


def _q_rounding(br: int) -> int:
    """What the flash kernel rounds d up to so that its [d][br] Q block is a whole
    number of 64-byte lines (the workspace's parts after it stay aligned)."""
    return 16 // math.gcd(br, 16)


def _decode_plan(q, k, v, out, m, meta, kind, scale, mask_value, causal, threads, sched):
    """`_plan` for a decode step's few query rows: a (batch, head) per item (the rows of
    one head read its K and V, which then stay in cache), or a row per item when
    there are fewer heads than threads; threads once K and V reach 64 KiB."""
    B, H, T, _ = q.shape
    S, D, DV = k.shape[2], k.shape[3], v.shape[3]
    group = sched["group"]
    work_size = -(-D // (16 * group)) * 16 * group + -(-S // 16) * 16
    if B * H * T * S * (D + DV) < 1 << 14:
        threads = 1
    if threads == 1:
        items = [(0, B * H, 0, T)]
    elif B * H >= threads or T == 1:
        items = [(h, h + 1, 0, T) for h in range(B * H)]
    else:
        items = [(0, B * H, i, i + 1) for i in range(T)]
    fixed = [q.ctypes.data, k.ctypes.data, v.ctypes.data, out.ctypes.data, m.ctypes.data,
             meta.ctypes.data, _f32_bits(scale), _f32_bits(mask_value), int(bool(causal))]
    return (library(kind, sched)["decode_job"], fixed, items, threads, work_size,
            (q, k, v, m, meta))


def bind(q, k, v, mask=None, scale: float = 1.0, causal: bool = False,
         mask_value: float = -math.inf, threads: int | None = None, *, out: np.ndarray,
         schedule: dict | None = None):
    """A zero-argument function that computes attention(...) into `out`, for the
    runtime: checks, the argument block and the workspaces are made once, which leaves
    one native job per run (on the pool when threaded, else on this thread). Any
    `out` works (one the kernel cannot write to gets a copy of the result). When the
    kernel reads q, k, v and the mask where they are, the function has
    `patch(role, address)` ("q", "k", "v", "mask", "out"): that operand moves to memory
    of the same layout, without binding again. One caller at a time. `schedule`: as
    for `attention`."""
    if out.dtype != np.float32 or not out.flags.writeable or out.strides[-1] != 4 \
            or any(st < 0 or st % 4 for st in out.strides):
        def copied():
            out[...] = attention(q, k, v, mask, scale, causal, mask_value, threads,
                                 schedule=schedule)
        return copied

    def general():
        attention(q, k, v, mask, scale, causal, mask_value, threads, out, schedule)
    general()   # checks the arguments (out's contents do not matter yet)
    q, k, v = (np.asarray(x) for x in (q, k, v))
    if any(np.may_share_memory(out, x) for x in (q, k, v)) or out.size == 0 \
            or k.shape[2] == 0:
        return general
    job, fixed, items, threads, work_size, keep = _plan(q, k, v, mask, scale, causal,
                                                        mask_value, threads, out, schedule)
    copied = [not np.may_share_memory(x, y) for x, y in zip(keep, (q, k, v, mask), strict=False)
              if y is not None]
    if any(copied):   # a copy would go stale
        return general
    return bound_job(job, fixed, items, threads, work_size, keep,
                     {"q": 0, "k": 1, "v": 2, "out": 3, "mask": 4 if mask is not None else None})
