"""Backends: `get_backend(name).compile(graph)` gives an `Executable`.

Every backend is checked against `numpy`, the reference.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod

import numpy as np

from tensorc.errors import InputError, ShapeError, TensorcError
from tensorc.ir import Graph, bind_shapes
from tensorc.ops import get_op
from tensorc.resources import check_fits


def check_shapes(graph: Graph, env: dict[str, int]) -> None:
    """Every node's type inference re-run on the bound sizes must give the types the
    symbolic graph declares. Inference on symbols assumes facts the sizes may break
    (`slice(%w: f32[8], ends=[seq])` is f32[seq] only while seq <= 8); a compiled
    kernel trusts the declared sizes and would read past a buffer, so a broken fact
    is an error here, naming the node."""
    if not env:
        return   # a static graph's types were inferred on these very sizes
    bound = ", ".join(f"{k}={n}" for k, n in env.items())
    for node in graph.nodes:
        bodies = [a for a in node.attrs.values() if isinstance(a, Graph)]
        if bodies:   # a fused region: its body's nodes carry the facts; its inputs have
            # the region's own types (fused's inference insists), so the same symbols
            for body in bodies:
                check_shapes(body, env)
            continue
        opdef = get_op(node.op)
        try:
            got = opdef.infer(*[v.type.concrete(env) for v in node.inputs],
                              **opdef.resolve_attrs(node.attrs, env))
        except ShapeError as e:
            raise ShapeError(f"{node.where}: with {bound}: {e}") from None
        got = list(got) if isinstance(got, list | tuple) else [got]
        for v, t in zip(node.outputs, got, strict=True):
            if t != v.type.concrete(env):
                raise ShapeError(f"{node.where}: with {bound} it gives {t}, but the graph "
                                 f"assumes {v.type} = {v.type.concrete(env)}")


class Executable(ABC):
    """A compiled graph. Call it with arrays (positional or by input name); it returns
    one array, or a tuple when the graph has several outputs. `run` maps names to
    arrays both ways."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.input_names = [v.name for v in graph.inputs]
        self.output_names = [v.name for v in graph.outputs]
        self._sizes_checked: set[tuple] = set()   # symbol bindings that passed check_sizes

    def __call__(self, *args, **kwargs):
        if len(args) > len(self.input_names):
            raise InputError(f"{len(args)} inputs given, the graph takes "
                             f"{len(self.input_names)}: {', '.join(self.input_names)}")
        feeds = dict(zip(self.input_names, args, strict=False))
        feeds.update(kwargs)
        outs = [self.run(feeds)[n] for n in self.output_names]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in feeds]
        extra = [n for n in feeds if n not in self.input_names]
        if missing or extra:
            raise InputError("inputs do not match the graph: " + "; ".join(
                p for p in (f"missing {missing}" if missing else "",
                            f"unknown {extra}" if extra else "") if p)
                + f" (expected {self.input_names})")
        arrays = [np.asarray(feeds[n]) for n in self.input_names]
        env = bind_shapes([v.type for v in self.graph.inputs], arrays, self.input_names)
        self.check_sizes(env)
        outs = self.execute(arrays, env)
        return dict(zip(self.output_names, outs, strict=True))

    def check_sizes(self, env: dict[str, int]) -> None:
        """Once per set of input sizes, before anything runs: the symbolic graph's
        assumptions hold for them (`check_shapes`) and its intermediates fit in memory."""
        key = tuple(sorted(env.items()))
        if key in self._sizes_checked:
            return
        check_shapes(self.graph, env)
        from .plan import peak_memory_bytes
        check_fits(peak_memory_bytes(self.graph, env),
                   f"running {self.graph.name} on "
                   + ", ".join(f"{v.name} {v.type.concrete(env)}" for v in self.graph.inputs))
        self._sizes_checked.add(key)

    @abstractmethod
    def execute(self, arrays: list[np.ndarray], env: dict[str, int]) -> list[np.ndarray]:
        """Run on checked inputs with the symbol bindings `env`."""


class Backend(ABC):
    name: str

    @abstractmethod
    def compile(self, graph: Graph) -> Executable: ...

    def planned_memory_bytes(self, graph: Graph, env: dict[str, int]) -> int:
        """Peak bytes of intermediate buffers this backend plans for these shapes (what
        `tensorc inspect --backend` reports). By default: values freed at their last use."""
        from .plan import peak_memory_bytes
        return peak_memory_bytes(graph, env)

    def unavailable_reason(self) -> str | None:
        """Why `compile` cannot work on this machine (no GPU, say), or None."""
        return None

    def emit_source(self, graph: Graph, directory: str) -> list[str]:
        """Write the generated source of every kernel into `directory`; returns paths."""
        raise TensorcError(f"backend {self.name} generates no source code")


# name -> module that defines `BACKEND`; imported on first use so that, e.g., the
# base install never imports cupy.
_BACKENDS = {"numpy": "tensorc.backends.numpy", "llvm": "tensorc.backends.llvm",
             "cupy": "tensorc.backends.cupy"}


def available_backends() -> list[str]:
    return list(_BACKENDS)


def get_backend(name: str) -> Backend:
    if name not in _BACKENDS:
        raise TensorcError(f"unknown backend {name!r} (known: {', '.join(_BACKENDS)})")
    return importlib.import_module(_BACKENDS[name]).BACKEND
