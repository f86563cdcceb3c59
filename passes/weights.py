"""Weight storage: `cast-weights` keeps the weights of matmuls in a narrower float type.

``cast-weights:bf16`` (after O2: ``O2,cast-weights:bf16``) turns every float32
constant that is only ever the B operand (the weight) of matmuls, directly or as an
input of a `fused` region whose body uses it only so, into a bf16 constant followed
by ``cast(..., dtype=f32)`` right before its reader. The graph still computes in
float32 on weights rounded once (to nearest even), so every backend computes the same
numbers: numpy widens the weight, llvm packs it as bf16 and widens it in the GEMM's
micro-kernel (half the weight bytes in memory). Other constants (biases, layer norm's
scale, an embedding that is gathered by index, a tied LM head read through a
transpose) stay float32.

fold-constants leaves a cast that widens a constant alone (it would undo this pass), so
the pass may run before more of a pipeline too.
"""

from __future__ import annotations

import numpy as np

from tensorc.errors import TensorcError
from tensorc.ir import DTYPES, Graph, Node, Value

from .rewrite import dce, graph_pass

NARROW = ("bf16",)   # the types a weight may be stored in


def _weight_uses(node: Node, v: Value) -> bool:
    """Whether `node` reads `v` only as a matmul's B (in a fused region: the body
    input it stands for is read only so)."""
    slots = [i for i, x in enumerate(node.inputs) if x is v]
    if node.op == "matmul":
        return slots == [1] and node.inputs[0] is not v
    if node.op == "fused":
        body = node.attrs["body"]
        inner = [body.inputs[i] for i in slots]
        users = body.users()
        return all(u and all(_weight_uses(n, x) for n in u)
                   for x in inner for u in [users.get(x, [])]) \
            and not any(x in body.outputs for x in inner)
    return False


@graph_pass("cast-weights")
def cast_weights(g: Graph, dtype: str) -> Graph:
    """Matmul weights stored as `dtype` (bf16), widened to float32 where they are read."""
    if dtype not in NARROW:
        raise TensorcError(f"cast-weights: unknown dtype {dtype!r} (known: "
                           f"{', '.join(NARROW)}); write cast-weights:bf16")
    users, outputs = g.users(), set(g.outputs)
    before: dict[Node, list[Node]] = {}   # reader -> the casts to place before it
    for name, c in list(g.constants.items()):
        readers = users.get(c, [])
        if c.type.dtype != "f32" or c.data is None or c.type.rank < 2 or c in outputs \
                or not readers or not all(_weight_uses(n, c) for n in readers):
            continue
        narrow = g.add_constant(g.fresh_name(f"{name}.{dtype}"),
                                c.data.astype(DTYPES[dtype]))
        for n in dict.fromkeys(readers):   # one cast per reader: each is read once
            wide = g.add("cast", narrow, dtype="f32")
            n.inputs = [wide if x is c else x for x in n.inputs]
            before.setdefault(n, []).append(g.nodes.pop())
    g.nodes = [m for n in g.nodes for m in (*before.get(n, ()), n)]
    dce(g)   # the float32 constants, now unread


def stored_bytes(g: Graph) -> dict[str, int]:
    """Bytes of constant data per dtype (for reports)."""
    out: dict[str, int] = {}
    for v in g.constants.values():
        if v.data is not None:
            out[v.type.dtype] = out.get(v.type.dtype, 0) + int(np.asarray(v.data).nbytes)
    return out
