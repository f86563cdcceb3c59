"""The ONNX selection, scatter, rearrangement and Resize ops (frontend/onnx/indexing.py,
spatial.py's Resize): single-node models built with onnx.helper, run on numpy and llvm
(strict: no reference fallback) against ONNX Runtime (ONNX's reference evaluator where
ONNX Runtime has no kernel), floats to 1e-5 relative, integers exactly; a symbolic batch
where the op allows one."""

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from tensorc.backends import available_backends, get_backend
from tensorc.errors import ShapeError, UnsupportedOpError
from tensorc.frontend import onnx as tx
from tensorc.frontend.onnx.values import NeedsConstantError

BACKENDS = ["numpy"] + ["llvm"] * ("llvm" in available_backends())
CODE = {np.float32: TensorProto.FLOAT, np.float64: TensorProto.DOUBLE,
        np.float16: TensorProto.FLOAT16, np.int32: TensorProto.INT32,
        np.int64: TensorProto.INT64, np.int8: TensorProto.INT8, np.uint8: TensorProto.UINT8}


def _model(op, feeds, consts=None, outputs=("y",), opset=21, shapes=None, order=None,
           out_types=None, **attrs):
    """One `op` node; `feeds` are graph inputs (`shapes` may name symbolic dims),
    `consts` initializers; `order` gives the node's inputs ('' for a gap); the outputs
    have the first input's dtype unless `out_types` says otherwise."""
    consts = consts or {}
    node = helper.make_node(op, order or list(feeds) + list(consts), list(outputs), **attrs)
    ins = [helper.make_tensor_value_info(k, CODE[v.dtype.type], (shapes or {}).get(k, v.shape))
           for k, v in feeds.items()]
    first = CODE[np.asarray(next(iter({**feeds, **consts}.values()))).dtype.type]
    outs = [helper.make_tensor_value_info(o, t, None) for o, t in zip(
        outputs, out_types or [first] * len(outputs), strict=True)]
    g = helper.make_graph([node], "m", ins, outs, initializer=[
        numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _expected(model, feeds, reference=False):
    """ONNX Runtime's outputs, or with `reference` ONNX's reference evaluator's (where
    ORT has no kernel for the op at its opset, or differs from ONNX's reference)."""
    if reference:
        return ReferenceEvaluator(model).run(None, feeds)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _check(model, feeds, backend, monkeypatch, rtol=1e-5, reference=False):
    monkeypatch.setenv("TENSORC_STRICT", "1")   # llvm: a reference fallback is an error
    want = _expected(model, feeds, reference)
    got = get_backend(backend).compile(tx.from_model(model))(**feeds)
    got = list(got) if isinstance(got, (list, tuple)) else [got]
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, w.shape, g.dtype, w.dtype)
        if w.dtype.kind in "iub":
            np.testing.assert_array_equal(g, w)
        else:
            scale = max(float(np.abs(w).max(initial=0)), 1e-6)
            err = float(np.abs(g.astype(np.float64) - w).max(initial=0)) / scale
            assert err <= rtol, f"relative error {err:.2e} > {rtol}"


def _floats(rng, shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


# --- Resize -----------------------------------------------------------------------------

RESIZE_CASES = [  # (input shape, scales or None, sizes or None, attributes)
    ((2, 3, 4, 5), [1, 1, 2, 1.5], None, dict(mode="nearest")),
    ((2, 3, 4, 5), [1, 1, 0.6, 0.8], None, dict(mode="nearest", nearest_mode="floor",
                                                coordinate_transformation_mode="asymmetric")),
    ((2, 3, 5, 4), None, [2, 3, 9, 7], dict(mode="nearest", nearest_mode="ceil",
                                            coordinate_transformation_mode="align_corners")),
    ((2, 3, 5, 4), None, [2, 3, 3, 10], dict(mode="nearest", nearest_mode="round_prefer_ceil",
                                             coordinate_transformation_mode="half_pixel")),
    ((2, 3, 4, 5), [1, 1, 2, 2], None, dict(mode="linear")),
    ((2, 3, 8, 6), [1, 1, 0.5, 0.5], None, dict(mode="linear",
                                                coordinate_transformation_mode="align_corners")),
    ((2, 3, 5, 6), None, [2, 3, 3, 1], dict(mode="linear",
                                            coordinate_transformation_mode="pytorch_half_pixel")),
    ((2, 3, 7, 6), [1, 1, 1.7, 0.6], None, dict(mode="linear", coordinate_transformation_mode=(
        "half_pixel_symmetric"))),
    ((2, 3, 9, 8), [1, 1, 0.4, 0.6], None, dict(mode="linear", antialias=1)),
    ((2, 3, 4, 5), [1, 1, 2, 1.6], None, dict(mode="cubic")),
    ((2, 3, 8, 8), [1, 1, 0.8, 0.5], None, dict(mode="cubic", cubic_coeff_a=-0.5,
                                                exclude_outside=1)),
    ((2, 3, 9, 9), None, [2, 3, 5, 4], dict(mode="cubic", antialias=1)),
    ((2, 3, 6, 5), [1, 1, 1.5, 2], None, dict(mode="cubic",
                                              coordinate_transformation_mode="asymmetric")),
    ((2, 7, 6), [2.0, 1.5], None, dict(mode="linear", axes=[2, 1])),
    ((3, 7), None, [12], dict(mode="cubic", axes=[-1])),
    ((2, 3, 6, 8), None, [4, 4], dict(mode="nearest", axes=[2, 3],
                                      keep_aspect_ratio_policy="not_larger")),
    ((2, 3, 6, 8), None, [4, 4], dict(mode="linear", axes=[2, 3],
                                      keep_aspect_ratio_policy="not_smaller")),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(RESIZE_CASES)))
def test_resize(backend, case, monkeypatch):
    """A symbolic batch (where the sizes do not fix it); scales or sizes as initializers
    (roi empty)."""
    shape, scales, sizes, attrs = RESIZE_CASES[case]
    feeds = {"x": _floats(np.random.default_rng(case), shape)}
    consts = {"roi": np.zeros(0, np.float32)}
    order = ["x", "roi"]
    if scales is not None:
        consts["scales"] = np.asarray(scales, np.float32)
        order.append("scales")
    else:
        consts["sizes"] = np.asarray(sizes, np.int64)
        order += ["", "sizes"]
    symbolic = scales is not None or "axes" in attrs   # sizes would fix the batch
    model = _model("Resize", feeds, consts, opset=19, order=order,
                   shapes={"x": ["batch", *shape[1:]]} if symbolic else None, **attrs)
    _check(model, feeds, backend, monkeypatch)


@pytest.mark.parametrize("backend", BACKENDS)
def test_resize_align_corners_with_a_fractional_output_width(backend, monkeypatch):
    """Scales whose output width is fractional (6 x 0.75 = 4.5): ONNX's reference (and the
    official cases) map align_corners by that width, ONNX Runtime by the rounded one."""
    feeds = {"x": _floats(np.random.default_rng(13), (2, 3, 8, 6))}
    model = _model("Resize", feeds, {"roi": np.zeros(0, np.float32), "scales": np.array(
        [1, 1, 0.5, 0.75], np.float32)}, opset=19, mode="linear",
        coordinate_transformation_mode="align_corners")
    _check(model, feeds, backend, monkeypatch, reference=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_resize_tf_crop_and_resize(backend, mode, monkeypatch):
    """Positions outside the crop take the extrapolation value, one axis at a time as in
    ONNX's reference (whose numbers the official cases hold): a position outside along
    one axis only is then mixed into the other axis's interpolation, where ONNX Runtime
    gives the extrapolation value itself (nearest: no mixing, the two agree)."""
    feeds = {"x": _floats(np.random.default_rng(1), (1, 2, 6, 7))}
    roi = np.array([0, 0, -0.23, 0.3, 1, 1, 0.87, 1.4], np.float32)
    model = _model("Resize", feeds, {"roi": roi, "scales": np.array([1, 1, 1.5, 0.8],
                                                                      np.float32)},
                   opset=19, mode=mode, coordinate_transformation_mode="tf_crop_and_resize",
                   extrapolation_value=7.5)
    _check(model, feeds, backend, monkeypatch, reference=mode == "linear")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.uint8, np.int32])
