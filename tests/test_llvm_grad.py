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


def _llvm_matches_numpy(graph, feeds, tol=1e-5) -> None:
    """Every output of `graph` on llvm (generated code only) equals numpy's within tol."""
    want = get_backend("numpy").compile(graph).run(feeds)
    exe = get_backend("llvm").compile(graph)
    got = exe.run(feeds)
    assert _fallbacks(exe) == []
    for name, w in want.items():
        _close(got[name], w, tol)


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
@pytest.mark.parametrize("dtype,tol", [("f32", 1e-6), ("f64", 1e-12), ("f16", 1e-3), ("i32", 0)])
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
    _llvm_matches_numpy(dg, feeds)


@pytest.mark.parametrize("bad", [7, -8])
def test_scatter_add_index_out_of_range_is_an_error(bad):
    rng = np.random.default_rng(9)
    data, upd = _rand(rng, (7, 4)), _rand(rng, (3, 4))
    idx = np.array([0, bad, 1], np.int64)
    g = _graph("scatter_add", [data, idx, upd], axis=0)
    with pytest.raises(TensorcError, match=f"index {bad} is out of range"):
        get_backend("llvm").compile(g).run({"x0": data, "x1": idx, "x2": upd})


# --- conv2d_grad: im2col GEMMs; a patch embedding's col2im is a permutation ---------------

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


GENERAL_CONV = [   # x shape, w shape, attrs: overlapping, padded, dilated, grouped windows
    ((1, 2, 9, 9), (3, 2, 3, 3), {}),
    ((2, 3, 11, 10), (4, 3, 3, 3), {"strides": (2, 2), "pads": (1, 1, 1, 1)}),
    ((1, 2, 12, 12), (3, 2, 3, 2), {"strides": (3, 2), "dilations": (2, 1),
                                    "pads": (0, 2, 1, 0)}),
    ((2, 4, 7, 8), (6, 2, 3, 3), {"group": 2, "pads": (1, 1, 1, 1)}),
    ((1, 4, 6, 6), (4, 1, 3, 3), {"group": 4, "strides": (2, 1), "pads": (2, 0, 0, 1)}),
    ((1, 2, 9, 9), (3, 2, 2, 2), {"strides": (3, 3)}),   # windows skip pixels
]


@pytest.mark.parametrize("xs,ws,attrs", GENERAL_CONV, ids=str)
def test_conv2d_grad_general_matches_numpy(xs, ws, attrs):
    from tensorc.ops.nn import conv2d
    rng = np.random.default_rng(sum(xs) + sum(ws))
    x, w = _rand(rng, xs), _rand(rng, ws)
    dy = _rand(rng, conv2d(x, w, **attrs).shape)
    got, want, fallbacks = _run_both("conv2d_grad", [x, w, dy], **attrs)
    assert fallbacks == []
    for g_, w_ in zip(got, want, strict=True):
        assert np.abs(w_).max() > 0
        _close(g_, w_, 1e-5)


def test_conv2d_grad_in_f64_is_a_listed_fallback():
    """The GEMMs are float32: other dtypes run the reference, and say so."""
    rng = np.random.default_rng(11)
    x, w = rng.standard_normal((1, 2, 9, 9)), rng.standard_normal((3, 2, 3, 3))
    dy = rng.standard_normal((1, 3, 7, 7))
    got, want, fallbacks = _run_both("conv2d_grad", [x, w, dy])
    assert [f["reason"] for f in fallbacks] == ["conv2d_grad of non-f32 data"]
    for g_, w_ in zip(got, want, strict=True):
        _close(g_, w_, 1e-12)


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
    _llvm_matches_numpy(dg, feeds)


# --- attention_grad: the fused flash backward (f32, no mask) ------------------------------

ATTN_CASES = [   # b, h, bk, hk, t, s, d, dv
    (2, 4, 2, 4, 16, 16, 16, 16),     # plain multi-head, one block of rows
    (1, 2, 1, 2, 37, 70, 20, 33),     # t != s, neither a multiple of the tiles; d != dv
    (2, 8, 2, 2, 29, 29, 64, 64),     # grouped-query heads (4 per key/value head)
    (3, 4, 1, 1, 19, 45, 8, 24),      # one key/value head broadcast over batch and heads
    (2, 2, 1, 2, 70, 23, 17, 5),      # t > s, k and v broadcast over the batch
]


