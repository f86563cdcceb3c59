"""Performer (FAVOR+) linear attention for the LLVM CPU backend (float32), with the
`linear_attention` op's meaning (`tensorc/ops/sparse_attention.py`):

    phi(x) = exp(w x' - |x'|^2 / 2), x' = sqrt(scale) x, for the m rows w of `features`
    out_i = phi(q_i) . sum_j phi(k_j) v_j^T  /  phi(q_i) . sum_j phi(k_j)

over all keys, or j <= i when causal; each query row's features divided by their
largest, the keys' of one (batch, head) by their largest over (s, m) (a first pass
over the key logits finds it). The key mask multiplies phi(k_j) by keep (bool) or
exp(mask_j) (float).

Time and memory are linear in the sequence: per (batch, head), chunks of C key rows
build the state KV = phi(K)^T V [m, dv] and z = sum_j phi(k_j) [m]; then chunks of query
rows take out = phi(Qc) KV over phi(Qc) z. Causal walks chunks of CC rows once:

    num = phi(Qc) KV + tril(phi(Qc) phi(Kc)^T) Vc,  den = phi(Qc) z + its row sums;
    then KV += phi(Kc)^T Vc, z += colsum phi(Kc)

All products are one register-blocked routine (`tc_la_mm`: 8 rows x 32 columns in 16
zmm accumulators, scalar broadcasts from the left operand, any strides). The workspace
per thread is O(C m + m dv + m d): never O(t s). Query heads of a grouped-query
attention read their key/value head in place and, unless the mask varies by head, share
its key state (built once for the run of heads a thread takes). Threads take those runs
(cut smaller while fewer than threads), or, with one head, ranges of query rows (each
builds the key state it needs itself).
"""

from __future__ import annotations

import threading
from ctypes import c_float, c_int64, c_void_p

import numpy as np
from llvmlite import ir

from tensorc.errors import ShapeError, TensorcError

from .attention import (
    I8,
    _mload_i8,
    vector_helpers,
)
from .attention_operands import _estrides, _f32_bits, _unit_last, bound_job, kernel_mask
from .gemm import _split, num_threads, run_jobs
from .irbuild import F32, I64, PTR, V16, VI32, FnBuilder, c64, job, vconst
from .jit import cfunc, compile_library

C = 64          # rows of keys / queries per chunk (a multiple of the 8-row block)
CC = 32         # causal chunks: the tril product costs CC m per row (~8% faster than 64)
MR, NR = 8, 32  # tc_la_mm's register block
META = ("heads", "t", "s", "d", "dv", "m", "q_b", "q_h", "q_t", "k_b", "k_h", "k_t",
        "v_b", "v_h", "v_t", "o_b", "o_h", "o_t", "m_b", "m_h", "group", "w_r", "w_c",
        "share")
KINDS = {"none": 0, "keep": 1, "add": 2}
NEG_INF = float("-inf")


