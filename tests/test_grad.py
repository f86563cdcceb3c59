"""Reverse-mode rules (`OpDef.vjp`) and the `grad` pass, checked against central finite
differences in float64, op by op; every op with a float output has a rule and a case
here or a stated reason why not."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from tensorc.backends import get_backend
from tensorc.errors import TensorcError
from tensorc.ir import FLOAT_DTYPES, Graph, TensorType
from tensorc.ops import OPS
from tensorc.passes.autodiff import convert_float, grad

# Ops with no gradient rule, and why.
NO_RULE = {
    **{op: "bool output" for op in ("equal", "less", "less_equal", "greater", "greater_equal",
                                     "logical_and", "logical_or", "logical_not")},
    "argmax": "integer output",
    "full": "no inputs", "range": "no inputs", "dims": "no inputs",
    "attention_grad": "a gradient itself: second derivatives are not supported",
    "conv2d_grad": "a gradient itself: second derivatives are not supported",
    "fused": "grad inlines regions and differentiates their bodies",
    "quantize": "integer output", "matmul_integer": "integer output",
    "dequantize": "its inputs are integers and the quantization's constant scale",
    "quant_params": "a quantization's range is a constant of it (straight through)",
    "fake_quantize": "the straight-through estimator is not the derivative: "
                     "tests/test_quant.py checks it",
    "recv": "no inputs (its value comes from another rank)",
    "send": "needs a second rank: tests/test_collectives.py checks its rule on a thread mesh",
}


def f64(rng, *shape, low=-1.0, high=1.0):
    return rng.uniform(low, high, shape)


def away_from_kinks(rng, *shape):
    """Values at least 0.1 from 0 and from the integers +-1, +-2 (relu, abs, floor)."""
    return (rng.integers(-2, 2, shape) + rng.uniform(0.15, 0.85, shape))


def cases(rng):
    """op -> list of (inputs, attrs). Float inputs are float64; others are data."""
    ids = np.array([[3, 0, 3], [1, 4, 0]], np.int64)
    unary = {op: [([f64(rng, 2, 3)], {})] for op in
             ("neg", "exp", "tanh", "erf", "sigmoid", "sin", "cos")}
    unary.update({op: [([f64(rng, 2, 3, low=0.5, high=2.0)], {})]
                  for op in ("log", "sqrt", "rsqrt", "reciprocal")})
    unary.update({op: [([away_from_kinks(rng, 3, 4)], {})] for op in ("abs", "relu", "floor",
                                                                       "round")})
    binary = {op: [([f64(rng, 2, 3), f64(rng, 2, 3)], {}),
                   ([f64(rng, 4, 1, 3), f64(rng, 2, 1)], {})]   # both sides broadcast
              for op in ("add", "sub", "mul", "maximum", "minimum")}
    t = TensorType
    return {
        **unary, **binary,
        "div": [([f64(rng, 2, 3), f64(rng, 3, low=0.5, high=2)], {})],
        "pow": [([f64(rng, 2, 3, low=0.5, high=2), f64(rng, 2, 3)], {}),
                ([f64(rng, 3, low=0.5, high=2), np.array(2.5)], {})],
        "gelu": [([f64(rng, 2, 5, low=-3, high=3)], {}),
                 ([f64(rng, 2, 5, low=-3, high=3)], {"approximate": "tanh"})],
        "where": [([rng.random((2, 3)) > 0.5, f64(rng, 2, 3), f64(rng, 3)], {})],
        "cast": [([f64(rng, 2, 3)], {"dtype": "f64"})],
        "clip": [([away_from_kinks(rng, 3, 4)], {"min": -0.5, "max": 1.0}),
                 ([away_from_kinks(rng, 3, 4)], {"max": 0.0})],
        "matmul": [([f64(rng, 2, 3, 4), f64(rng, 4, 5)], {}),
                   ([f64(rng, 2, 1, 3, 4), f64(rng, 3, 4, 2)], {}),
                   ([f64(rng, 4), f64(rng, 2, 4, 3)], {}),
                   ([f64(rng, 3, 4), f64(rng, 4)], {}), ([f64(rng, 4), f64(rng, 4)], {})],
        "reduce_sum": [([f64(rng, 2, 3, 4)], {"axes": (0, 2)}), ([f64(rng, 3, 4)], {})],
        "reduce_mean": [([f64(rng, 2, 3, 4)], {"axes": (-1,), "keepdims": True})],
        "reduce_max": [([rng.permutation(24).reshape(2, 3, 4) * 0.1], {"axes": (1,)})],
        "reduce_min": [([rng.permutation(24).reshape(2, 3, 4) * 0.1], {})],
        "softmax": [([f64(rng, 2, 3, 4)], {"axis": 1})],
        "log_softmax": [([f64(rng, 2, 5)], {})],
        "layer_norm": [([f64(rng, 2, 3, 4), f64(rng, 4), f64(rng, 4)], {}),
                       ([f64(rng, 2, 3, 4)], {"axis": 1, "eps": 0.1})],
        "conv2d": [([f64(rng, 2, 3, 7, 6), f64(rng, 4, 3, 3, 2), f64(rng, 4)],
                    {"strides": (2, 1), "pads": (1, 0, 2, 1)}),
                   ([f64(rng, 1, 4, 5, 5), f64(rng, 2, 2, 2, 2)],
                    {"group": 2, "dilations": (2, 1)})],
        "reshape": [([f64(rng, 2, 6)], {"shape": (3, 4)})],
        "transpose": [([f64(rng, 2, 3, 4)], {"perm": (2, 0, 1)}), ([f64(rng, 2, 3)], {})],
        "concat": [([f64(rng, 2, 3), f64(rng, 2, 1)], {"axis": 1})],
        "split": [([f64(rng, 5, 2)], {"axis": 0, "sizes": (2, 3)})],
        "slice": [([f64(rng, 7, 3)], {"starts": (1,), "ends": (6,), "axes": (0,)}),
                  ([f64(rng, 2, 3)], {"starts": (0, 2), "ends": (2, 2)}),   # empty
                  ([f64(rng, 9, 4)], {"starts": (-2, 1), "ends": (0, 4), "steps": (-3, 2)})],
        "expand": [([f64(rng, 3, 1)], {"shape": (2, 3, 4)})],
        "squeeze": [([f64(rng, 3, 1)], {"axes": (1,)})],
        "unsqueeze": [([f64(rng, 3)], {"axes": (0,)})],
        "gather": [([f64(rng, 5, 3), ids], {"axis": 0}), ([f64(rng, 2, 5), ids], {"axis": 1})],
        "scatter_add": [([f64(rng, 5, 2), ids, f64(rng, 2, 3, 2)], {"axis": 0})],
        # none: distinct indices (ONNX leaves repeated ones undefined); mul/max/min have
        # no rule (the driver names the node if one is needed)
        "scatter": [([f64(rng, 5, 2), np.array([[3, 0], [1, 4]]), f64(rng, 2, 2, 2)],
                     {"axis": 0}),
                    ([f64(rng, 2, 5), ids, f64(rng, 2, 2, 3)], {"axis": 1, "reduction": "add"})],
        "topk": [([f64(rng, 3, 5)], {"k": 2}), ([f64(rng, 4, 3)], {"k": 3, "axis": 0,
                                                                  "largest": False})],
        "reduce_prod": [([f64(rng, 2, 3, 4)], {"axes": (1,)}),
                        # a row with one zero, a row with two: the product of the others
                        ([np.array([[0.5, 0.0, -2.0], [0.0, 1.5, 0.0], [0.7, -1.2, 2.0]])],
                         {"axes": (1,), "keepdims": True})],
        "trilu": [([f64(rng, 3, 4)], {"k": 1})],
        "dropout": [([f64(rng, 4, 5), np.array(11, np.int64)], {"p": 0.3, "salt": 2})],
        "tensor_scatter": [([f64(rng, 2, 2, 6, 3), f64(rng, 2, 2, 2, 3),
                             np.array([1, 4], np.int64)], {})],
        "attention": [
            ([f64(rng, 1, 2, 3, 4), f64(rng, 1, 2, 5, 4), f64(rng, 1, 2, 5, 3)],
             {"scale": 0.5}),
            ([f64(rng, 2, 4, 4, 3), f64(rng, 1, 2, 4, 3), f64(rng, 1, 2, 4, 2)],
             {"causal": True}),                           # grouped heads, broadcast batch
            ([f64(rng, 1, 2, 3, 4), f64(rng, 1, 1, 5, 4), f64(rng, 1, 1, 5, 4),
              rng.random((1, 1, 3, 5)) > 0.3], {}),       # a bool mask; one kv head
        ],
        # the sparse and linear ops differentiate through their decompositions
        "local_attention": [
            ([f64(rng, 1, 2, 6, 3), f64(rng, 1, 1, 6, 3), f64(rng, 1, 1, 6, 2)],
             {"before": 2, "after": 1, "global_tokens": (5,)}),
            ([f64(rng, 2, 2, 5, 3), f64(rng, 2, 2, 5, 3), f64(rng, 2, 2, 5, 3),
              f64(rng, 2, 1, 1, 5)], {"before": 1, "causal": True})],
        "block_sparse_attention": [
            ([f64(rng, 1, 2, 7, 3), f64(rng, 1, 2, 7, 3), f64(rng, 1, 2, 7, 2)],
             {"block": 2, "local_blocks": 0, "random_blocks": 1, "global_tokens": (0,)})],
        "linear_attention": [
            ([f64(rng, 1, 2, 4, 3), f64(rng, 1, 1, 5, 3), f64(rng, 1, 1, 5, 2),
              f64(rng, 6, 3)], {"scale": 0.5}),
            ([f64(rng, 2, 2, 5, 3), f64(rng, 2, 2, 5, 3), f64(rng, 2, 2, 5, 3),
              f64(rng, 4, 3), f64(rng, 2, 1, 1, 5)], {"causal": True})],
        # a group of one (no communicator); tests/test_collectives.py checks the rules
        # on thread meshes of 2 to 4 ranks
        **{op: [([f64(rng, 2, 3)], {"axis": "tp", "size": 1, **extra})] for op, extra in (
            ("all_reduce", {}), ("all_gather", {"dim": 1}), ("reduce_scatter", {"dim": 0}),
            ("broadcast", {}))},
    }, t


CASES, _ = cases(np.random.default_rng(0))


def _loss_graph(op, inputs, attrs, weights):
    """loss = sum(output_i * weights_i) over the op's float outputs."""
    g = Graph("case")
    vals = [g.add_input(f"x{i}", TensorType.of(np.asarray(a))) for i, a in enumerate(inputs)]
    outs = g.add_node(op, vals, attrs)
    loss = None
    for i, (v, w) in enumerate(zip(outs, weights, strict=False)):
        term = g.add("reduce_sum", g.add("mul", v, g.add_constant(f"w{i}", w)))
        loss = term if loss is None else g.add("add", loss, term)
    g.rename(loss, "loss")
    g.outputs = [loss]
    return g


