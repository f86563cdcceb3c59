"""O2 fusion: recognise decomposed layer norm and gelu (as ONNX exporters write them)
as single ops, then group ops into `fused` regions.

A region has at most one *anchor* (matmul, or a reduction such as layer_norm,
softmax, reduce_mean) plus any number of elementwise ops before it (prologue) and
after it (epilogue). That covers the two classic fusions as one mechanism:
matmul + bias + activation (the anchor is the matmul) and residual add + layer norm
(the anchor is the layer norm; the residual sum is a second output of the region,
since the next residual add reads it too).
"""

from __future__ import annotations

import math

from tensorc.errors import ShapeError
from tensorc.ir import Graph, TensorType
from tensorc.ops import get_op
from tensorc.ops.registry import broadcast_shapes
from tensorc.text import INLINE_MAX

from .pattern import Scalar, Var, op, rule
from .rewrite import apply_rules, dce, graph_pass, replace_keeping_name

x = Var("x")

# --- layer norm --------------------------------------------------------------------------
#   mean = reduce_mean(x, trailing axes);  d = x - mean
#   var  = reduce_mean(d * d  or  d ** 2);  y = d / sqrt(var + eps)  (or * rsqrt, * 1/sqrt)

_mean = op.reduce_mean(x, name="mean", keepdims=True)
_d = op.sub(x, _mean, name="d")
_var = op.reduce_mean(op.mul(_d, _d) | op.pow(_d, Scalar(value=2.0)), name="var", keepdims=True)
_var_eps = _var + Scalar("eps", pred=lambda e: 0 <= e < 1e-1)
_normalised = (_d / op.sqrt(_var_eps)) | (_d * op.rsqrt(_var_eps)) \
    | (_d * op.reciprocal(op.sqrt(_var_eps)))


def _trailing_axis(m) -> int | None:
    """The layer-norm axis when both means reduce the same trailing axes, else None."""
    rank = m["x"].type.rank
    axes = [sorted(a % rank for a in m.attr(n, "axes") or range(rank)) for n in ("mean", "var")]
    if axes[0] != axes[1] or axes[0] != list(range(axes[0][0], rank)):
        return None
    return axes[0][0] - rank


@rule(_normalised)
def layer_norm_decomposed(m, b):
    """(x - mean(x)) / sqrt(mean((x - mean(x))^2) + eps) -> layer_norm(x, eps)"""
    axis = _trailing_axis(m)
    if axis is None:
        return None
    return b.op("layer_norm", m["x"], axis=axis, eps=float(m.const("eps").reshape(-1)[0]))


_ln = op.layer_norm(x, name="ln", one_use=True)


def _fits_norm_dims(m, p: str) -> bool:
    """Whether capture `p` broadcasts within the normalised dims only (a scale/shift)."""
    t, axis = m["x"].type, m.attr("ln", "axis")
    tail = TensorType(t.shape[axis % t.rank:])
    try:
        return m[p].type.rank <= tail.rank and broadcast_shapes(tail, m[p].type) == tail.shape
    except ShapeError:
        return False


@rule(op.mul(_ln, Var("w")))
def layer_norm_scale(m, b):
    """layer_norm(x) * w -> layer_norm(x, w)"""
    if not _fits_norm_dims(m, "w"):
        return None
    attrs = m["ln"].producer.attrs
    return b.op("layer_norm", m["x"], m["w"], **attrs)


@rule(op.add(op.layer_norm(x, Var("w"), name="ln", one_use=True), Var("s")))
def layer_norm_shift(m, b):
    """layer_norm(x, w) + s -> layer_norm(x, w, s)"""
    if not _fits_norm_dims(m, "s"):
        return None
    return b.op("layer_norm", m["x"], m["w"], m["s"], **m["ln"].producer.attrs)


# --- gelu ----------------------------------------------------------------------------------
#   erf:  0.5 * x * (1 + erf(x / sqrt(2)))
#   tanh: 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))
# Exporters associate the three factors differently; all three groupings are listed.

def _half_x_times(h):
    half = Scalar(value=0.5)
    return op.mul(op.mul(x, h), half) | op.mul(op.mul(x, half), h) | op.mul(x, op.mul(h, half))


_erf_arg = op.div(x, Scalar(value=math.sqrt(2.0))) | op.mul(x, Scalar(value=math.sqrt(0.5)))
_cube = op.pow(x, Scalar(value=3.0)) | op.mul(op.mul(x, x), x)
_tanh_arg = op.mul(x + op.mul(_cube, Scalar(value=0.044715)), Scalar(value=math.sqrt(2 / math.pi)))


