"""The LLVM backend's sparse attention kernel (`local_attention`,
`block_sparse_attention`) against the ops' numpy reference, directly and in a compiled
graph, and that it visits only the key tiles of the pattern."""

from __future__ import annotations

import time

import numpy as np
import pytest

import tensorc
from tensorc.backends.llvm.attention import attention as dense
from tensorc.backends.llvm.sparse_attention import bind, sparse_attention
from tensorc.ir import Graph, TensorType
from tensorc.ops import get_op


def rel_err(got, want):
    """Max error over the largest value; NaN rows (no visible key) must match."""
    assert got.shape == want.shape and got.dtype == np.float32
    nan = np.isnan(want)
    assert (np.isnan(got) == nan).all(), "NaN rows differ"
    got, want = np.where(nan, 0, got), np.where(nan, 0, want)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def attrs_of(op, **attrs):
    full = {n: a.default for n, a in get_op(op).attrs.items() if a.default is not None}
    return {**full, **attrs}


def inputs(seed, b, h, hk, t, s, d=16, dv=16, mask=None):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, h, t, d), dtype=np.float32)
    k = rng.standard_normal((b, hk, s, d), dtype=np.float32)
    v = rng.standard_normal((b, hk, s, dv), dtype=np.float32)
    m = None
    if mask == "keep":        # a padding mask: every row keeps key 0 at least
        m = rng.random((b, 1, 1, s)) > 0.3
        m[..., 0] = True
    elif mask == "add":
        m = rng.standard_normal((b, 1, t, s)).astype(np.float32)
    elif mask == "add_keys":
        m = rng.standard_normal((1, 1, 1, s)).astype(np.float32)
    return q, k, v, m


LOCAL = [  # (attrs, t, s)
    (dict(before=5, after=3), 77, 77),
    (dict(before=5, after=3, causal=True), 77, 77),
    (dict(before=31, after=0, causal=True), 130, 130),
    (dict(before=9, after=20, dilation=2), 130, 33),
    (dict(before=40, after=40, dilation=2, causal=True), 33, 130),
    (dict(before=70, after=3, dilation=3, global_tokens=(0, 1, 2, 129)), 130, 130),
    (dict(before=8, after=8, global_tokens=(5, 6, 75, 76), causal=True), 77, 77),
    (dict(before=0, after=0), 1, 1),
    (dict(before=2, after=1), 7, 7),
    (dict(before=100, after=100, dilation=40), 77, 77),   # dilation beyond a tile
]
BLOCK = [
    (dict(block=16, local_blocks=1), 77, 77),
    (dict(block=16, local_blocks=0, random_blocks=2, seed=3), 130, 100),
    (dict(block=8, local_blocks=1, random_blocks=1, seed=1, causal=True), 130, 130),
    (dict(block=32, local_blocks=1, global_tokens=(3, 64, 128)), 130, 130),
    (dict(block=5, local_blocks=0, global_tokens=(0,), causal=True), 33, 33),
    (dict(block=64, local_blocks=1), 7, 33),
]
CASES = [("local_attention", *c) for c in LOCAL] + [("block_sparse_attention", *c)
                                                     for c in BLOCK]


def _id(c):
    return f"{c[0].split('_')[0]}-t{c[2]}-s{c[3]}-" + "-".join(f"{k}{v}" for k, v in
                                                                 c[1].items())


@pytest.fixture
def split_small(monkeypatch):
    """Threads split even these small cases (into 8-row chunks): the plan's edges."""
    from tensorc.backends.llvm import sparse_attention as sa
    monkeypatch.setattr(sa, "MIN_WORK", 0)


@pytest.mark.parametrize("c", CASES, ids=_id)
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_matches_reference(c, threads, split_small):
    op, attrs, t, s = c
    a = attrs_of(op, scale=0.3, **attrs)
    q, k, v, _ = inputs(1, 2, 4, 2, t, s)
    want = get_op(op).reference(q, k, v, **a)
    assert rel_err(sparse_attention(op, q, k, v, threads=threads, **a), want) <= 1e-4


