"""The LLVM backend's flash attention against a plain numpy softmax(q k^T * scale + mask) v."""

import math

import numpy as np
import pytest

from tensorc.backends.llvm.attention import attention
from tensorc.errors import ShapeError, TensorcError
from tensorc.ops.attention import attention as op_reference


@pytest.fixture
def rng():
    return np.random.default_rng(7)


def randn(rng, *shape):
    return rng.standard_normal(shape, dtype=np.float32)


def naive(q, k, v, mask=None, scale=1.0, causal=False, mask_value=-math.inf):
    """The unfused definition in float64, materialising the [t, s] scores."""
    q, k, v = (x.astype(np.float64) for x in (q, k, v))
    scores = scale * q @ np.swapaxes(k, -1, -2)
    t, s = scores.shape[-2:]
    if causal:
        scores = np.where(np.tri(t, s, dtype=bool), scores, mask_value)
    if mask is not None:
        scores = np.where(mask, scores, mask_value) if mask.dtype == np.bool_ \
            else scores + mask
    with np.errstate(invalid="ignore"):
        w = np.exp(scores - scores.max(-1, keepdims=True))
        return (w / w.sum(-1, keepdims=True)) @ v


def assert_close(got, want, tol=1e-4):
    assert got.shape == want.shape and got.dtype == np.float32
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err <= tol, f"relative error {err:.2e}"


# b, h, t, s, d, dv: ones, t != s both ways, sizes off the 8-row / 32-key / 16-lane grid
SHAPES = [(1, 1, 1, 1, 1, 1), (2, 3, 17, 33, 16, 20), (1, 2, 129, 65, 64, 64),
          (1, 1, 5, 100, 3, 17), (1, 2, 40, 40, 64, 64), (1, 1, 70, 3, 8, 8)]


def qkv(rng, b, h, t, s, d, dv):
    return randn(rng, b, h, t, d), randn(rng, b, h, s, d), randn(rng, b, h, s, dv)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_plain_and_causal(rng, shape, causal):
    q, k, v = qkv(rng, *shape)
    scale = 1 / math.sqrt(shape[4])
    assert_close(attention(q, k, v, scale=scale, causal=causal),
                 naive(q, k, v, scale=scale, causal=causal))


@pytest.mark.parametrize("shape", SHAPES[1:])
def test_additive_masks(rng, shape):
    b, h, t, s = shape[:4]
    q, k, v = qkv(rng, *shape)
    for mask in (randn(rng, t, s), randn(rng, b, 1, 1, s), randn(rng, b, h, t, 1)):
        assert_close(attention(q, k, v, mask, scale=0.3), naive(q, k, v, mask, scale=0.3))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES[1:])
def test_boolean_keep_masks(rng, shape, causal):
    b, h, t, s = shape[:4]
    q, k, v = qkv(rng, *shape)
    keep = rng.random((b, 1, 1, s)) > 0.4
    keep[..., 0] = True                     # every row keeps a key: no all-masked rows
    assert_close(attention(q, k, v, keep, scale=0.5, causal=causal),
                 naive(q, k, v, keep, scale=0.5, causal=causal))
    keep_rows = rng.random((t, s)) > 0.3
    keep_rows[:, 0] = True
    assert_close(attention(q, k, v, keep_rows, scale=0.5), naive(q, k, v, keep_rows, 0.5))


def test_fully_masked_rows_follow_the_op(rng):
    """-inf masks give NaN rows (0/0) like the op; a finite mask_value gives uniform weights."""
    q, k, v = qkv(rng, 1, 2, 9, 40, 8, 8)
    keep = np.ones((9, 40), bool)
    keep[3] = False
    got = attention(q, k, v, keep)
    assert np.isnan(got[:, :, 3]).all() and not np.isnan(np.delete(got, 3, axis=2)).any()
    with np.errstate(invalid="ignore"):   # the op's own 0 / 0 on the masked row
        want = op_reference(q, k, v, keep)
    assert_close(np.delete(got, 3, axis=2), np.delete(want, 3, axis=2))
    finite = np.float32(np.finfo(np.float32).min)
    got = attention(q, k, v, keep, mask_value=finite, causal=True)
    assert_close(got, naive(q, k, v, keep, mask_value=float(finite), causal=True))
    assert_close(got[:, :, 3], v.mean(axis=2))


def test_nan_in_a_key_reaches_every_row_that_sees_it(rng):
    q, k, v = qkv(rng, 1, 1, 12, 40, 8, 8)
    k[0, 0, 5, 3] = np.nan
    got = attention(q, k, v, causal=True)
    assert np.isnan(got[0, 0, 5:]).all() and not np.isnan(got[0, 0, :5]).any()


