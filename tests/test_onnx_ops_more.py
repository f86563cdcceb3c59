"""ONNX ops imported as compositions of existing IR ops (Mod, GlobalAveragePool,
GlobalMaxPool, MaxPool, AveragePool, Pad, CumSum, InstanceNormalization,
GroupNormalization, ArgMin, OneHot, Einsum): single-node models built with onnx.helper,
run on numpy and llvm (strict: no reference fallback) against ONNX Runtime (floats to
1e-5 relative, integers exactly)."""

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from tensorc.backends import available_backends, get_backend
from tensorc.errors import TensorcError
from tensorc.frontend import onnx as tx

BACKENDS = ["numpy"] + ["llvm"] * ("llvm" in available_backends())
NP_TO_ONNX = {np.float32: TensorProto.FLOAT, np.float64: TensorProto.DOUBLE,
              np.float16: TensorProto.FLOAT16, np.int32: TensorProto.INT32,
              np.int64: TensorProto.INT64, np.int8: TensorProto.INT8, np.uint8: TensorProto.UINT8}


def _code(a: np.ndarray) -> int:
    return NP_TO_ONNX[a.dtype.type]


def _model(op, feeds: dict, consts: dict | None = None, opset=21, shapes=None, **attrs):
    """One `op` node: `feeds` are graph inputs (their shapes, or `shapes[name]` with
    symbols), `consts` initializers; input order is feeds then consts, '' for a gap."""
    consts = consts or {}
    names = list(feeds) + list(consts)
    order = attrs.pop("order", names)
    node = helper.make_node(op, order, ["y"], **attrs)
    ins = [helper.make_tensor_value_info(k, _code(v), (shapes or {}).get(k, v.shape))
           for k, v in feeds.items()]
    out = helper.make_tensor_value_info("y", _code(next(iter(feeds.values()))), None)
    g = helper.make_graph([node], "m", ins, [out], initializer=[
        numpy_helper.from_array(v, k) for k, v in consts.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _ort(model, feeds):
    """ONNX Runtime's output; where it has no kernel (f64 pools and instance norm),
    ONNX's own reference evaluator's."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    try:
        sess = ort.InferenceSession(model.SerializeToString(), opts,
                                    providers=["CPUExecutionProvider"])
    except ort.capi.onnxruntime_pybind11_state.NotImplemented:
        return ReferenceEvaluator(model).run(None, feeds)[0]
    return sess.run(None, feeds)[0]


def _check(model, feeds, backend, monkeypatch, rtol=1e-5, want=None, strict=True):
    if strict:   # llvm: a reference fallback is an error
        monkeypatch.setenv("TENSORC_STRICT", "1")
    want = _ort(model, feeds) if want is None else want
    got = get_backend(backend).compile(tx.from_model(model))(**feeds)
    got = got[0] if isinstance(got, tuple) else got
    assert got.shape == want.shape and got.dtype == want.dtype, \
        (got.shape, want.shape, got.dtype, want.dtype)
    if want.dtype.kind in "iub":
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        differ = ~np.isnan(want) & (got != want)    # equal infinities count as equal
        got, want = got[differ], want[differ]
        if not got.size:
            return
        scale = max(float(np.abs(want).max()), 1e-6)
        err = float(np.abs(got.astype(np.float64) - want).max()) / scale
        assert err <= rtol, f"relative error {err:.2e} > {rtol}"


def _rand(rng, shape, dtype, nonzero=True):
    if np.dtype(dtype).kind in "iu":
        lo = 1 if np.dtype(dtype).kind == "u" else -20
        x = rng.integers(lo, 21, shape).astype(dtype)
        return np.where(x == 0, 3, x).astype(dtype) if nonzero else x
    x = rng.standard_normal(shape) * 4
    return np.where(np.abs(x) < 0.1, 0.5, x).astype(dtype)


# --- Mod --------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.int8, np.uint8])
@pytest.mark.parametrize("fmod", [0, 1])
@pytest.mark.parametrize("shapes", [((3, 5), (3, 5)), ((2, 3, 4), (4,))])
def test_mod_int(backend, dtype, fmod, shapes, monkeypatch):
    rng = np.random.default_rng(0)
    feeds = {"a": _rand(rng, shapes[0], dtype), "b": _rand(rng, shapes[1], dtype)}
    feeds["b"][..., 0] = 7                 # a divisor larger than some |a|
    _check(_model("Mod", feeds, fmod=fmod), feeds, backend, monkeypatch)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("shapes", [((4, 6), (4, 6)), ((2, 3, 4), (1, 4))])
def test_mod_float_fmod(backend, dtype, shapes, monkeypatch):
    """(llvm runs no f16 arithmetic as generated code, any op: f16 is not strict there.)"""
    rng = np.random.default_rng(1)
    feeds = {"a": _rand(rng, shapes[0], dtype), "b": _rand(rng, shapes[1], dtype)}
    _check(_model("Mod", feeds, fmod=1), feeds, backend, monkeypatch,
           strict=dtype != np.float16)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_mod_float_python_rule(backend, dtype, monkeypatch):
    """fmod=0 on floats (allowed from opset 28; ORT has no kernel: numpy's np.mod)."""
    rng = np.random.default_rng(2)
    feeds = {"a": _rand(rng, (5, 7), dtype), "b": _rand(rng, (5, 7), dtype)}
    feeds["a"][0, :4] = [np.inf, -3.0, 3.0, 0.0]
    feeds["b"][0, :4] = [2.0, np.inf, -np.inf, -2.0]
    want = np.mod(feeds["a"], feeds["b"])
    _check(_model("Mod", feeds, opset=28, fmod=0), feeds, backend, monkeypatch, want=want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mod_int_by_zero(backend, monkeypatch):
    """A zero divisor at run time gives x (ONNX Runtime fails the run); a constant zero
    divisor is refused at import."""
    a = np.array([5, -5, 7, -7], np.int64)
    b = np.array([0, 0, -3, 3], np.int64)
    model = _model("Mod", {"a": a, "b": b})
    got = get_backend(backend).compile(tx.from_model(model))(a=a, b=b)
    np.testing.assert_array_equal(got, [5, -5, -2, 2])
    with pytest.raises(TensorcError, match="modulo by a constant divisor that holds 0"):
        tx.from_model(_model("Mod", {"a": a}, {"b": b}))


# --- global pools -----------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op,dtype", [("GlobalAveragePool", np.float32),
                                      ("GlobalAveragePool", np.float64),
                                      ("GlobalMaxPool", np.float32)])
@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (1, 4, 7), (2, 2, 3, 2, 3)])
def test_global_pool(backend, op, shape, dtype, monkeypatch):
    """(f64: ONNX's reference, ORT has no kernel; its GlobalMaxPool is 2-D only there.)"""
    feeds = {"x": _rand(np.random.default_rng(3), shape, dtype)}
    _check(_model(op, feeds), feeds, backend, monkeypatch)


