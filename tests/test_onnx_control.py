"""ONNX losses (`frontend/onnx/losses.py`), If and Loop (`control.py`) and models of old
opsets (upgraded by onnx's version converter at import): models built with onnx.helper,
with a symbolic batch where it makes sense, run on numpy and llvm (strict: no reference
fallback) against ONNX Runtime (floats to 1e-5 relative), and the one-line refusals."""

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tensorc.backends import available_backends, get_backend
from tensorc.errors import UnsupportedOpError
from tensorc.frontend import onnx as tx
from tensorc.frontend.onnx import NeedsConstantError
from tensorc.frontend.onnx.control import MAX_UNROLL

BACKENDS = ["numpy"] + ["llvm"] * ("llvm" in available_backends())
F, I64, B = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL


def _vi(name, code, shape):
    return helper.make_tensor_value_info(name, code, shape)


def _model(nodes, inputs, outputs, inits=(), opset=21):
    g = helper.make_graph(nodes, "m", inputs, outputs,
                          initializer=[numpy_helper.from_array(v, k) for k, v in inits])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _ort(model, feeds):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _check(model, feeds_list, backend, monkeypatch, rtol=1e-5):
    """tensorc's outputs equal ORT's for each feed (one compiled graph for all)."""
    monkeypatch.setenv("TENSORC_STRICT", "1")
    exe = get_backend(backend).compile(tx.from_model(model))
    for feeds in feeds_list:
        want = _ort(model, feeds)
        got = exe(**feeds)
        got = list(got) if isinstance(got, tuple) else [got]
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, w.shape, g.dtype,
                                                               w.dtype)
            scale = max(float(np.abs(w).max()) if w.size else 0.0, 1e-6)
            err = float(np.abs(g.astype(np.float64) - w).max()) / scale if w.size else 0.0
            assert err <= rtol, f"relative error {err:.2e} > {rtol}"
    return exe


# --- losses --------------------------------------------------------------------------

LOSS_CASES = [  # (reduction, weight, ignore_index)
    ("none", False, None), ("sum", False, None), ("mean", False, None),
    ("mean", True, None), ("sum", True, 1), ("mean", True, -1), ("mean", False, 2),
    ("none", True, -100),
]


def _loss_model(op, reduction, weight, ignore, spatial, log_prob=False):
    x_shape = ["N", 4, *spatial]
    attrs = {"reduction": reduction}
    if ignore is not None:
        attrs["ignore_index"] = ignore
    ins = ["x", "t"] + ["w"] * weight
    outs = ["loss"] + ["logp"] * log_prob
    node = helper.make_node(op, ins, outs, **attrs)
    inputs = [_vi("x", F, x_shape), _vi("t", I64, ["N", *spatial])]
    outputs = [_vi("loss", F, None)] + [_vi("logp", F, None)] * log_prob
    inits = [("w", np.array([0.5, 2.0, 1.0, 3.0], np.float32))] if weight else []
    return _model([node], inputs, outputs, inits)


def _loss_feeds(rng, batch, spatial, ignore):
    x = rng.standard_normal((batch, 4, *spatial)).astype(np.float32)
    t = rng.integers(0, 4, (batch, *spatial)).astype(np.int64)
    if ignore is not None:   # some targets ignored (ignore_index inside or outside [0, C))
        t.reshape(-1)[::3] = ignore
    return {"x": x, "t": t}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spatial", [(), (3, 2)], ids=["NC", "NCd1d2"])
@pytest.mark.parametrize("case", LOSS_CASES, ids=lambda c: f"{c[0]}-w{int(c[1])}-ii{c[2]}")
@pytest.mark.parametrize("op", ["NegativeLogLikelihoodLoss", "SoftmaxCrossEntropyLoss"])
def test_losses_match_ort(op, case, spatial, backend, monkeypatch):
    reduction, weight, ignore = case
    sce = op == "SoftmaxCrossEntropyLoss"
    model = _loss_model(op, reduction, weight, ignore, list(spatial), log_prob=sce)
    rng = np.random.default_rng(0)
    feeds = [_loss_feeds(rng, b, spatial, ignore) for b in (3, 5)]
    if not sce:   # NLL's input is log-probabilities
        for f in feeds:
            f["x"] = f["x"] - np.log(np.exp(f["x"]).sum(1, keepdims=True))
    _check(model, feeds, backend, monkeypatch)


