"""Turn a MODEL string into a graph and inputs, for the CLI and for Python.

    from tensorc.loading import load_model
    m = load_model("gpt", preset="tiny", overrides={"n_layer": 3}, batch=2, seq=8)
    m.graph, m.inputs, m.config

A MODEL string is one of:

- a built-in model name (``gpt``, ``bert``, ...), built from a preset and overrides;
- ``path/to/file.py:factory``: the factory returns a `Module` with
  ``example_inputs(batch, seq, seed)``, or a `Graph` (this runs the user's own code,
  at their request);
- a ``.onnx`` file, imported by `tensorc.frontend.onnx`;
- an artifact written by ``tensorc compile`` (see `tensorc.artifact`; no code runs).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import InputError, TensorcError
from .ir import DTYPES, Graph, TensorType, bind_shapes, dim_symbols, dtype_name, resolve_dim
from .resources import check_fits

DEFAULT_SEQ = 16  # the sequence length a symbolic `seq` gets when none is given
INT_INPUT_RANGE = 10  # random integer inputs are drawn from [0, 10): valid ids for any vocab


@dataclass
class Loaded:
    """A loaded model: its graph, its inputs (made on first use for graphs that come
    without example inputs), its config as a dict (None when it has none), a display
    name and metadata (``source``: builtin | factory | onnx | artifact, and more)."""

    graph: Graph
    name: str
    config: dict | None = None
    meta: dict = field(default_factory=dict)
    _inputs: dict[str, np.ndarray] | Callable[[], dict[str, np.ndarray]] | None = \
        field(default=None, repr=False)
    _sizes: tuple = (None, None, None)   # batch, seq, named dims of lazy inputs

    def __post_init__(self):
        # The name comes from a file or its metadata and is printed: no terminal escapes.
        self.name = "".join(c if c.isprintable() else repr(c)[1:-1] for c in self.name)

    def symbol_sizes(self) -> dict[str, int]:
        """The sizes of the graph's symbolic dims for its inputs, without making inputs
        that are not made yet (`inspect` of a huge --seq needs no data)."""
        if callable(self._inputs):
            return bind_symbols(self.graph, *self._sizes)
        names = [v.name for v in self.graph.inputs]
        return bind_shapes([v.type for v in self.graph.inputs],
                           [self.inputs[n] for n in names], names)

    @property
    def inputs(self) -> dict[str, np.ndarray]:
        if callable(self._inputs):
            self._inputs = self._inputs()
        return self._inputs


def load_model(spec: str, preset: str | None = None, overrides: dict[str, Any] | None = None,
               batch: int | None = None, seq: int | None = None, seed: int | None = None,
               inputs: dict[str, np.ndarray] | None = None,
               dims: dict[str, int] | None = None, symbolic: bool = False) -> Loaded:
    """Resolve a MODEL string (see the module doc). `preset` and `overrides` apply to
    built-in models only; `batch` and `seq` size the example inputs (an artifact keeps
    the inputs it was compiled with), `dims` any symbolic input dim of a graph (an ONNX
    file, a factory's Graph) by name. `seed` (default 0) draws the weights and example
    inputs. Given `inputs`, a model is traced at their shapes instead and they become
    the Loaded's inputs. `symbolic`: a model (not a stored graph) is traced with a
    symbolic batch and sequence (`symbolic_trace`), its example inputs kept."""
    if inputs is not None and (batch is not None or seq is not None or dims):
        raise TensorcError("given inputs fix the shapes, so batch, seq and dims do not apply")
    loaded = _load(spec, preset, overrides, batch, seq, seed, inputs, dims or {}, symbolic)
    if dims and not callable(loaded._inputs):
        raise TensorcError(f"--dim sizes the symbolic input dims of a graph (an ONNX file, a "
                           f"factory's Graph); {spec} is traced or stored at fixed shapes "
                           "(use --batch and --seq)")
    return loaded


def _load(spec, preset, overrides, batch, seq, seed, inputs, dims, symbolic) -> Loaded:
    from tensorc.models import MODELS

    overrides = dict(overrides or {})
    if spec in MODELS:
        return _load_builtin(spec, preset or "tiny", overrides, batch, seq, seed or 0, inputs,
                             symbolic)
    if preset is not None or overrides:
        raise TensorcError(f"--preset and --set apply to built-in models only, not to {spec} "
                           f"(built in: {', '.join(MODELS)})")
    if ".py:" in spec or spec.endswith(".py"):
        return _load_factory(spec, batch, seq, seed or 0, inputs, dims, symbolic)
    from .training import is_checkpoint, load_checkpoint_model
    if is_checkpoint(spec):   # trained weights of a built-in model
        model = load_checkpoint_model(spec)
        graph, example = _trace(model, batch, seq, seed or 0, inputs, symbolic)
        return Loaded(graph, os.path.basename(os.path.normpath(spec)),
                      dataclasses.asdict(model.config), {"source": "checkpoint", "path": spec},
                      example)
    if not os.path.exists(spec):
        if os.sep in spec or "." in spec:
            raise TensorcError(f"file not found: {spec}")
        raise TensorcError(f"unknown model {spec!r} (built in: {', '.join(MODELS)}; or give "
                           "a file.py:factory, a .onnx file or a compiled artifact)")
    if spec.lower().endswith(".onnx"):
        from tensorc.frontend import onnx as onnx_io
        graph = onnx_io.load(spec)
        return Loaded(graph, os.path.basename(spec), None, {"source": "onnx", "path": spec},
                      inputs if inputs is not None else
                      lambda: random_inputs(graph, batch, seq, seed or 0, dims),
                      (batch, seq, dims))
    if batch is not None or seq is not None or seed is not None:
        raise TensorcError(f"{spec} is a compiled artifact: its weights and inputs are "
                           "fixed, so --batch, --seq and --seed do not apply")
    from .artifact import load_artifact
    graph, stored, meta = load_artifact(spec)
    return Loaded(graph, meta.get("name") or graph.name, meta.get("config"), meta,
                  stored if inputs is None else inputs)


def symbolic_trace(model, example: dict[str, np.ndarray]):
    """`model` traced with a symbolic batch (and sequence, for token inputs: 2-D
    integers) instead of its example's sizes: one graph for every batch and length."""
    import tensorc
    specs = {}
    for name, x in example.items():
        dims = ["batch"] + (["seq"] if x.ndim == 2 and x.dtype.kind == "i" else
                            list(x.shape[1:]))
        specs[name] = TensorType(tuple(dims), dtype_name(x.dtype))
    return tensorc.trace(model, **specs)


def _trace(model, batch, seq, seed, given, symbolic=False):
    """Trace a model at its example inputs, or at `given` ones shaped like them;
    `symbolic`: at symbolic batch and sequence (`symbolic_trace`)."""
    import tensorc
    inputs = model.example_inputs(batch=1 if batch is None else batch, seq=seq, seed=seed)
    if not isinstance(inputs, dict):
        raise TensorcError(f"{type(model).__name__}.example_inputs() returned a "
                           f"{type(inputs).__name__}; it should return a dict of arrays by "
                           "input name")
    if given is not None:
        check_like(given, inputs)
        inputs = given
    return (symbolic_trace(model, inputs) if symbolic else tensorc.trace(model, **inputs)), \
        inputs


def check_like(given: dict[str, np.ndarray], example: dict[str, np.ndarray]) -> None:
    """Inputs for a model must have the example's names, dtypes and ranks."""
    missing = [n for n in example if n not in given]
    extra = [n for n in given if n not in example]
    if missing or extra:
        raise InputError("inputs do not match the model: " + "; ".join(
            p for p in (f"missing {missing}" if missing else "",
                        f"unknown {extra}" if extra else "") if p)
            + f" (expected {list(example)})")
    for name, want in example.items():
        got = np.asarray(given[name])
        if got.dtype != want.dtype or got.ndim != want.ndim:
            kind = dtype_name(got.dtype) if got.dtype in DTYPES.values() else got.dtype
            raise InputError(f"input {name!r}: expected {want.ndim} dims of "
                             f"{dtype_name(want.dtype)} (like {TensorType.of(want)}), got "
                             f"{kind}[{','.join(map(str, got.shape))}]")


def _load_builtin(name, preset, overrides, batch, seq, seed, given, symbolic=False) -> Loaded:
    from tensorc.models import get
    model = get(name, preset, seed=seed, **overrides)
    graph, inputs = _trace(model, batch, seq, seed, given, symbolic)
    meta = {"source": "builtin", "preset": preset, "overrides": overrides}
    return Loaded(graph, name, dataclasses.asdict(model.config), meta, inputs)


def _load_factory(spec: str, batch, seq, seed, given, dims=None, symbolic=False) -> Loaded:
    from tensorc.frontend import Module

    path, _, fname = spec.rpartition(":") if ".py:" in spec else (spec, "", "")
    if not fname:
        raise TensorcError(f"{spec}: name the factory function, as in {path}:make_model")
    if not os.path.isfile(path):
        raise TensorcError(f"file not found: {path}")
    module_name = "tensorc_user_" + os.path.splitext(os.path.basename(path))[0]
    mod_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[module_name] = module  # dataclasses and pickling look modules up here
    # Run the user's file the way Python runs a script: its folder is importable.
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    try:
        mod_spec.loader.exec_module(module)
    finally:
        sys.path.pop(0)
    factory = getattr(module, fname, None)
    if not callable(factory):
        raise TensorcError(f"{path} defines no function {fname!r}")
    made = factory()
    meta = {"source": "factory", "path": path, "factory": fname}
    name = os.path.splitext(os.path.basename(path))[0]
    if isinstance(made, Graph):
        return Loaded(made.verify(), name, None, meta, given if given is not None else
                      lambda: random_inputs(made, batch, seq, seed, dims), (batch, seq, dims))
    if not isinstance(made, Module):
        raise TensorcError(f"{spec} returned a {type(made).__name__}; it should return a "
                           "tensorc Module or Graph")
    if not hasattr(made, "example_inputs"):
        raise TensorcError(f"{spec} returned a {type(made).__name__} without "
                           "example_inputs(batch, seq, seed), so its input shapes are unknown")
    graph, inputs = _trace(made, batch, seq, seed, given, symbolic)
    config = getattr(made, "config", None)
    config = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else None
    return Loaded(graph, name, config, meta, inputs)


def bind_symbols(graph: Graph, batch: int | None = None, seq: int | None = None,
                 bindings: dict[str, int] | None = None) -> dict[str, int]:
    """Values for the symbolic dims of the graph's inputs: explicit `bindings` first,
    then names containing "batch" take `batch` (default 1) and names containing "seq"
    take `seq` (default 16). Raises naming a symbol that nothing binds."""
    env = dict(bindings or {})
    for v in graph.inputs:
        for d in v.type.shape:
            for sym in dim_symbols(d):
                if sym in env:
                    continue
                low = sym.lower()
                if "batch" in low:
                    env[sym] = 1 if batch is None else batch
                elif "seq" in low:
                    env[sym] = DEFAULT_SEQ if seq is None else seq
                else:
                    raise TensorcError(f"cannot choose a size for dim {sym!r} of input "
                                       f"%{v.name}: {v.type}; give it with --dim "
                                       f"{sym}=SIZE (--batch and --seq set dims named "
                                       "like batch or seq)")
    for flag, value in (("batch", batch), ("seq", seq)):
        if value is not None and not any(flag in s.lower() for s in env):
            raise TensorcError(f"graph {graph.name} has no input dim named like {flag}, so "
                               f"--{flag} does not apply (its input shapes are fixed)")
    return env


def random_inputs(graph: Graph, batch: int | None = None, seq: int | None = None,
                  seed: int = 0, bindings: dict[str, int] | None = None
                  ) -> dict[str, np.ndarray]:
    """Seeded random inputs for the graph's input types: floats standard normal,
    integers in [0, 10), booleans fair coin flips."""
    env = bind_symbols(graph, batch, seq, bindings)
    check_fits(sum(8 * math.prod(resolve_dim(d, env) for d in v.type.shape)
                   for v in graph.inputs), f"random inputs for {graph.name}")
    rng = np.random.default_rng(seed)
    out = {}
    for v in graph.inputs:
        shape = tuple(resolve_dim(d, env) for d in v.type.shape)
        dt = v.type.np_dtype
        if dt.kind == "f":
            a = rng.standard_normal(shape)
        elif dt.kind == "b":
            a = rng.integers(0, 2, shape)
        else:
            a = rng.integers(0, index_bound(graph, v, env), shape)
        out[v.name] = a.astype(dt)
    return out


# Ops an integer input passes through unchanged in value on its way to a gather.
_SAME_VALUES = ("cast", "reshape", "unsqueeze", "squeeze", "expand", "slice", "transpose",
                "concat", "identity")


def index_bound(graph: Graph, v, env: dict[str, int]) -> int:
    """How far an integer input may range: the smallest table a `gather` indexes with
    it (token type ids into a 2-row table, say), else INT_INPUT_RANGE."""
    users = graph.users()
    bound, todo, seen = INT_INPUT_RANGE, [v], set()
    while todo:
        x = todo.pop()
        if x in seen:
            continue
        seen.add(x)
        for n in users.get(x, []):
            if n.op == "gather" and n.inputs[1] is x:
                table = n.inputs[0].type
                size = table.shape[n.attrs["axis"] % table.rank]
                if isinstance(size, str) and all(s in env for s in dim_symbols(size)):
                    size = resolve_dim(size, env)
                if isinstance(size, int):
                    bound = min(bound, max(1, size))
            elif n.op in _SAME_VALUES:
                todo.extend(n.outputs)
    return bound
