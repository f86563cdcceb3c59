"""Hostile ONNX nodes (issue 10, item 8): attributes and constant inputs that the ONNX
spec rules out are one-line `TensorcError`s naming the node, at import, never a
ZeroDivisionError or a numpy ValueError from the first run, and never a model that
ONNX Runtime rejects quietly computed (Slice axes wrapped modulo the rank, a Flatten
axis out of range, Split parts ONNX does not allow, integer division by a constant 0).

Where ORT is the judge, each test also shows ORT rejecting the same model (at session
creation or at its first run), so the two agree."""

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tensorc import cli
from tensorc.backends import get_backend
from tensorc.errors import TensorcError
from tensorc.frontend import onnx as tx

F, I64, I32 = TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32


def _vi(name, dtype, shape):
    return helper.make_tensor_value_info(name, dtype, shape)


def _model(node, inputs, outputs, inits=(), opset=18):
    graph = helper.make_graph([node], "hostile", inputs, outputs,
                              initializer=[numpy_helper.from_array(np.asarray(v), k)
                                           for k, v in dict(inits).items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _ort(model, feeds):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 4  # the rejection is the point; keep its log quiet
    sess = ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _ort_rejects(model, feeds):
    with pytest.raises(Exception) as info:  # noqa: PT011  (ORT's own exception classes)
        _ort(model, feeds)
    assert not isinstance(info.value, AssertionError)


def _tensorc(model, feeds):
    out = get_backend("numpy").compile(tx.from_model(model))(**feeds)
    return list(out) if isinstance(out, tuple) else [out]


def _rejects(model, feeds, match):
    """tensorc refuses it with one line naming the node (at import or the first run)."""
    with pytest.raises(TensorcError) as info:
        _tensorc(model, feeds)
    text = str(info.value)
    assert "\n" not in text, text
    assert "node 'bad'" in text, text
    assert info.match(match)


# --- Range --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.float32])
def test_range_delta_zero(dtype):
    code = {np.int64: I64, np.int32: I32, np.float32: F}[dtype]
    m = _model(helper.make_node("Range", ["s", "l", "d"], ["y"], name="bad"), [],
               [_vi("y", code, None)], {"s": dtype(0), "l": dtype(5), "d": dtype(0)})
    _rejects(m, {}, "delta is 0")
    _ort_rejects(m, {})


def test_range_too_big_says_the_size():
    m = _model(helper.make_node("Range", ["s", "l", "d"], ["y"], name="bad"), [],
               [_vi("y", I64, None)], {"s": np.int64(0), "l": np.int64(10**12),
                                       "d": np.int64(1)})
    _rejects(m, {}, r"1000000000000 elements .* GiB of i64\), more than the 1 GiB")
    _ort_rejects(m, {})  # ORT fails to allocate 8e12 bytes at run time


def test_range_float_not_finite():
    m = _model(helper.make_node("Range", ["s", "l", "d"], ["y"], name="bad"), [],
               [_vi("y", F, None)], {"s": np.float32(0), "l": np.float32(np.inf),
                                     "d": np.float32(1)})
    _rejects(m, {}, "must be finite")


# --- Conv ---------------------------------------------------------------------------

@pytest.mark.parametrize("attrs, match", [
    ({"strides": [0, 1]}, r"strides \[0, 1\] must be positive"),
    ({"strides": [-1, 1]}, r"strides \[-1, 1\] must be positive"),
    ({"dilations": [-1, 1]}, r"dilations \[-1, 1\] must be positive"),
    ({"dilations": [1, 0]}, r"dilations \[1, 0\] must be positive"),
    ({"pads": [-1, 0, 0, 0]}, r"pads \[-1, 0, 0, 0\] must be >= 0"),
    ({"strides": [1, 1, 1]}, r"strides \[1, 1, 1\] should have 2 values"),
])
def test_conv_bad_attributes(attrs, match):
    m = _model(helper.make_node("Conv", ["x", "w"], ["y"], name="bad", **attrs),
               [_vi("x", F, [1, 1, 5, 5])], [_vi("y", F, None)],
               {"w": np.ones((1, 1, 3, 3), np.float32)})
    feeds = {"x": np.ones((1, 1, 5, 5), np.float32)}
    _rejects(m, feeds, match)
    _ort_rejects(m, feeds)


def test_conv1d_stride_zero():
    m = _model(helper.make_node("Conv", ["x", "w"], ["y"], name="bad", strides=[0]),
               [_vi("x", F, [1, 1, 5])], [_vi("y", F, None)],
               {"w": np.ones((1, 1, 3), np.float32)})
    feeds = {"x": np.ones((1, 1, 5), np.float32)}
    _rejects(m, feeds, r"strides \[0\] must be positive")
    _ort_rejects(m, feeds)


def test_conv2d_op_checks_its_attributes():
    """The IR op itself (DSL, IR text) refuses them too, with no ZeroDivisionError."""
    from tensorc.errors import ShapeError
    from tensorc.ir import TensorType
    from tensorc.ops import get_op
    x, w = TensorType((1, 1, 5, 5), "f32"), TensorType((1, 1, 3, 3), "f32")
    with pytest.raises(ShapeError, match="strides"):
        get_op("conv2d").infer(x, w, strides=(0, 1))
    with pytest.raises(ShapeError, match="pads"):
        get_op("conv2d").infer(x, w, pads=(0, -1, 0, 0))


# --- Unsqueeze, Slice, Flatten: axes ---------------------------------------------------

@pytest.mark.parametrize("axes, match", [
    ([0, 0], r"axes \[0, 0\] name axis 0 twice"),
    ([0, -3], r"axes \[0, -3\] name axis 0 twice"),
    ([2], r"axis 2 is out of range for rank 2"),
    ([-3], r"axis -3 is out of range for rank 2"),
])
def test_unsqueeze_bad_axes(axes, match):
    m = _model(helper.make_node("Unsqueeze", ["x", "a"], ["y"], name="bad"),
               [_vi("x", F, [5])], [_vi("y", F, None)], {"a": np.array(axes, np.int64)})
    feeds = {"x": np.ones(5, np.float32)}
    _rejects(m, feeds, match)
    _ort_rejects(m, feeds)


@pytest.mark.parametrize("axes, match", [
    ([2], r"axis 2 is out of range for rank 2 \(ONNX allows -2 to 1\)"),
    ([5], "axis 5 is out of range"),
    ([-3], "axis -3 is out of range"),
    ([1, -1], r"axes \[1, -1\] name axis 1 twice"),
])
def test_slice_axes_not_wrapped(axes, match):
    m = _model(helper.make_node("Slice", ["x", "s", "e", "a"], ["y"], name="bad"),
               [_vi("x", F, [2, 3])], [_vi("y", F, None)],
               {"s": np.zeros(len(axes), np.int64), "e": np.ones(len(axes), np.int64),
                "a": np.array(axes, np.int64)})
    feeds = {"x": np.ones((2, 3), np.float32)}
    _rejects(m, feeds, match)
    _ort_rejects(m, feeds)


@pytest.mark.parametrize("axis", [3, -3])
def test_flatten_axis_out_of_range(axis):
    m = _model(helper.make_node("Flatten", ["x"], ["y"], name="bad", axis=axis),
               [_vi("x", F, [2, 3])], [_vi("y", F, None)])
    feeds = {"x": np.ones((2, 3), np.float32)}
    _rejects(m, feeds, f"axis {axis} is out of range for rank 2 .ONNX allows -2 to 2")
    _ort_rejects(m, feeds)


@pytest.mark.parametrize("axis", [0, 2, -2, -1])
def test_flatten_axis_in_range_matches_ort(axis):
    m = _model(helper.make_node("Flatten", ["x"], ["y"], name="ok", axis=axis),
               [_vi("x", F, [2, 3])], [_vi("y", F, None)])
    feeds = {"x": np.arange(6, dtype=np.float32).reshape(2, 3)}
    (got,), (want,) = _tensorc(m, feeds), _ort(m, feeds)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("backend", ["numpy", "llvm"])
@pytest.mark.parametrize("op, axes", [("Squeeze", [0, 0]), ("Squeeze", [0, -3]),
                                      ("ReduceSum", [1, 1]), ("ReduceMean", [0, -3, 2])])
def test_axes_named_twice_where_ort_allows_them(op, axes, backend):
    """ORT runs Squeeze and ReduceX with an axis named twice (each axis counts once);
    the references raised numpy's 'duplicate value in axis' at the first run."""
    m = _model(helper.make_node(op, ["x", "a"], ["y"], name="n"),
               [_vi("x", F, [1, 2, 3])], [_vi("y", F, None)], {"a": np.array(axes, np.int64)})
    feeds = {"x": np.arange(6, dtype=np.float32).reshape(1, 2, 3)}
    got = get_backend(backend).compile(tx.from_model(m))(**feeds)
    np.testing.assert_allclose(got, _ort(m, feeds)[0], rtol=1e-6)


def test_reduce_and_squeeze_ops_refuse_an_axis_twice():
    """The IR ops themselves: the llvm backend summed an axis named twice twice."""
    from tensorc.errors import ShapeError
    from tensorc.ir import TensorType
    from tensorc.ops import get_op
    t = TensorType((1, 2, 3), "f32")
    with pytest.raises(ShapeError, match="name an axis twice"):
        get_op("reduce_sum").infer(t, axes=(1, -2))
    with pytest.raises(ShapeError, match="name an axis twice"):
        get_op("squeeze").infer(t, axes=(0, 0))


@pytest.mark.parametrize("axis", [2, -3])
def test_gather_elements_axis_not_wrapped(axis):
    m = _model(helper.make_node("GatherElements", ["x", "i"], ["y"], name="bad", axis=axis),
               [_vi("x", F, [2, 3])], [_vi("y", F, None)],
               {"i": np.zeros((1, 1), np.int64)})
    feeds = {"x": np.ones((2, 3), np.float32)}
    _rejects(m, feeds, f"axis {axis} is out of range for rank 2")
    _ort_rejects(m, feeds)


# --- Split --------------------------------------------------------------------------

def _split(n, dim, opset, num_outputs=None, sizes=None):
    outs = [f"o{k}" for k in range(n)]
    attrs = {} if num_outputs is None else {"num_outputs": num_outputs}
    node = helper.make_node("Split", ["x"] + (["s"] if sizes is not None else []), outs,
                            name="bad", **attrs)
    inits = {} if sizes is None else {"s": np.array(sizes, np.int64)}
    m = _model(node, [_vi("x", F, [dim])], [_vi(o, F, None) for o in outs], inits, opset)
    return m, {"x": np.arange(dim, dtype=np.float32)}


@pytest.mark.parametrize("n, dim, opset, num_outputs, sizes, match", [
    (2, 3, 13, None, None, "dim 3 does not split evenly into 2 parts"),
    (4, 5, 13, None, None, "dim 5 does not split evenly into 4 parts"),
    (4, 5, 18, 4, None, "4 parts of 2 .* overrun dim 5"),
    (2, 4, 18, None, None, "neither the split sizes .* nor num_outputs"),
    (2, 6, 18, 3, None, "num_outputs is 3 but the node has 2 outputs"),
    (2, 5, 18, None, [6, -1], r"split sizes \[6, -1\] must be >= 0"),
    (2, 5, 18, None, [2, 2], r"sizes \[2, 2\] do not add up to dim 0"),
])
def test_split_ort_rejects(n, dim, opset, num_outputs, sizes, match):
    m, feeds = _split(n, dim, opset, num_outputs, sizes)
    _rejects(m, feeds, match)
    _ort_rejects(m, feeds)


@pytest.mark.parametrize("n, dim, opset, num_outputs, sizes", [
    (3, 5, 18, 3, None),    # uneven: the last part is smaller
    (6, 5, 18, 6, None),    # ceil(5/6) = 1: the last part is empty, and ORT allows it
    (4, 9, 18, 4, None),    # 3, 3, 3, 0
    (2, 5, 18, None, [5, 0]),
    (3, 6, 13, None, None),
])
def test_split_ort_accepts_and_agrees(n, dim, opset, num_outputs, sizes):
    m, feeds = _split(n, dim, opset, num_outputs, sizes)
    got, want = _tensorc(m, feeds), _ort(m, feeds)
    assert [g.tolist() for g in got] == [w.tolist() for w in want]


# --- Pow ----------------------------------------------------------------------------

def test_pow_integer_negative_constant_exponent():
    m = _model(helper.make_node("Pow", ["x", "e"], ["y"], name="bad"),
               [_vi("x", I64, [3])], [_vi("y", I64, None)], {"e": np.array(-1, np.int64)})
    _rejects(m, {"x": np.array([1, 2, 3], np.int64)}, "negative constant exponent -1")


@pytest.mark.parametrize("dtype", [np.int64, np.int32])
def test_pow_integer_negative_runtime_exponent_matches_ort(dtype):
    """A run-time negative exponent on an integer base is 1 / x**k truncated, as ORT
    computes it (1, -1 or 1, and 0): never numpy's ValueError. For x = 0 ORT's value is
    undefined (it casts inf: INT_MIN); tensorc gives 0, as for integer division by 0."""
    code = {np.int64: I64, np.int32: I32}[dtype]
    m = _model(helper.make_node("Pow", ["x", "e"], ["y"], name="p"),
               [_vi("x", code, [7]), _vi("e", code, [7])], [_vi("y", code, None)])
    feeds = {"x": np.array([1, -1, -1, 2, -3, 5, 7], dtype),
             "e": np.array([-3, -3, -2, -1, -1, 2, 0], dtype)}
    (got,), (want,) = _tensorc(m, feeds), _ort(m, feeds)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)
    zero = {"x": np.array([0, 0], dtype), "e": np.array([-1, -2], dtype)}
    m0 = _model(helper.make_node("Pow", ["x", "e"], ["y"], name="p"),
                [_vi("x", code, [2]), _vi("e", code, [2])], [_vi("y", code, None)])
    np.testing.assert_array_equal(_tensorc(m0, zero)[0], [0, 0])


@pytest.mark.parametrize("exponent, base", [(0.5, [4, 9, 10]), (-0.5, [1, 4, 9]),
                                            (-1.0, [1, 2, 3]), (2.5, [2, 3, 4])])
def test_pow_integer_base_float_exponent_matches_ort(exponent, base):
    """Computed in double and truncated, as ORT does; casting the exponent to the base's
    type first made 4 ** 0.5 equal 1."""
    m = _model(helper.make_node("Pow", ["x", "e"], ["y"], name="p"),
               [_vi("x", I64, [3])], [_vi("y", I64, None)],
               {"e": np.array(exponent, np.float32)})
    feeds = {"x": np.array(base, np.int64)}
    (got,), (want,) = _tensorc(m, feeds), _ort(m, feeds)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


# --- Div ----------------------------------------------------------------------------

@pytest.mark.parametrize("divisor", [0, [1, 0, 2]])
@pytest.mark.parametrize("dtype", [np.int64, np.int32])
def test_div_integer_by_constant_zero(divisor, dtype):
    code = {np.int64: I64, np.int32: I32}[dtype]
    m = _model(helper.make_node("Div", ["x", "d"], ["y"], name="bad"),
               [_vi("x", code, [3])], [_vi("y", code, None)],
               {"d": np.array(divisor, dtype)})
    feeds = {"x": np.array([1, 2, 3], dtype)}
    _rejects(m, feeds, "integer .* division by a constant divisor that holds 0")
    _ort_rejects(m, feeds)   # at session creation: "Integer division by zero"


def test_div_integer_constants_folded_by_zero():
    m = _model(helper.make_node("Div", ["a", "d"], ["y"], name="bad"), [],
               [_vi("y", I64, None)], {"a": np.array([4], np.int64),
                                       "d": np.array([0], np.int64)})
    _rejects(m, {}, "division by a constant divisor")
    _ort_rejects(m, {})


def test_div_integer_runtime_zero_is_documented_zero():
    """A run-time zero divisor: ORT fails the run; tensorc gives 0 there (every backend
    alike, docs/onnx.md), and the other elements are truncated quotients."""
    m = _model(helper.make_node("Div", ["x", "d"], ["y"], name="dv"),
               [_vi("x", I64, [3]), _vi("d", I64, [3])], [_vi("y", I64, None)])
    feeds = {"x": np.array([7, 2, -7], np.int64), "d": np.array([2, 0, 2], np.int64)}
    np.testing.assert_array_equal(_tensorc(m, feeds)[0], [3, 0, -3])
    _ort_rejects(m, feeds)


def test_div_float_by_constant_zero_is_inf_like_ort():
    m = _model(helper.make_node("Div", ["x", "d"], ["y"], name="dv"),
               [_vi("x", F, [2])], [_vi("y", F, None)], {"d": np.array(0, np.float32)})
    feeds = {"x": np.array([1, -2], np.float32)}
    with np.errstate(divide="ignore"):
        got = _tensorc(m, feeds)[0]
    np.testing.assert_array_equal(got, _ort(m, feeds)[0])


# --- the CLI: one line, exit 2 --------------------------------------------------------

def test_cli_reports_one_line(tmp_path, capsys):
    m = _model(helper.make_node("Range", ["s", "l", "d"], ["y"], name="bad"), [],
               [_vi("y", I64, ["n"])], {"s": np.int64(0), "l": np.int64(5),
                                        "d": np.int64(0)})
    path = tmp_path / "range0.onnx"
    path.write_bytes(m.SerializeToString())
    rc = cli.main(["run", str(path)])
    out, err = capsys.readouterr()
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("tensorc: error: "), err
    assert "Range node 'bad': delta is 0" in err


# --- more models ORT rejects: found beside item 8 ------------------------------------

def test_unnamed_errors_get_the_node_name():
    """Errors raised below the handler (a negative dim) used to lack the node's name."""
    m = _model(helper.make_node("Tile", ["x", "r"], ["y"], name="bad"),
               [_vi("x", F, [2, 3])], [_vi("y", F, None)], {"r": np.array([-1, 1], np.int64)})
    feeds = {"x": np.ones((2, 3), np.float32)}
    _rejects(m, feeds, "bad dimension -1")
    _ort_rejects(m, feeds)
    m = _model(helper.make_node("ConstantOfShape", ["s"], ["y"], name="bad"), [],
               [_vi("y", F, None)], {"s": np.array([-1, 2], np.int64)})
    _rejects(m, {}, "bad dimension -1")
    _ort_rejects(m, {})


def test_range_mixed_dtypes():
    m = _model(helper.make_node("Range", ["s", "l", "d"], ["y"], name="bad"), [],
               [_vi("y", I64, None)], {"s": np.int64(0), "l": np.int32(5), "d": np.int64(1)})
    _rejects(m, {}, "ONNX needs one dtype")
    _ort_rejects(m, {})


def test_einsum_index_sizes_disagree():
    m = _model(helper.make_node("Einsum", ["x", "x"], ["y"], name="bad", equation="ij,ji->i"),
               [_vi("x", F, [2, 3])], [_vi("y", F, None)])
    feeds = {"x": np.ones((2, 3), np.float32)}
    _rejects(m, feeds, "index 'j' of 'ij,ji->i' is 3 in one operand and 2 in another")
    _ort_rejects(m, feeds)


def test_conv_kernel_shape_differs_from_weight():
    m = _model(helper.make_node("Conv", ["x", "w"], ["y"], name="bad", kernel_shape=[2, 2]),
               [_vi("x", F, [1, 1, 5, 5])], [_vi("y", F, None)],
               {"w": np.ones((1, 1, 3, 3), np.float32)})
    feeds = {"x": np.ones((1, 1, 5, 5), np.float32)}
    _rejects(m, feeds, r"kernel_shape \[2, 2\] differs from the weight's spatial shape")
    _ort_rejects(m, feeds)


def test_batch_norm_parameters_not_per_channel():
    m = _model(helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"],
                                name="bad"),
               [_vi("x", F, [1, 1, 5, 5])], [_vi("y", F, None)],
               {k: np.ones(2, np.float32) for k in "sbmv"})
    feeds = {"x": np.ones((1, 1, 5, 5), np.float32)}
    _rejects(m, feeds, r"scale has shape \[2\]; it should be \[C\]")
    _ort_rejects(m, feeds)