def test_loss_refuses_bad_target_shape():
    node = helper.make_node("NegativeLogLikelihoodLoss", ["x", "t"], ["y"])
    model = _model([node], [_vi("x", F, [2, 3]), _vi("t", I64, [3])], [_vi("y", F, None)])
    with pytest.raises(Exception, match=r"target shape \[3\] does not match input shape"):
        tx.from_model(model)


# --- If ------------------------------------------------------------------------------

def _branch(name, op, out="o"):
    """A branch that reads `x` from the enclosing graph (an outer-scope reference)."""
    nodes = [helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(
        np.array(2.0, np.float32))), helper.make_node(op, ["x", "k"], [out])]
    return helper.make_graph(nodes, name, [], [_vi(out, F, None)])


def _if_model(cond_nodes, then_op="Mul", else_op="Add"):
    node = helper.make_node("If", ["c"], ["y"], then_branch=_branch("then", then_op),
                            else_branch=_branch("else", else_op))
    relu = helper.make_node("Relu", ["y"], ["z"])
    return _model([*cond_nodes, node, relu], [_vi("x", F, ["N", 3])], [_vi("z", F, None)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_if_constant_condition_imports_the_taken_branch(backend, monkeypatch):
    cond = helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(
        np.array(False)))
    model = _if_model([cond])
    g = tx.from_model(model)
    assert [nd.op for nd in g.nodes if nd.op != "relu"] == ["add"]   # else branch only
    rng = np.random.default_rng(1)
    _check(model, [{"x": rng.standard_normal((b, 3)).astype(np.float32)} for b in (2, 5)],
           backend, monkeypatch)


@pytest.mark.parametrize("backend", BACKENDS)
def test_if_condition_folded_from_shapes(backend, monkeypatch):
    """cond = Shape(x)[1] == 3: known at import although x's batch is symbolic."""
    nodes = [helper.make_node("Shape", ["x"], ["s"], start=1, end=2),
             helper.make_node("Constant", [], ["three"], value=numpy_helper.from_array(
                 np.array([3], np.int64))),
             helper.make_node("Equal", ["s", "three"], ["c"])]
    model = _if_model(nodes)
    assert "where" not in {nd.op for nd in tx.from_model(model).nodes}
    x = np.random.default_rng(2).standard_normal((4, 3)).astype(np.float32)
    _check(model, [{"x": x}], backend, monkeypatch)


@pytest.mark.parametrize("backend", BACKENDS)
def test_if_runtime_condition_runs_both_branches(backend, monkeypatch):
    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
             helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(
                 np.array(0.0, np.float32))),
             helper.make_node("Greater", ["s", "zero"], ["c"])]
    model = _if_model(nodes)
    assert "where" in {nd.op for nd in tx.from_model(model).nodes}
    x = np.random.default_rng(3).standard_normal((4, 3)).astype(np.float32)
    _check(model, [{"x": np.abs(x)}, {"x": -np.abs(x)}, {"x": x[:2]}], backend, monkeypatch)


def test_if_runtime_condition_with_different_branch_shapes_is_refused():
    then = helper.make_graph([helper.make_node("Identity", ["x"], ["o"])], "then", [],
                             [_vi("o", F, None)])
    other = helper.make_graph([helper.make_node("ReduceSum", ["x"], ["o"], keepdims=0)],
                              "else", [], [_vi("o", F, None)])
    node = helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)
    model = _model([node], [_vi("x", F, [2, 3]), _vi("c", B, [])], [_vi("y", F, None)])
    with pytest.raises(UnsupportedOpError, match="If with a condition computed at run time "
                       "whose branches give output 0 different types") as e:
        tx.from_model(model)
    assert "\n" not in str(e.value)


