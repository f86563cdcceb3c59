"""The op registry: every op is declared here once.

An `OpDef` carries the attribute schema, type inference, the NumPy reference
implementation and a FLOP count. The printer, parser, verifier, backends and
importers all look ops up here instead of switching on op names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ShapeError, TensorcError, UnsupportedOpError
from ..types import DTYPES, Dim, TensorType, resolve_dim

if TYPE_CHECKING:
    from ..ir import Node

REQUIRED = object()

# Attribute kinds. "dims" are lists of dimensions that may hold symbols; backends
# resolve them against the symbol bindings of a call.
# A "graph" attribute holds a nested `Graph` (the body of a fused region).
ATTR_KINDS = ("int", "float", "bool", "str", "ints", "floats", "dims", "dtype", "scalar",
              "graph")


@dataclass(frozen=True)
class Attr:
    kind: str
    default: Any = REQUIRED
    choices: tuple | None = None

    def __post_init__(self):   # a misspelt kind would otherwise accept any value
        if self.kind not in ATTR_KINDS:
            raise ValueError(f"unknown attribute kind {self.kind!r}; known: {ATTR_KINDS}")

    def check(self, name: str, value: Any) -> Any:
        """Validate and normalise one attribute value (lists become tuples)."""
        k = self.kind
        ok = True
        if value is None:
            ok = self.default is None
        elif k == "int":
            ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
            value = int(value) if ok else value
        elif k == "float":
            ok = isinstance(value, (int, float, np.floating, np.integer)) and \
                not isinstance(value, bool)
            value = float(value) if ok else value
        elif k == "bool":
            ok = isinstance(value, (bool, np.bool_))
            value = bool(value) if ok else value
        elif k in ("str", "dtype"):
            ok = isinstance(value, str) and (k == "str" or value in DTYPES)
        elif k == "graph":
            # a Graph (the registry sits below the IR, so it checks the shape of one)
            ok = all(hasattr(value, a) for a in ("inputs", "outputs", "nodes", "constants"))
        elif k == "scalar":
            ok = isinstance(value, (int, float, bool, np.generic))
            value = value.item() if isinstance(value, np.generic) else value
        elif k in ("ints", "floats", "dims"):
            ok = isinstance(value, (list, tuple))
            if ok:
                elem = {"ints": (int, np.integer), "floats": (int, float, np.floating),
                        "dims": (int, np.integer, str)}[k]
                ok = all(isinstance(x, elem) and not isinstance(x, bool) for x in value)
                conv = float if k == "floats" else (lambda x: x if isinstance(x, str) else int(x))
                value = tuple(conv(x) for x in value) if ok else value
        if ok and self.choices is not None and value not in self.choices:
            ok = False
        if not ok:
            want = f"one of {list(self.choices)}" if self.choices else f"a {k} value"
            raise ShapeError(f"attribute {name}={value!r} should be {want}")
        return value


@dataclass
class OpDef:
    name: str
    infer: Callable[..., TensorType | list[TensorType]]   # infer(*types, **attrs)
    reference: Callable[..., Any]                          # reference(*arrays, **attrs)
    attrs: dict[str, Attr] = field(default_factory=dict)
    inputs: tuple[int, int | None] = (1, 1)                 # (min, max); max None = variadic
    flops: Callable[..., int] | None = None                # flops(out_types, *in_types, **attrs)
    kind: str = "opaque"   # "elementwise" | "reduction" | "shape" | "opaque": for fusion
    commutative: bool = False
    doc: str = ""
    # For composite ops (attention, fused regions): decompose(graph, inputs, **attrs)
    # appends primitive nodes computing the op to `graph` and returns their outputs.
    # ONNX export uses it to write the op as a model-local function.
    decompose: Callable[..., list] | None = None
    # Reverse mode: vjp(graph, node, grads) appends the nodes computing the gradient of
    # each input from `grads` (one Value or None per output; None: no gradient reaches
    # it) and returns one Value or None (no gradient) per input. `tensorc.passes.autodiff`
    # calls it; `vjp.py` holds what the rules share.
    vjp: Callable[..., list] | None = None

    def complete_attrs(self, attrs: dict[str, Any], loc: str | None = None) -> dict[str, Any]:
        """Check attribute names and values, fill in defaults."""
        where = f"{self.name}" + (f" ({loc})" if loc else "")
        unknown = set(attrs) - set(self.attrs)
        if unknown:
            raise ShapeError(f"{where}: unknown attribute(s) {sorted(unknown)}; "
                             f"{self.name} takes {sorted(self.attrs) or 'none'}")
        out = {}
        for name, spec in self.attrs.items():
            if name in attrs:
                try:
                    out[name] = spec.check(name, attrs[name])
                except ShapeError as e:
                    raise ShapeError(f"{where}: {e}") from None
            elif spec.default is REQUIRED:
                raise ShapeError(f"{where}: missing required attribute {name!r}")
            else:
                out[name] = spec.default
        return out

    def infer_node(self, node: Node) -> list[TensorType]:
        lo, hi = self.inputs
        n = len(node.inputs)
        if n < lo or (hi is not None and n > hi):
            want = f"{lo}" if lo == hi else f"{lo} to {hi if hi is not None else 'any'}"
            raise ShapeError(f"{node.where}: takes {want} inputs, got {n}")
        try:
            out = self.infer(*[v.type for v in node.inputs], **node.attrs)
        except ShapeError as e:
            raise ShapeError(f"{node.where}: {e}") from None
        return list(out) if isinstance(out, (list, tuple)) else [out]

    def resolve_attrs(self, attrs: dict[str, Any], env: dict[str, int]) -> dict[str, Any]:
        """Attributes with symbolic dims replaced by their bound values."""
        if not env:
            return attrs
        out = dict(attrs)
        for name, spec in self.attrs.items():
            if spec.kind == "dims" and out.get(name) is not None:
                out[name] = tuple(resolve_dim(d, env) for d in out[name])
        return out

    def evaluate(self, arrays: list[np.ndarray], attrs: dict[str, Any],
                 env: dict[str, int] | None = None) -> list[np.ndarray]:
        """Run the reference implementation; always returns a list of outputs."""
        out = self.reference(*arrays, **self.resolve_attrs(attrs, env or {}))
        return list(out) if isinstance(out, (list, tuple)) else [np.asarray(out)]

    def count_flops(self, node: Node, env: dict[str, int] | None = None) -> int:
        if self.flops is None:
            return 0
        env = env or {}
        outs = [v.type.concrete(env) for v in node.outputs]
        ins = [v.type.concrete(env) for v in node.inputs]
        return int(self.flops(outs, *ins, **self.resolve_attrs(node.attrs, env)))


OPS: dict[str, OpDef] = {}


def register(opdef: OpDef) -> OpDef:
    if opdef.name in OPS:
        raise TensorcError(f"op {opdef.name!r} is registered twice")
    OPS[opdef.name] = opdef
    return opdef


def get_op(name: str) -> OpDef:
    try:
        return OPS[name]
    except KeyError:
        raise UnsupportedOpError(f"unknown op {name!r}") from None


# --- shared helpers for op definitions -----------------------------------------------

def norm_axis(axis: int, rank: int, what: str = "axis") -> int:
    if not -rank <= axis < max(rank, 1):
        raise ShapeError(f"{what} {axis} is out of range for rank {rank}")
    return axis % rank if rank else 0


def broadcast_shapes(*types: TensorType) -> tuple[Dim, ...]:
    rank = max(t.rank for t in types)
    padded = [(1,) * (rank - t.rank) + t.shape for t in types]
    out = []
    for dims in zip(*padded, strict=True):
        big = {d for d in dims if d != 1}
        if len(big) > 1:
            raise ShapeError("cannot broadcast " + " with ".join(str(t) for t in types))
        out.append(big.pop() if big else 1)
    return tuple(out)


def same_dtype(*types: TensorType) -> str:
    if len({t.dtype for t in types}) > 1:
        raise ShapeError("dtypes differ: " + " vs ".join(str(t) for t in types))
    return types[0].dtype


def numel(t: TensorType) -> int:
    return int(np.prod(t.shape, dtype=np.int64))


def elementwise_flops(cost: int = 1) -> Callable[..., int]:
    return lambda outs, *ins, **attrs: cost * sum(numel(t) for t in outs)
