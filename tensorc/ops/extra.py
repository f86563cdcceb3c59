"""Ops that imported models need beyond what the DSL emits: range (ONNX Range) and dims
(symbolic dims used as data)."""

from __future__ import annotations

import numpy as np

from ..errors import ShapeError
from ..types import TensorType
from .registry import Attr, OpDef, register


def _range_len(start, limit, delta: int):
    if isinstance(start, int) and isinstance(limit, int):
        return max(-(-(limit - start) // delta), 0)
    if start == 0 and delta == 1:
        return limit
    raise ShapeError(f"cannot size range({start}, {limit}, {delta}) with a symbolic bound")


def _range(start, limit, delta=1, dtype="i64") -> TensorType:
    if delta == 0:
        raise ShapeError("range step cannot be 0")
    return TensorType((_range_len(start[0], limit[0], delta),), dtype)


register(OpDef(
    "range", inputs=(0, 0), kind="shape", infer=_range,
    reference=lambda start, limit, delta=1, dtype="i64": np.arange(
        start[0], limit[0], delta, dtype=TensorType((), dtype).np_dtype),
    attrs={"start": Attr("dims"), "limit": Attr("dims"), "delta": Attr("int", 1),
           "dtype": Attr("dtype", "i64")},
    doc="[start, start+delta, ...) below limit; start and limit are one-dim lists so they "
        "may be symbols (ONNX Range)",
))


def _dims_infer(values, shape, dtype="i64") -> TensorType:
    if int(np.prod(shape)) != len(values):
        raise ShapeError(f"{len(values)} values do not fill shape {list(shape)}")
    return TensorType(tuple(shape), dtype)


register(OpDef(
    "dims", inputs=(0, 0), kind="shape", infer=_dims_infer,
    reference=lambda values, shape, dtype="i64": np.array(
        values, TensorType((), dtype).np_dtype).reshape(shape),
    attrs={"values": Attr("dims"), "shape": Attr("ints"), "dtype": Attr("dtype", "i64")},
    doc="dims as data: a tensor of `shape` holding `values`, which may be symbols bound at "
        "run time (an imported model computing with its sequence length, say)",
))