def test_resize_nearest_integers(backend, dtype, monkeypatch):
    x = np.random.default_rng(2).integers(0, 100, (1, 2, 4, 5)).astype(dtype)
    model = _model("Resize", {"x": x}, {"roi": np.zeros(0, np.float32),
                                        "scales": np.array([1, 1, 1.5, 2.5], np.float32)},
                   opset=19, mode="nearest")
    _check(model, {"x": x}, backend, monkeypatch)


def test_resize_refusals():
    x = np.zeros((1, 2, 4, 4), np.int32)
    scales = {"roi": np.zeros(0, np.float32), "scales": np.array([1, 1, 2, 2], np.float32)}
    with pytest.raises(UnsupportedOpError, match="linear interpolation of i32"):
        tx.from_model(_model("Resize", {"x": x}, scales, opset=19, mode="linear"))
    with pytest.raises(UnsupportedOpError, match="must be static"):
        tx.from_model(_model("Resize", {"x": x.astype(np.float32)}, scales, opset=19,
                             shapes={"x": [1, 2, "h", 4]}))
    with pytest.raises(ShapeError, match="do not fit axes"):
        tx.from_model(_model("Resize", {"x": x}, scales, opset=19, axes=[2, 3]))


# --- TopK -------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("largest", [0, 1])
@pytest.mark.parametrize("axis", [1, 0, -1])
def test_topk(backend, largest, axis, monkeypatch):
    rng = np.random.default_rng(3)
    feeds = {"x": _floats(rng, (4, 9, 3))}
    shapes = {"x": ["batch", 9, 3]} if axis != 0 else None
    model = _model("TopK", feeds, {"k": np.array([3], np.int64)}, outputs=("v", "i"),
                   out_types=[TensorProto.FLOAT, TensorProto.INT64], shapes=shapes, axis=axis,
                   largest=largest)
    _check(model, feeds, backend, monkeypatch)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.float64])
