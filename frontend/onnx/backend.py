"""tensorc as an `onnx.backend.base.Backend`: `TensorcBackend` runs the numpy reference
backend, `TensorcLLVMBackend` the llvm one.

This is what the official ONNX node conformance tests drive (tests/test_onnx_conformance.py).
Inputs that tensorc needs at import (a Reshape's target shape, Slice bounds) but that a
test feeds as graph inputs are bound to the fed values before import.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.backend.base import Backend, BackendRep

from tensorc.backends import get_backend

from .importer import NeedsConstantError, from_model, supported_model


class TensorcRep(BackendRep):
    def __init__(self, model: onnx.ModelProto, backend: str = "numpy"):
        # refused here (an op without a handler, an opset out of range), before any
        # input is read: inputs such as sequences are not even arrays
        self.model, self.backend = supported_model(model), backend
        inits = {t.name for t in model.graph.initializer}
        self.input_names = [i.name for i in model.graph.input if i.name not in inits]
        self.cache: dict[tuple, object] = {}

    def _compile(self, feeds: dict[str, np.ndarray]):
        bind: dict[str, np.ndarray] = {}
        while True:
            try:
                graph = from_model(self.model, bind)
                break
            except NeedsConstantError as e:
                if not e.inputs or any(n in bind for n in e.inputs):
                    raise
                bind.update({n: feeds[n] for n in e.inputs})
        return get_backend(self.backend).compile(graph), list(bind)

    def run(self, inputs, **kwargs):
        arrays = [numpy_helper.to_array(x) if isinstance(x, onnx.TensorProto) else np.asarray(x)
                  for x in inputs]
        feeds = dict(zip(self.input_names, arrays, strict=False))
        exe, bound = self._compile(feeds)
        rest = [feeds[n] for n in self.input_names if n not in bound]
        outs = exe.run(dict(zip(exe.input_names, rest, strict=True)))
        return [outs[n] for n in exe.output_names]


class TensorcBackend(Backend):
    name = "numpy"

    @classmethod
    def prepare(cls, model: onnx.ModelProto, device: str = "CPU", **kwargs) -> TensorcRep:
        super().prepare(model, device, **kwargs)
        return TensorcRep(model, cls.name)

    @classmethod
    def supports_device(cls, device: str) -> bool:
        return device == "CPU"


class TensorcLLVMBackend(TensorcBackend):
    name = "llvm"
