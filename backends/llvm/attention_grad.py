"""Flash attention's backward for the LLVM CPU backend (float32): the
`attention_grad` op, (dq, dk, dv) of attention(q, k, v) given dO, the output's gradient,
without the [t, s] weights in memory.

    q [b, h, t, d], k [bk, hk, s, d], v [bk, hk, s, dv], dO [b, h, t, dv]

(bk is b or 1, hk divides h: see `attention.py`). The op's inputs hold no forward
output, so per block of BR = 8 query rows the kernel makes two passes over the key
tiles of BC = 32 keys (K^T and V^T packed once per key/value head into panels, the
forward's layout); the first computes the scores S = scale Q K^T and dP = dO V^T
and keeps the block's rows of both (2 x 8 x s floats) for the second:

    pass 1 (the row statistics, an online softmax):
        m' = max(m, rowmax S);  c = exp(m - m');  P~ = exp(S - m')
        l = l c + rowsum P~;    a = a c + rowsum(P~ * dP)
        so that at the end P = P~ / l and D = rowsum(P * dP) = a / l
    pass 2:
        P = exp(S - m) / l;     dS = scale * P * (dP - D)
        dV[tile] += P^T dO;  dK[tile] += dS^T Q;  dQ += dS K[tile]

One work item is one (batch, head) of k and v: it owns dK and dV of that head and walks
every query head of its group (and every batch, when k and v are broadcast over the
batch), so the sums over shared heads need no atomics. With fewer such heads than
threads, each one's query heads are split in parts, each part summing into dK and dV
buffers of its own, added up after the kernel. Causal key tiles above the
diagonal are skipped when the masked value is -inf (they add nothing). Masks are the
forward's (one module per kind: none, "add" a float bias, "keep" a bool): a score
replaced by the fill (causal, or a key a keep-mask drops) gets no gradient.
"""

from __future__ import annotations

import math
import threading
from ctypes import c_float, c_int64, c_void_p

import numpy as np
from llvmlite import ir

from tensorc.errors import ShapeError, TensorcError

from . import pool
from .attention import (
    I8,
    V16I8,
    _mload_i8,
    _splat_i1,
    vector_helpers,
)
from .attention_operands import _unit_last, kernel_mask
from .gemm import aligned_empty, num_threads
from .gemm_ir import _pack_bt
from .irbuild import F32, I32, I64, PTR, V16, VI32, FnBuilder, c64, job, vconst
from .jit import cfunc, compile_library

BR, BC = 8, 32
MASKS = ("none", "add", "keep")
META = ("h", "t", "s", "d", "dv", "group", "hk", "nb", "parts", "per", "dk_p", "dv_p",
        "m_b", "m_h", "m_t",
        "q_b", "q_h", "q_t", "k_b", "k_h", "k_t", "v_b", "v_h", "v_t", "y_b", "y_h", "y_t",
        "dq_b", "dq_h", "dq_t", "dk_b", "dk_h", "dk_t", "dv_b", "dv_h", "dv_t")
NEG_INF = float("-inf")
ARGS = [("q", PTR), ("k", PTR), ("v", PTR), ("dy", PTR), ("dq", PTR), ("dk", PTR),
        ("dv", PTR), ("mask", PTR), ("meta", PTR), ("scale", F32), ("mask_value", F32),
        ("causal", I64)]


