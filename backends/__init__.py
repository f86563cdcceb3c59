"""Backends: `get_backend(name).compile(graph)` gives an `Executable`.

Every backend is checked against `numpy`, the reference.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod

import numpy as np

from tensorc.errors import InputError, TensorcError
from tensorc.ir import Graph, bind_shapes
from tensorc.resources import check_fits


class Executable(ABC):
    """A compiled graph. Call it with arrays (positional or by input name); it returns
    one array, or a tuple when the graph has several outputs. `run` maps names to
    arrays both ways."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.input_names = [v.name for v in graph.inputs]
        self.output_names = [v.name for v in graph.outputs]
        self._memory_checked: set[tuple] = set()   # shapes whose sizes passed check_memory

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
        self.check_memory(env)
        outs = self.execute(arrays, env)
        return dict(zip(self.output_names, outs, strict=True))

    def check_memory(self, env: dict[str, int]) -> None:
        """Refuse shapes whose intermediate values (each freed at its last use) need more
        memory than this machine has, a huge batch or seq, before any of it is
        allocated. Checked once per set of shapes."""
        key = tuple(sorted(env.items()))
        if key in self._memory_checked:
            return
        from .plan import peak_memory_bytes
        check_fits(peak_memory_bytes(self.graph, env),
                   f"running {self.graph.name} on "
                   + ", ".join(f"{v.name} {v.type.concrete(env)}" for v in self.graph.inputs))
        self._memory_checked.add(key)

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
