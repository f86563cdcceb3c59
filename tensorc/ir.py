"""The typed SSA IR: `Value`, `Node`, `Graph` (types in `types.py`).

It sits above the op registry (nodes are typed by their op's inference), the printer
and the verifier, which read it only through the objects they are given.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from .errors import ShapeError, TensorcError
from .ops import get_op
from .printer import format_graph, format_node
from .types import (  # noqa: F401  (the IR's types, importable from here too)
    DTYPES,
    FLOAT_DTYPES,
    Dim,
    TensorType,
    bind_shapes,
    canonical_dim,
    dim_divide,
    dim_product,
    dim_symbols,
    dtype_name,
    resolve_dim,
)
from .verify import verify


class Value:
    """One SSA value. `producer` is None for graph inputs and constants."""

    __slots__ = ("name", "type", "producer", "data")

    def __init__(self, name: str, type: TensorType, producer: Node | None = None,
                 data: np.ndarray | None = None):
        self.name, self.type, self.producer, self.data = name, type, producer, data

    @property
    def is_constant(self) -> bool:
        return self.producer is None and self.data is not None

    def __repr__(self) -> str:
        return f"%{self.name}: {self.type}"


class Node:
    __slots__ = ("op", "inputs", "attrs", "outputs", "loc")

    def __init__(self, op: str, inputs: list[Value], attrs: dict[str, Any],
                 outputs: list[Value] | None = None, loc: str | None = None):
        self.op, self.inputs, self.attrs = op, list(inputs), dict(attrs)
        self.outputs: list[Value] = outputs or []
        self.loc = loc  # user source line that created the node, for error messages

    @property
    def where(self) -> str:
        """How error messages point at this node."""
        out = ",".join("%" + v.name for v in self.outputs)  # none yet during inference
        return self.op + (f" {out}" if out else "") + (f" ({self.loc})" if self.loc else "")

    def __repr__(self) -> str:
        return format_node(self)


class Graph:
    """Inputs, outputs, nodes in topological order, and named constants (weights)."""

    def __init__(self, name: str = "main"):
        self.name = name
        self.inputs: list[Value] = []
        self.outputs: list[Value] = []
        self.nodes: list[Node] = []
        self.constants: dict[str, Value] = {}
        self._names: set[str] = set()
        self._counter = 0

    # -- building --
    def fresh_name(self, hint: str | None = None) -> str:
        if hint and hint not in self._names:
            return hint
        while True:
            name = f"{hint}.{self._counter}" if hint else str(self._counter)
            self._counter += 1
            if name not in self._names:
                return name

    def _claim(self, name: str) -> str:
        if name in self._names:
            raise TensorcError(f"value name %{name} is defined twice")
        self._names.add(name)
        return name

    def rename(self, v: Value, name: str) -> bool:
        """Give `v` a new name unless another value has it; returns whether it did."""
        if name in self._names:
            return False
        self._names.discard(v.name)
        v.name = self._claim(name)
        return True

    def add_input(self, name: str, type: TensorType) -> Value:
        v = Value(self._claim(name), type)
        self.inputs.append(v)
        return v

    def add_constant(self, name: str, data: np.ndarray | None, type: TensorType | None = None
                     ) -> Value:
        if data is not None:
            data = np.asarray(data)
            type = TensorType.of(data)
        v = Value(self._claim(name), type, data=data)
        self.constants[name] = v
        return v

    def add_node(self, op: str, inputs: list[Value], attrs: dict[str, Any] | None = None,
                 names: list[str] | None = None, loc: str | None = None) -> list[Value]:
        """Append a node after inferring its output types; returns its outputs."""
        opdef = get_op(op)
        node = Node(op, inputs, opdef.complete_attrs(attrs or {}, loc), loc=loc)
        out_types = opdef.infer_node(node)
        if names is None:
            names = [self.fresh_name() for _ in out_types]
        if len(names) != len(out_types):
            raise ShapeError(f"{node.where}: gives {len(out_types)} outputs, but "
                             f"{len(names)} names were given")
        node.outputs = [Value(self._claim(n), t, node) for n, t in zip(names, out_types,
                                                                       strict=True)]
        self.nodes.append(node)
        return node.outputs

    def add(self, op: str, *inputs: Value, **attrs) -> Value:
        """Single-output shorthand for `add_node`."""
        (out,) = self.add_node(op, list(inputs), attrs)
        return out

    # -- queries --
    def values(self) -> dict[str, Value]:
        vals = {v.name: v for v in self.inputs}
        vals.update(self.constants)
        for n in self.nodes:
            vals.update((v.name, v) for v in n.outputs)
        return vals

    def users(self) -> dict[Value, list[Node]]:
        uses: dict[Value, list[Node]] = {}
        for n in self.nodes:
            for v in n.inputs:
                uses.setdefault(v, []).append(n)
        return uses

    def op_counts(self) -> dict[str, int]:
        return dict(Counter(n.op for n in self.nodes))

    def param_count(self) -> int:
        """Elements of the weights: every constant but scalar literals."""
        return sum(int(np.prod(v.type.shape)) for v in self.constants.values() if v.type.rank)

    def weight_bytes(self) -> dict[str, int]:
        """Bytes of the weights (constants) by dtype, largest first: a quantized model's
        size."""
        sizes: dict[str, int] = {}
        for v in self.constants.values():
            sizes[v.type.dtype] = sizes.get(v.type.dtype, 0) + v.type.nbytes()
        return dict(sorted(sizes.items(), key=lambda kv: -kv[1]))

    def to_networkx(self):
        """A `networkx.DiGraph` over nodes (ints, in topological order) plus inputs and
        constants (their value names); edges carry the value they pass."""
        import networkx as nx
        g = nx.DiGraph(name=self.name)
        src: dict[Value, Any] = {}
        for v in self.inputs:
            g.add_node(v.name, kind="input", type=str(v.type))
            src[v] = v.name
        for v in self.constants.values():
            g.add_node(v.name, kind="constant", type=str(v.type))
            src[v] = v.name
        for i, n in enumerate(self.nodes):
            g.add_node(i, kind="op", op=n.op, attrs=n.attrs,
                       outputs=[v.name for v in n.outputs])
            for v in n.inputs:
                g.add_edge(src[v], i, value=v.name, type=str(v.type))
            for v in n.outputs:
                src[v] = i
        return g

    def verify(self) -> Graph:
        verify(self)
        return self

    def __str__(self) -> str:
        return format_graph(self)

    def __repr__(self) -> str:
        return f"<Graph {self.name}: {len(self.nodes)} nodes, {len(self.constants)} constants>"
