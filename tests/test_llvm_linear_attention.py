"""The LLVM backend's Performer (FAVOR+) linear attention against the op's numpy reference
(`tensorc/ops/sparse_attention.py`), directly and as a lowered graph without fallbacks.

Tolerance: both sides are float32, and every output row is a convex combination of the
rows of v (the features are positive), so errors are measured against the largest
|output|: max |got - ref| / max |ref| <= 1e-4. Observed errors are ~1e-6 (the logits,
~10-30 in magnitude, carry float32 rounding of ~1e-6 into exp)."""

import math
import time

import numpy as np
import pytest

from tensorc.backends import available_backends, get_backend
from tensorc.backends.llvm.linear_attention import CC, C, bind, linear_attention, workspace_floats
from tensorc.errors import ShapeError, TensorcError
from tensorc.ir import Graph, TensorType
from tensorc.ops.sparse_attention import linear_attention as reference
from tensorc.ops.sparse_attention import performer_features

pytestmark = pytest.mark.skipif("llvm" not in available_backends(), reason="needs llvm")


@pytest.fixture
def rng():
    return np.random.default_rng(11)


def randn(rng, *shape):
    return rng.standard_normal(shape, dtype=np.float32)


def assert_close(got, want, tol=1e-4):
    assert got.shape == want.shape and got.dtype == np.float32
    assert np.isfinite(want).all()
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err <= tol, f"relative error {err:.2e}"


def make_mask(rng, kind, b, s, h=1):
    if kind == "bool":
        keep = rng.random((b, h, 1, s)) > 0.3
        keep[..., 0] = True   # causal rows see key 0: no row without any key
        return keep
    if kind == "float":
        return randn(rng, b, h, 1, s)
    return None


def case(rng, b=2, h=2, hk=1, t=65, s=65, d=16, dv=24, m=64, mask=None, causal=False,
         threads=2, seed=0, bk=None):
    q = randn(rng, b, h, t, d)
    k, v = randn(rng, bk or b, hk, s, d), randn(rng, bk or b, hk, s, dv)
    w = performer_features(d, m, seed)
    mk = make_mask(rng, mask, b, s)
    scale = 1 / math.sqrt(d)
    got = linear_attention(q, k, v, w, mk, scale=scale, causal=causal, threads=threads)
    assert_close(got, reference(q, k, v, w, mk, scale=scale, causal=causal))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", [1, 7, 65, 130, 300])
def test_lengths_off_the_chunk(rng, n, causal):
    assert (C, CC) == (64, 32)   # none of the lengths is a multiple of either
    case(rng, t=n, s=n, causal=causal)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("t, s", [(7, 130), (130, 7), (300, 65), (65, 300), (1, 300)])
def test_queries_and_keys_differ(rng, t, s, causal):
    case(rng, t=t, s=s, causal=causal)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask", [None, "bool", "float"])
@pytest.mark.parametrize("hk", [1, 2, 4])
def test_grouped_heads_and_masks(rng, hk, mask, causal):
    case(rng, b=2, h=4, hk=hk, t=130, s=130, mask=mask, causal=causal)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d, dv", [(16, 24), (64, 48)])
@pytest.mark.parametrize("m", [16, 64, 100, 256])
def test_feature_counts(rng, m, d, dv, causal):
    case(rng, b=1, h=2, t=130, s=100, d=d, dv=dv, m=m, mask="float", causal=causal)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("heads", [(1, 1, 1), (1, 2, 1), (3, 1, 1), (1, 8, 2), (2, 4, 1)])
def test_threads_split_heads_or_rows(rng, heads, threads, causal):
    """Enough work for two threads: by runs of query heads sharing a key/value head's
    state (cut smaller while fewer than threads), or by query rows where there is one
    head (causal ranges start on a chunk and build the state before)."""
    b, h, hk = heads
    case(rng, b=b, h=h, hk=hk, t=300, s=300, d=64, dv=48, m=256, mask="bool",
         causal=causal, threads=threads)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("t, s", [(300, 100), (100, 300), (500, 20)])
def test_row_ranges_with_unequal_lengths(rng, t, s, causal):
    """One head on two threads: ranges of query rows, past the keys or short of them."""
    case(rng, b=1, h=1, hk=1, t=t, s=s, d=64, dv=40, m=256, mask="float", causal=causal)