def _up(x: int, n: int) -> int:
    return -(-x // n) * n


def workspace_floats(d: int, dv: int, m: int) -> int:
    """Floats of one thread's workspace (see `_kernel`'s layout)."""
    mp, dvp = _up(m, NR), _up(dv + 1, 16)
    return d * mp + 3 * C * mp + mp * dvp + mp + C * C + C * dvp + 2 * C + 16


def _mm(module: ir.Module) -> ir.Function:
    """tc_la_mm(L, lsi, lsk, R, rs, O, os, M, N, K, acc): for rows i < M (rounded up to
    8: O must have those rows) O[i*os + :N] = (acc ? O[i*os + :N] : 0)
    + sum_{k<K} L[i*lsi + k*lsk] R[k*rs + :N]. Rows past M read row M - 1."""
    f = FnBuilder(module, "tc_la_mm", [
        ("L", PTR), ("lsi", I64), ("lsk", I64), ("R", PTR), ("rs", I64), ("O", PTR),
        ("os", I64), ("M", I64), ("N", I64), ("K", I64), ("acc", I64)], internal=True)
    b, g = f.b, f.arg
    accum = b.icmp_signed("!=", g["acc"], c64(0))
    last = b.sub(g["M"], c64(1))
    with f.loop(0, g["M"], MR) as i0:
        lrow = [f.at(g["L"], f.mul(f.min(b.add(i0, c64(r)), last), g["lsi"])) for r in range(MR)]
        orow = [f.at(g["O"], f.mul(b.add(i0, c64(r)), g["os"])) for r in range(MR)]
        with f.loop(0, g["N"], NR) as c0:
            masks = [f.lanes_below(b.sub(g["N"], b.add(c0, c64(16 * u)))) for u in range(2)]
            optr = [[f.at(orow[r], c0, c64(16 * u)) for u in range(2)] for r in range(MR)]
            acc = [[f.var(V16, b.select(accum, f.mload(optr[r][u], masks[u]), vconst(0.0)))
                    for u in range(2)] for r in range(MR)]
            with f.loop(0, g["K"]) as k:
                rp = f.at(g["R"], f.mul(k, g["rs"]), c0)
                rv = [f.mload(rp, masks[0]), f.mload(f.at(rp, c64(16)), masks[1])]
                lk = f.mul(k, g["lsk"])
                for r in range(MR):
                    x = f.splat(b.load(f.at(lrow[r], lk), typ=F32))
                    for u in range(2):
                        b.store(f.fma(x, rv[u], b.load(acc[r][u], typ=V16)), acc[r][u])
            for r in range(MR):
                for u in range(2):
                    f.mstore(b.load(acc[r][u], typ=V16), optr[r][u], masks[u])
    return f.finish()


def _logits(module: ir.Module, mm: ir.Function) -> ir.Function:
    """tc_la_logits(X, xs, rows, wt, d, mp, m, hs, nrm, L): L[r, :mp] = X_r . wt -
    hs |X_r|^2 for r < rows (wt = sqrt(scale) W^T [d, mp], hs = scale / 2), columns
    from m on -inf (so that they never win a max and their exp is 0)."""
    f = FnBuilder(module, "tc_la_logits", [
        ("X", PTR), ("xs", I64), ("rows", I64), ("wt", PTR), ("d", I64), ("mp", I64),
        ("m", I64), ("hs", F32), ("nrm", PTR), ("L", PTR)], internal=True)
    b, g = f.b, f.arg
    reduce_sum = vector_helpers(f)[3]
    with f.loop(0, g["rows"]) as r:
        xr = f.at(g["X"], f.mul(r, g["xs"]))
        acc = f.var(V16, vconst(0.0))
        with f.loop(0, g["d"], 16) as c:
            x = f.mload(f.at(xr, c), f.lanes_below(b.sub(g["d"], c)))
            b.store(f.fma(x, x, b.load(acc, typ=V16)), acc)
        b.store(b.fmul(reduce_sum(b.load(acc, typ=V16)), g["hs"]), f.at(g["nrm"], r))
    b.call(mm, [g["X"], g["xs"], c64(1), g["wt"], g["mp"], g["L"], g["mp"], g["rows"],
                g["mp"], g["d"], c64(0)])
    iota = ir.Constant(VI32, list(range(16)))
    splat_i32 = vector_helpers(f)[0]
    m32 = splat_i32(g["m"])
    with f.loop(0, g["rows"]) as r:
        n = f.splat(b.load(f.at(g["nrm"], r), typ=F32))
        with f.loop(0, g["mp"], 16) as c:
            p = f.at(g["L"], f.mul(r, g["mp"]), c)
            x = b.fsub(f.vload(p, 64), n)
            real = b.icmp_signed("<", b.add(splat_i32(c), iota), m32)
            f.vstore(b.select(real, x, vconst(NEG_INF)), p, 64)
    return f.finish()


def _kernel(module: ir.Module) -> ir.Function:
    """tc_linear_attention: heads [h0, h1) (flat over batch and heads) x query rows
    [i0, i1) (i0 a multiple of CC when causal: the rows before it only build the state)."""
    mm = _mm(module)
    logits = _logits(module, mm)
    f = FnBuilder(module, "tc_linear_attention", [
        ("q", PTR), ("k", PTR), ("v", PTR), ("w", PTR), ("o", PTR), ("mask", PTR),
        ("meta", PTR), ("a", F32), ("hs", F32), ("causal", I64), ("kind", I64),
        ("h0", I64), ("h1", I64), ("i0", I64), ("i1", I64), ("work", PTR)])
    b, g = f.b, f.arg
    m = {n: b.load(f.at(g["meta"], c64(i), ty=I64), typ=I64) for i, n in enumerate(META)}
    s, d, dv, nf = m["s"], m["d"], m["dv"], m["m"]
    _, vmax, reduce_max, reduce_sum = vector_helpers(f)

    def up(x, n):
        return f.mul(b.sdiv(b.add(x, c64(n - 1)), c64(n)), n)
    mp, dvp = up(nf, NR), up(b.add(dv, c64(1)), 16)
    # workspace: every part a multiple of 16 floats, so each starts 64-byte aligned
    wt = g["work"]                            # sqrt(scale) W^T [d][mp]
    lq = f.at(wt, f.mul(d, mp))               # query logits -> phi(Q) chunk [C][mp]
    lk = f.at(lq, f.mul(mp, C))               # key logits -> phi(K) chunk [C][mp]
    pkt = f.at(lk, f.mul(mp, C))              # phi(K) chunk transposed [mp][C] (causal)
    kv = f.at(pkt, f.mul(mp, C))              # state KV [mp][dvp]
    zb = f.at(kv, f.mul(mp, dvp))             # state z [mp]
    am = f.at(zb, mp)                         # tril(phi(Qc) phi(Kc)^T) [C][C]
    nd = f.at(am, c64(C * C))                 # [num | den] rows [C][dvp]
    nrm = f.at(nd, f.mul(dvp, C))             # row norms [C]
    fac = f.at(nrm, c64(C))                   # key factors (mask) [C]
    mx = f.at(fac, c64(C))                    # the keys' max logit
    causal = b.icmp_signed("!=", g["causal"], c64(0))
    kind = g["kind"]
    neg_inf = ir.Constant(F32, NEG_INF)

    # W^T scaled by sqrt(scale), features padded to mp with zeros
    last_f = b.sub(nf, c64(1))
    with f.loop(0, d) as kk:
        with f.loop(0, mp) as r:
            x = b.load(f.at(g["w"], f.mul(f.min(r, last_f), m["w_r"]), f.mul(kk, m["w_c"])),
                       typ=F32)
            x = b.select(b.icmp_signed("<", r, nf), b.fmul(x, g["a"]), ir.Constant(F32, 0.0))
            b.store(x, f.at(wt, f.mul(kk, mp), r))

    vptr, vi64 = ir.VectorType(PTR, 16), ir.VectorType(I64, 16)

    def splat64(x):
        return b.shuffle_vector(b.insert_element(ir.Constant(vi64, ir.Undefined), x,
                                                 ir.Constant(ir.IntType(32), 0)),
                                ir.Constant(vi64, ir.Undefined), ir.Constant(VI32, [0] * 16))
    mp_bytes = b.mul(splat64(f.mul(mp, 4)), ir.Constant(vi64, list(range(16))))

    def gather(ptr, offsets, mask):
        """ptr + offsets[i] bytes, lane i, where mask (zero elsewhere)."""
        ptrs = b.inttoptr(b.add(splat64(b.ptrtoint(ptr, I64)), offsets), vptr)
        fn = f.intrinsic("llvm.masked.gather.v16f32.v16p0", V16,
                         [vptr, ir.IntType(32), ir.VectorType(ir.IntType(1), 16), V16])
        return b.call(fn, [ptrs, ir.Constant(ir.IntType(32), 4), mask, vconst(0.0)])

    def zero(ptr, n):
        with f.loop(0, n, 16) as c:
            f.vstore(vconst(0.0), f.at(ptr, c), 64)

    # Heads [h0, h1) in runs that share one key state: the query heads of one key/value
    # head (with `share`: the mask does not vary by head), else one head each.
    share = b.icmp_signed("!=", m["share"], c64(0))
    with f.loop(g["h0"], g["h1"]) as hh, \
            b.if_then(b.or_(b.or_(b.icmp_signed("==", hh, g["h0"]), b.xor(share, ir.Constant(
                ir.IntType(1), 1))), b.icmp_signed("==", b.srem(hh, m["group"]), c64(0)))):
        run_end = b.select(share, f.min(g["h1"], b.add(b.sub(hh, b.srem(hh, m["group"])),
                                                       m["group"])), b.add(hh, c64(1)))
        bi, hi = b.sdiv(hh, m["heads"]), b.srem(hh, m["heads"])
        hkv = b.sdiv(hi, m["group"])
        kh = f.at(g["k"], f.mul(bi, m["k_b"]), f.mul(hkv, m["k_h"]))
        vh = f.at(g["v"], f.mul(bi, m["v_b"]), f.mul(hkv, m["v_h"]))
        mh = f.at(g["mask"], f.mul(bi, m["m_b"]), f.mul(hi, m["m_h"]), ty=I8)   # bytes

        def query_head(hq):
            """q and out of query head hq (flat over batch and heads)."""
            bq, hqi = b.sdiv(hq, m["heads"]), b.srem(hq, m["heads"])
            return (f.at(g["q"], f.mul(bq, m["q_b"]), f.mul(hqi, m["q_h"])),
                    f.at(g["o"], f.mul(bq, m["o_b"]), f.mul(hqi, m["o_h"])))

        def key_logits(c0, nk):
            b.call(logits, [f.at(kh, f.mul(c0, m["k_t"])), m["k_t"], nk, wt, d, mp, nf,
                            g["hs"], nrm, lk])

        # pass 1: the largest key logit of this (batch, head)
        b.store(neg_inf, mx)
        with f.loop(0, s, C) as c0:
            nk = f.min(c64(C), b.sub(s, c0))
            key_logits(c0, nk)
            best = f.var(V16, vconst(NEG_INF))
            with f.loop(0, f.mul(nk, mp), 16) as c:
                b.store(vmax(f.vload(f.at(lk, c), 64), b.load(best, typ=V16)), best)
            old = b.load(mx, typ=F32)
            new = reduce_max(b.load(best, typ=V16))
            b.store(b.select(b.fcmp_ordered(">", new, old), new, old), mx)
        top = b.load(mx, typ=F32)
        base = f.splat(b.select(b.fcmp_ordered("==", top, neg_inf), ir.Constant(F32, 0.0), top))
        zero(kv, f.mul(mp, dvp))
        zero(zb, mp)

        def key_features(c0, nk):
            """lk rows < nk := phi(K) of keys c0.., times their mask factor."""
            key_logits(c0, nk)
            with f.loop(0, nk, 16) as j:   # the factors: 1, keep, exp(mask)
                ok = f.lanes_below(b.sub(nk, j))
                fp = f.at(fac, j)
                f.vstore(vconst(1.0), fp, 64)
                with b.if_then(b.icmp_signed("==", kind, c64(KINDS["keep"]))):
                    keep = b.icmp_unsigned("!=", _mload_i8(f, f.at(mh, c0, j, ty=I8), ok),
                                           ir.Constant(ir.VectorType(I8, 16), [0] * 16))
                    f.vstore(b.select(keep, vconst(1.0), vconst(0.0)), fp, 64)
                with b.if_then(b.icmp_signed("==", kind, c64(KINDS["add"]))):
                    x = f.mload(f.at(mh, f.mul(b.add(c0, j), 4), ty=I8), ok)
                    f.vstore(f.exp(x), fp, 64)
            with f.loop(0, nk) as j:
                fj = f.splat(b.load(f.at(fac, j), typ=F32))
                with f.loop(0, mp, 16) as c:
                    p = f.at(lk, f.mul(j, mp), c)
                    f.vstore(b.fmul(f.exp(b.fsub(f.vload(p, 64), base)), fj), p, 64)

        def add_keys(c0, nk):
            """KV += phi(Kc)^T Vc, z += colsum phi(Kc)."""
            b.call(mm, [lk, c64(1), mp, f.at(vh, f.mul(c0, m["v_t"])), m["v_t"], kv, dvp,
                        mp, dv, nk, c64(1)])
            with f.loop(0, nk) as j:
                with f.loop(0, mp, 16) as c:
                    zp = f.at(zb, c)
                    f.vstore(b.fadd(f.vload(zp, 64), f.vload(f.at(lk, f.mul(j, mp), c), 64)),
                             zp, 64)

        def query_chunk(qh, r0, nr):
            """lq rows < nr := phi(Q) of queries r0..; nd := [num | den] against the
            state: num in its columns < dv, den in column dv."""
            b.call(logits, [f.at(qh, f.mul(r0, m["q_t"])), m["q_t"], nr, wt, d, mp, nf,
                            g["hs"], nrm, lq])
            with f.loop(0, nr) as r:
                row = f.at(lq, f.mul(r, mp))
                best = f.var(V16, vconst(NEG_INF))
                with f.loop(0, mp, 16) as c:
                    b.store(vmax(f.vload(f.at(row, c), 64), b.load(best, typ=V16)), best)
                rmax = f.splat(reduce_max(b.load(best, typ=V16)))
                with f.loop(0, mp, 16) as c:
                    p = f.at(row, c)
                    f.vstore(f.exp(b.fsub(f.vload(p, 64), rmax)), p, 64)
            b.call(mm, [lq, mp, c64(1), kv, dvp, nd, dvp, nr, dv, mp, c64(0)])
            with f.loop(0, nr) as r:   # den: a dot product (a column more of the product
                row = f.at(lq, f.mul(r, mp))   # would cost a 32-column block)
                acc = f.var(V16, vconst(0.0))
                with f.loop(0, mp, 16) as c:
                    b.store(f.fma(f.vload(f.at(row, c), 64), f.vload(f.at(zb, c), 64),
                                  b.load(acc, typ=V16)), acc)
                b.store(reduce_sum(b.load(acc, typ=V16)), f.at(nd, f.mul(r, dvp), dv))

        def store_rows(oh, r0, nr):
            with f.loop(0, nr) as r:
                src = f.at(nd, f.mul(r, dvp))
                den = f.splat(b.load(f.at(src, dv), typ=F32))
                dst = f.at(oh, f.mul(b.add(r0, r), m["o_t"]))
                with f.loop(0, dv, 16) as c:
                    f.mstore(b.fdiv(f.vload(f.at(src, c), 64), den), f.at(dst, c),
                             f.lanes_below(b.sub(dv, c)))

        def intra_chunk(c0, nq, nk):
            """nd += tril(phi(Qc) phi(Kc)^T) [Vc | 1], top-left aligned in the chunk."""
            b.call(mm, [lq, mp, c64(1), pkt, c64(C), am, c64(C), nq, nk, mp, c64(0)])
            with f.loop(0, nq) as i:
                row = f.at(am, f.mul(i, C))
                tot = f.var(F32, ir.Constant(F32, 0.0))
                with f.loop(0, nk) as j:
                    p = f.at(row, j)
                    x = b.select(b.icmp_signed(">", j, i), ir.Constant(F32, 0.0),
                                 b.load(p, typ=F32))
                    b.store(x, p)
                    b.store(b.fadd(b.load(tot, typ=F32), x), tot)
                dp = f.at(nd, f.mul(i, dvp), dv)
                b.store(b.fadd(b.load(dp, typ=F32), b.load(tot, typ=F32)), dp)
            b.call(mm, [am, c64(C), c64(1), f.at(vh, f.mul(c0, m["v_t"])), m["v_t"], nd, dvp,
                        nq, dv, nk, c64(1)])

        with b.if_else(causal) as (then, otherwise):
            with then:
                with f.loop(0, g["i1"], CC) as c0:
                    nq = f.min(c64(CC), b.sub(g["i1"], c0))
                    nk = f.min(c64(CC), b.sub(s, c0))
                    has_keys = b.icmp_signed(">", nk, c64(0))
                    with b.if_then(has_keys):
                        key_features(c0, nk)
                    with b.if_then(b.icmp_signed(">=", c0, g["i0"])):
                        with b.if_then(has_keys):   # phi(Kc)^T, for the products below
                            with f.loop(0, mp) as r, f.loop(0, nk, 16) as j:
                                x = gather(f.at(lk, f.mul(j, mp), r), mp_bytes,
                                           f.lanes_below(b.sub(nk, j)))
                                f.vstore(x, f.at(pkt, f.mul(r, C), j), 64)
                        with f.loop(hh, run_end) as hq:
                            qh, oh = query_head(hq)
                            query_chunk(qh, c0, nq)
                            with b.if_then(has_keys):
                                intra_chunk(c0, nq, nk)
                            store_rows(oh, c0, nq)
                    with b.if_then(has_keys):
                        add_keys(c0, nk)
            with otherwise:
                with f.loop(0, s, C) as c0:
                    nk = f.min(c64(C), b.sub(s, c0))
                    key_features(c0, nk)
                    add_keys(c0, nk)
                with f.loop(hh, run_end) as hq:
                    qh, oh = query_head(hq)
                    with f.loop(g["i0"], g["i1"], C) as r0:
                        nr = f.min(c64(C), b.sub(g["i1"], r0))
                        query_chunk(qh, r0, nr)
                        store_rows(oh, r0, nr)
    return f.finish()


def build_module() -> ir.Module:
    module = ir.Module(name="tensorc_linear_attention")
    job(module, "tc_linear_attention_job", _kernel(module), [PTR] * 7 + [F32, F32, I64, I64],
        4, work="last")
    return module


_lock = threading.Lock()
_lib: dict = {}
_ARGS = [c_void_p] * 7 + [c_float, c_float] + [c_int64] * 6 + [c_void_p]


def ahead() -> tuple:
    """The `jit.compile_ahead` job of the module."""
    return ("linear_attention", build_module, False, False)


def kernels() -> dict:
    """"kernel" (ctypes) and "job" (the pool's entry point), compiled on first use
    (object code cached on disk). Hand-vectorised: built without LLVM's vectorisers
    and unroller, which would only cost compile time."""
    with _lock:
        if not _lib:
            names = ["tc_linear_attention", "tc_linear_attention_job"]
            addrs = compile_library(*ahead()[:2], names, False, False)
            _lib["kernel"] = cfunc(addrs[names[0]], None, _ARGS)
            _lib["job"] = addrs[names[1]]
    return _lib


def _check(q, k, v, features, out):
    arrays = [np.asarray(x) for x in (q, k, v, features)]
    if any(x.dtype != np.float32 for x in arrays):
        raise TensorcError("linear_attention: q, k, v, features must be float32, got "
                           + ", ".join(str(x.dtype) for x in arrays))
    q, k, v, w = arrays
    if not q.ndim == k.ndim == v.ndim == 4 or w.ndim != 2:
        raise ShapeError(f"linear_attention expects q [b,h,t,d], k [b,h,s,d], v [b,h,s,dv], "
                         f"features [m,d]: got {q.shape}, {k.shape}, {v.shape}, {w.shape}")
    B, H, T, D = q.shape
    if k.shape[3] != D or v.shape[:3] != k.shape[:3] or k.shape[0] not in (1, B) \
            or k.shape[1] == 0 or H % k.shape[1] or w.shape[1] != D or w.shape[0] == 0:
        raise ShapeError(f"linear_attention: k {k.shape}, v {v.shape}, features {w.shape} "
                         f"do not fit q {q.shape}")
    shape = (B, H, T, v.shape[3])
    if out is None:
        out = np.empty(shape, np.float32)
    elif out.shape != shape or out.dtype != np.float32 or not out.flags.writeable \
            or out.strides[-1] != 4 or any(st < 0 or st % 4 for st in out.strides):
        raise TensorcError(f"linear_attention: out must be a writeable float32 {shape} array "
                           f"with unit inner stride, got {out.dtype} {out.shape}")
    return q, k, v, w, out


def linear_attention(q, k, v, features, mask=None, scale: float = 1.0, causal: bool = False,
                     threads: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """FAVOR+ attention (the op's reference, natively): q [b,h,t,d], k [bk,hk,s,d],
    v [bk,hk,s,dv] (bk: b or 1; hk divides h), features [m, d], mask a key mask
    broadcasting to [b,h,1,s] (bool keeps, float32 adds to the scores). float32 only.
    `out`, if given, is a float32 [b,h,t,dv] array with unit inner stride."""
    q, k, v, w, out = _check(q, k, v, features, out)
    if any(np.may_share_memory(out, x) for x in (q, k, v, w)):
        out[...] = linear_attention(q, k, v, w, mask, scale, causal, threads)
        return out
    if out.size == 0:
        return out
    job, fixed, items, threads, work_size, _ = _plan(q, k, v, w, mask, scale, causal,
                                                     threads, out)
    run_jobs([(job, fixed, items, ("linear_attention", work_size))], threads)
    return out


def _plan(q, k, v, w, mask, scale, causal, threads, out):
    """The job, its fixed arguments, the items, the thread count, the workspace size
    (floats per thread) and the arrays that must stay alive while it runs."""
    B, H, T, D = q.shape
    S, DV, HK, M = k.shape[2], v.shape[3], k.shape[1], w.shape[0]
    q = _unit_last(q)
    if any(st < 0 or st % 4 for st in w.strides):   # any other layout is read in place
        w = np.ascontiguousarray(w)
    k = np.broadcast_to(_unit_last(k), (B, HK, S, D))
    v = np.broadcast_to(_unit_last(v), (B, HK, S, DV))
    kind, mk, mstrides = "none", out, [0, 0]   # `out` stands in for no mask; never read
    if mask is not None:
        kind, mk = kernel_mask(mask, (B, H, 1, S), "linear_attention")
        if kind == "keep":
            mk = mk.view(np.uint8)
        mstrides = list(mk.strides[:2])   # bytes: the kernel addresses the mask in bytes
    group = H // HK
    share = mstrides[1] == 0   # a key/value head's query heads share its key state
    meta = np.array([H, T, S, D, DV, M, *_estrides(q), *_estrides(k), *_estrides(v),
                     *_estrides(out), *mstrides, group, *(st // 4 for st in w.strides),
                     int(share)], np.int64)
    threads = num_threads() if threads is None else max(1, int(threads))
    if B * H * (T + S) * M * (D + DV) < 1 << 20:
        threads = 1
    # items: runs of heads sharing a key state, cut into more runs (each builds the
    # state again) while there are fewer than threads
    size = group if share else 1
    runs = [(h, h + size) for h in range(0, B * H, size)]
    if len(runs) < threads and size > 1:
        per = min(size, -(-threads // len(runs)))
        runs = [(h + size * p // per, h + size * (p + 1) // per) for h, _ in runs
                for p in range(per)]
    if threads == 1:
        items = [(0, B * H, 0, T)]
    elif len(runs) >= threads:   # threads claim them as they finish
        items = [(h0, h1, 0, T) for h0, h1 in runs]
    elif causal:
        # a range [i0, i1) costs ~ i0 (the state before it) + 2 (i1 - i0) (keys and
        # queries): equal costs put cut p at T (1 - 2^-p) / (1 - 2^-n)
        n = threads
        cuts = [min(T, _up(round(T * (1 - 2 ** -p) / (1 - 2 ** -n)), CC)) for p in range(n)]
        cuts = sorted(set(cuts + [T]))
        items = [(0, B * H, i0, i1) for i0, i1 in zip(cuts, cuts[1:], strict=False)]
    else:   # each range builds the whole key state itself
        items = [(0, B * H, i0, i1) for i0, i1 in _split(T, threads, C)]
    a = np.float32(np.sqrt(np.float32(scale)))
    fixed = [q.ctypes.data, k.ctypes.data, v.ctypes.data, w.ctypes.data, out.ctypes.data,
             mk.ctypes.data, meta.ctypes.data, _f32_bits(a), _f32_bits(0.5 * scale),
             int(bool(causal)), KINDS[kind]]
    return (kernels()["job"], fixed, items, threads, workspace_floats(D, DV, M),
            (q, k, v, w, mk, meta))


def bind(q, k, v, features, mask=None, scale: float = 1.0, causal: bool = False,
         threads: int | None = None, *, out: np.ndarray):
    """A zero-argument function computing linear_attention(...) into `out`, for the
    runtime (as `attention.bind`): checks, argument block and workspaces made once;
    `patch(role, address)` ("q", "k", "v", "features", "mask", "out") moves an operand
    read in place to other memory of the same layout. One caller at a time."""
    if out.dtype != np.float32 or not out.flags.writeable or out.strides[-1] != 4 \
            or any(st < 0 or st % 4 for st in out.strides):
        def copied():
            out[...] = linear_attention(q, k, v, features, mask, scale, causal, threads)
        return copied

    def general():
        linear_attention(q, k, v, features, mask, scale, causal, threads, out)
    general()   # checks the arguments (out's contents do not matter yet)
    q, k, v, features = (np.asarray(x) for x in (q, k, v, features))
    if any(np.may_share_memory(out, x) for x in (q, k, v, features)) or out.size == 0:
        return general
    job, fixed, items, threads, work_size, keep = _plan(q, k, v, features, mask, scale,
                                                        causal, threads, out)
    given = (q, k, v, features, mask)
    if any(y is not None and not np.may_share_memory(x, y)
           for x, y in zip(keep, given, strict=False)):   # a copy would go stale
        return general
    return bound_job(job, fixed, items, threads, work_size, keep,
                     {"q": 0, "k": 1, "v": 2, "features": 3, "out": 4,
                      "mask": 5 if mask is not None else None})
