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


def pack_buffers(buffers: list[tuple[int, int, int]], align: int = 64
                 ) -> tuple[list[int], int]:
    """Place buffers (nbytes, first step, last step) in one arena so that buffers whose
    lifetimes overlap never overlap in memory; returns (offsets, arena size).

    Greedy by size, largest first, each at the lowest offset that fits (the usual
    heuristic of inference runtimes: close to the live peak in practice)."""
    order = sorted(range(len(buffers)), key=lambda i: -buffers[i][0])
    placed: list[tuple[int, int, int, int]] = []   # (offset, end offset, first, last)
    offsets = [0] * len(buffers)
    total = 0
    for i in order:
        size, first, last = buffers[i]
        size = -(-size // align) * align
        busy = sorted((o, e) for o, e, f, la in placed if f <= last and first <= la)
        off = 0
        for o, e in busy:
            if off + size <= o:
                break
            off = max(off, e)
        placed.append((off, off + size, first, last))
        offsets[i] = off
        total = max(total, off + size)
    return offsets, total
