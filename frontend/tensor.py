"""`Tensor`: the one array type of the model DSL.

A tensor is either *eager* (it holds a numpy array; ops run at once through the
registry's reference implementations) or *traced* (it holds an IR `Value`; ops
append nodes to the graph being traced). Model code cannot tell the difference,
which is what lets one model definition run eagerly and be compiled.
"""

from __future__ import annotations

import linecache
import os
import sys
from typing import Any

import numpy as np

from tensorc.errors import TensorcError, TraceError
from tensorc.ir import Dim, Graph, Node, TensorType, Value, dtype_name
from tensorc.ops import get_op

# Frames from these folders are tensorc's own; error locations point past them, at
# the user's (or a built-in model's) source line.
_CORE = os.path.dirname(os.path.abspath(sys.modules["tensorc"].__file__))
_INTERNAL = {os.path.dirname(os.path.abspath(__file__)), _CORE, os.path.join(_CORE, "ops")}


def user_frame():
    f = sys._getframe(1)
    while f is not None and os.path.dirname(os.path.abspath(f.f_code.co_filename)) in _INTERNAL:
        f = f.f_back
    return f


def user_location() -> str | None:
    f = user_frame()
    return f"{os.path.basename(f.f_code.co_filename)}:{f.f_lineno}" if f else None


class Tracer:
    """The graph being built while a model runs on traced tensors."""

    current: Tracer | None = None

    def __init__(self, graph: Graph, names: dict[int, str]):
        self.graph = graph
        self.param_names = names           # id(eager tensor) -> constant name
        self.consts: dict[Any, tuple[Tensor, Value]] = {}

    def value_of(self, t: Tensor) -> Value:
        if t.value is not None:
            if t.tracer is not self:
                raise TraceError("a traced tensor from another trace was used "
                                 f"(at {user_location()})")
            return t.value
        key = id(t)
        small = t.data.size <= 16 and id(t) not in self.param_names
        if small:  # share one constant per distinct small literal
            key = (t.data.dtype.str, t.data.shape, t.data.tobytes())
        if key not in self.consts:
            hint = self.param_names.get(id(t), "c")
            self.consts[key] = (t, self.graph.add_constant(self.graph.fresh_name(hint), t.data))
        return self.consts[key][1]


class Tensor:
    """A tensor of the model DSL, eager (`data`) or traced (`value`)."""

    __slots__ = ("data", "value", "tracer", "__weakref__")
    __array_ufunc__ = None  # numpy defers to our operators: np.float32(2) * t works

    def __init__(self, data=None, *, value: Value | None = None, tracer: Tracer | None = None):
        self.data = None if data is None else np.asarray(data)
        self.value, self.tracer = value, tracer

    # -- type --
    @property
    def type(self) -> TensorType:
        return self.value.type if self.value is not None else TensorType.of(self.data)

    @property
    def shape(self) -> tuple[Dim, ...]:
        return self.type.shape

    @property
    def dtype(self) -> str:
        return self.type.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        if not self.shape or not isinstance(self.shape[0], int):
            raise TypeError("len() of a scalar or of a symbolic dim")
        return self.shape[0]

    def numpy(self) -> np.ndarray:
        if self.data is None:
            _no_value("reading the value of")
        return self.data

    def __repr__(self) -> str:
        kind = "traced %" + self.value.name if self.value is not None else "eager"
        return f"Tensor({self.type}, {kind})"

    # -- Python control flow on values is resolved eagerly; under tracing it is an error
    def __bool__(self):
        return bool(self.data) if self.data is not None else _no_value("branching on")

    def __int__(self):
        return int(self.data) if self.data is not None else _no_value("converting to int")

    def __float__(self):
        return float(self.data) if self.data is not None else _no_value("converting to float")

    def __index__(self):
        return int(self.data) if self.data is not None else _no_value("indexing with")

    def __array__(self, dtype=None, copy=None):
        if self.data is None:
            _no_value("numpy on")
        return self.data if dtype is None else self.data.astype(dtype)

    __hash__ = object.__hash__

    # -- operators (all go through the functional namespace) --
    def __add__(self, o): return F.add(self, o)
    def __radd__(self, o): return F.add(o, self)
    def __sub__(self, o): return F.sub(self, o)
    def __rsub__(self, o): return F.sub(o, self)
    def __mul__(self, o): return F.mul(self, o)
    def __rmul__(self, o): return F.mul(o, self)
    def __truediv__(self, o): return F.div(self, o)
    def __rtruediv__(self, o): return F.div(o, self)
    def __pow__(self, o): return F.pow(self, o)
    def __rpow__(self, o): return F.pow(o, self)
    def __matmul__(self, o): return F.matmul(self, o)
    def __rmatmul__(self, o): return F.matmul(o, self)
    def __neg__(self): return F.neg(self)
    def __lt__(self, o): return F.less(self, o)
    def __le__(self, o): return F.less_equal(self, o)
    def __gt__(self, o): return F.greater(self, o)
    def __ge__(self, o): return F.greater_equal(self, o)
    def __and__(self, o): return F.logical_and(self, o)
    def __or__(self, o): return F.logical_or(self, o)
    def __invert__(self): return F.logical_not(self)
    def __getitem__(self, index): return F.index(self, index)

    # -- methods, PyTorch style --
    def reshape(self, *shape): return F.reshape(self, _varargs(shape))
    def permute(self, *perm): return F.permute(self, _varargs(perm))
    def transpose(self, a: int, b: int): return F.transpose(self, a, b)
    def expand(self, *shape): return F.expand(self, _varargs(shape))
    def unsqueeze(self, axis: int): return F.unsqueeze(self, axis)
    def squeeze(self, axis: int): return F.squeeze(self, axis)
    def split(self, sizes, axis: int = -1): return F.split(self, sizes, axis)
    def astype(self, dtype): return F.cast(self, dtype)
    def sum(self, axis=None, keepdims=False): return F.sum(self, axis, keepdims)
    def mean(self, axis=None, keepdims=False): return F.mean(self, axis, keepdims)
    def max(self, axis=None, keepdims=False): return F.max(self, axis, keepdims)
    def min(self, axis=None, keepdims=False): return F.min(self, axis, keepdims)
    def argmax(self, axis=-1, keepdims=False): return F.argmax(self, axis, keepdims)
    def softmax(self, axis=-1): return F.softmax(self, axis)
    def exp(self): return F.exp(self)
    def tanh(self): return F.tanh(self)
    def sqrt(self): return F.sqrt(self)

    @property
    def T(self):
        return F.permute(self, tuple(reversed(range(self.ndim))))


