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
workers that spin briefly instead of sleeping) claim; many rows split by rows. With
at most 8 rows (a decode step's tokens) none of that: `gemv.py` streams each panel of B
once with all the rows multiplied into it (`_gemv_steps`), A unpacked.

Operands that change every call (training: the weights are graph inputs, the backward
multiplies by W^T and forms x^T @ dy): B in rows or transposed (W^T, packed from W's
rows, 16 x 16 blocks transposed in registers), A in rows or transposed (x^T: a panel's
8 floats of one k are contiguous in x). With few rows such a B is packed the BLIS
way, per K block and NCP panels, by the thread that multiplies it (`tc_gemm_pb`);
otherwise all of it first, split across the threads.

`gemm()` is the numpy-level API (batched, broadcasting, threaded); `bind()` does
its checks once and returns a call (the runtime's) whose operands can be moved to
other memory of the same layout (`patch`); `gemm_range()` computes a block of rows
and panels on the calling thread.
"""

from __future__ import annotations

import math
import threading

import numpy as np

from tensorc.errors import ShapeError, TensorcError
from tensorc.types import DTYPES

from . import gemm_space, pool, tuning
from . import gemv as _gemv
from .gemm_ir import (
    _ALIASES,
    ACTIVATIONS,
    ALIGN,
    AVX512_TILE,
    FIXED,
    ITEMS_PER_THREAD,
    KC_MAX,
    MC_MAX,
    NR,
    PB_WORKSPACE,
    PREPACK_A,
    WS_A,
    Tile,
    group_name,
    kernels,
)
from .pool import num_threads

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
        ptr = _tls.a_ptr = _scratch("a", WS_A).ctypes.data
    return ptr


def _prepacked_size(m: int, k: int, t: Tile) -> int:
    """Floats of A [m, k] packed by tc_pack_a (rows to mr, K to kc, zero padded)."""
    return -(-m // t.mr) * t.mr * -(-k // t.kc) * t.kc


def tile_for(m: int, k: int, n: int, per_call: bool = False, bf16: bool = False) -> Tile:
    """The tile a product of m rows by a [k, n] B runs on this host (B packed once, or
    `per_call`): the tuned one where `tensorc tune` found one (see tuning.py), else the
    host's default. A bf16 weight's panels are widened whole (nv = 2): its tile is fixed."""
    if bf16:
        return AVX512_TILE
    return Tile(**tuning.schedule(SPACE.name, (m, k, n, int(per_call))))


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


BF16 = np.dtype(DTYPES["bf16"])


class PackedB:
    """B [K, N] (or [N, K] with trans_b) packed into NR-column panels.

    Pack a constant weight once and pass the PackedB to `gemm` on every call.

    A bfloat16 B (a `cast-weights:bf16` weight) is packed as bf16, half the bytes, in
    the same panels, each row's 32 columns stored pairwise (column w in the low half
    of 32-bit word w, column w + 16 in its high half: see `FnBuilder.bf16_pair`); the
    kernels widen it exactly in registers and multiply in float32 (A stays float32).
    `dtype` says which ("f32" or "bf16")."""

    ndim = 2

    def __init__(self, b, trans_b: bool = False, threads: int | None = None,
                 scratch: bool = False, fill: bool = True):
        if np.asarray(b).dtype == BF16:
            self._pack_bf16(np.asarray(b), trans_b)
            return
        self.dtype = "f32"
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
            # packed: let go of B, which for a transposed view (a tied embedding's E.T)
            # is a contiguous copy as big as the panels
            self._source = None

    def _pack_bf16(self, b: np.ndarray, trans_b: bool) -> None:
        """Pack a bf16 weight once, here in numpy (a one-off, like any weight's)."""
        if b.ndim != 2:
            raise ShapeError(f"gemm: can only pack a 2-D B, got shape {b.shape}")
        b = b.T if trans_b else b
        self.dtype = "bf16"
        self.k, self.n = b.shape
        self.panels = -(-self.n // NR)
        padded = np.zeros((self.k, self.panels * NR), np.uint16)
        padded[:, :self.n] = b.view(np.uint16)
        # [K, panel, half, w] -> [panel, K, w, half]: word w of a row = (w, w + 16)
        panels = padded.reshape(self.k, self.panels, 2, NR // 2).transpose(1, 0, 3, 2)
        size = max(2, self.panels * NR * self.k)
        self.data = aligned_empty(size // 2).view(np.uint16)
        self.data[:self.panels * NR * self.k] = panels.reshape(-1)
        self.ptr = self.data.ctypes.data
        self._source = None

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
               residual: np.ndarray | None = None, tile: Tile = AVX512_TILE) -> None:
    """Rows [m0, m1) x column panels [jp0, jp1) (NR columns each) of the fused GEMM.

    Low level and thread safe: `a`, `out`, `residual` are 2-D float32 with unit inner
    stride (residual's row stride may be 0), bias is contiguous [N]; not checked here.
    Threads may call it at once on disjoint ranges."""
    fn, args = _call(a, packed, out, bias, activation, residual, tile)
    fn(*args, _workspace(), m0, m1, jp0, jp1)


def _call(a, packed, out, bias, activation, residual, t: Tile):
    """The kernel and its arguments but for the ranges and the workspace, so that
    threads only add their ranges (the GIL is held for as short as possible)."""
    return kernels(t)[_tag(packed) + activation], _args(a, packed, out, bias, residual, t)


def _tag(packed) -> str:
    """The kernels' name tag for a PackedB's element type: "bf16_" or ""."""
    return "bf16_" if getattr(packed, "dtype", "f32") == "bf16" else ""


def _a_strides(a) -> tuple[int, int]:
    """(lda, ldka): A[i, k] at a + i * lda + k * ldka (in floats), for A in rows
    (ldka 1) or transposed (lda 1: a weight gradient's x^T, packed as it is read)."""
    if a.strides[1] == 4:
        return a.strides[0] // 4, 1
    return 1, a.strides[1] // 4


def _args(a, packed, out, bias, residual, t: Tile) -> tuple:
    """The kernels' and jobs' fixed arguments (a job needs no compiled `tc_gemm_<act>`),
    the tile's blocking last."""
    res = residual if residual is not None else out
    lda, ldka = _a_strides(a)
    return (a.ctypes.data, lda, packed.ptr, packed.k, out.ctypes.data,
            out.strides[0] // 4, packed.n, (bias if bias is not None else out).ctypes.data,
            int(bias is not None), res.ctypes.data, res.strides[0] // 4,
            int(residual is not None), ldka, *_blocking(t))


def _blocking(t: Tile) -> tuple[int, int]:
    """(kc, mc) of tile t, checked: the workspaces hold KC_MAX x MC_MAX floats of A."""
    if not (0 < t.kc <= KC_MAX and 0 < t.mc <= MC_MAX and t.mc % t.mr == 0):
        raise TensorcError(f"gemm: tile {t.tag} has a blocking the workspaces cannot hold")
    return t.kc, t.mc


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


def _shares_a(m: int, k: int, panels: int, threads: int, t: Tile) -> bool:
    """A few rows (a transformer's tokens): pack all of A once into a buffer read from
    L2 by every thread, and cut the panels into small items that threads claim, so
    that each panel of B is read once and a thread that is slow to start (a busy
    machine) takes fewer. In GPT small this beat splitting the rows by 4% on a busy
    machine; with A over half an L2 it lost to it."""
    return _prepacked_size(m, k, t) <= PREPACK_A and panels >= 2 * threads


def _gemm2d(a, packed, out, bias, act, residual, threads, fill=False):
    """out = epilogue(a @ packed); fill: the panels still need packing (B per call)."""
    M, N = a.shape[0], packed.n
    if M == 0 or N == 0:
        return out
    if packed.k == 0:
        out[...] = _numpy_epilogue(np.zeros((M, N), np.float32), bias, act, residual)
        return out
    panels = packed.panels
    if M <= _gemv.GEMV_MAX_M:   # decode-shaped: stream B once, see gemv.py
        b = packed
        if fill:   # B per call: streamed as it is, or B^T packed first
            b, pack = packed._source
            if pack is kernels()["pack_bt"]:
                b = packed
                packed.fill_jobs(threads)
        run_jobs(_gemv_steps(a, b, out, bias, act, residual, threads), threads)
        return out

    t = tile_for(M, packed.k, N, fill, packed.dtype == "bf16")
    fn, args = _call(a, packed, out, bias, act, residual, t)

    def block(m0, m1, jp0, jp1):
        fn(*args, _workspace(), m0, m1, jp0, jp1)

    if threads == 1 or M * N * packed.k < 1 << 21:
        if fill:
            packed.fill_panels(0, panels)
        block(0, M, 0, panels)
        return out
    # A per-call B with few rows: each thread packs the panels it then multiplies, a K
    # block at a time (see _packs_in_blocks); else it is packed first. Then, as for a
    # packed weight: see _shares_a; else split rows when each thread gets a few row
    # tiles and B is small enough to share from L3 (no A packed twice), else split the
    # panels, so that each thread streams only its part of B.
    run_jobs(_schedule(a, packed, out, bias, act, residual, threads, t, fill), threads)
    return out


def _gemv_steps(a, b, out, bias, act, residual, threads) -> list:
    """The native job of a GEMM with at most GEMV_MAX_M rows (see gemv.py): b is a
    PackedB, or a row-major [K, N] array (unit inner stride) used as it is. Threads
    claim items of a few column panels each when B is big enough to share."""
    m = a.shape[0]
    if isinstance(b, PackedB):
        ptr, k, n, kstride, pstride = b.ptr, b.k, b.n, NR, b.k * NR
    else:
        ptr, (k, n), kstride, pstride = b.ctypes.data, b.shape, b.strides[0] // 4, NR
    res = residual if residual is not None else out
    fixed = [a.ctypes.data, a.strides[0] // 4, ptr, kstride, pstride, k, out.ctypes.data,
             out.strides[0] // 4, n, m, (bias if bias is not None else out).ctypes.data,
             int(bias is not None), res.ctypes.data, res.strides[0] // 4,
             int(residual is not None)]
    panels = -(-n // NR)
    parts = ITEMS_PER_THREAD * threads if threads > 1 and k * n >= GEMV_THREADED else 1
    items = _split(panels, parts, 1)
    tag = _tag(b)
    return [(_gemv.kernels(bool(tag))[f"tc_gemv_{tag}job_{act}"], fixed, items, None)]


# a B of this many floats (256 KiB) is streamed by all threads in the GEMV path: below
# it the hand-off costs more than the second core saves
GEMV_THREADED = 1 << 16


def _schedule(a, packed, out, bias, act, residual, threads, t: Tile, per_call=False) -> list:
    """The native jobs (see `run_jobs`) of a threaded GEMM on tile t; per_call: B still
    needs packing (an activation, or in training a weight or W^T)."""
    M, K, panels = a.shape[0], packed.k, packed.panels
    mt = -(-M // t.mr)
    jobs = kernels(t)["jobs"]
    fixed = list(_args(a, packed, out, bias, residual, t))
    split = t.split
    if per_call and (split == "blocks" or split == "auto"
                     and _packs_in_blocks(M, packed.n, threads)):
        src, pack = packed._source
        fixed += [src.ctypes.data, src.strides[0] // 4, int(pack is kernels()["pack_bt"])]
        items = [(0, M, *r) for r in _split(panels, threads, 1)]
        return [(jobs[f"tc_gemm_pb_job_{act}"], fixed, items, ("pb", PB_WORKSPACE))]
    tag = _tag(packed)
    fits = _prepacked_size(M, K, t) <= PREPACK_A   # all of A in the shared buffer
    if fits and (split == "shared" or split == "auto" and _shares_a(M, K, panels, threads, t)):
        items = [(0, M, *r) for r in _split(panels, ITEMS_PER_THREAD * threads, 1)]
        lda, ldka = _a_strides(a)
        steps = [(jobs["tc_pack_a_job"], [a.ctypes.data, lda, K, M, ldka, t.kc],
                  _split(mt, threads, 1), "ap"),
                 (jobs[f"tc_gemm_pa_{tag}job_{act}"], fixed, items, "ap")]
    elif split == "rows" or split not in ("panels", "shared") and (
            mt >= 4 * threads and packed.data.nbytes <= 8 << 20 or mt > panels):
        items = [(m0, m1, 0, panels) for m0, m1 in _split(M, threads, t.mr)]
        steps = [(jobs[f"tc_gemm_{tag}job_{act}"], fixed, items, ("a", WS_A))]
    else:
        items = [(0, M, *r) for r in _split(panels, threads, 1)]
        steps = [(jobs[f"tc_gemm_{tag}job_{act}"], fixed, items, ("a", WS_A))]
    if per_call:
        steps.insert(0, packed.pack_step(_split(panels, threads, 1)))
    return steps


def _packs_in_blocks(m: int, n: int, threads: int) -> bool:
    """Whether a per-call B is packed by `tc_gemm_pb` (per K block, into L2, by the
    thread that multiplies it: B read from memory once instead of read, written
    packed, read again) rather than all at once before the product. Threads then
    split the panels and each packs all of A, so only where A is the smaller part:
    few rows (128 tokens: 5-12% faster on 2 threads), or half as many rows as columns
    (1024 x 512 x 2048: 4%); with more rows (1024 x 2048 x 512) it lost 8%."""
    return PACK_IN_BLOCKS and m <= max(PB_MAX_M, n // 2) and n >= 2 * threads * NR


PB_MAX_M = 256
PACK_IN_BLOCKS = True   # False: always pack a per-call B first (for comparisons)


def gemm(a, b, out: np.ndarray | None = None, *, bias=None, activation: str | None = None,
         residual=None, trans_b: bool = False, threads: int | None = None) -> np.ndarray:
    """act(a @ b + bias) + residual in float32, like np.matmul (batched, broadcasting).

    b is an array ([..., K, N], or [..., N, K] with trans_b; a 2-D bf16 one is packed
    here) or a `PackedB`.
    activation: None, "relu", "gelu" (= "gelu_erf") or "gelu_tanh". bias is [N];
    residual broadcasts to the output shape. threads defaults to `num_threads()`."""
    act = _activation_name(activation)
    threads = num_threads() if threads is None else max(1, int(threads))
    a = _f32(a, "a")
    if isinstance(b, np.ndarray) and b.dtype == BF16 and b.ndim == 2:
        b = PackedB(b, trans_b)   # bf16 weights are multiplied from their packing only
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
         residual=None, threads: int | None = None, tile: Tile | None = None):
    """A zero-argument function that computes gemm(a, b, out=out, ...) into `out`.

    The runtime's entry. A 2-D product (leading dims flattened) whose operands the
    kernels read where they are (unit inner stride; B a `PackedB`, else packed on every
    call into a buffer of its own) has its checks, schedule and argument blocks made
    here once: a call is then one native job per step. Such a function has
    `patch(role, address)`, which points operand `role` ("a", "b", "out", "bias",
    "residual") at other memory of the same layout without binding again (the
    runtime reads inputs and writes outputs where the caller keeps them); the caller
    keeps out from overlapping the other operands. A weight times at most 8 rows (a
    decode step) runs the GEMV job (`gemv.py`). Anything else runs `gemm` on every
    call and has no `patch`. One caller at a time. `tile`: this schedule instead of
    `tile_for`'s (the tuner's measurements)."""
    threads = num_threads() if threads is None else max(1, int(threads))
    act = _activation_name(activation)

    def general():
        gemm(a, b, out=out, bias=bias, activation=activation, residual=residual,
             threads=threads)

    def rows(x):   # 2-D float32, unit inner stride, non-negative row stride
        return isinstance(x, np.ndarray) and x.ndim == 2 and x.dtype == np.float32 \
            and x.strides[1] == 4 and x.strides[0] >= 0 and x.strides[0] % 4 == 0

    def flat(x):   # [..., rows, n] as a 2-D view of the same memory, if there is one
        if x is None or x.ndim < 3:
            return x
        try:
            view = x.view()
            view.shape = (-1, x.shape[-1])   # raises where only a copy would do
            return view
        except (AttributeError, ValueError):   # ValueError: -1 is ambiguous when empty
            return x
    if isinstance(b, np.ndarray) and b.ndim > 2 and a.ndim == b.ndim == out.ndim \
            and a.shape[:-2] == b.shape[:-2] == out.shape[:-2] and bias is None \
            and residual is None and act == "none" and a.dtype == b.dtype == np.float32 \
            and not np.may_share_memory(a, out) and not np.may_share_memory(b, out):
        # a batch of products with a B each (attention's backward: per batch and head):
        # each product bound once, rather than checked and packed anew by `gemm`
        subs = [bind(a[i], b[i], out[i], threads=threads, tile=tile)
                for i in np.ndindex(a.shape[:-2])]

        def batched():
            for sub in subs:
                sub()
        return batched
    a2, out2, res2 = flat(a), flat(out), flat(residual)   # `general` keeps the originals
    packed = b if isinstance(b, PackedB) else None
    if packed is None and isinstance(b, np.ndarray) and b.ndim == 2:
        trans = not rows(b) and rows(b.T)   # a transposed view: packed from its rows
        if (rows(b) or trans) and b.size and not np.may_share_memory(b, out):
            packed = PackedB(b.T if trans else b, trans, fill=False)   # packed per call
    # A transposed (x^T of a weight gradient): packed from its columns as they are
    trans_a = isinstance(a2, np.ndarray) and a2.ndim == 2 and rows(a2.T) and not rows(a2)
    if not (packed is not None and (rows(a2) or trans_a) and rows(out2)
            and out2.flags.writeable
            and a2.shape == (out2.shape[0], packed.k) and out2.shape[1] == packed.n
            and a2.size and out2.size
            and (bias is None or bias.dtype == np.float32 and
                 bias.shape == (packed.n,) and bias.flags.c_contiguous)
            and (res2 is None or rows(res2) and res2.shape == out2.shape
                 and not np.may_share_memory(res2, out2))
            and not np.may_share_memory(a2, out2)):
        return general
    per_call = packed is not b
    gemv = not per_call and not trans_a and a2.shape[0] <= _gemv.GEMV_MAX_M
    t = AVX512_TILE if gemv else tile or tile_for(a2.shape[0], packed.k, packed.n,
                                                  per_call, packed.dtype == "bf16")
    jobs = kernels(t)["jobs"]
    if gemv:   # a decode step: see gemv.py
        steps = _gemv_steps(a2, packed, out2, bias, act, res2,
                            min(threads, pool.MAX_WORKERS + 1))
        workers = pool.get(threads) if threads > 1 and len(steps[0][2]) > 1 else None
    elif threads > 1 and a2.shape[0] * packed.n * packed.k >= 1 << 21:   # as gemm
        workers = pool.get(threads)
        steps = _schedule(a2, packed, out2, bias, act, res2, workers.threads, t, per_call)
    else:
        workers = None
        fixed = list(_args(a2, packed, out2, bias, res2, t))
        steps = [(jobs[f"tc_gemm_{_tag(packed)}job_{act}"], fixed,
                  [(0, a2.shape[0], 0, packed.panels)], ("a", WS_A))]
        if per_call:
            steps.insert(0, packed.pack_step([(0, packed.panels)]))
    # where each operand's address sits in the steps' fixed arguments (see `_call`)
    slots: dict[str, list] = {}
    packs = kernels()["jobs"]
    for si, (job, fixed, _, _) in enumerate(steps):
        # B's packing jobs come from `PackedB`'s library (the default tile's); pack_a's
        # from this tile's, read with .get: a step that runs it compiled it already
        if job in (packs["tc_pack_b_job"], packs["tc_pack_bt_job"]):
            where = {"b": 0}
        elif not gemv and len(fixed) > len(FIXED):   # tc_gemm_pb: B's source too
            where = {"a": 0, "out": 4, "bias": 7 if bias is not None else None,
                     "residual": 9 if res2 is not None else None, "b": len(FIXED)}
        elif job == jobs.get("tc_pack_a_job"):
            where = {"a": 0}
        elif gemv:   # see _gemv_steps
            where = {"a": 0, "out": 6, "bias": 10 if bias is not None else None,
                     "residual": 12 if res2 is not None else None}
        else:
            where = {"a": 0, "out": 4, "bias": 7 if bias is not None else None,
                     "residual": 9 if res2 is not None else None}
        for role, fi in where.items():
            if fi is not None:
                slots.setdefault(role, []).append((si, fi))
    fixed_args = [list(fixed) for _, fixed, _, _ in steps]   # patched in place
    state = {"key": None, "blocks": []}

    def run():
        key = (_prepacked_a(), _workspace())   # a call may come from another thread
        if key != state["key"]:   # argument blocks with this thread's workspaces
            prepare_steps(state, key, steps, workers, fixed_args)
        run_steps(state, workers)

    def patch(role: str, address: int) -> None:
        if role not in ("a", "b", "out", "bias", "residual"):
            raise KeyError(role)
        for si, fi in slots.get(role, ()):   # none: not an operand here ("b" packed once)
            fixed_args[si][fi] = address
            if state["blocks"]:
                state["blocks"][si][fi] = address
    run.patch = patch
    # a per-call B's packing buffer, and the operands the native steps read where they
    # are (a caller's temporary would otherwise be freed under them)
    run.keep = (packed, a2, out2, bias, res2)
    return run

def prepare_steps(state: dict, key, steps: list, workers, fixed=None) -> None:
    """A bound call's argument blocks (`fixed`: each step's fixed arguments, if they are
    patched apart from `steps`) with this thread's workspaces, into `state`: its pool
    launches and its serial launchers."""
    fixed = fixed or [fx for _, fx, _, _ in steps]
    blocks = [_block(fx, _workspaces(ws, workers), items)
              for fx, (_, _, items, ws) in zip(fixed, steps, strict=True)]
    state.update(key=key, blocks=blocks,
                 launch=[(job, blk.ctypes.data, len(items))
                         for blk, (job, _, items, _) in zip(blocks, steps, strict=True)],
                 serial=[pool.launcher(job, blk.ctypes.data, len(items), 1)
                         for blk, (job, _, items, _) in zip(blocks, steps, strict=True)])


def run_steps(state: dict, workers) -> None:
    """Run prepared steps on the pool, or on this thread when the call is small or the
    pool is taken (another caller is using it)."""
    if workers is not None and workers.lock.acquire(blocking=False):
        try:
            for launch in state["launch"]:
                workers.run(*launch)
        finally:
            workers.lock.release()
        return
    for call in state["serial"]:
        call()


def library_groups(m: int, k: int, n: int, activation: str | None = None,
                   threads: int | None = None, bf16: bool = False) -> list[str]:
    """The `gemm_ir` modules (`group_name`s) a bound product of m rows with a packed
    [k, n] weight runs (as `bind` and `_schedule` choose), besides `pack_b`: for
    compiling them ahead. bf16: the weight is a bf16 one (its groups are "bf16:<act>",
    "pa_bf16:<act>")."""
    act = _activation_name(activation)
    if m <= _gemv.GEMV_MAX_M:   # the GEMV module's (gemv.ahead), no group of gemm_ir's
        return []
    threads = num_threads() if threads is None else max(1, int(threads))
    threads = min(threads - 1, pool.MAX_WORKERS) + 1   # what pool.get(threads) has
    t = tile_for(m, k, n, bf16=bf16)
    if threads > 1 and m * n * k >= 1 << 21 and _shares_a(m, k, -(-n // NR), threads, t):
        groups = ["pack_a", f"pa_bf16:{act}" if bf16 else f"pa:{act}"]
    else:
        groups = [f"bf16:{act}" if bf16 else f"plain:{act}"]
    return [group_name(g, t) for g in groups]


SPACE = gemm_space.register(bind, PackedB)   # the tuner's view of the tiles