# --- MaxPool, AveragePool ---------------------------------------------------------------

POOL_CASES = [  # (shape, attributes)
    ((2, 3, 6, 6), dict(kernel_shape=[1, 1])),
    ((1, 2, 7, 5), dict(kernel_shape=[3, 3])),
    ((2, 1, 7, 8), dict(kernel_shape=[2, 3], strides=[2, 1])),
    ((1, 2, 9, 8), dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])),
    ((1, 2, 6, 7), dict(kernel_shape=[2, 3], strides=[1, 2], pads=[0, 1, 1, 2])),
    ((1, 1, 9, 9), dict(kernel_shape=[3, 2], dilations=[2, 3], pads=[2, 1, 0, 1])),
    ((1, 2, 8, 7), dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)),
    ((1, 2, 7, 6), dict(kernel_shape=[2, 3], strides=[3, 2], pads=[1, 1, 1, 0], ceil_mode=1)),
    ((1, 1, 8, 9), dict(kernel_shape=[2, 2], strides=[2, 3], dilations=[2, 1], ceil_mode=1)),
    ((1, 2, 2, 2), dict(kernel_shape=[3, 3], strides=[3, 3], pads=[1, 1, 1, 1], ceil_mode=1)),
    ((1, 2, 7, 6), dict(kernel_shape=[3, 2], strides=[2, 2], auto_pad="SAME_UPPER")),
    ((1, 2, 7, 6), dict(kernel_shape=[3, 2], strides=[2, 2], auto_pad="SAME_LOWER")),
    ((1, 2, 6, 5), dict(kernel_shape=[4, 2], strides=[1, 1], auto_pad="SAME_LOWER")),
    ((1, 2, 7, 6), dict(kernel_shape=[3, 2], strides=[2, 3], auto_pad="VALID")),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", range(len(POOL_CASES)))
