"""The attention kernels' numpy side, shared by the dense, sparse, linear and backward
kernels: operands in the layout the kernels read (unit inner stride, element
strides), the mask as they read it, float32 arguments as bits, and the runner of a
planned job (workspaces and argument block made once)."""

from __future__ import annotations

import numpy as np

from tensorc.errors import ShapeError, TensorcError

from . import pool
from .gemm import aligned_empty


def _unit_last(x: np.ndarray) -> np.ndarray:
    """x with unit stride on its last axis and non-negative element strides."""
    if x.strides[-1] != x.itemsize or any(st < 0 or st % x.itemsize for st in x.strides):
        return np.ascontiguousarray(x)
    return x


def _estrides(x: np.ndarray) -> list[int]:
    return [st // x.itemsize for st in x.strides[:3]]


def kernel_mask(mask, shape, what: str):
    """(kind, the mask as [b, h, t, s] with a contiguous key axis): what the attention
    kernels (forward and backward) read, 16 keys at once; kind "keep" (bool) or "add"
    (float32)."""
    B, H, T, S = shape
    mask = np.asarray(mask)
    if mask.dtype == np.bool_:
        kind = "keep"
    elif mask.dtype == np.float32:
        kind = "add"
    else:
        raise TensorcError(f"{what}: mask must be bool (keep) or float32 (additive), got "
                           f"{mask.dtype}")
    if mask.ndim > 4:
        raise ShapeError(f"{what}: mask {mask.shape} has more than 4 dims")
    m4 = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    try:
        m4 = np.ascontiguousarray(np.broadcast_to(m4, m4.shape[:3] + (S,))) \
            if m4.shape[3] != S or m4.strides[3] != m4.itemsize else _unit_last(m4)
        return kind, np.broadcast_to(m4, shape)
    except ValueError:
        raise ShapeError(f"{what}: mask {mask.shape} does not broadcast to the scores "
                         f"{tuple(shape)}") from None


def bound_job(job, fixed, items, threads: int, work_size: int, keep, slots: dict):
    """The runner of a planned library job (`_plan`'s parts): the workspaces (one per
    pool thread) and the argument block made once; `run.patch(role, address)` rewrites
    the block's word `slots[role]` (None: that operand is absent)."""
    workers = pool.get(threads) if threads > 1 and len(items) > 1 else None
    works = [aligned_empty(work_size) for _ in range(workers.threads if workers else 1)]
    block = np.array([*fixed, len(works), *[w.ctypes.data for w in works],
                      *[x for it in items for x in it]], np.int64)
    run = pool.launcher(job, block.ctypes.data, len(items), threads if workers else 1)

    def patch(role: str, address: int) -> None:
        if slots[role] is not None:
            block[slots[role]] = address
    run.patch = patch
    run.keep = (keep, works, block)
    return run


def _f32_bits(x: float) -> int:
    return int(np.array(x, np.float32).view(np.int32))
