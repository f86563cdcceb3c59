"""Sparse-weight float32 GEMM for the LLVM CPU backend: C = act(A @ W + bias) + residual
with a constant W [K, N] that is mostly zeros (`sparsify-weights`).

Layout (`SparseB`, packed once per weight): W's nonzeros in CSC form per block of K
rows, block kb's column j at [colptr[kb * npad + j], colptr[kb * npad + j + 1]): their
k (i32) and value (f32); columns padded to npad, a multiple of 16 (empty). Only the
nonzeros are read or multiplied, whatever the pattern (unstructured, block4x1 and 2:4
all pack this way). The block length (64 to 512) grows as density falls, so that a
column has ~12 nonzeros per block.

Per call A is first transposed into A^T [K][Mp] (Mp: M rounded up to 16; `tc_sp_pack`,
split over K), so that a nonzero w[k, j] is out[m0:m0 + 128, j] += w * A^T[k, m0:m0 + 128]:
up to 8 zmm accumulators over the rows, one FMA per 16 rows with its A^T operand read
from L1 (no reuse in registers is possible: columns have different k). Columns go
GROUP panels (of 16) at a time, K block by K block, so that a block of A^T (64 x 128
floats) stays in L1 while the group's columns read it; their sums wait in a
[columns][128] tile in the thread's workspace (L2) between blocks. Then the epilogue
reads it back 16 x 16 at a time (transposed in registers: rows of out) and adds bias,
the activation (gemm's maths, `FnBuilder.activation`) and residual as the dense GEMM
does. Threads (PRIVATE, while A^T is at most PRIVATE_MAX floats) each transpose all
of A into their own workspace, then multiply their share of the column panels
(`tc_sp_rows`): A^T never crosses cores (measured 5-15% faster than sharing one).
Else they split the transpose over K (`tc_sp_pack`), then claim ranges of column
panels (`tc_sp_gemm`); with ROW_SPLIT each transposes and multiplies its own rows
(`tc_sp_rows`: each reads all of W).

`pack_weight` picks per matrix: a `SparseB` when its density is at most
`DENSITY_MAX` (the crossover measured by `benchmarks/sparse_gemm.py`) and the
epilogue's activation is one the kernel has, else the dense `gemm.PackedB`.
"""

from __future__ import annotations

import threading

import numpy as np
from llvmlite import ir

from tensorc.errors import ShapeError, TensorcError

from . import pool
from .gemm import _activation_name, _split, _workspaces, aligned_empty, prepare_steps, run_steps
from .gemm_ir import ACTIVATIONS, ITEMS_PER_THREAD
from .irbuild import F32, I32, I64, PTR, V16, VI32, FnBuilder, c64, job, vconst
from .jit import compile_library
from .pool import num_threads

PANEL = 16          # columns per panel (one epilogue vector)
MB = 128            # rows per register block: 8 zmm accumulators
DENSITY_MAX = 0.5   # sparse kernel at or below this density: the measured crossover is
#                     0.6-0.7 on 2 threads, 0.5-0.65 on 1 (benchmarks/sparse_gemm.py)
ITEMS = ITEMS_PER_THREAD   # column-panel items per thread
PRIVATE = True      # threads transpose A each (see bind)
PRIVATE_MAX = 1 << 19   # floats of A^T up to which they do
ROW_SPLIT = False   # True: threads split the rows (see bind); lost on a busy machine
ACT_IDS = {a: i for i, a in enumerate(ACTIVATIONS)}
PARAMS = ["at", "ldt", "m", "colptr", "idx", "val", "n", "out", "ldo", "bias", "has_bias",
          "act", "res", "ldr", "has_res", "a", "lda", "k", "npad", "nkb", "private"]
P = {name: i for i, name in enumerate(PARAMS)}
KB = 64             # K rows per block: KB x MB floats of A^T (32 KiB) stay in L1
KB_MAX = 512        # sparser weights take longer blocks (see SparseB)
GROUP = 32          # panels sharing each K block: their tile (256 KiB) stays in L2
#                     (8 and 16 measured 5-20% slower on 2 threads, 64 no better)
TILE = GROUP * PANEL * MB   # floats of a thread's workspace


class _Params:
    def __init__(self, f: FnBuilder, block):
        self.f, self.block = f, block

    def __getitem__(self, name):
        return self.f.b.load(self.f.at(self.block, c64(P[name]), ty=I64), typ=I64)

    def ptr(self, name):
        return self.f.b.inttoptr(self[name], PTR)


