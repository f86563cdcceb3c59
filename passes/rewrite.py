"""The machinery every pass shares: copying a graph, replacing a value, dead-code
elimination, and the driver that applies a set of pattern rules to a fixed point.

Passes are pure: `graph_pass` hands the pass body a private copy of the caller's
graph (constants' data arrays are shared, never written), so the body may edit
that copy in place.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

from tensorc.errors import ShapeError, TensorcError
from tensorc.ir import Graph, Value
from tensorc.ops import get_op

from .manager import register_pass


def copy_graph(g: Graph) -> Graph:
    """A copy with fresh `Value`s and `Node`s; constant data and fused bodies are shared."""
    new = Graph(g.name)
    vals: dict[Value, Value] = {}
    for v in g.inputs:
        vals[v] = new.add_input(v.name, v.type)
    for v in g.constants.values():
        vals[v] = new.add_constant(v.name, v.data, v.type)
    for n in g.nodes:
        outs = new.add_node(n.op, [vals[v] for v in n.inputs], n.attrs,
                            names=[v.name for v in n.outputs], loc=n.loc)
        vals.update(zip(n.outputs, outs, strict=True))
    new.outputs = [vals[v] for v in g.outputs]
    return new


def inline_regions(g: Graph) -> Graph:
    """A copy with every `fused` node replaced by its body's nodes (keeping the body's
    value names where they are free), e.g. to analyse a graph after fusion."""
    new = copy_graph(g)
    nodes, new.nodes = new.nodes, []
    swaps = []
    for n in nodes:
        if n.op != "fused":
            new.nodes.append(n)
            continue
        outs = get_op("fused").decompose(new, n.inputs, body=n.attrs["body"])
        swaps += list(zip(n.outputs, outs, strict=True))
    for old, v in swaps:
        replace_keeping_name(new, old, v)
    dce(new)
    return new


def graph_pass(name: str):
    """Register `fn(graph, **options)` as a pass that edits a private copy in place."""
    def deco(fn: Callable[..., Graph | None]) -> Callable[..., Graph]:
        @functools.wraps(fn)
        def run(graph: Graph, **options) -> Graph:
            g = copy_graph(graph)
            return fn(g, **options) or g
        register_pass(name)(run)
        return run
    return deco


def replace_uses(g: Graph, old: Value, new: Value) -> bool:
    """Make every use of `old` read `new`; returns False (changing nothing) when that
    is impossible: a graph output would become an input or constant, whose name
    cannot move, or two outputs would merge into one value."""
    if old is new:
        return False
    if old in g.outputs:
        if new.producer is None or new in g.outputs:
            return False
        name = old.name
        g.rename(old, g.fresh_name(name + ".old"))
        g.rename(new, name)  # outputs keep their names: callers look results up by them
        g.outputs = [new if v is old else v for v in g.outputs]
    for n in g.nodes:
        if old in n.inputs:
            n.inputs = [new if v is old else v for v in n.inputs]
    return True


def replace_keeping_name(g: Graph, old: Value, new: Value) -> bool:
    """`replace_uses`, then give `new` the name of `old` (for readable rewritten IR)."""
    name = old.name
    if not replace_uses(g, old, new):
        return False
    if new.name != name:
        g.rename(old, g.fresh_name(name + ".old"))
        g.rename(new, name)
    return True


def dce(g: Graph) -> bool:
    """Drop nodes whose results nobody reads and unused constants; never inputs."""
    live = set(g.outputs)
    keep = []
    for n in reversed(g.nodes):
        if any(v in live for v in n.outputs):
            keep.append(n)
            live.update(n.inputs)
    removed = len(keep) != len(g.nodes)
    g.nodes = keep[::-1]
    for name, v in list(g.constants.items()):
        if v not in live:
            del g.constants[name]
            removed = True
    return removed


class Builder:
    """What a rule's replacement uses to make new nodes and constants. The driver
    moves the nodes it makes in front of the matched root."""

    def __init__(self, graph: Graph):
        self.graph = graph

    def op(self, name: str, *inputs: Value, **attrs) -> Value:
        return self.graph.add(name, *inputs, **attrs)

    def const(self, data, dtype=None, hint: str = "c") -> Value:
        data = np.asarray(data, dtype)
        return self.graph.add_constant(self.graph.fresh_name(hint), data)


class Context:
    """Facts about the graph that patterns ask for: who uses a value, which values
    are outputs, and the data of constant-valued values."""

    def __init__(self, g: Graph):
        self.graph = g
        self._consts: dict[Value, np.ndarray | None] = {}
        self.refresh()

    def refresh(self):
        self.users = self.graph.users()
        self.outputs = set(self.graph.outputs)

    def one_use(self, v: Value) -> bool:
        return len(self.users.get(v, ())) == 1 and v not in self.outputs

    def constant(self, v: Value, limit: int = 1 << 16) -> np.ndarray | None:
        """The data of `v` when it is a constant or computed from constants alone (e.g.
        `sqrt(64.0)` before folding), with static shape and at most `limit` elements."""
        if v.is_constant:
            return v.data
        if v not in self._consts:
            self._consts[v] = None
            n = v.producer
            if n is not None and v.type.is_static and len(n.outputs) == 1 \
                    and np.prod(v.type.shape) <= limit:
                args = [self.constant(x, limit) for x in n.inputs]
                if all(a is not None for a in args):
                    from tensorc.ops import get_op
                    try:
                        self._consts[v] = get_op(n.op).evaluate(args, n.attrs)[0]
                    except (TensorcError, ValueError, ArithmeticError):
                        pass  # it fails at run time too; here it is just not a constant
        return self._consts[v]


def apply_rules(g: Graph, rules, max_fires: int | None = None) -> int:
    """Rewrite `g` in place with `rules` until none matches; returns how many fired.

    At each node (in order) the first rule whose pattern matches and whose builder
    returns a value of the root's exact type replaces the root; dead nodes are then
    dropped and the scan goes on from the new nodes. Sweeps repeat until one fires
    nothing, so the result is a fixed point."""
    ctx = Context(g)
    fires = 0
    limit = max_fires if max_fires is not None else 20 * len(g.nodes) + 100
    swept = False
    while not swept:
        swept, i = True, 0
        while i < len(g.nodes):
            node = g.nodes[i]
            made = _fire(g, ctx, node, rules) if len(node.outputs) == 1 else None
            if made is None:
                i += 1
                continue
            swept = False
            fires += 1
            if fires > limit:
                raise TensorcError(f"rewrite rules do not converge on graph {g.name} "
                                   f"(last at {node.where})")
            dce(g)
            ctx.refresh()
            at = {n: j for j, n in enumerate(g.nodes)}
            i = min((at[n] for n in made if n in at), default=min(i, len(g.nodes)))
    return fires


def _fire(g: Graph, ctx: Context, node, rules) -> list | None:
    """Try the rules at `node`; returns the nodes the replacement made, or None."""
    from .pattern import Match
    root = node.outputs[0]
    for rule in rules:
        for m in rule.pattern.match(root, Match(ctx)):
            start = len(g.nodes)
            try:
                out = rule.build(m, Builder(g))
            except ShapeError:  # the replacement does not type-check here: decline
                out = None
            made = g.nodes[start:]
            del g.nodes[start:]
            if out is None or out.type != root.type:
                continue
            at = g.nodes.index(node)
            g.nodes[at:at] = made
            if replace_uses(g, root, out):
                return made
            del g.nodes[at:at + len(made)]
    return None
