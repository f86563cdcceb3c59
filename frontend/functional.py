"""The functional namespace of the model DSL (``from tensorc.frontend import F``).

Every function here builds on `apply`, so it runs eagerly on arrays and records a
node while tracing.
"""

from __future__ import annotations

import numpy as np

from tensorc.errors import ShapeError
from tensorc.ir import Dim, dtype_name
from tensorc.ops.elementwise import BINARY, UNARY
from tensorc.ops.shape import SLICE_END

from .tensor import Tensor, apply, as_tensor


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


def causal_mask(t: Dim, s: Dim | None = None):
    """Bool [t, s]: query i may attend to key j <= i."""
    s = t if s is None else s
    return tril(full((t, s), True, "bool"))


def dropout(x, p: float = 0.0):
    """Inference only: dropout is the identity."""
    return x


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
