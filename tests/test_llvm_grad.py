"""The gradient ops on llvm (scatter_add, conv2d_grad, attention_grad): generated code,
no reference fallback, against numpy's reference on random inputs."""

from __future__ import annotations

import numpy as np
import pytest

from tensorc.backends import available_backends, get_backend
from tensorc.errors import TensorcError
from tensorc.ir import Graph, TensorType

pytestmark = pytest.mark.skipif("llvm" not in available_backends(), reason="needs llvm")

NP = {"f16": np.float16, "f32": np.float32, "f64": np.float64, "i32": np.int32,
      "i64": np.int64}


def _fallbacks(exe) -> list:
    return [f for r in exe._runners.values() for f in r.program.stats()["fallbacks"]]


def _graph(op, arrays, **attrs) -> Graph:
    g = Graph("t")
    ins = [g.add_input(f"x{i}", TensorType.of(a)) for i, a in enumerate(arrays)]
    g.outputs = list(g.add_node(op, ins, attrs))
    return g


def _run_both(op, arrays, **attrs):
    """(llvm outputs, numpy outputs, llvm's fallbacks) for one `op` node."""
    g = _graph(op, arrays, **attrs)
    feeds = {f"x{i}": a for i, a in enumerate(arrays)}
    want = get_backend("numpy").compile(g).run(feeds)
    exe = get_backend("llvm").compile(g)
    got = exe.run(feeds)
    return [got[v.name] for v in g.outputs], [want[v.name] for v in g.outputs], \
        _fallbacks(exe)


def _close(got, want, tol):
    assert got.dtype == want.dtype and got.shape == want.shape
    if want.dtype.kind in "iu":
        np.testing.assert_array_equal(got, want)
        return
    w64, g64 = want.astype(np.float64), got.astype(np.float64)
    err = np.abs(g64 - w64).max(initial=0) / max(np.abs(w64).max(initial=0), 1e-30)
    assert err <= tol, err


def _rand(rng, shape, dtype="f32"):
    if dtype in ("i32", "i64"):
        return rng.integers(-9, 10, shape).astype(NP[dtype])
    return rng.standard_normal(shape).astype(NP[dtype])


# --- scatter_add: gather's transpose, the embedding gradient --------------------------------

SCATTER_CASES = [   # data shape, axis, index shape
    ((7, 5), 0, (12,)),          # embedding-like: more indices than rows, so repeats
    ((4, 9), 1, (3, 5)),         # axis 1, a 2-d index
    ((3, 6, 40), 1, (2, 4)),     # leading and trailing dims (trailing split in blocks)
    ((2, 3, 4), -1, ()),         # a scalar index, negative axis
    ((5, 96), 0, (2, 3, 4)),     # trailing dims larger than a block
    ((6, 17), 0, (30,)),         # a prime trailing size
]


@pytest.mark.parametrize("idx_dtype", ["i32", "i64"])
@pytest.mark.parametrize("dtype,tol", [("f32", 1e-6), ("f64", 1e-12), ("i32", 0)])
@pytest.mark.parametrize("ds,axis,ishape", SCATTER_CASES, ids=str)
def test_scatter_add_matches_numpy(ds, axis, ishape, dtype, tol, idx_dtype):
    rng = np.random.default_rng(len(ds) * 100 + sum(ishape))
    ax = axis % len(ds)
    n = ds[ax]
    idx = rng.integers(-n, n, ishape).astype(NP[idx_dtype])   # negative ones wrap
    if idx.size > 1:
        idx.reshape(-1)[1] = idx.reshape(-1)[0]               # at least one repeat
    data = _rand(rng, ds, dtype)
    upd = _rand(rng, ds[:ax] + ishape + ds[ax + 1:], dtype)
    (got,), (want,), fallbacks = _run_both("scatter_add", [data, idx, upd], axis=axis)
    assert fallbacks == []
    assert np.abs(want.astype(np.float64)).max() > 0
    _close(got, want, tol)