def _transpose16(f: FnBuilder, rows: list) -> list:
    """The 16 x 16 transpose of 16 vectors: four rounds of two-source shuffles, each
    swapping the off-diagonal h x h blocks (vpermt2ps each: no scalar traffic)."""
    v = list(rows)
    for h in (8, 4, 2, 1):
        lo = [c if not c & h else 16 + c - h for c in range(16)]
        hi = [c + h if not c & h else 16 + c for c in range(16)]
        for i in range(16):
            if not i & h:
                x, y = v[i], v[i + h]
                v[i] = f.b.shuffle_vector(x, y, ir.Constant(VI32, lo))
                v[i + h] = f.b.shuffle_vector(x, y, ir.Constant(VI32, hi))
    return v


def _at(f: FnBuilder, p: _Params, ws):
    """A^T: the bound call's (`at`), or with `private` this thread's, after its tile."""
    b = f.b
    return b.select(b.icmp_signed("!=", p["private"], c64(0)), f.at(ws, c64(TILE)),
                    p.ptr("at"))


def _pack(module: ir.Module) -> ir.Function:
    """tc_sp_pack(params, ws, r0, r1, k0, k1): A^T [k0, k1) x [r0, r1) (k0 and r0
    multiples of 16), in 16 x 16 blocks transposed in registers (rows past M repeat A's
    last row: finite values in lanes that are never stored)."""
    f = FnBuilder(module, "tc_sp_pack", [("params", PTR), ("ws", PTR), ("r0", I64),
                                         ("r1", I64), ("k0", I64), ("k1", I64)])
    b, g = f.b, f.arg
    p = _Params(f, g["params"])
    a, lda, at, ldt, last = p.ptr("a"), p["lda"], _at(f, p, g["ws"]), p["ldt"], \
        b.sub(p["m"], c64(1))
    with f.loop(g["r0"], g["r1"], 16) as m0:
        rows = [f.mul(f.min(b.add(m0, c64(r)), last), lda) for r in range(16)]
        with f.loop(g["k0"], g["k1"], 16) as k:
            full = b.icmp_signed("<=", b.add(k, c64(16)), g["k1"])
            with b.if_else(full) as (whole, edge):
                with whole:   # plain loads and stores, no tests
                    cols = _transpose16(f, [f.vload(f.at(a, rows[r], k)) for r in range(16)])
                    for c in range(16):
                        f.vstore(cols[c], f.at(at, f.mul(b.add(k, c64(c)), ldt), m0),
                                 align=64)
                with edge:
                    mask = f.lanes_below(b.sub(g["k1"], k))
                    cols = _transpose16(f, [f.mload(f.at(a, rows[r], k), mask)
                                            for r in range(16)])
                    for c in range(16):
                        with b.if_then(b.icmp_signed("<", b.add(k, c64(c)), g["k1"])):
                            f.vstore(cols[c], f.at(at, f.mul(b.add(k, c64(c)), ldt), m0),
                                     align=64)
    return f.finish()


def _columns(module: ir.Module, nv: int) -> ir.Function:
    """tc_sp_cols_<nv>(params, tile, m0, j0, j1, kb): columns [j0, j1) over rows
    [m0, m0 + 16 nv), the nonzeros of K block kb, added into tile[j - j0][0:16 nv]
    (column at (j - j0) * MB; started from zero for the first block)."""
    f = FnBuilder(module, f"tc_sp_cols_{nv}", [("params", PTR), ("tile", PTR), ("m0", I64),
                                              ("j0", I64), ("j1", I64), ("kb", I64)],
                  internal=True)
    b, g = f.b, f.arg
    p = _Params(f, g["params"])
    at, ldt, colptr, idx, val = _at(f, p, g["tile"]), p["ldt"], p.ptr("colptr"), \
        p.ptr("idx"), p.ptr("val")
    ptrs = f.at(colptr, f.mul(g["kb"], p["npad"]), ty=I64)
    base = f.at(at, g["m0"])
    first = b.icmp_signed("==", g["kb"], c64(0))
    with f.loop(g["j0"], g["j1"]) as j:
        lo = b.load(f.at(ptrs, j, ty=I64), typ=I64)
        hi = b.load(f.at(ptrs, b.add(j, c64(1)), ty=I64), typ=I64)
        dst = f.at(g["tile"], f.mul(b.sub(j, g["j0"]), MB))
        accs = [f.var(V16, vconst(0.0)) for _ in range(nv)]
        with b.if_then(b.not_(first)):
            for v in range(nv):
                b.store(f.vload(f.at(dst, c64(16 * v)), align=64), accs[v])
        with f.loop(lo, hi) as q:
            k = b.sext(b.load(f.at(idx, q, ty=I32), typ=I32), I64)
            w = f.splat(b.load(f.at(val, q), typ=F32))
            row = f.at(base, f.mul(k, ldt))
            for v in range(nv):
                x = f.vload(f.at(row, c64(16 * v)), align=64)
                b.store(f.fma(w, x, b.load(accs[v], typ=V16)), accs[v])
        for v in range(nv):
            f.vstore(b.load(accs[v], typ=V16), f.at(dst, c64(16 * v)), align=64)
    return f.finish()