def _attn_inputs(rng, b, h, bk, hk, t, s, d, dv):
    return [_rand(rng, sh) for sh in ((b, h, t, d), (bk, hk, s, d), (bk, hk, s, dv),
                                      (b, h, t, dv))]


def _attn_check(arrays, threads=None, tol=1e-4, native=True, **attrs):
    g = _graph("attention_grad", arrays, **attrs)
    feeds = {f"x{i}": a for i, a in enumerate(arrays)}
    want = get_backend("numpy").compile(g).run(feeds)
    exe = get_backend("llvm").compile(g, threads=threads)
    got = exe.run(feeds)
    assert _fallbacks(exe) == []
    calls = [s for r in exe._runners.values() for s in r.program.steps
             if getattr(s, "op", None) == "attention_grad"]
    assert bool(calls) == native   # the fused kernel, or else the decomposition
    for v in g.outputs:
        assert np.abs(want[v.name]).max() > 0
        _close(got[v.name], want[v.name], tol)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", ATTN_CASES, ids=str)
def test_attention_grad_kernel_matches_numpy(shape, causal, threads):
    rng = np.random.default_rng(sum(shape) + causal)
    _attn_check(_attn_inputs(rng, *shape), threads, scale=0.125 + 0.1 * causal,
                causal=causal)


@pytest.mark.parametrize("shape", [(1, 4, 1, 1, 128, 96, 64, 64), (2, 4, 2, 2, 100, 128, 64, 32),
                                   (2, 2, 1, 1, 64, 64, 64, 64)], ids=str)
def test_attention_grad_kernel_threaded(shape):
    """Shapes big enough to use threads: one key/value head per item, or fewer heads
    than threads (the query heads split in parts that sum their dK, dV after)."""
    rng = np.random.default_rng(sum(shape))
    _attn_check(_attn_inputs(rng, *shape), 2, scale=0.125, causal=True)


def test_attention_grad_kernel_with_a_finite_mask_value():
    """An exporter's finfo.min instead of -inf: no tile is skipped, the filled scores
    get (essentially) no weight and no gradient."""
    rng = np.random.default_rng(21)
    _attn_check(_attn_inputs(rng, 1, 2, 1, 2, 40, 40, 16, 16), causal=True,
                mask_value=float(np.finfo(np.float32).min), scale=0.25)


def test_attention_grad_kernel_reads_strided_heads():
    """q, k, v, dy as transposed views of [b, t, h, d] tensors, as a model's
    projections give them: the kernel follows their strides."""
    rng = np.random.default_rng(22)
    g = Graph("t")
    names = ("q", "k", "v", "dy")
    shapes = [(2, 21, 4, 16), (2, 33, 2, 16), (2, 33, 2, 16), (2, 21, 4, 16)]
    ins = [g.add_input(n, TensorType(sh, "f32")) for n, sh in zip(names, shapes, strict=True)]
    views = [g.add("transpose", x, perm=(0, 2, 1, 3)) for x in ins]
    g.outputs = list(g.add_node("attention_grad", views, {"scale": 0.25, "causal": True}))
    feeds = {n: _rand(rng, sh) for n, sh in zip(names, shapes, strict=True)}
    want = get_backend("numpy").compile(g).run(feeds)
    exe = get_backend("llvm").compile(g, threads=2)
    got = exe.run(feeds)
    assert _fallbacks(exe) == [] and exe.stats()["library_calls"] == 1
    for name, w in want.items():
        _close(got[name], w, 1e-4)
    feeds = {n: _rand(rng, sh) for n, sh in zip(names, shapes, strict=True)}   # new arrays
    want, got = get_backend("numpy").compile(g).run(feeds), exe.run(feeds)
    for name, w in want.items():
        _close(got[name], w, 1e-4)