def test_masked_out_keys(rng):
    """-inf in a float mask drops a key as False in a bool one does."""
    b, h, t, d, m = 2, 2, 90, 16, 64
    q, k, v = randn(rng, b, h, t, d), randn(rng, b, h, t, d), randn(rng, b, h, t, d)
    w = performer_features(d, m, 7)
    keep = rng.random((b, 1, 1, t)) > 0.5
    keep[..., 0] = True
    add = np.where(keep, np.float32(0), np.float32(-np.inf))
    for causal in (False, True):
        want = reference(q, k, v, w, keep, scale=0.25, causal=causal)
        for mk in (keep, add):
            assert_close(linear_attention(q, k, v, w, mk, scale=0.25, causal=causal), want)


def test_broadcast_batch_and_head_masks(rng):
    """k, v with batch 1 against q's batch 2; a mask varying by head; a 1-D mask."""
    b, h, t, s, d, m = 2, 4, 70, 90, 16, 32
    q, k, v = randn(rng, b, h, t, d), randn(rng, 1, 2, s, d), randn(rng, 1, 2, s, 8)
    w = performer_features(d, m, 3)
    for mk in (make_mask(rng, "bool", b, s, h), make_mask(rng, "float", b, s, h),
               randn(rng, s), rng.random(s) > 0.5):
        for causal in (False, True):
            if causal and mk.dtype == np.bool_:
                mk = mk.copy()
                mk[..., 0] = True
            got = linear_attention(q, k, v, w, mk, scale=0.3, causal=causal, threads=2)
            assert_close(got, reference(q, k, v, w, mk, scale=0.3, causal=causal))


def test_strided_operands_and_out(rng):
    """q, k, v as transposed views ([b, t, h, d] memory), out a strided view, and out
    overlapping q (computed aside, then copied)."""
    b, h, t, d, m = 2, 2, 40, 16, 48
    q = randn(rng, b, t, h, d).transpose(0, 2, 1, 3)
    k = randn(rng, b, t, h, d).transpose(0, 2, 1, 3)
    v = randn(rng, b, t, h, d).transpose(0, 2, 1, 3)
    w = performer_features(d, m, 5)
    want = reference(q, k, v, w, scale=0.25, causal=True)
    big = np.zeros((b, h, t, 2 * d), np.float32)
    linear_attention(q, k, v, w, scale=0.25, causal=True, out=big[..., :d])
    assert_close(big[..., :d], want)
    assert (big[..., d:] == 0).all()
    qq = q.copy()
    assert_close(linear_attention(qq, k, v, w, scale=0.25, causal=True, out=qq), want)


def test_errors(rng):
    q, k, v = randn(rng, 1, 2, 5, 8), randn(rng, 1, 2, 5, 8), randn(rng, 1, 2, 5, 8)
    w = performer_features(8, 16)
    with pytest.raises(TensorcError):
        linear_attention(q.astype(np.float64), k, v, w)
    with pytest.raises(ShapeError):
        linear_attention(q, k, v, performer_features(4, 16))
    with pytest.raises(ShapeError):
        linear_attention(q, k, v, w, np.ones((1, 1, 5, 5), bool))   # not a key mask


def test_bind_patches_moved_operands(rng):
    """`bind` makes its argument block once; `patch` points it at new memory."""
    b, h, t, d, m = 1, 2, 100, 16, 64
    q, k, v = randn(rng, b, h, t, d), randn(rng, b, h, t, d), randn(rng, b, h, t, d)
    w = performer_features(d, m, 2)
    mk = make_mask(rng, "float", b, t)
    out = np.empty((b, h, t, d), np.float32)
    run = bind(q, k, v, w, mk, scale=0.25, causal=True, threads=2, out=out)
    run()
    assert_close(out, reference(q, k, v, w, mk, scale=0.25, causal=True))
    q2, v2, out2 = randn(rng, b, h, t, d), randn(rng, b, h, t, d), np.empty_like(out)
    for role, x in (("q", q2), ("v", v2), ("out", out2)):
        run.patch(role, x.ctypes.data)
    run()
    assert_close(out2, reference(q2, k, v2, w, mk, scale=0.25, causal=True))


def _graph(shapes, m, causal, mask_dtype=None, dtype="f32", features_input=False):
    g = Graph("linear")
    q, k, v = (g.add_input(n, TensorType(s, dtype)) for n, s in zip("qkv", shapes, strict=True))
    d = shapes[0][3]
    w = g.add_input("w", TensorType((m, d), dtype)) if features_input else \
        g.add_constant("w", performer_features(d, m, 4).astype(dtype.replace("f", "float")))
    ins = [q, k, v, w]
    if mask_dtype:
        ins.append(g.add_input("mask", TensorType((shapes[0][0], 1, 1, shapes[1][2]),
                                                  mask_dtype)))
    g.outputs = g.add_node("linear_attention", ins,
                           {"scale": 1 / math.sqrt(d), "causal": causal})
    return g