def _epilogue(f: FnBuilder, p: _Params, ws, g0, g1, m0, rows, act: str, has_bias,
              has_res) -> None:
    """Rows [m0, m0 + rows) of panels [g0, g1) of out from the tile: act(sum + bias) +
    residual, as the dense GEMM's epilogue."""
    b = f.b
    n, out, ldo = p["n"], p.ptr("out"), p["ldo"]
    with f.loop(g0, g1) as q:
        jq = f.mul(q, PANEL)
        mask = f.lanes_below(b.sub(n, jq))
        tile = f.at(ws, f.mul(b.sub(q, g0), PANEL * MB))
        bias = f.var(V16, vconst(0.0))
        with b.if_then(has_bias):
            b.store(f.mload(f.at(p.ptr("bias"), jq), mask), bias)
        bv = b.load(bias, typ=V16)
        with f.loop(0, rows, 16) as r0:
            ys = _transpose16(f, [f.vload(f.at(tile, c64(c * MB), r0), align=64)
                                  for c in range(PANEL)])
            for r in range(16):
                with b.if_then(b.icmp_signed("<", b.add(r0, c64(r)), rows)):
                    i = b.add(m0, b.add(r0, c64(r)))
                    slot = f.var(V16, f.activation(act, b.fadd(ys[r], bv)))
                    with b.if_then(has_res):
                        rptr = f.at(p.ptr("res"), f.mul(i, p["ldr"]), jq)
                        b.store(b.fadd(b.load(slot, typ=V16), f.mload(rptr, mask)), slot)
                    f.mstore(b.load(slot, typ=V16), f.at(out, f.mul(i, ldo), jq), mask)