@pytest.mark.parametrize("mask", ["keep", "add", "add_keys"])
@pytest.mark.parametrize("hk", [1, 2])
@pytest.mark.parametrize("c", [CASES[1], CASES[5], CASES[6], CASES[-5], CASES[-3]], ids=_id)
def test_masks_and_grouped_heads(c, hk, mask, split_small):
    op, attrs, t, s = c
    a = attrs_of(op, scale=0.25, mask_value=-3.0 if mask == "keep" else -np.inf, **attrs)
    q, k, v, m = inputs(2, 2, 4, hk, t, s, d=24, dv=20, mask=mask)
    want = get_op(op).reference(q, k, v, m, **a)
    for threads in (1, 2):
        assert rel_err(sparse_attention(op, q, k, v, m, threads=threads, **a), want) <= 1e-4


def test_threaded_plan_splits_large_work():
    """Enough work for the threaded plan (rows cut into chunks, a head per item)."""
    op = "local_attention"
    a = attrs_of(op, scale=0.125, before=100, after=20, global_tokens=(0, 300))
    q, k, v, m = inputs(3, 1, 2, 1, 333, 333, d=64, dv=64, mask="keep")
    want = get_op(op).reference(q, k, v, m, **a)
    got1 = sparse_attention(op, q, k, v, m, threads=1, **a)
    got2 = sparse_attention(op, q, k, v, m, threads=2, **a)
    assert rel_err(got1, want) <= 1e-4
    np.testing.assert_array_equal(got1, got2)   # same sums in the same order


