"""Sparse attention for the LLVM CPU backend (float32): `local_attention` and
`block_sparse_attention` (`tensorc/ops/sparse_attention.py`).

The kernel is the flash-attention kernel of `attention.py` built with `sparse=True`:
the same 8-row blocks, K^T panels and online softmax, but each work item's rows walk
only the key intervals the op's `Pattern` gives their row group, and per 8-row block
only the 32-key tiles of an interval that some row of the block sees (a band is
clipped to [first row - before, last row + after], causal to j <= last row). Here
the host side: the interval table (int64 rows lo, hi, banded), work items (heads x
chunks of a row group, cut by their estimated work so that threads finish together),
the argument block built once (`bind`).
"""

from __future__ import annotations

import math
import threading

import numpy as np
from llvmlite import ir

from tensorc.errors import ShapeError, TensorcError
from tensorc.ops.sparse_attention import pattern

from . import pool
from .attention import (
    BC,
    BR,
    DIL_BITS,
    MASKS,
    META,
    SPARSE_META,
    _kernel,
)
from .attention_operands import _estrides, _f32_bits, _unit_last, kernel_mask
from .gemm import aligned_empty, num_threads
from .gemm_ir import _pack_bt
from .irbuild import F32, I64, PTR, job
from .jit import compile_library

OPS = ("local_attention", "block_sparse_attention")
ITEMS_PER_THREAD = 4   # items a thread gets on average: claimed as threads finish
MIN_WORK = 1 << 20     # pairs x (d + dv) below which one thread does it all (as dense)


def build_module(kinds=MASKS) -> ir.Module:
    module = ir.Module(name="tensorc_sparse_attention_" + "_".join(kinds))
    _pack_bt(module)
    for kind in kinds:
        job(module, f"tc_sparse_attention_job_{kind}", _kernel(module, kind, sparse=True),
            [PTR] * 7 + [F32, F32, I64], 6, work="last")
    return module


_lock = threading.Lock()
_jobs: dict = {}


def ahead(kind: str) -> tuple:
    """The `jit.compile_ahead` job of a mask kind's module."""
    return (f"sparse_attention/{kind}", lambda: build_module((kind,)), True, False)


def kernel_job(kind: str) -> int:
    """The pool job of a mask kind's kernel, its own module, compiled on first use."""
    if kind not in MASKS:
        raise KeyError(kind)
    with _lock:
        if kind not in _jobs:
            name = f"tc_sparse_attention_job_{kind}"
            _jobs[kind] = compile_library(*ahead(kind)[:2], [name], *ahead(kind)[2:])[name]
    return _jobs[kind]


