"""The cuBLAS call plans of the cupy backend (backends/cupy/gemm.py), run with numpy.

The GPU runs these plans through cublasGemmStridedBatchedEx; here the same
column-major arithmetic runs on flat numpy arrays, over the operand layouts the
lowering hands out: transposed and sliced views, broadcast batches, shared weights,
vectors. Each must equal numpy's matmul, and only truly unusable layouts may ask
for a copy.
"""

import numpy as np
import pytest

from tensorc.backends.cupy.gemm import OP_N, OP_T, needs_copy, plan_gemm, run_plan_numpy


def _elements(view: np.ndarray, base: np.ndarray):
    """The view's element strides and the flat base array starting at its first element."""
    off = (view.__array_interface__["data"][0] - base.__array_interface__["data"][0])
    off //= base.itemsize
    return [s // view.itemsize for s in view.strides], base.reshape(-1)[off:]


def _run(a_view, a_base, b_view, b_base):
    want = np.matmul(a_view, b_view)
    out = np.full(want.shape, np.nan, np.float32)
    sa, fa = _elements(a_view, a_base)
    sb, fb = _elements(b_view, b_base)
    calls = plan_gemm(a_view.shape, sa, b_view.shape, sb, out.shape,
                      [s // 4 for s in out.strides])
    assert calls is not None
    run_plan_numpy(calls, fa, fb, out.reshape(-1))
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    return calls


rng = np.random.default_rng(0)


def _rand(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def test_plain_2d_is_one_call_without_transposes():
    a, b = _rand(5, 7), _rand(7, 3)
    (call,) = _run(a, a, b, b)
    assert (call.op_a, call.op_b, call.batch) == (OP_N, OP_N, 1)


def test_shared_weight_folds_the_batch_into_rows():
    a, w = _rand(2, 3, 5, 7), _rand(7, 4)
    (call,) = _run(a, a, w, w)
    assert call.batch == 1 and call.n == 2 * 3 * 5


def test_transposed_operands_use_the_transpose_flag():
    at, bt = _rand(7, 5), _rand(3, 7)
    (call,) = _run(at.T, at, bt.T, bt)
    assert (call.op_a, call.op_b) == (OP_T, OP_T)


def test_attention_like_batched_views():
    # q [b, s, h, d] read as [b, h, s, d]; k^T as a transposed view
    q, k = _rand(2, 6, 4, 8), _rand(2, 6, 4, 8)
    qv, kv = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 3, 1)
    calls = _run(qv, q, kv, k)
    assert len(calls) == 2 and calls[0].batch == 4   # b looped, heads strided


def test_broadcast_batches_and_sliced_rows():
    a = _rand(3, 1, 5, 16)[..., :7]          # ld 16 > 7 columns
    b = _rand(1, 4, 7, 3)
    _run(a, a.base if a.base is not None else a, b, b)


@pytest.mark.parametrize("shapes", [((1, 7), (7, 3)), ((5, 7), (7, 1)), ((5, 1), (1, 3)),
                                    ((2, 1, 7), (7, 1)), ((3, 5, 7), (3, 7, 2))])
def test_vectors_and_unit_dims(shapes):
    a, b = _rand(*shapes[0]), _rand(*shapes[1])
    _run(a, a, b, b)


def test_unusable_layouts_ask_for_a_copy():
    a = np.broadcast_to(_rand(1, 7), (5, 7))          # stride 0 inside the matrix
    b = _rand(7, 3)
    assert plan_gemm(a.shape, [s // 4 for s in a.strides], b.shape, [3, 1], (5, 3),
                     [3, 1]) is None
    out_strided = plan_gemm((5, 7), [7, 1], (7, 3), [3, 1], (5, 3), [6, 2])
    assert out_strided is None


def _random_operand(r, batch, shape):
    """A view of `batch + shape` (some batch dims 1) with its axes in random memory order."""
    bshape = tuple(d if r.random() < 0.7 else 1 for d in batch) + shape
    perm = list(r.permutation(len(bshape)))
    base = r.standard_normal([bshape[p] for p in perm]).astype(np.float32)
    return base.transpose(np.argsort(perm)), base


def test_random_layouts_match_numpy():
    """Random ranks, batch broadcasting and axis permutations of both operands."""
    copies = 0
    for trial in range(300):
        r = np.random.default_rng(trial)
        batch = tuple(int(x) for x in r.integers(1, 4, r.integers(0, 3)))
        m, k, n = (int(x) for x in r.integers(1, 6, 3))
        (a, ab), (b, bb) = _random_operand(r, batch, (m, k)), _random_operand(r, batch, (k, n))
        # what the runtime does: an operand whose matrices have no contiguous axis is
        # copied first (and only such an operand)
        if needs_copy(a.shape, [s // 4 for s in a.strides]):
            a = ab = np.ascontiguousarray(a)
            copies += 1
        if needs_copy(b.shape, [s // 4 for s in b.strides]):
            b = bb = np.ascontiguousarray(b)
            copies += 1
        _run(a, ab, b, bb)
    assert copies < 150   # most random layouts are read in place
