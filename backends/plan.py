"""Liveness and the buffer plan shared by every backend.

A value's buffer is live from the node that produces it to its last use (graph
outputs stay live to the end). Inputs and constants belong to the caller and are
not counted.
"""

from __future__ import annotations

from tensorc.ir import Graph, Value


def last_uses(g: Graph) -> dict[int, list[Value]]:
    """For each node index, the values whose last use is that node."""
    last: dict[Value, int] = {}
    for i, node in enumerate(g.nodes):
        for v in node.inputs:
            last[v] = i
    for v in g.outputs:
        last[v] = len(g.nodes)
    dying: dict[int, list[Value]] = {}
    for v, i in last.items():
        if v.producer is not None:
            dying.setdefault(i, []).append(v)
    return dying


def peak_memory_bytes(g: Graph, env: dict[str, int] | None = None) -> int:
    """The most intermediate bytes alive at once, running nodes in graph order."""
    dying = last_uses(g)
    live = peak = 0
    for i, node in enumerate(g.nodes):
        live += sum(v.type.nbytes(env) for v in node.outputs)
        peak = max(peak, live)
        live -= sum(v.type.nbytes(env) for v in dying.get(i, []))
    return peak