def workspace_size(s: int, d: int, dv: int) -> int:
    """Floats of one thread's workspace: the dense kernel's, then the tile counter (an
    int64 the kernel adds one to per key tile it visits: `tiles_visited`)."""
    return -(-s // BC) * BC * d + -(-d // 2) * 2 * BR + BR * -(-dv // 16) * 16 + BR * BC + 16


def _table(pat, t: int):
    """(intervals int64 [n, 3], groups [(i0, i1, iv0, iv1)]): rows no group covers see
    no key (NaN rows, as the reference leaves them)."""
    ivs, groups, covered = [], [], np.zeros(t, bool)
    for i0, i1, intervals in pat.groups:
        groups.append((i0, i1, len(ivs), len(ivs) + len(intervals)))
        ivs += [(lo, hi, int(banded)) for lo, hi, banded in intervals]
        covered[i0:i1] = True
    for i in np.flatnonzero(~covered):
        groups.append((int(i), int(i) + 1, 0, 0))
    return np.array(ivs or [(0, 0, 0)], np.int64).reshape(-1, 3), groups


def _block_costs(pat, i0: int, i1: int, intervals) -> np.ndarray:
    """Estimated work of each 8-row block of rows [i0, i1): its key tiles (as the
    kernel clips them) times the keys and rows of a tile, plus the block's fixed part."""
    first = np.arange(i0, i1, BR)
    last = np.minimum(first + BR, i1) - 1
    tiles = np.zeros(len(first), np.int64)
    for lo, hi, banded in intervals:
        lo_c, hi_c = np.full(first.shape, lo), np.full(first.shape, hi)
        if banded:
            lo_c = np.maximum(lo_c, first - min(pat.before, 1 << 40))
            hi_c = np.minimum(hi_c, last + min(pat.after, 1 << 40) + 1)
        if pat.causal:
            hi_c = np.minimum(hi_c, last + 1)
        tiles += np.where(lo_c < hi_c, -(-hi_c // BC) - lo_c // BC, 0)
    return tiles + 1


def _items(pat, groups, heads: int, threads: int, s: int):
    """Work items (h0, h1, i0, i1, iv0, iv1), the largest first: with one thread one per
    group with every head; else each group's rows cut, at 8-row blocks, into chunks of
    about total / (ITEMS_PER_THREAD x threads) work (K^T packing counted), a head each."""
    costs = [_block_costs(pat, i0, i1, pat.groups[n][2] if n < len(pat.groups) else ())
             for n, (i0, i1, _, _) in enumerate(groups)]
    if threads == 1:
        return [(0, heads, i0, i1, a, b) for i0, i1, a, b in groups]
    pack = -(-s // BC) // 4 + 1   # packing a head's tiles, in tile visits (rough)
    total = heads * sum(int(c.sum()) + pack for c in costs)
    target = max(total / (ITEMS_PER_THREAD * threads), 1)
    items = []
    for (i0, i1, a, b), c in zip(groups, costs, strict=True):
        start, acc = 0, pack
        for n, w in enumerate(c):
            acc += int(w)
            if acc >= target or n == len(c) - 1:
                r0, r1 = i0 + start * BR, min(i1, i0 + (n + 1) * BR)
                items += [(acc, (h, h + 1, r0, r1, a, b)) for h in range(heads)]
                start, acc = n + 1, pack
    items.sort(key=lambda x: -x[0])
    return [it for _, it in items]


def _check(q, k, v, out, what):
    arrays = [np.asarray(x) for x in (q, k, v)]
    if any(x.dtype != np.float32 for x in arrays):
        raise TensorcError(f"{what}: q, k, v must be float32, got "
                           + ", ".join(str(x.dtype) for x in arrays))
    q, k, v = arrays
    if not q.ndim == k.ndim == v.ndim == 4:
        raise ShapeError(f"{what} expects q [b,h,t,d], k [b,h,s,d], v [b,h,s,dv]: "
                         f"got {q.shape}, {k.shape}, {v.shape}")
    B, H, T, D = q.shape
    if k.shape[3] != D or v.shape[:3] != k.shape[:3] or k.shape[0] not in (1, B) \
            or k.shape[1] == 0 or H % k.shape[1]:
        raise ShapeError(f"{what}: k {k.shape} and v {v.shape} do not fit q {q.shape}")
    shape = (B, H, T, v.shape[3])
    if out is not None and (out.shape != shape or out.dtype != np.float32
                            or not out.flags.writeable or out.strides[-1] != 4
                            or any(st < 0 or st % 4 for st in out.strides)):
        raise TensorcError(f"{what}: out must be a writeable float32 {shape} array with "
                           f"unit inner stride, got {out.dtype} {out.shape}")
    return q, k, v, shape


def sparse_attention(op: str, q, k, v, mask=None, *, scale: float = 1.0,
                     mask_value: float = -math.inf, threads: int | None = None,
                     out: np.ndarray | None = None, **attrs) -> np.ndarray:
    """The sparse op `op` (`OPS`) with its attributes, as its reference computes it:
    q [b,h,t,d], k [bk,hk,s,d], v [bk,hk,s,dv]; mask broadcasts to [b,h,t,s] (bool
    keeps, float32 adds). float32 only. `out`: a float32 [b,h,t,dv] array with unit
    inner stride to write into."""
    q, k, v, shape = _check(q, k, v, out, op)
    if out is None:
        out = np.empty(shape, np.float32)
    if any(np.may_share_memory(out, x) for x in (q, k, v)):   # rows would clobber inputs
        out[...] = sparse_attention(op, q, k, v, mask, scale=scale, mask_value=mask_value,
                                    threads=threads, **attrs)
        return out
    bind(op, q, k, v, mask, scale=scale, mask_value=mask_value, threads=threads,
         out=out, **attrs)()
    return out


def bind(op: str, q, k, v, mask=None, *, scale: float = 1.0, mask_value: float = -math.inf,
         threads: int | None = None, out: np.ndarray, **attrs):
    """A zero-argument function computing the op into `out` (the runtime's binder, as
    `attention.bind`): the pattern's table, items, argument block and workspaces are
    made once. It has `patch(role, address)` ("q", "k", "v", "mask", "out") when the
    kernel reads the operands in place, and `tiles_visited()` (key tiles the kernel
    visited over all runs, per 8-row block and head: what tests check the skipping by).
    One caller at a time."""
    if op not in OPS:
        raise TensorcError(f"no sparse attention kernel for {op}")
    if out.dtype != np.float32 or not out.flags.writeable or out.strides[-1] != 4 \
            or any(st < 0 or st % 4 for st in out.strides):
        def copied():
            out[...] = sparse_attention(op, q, k, v, mask, scale=scale,
                                        mask_value=mask_value, threads=threads, **attrs)
        return copied
    q, k, v, _ = _check(q, k, v, out, op)
    if any(np.may_share_memory(out, x) for x in (q, k, v)):
        def aliased():
            sparse_attention(op, q, k, v, mask, scale=scale, mask_value=mask_value,
                             threads=threads, out=out, **attrs)
        return aliased
    B, H, T, D = q.shape
    S, DV, HK = k.shape[2], v.shape[3], k.shape[1]
    if mask is not None:
        kind, m = kernel_mask(mask, (B, H, T, S), op)
    if out.size == 0 or S == 0:
        def empty():   # softmax over no keys: 0 / 0, as the reference computes
            out.fill(np.nan)
        return empty
    qc = _unit_last(q)
    kc = np.broadcast_to(_unit_last(k), (B, HK, S, D))
    vc = np.broadcast_to(_unit_last(v), (B, HK, S, DV))
    if mask is None:
        kind, m = "none", out   # never read
    elif kind == "keep":
        m = m.view(np.uint8)
    pat = pattern(op, T, S, attrs)
    table, groups = _table(pat, T)
    dil = pat.dilation
    bits = [sum(1 << lane for lane in range(x, BC, dil)) if x < dil else 0
            for x in range(DIL_BITS)]
    meta = np.array([H, T, S, D, DV, *_estrides(qc), *_estrides(kc), *_estrides(vc),
                     *_estrides(out), *_estrides(m), H // HK,
                     min(pat.before, T + S), min(pat.after, T + S),   # no overflow
                     dil, *bits], np.int64)
    assert len(meta) == len(META) + len(SPARSE_META) + DIL_BITS
    threads = num_threads() if threads is None else max(1, int(threads))
    if B * H * max(pat.pairs(), 1) * (D + DV) < MIN_WORK:
        threads = 1
    items = _items(pat, groups, B * H, threads, S)
    workers = pool.get(threads) if threads > 1 and len(items) > 1 else None
    size = workspace_size(S, D, DV)
    works = [aligned_empty(size) for _ in range(workers.threads if workers else 1)]
    for w in works:
        w[-16:] = 0
    fixed = [qc.ctypes.data, kc.ctypes.data, vc.ctypes.data, out.ctypes.data,
             m.ctypes.data, meta.ctypes.data, table.ctypes.data, _f32_bits(scale),
             _f32_bits(mask_value), int(bool(pat.causal))]
    fn = kernel_job(kind)
    blocks, launches = [], []
    for n in range(0, len(items), pool.MAX_ITEMS):   # the pool's claim word's limit
        part = items[n:n + pool.MAX_ITEMS]
        block = np.array([*fixed, len(works), *[w.ctypes.data for w in works],
                          *[x for it in part for x in it]], np.int64)
        blocks.append(block)
        launches.append(pool.launcher(fn, block.ctypes.data, len(part),
                                      threads if workers else 1))

    def run():
        for launch in launches:
            launch()
    inputs = (q, k, v) + ((np.asarray(mask),) if mask is not None else ())
    in_place = all(np.may_share_memory(x, y) for x, y in zip((qc, kc, vc, m), inputs,
                                                             strict=False))
    slots = {"q": 0, "k": 1, "v": 2, "out": 3, "mask": 4 if mask is not None else None}

    def patch(role: str, address: int) -> None:
        if slots[role] is not None:
            for block in blocks:
                block[slots[role]] = address
    if in_place:   # a copy (made contiguous, broadcast) would go stale
        run.patch = patch
    run.tiles_visited = lambda: sum(int(w[-16:].view(np.int64)[0]) for w in works)
    run.keep = (qc, kc, vc, m, meta, table, works, blocks)
    return run