MASK_CASES = {   # name: (b, h, hk, t, s, mask maker, attrs)
    "padding-bool": (2, 2, 2, 12, 20, lambda rng: np.arange(20)[None, None, None, :]
                     < np.array([20, 9])[:, None, None, None], {}),
    "random-bool-causal-gqa": (2, 4, 2, 33, 33, lambda rng: np.tril(
        rng.random((2, 1, 33, 33)) > 0.3) | np.eye(33, dtype=bool), {"causal": True}),
    "additive-2d": (1, 2, 2, 17, 40, lambda rng: rng.standard_normal((17, 40))
                    .astype(np.float32), {}),
    "additive-with-inf": (2, 2, 1, 20, 20, lambda rng: np.where(
        (rng.random((2, 1, 20, 20)) > 0.4) | np.eye(20, dtype=bool), 0.0, -np.inf)
        .astype(np.float32), {"causal": True}),
    "additive-row-bias": (1, 2, 2, 9, 14, lambda rng: rng.standard_normal((9, 1))
                          .astype(np.float32), {}),   # copied to a key axis per call
}


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", sorted(MASK_CASES))
def test_attention_grad_kernel_with_masks(case, threads):
    b, h, hk, t, s, make, attrs = MASK_CASES[case]
    rng = np.random.default_rng(len(case))
    q, k, v, dy = _attn_inputs(rng, b, h, b, hk, t, s, 16, 16)
    _attn_check([q, k, v, make(rng), dy], threads, scale=0.3, **attrs)


def test_attention_grad_in_f64_runs_the_decomposition():
    rng = np.random.default_rng(24)
    arrays = [a.astype(np.float64) for a in _attn_inputs(rng, 1, 2, 1, 2, 10, 10, 8, 8)]
    _attn_check(arrays, native=False, tol=1e-10, causal=True)


def _constants(graph: Graph, out: dict) -> dict:
    """Every constant's data, those of fused regions' bodies included."""
    out.update({k: v.data for k, v in graph.constants.items()})
    for node in graph.nodes:
        for a in node.attrs.values():
            if isinstance(a, Graph):
                _constants(a, out)
    return out


@pytest.mark.parametrize("model", ["gpt", "bert", "vit", "llama"])
def test_zoo_training_step_runs_natively(model):
    """The gradient of each zoo model (O2: fused attention, so attention_grad; BERT's
    with its padding mask) on llvm: no fallback, the fused backward in use, numpy's
    answer."""
    from tensorc.loading import load_model
    from tensorc.passes import run_pipeline
    from tensorc.passes.autodiff import grad
    loaded = load_model(model, "tiny")
    g = run_pipeline(loaded.graph, "O2")
    (loss,) = g.add_node("reduce_mean", [g.outputs[0]], {"axes": None})
    g.rename(loss, "loss")
    g.outputs = [loss]
    dg = grad(g, "loss")
    weights = _constants(g, {})
    feeds = dict(loaded.inputs)
    feeds.update({v.name: weights[v.name] for v in dg.inputs if v.name not in feeds})
    exe = get_backend("llvm").compile(dg)
    got = exe.run(feeds)
    assert _fallbacks(exe) == []
    ops = [getattr(s, "op", None) for r in exe._runners.values() for s in r.program.steps]
    assert "attention_grad" in ops
    want = get_backend("numpy").compile(dg).run(feeds)
    for name, w in want.items():
        if np.abs(w).max() > 1e-6:   # a key bias's gradient is 0 up to rounding
            _close(got[name], w, 1e-4)


def test_attention_grad_library_copies_what_it_cannot_read_in_place():
    """Operands without a unit inner stride, and `out` arrays the kernel cannot write
    (a non-unit stride), are copied on every call: still the reference's answer."""
    from tensorc.backends.llvm.attention_grad import attention_grad as fused
    from tensorc.ops.attention import attention_grad as reference
    rng = np.random.default_rng(31)
    q = _rand(rng, (1, 2, 9, 32))[..., ::2]          # inner stride 2
    k, v, dy = _rand(rng, (1, 2, 11, 16)), _rand(rng, (1, 2, 11, 8)), _rand(rng, (1, 2, 9, 8))
    mask = rng.random((1, 1, 9, 1)) > -1             # broadcast over keys: copied
    outs = [np.zeros((1, 2, 9, 32), np.float32)[..., ::2], np.zeros((1, 2, 11, 16), np.float32),
            np.zeros((1, 2, 11, 8), np.float32)]
    for _ in range(2):
        got = fused(q, k, v, dy, mask, scale=0.5, causal=True, out=outs)
        want = reference(q, k, v, mask, dy, scale=0.5, causal=True)
        for g_, o, w_ in zip(got, outs, want, strict=True):
            assert g_ is o
            _close(g_, w_, 1e-4)