def test_max_pool(backend, dtype, case, monkeypatch):
    shape, attrs = POOL_CASES[case]
    feeds = {"x": _rand(np.random.default_rng(case), shape, dtype)}
    _check(_model("MaxPool", feeds, **attrs), feeds, backend, monkeypatch)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.int8, np.uint8])
@pytest.mark.parametrize("case", [1, 3, 7, 10])
def test_max_pool_integer(backend, dtype, case, monkeypatch):
    """Integers pad with the dtype's minimum (which then never wins a window)."""
    shape, attrs = POOL_CASES[case]
    x = _rand(np.random.default_rng(case), shape, dtype, nonzero=False)
    x.flat[0] = np.iinfo(dtype).min
    _check(_model("MaxPool", {"x": x}, **attrs), {"x": x}, backend, monkeypatch)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("include", [0, 1])
@pytest.mark.parametrize("case", range(len(POOL_CASES)))
def test_average_pool(backend, dtype, include, case, monkeypatch):
    """(f64: ONNX's reference, ORT has no f64 AveragePool kernel.)"""
    shape, attrs = POOL_CASES[case]
    feeds = {"x": _rand(np.random.default_rng(case), shape, dtype)}
    _check(_model("AveragePool", feeds, count_include_pad=include, **attrs), feeds, backend,
           monkeypatch)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["MaxPool", "AveragePool"])
@pytest.mark.parametrize("include", [0, 1])
@pytest.mark.parametrize("shape,attrs", [
    ((2, 3, 9), dict(kernel_shape=[3], strides=[2], pads=[1, 1], ceil_mode=1)),
    ((1, 2, 8), dict(kernel_shape=[2], dilations=[3], auto_pad="VALID")),
    ((1, 2, 8), dict(kernel_shape=[3], strides=[3], auto_pad="SAME_LOWER")),
    ((1, 2, 5, 6, 5), dict(kernel_shape=[2, 3, 2], strides=[2, 1, 2], pads=[1, 0, 1, 0, 1, 1],
                           ceil_mode=1)),
])
def test_pool_1d_3d(backend, op, include, shape, attrs, monkeypatch):
    feeds = {"x": _rand(np.random.default_rng(6), shape, np.float32)}
    if op == "AveragePool":
        attrs = {**attrs, "count_include_pad": include}
    elif include:
        return
    _check(_model(op, feeds, **attrs), feeds, backend, monkeypatch)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["MaxPool", "AveragePool"])
def test_pool_symbolic_batch_and_channels(backend, op, monkeypatch):
    feeds = {"x": _rand(np.random.default_rng(5), (3, 2, 7, 6), np.float32)}
    model = _model(op, feeds, shapes={"x": ["n", "c", 7, 6]}, kernel_shape=[3, 3],
                   strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1)
    _check(model, feeds, backend, monkeypatch)


def test_pool_refusals():
    x = np.zeros((1, 2, 6, 6), np.float32)
    with pytest.raises(TensorcError, match="needs static spatial dims"):
        tx.from_model(_model("MaxPool", {"x": x}, shapes={"x": [1, 2, "h", 6]},
                             kernel_shape=[2, 2]))
    node = helper.make_node("MaxPool", ["x"], ["y", "i"], kernel_shape=[2, 2])
    g = helper.make_graph([node], "m", [helper.make_tensor_value_info("x", 1, x.shape)],
                          [helper.make_tensor_value_info("y", 1, None),
                           helper.make_tensor_value_info("i", 7, None)])
    with pytest.raises(TensorcError, match="the Indices output is not supported"):
        tx.from_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]))
    with pytest.raises(TensorcError, match="does not fit the padded input"):
        tx.from_model(_model("AveragePool", {"x": x}, kernel_shape=[7, 2]))
    with pytest.raises(TensorcError, match="disagree on the padding"):
        tx.from_model(_model("MaxPool", {"x": x}, kernel_shape=[2, 2], dilations=[2, 2],
                             auto_pad="SAME_UPPER"))
    with pytest.raises(TensorcError, match="negative padding"):
        tx.from_model(_model("AveragePool", {"x": x}, kernel_shape=[1, 1], strides=[3, 3],
                             auto_pad="SAME_UPPER"))


# --- Pad --------------------------------------------------------------------------------

