"""O1: simplification. Constant folding, algebraic identities, common-subexpression
elimination and dead-code elimination. None of these changes a number the graph
computes (folding runs the same reference implementations a backend is checked
against)."""

from __future__ import annotations

import numpy as np

from tensorc.ir import Graph, dim_product
from tensorc.ops import get_op
from tensorc.text import INLINE_MAX

from .pattern import Scalar, Var, op, rule
from .rewrite import apply_rules, dce, graph_pass, replace_uses

# Folding never creates a constant with more elements than this (memory, file size).
FOLD_MAX = 1 << 20
# ...nor one above this size whose input weight stays in use elsewhere: that would
# store the weight twice. This is why GPT's tied `transpose(wte)` before the LM head
# stays a runtime transpose (free in numpy; a strided read for compiled matmuls).
FOLD_SHARED_MAX = 1024


def _foldable(node, users, outputs) -> bool:
    if any(not v.type.is_static or v in outputs for v in node.outputs):
        return False
    if not all(v.is_constant for v in node.inputs):
        return False
    if node.op == "cast" and node.inputs[0].type.dtype == "bf16":
        return False   # a weight kept narrow on purpose (cast-weights), widened per read
    specs = get_op(node.op).attrs  # symbols in dims attributes are bound per call
    if any(spec.kind == "dims" and any(isinstance(d, str) for d in node.attrs[k] or ())
           for k, spec in specs.items()):
        return False
    size = sum(int(np.prod(v.type.shape)) for v in node.outputs)
    if size > FOLD_MAX:
        return False
    shared = any(v.data.size > INLINE_MAX and len(users.get(v, ())) > 1 for v in node.inputs)
    return not (shared and size > FOLD_SHARED_MAX)


@graph_pass("fold-constants")
def fold_constants(g: Graph) -> Graph:
    """Evaluate nodes whose inputs are all constants (including `full`, which has none)."""
    users, outputs = g.users(), set(g.outputs)
    for node in list(g.nodes):
        if not _foldable(node, users, outputs):
            continue
        results = get_op(node.op).evaluate([v.data for v in node.inputs], node.attrs)
        for v, data in zip(node.outputs, results, strict=True):
            data = np.require(data, v.type.np_dtype, "C")  # keeps a 0-d result 0-d
            c = g.add_constant(g.fresh_name(f"{v.name}.c" if v.name[0].isdigit() else v.name),
                               data)
            for u in users.get(v, ()):
                u.inputs = [c if x is v else x for x in u.inputs]
                users.setdefault(c, []).append(u)
    dce(g)


# --- algebraic identities ---------------------------------------------------------------

x = Var("x")


def _keeps(m, name="x"):
    """The builder result for identities: the captured value (the driver rejects it
    unless its type equals the root's, so broadcasting identities never fire)."""
    return m[name]


@rule(x * 1.0)
def mul_one(m, b):
    """x * 1 -> x"""
    return _keeps(m)


@rule(x + 0.0)
def add_zero(m, b):
    """x + 0 -> x"""
    return _keeps(m)


@rule(op.sub(x, Scalar(value=0.0)) | op.div(x, Scalar(value=1.0)))
def sub_zero_div_one(m, b):
    """x - 0 -> x, x / 1 -> x"""
    return _keeps(m)


@rule(op.neg(op.neg(x)))
def double_neg(m, b):
    """-(-x) -> x"""
    return _keeps(m)


def _perm(m, name):
    p = m.attr(name, "perm")
    return tuple(reversed(range(m[name].type.rank))) if p is None else p


@rule(op.transpose(op.transpose(x, name="inner"), name="outer"))
def transpose_transpose(m, b):
    """transpose(transpose(x, p), q) -> transpose(x, p[q]), or x when that is identity"""
    p, q = _perm(m, "inner"), _perm(m, "outer")
    perm = tuple(p[i] for i in q)
    return m["x"] if perm == tuple(range(len(perm))) else b.op("transpose", m["x"], perm=perm)


@rule(op.transpose(x, name="t"))
def transpose_identity(m, b):
    """transpose(x, identity) -> x"""
    return m["x"] if _perm(m, "t") == tuple(range(m["x"].type.rank)) else None


