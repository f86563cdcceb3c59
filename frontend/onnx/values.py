"""What ONNX value names stand for while a model is imported, and the arithmetic that
folds shape computations: numbers, or *dims* (`Sym`: a 1-D int tensor whose entries
may be symbols, from Shape of an input with a ``dim_param``). Shared by the importer
(`importer.py`) and the op handlers (`handlers.py`).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto

from tensorc.errors import UnsupportedOpError
from tensorc.ir import TensorType, Value, dim_divide, dim_product
from tensorc.ops.shape import SLICE_END

MIN_OPSET = 1      # older models are upgraded by onnx's version converter ...
NATIVE_OPSET = 13  # ... to this one: the handlers read each op's form from here on
MAX_OPSET = onnx.defs.onnx_opset_version()
FOLD_LIMIT = 16  # fold constant results up to this size (shape-like); bigger ones are data
RANGE_BYTES = 1 << 30  # a Range with known bounds may hold at most this much (1 GiB)

ONNX_DTYPES = {
    TensorProto.FLOAT16: "f16", TensorProto.FLOAT: "f32", TensorProto.DOUBLE: "f64",
    TensorProto.INT8: "i8", TensorProto.INT32: "i32", TensorProto.INT64: "i64",
    TensorProto.UINT8: "u8", TensorProto.BOOL: "bool", TensorProto.BFLOAT16: "bf16",
}


class NeedsConstantError(UnsupportedOpError):
    """An op input that must be known at import (a shape, axes) comes from a graph
    input; `inputs` names them so a caller that has the values can bind them."""

    def __init__(self, message: str, inputs: list[str]):
        super().__init__(message)
        self.inputs = inputs


class _CannotFold(Exception):
    pass


class Sym:
    """A known int tensor of dims (ints or symbol names): what Shape gives."""

    __slots__ = ("dims", "dtype")

    def __init__(self, dims: np.ndarray, dtype: str = "i64"):
        self.dims, self.dtype = dims, dtype

    def __repr__(self) -> str:
        return f"Sym({self.dims.tolist()}, {self.dtype})"


Entry = Value | np.ndarray | Sym  # what an ONNX value name stands for during import


def _known(arr: np.ndarray, dtype: str) -> np.ndarray | Sym:
    """An object array of dims as `Sym` if it holds a symbol, else as numbers."""
    if arr.dtype == object and any(isinstance(d, str) for d in arr.flat):
        return Sym(arr, dtype)
    return np.asarray(arr).astype(TensorType((), dtype).np_dtype)


def onnx_dtype(code: int, where: str) -> str:
    if code not in ONNX_DTYPES:
        name = TensorProto.DataType.Name(code) if code in TensorProto.DataType.values() \
            else str(code)
        raise UnsupportedOpError(f"{where}: dtype {name} is not supported "
                                 f"(supported: {', '.join(ONNX_DTYPES.values())})")
    return ONNX_DTYPES[code]


def _short(v):
    """ONNX float attributes are float32: read 1e-05, not 9.999999747378752e-06."""
    if isinstance(v, float):
        return float(str(np.float32(v)))
    if isinstance(v, list) and v and isinstance(v[0], float):
        return [_short(x) for x in v]
    return v


def _clean(name: str) -> str:
    """An ONNX value name as an IR name ([\\w.]+)."""
    return re.sub(r"[^\w.]", "_", name).strip("_.") or "v"


# --- symbolic arithmetic on dims (for folding shape computations) ---------------------

def _sym_add(a, b):
    if isinstance(a, int) and isinstance(b, int):
        return a + b
    if a == 0 or b == 0:
        return b if a == 0 else a
    raise _CannotFold


def _sym_sub(a, b):
    if isinstance(a, int) and isinstance(b, int):
        return a - b
    if b == 0 or a == b:
        return a if b == 0 else 0
    raise _CannotFold


def _sym_div(a, b):
    if isinstance(a, int) and isinstance(b, int):
        if b == 0:
            raise _CannotFold   # the op itself decides what x / 0 is
        q = abs(a) // abs(b)   # exact: int(a / b) goes through a float
        return q if (a < 0) == (b < 0) else -q
    q = dim_divide(a, b)
    if q is None:
        raise _CannotFold
    return q


def _sym_equal(a, b):
    if isinstance(a, int) and isinstance(b, int) or a == b:
        return a == b
    if isinstance(b, str):
        a, b = b, a
    if isinstance(b, int) and b < 0:  # a symbolic size is never negative
        return False
    raise _CannotFold


def _sym_max(a, b):
    if isinstance(a, int) and isinstance(b, int) or a == b:
        return max(a, b)
    if isinstance(b, str):
        a, b = b, a
    if b in (0, 1):  # dims of a running model are >= 1
        return a
    raise _CannotFold


def _sym_min(a, b):
    if isinstance(a, int) and isinstance(b, int) or a == b:
        return min(a, b)
    if isinstance(b, str):
        a, b = b, a
    if b >= SLICE_END:
        return a
    raise _CannotFold


def _ints_only(fn):
    def f(a, b):
        if isinstance(a, str) or isinstance(b, str):
            raise _CannotFold
        return fn(a, b)
    return f


SYM_ARITH: dict[str, Callable] = {
    "add": _sym_add, "sub": _sym_sub, "mul": lambda a, b: dim_product([a, b]),
    "div": _sym_div, "equal": _sym_equal, "maximum": _sym_max, "minimum": _sym_min,
    "less": _ints_only(lambda a, b: a < b), "greater": _ints_only(lambda a, b: a > b),
    "less_equal": _ints_only(lambda a, b: a <= b),
    "greater_equal": _ints_only(lambda a, b: a >= b),
}
# Ops whose reference only moves elements, so it runs unchanged on arrays of dims.
SYM_MOVES = {"reshape", "transpose", "concat", "split", "slice", "expand", "squeeze",
             "unsqueeze", "gather", "where", "cast"}

def _dtype(e: Entry) -> str:
    return e.type.dtype if isinstance(e, Value) else e.dtype if isinstance(e, Sym) \
        else TensorType.of(e).dtype