# --- Loop ----------------------------------------------------------------------------

def _loop_body(cond_out="cond_in", extra=()):
    """y <- y * x + i (x from the enclosing graph), scan output y * 2."""
    nodes = [helper.make_node("Cast", ["i"], ["fi"], to=F),
             helper.make_node("Mul", ["y_in", "x"], ["m"]),
             helper.make_node("Add", ["m", "fi"], ["y_out"]),
             helper.make_node("Add", ["y_out", "y_out"], ["scan"]), *extra]
    if cond_out == "cond_in":
        nodes.append(helper.make_node("Identity", ["cond_in"], ["cond_out"]))
    return helper.make_graph(
        nodes, "body", [_vi("i", I64, []), _vi("cond_in", B, []), _vi("y_in", F, None)],
        [_vi("cond_out", B, []), _vi("y_out", F, None), _vi("scan", F, None)])


def _loop_model(trips, body=None, trip_input=False):
    nodes = [helper.make_node("Constant", [], ["t"], value=numpy_helper.from_array(
        np.array(trips, np.int64)))] * (not trip_input) + [
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.array(True))),
        helper.make_node("Loop", ["t", "c", "y0"], ["y", "ys"], body=body or _loop_body())]
    ins = [_vi("x", F, ["N", 3]), _vi("y0", F, ["N", 3])] + [_vi("t", I64, [])] * trip_input
    return _model(nodes, ins, [_vi("y", F, None), _vi("ys", F, None)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_loop_static_trip_count_is_unrolled(backend, monkeypatch):
    model = _loop_model(4)
    rng = np.random.default_rng(4)
    feeds = [{"x": rng.uniform(-1, 1, (b, 3)).astype(np.float32),
              "y0": rng.standard_normal((b, 3)).astype(np.float32)} for b in (2, 3)]
    exe = _check(model, feeds, backend, monkeypatch)
    assert exe(**feeds[0])[1].shape == (4, 2, 3)   # the scan output: one row per iteration


@pytest.mark.parametrize("backend", BACKENDS)
def test_loop_with_nested_if_on_the_iteration_number(backend, monkeypatch):
    """An If inside the body whose condition (i < 2) folds in each unrolled iteration,
    and whose branches read the body's and the main graph's values."""
    nodes = [helper.make_node("Constant", [], ["two"], value=numpy_helper.from_array(
        np.array(2, np.int64))), helper.make_node("Less", ["i", "two"], ["early"]),
        helper.make_node("If", ["early"], ["bump"], then_branch=_branch("then", "Mul", "o1"),
                         else_branch=_branch("else", "Sub", "o2")),
        helper.make_node("Add", ["scan0", "bump"], ["scan"])]
    body = _loop_body()
    body.node[3].output[0] = "scan0"
    body.node.extend(nodes)
    model = _loop_model(3, body)
    rng = np.random.default_rng(5)
    feeds = [{"x": rng.uniform(-1, 1, (2, 3)).astype(np.float32),
              "y0": rng.standard_normal((2, 3)).astype(np.float32)}]
    _check(model, feeds, backend, monkeypatch)


def test_loop_trip_count_from_an_input_needs_binding():
    model = _loop_model(0, trip_input=True)
    with pytest.raises(NeedsConstantError, match="trip count computed at run time") as e:
        tx.from_model(model)
    assert e.value.inputs == ["t"]
    g = tx.from_model(model, bind={"t": np.array(3, np.int64)})
    x = np.ones((2, 3), np.float32)
    ys = get_backend("numpy").compile(g)(x=x, y0=x)[1]
    assert ys.shape == (3, 2, 3)


def test_loop_refusals_are_one_line():
    stop = helper.make_node("ReduceSum", ["y_out"], ["s"], keepdims=0)
    less = [stop, helper.make_node("Constant", [], ["lim"], value=numpy_helper.from_array(
        np.array(10.0, np.float32))), helper.make_node("Less", ["s", "lim"], ["cond_out"])]
    with pytest.raises(UnsupportedOpError, match="Loop with a condition computed from the "
                       "data") as e:
        tx.from_model(_loop_model(5, _loop_body(cond_out="data", extra=less)))
    assert "\n" not in str(e.value)
    with pytest.raises(UnsupportedOpError, match=f"more than {MAX_UNROLL} iterations"):
        tx.from_model(_loop_model(MAX_UNROLL + 1))


# --- older opsets --------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_old_opset_forms_match_ort(backend, monkeypatch):
    """Opset 10 forms: Clip's min/max, Unsqueeze/Squeeze/ReduceSum axes and Split's
    sizes as attributes, Dropout's ratio attribute; the version converter upgrades them."""
    nodes = [helper.make_node("Clip", ["x"], ["c"], min=-0.5, max=0.7),
             helper.make_node("Unsqueeze", ["c"], ["u"], axes=[0]),
             helper.make_node("Squeeze", ["u"], ["q"], axes=[0]),
             helper.make_node("Split", ["q"], ["a", "b"], axis=1, split=[1, 3]),
             helper.make_node("ReduceSum", ["b"], ["r"], axes=[1], keepdims=1),
             helper.make_node("Dropout", ["r"], ["d"], ratio=0.3),
             helper.make_node("Add", ["a", "d"], ["y"])]
    model = _model(nodes, [_vi("x", F, ["N", 4])], [_vi("y", F, None)], opset=10)
    rng = np.random.default_rng(6)
    _check(model, [{"x": rng.standard_normal((b, 4)).astype(np.float32)} for b in (2, 5)],
           backend, monkeypatch)


def test_opset_out_of_range_is_refused():
    model = _model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x", F, [2])],
                   [_vi("y", F, None)], opset=tx.MAX_OPSET + 1)
    with pytest.raises(UnsupportedOpError, match=f"opset {tx.MAX_OPSET + 1} is not supported"):
        tx.from_model(model)


def _loop_over_dim(axis):
    """A Loop whose trip count is Shape(x)[axis]: folded when that dim is static."""
    nodes = [helper.make_node("Shape", ["x"], ["s"], start=axis, end=axis + 1),
             helper.make_node("Squeeze", ["s"], ["t"]),
             helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.array(True))),
             helper.make_node("Loop", ["t", "c", "y0"], ["y", "ys"], body=_loop_body())]
    return _model(nodes, [_vi("x", F, ["N", 3]), _vi("y0", F, ["N", 3])],
                  [_vi("y", F, None), _vi("ys", F, None)])


def test_loop_trip_count_from_shapes():
    x = np.full((2, 3), 0.5, np.float32)
    ys = get_backend("numpy").compile(tx.from_model(_loop_over_dim(1)))(x=x, y0=x)[1]
    assert ys.shape == (3, 2, 3)
    with pytest.raises(UnsupportedOpError, match="Loop with the symbolic trip count 'N'"):
        tx.from_model(_loop_over_dim(0))


def test_old_form_the_converter_cannot_upgrade_is_one_line():
    """BatchNormalization's spatial=0 (opset 7) has no opset-13 form: refused, one line."""
    params = [numpy_helper.from_array(np.ones(3, np.float32), k) for k in "sbmv"]
    node = helper.make_node("BatchNormalization", ["x", *"sbmv"], ["y"], spatial=0)
    model = _model([node], [_vi("x", F, [2, 3, 4])], [_vi("y", F, None)], opset=7)
    model.graph.initializer.extend(params)
    with pytest.raises(UnsupportedOpError, match="opset 7: onnx's version converter cannot "
                       "upgrade the model to opset 13: .*spatial") as e:
        tx.from_model(model)
    assert "\n" not in str(e.value)
