"""The reference backend: runs every node through its registry reference implementation."""

from __future__ import annotations

import numpy as np

from tensorc.errors import TensorcError
from tensorc.ir import Graph
from tensorc.ops import get_op

from .. import Backend, Executable
from ..plan import last_uses


class NumpyExecutable(Executable):
    def __init__(self, graph: Graph):
        super().__init__(graph)
        missing = [v.name for v in graph.constants.values() if v.data is None]
        if missing:
            raise TensorcError(f"graph {graph.name} has constants without data: "
                               + ", ".join("%" + n for n in missing[:5]))
        self._steps = [(node, get_op(node.op)) for node in graph.nodes]
        self._dying = last_uses(graph)

    def execute(self, arrays, env):
        vals = {v: v.data for v in self.graph.constants.values()}
        vals.update(zip(self.graph.inputs, arrays, strict=True))
        for i, (node, opdef) in enumerate(self._steps):
            try:
                outs = opdef.evaluate([vals[v] for v in node.inputs], node.attrs, env)
            except TensorcError as e:   # a bad index or size found while running: say where
                raise type(e)(str(e) if node.where in str(e) else f"{node.where}: {e}") \
                    from None
            for v, a in zip(node.outputs, outs, strict=True):
                want = v.type.concrete(env)
                if a.shape != want.shape or a.dtype != want.np_dtype:
                    raise TensorcError(f"{node.where}: produced {a.dtype}{list(a.shape)}, "
                                       f"expected {want} (check the input sizes)")
                vals[v] = a
            for v in self._dying.get(i, []):  # free intermediates after their last use
                if v not in self.graph.outputs:
                    del vals[v]
        return [np.array(vals[v]) for v in self.graph.outputs]


class NumpyBackend(Backend):
    name = "numpy"

    def compile(self, graph: Graph) -> Executable:
        return NumpyExecutable(graph)


BACKEND = NumpyBackend()