def _numeric_grads(op, inputs, attrs, weights, eps=1e-6):
    def loss(arrays):
        outs = OPS[op].evaluate(arrays, attrs)
        return sum(float(np.sum(o * w)) for o, w in zip(outs, weights, strict=False))
    grads = []
    for i, a in enumerate(inputs):
        if np.asarray(a).dtype.kind != "f":
            grads.append(None)
            continue
        d = np.zeros(np.shape(a))
        for j in np.ndindex(*np.shape(a)):
            up = [np.array(x, copy=True) for x in inputs]
            dn = [np.array(x, copy=True) for x in inputs]
            up[i][j] += eps
            dn[i][j] -= eps
            d[j] = (loss(up) - loss(dn)) / (2 * eps)
        grads.append(d)
    return grads


def check_case(op, inputs, attrs, seed=0):
    rng = np.random.default_rng(seed)
    probe = Graph("p")
    outs = probe.add_node(op, [probe.add_input(f"x{i}", TensorType.of(np.asarray(a)))
                               for i, a in enumerate(inputs)], attrs)
    weights = [rng.uniform(-1, 1, tuple(v.type.shape)) for v in outs
               if v.type.dtype in FLOAT_DTYPES]
    g = _loss_graph(op, inputs, attrs, weights)
    wrt = [f"x{i}" for i, a in enumerate(inputs) if np.asarray(a).dtype.kind == "f"]
    gg = grad(g, "loss", wrt)
    assert [v.name for v in gg.outputs] == ["loss"] + [f"grad.{n}" for n in wrt]
    got = get_backend("numpy").compile(gg)(*inputs)[1:]
    want = [d for d in _numeric_grads(op, inputs, attrs, weights) if d is not None]
    for name, a, b in zip(wrt, got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7, err_msg=f"{op}: d/d{name}")


