"""`Tensor`: the one array type of the model DSL.

A tensor is either *eager* (it holds a numpy array; ops run at once through the
registry's reference implementations) or *traced* (it holds an IR `Value`; ops
append nodes to the graph being traced). Model code cannot tell the difference,
which is what lets one model definition run eagerly and be compiled.

The functions of the DSL's functional namespace (``F``, `functional.py` re-exports
them) are defined below `apply` in this module: Tensor's operators and methods use
them, and they build on `apply`, so they share one home instead of importing each
other. Some are named like builtins (`max`, `sum`, `slice`, `abs`): this module uses
the builtins only before their definitions run, or not at all.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import linecache
import os
import sys
from typing import Any

import numpy as np

from tensorc.errors import ShapeError, TensorcError, TraceError
from tensorc.ir import Dim, Graph, Node, TensorType, Value, dtype_name
from tensorc.ops import get_op
from tensorc.ops.elementwise import BINARY, UNARY
from tensorc.ops.shape import SLICE_END

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


F = sys.modules[__name__]   # Tensor's operators call the functions below as F.name


# --- the functional namespace (F) ----------------------------------------------------------


def _unary(op):
    def fn(x):
        return apply(op, [x])
    fn.__name__ = fn.__qualname__ = op
    fn.__doc__ = f"Elementwise {op}."
    return fn


def _binary(op):
    def fn(a, b):
        return apply(op, [a, b])
    fn.__name__ = fn.__qualname__ = op
    fn.__doc__ = f"Elementwise {op}, numpy broadcasting; Python scalars take the tensor's dtype."
    return fn


for _op in UNARY:
    globals()[_op] = _unary(_op)
for _op in BINARY:
    globals()[_op] = _binary(_op)


def gelu(x, approximate: str = "none"):
    """x * Phi(x); ``approximate="tanh"`` is GPT-2's form."""
    return apply("gelu", [x], approximate=approximate)


def where(cond, a, b):
    like = next((t for t in (a, b) if isinstance(t, Tensor)), None)
    return apply("where", [as_tensor(cond), as_tensor(a, like), as_tensor(b, like)])


def cast(x, dtype):
    return apply("cast", [x], dtype=dtype_name(dtype))


def clip(x, min=None, max=None):
    return apply("clip", [x], min=min, max=max)


def matmul(a, b):
    return apply("matmul", [a, b])


def linear(x, weight, bias=None):
    """x @ weight (+ bias); weight is [in, out]."""
    y = matmul(x, weight)
    return y if bias is None else add(y, bias)  # noqa: F821  (defined above from BINARY)


def reshape(x, shape):
    return apply("reshape", [x], shape=tuple(shape))


def permute(x, perm):
    return apply("transpose", [x], perm=tuple(perm))


def transpose(x, a: int, b: int):
    """Swap two axes (PyTorch's transpose)."""
    perm = list(range(as_tensor(x).ndim))
    perm[a], perm[b] = perm[b], perm[a]
    return permute(x, perm)


def expand(x, shape):
    return apply("expand", [x], shape=tuple(shape))


def unsqueeze(x, axis: int):
    return apply("unsqueeze", [x], axes=(axis,))


def squeeze(x, axis: int):
    return apply("squeeze", [x], axes=(axis,))


def concat(xs, axis: int = 0):
    return apply("concat", list(xs), axis=axis)