def _feeds(rng, g, dtype=np.float32):
    feeds = {}
    for x in g.inputs:
        shape = x.type.shape
        if x.name == "mask":
            feeds[x.name] = make_mask(rng, "bool" if x.type.dtype == "bool" else "float",
                                      shape[0], shape[3])
        elif x.name == "w":
            feeds[x.name] = performer_features(shape[1], shape[0], 9)
        else:
            feeds[x.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def _steps(exe):
    return [s for r in exe._runners.values() for s in r.program.steps]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask", [None, "bool", "f32"])
def test_graph_on_llvm_without_fallbacks(rng, mask, causal):
    """A tiny graph: one library call, no fallback, the numpy backend's result; twice,
    with new inputs (the runtime moves the operands)."""
    g = _graph([(2, 4, 65, 16), (2, 2, 130, 16), (2, 2, 130, 24)], 100, causal, mask)
    exe = get_backend("llvm").compile(g)
    for _ in range(2):
        feeds = _feeds(rng, g)
        want = get_backend("numpy").compile(g).run(feeds)
        got = exe.run(feeds)
        for name, w in want.items():
            assert_close(got[name], w)
    assert [f for r in exe._runners.values() for f in r.program.stats()["fallbacks"]] == []
    assert [s.op for s in _steps(exe)] == ["linear_attention"]


def test_graph_features_as_input(rng):
    g = _graph([(1, 2, 70, 32), (1, 1, 70, 32), (1, 1, 70, 16)], 64, True,
               features_input=True)
    exe = get_backend("llvm").compile(g)
    feeds = _feeds(rng, g)
    want = get_backend("numpy").compile(g).run(feeds)
    got = exe.run(feeds)
    for name, w in want.items():
        assert_close(got[name], w)
    assert [s.op for s in _steps(exe)] == ["linear_attention"]


def test_graph_float64_runs_the_decomposition(rng):
    """Not float32: no kernel (NotLowerable), the op's decomposition lowers instead."""
    g = _graph([(1, 2, 20, 8), (1, 2, 20, 8), (1, 2, 20, 8)], 16, True, dtype="f64")
    exe = get_backend("llvm").compile(g)
    feeds = _feeds(rng, g, np.float64)
    want = get_backend("numpy").compile(g).run(feeds)
    got = exe.run(feeds)
    for name, w in want.items():
        np.testing.assert_allclose(got[name], w, rtol=1e-9, atol=1e-9)
    assert "linear_attention" not in [getattr(s, "op", None) for s in _steps(exe)]


@pytest.mark.parametrize("causal", [False, True])
def test_long_sequence_is_fast(rng, causal):
    """seq 16384, h2 d32 m64 on the llvm backend: linear work, a fixed workspace
    (quadratic attention would need 16384^2 scores per head)."""
    shapes = [(1, 2, 16384, 32)] * 3
    g = _graph(shapes, 64, causal, features_input=True)
    exe = get_backend("llvm").compile(g)
    feeds = _feeds(rng, g)
    exe.run(feeds)   # compiled and bound
    start = time.perf_counter()
    got = exe.run(feeds)[g.outputs[0].name]
    elapsed = time.perf_counter() - start
    assert [f for r in exe._runners.values() for f in r.program.stats()["fallbacks"]] == []
    assert_close(got, reference(*(feeds[n] for n in "qkvw"), scale=1 / math.sqrt(32),
                                causal=causal))
    assert elapsed < 2.0, f"{elapsed:.2f} s"
    assert workspace_floats(32, 32, 64) * 4 < 256 << 10   # bytes per thread


def test_other_targets_keep_the_decomposition():
    """Only a target that says so (llvm's and cupy's LOWERING) gets the library call:
    the default Target lowers the op's decomposition."""
    from tensorc.backends import lowering as L
    from tensorc.backends.cupy import LOWERING as CUPY
    from tensorc.backends.llvm import LOWERING as LLVM

    g = _graph([(1, 2, 20, 8), (1, 2, 20, 8), (1, 2, 20, 8)], 16, True, "bool")

    def calls(**target):
        return [s.op for s in L.lower(g, {}, **target).steps if hasattr(s, "op")]
    assert calls(**LLVM) == ["linear_attention"]
    assert calls(**CUPY) == ["linear_attention"]
    assert "linear_attention" not in calls()