PAD_CASES = [  # (shape, pads, axes)
    ((3, 4), [1, 2, 2, 1], None),
    ((2, 3, 5), [0, 1, 2, 1, 0, 3], None),
    ((2, 3, 5), [2, 1, 3, 2], [-1, 1]),
    ((4, 5), [-1, 2, 1, -2], None),            # negative pads crop
    ((2, 3, 4, 4), [0, 0, 1, 2, 0, 0, 2, 1], None),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["constant", "reflect", "edge", "wrap"])
@pytest.mark.parametrize("case", range(len(PAD_CASES)))
def test_pad(backend, mode, case, monkeypatch):
    shape, pads, axes = PAD_CASES[case]
    feeds = {"x": _rand(np.random.default_rng(4), shape, np.float32)}
    consts = {"pads": np.array(pads, np.int64), "value": np.array(1.5, np.float32)}
    order = ["x", "pads", "value"]
    if axes is not None:
        consts["axes"] = np.array(axes, np.int64)
        order.append("axes")
    model = _model("Pad", feeds, consts, mode=mode, order=order)
    _check(model, feeds, backend, monkeypatch)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint8, np.float64])
def test_pad_dtypes_and_default_value(backend, dtype, monkeypatch):
    feeds = {"x": _rand(np.random.default_rng(5), (3, 4), dtype)}
    for mode in ("constant", "reflect"):
        model = _model("Pad", feeds, {"pads": np.array([1, 0, 2, 3], np.int64)}, mode=mode)
        _check(model, feeds, backend, monkeypatch)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pad_constant_symbolic_dims(backend, monkeypatch):
    """Constant padding of a static axis next to a symbolic batch: one import, two
    batch sizes (padding a symbolic axis itself is refused: concat needs static sizes)."""
    consts = {"pads": np.array([0, 2, 0, 3], np.int64), "value": np.array(-1, np.int64)}
    x = np.zeros((2, 3), np.int64)
    model = _model("Pad", {"x": x}, consts, shapes={"x": ["batch", 3]})
    for shape in ((2, 3), (5, 3)):
        feeds = {"x": _rand(np.random.default_rng(6), shape, np.int64)}
        _check(model, feeds, backend, monkeypatch)


def test_pad_errors():
    x = np.zeros((3, 4), np.float32)
    with pytest.raises(TensorcError, match="reflect pads 3, 0 need dim 3"):
        tx.from_model(_model("Pad", {"x": x}, {"pads": np.array([3, 0, 0, 0], np.int64)},
                             mode="reflect"))
    with pytest.raises(TensorcError, match="pads .* should be 4 integers"):
        tx.from_model(_model("Pad", {"x": x}, {"pads": np.array([1, 0], np.int64)}))
    with pytest.raises(TensorcError, match="its pads .* known at import"):
        tx.from_model(_model("Pad", {"x": x, "pads": np.array([1, 0, 0, 0], np.int64)}))


# --- CumSum -----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, np.int64])
@pytest.mark.parametrize("shape,axis", [((7,), 0), ((3, 5), 1), ((3, 5), -2),
                                        ((2, 4, 3), 1)])
@pytest.mark.parametrize("exclusive,reverse", [(0, 0), (1, 0), (0, 1), (1, 1)])
def test_cumsum(backend, dtype, shape, axis, exclusive, reverse, monkeypatch):
    feeds = {"x": _rand(np.random.default_rng(7), shape, dtype)}
    model = _model("CumSum", feeds, {"axis": np.array(axis, np.int64)},
                   exclusive=exclusive, reverse=reverse)
    _check(model, feeds, backend, monkeypatch)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cumsum_symbolic_length(backend, monkeypatch):
    """Position ids from a padding mask (HF style): CumSum over a symbolic seq."""
    x = np.ones((2, 3), np.int64)
    model = _model("CumSum", {"x": x}, {"axis": np.array(1, np.int32)},
                   shapes={"x": ["batch", "seq"]})
    for shape in ((2, 3), (3, 9)):
        feeds = {"x": _rand(np.random.default_rng(8), shape, np.int64)}
        _check(model, feeds, backend, monkeypatch)


