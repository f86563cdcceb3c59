"""Matmuls on strided views as cuBLAS calls, planned on the host.

cuBLAS is column-major. A row-major matrix read as column-major is its transpose, so
`out = a @ b` (row-major) is computed as `out^T = b^T @ a^T` (column-major): each
operand is passed as it lies, with a transpose flag where its rows, not its columns,
are contiguous. Batch dims become one strided-batched call when every operand walks
them with a single stride; a weight shared by the whole batch folds the batch into
the rows instead (one large GEMM). What fits neither loops over the leading batch
dims. `plan_gemm` returns None where an operand has no usable layout (a broadcast or
negative stride inside the matrix): the caller copies it contiguous first.

The plan is plain numbers, so the CPU emulator runs it too (`run_plan_numpy`), and
the tests check it against numpy matmul on transposed, broadcast and sliced views.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

OP_N, OP_T = 0, 1


@dataclass(frozen=True)
class GemmCall:
    """One cublasGemmStridedBatchedEx: C (m x n, column-major) = op(A1) @ op(A2), with
    A1 our `b`, A2 our `a`, C our `out`; offsets and strides in elements."""
    op_b: int
    op_a: int
    m: int
    n: int
    k: int
    ld_b: int
    ld_a: int
    ld_c: int
    offset_b: int
    offset_a: int
    offset_c: int
    stride_b: int
    stride_a: int
    stride_c: int
    batch: int


def _matrix_layout(rows: int, cols: int, s_row: int, s_col: int):
    """(op for the transposed operand, ld) of a row-major [rows, cols] view, or None.
    Row-major storage read column-major is the transpose (op N); column-major
    storage needs op T. Strides of size-1 dims do not matter."""
    if (cols == 1 or s_col == 1) and (rows == 1 or s_row >= max(cols, 1)):
        return OP_N, s_row if rows > 1 else max(cols, 1)
    if (rows == 1 or s_row == 1) and (cols == 1 or s_col >= max(rows, 1)):
        return OP_T, s_col if cols > 1 else max(rows, 1)
    return None


def needs_copy(shape, strides) -> bool:
    """Whether cuBLAS cannot read this operand's matrices in place (neither their rows
    nor their columns are contiguous)."""
    return _matrix_layout(shape[-2], shape[-1], strides[-2], strides[-1]) is None


def _single_stride(shape, strides) -> int | None:
    """The one stride that walks `shape` in row-major order, or None if there is none."""
    dims = [(n, s) for n, s in zip(shape, strides, strict=True) if n != 1]
    if not dims:
        return 0
    for (_, s0), (n1, s1) in itertools.pairwise(dims):
        if s0 != s1 * n1:
            return None
    return dims[-1][1]


def _batch_strides(shape, strides, batch_shape) -> list[int]:
    """An operand's strides over the output's batch dims (0 where it broadcasts)."""
    lead = len(batch_shape) - (len(shape) - 2)
    own = list(zip(shape[:-2], strides[:-2], strict=True))
    out = [0] * lead
    out += [s if n != 1 else 0 for n, s in own]
    return out


def plan_gemm(a_shape, a_strides, b_shape, b_strides, out_shape, out_strides
              ) -> list[GemmCall] | None:
    """cuBLAS calls computing out = a @ b (numpy matmul semantics, ranks >= 2, out
    contiguous); strides in elements. None if a or b needs a contiguous copy first."""
    m, k = a_shape[-2:]
    n = b_shape[-1]
    batch_shape = tuple(out_shape[:-2])
    if _single_stride(out_shape, out_strides) not in (0, 1):   # out must be contiguous
        return None
    la = _matrix_layout(m, k, a_strides[-2], a_strides[-1])
    lb = _matrix_layout(k, n, b_strides[-2], b_strides[-1])
    if la is None or lb is None:
        return None
    sa = _batch_strides(a_shape, a_strides, batch_shape)
    sb = _batch_strides(b_shape, b_strides, batch_shape)
    sc = _batch_strides(out_shape, out_strides, batch_shape)
    # A weight shared by every batch element: fold the batch into a's rows.
    if la[0] == OP_N and all(s == 0 for s in sb):
        rows = _single_stride(batch_shape + (m,), sa + [a_strides[-2] if m > 1 else 0])
        if rows is not None:
            big_m = int(np.prod(batch_shape, dtype=np.int64)) * m
            ld_a = rows if big_m > 1 else max(k, 1)
            if ld_a >= max(k, 1):
                return [GemmCall(lb[0], OP_N, n, big_m, k, lb[1], ld_a, max(n, 1),
                                 0, 0, 0, 0, 0, 0, 1)]
    # Strided batched over the trailing batch dims that every operand walks with one
    # stride; loop over the ones in front of them.
    for split in range(len(batch_shape) + 1):
        inner = batch_shape[split:]
        strides = [_single_stride(inner, s[split:]) for s in (sa, sb, sc)]
        if None not in strides:
            break
    count = int(np.prod(inner, dtype=np.int64))
    calls = []
    for idx in itertools.product(*(range(d) for d in batch_shape[:split])):
        off = [sum(i * s for i, s in zip(idx, st[:split], strict=True)) for st in (sa, sb, sc)]
        calls.append(GemmCall(lb[0], la[0], n, m, k, lb[1], la[1], max(n, 1),
                              off[1], off[0], off[2], strides[1], strides[0], strides[2],
                              count))
    return calls


def run_plan_numpy(calls: list[GemmCall], a_flat, b_flat, out_flat) -> None:
    """Execute the plan's column-major arithmetic with numpy on flat element arrays:
    what cuBLAS does, for the CPU emulator and the tests."""
    def operand(flat, offset, op, rows, cols, ld):
        # stored column-major: `rows x cols` after op; before op it is the transpose
        r, c = (rows, cols) if op == OP_N else (cols, rows)
        it = flat.itemsize
        x = np.lib.stride_tricks.as_strided(flat[offset:], (r, c), (it, ld * it))
        return x if op == OP_N else x.T

    for g in calls:
        for i in range(g.batch):
            x1 = operand(b_flat, g.offset_b + i * g.stride_b, g.op_b, g.m, g.k, g.ld_b)
            x2 = operand(a_flat, g.offset_a + i * g.stride_a, g.op_a, g.k, g.n, g.ld_a)
            it = out_flat.itemsize
            c = np.lib.stride_tricks.as_strided(out_flat[g.offset_c + i * g.stride_c:],
                                                (g.m, g.n), (it, g.ld_c * it))
            c[...] = x1 @ x2