@rule(_half_x_times(op.erf(_erf_arg) + 1.0))
def gelu_erf(m, b):
    """0.5 * x * (1 + erf(x / sqrt 2)) -> gelu(x)"""
    return b.op("gelu", m["x"])


@rule(_half_x_times(op.tanh(_tanh_arg) + 1.0))
def gelu_tanh(m, b):
    """0.5 * x * (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) -> gelu(x, approximate=tanh)"""
    return b.op("gelu", m["x"], approximate="tanh")


FUSION_RULES = [layer_norm_decomposed, layer_norm_scale, layer_norm_shift, gelu_erf, gelu_tanh]


@graph_pass("fuse-patterns")
def fuse_patterns(g: Graph) -> Graph:
    """Recognise decomposed layer norm and gelu (erf and tanh forms) as single ops."""
    apply_rules(g, FUSION_RULES)
    dce(g)


# --- fused regions -------------------------------------------------------------------------

def _is_elementwise(node) -> bool:
    return get_op(node.op).kind == "elementwise" and len(node.outputs) == 1


def _is_anchor(node) -> bool:
    return len(node.outputs) == 1 and (node.op == "matmul"
                                       or get_op(node.op).kind == "reduction")


def _grow(root, index, users, taken) -> list:
    """The region grown backwards from `root`: producers join while they are
    elementwise (or the one anchor) and every reader outside the region comes after
    the root, so the region can run at the root's place without a cycle. A matmul
    only heads a region (bias, activation after it), never takes a prologue."""
    region, anchored = {root}, _is_anchor(root)
    stack = list(root.inputs)
    while stack:
        p = stack.pop().producer
        if p is None or p in region or p in taken:
            continue
        anchor = _is_anchor(p)
        if not (_is_elementwise(p) or (anchor and not anchored)):
            continue
        if any(u not in region and index[u] < index[root] for u in users.get(p.outputs[0], ())):
            continue
        region.add(p)
        anchored |= anchor
        if p.op != "matmul":
            stack.extend(p.inputs)
    return sorted(region, key=index.__getitem__)


def region_node(g: Graph, nodes, users, outputs):
    """The `fused` node computing `nodes`, and the values it replaces."""
    inside = set(nodes)
    body = Graph("region")
    vals = {}
    for n in nodes:
        for v in n.inputs:
            if v in vals or (v.producer is not None and v.producer in inside):
                continue
            small = v.is_constant and v.data.size <= INLINE_MAX
            vals[v] = body.add_constant(v.name, v.data) if small \
                else body.add_input(v.name, v.type)
        outs = body.add_node(n.op, [vals[v] for v in n.inputs], n.attrs,
                             names=[v.name for v in n.outputs])
        vals.update(zip(n.outputs, outs, strict=True))
    escaping = [v for n in nodes for v in n.outputs
                if v in outputs or any(u not in inside for u in users.get(v, ()))]
    body.outputs = [vals[v] for v in escaping]
    ins = [v for v, bv in vals.items() if bv in body.inputs]
    node_outs = g.add_node("fused", ins, {"body": body})
    return g.nodes.pop(), escaping, node_outs


@graph_pass("fuse-regions")
def fuse_regions(g: Graph) -> Graph:
    """Group elementwise chains around at most one matmul or reduction into `fused`."""
    index = {n: i for i, n in enumerate(g.nodes)}
    users, outputs = g.users(), set(g.outputs)
    taken: set = set()
    before: dict = {}   # root node -> fused node to place in front of it
    swaps = []
    for root in reversed(g.nodes):
        if root in taken or root.op == "matmul" or not (_is_elementwise(root)
                                                         or _is_anchor(root)):
            continue
        nodes = _grow(root, index, users, taken)
        if len(nodes) < 2:
            continue
        taken.update(nodes)
        fused, old, new = region_node(g, nodes, users, outputs)
        before[root] = fused
        swaps += zip(old, new, strict=True)
    g.nodes = [m for n in g.nodes for m in ((before[n], n) if n in before else (n,))]
    for old, new in swaps:
        replace_keeping_name(g, old, new)
    dce(g)


def fused_stats(g: Graph) -> dict[str, int]:
    """How many fused regions of each shape: ``{"matmul+add+gelu": 2, ...}``."""
    out: dict[str, int] = {}
    for n in g.nodes:
        if n.op == "fused":
            key = "+".join(b.op for b in n.attrs["body"].nodes)
            out[key] = out.get(key, 0) + 1
    return out