def _gemm(module: ir.Module) -> ir.Function:
    """tc_sp_gemm(params, ws, r0, r1, q0, q1): rows [r0, r1) (r0 a multiple of 16) x
    column panels [q0, q1), GROUP panels at a time: for each block of MB rows, K block by
    K block (its A^T rows, KB x MB floats, stay in L1 while every column of the group
    reads them), then the epilogue."""
    cols = [_columns(module, nv) for nv in range(1, MB // 16 + 1)]
    f = FnBuilder(module, "tc_sp_gemm", [("params", PTR), ("ws", PTR), ("r0", I64),
                                         ("r1", I64), ("q0", I64), ("q1", I64)])
    b, g = f.b, f.arg
    p = _Params(f, g["params"])
    M = p["m"]
    has_bias, has_res = (b.icmp_signed("!=", p[x], c64(0)) for x in ("has_bias", "has_res"))
    act, nkb = p["act"], p["nkb"]
    with f.loop(g["q0"], g["q1"], GROUP) as g0:
        g1 = f.min(b.add(g0, c64(GROUP)), g["q1"])
        j0, j1 = f.mul(g0, PANEL), f.mul(g1, PANEL)
        with f.loop(g["r0"], g["r1"], MB) as m0:
            nv = b.sdiv(b.add(f.min(c64(MB), b.sub(g["r1"], m0)), c64(15)), c64(16))
            with f.loop(0, nkb) as kb:
                after = f.fn.append_basic_block("after")
                switch = b.switch(nv, after)
                for count, fn in enumerate(cols, start=1):
                    block = f.fn.append_basic_block(f"nv{count}")
                    switch.add_case(c64(count), block)
                    b.position_at_end(block)
                    b.call(fn, [g["params"], g["ws"], m0, j0, j1, kb])
                    b.branch(after)
                b.position_at_end(after)
            # the epilogue, 16 rows x 16 columns at a time: the tile's blocks transposed;
            # one copy of the loop per activation (no per-row tests of `act`)
            rows = f.min(c64(MB), b.sub(f.min(M, g["r1"]), m0))
            for name, aid in ACT_IDS.items():
                with b.if_then(b.icmp_signed("==", act, c64(aid))):
                    _epilogue(f, p, g["ws"], g0, g1, m0, rows, name, has_bias, has_res)
    return f.finish()


def _rows(module: ir.Module, pack, gemm) -> ir.Function:
    """tc_sp_rows(params, ws, r0, r1, q0, q1): A^T of rows [r0, r1), then their product
    with panels [q0, q1): a thread's share when threads split the rows (its A^T stays in
    its own L2)."""
    f = FnBuilder(module, "tc_sp_rows", [("params", PTR), ("ws", PTR), ("r0", I64),
                                         ("r1", I64), ("q0", I64), ("q1", I64)])
    g = f.arg
    p = _Params(f, g["params"])
    f.b.call(pack, [g["params"], g["ws"], g["r0"], g["r1"], c64(0), p["k"]])
    f.b.call(gemm, [g["params"], g["ws"], g["r0"], g["r1"], g["q0"], g["q1"]])
    return f.finish()


def build_module() -> ir.Module:
    module = ir.Module(name="tensorc_sparse_gemm")
    pack, gemm = _pack(module), _gemm(module)
    job(module, "tc_sp_pack_job", pack, [PTR], 4)
    job(module, "tc_sp_gemm_job", gemm, [PTR], 4)
    job(module, "tc_sp_rows_job", _rows(module, pack, gemm), [PTR], 4)
    return module


SYMBOLS = ["tc_sp_pack_job", "tc_sp_gemm_job", "tc_sp_rows_job"]
_lib: dict[str, int] = {}
_lib_lock = threading.Lock()


def kernels() -> dict[str, int]:
    """The pool jobs (compiled once, cached on disk; hand-vectorised: no loop passes)."""
    with _lib_lock:
        if not _lib:
            _lib.update(compile_library(f"sparse_gemm/g{GROUP}", build_module, SYMBOLS, False,
                                        False))
        return _lib


# -- packing ----------------------------------------------------------------------------

class SparseB:
    """A float32 weight W [K, N] packed once as CSC (see the module docstring). Keeps W
    itself for `dense()`, the fallback of a call the kernel does not take."""

    ndim = 2
    sparse = True

    def __init__(self, w, threads: int | None = None, kb: int | None = None):
        w = np.asarray(w)
        if w.dtype != np.float32 or w.ndim != 2:
            raise TensorcError(f"sparse gemm: W must be a 2-D float32 array, got "
                               f"{w.dtype} {w.shape}")
        self.k, self.n = w.shape
        self.panels = -(-self.n // PANEL)
        cols, ks = np.nonzero(w.T)   # sorted by column, then k
        self.nnz = int(cols.size)
        # grouped by K block, then column, then k: block kb's column j at
        # [colptr[kb * npad + j], colptr[kb * npad + j + 1])
        if kb is None:   # ~12 nonzeros per column and block: the tile's load and store
            # amortised (measured: 64 at density >= 0.2, 128 at 0.1, 256 at 0.05)
            density = np.count_nonzero(w) / max(1, w.size)
            want = 12 / max(density, 1e-6)
            kb = KB if want <= KB else min(KB_MAX, 1 << int(np.ceil(np.log2(want))))
        self.kb = kb
        self.npad, self.nkb = self.panels * PANEL, max(1, -(-self.k // self.kb))
        key = (ks // self.kb) * self.npad + cols
        order = np.argsort(key, kind="stable")
        counts = np.bincount(key, minlength=self.nkb * self.npad)
        self.colptr = np.zeros(self.nkb * self.npad + 1, np.int64)
        np.cumsum(counts, out=self.colptr[1:])
        ks, cols = ks[order], cols[order]
        self.idx = np.ascontiguousarray(ks, np.int32) if self.nnz else np.zeros(1, np.int32)
        self.val = np.ascontiguousarray(w.T[cols, ks]) if self.nnz else np.zeros(1, np.float32)
        self._w, self._threads, self._dense = w, threads, None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.k, self.n)

    @property
    def density(self) -> float:
        return self.nnz / max(1, self.k * self.n)

    def dense(self):
        """The dense `PackedB` of the same weight (made on first use)."""
        if self._dense is None:
            from .gemm import PackedB
            self._dense = PackedB(self._w, threads=self._threads)
        return self._dense


def density_limit(rows: int) -> float:
    """The density up to which the sparse kernel beats the dense GEMM for `rows` rows:
    with at most 16 (one vector per nonzero, against gemv.py streaming B) only about
    0.1 (measured: 512 x 2048, 1-8 rows: 0.12 ms sparse at 0.1, dense 0.15; at 0.2 0.25
    against 0.15), with 32 about 0.3, else DENSITY_MAX."""
    return 0.08 if rows <= 16 else 0.3 if rows <= 32 else DENSITY_MAX


def pack_weight(w, threads: int | None = None, activation=None, density_max=None):
    """A constant weight's packing: `SparseB` when W is float32 with density at most
    `density_max` (default DENSITY_MAX) and the kernel has the activation, else the dense
    `PackedB`."""
    from .gemm import PackedB
    w = np.asarray(w)
    limit = DENSITY_MAX if density_max is None else density_max
    if w.dtype == np.float32 and w.ndim == 2 and w.size \
            and np.count_nonzero(w) <= limit * w.size \
            and _activation_name(activation) in ACT_IDS:
        return SparseB(w, threads)
    return PackedB(w, threads=threads)


# -- binding ----------------------------------------------------------------------------

def _rows2d(x, cols: int):
    """[..., rows, cols] as a 2-D float32 view with unit inner stride, or None."""
    if x is None or not isinstance(x, np.ndarray) or x.dtype != np.float32:
        return None
    if x.ndim != 2:
        try:
            view = x.view()
            view.shape = (-1, cols)
            x = view
        except (AttributeError, ValueError):
            return None
    if x.shape[1] != cols or x.strides[1] != 4 or x.strides[0] < 0 or x.strides[0] % 4:
        return None
    return x


def bind(a, b: SparseB, out, *, bias=None, activation=None, residual=None,
         threads: int | None = None, always: bool = False):
    """A zero-argument function computing act(a @ W + bias) + residual into `out` (as
    `gemm.bind`), with `patch(role, address)` for "a", "out", "bias", "residual" ("b" is
    packed once) and `kernel` "sparse"; operands the kernel cannot read where they are,
    or too few rows for W's density (`density_limit`), go to the dense `gemm.bind` of the
    same weight (`kernel` "dense"); `always` skips the density rule (tests, benchmarks)."""
    from . import gemm
    threads = num_threads() if threads is None else max(1, int(threads))
    act = _activation_name(activation)
    K, N = b.shape
    a2, out2 = _rows2d(a, K), _rows2d(out, N)
    res2 = None
    if residual is not None and isinstance(residual, np.ndarray) \
            and residual.dtype == np.float32 and out2 is not None:
        if residual.shape == out.shape:
            res2 = _rows2d(residual, N)
        elif residual.shape[-1:] == (N,) and residual.size == N:   # a row, broadcast
            res2 = np.lib.stride_tricks.as_strided(residual.reshape(N), out2.shape, (0, 4))
    ok = a2 is not None and out2 is not None and out2.flags.writeable \
        and a2.shape[0] == out2.shape[0] and act in ACT_IDS \
        and (bias is None or isinstance(bias, np.ndarray) and bias.dtype == np.float32
             and bias.shape == (N,) and bias.flags.c_contiguous) \
        and (residual is None or res2 is not None and not np.may_share_memory(res2, out2)) \
        and not np.may_share_memory(a2, out2)
    if not ok or not always and b.density > density_limit(a2.shape[0]):
        run = gemm.bind(a, b.dense(), out, bias=bias, activation=activation,
                        residual=residual, threads=threads)
        run.kernel = "dense"
        return run
    M = a2.shape[0]
    mp = -(-M // 16) * 16
    at = aligned_empty(max(16, mp * K))
    words = dict.fromkeys(PARAMS, 0)
    words.update(at=at.ctypes.data, ldt=mp, m=M, colptr=b.colptr.ctypes.data,
                 idx=b.idx.ctypes.data, val=b.val.ctypes.data, n=N, out=out2.ctypes.data,
                 ldo=out2.strides[0] // 4, act=ACT_IDS[act], a=a2.ctypes.data,
                 lda=a2.strides[0] // 4, k=K, npad=b.npad, nkb=b.nkb)
    if bias is not None:
        words.update(bias=bias.ctypes.data, has_bias=1)
    if res2 is not None:
        words.update(res=res2.ctypes.data, ldr=res2.strides[0] // 4, has_res=1)
    params = np.array([words[w] for w in PARAMS], np.int64)
    keep = [b, at, params, a2, out2, bias, res2]

    if M == 0 or N == 0:
        def nothing():
            pass
        nothing.patch = lambda role, address: None
        nothing.kernel = "sparse"
        return nothing
    jobs = kernels()
    work = b.nnz * mp + M * K
    parts = 1 if threads == 1 or work < 1 << 18 else ITEMS * threads
    fixed = [params.ctypes.data]
    if parts > 1 and PRIVATE and mp * K <= PRIVATE_MAX:
        # each thread transposes all of A into its own workspace and multiplies its
        # panels: A^T never crosses cores (the transpose is done once per thread)
        parts = threads
        params[P["private"]] = 1
        steps = [(jobs["tc_sp_rows_job"], fixed,
                  [(0, mp, *r) for r in _split(b.panels, threads, 1)],
                  ("sptile", TILE + mp * K))]
    elif parts > 1 and ROW_SPLIT and mp >= 32 * threads:
        # rows split: each thread transposes and multiplies its own rows, A^T never
        # crosses cores (each reads all of W's nonzeros instead)
        parts = threads
        steps = [(jobs["tc_sp_rows_job"], fixed,
                  [(r0, r1, 0, b.panels) for r0, r1 in _split(mp, threads, 16)],
                  ("sptile", TILE))]
    else:
        # items of at least GROUP panels where that leaves each thread one: a K block
        # of A^T is read by a whole group (each item reads all of A^T)
        parts = min(parts, max(threads if parts > 1 else 1, b.panels // GROUP))
        steps = [(jobs["tc_sp_pack_job"], fixed,
                  [(0, mp, *r) for r in _split(K, min(parts, threads), 16)], None),
                 (jobs["tc_sp_gemm_job"], fixed,
                  [(0, mp, *r) for r in _split(b.panels, parts, 1)], ("sptile", TILE))]
    steps = [s for s in steps if s[2]]
    workers = pool.get(threads) if parts > 1 else None
    state = {"key": None}

    def run():
        # every thread's workspace: a call may come from another thread, and another
        # bind may have grown the buffers (their size depends on M and K here)
        key = tuple(_workspaces(steps[-1][3], workers))
        if key != state["key"]:
            prepare_steps(state, key, steps, workers)
        run_steps(state, workers)

    roles = {"a": "a", "out": "out", "bias": "bias", "residual": "res"}

    def patch(role: str, address: int) -> None:
        if role == "b":
            return   # packed once
        if role not in roles:
            raise KeyError(role)
        word = roles[role]
        if params[P[word]] or role in ("a", "out"):
            params[P[word]] = address
    run.patch = patch
    run.keep = keep
    run.kernel = "sparse"
    return run


def sparse_gemm(a, w, *, bias=None, activation=None, residual=None,
                threads: int | None = None, always: bool = True) -> np.ndarray:
    """act(a @ W + bias) + residual through the sparse kernel (numpy-level API: `w` a
    `SparseB` or a float32 [K, N] array packed here; `a` [..., M, K]); `always`: the
    sparse kernel whatever the density (else `bind`'s choice)."""
    b = w if isinstance(w, SparseB) else SparseB(w, threads)
    a = np.ascontiguousarray(a, np.float32)
    if a.ndim < 2 or a.shape[-1] != b.k:
        raise ShapeError(f"sparse gemm: a {a.shape} @ W {b.shape}")
    out = np.empty(a.shape[:-1] + (b.n,), np.float32)
    if bias is not None:
        bias = np.ascontiguousarray(bias, np.float32)
    if residual is not None:
        residual = np.ascontiguousarray(np.broadcast_to(np.asarray(residual, np.float32),
                                                        out.shape))
    bind(a, b, out, bias=bias, activation=activation, residual=residual, threads=threads,
         always=always)()
    return out


__all__ = ["SparseB", "pack_weight", "bind", "sparse_gemm", "DENSITY_MAX", "kernels"]
