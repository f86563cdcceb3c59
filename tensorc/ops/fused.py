"""`fused`: a region of ops that a backend may run as one kernel.

The attribute `body` is a small graph: its inputs are the fused node's inputs, in
order and with the same types, and its outputs are the node's outputs. Computing
the node means running the body; the reference does exactly that, node by node, so
fusing never changes a number. The fusion pass (`tensorc.passes.fusion`) builds
regions of at most one non-elementwise "anchor" op (matmul, layer_norm, softmax, a
reduction) plus elementwise prologue/epilogue ops; a backend that cannot compile a
region as one kernel can compile its body op by op instead.

Text form: the body prints as a nested graph, indented under its node::

    %5: f32[2,8,64] = fused(%3, %w, %b, body=graph region(%x: f32[2,8,32], ...) {
        %0: f32[2,8,64] = matmul(%x, %w)
        ...
        return %2
      })
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..errors import ShapeError
from ..types import TensorType, dim_symbols, solve_dim

if TYPE_CHECKING:
    from ..ir import Graph
from .registry import Attr, OpDef, get_op, register


def _infer(*types: TensorType, body: Graph) -> list[TensorType]:
    if len(types) != len(body.inputs):
        raise ShapeError(f"body takes {len(body.inputs)} inputs, got {len(types)}")
    for i, (t, v) in enumerate(zip(types, body.inputs, strict=True)):
        if t != v.type:
            raise ShapeError(f"input {i} is {t} but the body's %{v.name} is {v.type}")
    return [v.type for v in body.outputs]


def _bind(body: Graph, shapes) -> dict[str, int]:
    """Symbol bindings of the body's input dims from concrete shapes."""
    env: dict[str, int] = {}
    pairs = [(d, int(n)) for v, shape in zip(body.inputs, shapes, strict=True)
             for d, n in zip(v.type.shape, shape, strict=True) if isinstance(d, str)]
    for d, n in sorted(pairs, key=lambda p: "*" in p[0]):   # plain symbols first
        solve_dim(d, n, env)   # a region may only see `4*batch`: batch is n / 4
    return env


def run_body(body: Graph, arrays) -> list[np.ndarray]:
    """Run a body graph through the reference implementations."""
    env = _bind(body, [np.shape(a) for a in arrays])
    vals = {v: v.data for v in body.constants.values()}
    vals.update(zip(body.inputs, arrays, strict=True))
    for node in body.nodes:
        outs = get_op(node.op).evaluate([vals[v] for v in node.inputs], node.attrs, env)
        vals.update(zip(node.outputs, outs, strict=True))
    return [np.asarray(vals[v]) for v in body.outputs]


def _flops(outs, *ins: TensorType, body: Graph) -> int:
    env = _bind(body, [t.shape for t in ins])
    for v, t in zip(body.inputs, ins, strict=True):   # a product no input splits
        for d, n in zip(v.type.shape, t.shape, strict=True):
            free = [s for s in dim_symbols(d) if s not in env]
            if len(free) > 1:   # batch*seq only: the work depends on the product alone
                env.update({s: 1 for s in free[1:]})
                solve_dim(d, int(n), env)
    return sum(get_op(n.op).count_flops(n, env) for n in body.nodes)


def decompose(graph: Graph, inputs, body: Graph) -> list:
    """Inline: append the body's nodes to `graph`, reading `inputs` (value names kept
    where free, source lines kept); returns the outputs. The one inliner of regions:
    ONNX export, lowering and `passes.rewrite.inline_regions` use it."""
    vals = dict(zip(body.inputs, inputs, strict=True))
    for v in body.constants.values():
        vals[v] = graph.add_constant(graph.fresh_name(v.name), v.data, v.type)
    for node in body.nodes:
        outs = graph.add_node(node.op, [vals[v] for v in node.inputs], node.attrs,
                              names=[graph.fresh_name(v.name) for v in node.outputs],
                              loc=node.loc)
        vals.update(zip(node.outputs, outs, strict=True))
    return [vals[v] for v in body.outputs]


register(OpDef(
    "fused", infer=_infer, reference=lambda *xs, body: run_body(body, xs),
    attrs={"body": Attr("graph")}, inputs=(0, None), flops=_flops, decompose=decompose,
    doc="a fused region: computes its `body` graph on its inputs",
))