@pytest.mark.parametrize("op,i", [(op, i) for op, cs in CASES.items() for i in range(len(cs))])
def test_rule_matches_finite_differences(op, i):
    inputs, attrs = CASES[op][i]
    check_case(op, inputs, attrs, seed=zlib.crc32(op.encode()) + i)


def test_every_op_with_a_float_output_has_a_rule_and_a_check():
    for op, opdef in OPS.items():
        if op in NO_RULE:
            continue
        assert opdef.vjp is not None, f"op {op!r} has no gradient rule (OpDef.vjp)"
        assert op in CASES, f"op {op!r} has no finite-difference check in tests/test_grad.py"
    stale = sorted((set(NO_RULE) | set(CASES)) - set(OPS))
    assert not stale, f"cases for ops that are not registered: {stale}"


def test_gradients_add_up_over_readers_and_fused_regions_differentiate():
    g = Graph("g")
    x = g.add_input("x", TensorType((3,), "f64"))
    w = g.add_constant("w", np.array([0.5, -1.0, 2.0]))
    y = g.add("mul", g.add("tanh", g.add("mul", x, w)), x)   # x read twice, w once
    g.rename(y := g.add("reduce_sum", y), "loss")
    g.outputs = [y]
    from tensorc.passes import run_pipeline
    fused = run_pipeline(g, "fuse-regions")
    assert "fused" in fused.op_counts()
    for graph in (g, fused):
        gg = grad(graph, wrt=["x", "w"])
        xs = np.array([0.3, -0.7, 1.1])
        _, dx, dw = get_backend("numpy").compile(gg)(xs, np.array([0.5, -1.0, 2.0]))
        t = np.tanh(xs * w.data)
        np.testing.assert_allclose(dx, (1 - t ** 2) * w.data * xs + t, rtol=1e-12)
        np.testing.assert_allclose(dw, (1 - t ** 2) * xs * xs, rtol=1e-12)


