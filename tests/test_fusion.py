"""Fusion (O2): layer norm and gelu recognition, fused regions, the `fused` op."""

from __future__ import annotations

import math

import numpy as np
import pytest

import tensorc
from tensorc.backends import get_backend
from tensorc.ir import Graph, TensorType
from tensorc.ops import get_op
from tensorc.passes import run_pipeline
from tensorc.passes.fusion import fused_stats
from tensorc.passes.rewrite import inline_regions
from tensorc.text import parse_graph

SHAPE = (2, 5, 8)


def rel_err(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def graph_with_input(shape=SHAPE):
    g = Graph("t")
    return g, g.add_input("x", TensorType(shape))


def const(g, x, dtype=np.float32):
    return g.add_constant(g.fresh_name("c"), np.asarray(x, dtype))


def check_same(g, pipeline, shape=SHAPE):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    exe = get_backend("numpy").compile
    want = exe(g).run({"x": x})
    out = run_pipeline(g, pipeline, verify=True)
    got = exe(out).run({"x": x})
    assert got.keys() == want.keys()
    assert all(rel_err(got[k], want[k]) <= 1e-5 for k in want)
    return out


# --- layer norm -------------------------------------------------------------------------

def decomposed_ln(square="pow", div="div", axes=(-1,), axes2=None, eps=1e-5, affine=True,
                  shape=SHAPE):
    g, x = graph_with_input(shape)
    mean = g.add("reduce_mean", x, axes=axes, keepdims=True)
    d = g.add("sub", x, mean)
    sq = g.add("pow", d, const(g, 2.0)) if square == "pow" else g.add("mul", d, d)
    var = g.add("reduce_mean", sq, axes=axes2 or axes, keepdims=True)
    ve = g.add("add", var, const(g, eps))
    if div == "div":
        y = g.add("div", d, g.add("sqrt", ve))
    else:
        y = g.add("mul", d, g.add("rsqrt", ve))
    if affine:
        rng = np.random.default_rng(3)
        y = g.add("mul", y, const(g, rng.standard_normal(shape[-1])))
        y = g.add("add", const(g, rng.standard_normal(shape[-1])), y)
    g.outputs = [y]
    return g.verify()


@pytest.mark.parametrize("square,div", [("pow", "div"), ("mul", "div"), ("pow", "rsqrt")])
def test_decomposed_layer_norm_becomes_one_op(square, div):
    out = check_same(decomposed_ln(square, div), "O1,fuse-patterns")
    assert out.op_counts() == {"layer_norm": 1}
    assert len(out.nodes[0].inputs) == 3 and out.nodes[0].attrs["eps"] == pytest.approx(1e-5)


def test_layer_norm_over_two_trailing_axes():
    out = check_same(decomposed_ln(axes=(1, 2), affine=False), "fuse-patterns")
    assert out.op_counts() == {"layer_norm": 1} and out.nodes[0].attrs["axis"] == -2


@pytest.mark.parametrize("near_miss", ["different_axes", "leading_axis", "big_eps"])
def test_layer_norm_near_misses_are_left_alone(near_miss):
    g = {"different_axes": lambda: decomposed_ln(axes=(-1,), axes2=(1,)),
         "leading_axis": lambda: decomposed_ln(axes=(0,)),
         "big_eps": lambda: decomposed_ln(eps=0.5)}[near_miss]()
    out = check_same(g, "fuse-patterns")
    assert "layer_norm" not in out.op_counts()


def test_layer_norm_scale_must_fit_the_normalised_dims():
    g, x = graph_with_input()
    ln = g.add("layer_norm", x)
    g.outputs = [g.add("mul", ln, const(g, np.ones((SHAPE[1], 1)) * 1.5))]  # scales rows
    out = check_same(g.verify(), "fuse-patterns")
    assert out.op_counts() == {"layer_norm": 1, "mul": 1}


# --- gelu --------------------------------------------------------------------------------

def decomposed_gelu(form="erf", grouping=0, c=None):
    g, x = graph_with_input()
    if form == "erf":
        inner = g.add("erf", g.add("div", x, const(g, c or math.sqrt(2.0))))
    else:
        cube = g.add("pow", x, const(g, 3.0)) if grouping != 2 else \
            g.add("mul", g.add("mul", x, x), x)
        t = g.add("add", x, g.add("mul", cube, const(g, 0.044715)))
        inner = g.add("tanh", g.add("mul", t, const(g, c or math.sqrt(2 / math.pi))))
    h = g.add("add", inner, const(g, 1.0))
    half = const(g, 0.5)
    if grouping == 0:
        y = g.add("mul", g.add("mul", x, h), half)      # (x * h) * 0.5
    elif grouping == 1:
        y = g.add("mul", g.add("mul", half, x), h)      # (0.5 * x) * h   (HF NewGELU)
    else:
        y = g.add("mul", x, g.add("mul", h, half))      # x * (h * 0.5)
    g.outputs = [y]
    return g.verify()


@pytest.mark.parametrize("form", ["erf", "tanh"])
@pytest.mark.parametrize("grouping", [0, 1, 2])
def test_decomposed_gelu_becomes_one_op(form, grouping):
    out = check_same(decomposed_gelu(form, grouping), "O1,fuse-patterns")
    assert out.op_counts() == {"gelu": 1}
    assert out.nodes[0].attrs["approximate"] == ("tanh" if form == "tanh" else "none")


@pytest.mark.parametrize("form", ["erf", "tanh"])
def test_gelu_with_a_wrong_constant_is_left_alone(form):
    out = check_same(decomposed_gelu(form, c=1.3), "fuse-patterns")
    assert "gelu" not in out.op_counts()


# --- fused regions ---------------------------------------------------------------------

def test_matmul_bias_activation_becomes_one_region():
    g, x = graph_with_input()
    y = g.add("matmul", x, const(g, np.random.default_rng(0).standard_normal((8, 6))))
    y = g.add("gelu", g.add("add", y, const(g, np.arange(6) * 0.1)))
    g.outputs = [g.add("transpose", y, perm=(0, 2, 1))]
    out = check_same(g.verify(), "O2")
    assert fused_stats(out) == {"matmul+add+gelu": 1}
    assert out.op_counts() == {"fused": 1, "transpose": 1}


def test_residual_add_and_layer_norm_region_exports_the_sum():
    g, x = graph_with_input()
    r = g.add("add", x, g.add("relu", x))
    ln = g.add("layer_norm", r, const(g, np.full(8, 1.5)), const(g, np.full(8, 0.1)))
    g.outputs = [g.add("matmul", ln, const(g, np.eye(8))), r]
    out = check_same(g.verify(), "fuse-regions")
    (fused,) = [n for n in out.nodes if n.op == "fused"]
    assert [n.op for n in fused.attrs["body"].nodes] == ["relu", "add", "layer_norm"]
    assert len(fused.outputs) == 2 and out.outputs[1].producer is fused


def test_regions_never_take_two_anchors_or_a_prologue_into_a_matmul():
    g, x = graph_with_input()
    a = g.add("relu", x)
    m = g.add("matmul", a, const(g, np.eye(8)))
    g.outputs = [g.add("softmax", g.add("exp", m))]
    out = check_same(g.verify(), "fuse-regions")
    stats = fused_stats(out)
    assert stats == {"exp+softmax": 1}  # relu stays alone: no prologue into the matmul
    assert out.op_counts() == {"relu": 1, "matmul": 1, "fused": 1}


def test_a_region_whose_value_is_read_before_the_root_stays_acyclic():
    g, x = graph_with_input()
    a = g.add("exp", x)
    side = g.add("reduce_sum", a, axes=(-1,), keepdims=True)  # reads `a` mid-way
    b = g.add("mul", a, side)
    g.outputs = [g.add("tanh", b)]
    out = check_same(g.verify(), "fuse-regions")
    out.verify()
    assert out.op_counts().get("fused", 0) >= 1


# --- the fused op and its text form ---------------------------------------------------

def model_o2(name="gpt"):
    m = tensorc.models.get(name)
    ins = m.example_inputs(batch=2)
    return m, ins, run_pipeline(tensorc.trace(m, **ins), "O2", verify=True)


def test_fused_graph_text_round_trips():
    _, _, g = model_o2("bert")
    text = str(g)
    assert "body=graph region(" in text
    assert str(parse_graph(text)) == text


def test_fused_decompose_equals_reference():
    m, ins, g = model_o2("vit")
    flat = Graph("flat")
    vals = {}
    for v in g.inputs:
        vals[v] = flat.add_input(v.name, v.type)
    for v in g.constants.values():
        vals[v] = flat.add_constant(v.name, v.data)
    for n in g.nodes:
        ins_ = [vals[v] for v in n.inputs]
        opdef = get_op(n.op)
        outs = opdef.decompose(flat, ins_, **n.attrs) if n.op == "fused" \
            else flat.add_node(n.op, ins_, n.attrs)
        vals.update(zip(n.outputs, outs, strict=True))
    flat.outputs = [vals[v] for v in g.outputs]
    flat.verify()
    assert "fused" not in flat.op_counts()
    run = get_backend("numpy").compile
    assert rel_err(run(flat)(**ins), run(g)(**ins)) <= 1e-6


def test_inline_regions_undoes_fusion():
    m, ins, g = model_o2("transformer")
    flat = inline_regions(g).verify()
    assert "fused" not in flat.op_counts() and str(g) != str(flat)
    assert [v.name for v in flat.outputs] == [v.name for v in g.outputs]
    run = get_backend("numpy").compile
    assert rel_err(run(flat)(**ins), run(g)(**ins)) == 0


def test_fused_op_checks_its_inputs_against_the_body():
    _, _, g = model_o2()
    fused = next(n for n in g.nodes if n.op == "fused")
    with pytest.raises(tensorc.TensorcError, match="body"):
        g.add_node("fused", fused.inputs[:-1], fused.attrs)


def test_fused_flops_count_the_body():
    _, _, g = model_o2()
    fused = next(n for n in g.nodes if n.op == "fused")
    body = fused.attrs["body"]
    want = sum(get_op(n.op).count_flops(n) for n in body.nodes)
    assert get_op("fused").count_flops(fused) == want > 0


def test_o2_fused_statistics_on_gpt():
    _, _, g = model_o2("gpt")
    stats = fused_stats(g)
    assert stats.get("matmul+add+gelu") == 2     # each block's feed-forward up projection
    assert stats.get("matmul+add") == 2          # each block's merged q/k/v projection
    assert stats.get("matmul+add+add") == 4      # attention out and ff down: bias + residual
    assert g.op_counts()["fused"] == sum(stats.values())
    assert g.op_counts()["split"] == 2           # the merged projection's q, k, v columns


def test_gemm_fusion_decisions_are_passes_that_can_be_disabled():
    """merge-projections and fuse-epilogues are O2 passes: disabled, the q/k/v matmuls stay
    three and the bias/residual adds go to the layer-norm regions."""
    m, ins, g = model_o2("gpt")
    plain = run_pipeline(tensorc.trace(m, **ins), "O2", verify=True,
                         disable=("merge-projections", "fuse-epilogues"))
    assert "split" not in plain.op_counts()
    stats = fused_stats(plain)
    assert stats.get("add+add+layer_norm", 0) >= 2 and "matmul+add+add" not in stats
    matmuls = lambda graph: sum(  # noqa: E731
        b.op == "matmul" for n in graph.nodes
        for b in (n.attrs["body"].nodes if n.op == "fused" else [n]))
    assert matmuls(plain) - matmuls(g) == 2 * 2   # 2 layers, three GEMMs become one