# --- InstanceNormalization, GroupNormalization -------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (1, 4, 9), (2, 2, 3, 2, 3)])
@pytest.mark.parametrize("dtype,eps", [(np.float32, 1e-5), (np.float64, 1e-2)])
def test_instance_norm(backend, shape, dtype, eps, monkeypatch):
    rng = np.random.default_rng(9)
    feeds = {"x": _rand(rng, shape, dtype)}
    consts = {"s": _rand(rng, shape[1:2], dtype), "b": _rand(rng, shape[1:2], dtype)}
    _check(_model("InstanceNormalization", feeds, consts, epsilon=eps), feeds, backend,
           monkeypatch)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,groups", [((2, 6, 4, 3), 3), ((2, 6, 4, 3), 6),
                                          ((1, 4, 9), 2), ((3, 8, 2, 2, 2), 1)])
@pytest.mark.parametrize("dtype,eps", [(np.float32, 1e-5), (np.float64, 1e-3)])
def test_group_norm(backend, shape, groups, dtype, eps, monkeypatch):
    """Opset 21: scale and bias per channel."""
    rng = np.random.default_rng(10)
    feeds = {"x": _rand(rng, shape, dtype)}
    consts = {"s": _rand(rng, shape[1:2], dtype), "b": _rand(rng, shape[1:2], dtype)}
    _check(_model("GroupNormalization", feeds, consts, num_groups=groups, epsilon=eps),
           feeds, backend, monkeypatch)


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_norm_opset18_per_group(backend, monkeypatch):
    """Opset 18: scale and bias per group (ONNX's reference; ORT runs opset 21)."""
    rng = np.random.default_rng(11)
    x = _rand(rng, (2, 6, 3, 4), np.float32)
    s, b = _rand(rng, (3,), np.float32), _rand(rng, (3,), np.float32)
    g = x.reshape(2, 3, -1)
    norm = (g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + 1e-5)
    want = (norm * s[:, None] + b[:, None]).reshape(x.shape).astype(np.float32)
    model = _model("GroupNormalization", {"x": x}, {"s": s, "b": b}, opset=18, num_groups=3)
    _check(model, {"x": x}, backend, monkeypatch, want=want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_norm_f16_stash_type(backend, monkeypatch):
    """stash_type=1 (the default): an f16 input is normalised in f32 (llvm runs f16
    casts through the reference, so not strict there)."""
    rng = np.random.default_rng(12)
    x = _rand(rng, (2, 4, 3, 3), np.float16)
    s, b = _rand(rng, (4,), np.float16), _rand(rng, (4,), np.float16)
    model = _model("GroupNormalization", {"x": x}, {"s": s, "b": b}, num_groups=2)
    _check(model, {"x": x}, backend, monkeypatch, rtol=2e-3, strict=backend == "numpy")


def test_pad_unsupported_mode_is_one_line():
    x = np.zeros((3, 4), np.float32)
    with pytest.raises(TensorcError, match="mode 'mirror' is not supported"):
        tx.from_model(_model("Pad", {"x": x}, {"pads": np.array([1, 0, 0, 0], np.int64)},
                             mode="mirror"))


def _typed(model, dtype):
    """The model with its output declared as `dtype` (ArgMin gives int64, OneHot the
    values' dtype)."""
    model.graph.output[0].type.tensor_type.elem_type = NP_TO_ONNX[np.dtype(dtype).type]
    return model


# --- ArgMin -----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, np.int64, np.int8,
                                   np.uint8])
@pytest.mark.parametrize("shape,axis", [((4, 7), 1), ((4, 7), 0), ((2, 3, 5), -1),
                                        ((2, 3, 5), 1)])
@pytest.mark.parametrize("keepdims", [0, 1])
@pytest.mark.parametrize("last", [0, 1])
def test_argmin(backend, dtype, shape, axis, keepdims, last, monkeypatch):
    """Integers drawn from a small range, so each row has ties (first vs last index)."""
    rng = np.random.default_rng(10)
    x = _rand(rng, shape, dtype)
    if np.dtype(dtype).kind in "iu":
        x = (x % 4).astype(dtype)
    else:
        x[..., 1] = x[..., 0]         # a tie in floats too
    feeds = {"x": x}
    model = _typed(_model("ArgMin", feeds, axis=axis, keepdims=keepdims,
                          select_last_index=last), np.int64)
    _check(model, feeds, backend, monkeypatch)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int32, np.int64])
