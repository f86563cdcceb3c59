"""Reverse-mode automatic differentiation on the IR (what `jax.grad` does on a jaxpr).

`grad(graph, loss, wrt)` returns a graph that computes everything `graph` did and,
after it, the gradient of the scalar output `loss` with respect to each name in
`wrt` (graph inputs or weights; weights named there become inputs, so a training loop
feeds new values without recompiling). The backward is built from each op's rule,
`OpDef.vjp`, walking the forward nodes in reverse; gradients reaching a value from
several readers add up. Fused regions are inlined first, so they differentiate
through their bodies; the result is an ordinary graph that the usual passes (fusion,
CSE, DCE) and buffer planning treat like any other, so what the backward keeps from
the forward shows in the planned memory.

`convert_float` re-types a graph's floats (f64 for finite-difference checks).
"""

from __future__ import annotations

import numpy as np

from tensorc.errors import TensorcError
from tensorc.ir import FLOAT_DTYPES, Graph, TensorType, Value
from tensorc.ops import get_op
from tensorc.ops.vjp import backprop, swap_last

from .manager import register_pass
from .pattern import Var, op, rule
from .rewrite import apply_rules, copy_graph, dce, inline_regions

GRAD_PREFIX = "grad."


def trainable(graph: Graph) -> list[str]:
    """The weights a training run updates by default: float constants of rank >= 1."""
    return [n for n, v in graph.constants.items()
            if v.type.dtype in FLOAT_DTYPES and v.type.rank >= 1]


def grad(graph: Graph, loss: str | None = None, wrt: list[str] | None = None,
         recompute: bool = False) -> Graph:
    """`graph` plus outputs ``grad.<name>`` = d loss / d name for each name in `wrt`
    (default: `trainable(graph)`), after its own outputs. `loss` names a rank-0 float
    output (default: the output called ``loss``, else the first). `recompute`: cheap
    activations the backward reads are computed again there instead of kept
    (`recompute_cheap`)."""
    g = inline_regions(graph)
    names = [v.name for v in g.outputs]
    loss = loss or ("loss" if "loss" in names else names[0])
    if loss not in names:
        raise TensorcError(f"grad: no output named {loss!r} (outputs: {', '.join(names)})")
    target = g.outputs[names.index(loss)]
    if target.type.rank != 0 or target.type.dtype not in FLOAT_DTYPES:
        raise TensorcError(f"grad: the loss must be a float scalar; %{loss} is {target.type}")
    wrt = trainable(g) if wrt is None else list(wrt)
    params = [_as_input(g, name, graph) for name in wrt]

    needs = _depends_on(g, params)
    forward = list(g.nodes)
    grads: dict[Value, Value] = {target: g.add_constant(
        g.fresh_name("grad.seed"), np.ones((), target.type.np_dtype))}
    backprop(g, forward, grads, needs)

    for p in params:
        d = grads.get(p)
        if d is None:   # the loss does not depend on it
            d = g.add("full", shape=p.type.shape, value=0, dtype=p.type.dtype)
        elif d.producer is None or d in g.outputs or d in params:
            d = g.add("reshape", d, shape=p.type.shape)   # an output needs its own node
        g.rename(d, g.fresh_name(GRAD_PREFIX + p.name))
        g.outputs.append(d)
    if recompute:
        recompute_cheap(g, forward)
    apply_rules(g, [transposed_product])
    dce(g)
    return g.verify()


# Ops cheap enough to run twice rather than keep their result from forward to backward.
CHEAP = {"layer_norm", "softmax", "log_softmax"}


def recompute_cheap(g: Graph, forward: list) -> int:
    """For each cheap forward node (elementwise, or a normalisation) whose result the
    backward reads and whose inputs the backward keeps anyway (or are graph inputs or
    weights): compute it again just before its first backward reader, which reads the
    copy. The forward's result then dies inside the forward, and nothing lives longer
    than before (gelu(h) and layer_norm(x) are recomputed from h and x, which their
    own gradients keep). CSE undoes this (the copy repeats its original), so a pipeline
    after it leaves `cse` out. Returns how many were recomputed."""
    fwd = set(map(id, forward))
    order = {id(n): i for i, n in enumerate(g.nodes)}
    users = g.users()

    def kept(v):   # read by the backward already, or no activation at all
        return v.producer is None or any(id(u) not in fwd for u in users.get(v, ()))
    copies = []
    for node in forward:
        if len(node.outputs) != 1 or not (get_op(node.op).kind == "elementwise"
                                          or node.op in CHEAP):
            continue
        out = node.outputs[0]
        late = [u for u in users.get(out, ()) if id(u) not in fwd]
        if not late or out in g.outputs or not all(kept(v) for v in node.inputs):
            continue
        (copy,) = g.add_node(node.op, node.inputs, node.attrs, loc=node.loc)
        g.nodes.pop()
        first = min(late, key=lambda u: order[id(u)])
        copies.append((order[id(first)], copy.producer))
        for u in late:
            u.inputs = [copy if v is out else v for v in u.inputs]
    for pos, node in sorted(copies, key=lambda c: -c[0]):   # from the back: indices hold
        g.nodes.insert(pos, node)
    return len(copies)


