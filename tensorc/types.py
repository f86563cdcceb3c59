"""The IR's type system: dtypes, dimensions and `TensorType`, below everything else.

A dimension is an int or a symbolic name (``"batch"``, ``"seq"``); a product
of symbols times an int is written ``"8*batch*seq"``. Backends bind the
symbols from the concrete shapes of a call.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

from .errors import InputError, ShapeError, TensorcError

Dim = int | str

DTYPES: dict[str, np.dtype] = {
    "f16": np.dtype(np.float16),
    "bf16": np.dtype(ml_dtypes.bfloat16),   # bfloat16: float32's range, 8 significant bits
    "f32": np.dtype(np.float32),
    "f64": np.dtype(np.float64),
    "i8": np.dtype(np.int8),
    "i32": np.dtype(np.int32),
    "i64": np.dtype(np.int64),
    "u8": np.dtype(np.uint8),
    "bool": np.dtype(np.bool_),
}
_NAME_OF_DTYPE = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = ("f16", "bf16", "f32", "f64")


def dtype_name(dtype: Any) -> str:
    """The IR name (``"f32"``) of a numpy dtype or dtype-like."""
    if isinstance(dtype, str) and dtype in DTYPES:
        return dtype
    try:
        return _NAME_OF_DTYPE[np.dtype(dtype)]
    except (KeyError, TypeError):
        raise TensorcError(f"unsupported dtype {dtype!r} (known: {', '.join(DTYPES)})") from None


# --- symbolic dimensions -------------------------------------------------------------

_DIM_RE = re.compile(r"(\d+\*)?[A-Za-z_][\w.]*(\*[A-Za-z_][\w.]*)*")


def _split_dim(d: Dim) -> tuple[int, Counter]:
    """A dim as (integer coefficient, multiset of symbols)."""
    if isinstance(d, (int, np.integer)):
        return int(d), Counter()
    coef, syms = 1, Counter()
    for part in d.split("*"):
        if part.lstrip("-").isdigit():
            coef *= int(part)
        else:
            syms[part] += 1
    return coef, syms


def _join_dim(coef: int, syms: Counter) -> Dim:
    names = sorted(syms.elements())
    if not names:
        return coef
    return "*".join(([str(coef)] if coef != 1 else []) + names)


def dim_product(dims) -> Dim:
    """The product of dims, simplified: ``dim_product([2, "seq", 4]) == "8*seq"``."""
    coef, syms = 1, Counter()
    for d in dims:
        c, s = _split_dim(d)
        coef *= c
        syms += s
    return 0 if coef == 0 else _join_dim(coef, syms)


def dim_divide(a: Dim, b: Dim) -> Dim | None:
    """``a / b`` when it is exact, else None."""
    (ca, sa), (cb, sb) = _split_dim(a), _split_dim(b)
    if cb == 0 or ca % cb or any(sa[k] < n for k, n in sb.items()):
        return None
    return _join_dim(ca // cb, sa - sb)


def dim_symbols(d: Dim) -> list[str]:
    return list(_split_dim(d)[1])


def solve_dim(d: Dim, n: int, env: dict[str, int]) -> None:
    """Bind in `env` what a dim of concrete size `n` says: a plain symbol's value, or
    that of the one unbound symbol (to the first power) of a product like ``4*batch``."""
    coef, syms = _split_dim(d)
    free = [s for s in syms if s not in env]
    if len(free) != 1 or syms[free[0]] != 1:
        return
    known = coef * math.prod(env[s] ** k for s, k in syms.items() if s != free[0])
    if known and n % known == 0:
        env[free[0]] = n // known


def resolve_dim(d: Dim, env: dict[str, int]) -> int:
    """The concrete value of a dim given symbol bindings."""
    coef, syms = _split_dim(d)
    try:
        return coef * math.prod(env[s] ** n for s, n in syms.items())
    except KeyError as e:
        raise ShapeError(f"symbolic dim {e.args[0]!r} is not bound by any input") from None


def canonical_dim(d: Dim) -> Dim:
    return _join_dim(*_split_dim(d))


# --- types, values, nodes, graphs ----------------------------------------------------

@dataclass(frozen=True)
class TensorType:
    shape: tuple[Dim, ...]
    dtype: str = "f32"

    def __post_init__(self):
        if self.dtype not in DTYPES:
            object.__setattr__(self, "dtype", dtype_name(self.dtype))
        for d in self.shape:
            if isinstance(d, str) and not _DIM_RE.fullmatch(d) or isinstance(d, bool) \
                    or isinstance(d, (int, np.integer)) and d < 0:
                raise TensorcError(f"bad dimension {d!r}: use a size >= 0 or a name "
                                   "such as 'batch'")
        object.__setattr__(self, "shape", tuple(canonical_dim(d) for d in self.shape))

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)

    @property
    def numel(self) -> Dim:
        return dim_product(self.shape)

    @property
    def np_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]

    def concrete(self, env: dict[str, int]) -> TensorType:
        return TensorType(tuple(resolve_dim(d, env) for d in self.shape), self.dtype)

    def nbytes(self, env: dict[str, int] | None = None) -> int:
        return resolve_dim(self.numel, env or {}) * self.np_dtype.itemsize

    def __str__(self) -> str:
        return f"{self.dtype}[{','.join(str(d) for d in self.shape)}]"

    @staticmethod
    def of(array: np.ndarray) -> TensorType:
        return TensorType(tuple(array.shape), dtype_name(array.dtype))


def bind_shapes(types: list[TensorType], arrays: list[np.ndarray], names: list[str]
                ) -> dict[str, int]:
    """Check arrays against declared types and return the symbol bindings. Plain
    symbols bind first; product dims (`2*seq`) are then checked against them, or bind
    their one unknown symbol when the size divides evenly."""
    env: dict[str, int] = {}
    origin: dict[str, str] = {}  # symbol -> the input that bound it, for the error
    products = []                # (dim, size, index of the input)
    arrays = [np.asarray(a) for a in arrays]

    def mismatch(i: int) -> InputError:
        t, a, name = types[i], arrays[i], names[i]
        got = f"{dtype_name(a.dtype) if a.dtype in _NAME_OF_DTYPE else a.dtype}"
        return InputError(f"input {name!r}: expected {t}, got {got}{list(a.shape)}"
                          + (" (with " + ", ".join(f"{k}={v} from {origin[k]}"
                                                   for k, v in env.items()) + ")"
                             if env else ""))

    for i, (t, a, name) in enumerate(zip(types, arrays, names, strict=True)):
        bad = a.ndim != t.rank or dtype_name(a.dtype) != t.dtype
        if not bad:
            for d, n in zip(t.shape, a.shape, strict=True):
                if isinstance(d, int):
                    bad |= d != n
                elif "*" in d:
                    products.append((d, n, i))
                else:
                    bad |= env.setdefault(d, n) != n
                    origin.setdefault(d, f"{name!r} {list(a.shape)}")
        if bad:
            raise mismatch(i)
    while products:
        waiting = []
        for d, n, i in products:
            coef, syms = _split_dim(d)
            unbound = [s for s in syms if s not in env]
            known = coef * math.prod(env[s] ** k for s, k in syms.items() if s in env)
            if not unbound:
                if known != n:
                    raise mismatch(i)
            elif len(unbound) == 1 and syms[unbound[0]] == 1:
                if known == 0 or n % known:
                    raise mismatch(i)
                env[unbound[0]] = n // known
                origin[unbound[0]] = f"{names[i]!r} {list(arrays[i].shape)}"
            else:
                waiting.append((d, n, i))
        if len(waiting) == len(products):   # nothing more can be bound: ambiguous
            d, n, i = waiting[0]
            raise InputError(f"input {names[i]!r}: dim {d} = {n} does not say what "
                             f"{' and '.join(s for s in _split_dim(d)[1] if s not in env)} "
                             "are; bind them through another input")
        products = waiting
    return env