@rule(op.reshape(op.reshape(x), name="r"))
def reshape_reshape(m, b):
    """reshape(reshape(x, a), b) -> reshape(x, b)"""
    return b.op("reshape", m["x"], shape=m["r"].type.shape)


@rule(op.reshape(x) | op.expand(x) | op.cast(x))
def same_type_noop(m, b):
    """reshape/expand/cast to x's own shape and dtype -> x (the driver checks the type)"""
    return m["x"]


@rule(op.squeeze(op.unsqueeze(x, name="u"), name="s"))
def squeeze_unsqueeze(m, b):
    """squeeze(unsqueeze(x, a), a) -> x"""
    rank = m["u"].type.rank
    same = {a % rank for a in m.attr("u", "axes")} == {a % rank for a in m.attr("s", "axes")}
    return m["x"] if same else None


@rule(op.reshape(op.matmul(op.reshape(Var("a"), name="ra"), op.reshape(Var("b"), name="rb"))))
def unflatten_batched_matmul(m, b):
    """reshape(matmul(reshape(a, [B, m, k]), reshape(b, [B, k, n])), [*batch, m, n])
    -> matmul(a, b) when the reshapes only merge the batch dims `batch` of a and b into
    B (PyTorch's dynamo exporter writes 4-d matmuls as such 3-d bmm's)."""
    a, bt = m["a"].type, m["b"].type
    if a.rank < 3 or a.rank != bt.rank or a.shape[:-2] != bt.shape[:-2]:
        return None
    merged = (dim_product(a.shape[:-2]),)
    if m["ra"].type.shape != merged + a.shape[-2:] or m["rb"].type.shape != merged + bt.shape[-2:]:
        return None
    return b.op("matmul", m["a"], m["b"])  # the driver checks it is the reshape's type


@rule(op.reciprocal(op.sqrt(x)))
def reciprocal_sqrt(m, b):
    """1 / sqrt(x) -> rsqrt(x) (ONNX has no Rsqrt, so exporters write the pair; the
    references are the same division, so numbers do not change)"""
    return b.op("rsqrt", m["x"])


IDENTITY_RULES = [mul_one, add_zero, sub_zero_div_one, double_neg, transpose_transpose,
                  transpose_identity, reshape_reshape, same_type_noop, squeeze_unsqueeze,
                  unflatten_batched_matmul, reciprocal_sqrt]


@graph_pass("simplify")
def simplify(g: Graph) -> Graph:
    """Algebraic identities (x*1, x+0, x/1, double transpose, reshape chains, no-op
    reshape/cast, 1/sqrt as rsqrt) to a fixed point."""
    apply_rules(g, IDENTITY_RULES)
    dce(g)


# --- common subexpressions ----------------------------------------------------------

def _const_key(v):
    d = v.data
    return ("const", d.dtype.str, d.shape, d.tobytes()) if d is not None \
        and d.size <= INLINE_MAX else None


@graph_pass("cse")
def cse(g: Graph) -> Graph:
    """Merge nodes with the same op, inputs and attributes (inputs of commutative ops in
    any order), and small constants with equal data."""
    seen: dict = {}
    same: dict = {}
    for v in list(g.constants.values()):
        key = _const_key(v)
        if key is not None:
            same[v] = seen.setdefault(key, v)
    for node in g.nodes:
        node.inputs = [same.get(v, v) for v in node.inputs]
        ins = tuple(id(v) for v in node.inputs)
        if get_op(node.op).commutative:
            ins = tuple(sorted(ins))
        key = (node.op, ins, tuple(sorted(node.attrs.items())))
        first = seen.setdefault(key, node)
        if first is not node:
            for a, b_ in zip(node.outputs, first.outputs, strict=True):
                if not replace_uses(g, a, b_):  # two outputs: keep both nodes
                    break
                same[a] = b_
    dce(g)


@graph_pass("dce")
def dead_code(g: Graph) -> Graph:
    """Remove nodes whose results are never used, and unused constants."""
    dce(g)
