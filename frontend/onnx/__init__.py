"""ONNX import and export.

    graph = tensorc.frontend.onnx.load("model.onnx")   # ONNX file -> Graph
    tensorc.frontend.onnx.save(graph, "out.onnx")       # Graph -> ONNX file

`from_model` / `to_model` do the same in memory with `onnx.ModelProto`.
See docs/onnx.md for the supported ops and what conformance we measure.
"""

from __future__ import annotations

import os

import onnx
from google.protobuf.message import DecodeError

from tensorc.errors import TensorcError
from tensorc.files import check_output_path
from tensorc.ir import Graph

from .exporter import to_model
from .importer import (
    HANDLERS,
    MAX_OPSET,
    MIN_OPSET,
    NATIVE_OPSET,
    NeedsConstantError,
    from_model,
    supported_model,
)


def read_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Parse and check an ONNX file; weights in external-data files beside it are read."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise TensorcError(f"no such ONNX file: {path}")
    try:
        model = onnx.load(path, load_external_data=True)
    except DecodeError as e:
        raise TensorcError(f"{path} is not an ONNX model (it does not parse: {e})") from None
    except (OSError, ValueError, onnx.checker.ValidationError) as e:
        raise TensorcError(f"cannot read ONNX file {path}: {e}") from None
    if not model.graph.output:
        raise TensorcError(f"{path} is not an ONNX model, or is truncated: it has no graph "
                           "outputs")
    bad = _non_utf8_field(model)
    if bad:
        raise TensorcError(f"{path} is not a valid ONNX model: {bad} is not UTF-8 text")
    try:
        onnx.checker.check_model(model)
    except ValueError:  # over 2 GB in memory: the checker cannot take it; import checks
        pass
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0]
        raise TensorcError(f"{path} is not a valid ONNX model (truncated?): {first}") from None
    return model


def _non_utf8_field(msg, where: str = "model") -> str | None:
    """The first string field that protobuf could not decode (ONNX is proto2, which does
    not check UTF-8, so such a field reads as bytes), or None."""
    for field, value in msg.ListFields():
        repeated = field.is_repeated if hasattr(field, "is_repeated") else \
            field.label == field.LABEL_REPEATED   # protobuf before 6
        values = value if repeated else [value]
        if field.type == field.TYPE_STRING and any(isinstance(v, bytes) for v in values):
            return f"{where}.{field.name}"
        if field.type == field.TYPE_MESSAGE:
            for i, v in enumerate(values):
                bad = _non_utf8_field(v, f"{where}.{field.name}[{i}]"
                                      if len(values) > 1 else f"{where}.{field.name}")
                if bad:
                    return bad
    return None


def load(path: str | os.PathLike) -> Graph:
    """Import an ONNX file as a verified Graph."""
    return from_model(read_model(path))


def save(graph: Graph, path: str | os.PathLike, external_data: bool = False) -> None:
    """Export `graph` to an ONNX file (weights in `<file>.data` beside it when
    `external_data`, as large models need)."""
    model = to_model(graph)
    path = os.fspath(path)
    check_output_path(path)
    if external_data:
        check_output_path(path + ".data")
    try:
        onnx.save(model, path, save_as_external_data=external_data,
                  location=os.path.basename(path) + ".data" if external_data else None,
                  size_threshold=0)
    except OSError as e:
        raise TensorcError(f"cannot write {path}: {e}") from None


SUPPORTED_OPS = sorted(HANDLERS)

__all__ = ["MAX_OPSET", "MIN_OPSET", "NATIVE_OPSET", "NeedsConstantError", "SUPPORTED_OPS",
           "from_model", "supported_model",
           "load", "read_model", "save", "to_model"]