def _varargs(args):
    return tuple(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list)) else args


def _no_value(what: str):
    f = user_frame()
    where, src = "?", ""
    if f is not None:
        where = f"{f.f_code.co_filename}:{f.f_lineno}"
        src = linecache.getline(f.f_code.co_filename, f.f_lineno).strip()
    raise TraceError(f"{what} a traced tensor's value at {where}"
                     + (f" ({src})" if src else "")
                     + ": values are unknown while tracing; use tensorc ops such as "
                     "F.where, or make the choice depend on shapes")


def as_tensor(x, like: Tensor | None = None) -> Tensor:
    """A Tensor from a Tensor, array or Python scalar (scalars take `like`'s dtype)."""
    if isinstance(x, Tensor):
        return x
    if isinstance(x, (bool, int, float)) and like is not None:
        return Tensor(np.asarray(x, dtype=like.type.np_dtype))
    arr = np.asarray(x)
    if arr.dtype == np.float64 and like is None:
        arr = arr.astype(np.float32)  # Python floats default to f32, as in the IR
    dtype_name(arr.dtype)  # a clear error for dtypes the IR lacks
    return Tensor(arr)


def apply(op: str, inputs: list, **attrs) -> Tensor | tuple[Tensor, ...]:
    """Run `op` on tensors: eagerly, or by appending a node when tracing."""
    like = next((x for x in inputs if isinstance(x, Tensor)), None)
    tensors = [as_tensor(x, like) for x in inputs]
    tracer = Tracer.current
    loc = user_location()
    if tracer is not None:
        values = [tracer.value_of(t) for t in tensors]
        outs = [Tensor(value=v, tracer=tracer)
                for v in tracer.graph.add_node(op, values, attrs, loc=loc)]
    else:
        if any(t.data is None and t.value is None for t in tensors):
            raise TensorcError(f"{op} at {loc}: a parameter has no data: call init_weights() "
                               "or load_weights() first")
        if any(t.data is None for t in tensors):
            raise TraceError(f"{op} at {loc}: a traced tensor is used outside its trace")
        opdef = get_op(op)
        attrs = opdef.complete_attrs(attrs, loc)
        # Type inference first, so eager and traced runs fail with the same message.
        probe = Node(op, [Value("in", t.type) for t in tensors], attrs, loc=loc)
        opdef.infer_node(probe)
        outs = [Tensor(a) for a in opdef.evaluate([t.data for t in tensors], attrs)]
    return outs[0] if len(outs) == 1 and op != "split" else tuple(outs)


from . import functional as F  # noqa: E402  (functional builds on Tensor)