@pytest.mark.parametrize("last", [0, 1])
def test_argmin_integer_extremes(backend, dtype, last, monkeypatch):
    """The minimum integer (whose negation overflows) and the maximum, with ties."""
    info = np.iinfo(dtype)
    x = np.array([[info.max, info.min, 0, info.min, 1],
                  [info.max, info.max, info.max - 1, info.max - 1, info.max],
                  [info.min + 1, 3, info.min + 1, info.max, 2]], dtype)
    feeds = {"x": x}
    for axis in (0, 1):
        model = _typed(_model("ArgMin", feeds, axis=axis, select_last_index=last), np.int64)
        _check(model, feeds, backend, monkeypatch)


@pytest.mark.parametrize("backend", BACKENDS)
def test_argmin_f16(backend, monkeypatch):
    """(llvm runs no f16 arithmetic as generated code: f16 is not strict there.)"""
    feeds = {"x": _rand(np.random.default_rng(11), (5, 6), np.float16)}
    model = _typed(_model("ArgMin", feeds, axis=1), np.int64)
    _check(model, feeds, backend, monkeypatch, strict=backend == "numpy")


@pytest.mark.parametrize("backend", BACKENDS)
def test_argmin_nan_and_infinities(backend, monkeypatch):
    """A NaN wins (the first NaN), as numpy's argmin and tensorc's argmax; ONNX Runtime's
    loop keeps a NaN only where it comes first, so the expectation is numpy's. -inf and
    +inf order as usual, and -0.0 ties with 0.0 (first index)."""
    x = np.array([[3.0, np.nan, 1.0, np.nan], [np.inf, -np.inf, -np.inf, 0.0],
                  [0.0, -0.0, 2.0, 1.0], [np.nan, 2.0, 0.0, 5.0]], np.float32)
    feeds = {"x": x}
    model = _typed(_model("ArgMin", feeds, axis=1, keepdims=0), np.int64)
    _check(model, feeds, backend, monkeypatch, want=np.argmin(x, axis=1))



def test_argmin_refuses_bool():
    n = helper.make_node("ArgMin", ["x"], ["y"], axis=1)
    g = helper.make_graph([n], "m", [helper.make_tensor_value_info("x", TensorProto.BOOL,
                                                                   (3, 4))],
                          [helper.make_tensor_value_info("y", TensorProto.INT64, None)])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    with pytest.raises(TensorcError, match="ArgMin of a bool tensor"):
        tx.from_model(model)

# --- OneHot -----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("idx_dtype,val_dtype", [(np.int64, np.float32),
                                                 (np.int32, np.int64),
                                                 (np.float32, np.float32),
                                                 (np.int64, np.int32),
                                                 (np.float32, np.float64)])
@pytest.mark.parametrize("shape,axis", [((5,), -1), ((5,), 0), ((2, 3), -1), ((2, 3), 0),
                                        ((2, 3), 1), ((2, 3, 4), -2)])
def test_one_hot(backend, idx_dtype, val_dtype, shape, axis, monkeypatch):
    """Indices from -depth-2 to depth+1: negative ones count from the end, out-of-range
    ones give an all-off row."""
    depth = 6
    rng = np.random.default_rng(12)
    feeds = {"idx": rng.integers(-depth - 2, depth + 2, shape).astype(idx_dtype)}
    consts = {"depth": np.array(depth, np.int64),
              "values": np.array([2, 7], val_dtype)}
    model = _typed(_model("OneHot", feeds, consts, axis=axis), val_dtype)
    _check(model, feeds, backend, monkeypatch)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_hot_depth_as_float_and_values_as_input(backend, monkeypatch):
    """depth may be any numeric type (here a float of shape [1]); values a graph input."""
    feeds = {"idx": np.array([[0, 3, -1], [9, 2, -4]], np.int64),
             "values": np.array([-1.5, 4.25], np.float32)}
    consts = {"depth": np.array([4.0], np.float32)}
    model = _typed(_model("OneHot", feeds, consts, order=["idx", "depth", "values"]),
                   np.float32)
    _check(model, feeds, backend, monkeypatch)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_hot_symbolic_shape(backend, monkeypatch):
    """Token ids of a symbolic batch and length, one-hot along a middle axis."""
    feeds = {"idx": np.random.default_rng(14).integers(-5, 5, (2, 7)).astype(np.int64)}
    consts = {"depth": np.array(5, np.int64), "values": np.array([0.0, 1.0], np.float32)}
    model = _typed(_model("OneHot", feeds, consts, shapes={"idx": ("b", "s")}, axis=1),
                   np.float32)
    _check(model, feeds, backend, monkeypatch)