def test_tiles_outside_the_pattern_are_never_visited():
    """Local window 64 over 2048 keys: per head, 256 blocks of 8 rows see at most
    (8 + 64 + 31) / 32 + 1 tiles each, where dense attention visits all 64."""
    op, t = "local_attention", 2048
    q, k, v, _ = inputs(4, 1, 2, 2, t, t, d=64, dv=64)
    out = np.empty_like(q)
    run = bind(op, q, k, v, out=out, threads=1, **attrs_of(op, before=32, after=32))
    run()
    blocks = 2 * t // 8
    assert run.tiles_visited() <= blocks * 4
    assert run.tiles_visited() * 12 < blocks * (t // 32)
    run()
    assert run.tiles_visited() <= 2 * blocks * 4   # it counts every run


def test_local_is_faster_than_dense():
    """The skipped tiles show in time (lenient: robust on a loaded machine)."""
    op, t = "local_attention", 2048
    q, k, v, _ = inputs(5, 1, 4, 4, t, t, d=64, dv=64)

    def best(fn):
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return sorted(times)[1]
    a = attrs_of(op, scale=0.125, before=32, after=32)
    local = best(lambda: sparse_attention(op, q, k, v, threads=1, **a))
    full = best(lambda: dense(q, k, v, scale=0.125, threads=1))
    assert full > 2 * local, (full, local)


def test_bind_patch_and_out():
    op = "block_sparse_attention"
    a = attrs_of(op, scale=0.3, block=16, random_blocks=1, seed=2)
    q, k, v, m = inputs(6, 1, 2, 1, 77, 77, mask="keep")
    out = np.empty_like(q)
    run = bind(op, q, k, v, m, out=out, threads=1, **a)
    run()
    assert rel_err(out, get_op(op).reference(q, k, v, m, **a)) <= 1e-4
    q2, out2 = q[:, ::-1].copy(), np.empty_like(out)
    run.patch("q", q2.ctypes.data)
    run.patch("out", out2.ctypes.data)
    run()
    assert rel_err(out2, get_op(op).reference(q2, k, v, m, **a)) <= 1e-4
    # an out the kernel cannot write to, and q aliasing out
    strided = np.empty((1, 2, 77, 32), np.float32)[..., ::2]
    bind(op, q, k, v, m, out=strided, **a)()
    assert rel_err(strided, get_op(op).reference(q, k, v, m, **a)) <= 1e-4
    qa = q.copy()
    sparse_attention(op, qa, k, v, m, out=qa, **a)
    assert rel_err(qa, get_op(op).reference(q, k, v, m, **a)) <= 1e-4


def _graph(op, hk, mask, attrs):
    g = Graph("sparse")
    q = g.add_input("q", TensorType(("batch", 4, "t", 16)))
    k = g.add_input("k", TensorType(("batch", hk, "s", 16)))
    v = g.add_input("v", TensorType(("batch", hk, "s", 16)))
    ins = [q, k, v]
    if mask is not None:
        dims = tuple(1 if n == 1 else sym for n, sym in
                     zip(mask.shape, ("batch", 4, "t", "s"), strict=True))
        ins.append(g.add_input("mask", TensorType(dims, "bool" if mask.dtype == bool
                                                  else "f32")))
    g.outputs = [g.add(op, *ins, **attrs)]
    return g.verify()


@pytest.mark.parametrize("mask", [None, "keep", "add"])
@pytest.mark.parametrize("c", [CASES[5], CASES[6], CASES[-4]], ids=_id)
def test_compiled_graph_uses_the_kernel(c, mask):
    op, attrs, t, s = c
    a = dict(attrs, scale=0.25)
    q, k, v, m = inputs(7, 2, 4, 2, t, s, mask=mask)
    g = _graph(op, 2, m, a)
    want = get_op(op).reference(q, k, v, m, **attrs_of(op, **a))
    feeds = dict(q=q, k=k, v=v, **({"mask": m} if m is not None else {}))
    for threads in (1, 2):
        exe = tensorc.backends.get_backend("llvm").compile(g, threads=threads)
        assert rel_err(exe(**feeds), want) <= 1e-4
        stats = exe.stats({"batch": 2, "t": t, "s": s})
        assert stats["fallbacks"] == []
        assert [st.op for st in exe.program({"batch": 2, "t": t, "s": s}).steps
                if st.op == op]
    exe = tensorc.compile(g, "llvm", "O2")
    assert rel_err(exe(**feeds), want) <= 1e-4
    q2 = np.ascontiguousarray(q[::-1])   # new arrays: the runner patches the kernel's
    want2 = get_op(op).reference(q2, k, v, m, **attrs_of(op, **a))   # arguments
    assert rel_err(exe(**dict(feeds, q=q2)), want2) <= 1e-4


@pytest.mark.parametrize("c", CASES, ids=_id)
def test_threaded_items_cover_each_row_of_each_head_once(c):
    from tensorc.backends.llvm.sparse_attention import _items, _table
    from tensorc.ops.sparse_attention import pattern
    op, attrs, t, s = c
    pat = pattern(op, t, s, attrs_of(op, **attrs))
    table, groups = _table(pat, t)
    heads = 3
    items = _items(pat, groups, heads, 2, s)
    seen = np.zeros((heads, t), int)
    for h0, h1, i0, i1, iv0, iv1 in items:
        assert any(g0 <= i0 < i1 <= g1 and (a, b) == (iv0, iv1) for g0, g1, a, b in groups)
        seen[h0:h1, i0:i1] += 1
    assert (seen == 1).all()
    assert t <= 8 or len(items) > heads   # rows cut into chunks for the threads


def test_targets_without_the_kernel_decompose():
    """A target without `sparse_attention` (cupy's) lowers the op to its decomposition,
    not to a Call it could not run."""
    from tensorc.backends.lowering import lower
    op, attrs, t, s = CASES[5]
    g = _graph(op, 2, None, dict(attrs, scale=0.25))
    env = {"batch": 1, "t": t, "s": s}
    ops = [st.op for st in lower(g, env).steps if hasattr(st, "op")]
    assert op not in ops
    assert op in [st.op for st in lower(g, env, sparse_attention=True).steps
                  if hasattr(st, "op")]
