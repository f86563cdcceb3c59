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