def test_topk_ties_lower_index_first(backend, dtype, monkeypatch):
    x = np.random.default_rng(4).integers(-2, 3, (5, 12)).astype(dtype)
    for largest in (0, 1):
        model = _model("TopK", {"x": x}, {"k": np.array([6], np.int64)}, outputs=("v", "i"),
                       out_types=[CODE[dtype], TensorProto.INT64], largest=largest)
        _check(model, {"x": x}, backend, monkeypatch)


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_nan_sorts_above_every_number(backend, monkeypatch):
    """As ONNX Runtime and numpy's sort: NaN is the largest value (last when smallest);
    infinities in their places."""
    x = np.array([[1, np.nan, 3, np.nan, -1, 2], [np.nan] * 6,
                  [np.inf, -np.inf, np.nan, -np.inf, 0, np.inf]], np.float32)
    x = np.tile(x, (2, 7))   # rows of 42: llvm keeps 8 interleaved picks a pass
    x[3:, 5] = 9.0
    for largest in (0, 1):
        model = _model("TopK", {"x": x}, {"k": np.array([5], np.int64)}, outputs=("v", "i"),
                       out_types=[TensorProto.FLOAT, TensorProto.INT64], largest=largest)
        monkeypatch.setenv("TENSORC_STRICT", "1")
        got = get_backend(backend).compile(tx.from_model(model))(x=x)
        for g, w in zip(got, _expected(model, {"x": x}), strict=True):
            np.testing.assert_array_equal(g, w)   # NaNs compare equal here