def test_grad_errors_are_one_line_and_name_the_problem():
    g = Graph("g")
    x = g.add_input("x", TensorType((3,), "f32"))
    y = g.add("exp", x)
    g.outputs = [y]
    with pytest.raises(TensorcError, match="loss must be a float scalar"):
        grad(g)
    g.outputs = [g.add("reduce_sum", y)]
    with pytest.raises(TensorcError, match="no input or weight named 'nope'"):
        grad(g, wrt=["nope"])
    q = g.add_input("q", TensorType((1, 1, 2, 2), "f32"))
    bias = g.add_input("bias", TensorType((1, 1, 2, 2), "f32"))
    att = g.add("attention", q, q, q, bias)
    g.outputs = [g.add("reduce_sum", att)]
    with pytest.raises(TensorcError, match="no gradient for an additive attention mask"):
        grad(g, wrt=["bias"])
    assert grad(g, wrt=["q"]).outputs[-1].name == "grad.q"   # the mask not needed: fine


def test_unused_weight_gets_a_zero_gradient_and_convert_float_keeps_the_maths():
    g = Graph("g")
    x = g.add_input("x", TensorType((2,), "f32"))
    g.add_constant("unused", np.ones(4, np.float32))
    w = g.add_constant("w", np.array([1.5, -2.0], np.float32))
    g.outputs = [g.add("reduce_sum", g.add("mul", x, w))]
    g64 = convert_float(g)
    assert g64.inputs[0].type.dtype == "f64" and g64.constants["w"].data.dtype == np.float64
    gg = grad(g64, wrt=["w", "unused"])
    _, dw, du = get_backend("numpy").compile(gg)(np.array([3.0, 4.0]), w.data.astype(float),
                                                 np.ones(4))
    np.testing.assert_array_equal(dw, [3.0, 4.0])
    np.testing.assert_array_equal(du, np.zeros(4))


