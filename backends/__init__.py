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
    arrays both ways, and writes outputs into the caller's arrays given as `out`.

    The first call with a new input signature (shapes and dtypes) checks the inputs
    and binds the symbols; the result is kept, so a later call with numpy arrays of a
    known signature only looks it up (`_bound`)."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.input_names = [v.name for v in graph.inputs]
        self.output_names = [v.name for v in graph.outputs]
        self._sizes_checked: set[tuple] = set()   # symbol bindings that passed check_sizes
        self._bound: dict[tuple, tuple] = {}   # signature -> (run, output types)

    def __call__(self, *args, **kwargs):
        if not kwargs:
            arrays = args
        elif not args and len(kwargs) == len(self.input_names):
            arrays = [kwargs.get(n) for n in self.input_names]   # by name: in input order
        else:
            arrays = None
        bound = None if arrays is None else self._bound.get(_signature(arrays))
        if bound is not None:
            outs = bound[0](arrays, None)
        else:
            if len(args) > len(self.input_names):
                raise InputError(f"{len(args)} inputs given, the graph takes "
                                 f"{len(self.input_names)}: {', '.join(self.input_names)}")
            feeds = dict(zip(self.input_names, args, strict=False))
            feeds.update(kwargs)
            if type(self).run is Executable.run:   # a list: names may repeat
                outs = self._outputs(feeds, None)
            else:
                result = self.run(feeds)
                outs = [result[n] for n in self.output_names]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def run(self, feeds: dict[str, np.ndarray], out: dict[str, np.ndarray] | None = None
            ) -> dict[str, np.ndarray]:
        """{output name: array}. `out` maps output names to arrays to write into (C-
        contiguous, writeable, the output's dtype and shape); those come back."""
        return dict(zip(self.output_names, self._outputs(feeds, out), strict=True))

    def _outputs(self, feeds: dict, out: dict | None) -> list[np.ndarray]:
        arrays = [feeds.get(n) for n in self.input_names]
        bound = self._bound.get(_signature(arrays)) if len(feeds) == len(arrays) else None
        if bound is None:
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
            bound = (self.bind(env), [v.type.concrete(env) for v in self.graph.outputs])
            self._bound[_signature(arrays)] = bound
        return bound[0](arrays, None if out is None else self._out_arrays(out, bound[1]))

    def _out_arrays(self, out: dict, types) -> list:
        """`out` as one array or None per output, checked."""
        if not isinstance(out, dict):
            raise InputError(f"out must be a dict {{output name: array}}, got "
                             f"{type(out).__name__}")
        unknown = [n for n in out if n not in self.output_names]
        if unknown:
            raise InputError(f"out: unknown outputs {unknown} (outputs: {self.output_names})")
        arrays = []
        for name, t in zip(self.output_names, types, strict=True):
            a = out.get(name)
            if a is None:
                pass
            elif not isinstance(a, np.ndarray):
                raise InputError(f"out {name!r}: expected a numpy array, got {type(a).__name__}")
            elif a.dtype != t.np_dtype or a.shape != tuple(t.shape) \
                    or not a.flags.c_contiguous or not a.flags.writeable:
                why = "" if a.flags.c_contiguous else ", not C-contiguous"
                why += "" if a.flags.writeable else ", read-only"
                raise InputError(f"out {name!r}: expected a writeable C-contiguous {t}, got "
                                 f"{a.dtype}{list(a.shape)}{why}")
            arrays.append(a)
        return arrays

    def bind(self, env: dict[str, int]):
        """A function (arrays, out) -> output arrays for inputs that bind `env` and passed
        the checks; `out` is None or one array (or None) per output. By default
        `execute`, then a copy into the `out` arrays."""
        def run(arrays, out):
            results = self.execute([np.asarray(a) for a in arrays], env)
            for i, o in enumerate(out or ()):
                if o is not None:
                    o[...] = results[i]
                    results[i] = o
            return results
        return run

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


def _signature(arrays) -> tuple | None:
    """The key of `Executable._bound`: shapes and dtypes; None unless all are numpy
    arrays (anything else goes the long way, through np.asarray and the checks)."""
    key = []
    for a in arrays:
        if type(a) is not np.ndarray:
            return None
        key.append((a.shape, a.dtype))
    return tuple(key)


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