def test_topk_refusals():
    x = np.zeros((2, 5), np.float32)
    with pytest.raises(ShapeError, match="K=6 is out of range"):
        tx.from_model(_model("TopK", {"x": x}, {"k": np.array([6], np.int64)},
                             outputs=("v", "i")))
    with pytest.raises(NeedsConstantError, match="K"):
        tx.from_model(_model("TopK", {"x": x, "k": np.array([2], np.int64)},
                             outputs=("v", "i")))


# --- ScatterElements, ScatterND ---------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "add", "mul", "max", "min"])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_scatter_elements(backend, reduction, axis, monkeypatch):
    """Distinct indices per written row for none (ONNX leaves repeats undefined),
    repeats for the reductions; negative indices count from the end."""
    rng = np.random.default_rng(5)
    data = _floats(rng, (4, 5, 6))
    ax = axis % 3
    ishape = [3, 4, 4]
    ishape[ax] = 3 if reduction == "none" else 5
    n = data.shape[ax]
    idx = np.stack([rng.permutation(n)[:ishape[ax]] for _ in range(
        int(np.prod(ishape)) // ishape[ax])]) if reduction == "none" else \
        rng.integers(-n, n, (int(np.prod(ishape)) // ishape[ax], ishape[ax]))
    moved = [d for i, d in enumerate(ishape) if i != ax] + [ishape[ax]]
    idx = np.moveaxis(idx.reshape(moved), -1, ax).astype(np.int64)
    feeds = {"data": data, "upd": _floats(rng, ishape)}
    model = _model("ScatterElements", feeds, {"idx": idx}, order=["data", "idx", "upd"],
                   axis=axis, reduction=reduction)
    _check(model, feeds, backend, monkeypatch)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "add", "mul", "max", "min"])
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_scatter_nd(backend, reduction, depth, monkeypatch):
    rng = np.random.default_rng(6)
    data = _floats(rng, (4, 5, 3))
    if reduction == "none":   # distinct index tuples
        flat = rng.permutation(int(np.prod(data.shape[:depth])))[:4]
        idx = np.stack(np.unravel_index(flat, data.shape[:depth]), -1).reshape(2, 2, depth)
    else:
        idx = np.stack([rng.integers(-d, d, (2, 3)) for d in data.shape[:depth]], -1)
    feeds = {"data": data, "upd": _floats(rng, idx.shape[:-1] + data.shape[depth:])}
    model = _model("ScatterND", feeds, {"idx": idx.astype(np.int64)},
                   order=["data", "idx", "upd"], reduction=reduction)
    _check(model, feeds, backend, monkeypatch)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scatter_nd_symbolic_batch(backend, monkeypatch):
    """A cache-style write: rows of a [batch, 8, 4] tensor at run-time indices."""
    rng = np.random.default_rng(7)
    feeds = {"data": _floats(rng, (3, 8, 4)), "idx": np.array([[[0, 5]], [[1, 2]], [[2, 7]]]),
             "upd": _floats(rng, (3, 1, 4))}
    model = _model("ScatterND", feeds, shapes={"data": ["batch", 8, 4], "idx": ["batch", 1, 2],
                                               "upd": ["batch", 1, 4]})
    _check(model, feeds, backend, monkeypatch)


def test_scatter_refusals():
    data = np.zeros((4, 5), np.float32)
    with pytest.raises(ShapeError, match="updates have shape"):
        tx.from_model(_model("ScatterND", {"data": data, "upd": np.zeros((2, 4), np.float32)},
                             {"idx": np.zeros((2, 1), np.int64)}, order=["data", "idx", "upd"]))
    with pytest.raises(ShapeError, match="not an ONNX reduction"):
        tx.from_model(_model("ScatterElements", {"data": data, "upd": data},
                             {"idx": np.zeros((4, 5), np.int64)}, order=["data", "idx", "upd"],
                             reduction="mean"))


# --- NonZero ----------------------------------------------------------------------------

def test_nonzero_of_a_constant_folds_and_of_an_input_needs_binding():
    x = np.array([[1, 0, 3], [0, 0, 2]], np.int32)
    model = _model("NonZero", {"x": x}, out_types=[TensorProto.INT64])
    want = _expected(model, {"x": x})[0]
    g = tx.from_model(_model("NonZero", {}, {"x": x}, order=["x"],
                             out_types=[TensorProto.INT64]))
    assert not g.nodes   # folded at import: the output is a constant
    np.testing.assert_array_equal(get_backend("numpy").compile(g)(), want)
    with pytest.raises(NeedsConstantError, match="depends on the values of input 'x'") as e:
        tx.from_model(model)
    assert e.value.inputs == ["x"]
    bound = tx.from_model(model, bind={"x": x})
    np.testing.assert_array_equal(get_backend("numpy").compile(bound)(), want)


# --- ReduceProd, CumProd, Hardmax -------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.int64, np.int32])
@pytest.mark.parametrize("axes,keepdims", [([1], 1), ([0, 2], 0), (None, 1), ([-1], 0)])
def test_reduce_prod(backend, dtype, axes, keepdims, monkeypatch):
    """Zeros and negatives included (a real product, not exp of a sum of logs)."""
    rng = np.random.default_rng(8)
    x = rng.integers(-3, 4, (3, 4, 5)).astype(dtype) if dtype != np.float32 else \
        np.where(rng.random((3, 4, 5)) < 0.1, 0, rng.uniform(-1.5, 1.5, (3, 4, 5))).astype(dtype)
    consts = {"axes": np.array(axes, np.int64)} if axes is not None else {}
    model = _model("ReduceProd", {"x": x}, consts, opset=18, keepdims=keepdims,
                   shapes={"x": ["batch", 4, 5]} if axes and 0 not in axes else None)
    _check(model, {"x": x}, backend, monkeypatch)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("exclusive", [0, 1])
@pytest.mark.parametrize("reverse", [0, 1])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_cumprod(backend, exclusive, reverse, axis, monkeypatch):
    """(ORT has no CumProd kernel: ONNX's reference evaluator is the independent check.)"""
    rng = np.random.default_rng(9)
    x = np.where(rng.random((3, 6, 4)) < 0.1, 0, rng.uniform(-1.5, 1.5, (3, 6, 4)))
    feeds = {"x": x.astype(np.float32)}
    model = _model("CumProd", feeds, {"axis": np.array(axis, np.int64)}, opset=26,
                   exclusive=exclusive, reverse=reverse)
    _check(model, feeds, backend, monkeypatch, reference=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_hardmax(backend, axis, monkeypatch):
    x = np.random.default_rng(10).integers(-2, 3, (3, 5, 4)).astype(np.float32)  # ties
    _check(_model("Hardmax", {"x": x}, opset=13, axis=axis), {"x": x}, backend, monkeypatch)


# --- DepthToSpace, SpaceToDepth ---------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["DCR", "CRD"])
def test_depth_to_space(backend, mode, monkeypatch):
    feeds = {"x": _floats(np.random.default_rng(11), (2, 12, 3, 2))}
    model = _model("DepthToSpace", feeds, shapes={"x": ["batch", 12, 3, 2]}, blocksize=2,
                   mode=mode)
    _check(model, feeds, backend, monkeypatch)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode,opset", [("DCR", 13), ("CRD", 28)])
def test_space_to_depth(backend, mode, opset, monkeypatch):
    """(CRD is opset 28's, which ORT lacks: ONNX's reference evaluator.)"""
    feeds = {"x": _floats(np.random.default_rng(12), (2, 3, 6, 4))}
    attrs = {"mode": mode} if opset >= 28 else {}
    model = _model("SpaceToDepth", feeds, shapes={"x": ["batch", 3, 6, 4]}, opset=opset,
                   blocksize=2, **attrs)
    _check(model, feeds, backend, monkeypatch, reference=opset >= 28)