def split(x, sizes, axis: int = -1):
    """Split into pieces of the given sizes (or equal pieces of size `sizes`)."""
    x = as_tensor(x)
    if isinstance(sizes, int):
        n = x.shape[axis]
        if not isinstance(n, int) or n % sizes:
            raise ShapeError(f"cannot split {x.type} on axis {axis} into pieces of {sizes}")
        sizes = [sizes] * (n // sizes)
    return apply("split", [x], axis=axis, sizes=tuple(sizes))


def slice(x, axis: int, start: Dim = 0, end: Dim = SLICE_END, step: int = 1):
    return _slice(x, [start], [end], [axis], [step])


def _slice(x, starts, ends, axes, steps):
    """The slice op with default axes and steps left out, for a readable IR."""
    return apply("slice", [x], starts=tuple(starts), ends=tuple(ends),
                 axes=None if list(axes) == list(range(len(axes))) else tuple(axes),
                 steps=None if all(s == 1 for s in steps) else tuple(steps))


def gather(x, indices, axis: int = 0):
    return apply("gather", [x, indices], axis=axis)


def embedding(ids, table):
    """Rows of `table` picked by integer `ids`."""
    return gather(table, ids, 0)


def _reduce(op):
    def fn(x, axis=None, keepdims=False):
        axes = None if axis is None else tuple(axis) if isinstance(axis, (tuple, list)) \
            else (axis,)
        return apply(op, [x], axes=axes, keepdims=keepdims)
    fn.__name__ = op
    return fn


sum = _reduce("reduce_sum")
mean = _reduce("reduce_mean")
max = _reduce("reduce_max")
min = _reduce("reduce_min")


def argmax(x, axis: int = -1, keepdims: bool = False):
    return apply("argmax", [x], axis=axis, keepdims=keepdims)


def softmax(x, axis: int = -1):
    return apply("softmax", [x], axis=axis)


def log_softmax(x, axis: int = -1):
    return apply("log_softmax", [x], axis=axis)


def layer_norm(x, weight=None, bias=None, eps: float = 1e-5, axis: int = -1):
    return apply("layer_norm", [t for t in (x, weight, bias) if t is not None], axis=axis,
                 eps=eps)


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    def pair(v):
        return (v, v) if isinstance(v, int) else tuple(v)
    ph, pw = pair(padding)
    return apply("conv2d", [t for t in (x, weight, bias) if t is not None],
                 strides=pair(stride), pads=(ph, pw, ph, pw), dilations=pair(dilation),
                 group=groups)


def full(shape, value, dtype="f32"):
    return apply("full", [], shape=tuple(shape), value=value, dtype=dtype_name(dtype))


def zeros(shape, dtype="f32"):
    return full(shape, 0.0 if dtype_name(dtype).startswith("f") else 0, dtype)


def ones(shape, dtype="f32"):
    return full(shape, 1.0 if dtype_name(dtype).startswith("f") else 1, dtype)


def tril(x, k: int = 0):
    return apply("trilu", [x], upper=False, k=k)


def triu(x, k: int = 0):
    return apply("trilu", [x], upper=True, k=k)


def arange(n: Dim, dtype="i64"):
    """0, 1, ..., n-1 (n may be a symbol)."""
    return apply("range", [], start=(0,), limit=(n,), delta=1, dtype=dtype_name(dtype))


def tensor_scatter(cache, update, index, axis: int = -2):
    """`cache` with `update`'s rows written at index[b].. along `axis` in batch row b."""
    return apply("tensor_scatter", [cache, update, index], axis=axis)


def local_attention(q, k, v, mask=None, *, before: int, after: int = 0, scale: float,
                    causal: bool = False, dilation: int = 1, global_tokens=()):
    """Attention where query i sees keys i - before .. i + after (the op's docstring:
    `tensorc/ops/sparse_attention.py`); `mask` as the `attention` op takes it."""
    return apply("local_attention", [q, k, v] + ([mask] if mask is not None else []),
                 before=before, after=after, scale=scale, causal=causal, dilation=dilation,
                 global_tokens=tuple(global_tokens))


def block_sparse_attention(q, k, v, mask=None, *, block: int, scale: float,
                           local_blocks: int = 1, random_blocks: int = 0, seed: int = 0,
                           causal: bool = False, global_tokens=()):
    """Attention within blocks of positions and their neighbours (BigBird's layout)."""
    return apply("block_sparse_attention", [q, k, v] + ([mask] if mask is not None else []),
                 block=block, scale=scale, local_blocks=local_blocks,
                 random_blocks=random_blocks, seed=seed, causal=causal,
                 global_tokens=tuple(global_tokens))


def linear_attention(q, k, v, features, mask=None, *, scale: float, causal: bool = False):
    """Performer attention with random `features` [m, d] (a key mask at most)."""
    return apply("linear_attention", [q, k, v, features] + ([mask] if mask is not None else []),
                 scale=scale, causal=causal)


def causal_mask(t: Dim, s: Dim | None = None):
    """Bool [t, s]: query i may attend to key j <= i."""
    s = t if s is None else s
    return tril(full((t, s), True, "bool"))


_DROPOUT: contextvars.ContextVar = contextvars.ContextVar("dropout", default=None)


@contextlib.contextmanager
def dropout_seed(seed):
    """Inside, `dropout(x, p)` drops with masks drawn from `seed` (an i64 scalar: a graph
    input while tracing a training step), each call with its own salt; outside, dropout
    is the identity (inference)."""
    token = _DROPOUT.set((seed, itertools.count()))
    try:
        yield
    finally:
        _DROPOUT.reset(token)


def dropout(x, p: float = 0.0):
    """Zero elements with probability p and scale the rest by 1 / (1 - p) while training
    (inside `dropout_seed`); the identity otherwise."""
    state = _DROPOUT.get()
    if state is None or p == 0.0:
        return x
    seed, salts = state
    return apply("dropout", [x, seed], p=p, salt=next(salts))


def index(x, index):
    """``x[index]`` for ints, slices with step > 0, None, ... and one integer-tensor index."""
    x = as_tensor(x)
    items = list(index) if isinstance(index, tuple) else [index]
    if any(i is Ellipsis for i in items):
        at = items.index(Ellipsis)
        real = len([i for i in items if i is not None and i is not Ellipsis])
        items[at:at + 1] = [np.s_[:]] * (x.ndim - real)
    real = [i for i in items if i is not None]
    if len(real) > x.ndim:
        raise IndexError(f"too many indices for {x.type}")
    items += [np.s_[:]] * (x.ndim - len(real))
    starts, ends, axes, steps, drop, gathers, new_axes = [], [], [], [], [], [], []
    axis = out_axis = 0
    for item in items:
        if item is None:
            new_axes.append(out_axis)
            out_axis += 1
            continue
        d = x.shape[axis]
        if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            i = int(item)
            if isinstance(d, int) and not -d <= i < d:
                raise IndexError(f"index {i} is out of range for axis {axis} of {x.type}")
            starts.append(i), ends.append(i + 1 if i != -1 else SLICE_END)
            axes.append(axis), steps.append(1), drop.append(axis)
        elif isinstance(item, type(np.s_[:])):
            st = 1 if item.step is None else item.step
            if st <= 0:
                raise IndexError("slices with a negative step are not supported")
            if item != np.s_[:]:
                starts.append(0 if item.start is None else item.start)
                ends.append(SLICE_END if item.stop is None else item.stop)
                axes.append(axis), steps.append(st)
            out_axis += 1
        elif isinstance(item, (Tensor, np.ndarray, list)):
            gathers.append((axis, item))
            out_axis += 1
        else:
            raise IndexError(f"unsupported index {item!r}")
        axis += 1
    y = x
    if starts:
        y = _slice(y, starts, ends, axes, steps)
    if drop:
        y = apply("squeeze", [y], axes=tuple(drop))
    if gathers:
        if len(gathers) > 1 or drop or new_axes:
            raise IndexError("an integer-tensor index can only be combined with plain slices")
        (ax, idx), = gathers
        y = gather(y, as_tensor(np.asarray(idx) if isinstance(idx, list) else idx), ax)
    if new_axes:
        y = apply("unsqueeze", [y], axes=tuple(new_axes))
    return y