# --- random graphs: the llvm fuzzer's generator, differentiated ------------------------

def test_random_graph_gradients_match_finite_differences():
    """Hypothesis builds the random graphs tests/test_llvm_fuzz.py runs (elementwise ops
    with broadcasting, views, reductions, softmax, layer norm, matmuls, attention,
    gather, concat/split, integer detours), in float64; the gradient of a random
    weighting of their float outputs with respect to every float input and weight, along
    a random direction, must match central differences. Examples whose differences are
    not converged (two step sizes disagree: a kink or a near-singular division within
    reach) say so and are left out."""
    import sys
    from pathlib import Path

    from hypothesis import assume, given
    from hypothesis import strategies as st
    sys.path.insert(0, str(Path(__file__).parent))
    from test_llvm_fuzz import SETTINGS, Builder

    from tensorc.passes.autodiff import as_inputs

    @SETTINGS
    @given(data=st.data())
    def check(data):
        g = convert_float(Builder(data).build())
        # not the builder's seed: its weights and these inputs must not tie (a kink)
        rng = np.random.default_rng([7, data.draw(st.integers(0, 2**16))])
        floats = [v for v in g.outputs if v.type.dtype == "f64" and v.type.rank]
        assume(floats)
        loss = None
        for i, v in enumerate(floats):
            w = g.add_constant(f"lossw{i}", rng.uniform(-1, 1, tuple(v.type.shape)))
            term = g.add("reduce_sum", g.add("mul", v, w))
            loss = term if loss is None else g.add("add", loss, term)
        g.rename(loss, "loss")
        g.outputs = [loss]
        weights = [n for n, c in g.constants.items()
                   if c.type.dtype == "f64" and not n.startswith("lossw")]
        lifted = as_inputs(g, weights)
        wrt = [v.name for v in lifted.inputs if v.type.dtype == "f64"]
        feeds = {v.name: rng.uniform(-2, 2, tuple(v.type.shape)) if v.type.dtype == "f64"
                 else None for v in lifted.inputs}
        for v in g.inputs:   # integer inputs (gather indices) as the builder drew them
            if v.type.dtype != "f64":
                feeds[v.name] = np.zeros(tuple(v.type.shape), v.type.np_dtype)
        for n in weights:
            feeds[n] = g.constants[n].data
        run = get_backend("numpy").compile(lifted)
        with np.errstate(all="ignore"):
            base = float(run.run(feeds)["loss"])
            assume(np.isfinite(base))
            grads = get_backend("numpy").compile(grad(lifted, "loss", wrt)).run(feeds)
            direction = {n: rng.standard_normal(np.shape(feeds[n])) for n in wrt}
            analytic = sum(float(np.sum(grads["grad." + n] * direction[n])) for n in wrt)

            def slope(eps):
                up = run.run({**feeds, **{n: feeds[n] + eps * direction[n] for n in wrt}})
                dn = run.run({**feeds, **{n: feeds[n] - eps * direction[n] for n in wrt}})
                return (float(up["loss"]) - float(dn["loss"])) / (2 * eps)
            a, b = slope(1e-5), slope(5e-6)
        scale = max(abs(a), 1.0)
        assume(np.isfinite(a) and abs(a - b) < 1e-6 * scale)   # converged differences
        checked.append(len(wrt))
        assert abs(analytic - b) <= 1e-5 * scale, (analytic, b, str(lifted))
    checked: list[int] = []
    check()
    assert len(checked) >= SETTINGS.max_examples // 2, "most examples were left out"