def _even(n: int) -> int:
    return -(-n // 2) * 2


def work_floats(s: int, d: int, dv: int) -> int:
    """The workspace a thread needs (see `_kernel`), each part 16-float aligned."""
    tiles = -(-s // BC)
    return tiles * BC * (d + dv) + (_even(d) + _even(dv)) * BR + 2 * BR * BC \
        + BR * -(-d // 16) * 16 + 2 * BR * tiles * BC


def _kernel(module: ir.Module, kind: str) -> ir.Function:
    """tc_attention_grad_<kind>: key/value items [i0, i1) (item = batch * hk + head of
    k); the mask (kind "add": float, added; "keep": bool, False fills) as in the
    forward kernel, its key axis contiguous."""
    f = FnBuilder(module, f"tc_attention_grad_{kind}",
                  ARGS + [("i0", I64), ("i1", I64), ("work", PTR)])
    b, g = f.b, f.arg
    m = {n: b.load(f.at(g["meta"], c64(i), ty=I64), typ=I64) for i, n in enumerate(META)}
    t, s, d, dv = m["t"], m["s"], m["d"], m["dv"]

    def up(x, n):
        return f.mul(b.sdiv(b.add(x, c64(n - 1)), c64(n)), n)
    tiles = b.sdiv(b.add(s, c64(BC - 1)), c64(BC))
    cd, cv = b.sdiv(b.add(d, c64(15)), c64(16)), b.sdiv(b.add(dv, c64(15)), c64(16))
    kt = g["work"]                                       # K^T panels [tiles][d][BC]
    vt = f.at(kt, f.mul(f.mul(tiles, BC), d))            # V^T panels [tiles][dv][BC]
    qp = f.at(vt, f.mul(f.mul(tiles, BC), dv))           # scaled Q block^T [d][BR]
    yp = f.at(qp, f.mul(up(d, 2), BR))                   # dO block^T [dv][BR]
    sb = f.at(yp, f.mul(up(dv, 2), BR))                  # P tile [BR][BC]
    pb = f.at(sb, c64(BR * BC))                          # dS tile [BR][BC]
    dqa = f.at(pb, c64(BR * BC))                         # dQ accumulators [BR][cd][16]
    sall = f.at(dqa, f.mul(f.mul(cd, 16), BR))           # the block's S [BR][tiles * BC]
    dall = f.at(sall, f.mul(f.mul(tiles, BC), BR))       # and its dP, the same
    scale, mv = g["scale"], g["mask_value"]
    mv_vec = f.splat(mv)
    causal = b.icmp_signed("!=", g["causal"], c64(0))
    causal_v = _splat_i1(b, causal)
    skip_tiles = b.and_(causal, b.fcmp_ordered("==", mv, ir.Constant(F32, NEG_INF)))
    iota = ir.Constant(VI32, list(range(16)))
    pack_bt = module.get_global("tc_pack_bt")
    zero = vconst(0.0)

    splat_i32, vmax, reduce_max, reduce_sum = vector_helpers(f)

    def lanes(n, c):   # lanes of 16-lane chunk c below n
        return f.lanes_below(b.sub(n, f.mul(c, 16)))

    def tile(src, panels, depth, j0):
        """[BR][2] vectors: rows of src^T ([depth][BR]) times the key tile's panel."""
        acc = [[f.var(V16, zero) for _ in range(2)] for _ in range(BR)]
        ptile = f.at(panels, f.mul(f.mul(b.sdiv(j0, c64(BC)), depth), BC))
        with f.loop(0, depth) as kk:
            kv = [f.vload(f.at(ptile, f.mul(kk, BC), c64(16 * u)), 64) for u in range(2)]
            for r in range(BR):
                x = f.splat(b.load(f.at(src, f.mul(kk, BR), c64(r)), typ=F32))
                for u in range(2):
                    b.store(f.fma(x, kv[u], b.load(acc[r][u], typ=V16)), acc[r][u])
        return [[b.load(acc[r][u], typ=V16) for u in range(2)] for r in range(BR)]

    def scores(j0, row, computed, mh):
        """S and dP of the tile, masked: (S with -inf past s and the causal fill, dP with
        0 past s, whether each score is a constant fill) per row and half. Computed (and
        kept in the block's rows of S and dP), or else read back from there."""
        if computed:
            st, dpt = tile(qp, kt, d, j0), tile(yp, vt, dv, j0)
        valid = [f.lanes_below(b.sub(s, b.add(j0, c64(16 * u)))) for u in range(2)]
        cols = [b.add(splat_i32(b.add(j0, c64(16 * u))), iota) for u in range(2)]
        out = []
        for r in range(BR):
            per = []
            for u in range(2):
                at = (f.mul(f.mul(tiles, BC), r), j0, c64(16 * u))
                keep = [f.at(sall, *at), f.at(dall, *at)]
                filled = b.and_(b.icmp_signed(">", cols[u], splat_i32(row[r])), causal_v)
                mp = f.at(mh, f.mul(row[r], m["m_t"]), j0, c64(16 * u),
                          ty=I8 if kind == "keep" else F32)
                if kind == "keep":   # a dropped key's score is the fill: no gradient
                    kept = b.icmp_unsigned("!=", _mload_i8(f, mp, valid[u]),
                                           ir.Constant(V16I8, [0] * 16))
                    filled = b.or_(filled, b.not_(kept))
                if computed:
                    x = b.select(filled, mv_vec, st[r][u])
                    if kind == "add":
                        x = b.fadd(x, f.mload(mp, valid[u]))
                    x = b.select(valid[u], x, vconst(NEG_INF))
                    dp = b.select(valid[u], dpt[r][u], zero)
                    f.vstore(x, keep[0], 64)
                    f.vstore(dp, keep[1], 64)
                else:
                    x, dp = f.vload(keep[0], 64), f.vload(keep[1], 64)
                per.append((x, dp, b.or_(filled, b.not_(valid[u]))))
            out.append(per)
        return out

    def row_blocks(qh, yh, dqh, kh, dkh, dvh, mh):
        """The query row blocks of one (batch, query head): both passes, the stores."""
        with f.loop(0, t, BR) as i:
            rows = f.min(c64(BR), b.sub(t, i))
            # rows past the end repeat the last real row: their P and dS are zeroed below
            row = [b.add(i, f.min(c64(r), b.sub(rows, c64(1)))) for r in range(BR)]
            live = [b.icmp_signed("<", c64(r), rows) for r in range(BR)]
            with f.loop(0, d) as kk:
                for r in range(BR):
                    x = b.load(f.at(qh, f.mul(row[r], m["q_t"]), kk), typ=F32)
                    b.store(b.fmul(x, scale), f.at(qp, f.mul(kk, BR), c64(r)))
            with f.loop(0, dv) as kk:
                for r in range(BR):
                    x = b.load(f.at(yh, f.mul(row[r], m["y_t"]), kk), typ=F32)
                    b.store(x, f.at(yp, f.mul(kk, BR), c64(r)))
            last_row = b.add(i, b.sub(rows, c64(1)))
            jend = b.select(skip_tiles, f.min(s, b.add(last_row, c64(1))), s)

            # pass 1: running max, sum of exp and sum of exp * dP per row
            m_run = [f.var(F32, ir.Constant(F32, NEG_INF)) for _ in range(BR)]
            l_run = [f.var(V16, zero) for _ in range(BR)]
            a_run = [f.var(V16, zero) for _ in range(BR)]
            with f.loop(0, jend, BC) as j0:
                tile = scores(j0, row, True, mh)
                bases, delta = [], zero
                for r in range(BR):
                    sv = [x for x, _, _ in tile[r]]
                    m_old = b.load(m_run[r], typ=F32)
                    m_new = b.call(f.intrinsic("llvm.maxnum.f32", F32, [F32, F32]),
                                   [m_old, reduce_max(vmax(*sv))])
                    base = b.select(b.fcmp_ordered("==", m_new, ir.Constant(F32, NEG_INF)),
                                    ir.Constant(F32, 0.0), m_new)
                    b.store(m_new, m_run[r])
                    delta = b.insert_element(delta, b.fsub(m_old, base), ir.Constant(I32, r))
                    bases.append(base)
                corr = f.exp(delta)
                for r in range(BR):
                    cr = f.splat(b.extract_element(corr, ir.Constant(I32, r)))
                    p = [f.exp(b.fsub(x, f.splat(bases[r]))) for x, _, _ in tile[r]]
                    pdp = b.fadd(b.fmul(p[0], tile[r][0][1]), b.fmul(p[1], tile[r][1][1]))
                    b.store(b.fadd(b.fmul(b.load(l_run[r], typ=V16), cr), b.fadd(p[0], p[1])),
                            l_run[r])
                    b.store(b.fadd(b.fmul(b.load(a_run[r], typ=V16), cr), pdp), a_run[r])
            base, inv_l, dsum = [], [], []
            for r in range(BR):
                mr = b.load(m_run[r], typ=F32)
                base.append(f.splat(b.select(b.fcmp_ordered("==", mr, ir.Constant(F32, NEG_INF)),
                                             ir.Constant(F32, 0.0), mr)))
                il = b.fdiv(ir.Constant(F32, 1.0), reduce_sum(b.load(l_run[r], typ=V16)))
                inv_l.append(f.splat(il))
                dsum.append(f.splat(b.fmul(reduce_sum(b.load(a_run[r], typ=V16)), il)))

            # pass 2: P and dS per tile, then dV, dK and dQ
            with f.loop(0, b.mul(cd, c64(BR))) as c:
                f.vstore(zero, f.at(dqa, f.mul(c, 16)), 64)
            with f.loop(0, jend, BC) as j0:
                tile = scores(j0, row, False, mh)
                for r in range(BR):
                    for u in range(2):
                        x, dp, filled = tile[r][u]
                        p = b.fmul(f.exp(b.fsub(x, base[r])), inv_l[r])
                        ds = b.fmul(b.fmul(p, b.fsub(dp, dsum[r])), f.splat(scale))
                        ds = b.select(filled, zero, ds)   # a filled score does not depend on q, k
                        p = b.select(live[r], p, zero)
                        ds = b.select(live[r], ds, zero)
                        f.vstore(p, f.at(sb, c64(r * BC + 16 * u)), 64)
                        f.vstore(ds, f.at(pb, c64(r * BC + 16 * u)), 64)
                jn = f.min(c64(BC), b.sub(s, j0))

                def rank8(weights, src, src_t, dst, dst_t, n, chunks):
                    """dst[j0 + j] += sum_r weights[r][j] * src[row r] for j < jn."""
                    with f.loop(0, chunks) as c:
                        ok = lanes(n, c)
                        xs = [f.mload(f.at(src, f.mul(row[r], src_t), f.mul(c, 16)), ok)
                              for r in range(BR)]
                        with f.loop(0, jn) as j:
                            ptr = f.at(dst, f.mul(b.add(j0, j), dst_t), f.mul(c, 16))
                            acc = f.mload(ptr, ok)
                            for r in range(BR):
                                w = f.splat(b.load(f.at(weights, c64(r * BC), j), typ=F32))
                                acc = f.fma(w, xs[r], acc)
                            f.mstore(acc, ptr, ok)
                rank8(sb, yh, m["y_t"], dvh, m["dv_t"], dv, cv)     # dV += P^T dO
                rank8(pb, qh, m["q_t"], dkh, m["dk_t"], d, cd)      # dK += dS^T Q
                with f.loop(0, cd) as c:                             # dQ += dS K
                    ok = lanes(d, c)
                    optr = [f.at(dqa, f.mul(b.add(f.mul(c64(r), cd), c), 16)) for r in range(BR)]
                    o = [f.var(V16, f.vload(optr[r], 64)) for r in range(BR)]
                    with f.loop(0, jn) as j:
                        kv = f.mload(f.at(kh, f.mul(b.add(j0, j), m["k_t"]), f.mul(c, 16)), ok)
                        for r in range(BR):
                            w = f.splat(b.load(f.at(pb, c64(r * BC), j), typ=F32))
                            b.store(f.fma(w, kv, b.load(o[r], typ=V16)), o[r])
                    for r in range(BR):
                        f.vstore(b.load(o[r], typ=V16), optr[r], 64)
            for r in range(BR):
                with b.if_then(live[r], likely=True):
                    with f.loop(0, cd) as c:
                        src = f.at(dqa, f.mul(b.add(f.mul(c64(r), cd), c), 16))
                        f.mstore(f.vload(src, 64), f.at(dqh, f.mul(row[r], m["dq_t"]),
                                                        f.mul(c, 16)), lanes(d, c))

    with f.loop(g["i0"], g["i1"]) as item:
        part, kvi = b.srem(item, m["parts"]), b.sdiv(item, m["parts"])
        bki, hki = b.sdiv(kvi, m["hk"]), b.srem(kvi, m["hk"])
        kh = f.at(g["k"], f.mul(bki, m["k_b"]), f.mul(hki, m["k_h"]))
        vh = f.at(g["v"], f.mul(bki, m["v_b"]), f.mul(hki, m["v_h"]))
        dkh = f.at(g["dk"], f.mul(part, m["dk_p"]), f.mul(bki, m["dk_b"]),
                   f.mul(hki, m["dk_h"]))
        dvh = f.at(g["dv"], f.mul(part, m["dv_p"]), f.mul(bki, m["dv_b"]),
                   f.mul(hki, m["dv_h"]))
        b.call(pack_bt, [kh, m["k_t"], d, s, kt, c64(0), tiles])
        b.call(pack_bt, [vh, m["v_t"], dv, s, vt, c64(0), tiles])
        with f.loop(0, s) as j:   # dK, dV of this head start at 0
            with f.loop(0, cd) as c:
                f.mstore(zero, f.at(dkh, f.mul(j, m["dk_t"]), f.mul(c, 16)), lanes(d, c))
            with f.loop(0, cv) as c:
                f.mstore(zero, f.at(dvh, f.mul(j, m["dv_t"]), f.mul(c, 16)), lanes(dv, c))

        # the query heads reading this head (of every batch when k is broadcast), nb x
        # group of them: this part's share
        first = f.mul(part, m["per"])
        last = f.min(b.add(first, m["per"]), f.mul(m["nb"], m["group"]))
        with f.loop(first, last) as served:
            bb, gi = b.sdiv(served, m["group"]), b.srem(served, m["group"])
            bi = b.select(b.icmp_signed("==", m["nb"], c64(1)), bki, bb)
            hi = b.add(f.mul(hki, m["group"]), gi)
            qh = f.at(g["q"], f.mul(bi, m["q_b"]), f.mul(hi, m["q_h"]))
            yh = f.at(g["dy"], f.mul(bi, m["y_b"]), f.mul(hi, m["y_h"]))
            dqh = f.at(g["dq"], f.mul(bi, m["dq_b"]), f.mul(hi, m["dq_h"]))
            mh = f.at(g["mask"], f.mul(bi, m["m_b"]), f.mul(hi, m["m_h"]),
                      ty=I8 if kind == "keep" else F32)
            row_blocks(qh, yh, dqh, kh, dkh, dvh, mh)
    return f.finish()


def build_module(kind: str) -> ir.Module:
    module = ir.Module(name=f"tensorc_attention_grad_{kind}")
    _pack_bt(module)
    job(module, f"tc_attention_grad_job_{kind}", _kernel(module, kind),
        [PTR] * 9 + [F32, F32, I64], 2, work="last")
    return module


_lock = threading.Lock()
_lib: dict = {}


def ahead(kind: str) -> tuple:
    """The `jit.compile_ahead` job of a mask kind's module."""
    return (f"attention_grad/{kind}", lambda: build_module(kind), True, False)


def kernels(kind: str) -> dict:
    """The mask kind's "kernel" (ctypes) and "job" (the pool's entry), each kind its own
    module, compiled on first use."""
    if kind not in MASKS:
        raise KeyError(kind)
    with _lock:
        if kind not in _lib:
            names = [f"tc_attention_grad_{kind}", f"tc_attention_grad_job_{kind}"]
            name, build, vectorize, unroll = ahead(kind)
            addrs = compile_library(name, build, names, vectorize, unroll)
            _lib[kind] = {"kernel": cfunc(addrs[names[0]], None, [c_void_p] * 9 + [
                c_float, c_float] + [c_int64] * 3 + [c_void_p]), "job": addrs[names[1]]}
    return _lib[kind]


def _estrides(x: np.ndarray) -> list[int]:
    return [st // x.itemsize for st in x.strides[:3]]


def _check(q, k, v, dy):
    arrays = [np.asarray(x) for x in (q, k, v, dy)]
    if any(x.dtype != np.float32 for x in arrays):
        raise TensorcError("attention_grad: q, k, v, dy must be float32")
    q, k, v, dy = arrays
    if not q.ndim == k.ndim == v.ndim == dy.ndim == 4:
        raise ShapeError("attention_grad expects 4-d q, k, v and dy")
    B, H, T, D = q.shape
    DV = v.shape[3]
    if k.shape[3] != D or v.shape[:3] != k.shape[:3] or k.shape[0] not in (1, B) \
            or k.shape[1] == 0 or H % k.shape[1] or dy.shape != (B, H, T, DV):
        raise ShapeError(f"attention_grad: k {k.shape}, v {v.shape}, dy {dy.shape} do not "
                         f"fit q {q.shape}")
    return q, k, v, dy


def _writable(x: np.ndarray, shape) -> bool:
    return x.dtype == np.float32 and x.shape == shape and x.flags.writeable \
        and x.strides[-1] == 4 and all(st >= 0 and st % 4 == 0 for st in x.strides)


def attention_grad(q, k, v, dy, mask=None, scale: float = 1.0, causal: bool = False,
                   mask_value: float = -math.inf, threads: int | None = None, out=None):
    """(dq, dk, dv) of attention(q, k, v, mask) given dy; `out`: three float32 arrays
    to write them into."""
    return bind(q, k, v, dy, mask, scale, causal, mask_value, threads, out=out)()


def bind(q, k, v, dy, mask=None, scale: float = 1.0, causal: bool = False,
         mask_value: float = -math.inf, threads: int | None = None, *, out=None):
    """A zero-argument function computing (dq, dk, dv) into `out` (made if None) and
    returning them: checks, argument block and workspaces made once."""
    q, k, v, dy = _check(q, k, v, dy)
    B, H, T, D = q.shape
    BK, HK, S, DV = k.shape[0], k.shape[1], k.shape[2], v.shape[3]
    shapes = [(B, H, T, D), (BK, HK, S, D), (BK, HK, S, DV)]
    out = [np.empty(sh, np.float32) for sh in shapes] if out is None else list(out)
    targets = [o if _writable(o, sh) and not any(np.may_share_memory(o, x)
                                                  for x in (q, k, v, dy))
               else np.empty(sh, np.float32) for o, sh in zip(out, shapes, strict=True)]
    copies = [(o, tg) for o, tg in zip(out, targets, strict=True) if o is not tg]
    if min(B * H * T, S) == 0 or D == 0 and DV == 0:
        def empty():   # no weights (or no query rows): every gradient is 0
            for o in out:
                o[...] = 0
            return tuple(out)
        return empty
    given = (q, k, v, dy)
    q, k, v, dy = (_unit_last(x) for x in given)
    if any(x is not y for x, y in zip((q, k, v, dy), given, strict=True)):
        def general():   # an operand the kernel cannot read in place: copied every call
            return bind(*(_unit_last(x) for x in given), mask, scale, causal, mask_value,
                        threads, out=out)()
        return general
    dq, dk, dv = targets
    kind, m = ("none", dq) if mask is None else kernel_mask(mask, (B, H, T, S), "attention_grad")
    if mask is not None and not np.may_share_memory(m, mask):
        def fresh():   # the mask was copied to be readable: again on every call
            readable = kernel_mask(mask, (B, H, T, S), "attention_grad")[1]
            return bind(q, k, v, dy, readable, scale, causal, mask_value, threads, out=out)()
        return fresh
    m = m.view(np.uint8) if kind == "keep" else m
    nb = B if BK == 1 and B > 1 else 1
    threads = num_threads() if threads is None else max(1, int(threads))
    if B * H * T * S * (D + DV) < 1 << 20:
        threads = 1
    # Fewer key/value heads than threads: each head's query heads are split in `parts`,
    # each part summing its dK, dV into a buffer of its own, added up after.
    served = nb * (H // HK)
    parts = min(served, -(-threads // (BK * HK)))
    per = -(-served // parts)
    parts = -(-served // per)
    if parts > 1:
        dk = np.empty((parts,) + shapes[1], np.float32)
        dv = np.empty((parts,) + shapes[2], np.float32)
    part_strides = [x.strides[0] // 4 if parts > 1 else 0 for x in (dk, dv)]
    dk1, dv1 = (x[0] if parts > 1 else x for x in (dk, dv))
    meta = np.array([H, T, S, D, DV, H // HK, HK, nb, parts, per, *part_strides,
                     *_estrides(m), *_estrides(q), *_estrides(k), *_estrides(v),
                     *_estrides(dy), *_estrides(dq), *_estrides(dk1), *_estrides(dv1)],
                    np.int64)
    items = BK * HK * parts
    threads = min(threads, items)
    ranges = [(i, i + 1) for i in range(items)] if threads > 1 else [(0, items)]
    workers = pool.get(threads) if threads > 1 else None
    works = [aligned_empty(work_floats(S, D, DV))
             for _ in range(workers.threads if workers else 1)]
    fixed = [x.ctypes.data for x in (q, k, v, dy, dq, dk, dv, m, meta)] + [
        _f32_bits(scale), _f32_bits(mask_value), int(bool(causal))]
    block = np.array([*fixed, len(works), *[w.ctypes.data for w in works],
                      *[x for r in ranges for x in r]], np.int64)
    launch = pool.launcher(kernels(kind)["job"], block.ctypes.data, len(ranges), threads)
    keep = (q, k, v, dy, m, targets, dk, dv, meta, works, block)

    def run():
        launch()
        if parts > 1:
            np.sum(dk, axis=0, out=targets[1])
            np.sum(dv, axis=0, out=targets[2])
        for o, tg in copies:
            o[...] = tg
        return tuple(out)
    run.keep = keep
    return run


def _f32_bits(x: float) -> int:
    return int(np.array(x, np.float32).view(np.int32))