def test_scatter_add_repeated_indices_add_up():
    """Every update lands on one row: the row is data plus the sum of all of them."""
    rng = np.random.default_rng(7)
    data, upd = _rand(rng, (3, 64)), _rand(rng, (50, 64))
    idx = np.full(50, -2, np.int64)
    (got,), (want,), fallbacks = _run_both("scatter_add", [data, idx, upd], axis=0)
    assert fallbacks == []
    _close(got, want, 1e-6)
    np.testing.assert_allclose(got[1], data[1] + upd.astype(np.float64).sum(0), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_array_equal(got[[0, 2]], data[[0, 2]])


def test_scatter_add_of_gathers_gradient_on_llvm():
    """The embedding gradient as the grad pass builds it: scatter_add into zeros (a `full`
    that lowering keeps lazy) of the output gradient."""
    from tensorc.passes.autodiff import grad
    rng = np.random.default_rng(8)
    g = Graph("emb")
    table = g.add_input("table", TensorType((11, 24), "f32"))
    ids = g.add_input("ids", TensorType((2, 9), "i64"))
    (y,) = g.add_node("gather", [table, ids], {"axis": 0})
    (w,) = g.add_node("tanh", [y])
    (loss,) = g.add_node("reduce_sum", [w], {"axes": None})
    g.rename(loss, "loss")
    g.outputs = [loss]
    dg = grad(g, "loss", ["table"])
    assert any(n.op == "scatter_add" for n in dg.nodes)
    feeds = {"table": _rand(rng, (11, 24)), "ids": rng.integers(-11, 11, (2, 9))}
    want = get_backend("numpy").compile(dg).run(feeds)
    exe = get_backend("llvm").compile(dg)
    got = exe.run(feeds)
    assert _fallbacks(exe) == []
    for name, w in want.items():
        _close(got[name], w, 1e-5)


@pytest.mark.parametrize("bad", [7, -8])
def test_scatter_add_index_out_of_range_is_an_error(bad):
    rng = np.random.default_rng(9)
    data, upd = _rand(rng, (7, 4)), _rand(rng, (3, 4))
    idx = np.array([0, bad, 1], np.int64)
    g = _graph("scatter_add", [data, idx, upd], axis=0)
    with pytest.raises(TensorcError, match=f"index {bad} is out of range"):
        get_backend("llvm").compile(g).run({"x0": data, "x1": idx, "x2": upd})


# --- conv2d_grad: native for patch embeddings, an honest fallback otherwise ---------------

PATCH_CASES = [   # x shape, w shape (stride = kernel)
    ((1, 3, 32, 32), (24, 3, 8, 8)),      # a ViT's patch embedding, small
    ((2, 3, 12, 20), (5, 3, 4, 4)),       # a batch, non-square image
    ((3, 2, 10, 11), (4, 2, 3, 2)),       # kernels that do not divide the image: dx is 0 there
    ((2, 4, 6, 6), (7, 4, 1, 1)),         # 1x1
]


@pytest.mark.parametrize("xs,ws", PATCH_CASES, ids=str)
def test_conv2d_grad_patch_embedding_matches_numpy(xs, ws):
    rng = np.random.default_rng(sum(xs) + sum(ws))
    kh, kw = ws[2:]
    oh, ow = xs[2] // kh, xs[3] // kw
    x, w = _rand(rng, xs), _rand(rng, ws)
    dy = _rand(rng, (xs[0], ws[0], oh, ow))
    got, want, fallbacks = _run_both("conv2d_grad", [x, w, dy], strides=(kh, kw))
    assert fallbacks == []
    for g_, w_ in zip(got, want, strict=True):
        assert np.abs(w_).max() > 0
        _close(g_, w_, 1e-5)
    if xs[2] % kh:   # rows no window reaches get no gradient
        assert not got[0][:, :, oh * kh:].any()


@pytest.mark.parametrize("attrs", [{}, {"strides": (2, 2), "pads": (1, 1, 1, 1)},
                                   {"strides": (3, 3), "dilations": (2, 1)}], ids=str)
def test_conv2d_grad_other_convolutions_are_listed_fallbacks(attrs):
    """Overlapping or padded windows have no native rule yet: the reference runs, and says
    so, and the answer is still the reference's."""
    rng = np.random.default_rng(11)
    x, w = _rand(rng, (1, 2, 9, 9)), _rand(rng, (3, 2, 3, 3))
    from tensorc.ops.nn import conv2d
    dy = _rand(rng, conv2d(x, w, **attrs).shape)
    got, want, fallbacks = _run_both("conv2d_grad", [x, w, dy], **attrs)
    assert [f["reason"] for f in fallbacks] == [
        "conv2d_grad is native only for patch embeddings (stride = kernel, no padding, "
        "dilation 1, one group)"]
    for g_, w_ in zip(got, want, strict=True):
        _close(g_, w_, 1e-6)


def test_patch_embedding_gradient_through_the_grad_pass():
    """conv2d -> loss, differentiated by the grad pass, runs on llvm without fallbacks."""
    from tensorc.passes.autodiff import grad
    rng = np.random.default_rng(12)
    g = Graph("patch")
    x = g.add_input("x", TensorType((2, 3, 16, 16), "f32"))
    w = g.add_input("w", TensorType((8, 3, 4, 4), "f32"))
    b = g.add_input("b", TensorType((8,), "f32"))
    (y,) = g.add_node("conv2d", [x, w, b], {"strides": (4, 4)})
    (t,) = g.add_node("tanh", [y])
    (loss,) = g.add_node("reduce_sum", [t], {"axes": None})
    g.rename(loss, "loss")
    g.outputs = [loss]
    dg = grad(g, "loss", ["x", "w", "b"])
    feeds = {"x": _rand(rng, (2, 3, 16, 16)), "w": _rand(rng, (8, 3, 4, 4)),
             "b": _rand(rng, (8,))}
    want = get_backend("numpy").compile(dg).run(feeds)
    exe = get_backend("llvm").compile(dg)
    got = exe.run(feeds)
    assert _fallbacks(exe) == []
    for name, w_ in want.items():
        _close(got[name], w_, 1e-5)