def _swaps_last(perm, rank) -> bool:
    return rank >= 2 and tuple(perm or ()) == tuple(range(rank - 2)) + (rank - 1, rank - 2)


@rule(op.transpose(op.matmul(Var("a"), Var("b"), name="ab", one_use=True), name="t"))
def transposed_product(m, b):
    """(a b)^T -> b^T a^T. The gradient of a weight used transposed (a tied embedding
    as the LM head) is a product that is then transposed; written the other way round
    it is one GEMM storing rows, not a GEMM and a strided copy (compiled backends
    read transposed operands where they lie). Grad's own rewrite: the sum is the same
    dot products, but a library may order them differently, so O1 does not do it."""
    a, bt = m["a"].type, m["b"].type
    if a.rank < 2 or bt.rank < 2 or not _swaps_last(m.attr("t", "perm"), m["t"].type.rank):
        return None
    return b.op("matmul", swap_last(b.graph, m["b"]), swap_last(b.graph, m["a"]))


def as_inputs(graph: Graph, names: list[str]) -> Graph:
    """A copy of `graph` whose weights `names` are inputs (after its own), so passes
    cannot fold them and one compiled graph serves every new value of them."""
    g = copy_graph(graph)
    for name in names:
        _as_input(g, name, graph)
    return g


def _as_input(g: Graph, name: str, original: Graph) -> Value:
    """The graph input `name`, or the weight `name` made an input (appended; one that
    nothing reads any more, as an input of its own)."""
    for v in g.inputs:
        if v.name == name:
            return v
    v = g.constants.pop(name, None)
    if v is None and name in original.constants:   # dropped by DCE; its name is still held
        v = Value(name, original.constants[name].type)
        g.inputs.append(v)
        return v
    if v is None:
        raise TensorcError(f"grad: no input or weight named {name!r}")
    if v.type.dtype not in FLOAT_DTYPES:
        raise TensorcError(f"grad: %{name} is {v.type}; only floats have gradients")
    v.data = None
    g.inputs.append(v)
    return v


def _depends_on(g: Graph, sources: list[Value]) -> set[Value]:
    """Float values computed from `sources` (the ones a gradient can reach)."""
    reach = set(sources)
    for node in g.nodes:
        if any(v in reach for v in node.inputs):
            reach.update(v for v in node.outputs if v.type.dtype in FLOAT_DTYPES)
    return reach


@register_pass("grad")
def grad_pass(graph: Graph, loss: str | None = None, recompute: bool = False) -> Graph:
    """`grad` as a pipeline step: every weight, the default loss output."""
    return grad(graph, loss, recompute=recompute)


@register_pass("convert-float")
def convert_float(graph: Graph, dtype: str = "f64") -> Graph:
    """The same computation in another float type: float inputs, weights and every
    float dtype attribute (cast targets, filled tensors) become `dtype`."""
    if dtype not in FLOAT_DTYPES:
        raise TensorcError(f"convert-float: {dtype!r} is not a float type ({FLOAT_DTYPES})")
    src = inline_regions(graph)

    def retype(t: TensorType) -> TensorType:
        return TensorType(t.shape, dtype) if t.dtype in FLOAT_DTYPES else t
    new = Graph(src.name)
    vals = {v: new.add_input(v.name, retype(v.type)) for v in src.inputs}
    unread = [v for n, v in graph.constants.items() if n not in src.constants]
    for v in list(src.constants.values()) + unread:   # weights nothing reads kept too
        data = v.data.astype(retype(v.type).np_dtype) if v.data is not None else None
        vals[v] = new.add_constant(v.name, data, retype(v.type))
    for n in src.nodes:
        attrs = {k: dtype if k == "dtype" and a in FLOAT_DTYPES else a
                 for k, a in n.attrs.items()}
        outs = new.add_node(n.op, [vals[v] for v in n.inputs], attrs,
                            names=[v.name for v in n.outputs], loc=n.loc)
        vals.update(zip(n.outputs, outs, strict=True))
    new.outputs = [vals[v] for v in src.outputs]
    return new.verify()