def test_strided_and_broadcast_inputs(rng):
    b, t, h, d = 2, 19, 4, 16
    x = randn(rng, b, t, 3, h, d)                 # a fused qkv projection, [b, t, 3, h, d]
    q, k, v = (x[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
    assert not q.flags.c_contiguous
    assert_close(attention(q, k, v, scale=0.25, causal=True),
                 naive(q, k, v, scale=0.25, causal=True))
    k1, v1 = randn(rng, 1, 1, 23, d), randn(rng, 1, 1, 23, 12)   # one shared k/v head
    q1 = randn(rng, b, h, t, d)
    assert_close(attention(q1, k1, v1), naive(q1, k1, v1))


@pytest.mark.parametrize("shape", [(1, 1, 200, 150, 32, 48), (2, 3, 64, 64, 64, 64)])
def test_threads_give_identical_results(rng, shape):
    q, k, v = qkv(rng, *shape)
    mask = randn(rng, shape[2], shape[3])
    one = attention(q, k, v, mask, scale=0.2, causal=True, threads=1)
    two = attention(q, k, v, mask, scale=0.2, causal=True, threads=2)
    assert np.array_equal(one, two)
    assert_close(two, naive(q, k, v, mask, scale=0.2, causal=True))


def test_out_parameter_including_aliasing(rng):
    q, k, v = qkv(rng, 1, 2, 20, 20, 16, 16)
    want = naive(q, k, v, causal=True)
    buf = np.zeros((1, 2, 24, 16), np.float32)
    got = attention(q, k, v, causal=True, out=buf[:, :, 2:22])
    assert got.base is buf or np.shares_memory(got, buf)
    assert_close(buf[:, :, 2:22], want)
    assert not buf[:, :, :2].any() and not buf[:, :, 22:].any()
    attention(q, k, v, causal=True, out=q)          # in place over q: still right
    assert_close(q, want)
    with pytest.raises(TensorcError, match="out must be"):
        attention(k, k, v, out=np.zeros((1, 2, 20, 15), np.float32))


def test_matches_the_registered_op(rng):
    q, k, v = qkv(rng, 2, 2, 33, 47, 16, 16)
    keep = rng.random((2, 1, 33, 47)) > 0.2
    keep[..., 0] = True
    assert_close(attention(q, k, v, keep, scale=0.25, causal=True),
                 op_reference(q, k, v, keep, scale=0.25, causal=True).astype(np.float64))
    add = randn(rng, 1, 2, 1, 47)
    for mask in (keep, add):   # an exporter's finite mask_value, as the op keeps it
        assert_close(attention(q, k, v, mask, scale=0.25, causal=True, mask_value=-1e4),
                     op_reference(q, k, v, mask, scale=0.25, causal=True, mask_value=-1e4)
                     .astype(np.float64))


def test_bad_inputs_raise_one_clear_error(rng):
    q, k, v = qkv(rng, 1, 2, 4, 5, 8, 8)
    with pytest.raises(TensorcError, match="float32"):
        attention(q.astype(np.float64), k, v)
    with pytest.raises(ShapeError, match="do not fit"):
        attention(q, k[..., :4], v)
    with pytest.raises(ShapeError, match="q \\[b,h,t,d\\]"):
        attention(q[0], k[0], v[0])
    with pytest.raises(TensorcError, match="mask must be bool"):
        attention(q, k, v, np.zeros((4, 5), np.int32))
    with pytest.raises(ShapeError, match="does not broadcast"):
        attention(q, k, v, np.zeros((3, 5), np.float32))
    with pytest.raises(ShapeError, match="does not broadcast"):
        attention(q, k, v, np.zeros((4, 7), bool))


@pytest.mark.parametrize("causal", [False, True])
def test_bind_follows_the_arrays_it_was_given(rng, causal):
    """The runtime's form: strided q, k, v views of one qkv buffer, `out` given."""
    from tensorc.backends.llvm.attention import bind
    qkv = randn(rng, 1, 96, 3, 4, 32)
    q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
    mask = randn(rng, 1, 1, 96, 96)
    out = np.full((1, 4, 96, 32), np.nan, np.float32)
    run = bind(q, k, v, mask, scale=0.2, causal=causal, threads=2, out=out)
    for _ in range(2):   # new contents in the same memory: the next run sees them
        run()
        assert_close(out, naive(q, k, v, mask, 0.2, causal))
        qkv[...] = randn(rng, *qkv.shape)
        mask[...] = randn(rng, *mask.shape)


def test_bind_with_a_mask_that_needs_a_copy(rng):
    """A mask strided along the keys is made contiguous on every call, never frozen."""
    from tensorc.backends.llvm.attention import bind
    q, k, v = randn(rng, 1, 8, 64, 32), randn(rng, 1, 8, 64, 32), randn(rng, 1, 8, 64, 32)
    mask = randn(rng, 1, 1, 64, 64).transpose(0, 1, 3, 2)
    out = np.empty((1, 8, 64, 32), np.float32)
    run = bind(q, k, v, mask, threads=2, out=out)
    for _ in range(2):
        run()
        assert_close(out, naive(q, k, v, mask))
        mask[...] = randn(rng, *mask.shape) * 3


def test_bind_into_an_out_the_kernel_cannot_write(rng):
    from tensorc.backends.llvm.attention import bind
    q, k, v = randn(rng, 1, 2, 40, 16), randn(rng, 1, 2, 40, 16), randn(rng, 1, 2, 40, 16)
    out = np.zeros((1, 2, 40, 32), np.float32)[..., ::2]   # inner stride 2 elements
    bind(q, k, v, None, 0.5, True, threads=2, out=out)()
    assert_close(out, naive(q, k, v, None, 0.5, True))