def test_one_hot_needs_a_known_depth():
    feeds = {"idx": np.array([0, 1], np.int64), "depth": np.array(3, np.int64),
             "values": np.array([0, 1], np.int64)}
    with pytest.raises(TensorcError, match="depth"):
        tx.from_model(_model("OneHot", feeds))


# --- Einsum -----------------------------------------------------------------------------

EINSUM_CASES = [  # (equation, operand shapes)
    ("bij,bjk->bik", [(2, 3, 4), (2, 4, 5)]),
    ("bhqd,bhkd->bhqk", [(2, 3, 4, 5), (2, 3, 6, 5)]),
    ("ij,jk->ik", [(3, 4), (4, 5)]),
    ("ij,kj->ik", [(3, 4), (5, 4)]),
    ("ij,jk", [(3, 4), (4, 5)]),                 # implicit output: ik
    ("ij->ji", [(3, 4)]),
    ("ij->i", [(3, 4)]),
    ("ij->", [(3, 4)]),
    ("ijk->kij", [(2, 3, 4)]),
    ("i,j->ij", [(3,), (4,)]),
    ("i,i->", [(5,)] * 2),
    ("i,i", [(5,)] * 2),                         # implicit: a scalar
    ("bij,bkj->bki", [(2, 3, 4), (2, 5, 4)]),    # output in another order
    ("abcd,cbe->aed", [(2, 3, 4, 5), (4, 3, 6)]),  # two contracted, free on both sides
    ("ij,jk->ki", [(3, 4), (4, 5)]),
    ("bij,jk->bik", [(2, 3, 4), (4, 5)]),         # a label batch on one side only
    ("ijk,ik->j", [(3, 4, 5), (3, 5)]),          # contracted labels, a summed free one
    ("ij,ij->ij", [(3, 4), (3, 4)]),             # elementwise (all batch)
    ("bij,bjk->", [(2, 3, 4), (2, 4, 5)]),
    ("...ij,...jk->...ik", [(2, 3, 3, 4), (2, 3, 4, 5)]),
    ("...ij,jk->...ik", [(2, 3, 3, 4), (4, 5)]),
    ("...ij,...jk", [(3, 1, 3, 4), (3, 2, 4, 5)]),  # ellipsis dims of 1 broadcast
    ("i...->...", [(3, 2, 4)]),
    ("ii->i", [(4, 4)]),                         # a diagonal
    ("ii", [(4, 4)]),                            # a trace
    ("bii,bij->bj", [(2, 3, 3), (2, 3, 5)]),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64, np.int32])
@pytest.mark.parametrize("case", range(len(EINSUM_CASES)))
def test_einsum(backend, dtype, case, monkeypatch):
    eq, shapes = EINSUM_CASES[case]
    rng = np.random.default_rng(13 + case)
    feeds = {f"x{k}": _rand(rng, s, dtype) for k, s in enumerate(shapes)}
    _check(_model("Einsum", feeds, equation=eq), feeds, backend, monkeypatch)


@pytest.mark.parametrize("backend", BACKENDS)
def test_einsum_symbolic_batch(backend, monkeypatch):
    """Attention scores with symbolic batch and sequence dims."""
    rng = np.random.default_rng(40)
    feeds = {"q": _rand(rng, (2, 3, 4, 5), np.float32), "k": _rand(rng, (2, 3, 6, 5),
                                                                   np.float32)}
    model = _model("Einsum", feeds, shapes={"q": ("b", 3, "s", 5), "k": ("b", 3, "t", 5)},
                   equation="bhqd,bhkd->bhqk")
    _check(model, feeds, backend, monkeypatch)


@pytest.mark.parametrize("eq,shapes,match", [
    ("ij,jk,kl->il", [(2, 3), (3, 4), (4, 5)], "more than two operands"),
    ("ij,jk->ik", [(2, 3), (4, 5)], "index 'j'"),
    ("ijk->ij", [(2, 3)], "does not fit"),
    ("ij->ii", [(2, 2)], "repeats a label"),
    ("ij->k", [(2, 2)], "names one no operand has"),
])
def test_einsum_refused(eq, shapes, match):
    feeds = {f"x{k}": np.ones(s, np.float32) for k, s in enumerate(shapes)}
    with pytest.raises(TensorcError, match=match):
        tx.from_model(_model("Einsum", feeds, equation=eq))
