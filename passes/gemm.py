"""Fusion decisions around GEMMs (O2), made here so that `--print-after`, `--disable`
and `compare --per-pass` see them; backends only carry them out.

- `merge-projections`: sibling matmuls by constant weights on one input (attention's
  q, k and v projections) become one matmul over the concatenated weights, its bias
  added once, and a `split` into the members' columns. A bigger N keeps the GEMM
  efficient and packs the input once.
- `fuse-epilogues`: a matmul followed by `+ bias`, relu/gelu and `+ residual` (reshapes
  between them allowed) becomes
  one `fused` region in exactly the form a GEMM epilogue computes,
  act(a @ b + bias) + residual, which the llvm and cupy GEMMs apply to their
  accumulators (C is written once).
"""

from __future__ import annotations

import numpy as np

from tensorc.ir import Graph
from tensorc.ops.quant import dequantize_chain

from .fusion import region_node
from .rewrite import dce, graph_pass, replace_keeping_name


def _weight(node):
    """The constant 2-D float32 weight W when `node` is x @ W, else None."""
    if node.op != "matmul":
        return None
    x, w = node.inputs
    ok = w.is_constant and w.type.rank == 2 and x.type.rank >= 2 \
        and w.type.dtype == "f32"
    return w if ok else None


def _bias_add(g: Graph, users, out, n: int):
    """(the add node, its constant [n] float32 addend) if `out` is read only by such an
    add, else None."""
    us = users.get(out, [])
    if len(us) != 1 or us[0].op != "add" or out in g.outputs:
        return None
    add = us[0]
    other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
    if other is out or not other.is_constant or other.type.shape != (n,) \
            or other.type.dtype != "f32":
        return None
    return add, other


@graph_pass("merge-projections")
def merge_projections(g: Graph) -> Graph:
    """x @ W1 (+ b1), x @ W2 (+ b2), ... -> split(x @ [W1 W2 ...] + [b1 b2 ...])."""
    users = g.users()
    groups: dict = {}
    for node in g.nodes:
        w = _weight(node)
        if w is not None:
            groups.setdefault((node.inputs[0], w.type.shape[0]), []).append(node)
    index = {n: i for i, n in enumerate(g.nodes)}
    inserts: dict = {}    # first member -> the new nodes to place in front of it
    swaps = []
    for (x, _), members in groups.items():
        if len(members) < 2:
            continue
        widths = [m.inputs[1].type.shape[1] for m in members]
        biased = [_bias_add(g, users, m.outputs[0], n) for m, n in zip(members, widths,
                                                                         strict=True)]
        start = len(g.nodes)
        w = g.add_constant(g.fresh_name(members[0].inputs[1].name + ".merged"),
                           np.concatenate([m.inputs[1].data for m in members], axis=1))
        y = g.add("matmul", x, w)
        if any(biased):
            b = np.concatenate([ba[1].data if ba else np.zeros(n, np.float32)
                                for ba, n in zip(biased, widths, strict=True)])
            y = g.add("add", y, g.add_constant(g.fresh_name(w.name + ".bias"), b))
        parts = g.add_node("split", [y], {"axis": -1, "sizes": widths})
        first = min(members, key=index.__getitem__)
        inserts[first] = g.nodes[start:]
        del g.nodes[start:]
        for m, ba, part in zip(members, biased, parts, strict=True):
            swaps.append(((ba[0] if ba else m).outputs[0], part))
    g.nodes = [m for n in g.nodes for m in (*inserts.get(n, ()), n)]
    for old, new in swaps:
        replace_keeping_name(g, old, new)
    dce(g)


_ACTIVATIONS = ("relu", "gelu")


def _epilogue(g: Graph, users, mm) -> list:
    """The matmul and the nodes after it that a GEMM epilogue computes, in order: each the
    only reader of the one before, none broadcasting it bigger. Reshapes may sit between
    (GPT-2's Conv1D flattens the tokens around its matmul); lowering reads a bias or
    residual through the GEMM's own frame, or leaves an op it cannot frame to a kernel."""
    chain, cur, stage = [mm], mm.outputs[0], 0   # stage: 0 bias, 1 activation, 2 residual
    if mm.op == "matmul_integer":
        steps = dequantize_chain(mm, users, g.outputs)
        if steps is None:
            return [mm]
        chain += [n for n, _ in steps]
        cur = chain[-1].outputs[0]
    while stage < 3:
        us = users.get(cur, [])
        if len(us) != 1 or cur in g.outputs:
            break
        u = us[0]
        other = [v for v in u.inputs if v is not cur]
        if u.op == "reshape" and all(isinstance(d, int) for d in u.attrs["shape"]):
            pass   # (a symbolic shape would leave the region's numpy reference unbound)
        elif u.op == "add" and len(other) == 1 and u.outputs[0].type == cur.type:
            if stage == 0 and other[0].type.shape == cur.type.shape[-1:]:
                stage = 1
            elif other[0].type.shape == cur.type.shape:
                stage = 3
            else:
                break
        elif u.op in _ACTIVATIONS and stage < 2:
            stage = 2
        else:
            break
        chain.append(u)
        cur = u.outputs[0]
    while chain[-1].op == "reshape":   # a view alone gains nothing
        chain.pop()
    return chain


@graph_pass("fuse-epilogues")
def fuse_epilogues(g: Graph) -> Graph:
    """matmul -> + bias -> relu/gelu -> + residual (any prefix of it) -> one region; an
    integer matmul with its dequantize (then the same)."""
    users, outputs = g.users(), set(g.outputs)
    regions = {}    # last node of a chain -> its nodes
    for node in g.nodes:
        if node.op == "matmul_integer" or (node.op == "matmul"
                                           and node.outputs[0].type.dtype == "f32"):
            chain = _epilogue(g, users, node)
            if len(chain) > 1:
                regions[chain[-1]] = chain
    swaps, placed = [], {}
    for last, chain in regions.items():
        fused, old, new = region_node(g, chain, users, outputs)
        placed[last] = fused
        swaps += zip(old, new, strict=True)
    g.nodes = [placed.get(n, n) for n in g.nodes]
    for old, new in swaps:
        replace_keeping_name(g, old, new)
    dce(g)
