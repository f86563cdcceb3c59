"""The official ONNX node conformance tests, every one of them (1,884 with onnx 1.23), on
the numpy reference backend and on llvm, from one case list.

A case the importer refuses (an op without a handler, another domain, an opset out of
range: `supported_model` says why) or whose dtypes the IR lacks is a strict xfail raising
`UnsupportedOpError`, with the importer's own reason, which names the op. Both lists are
derived here, so a handler that lands turns its cases into tests without an edit to this
file (a strict xfail that starts passing fails the run). Other failures are bugs, or
xfails below with the exception they raise and their reason.
"""

import re
import warnings

import onnx.backend.test
import pytest
from onnx import TensorProto
from onnx.backend.test.loader import load_model_tests

from tensorc.backends import available_backends
from tensorc.errors import UnsupportedOpError
from tensorc.frontend.onnx import supported_model
from tensorc.frontend.onnx.backend import TensorcBackend, TensorcLLVMBackend
from tensorc.frontend.onnx.values import ONNX_DTYPES

# pattern -> (the error tensorc raises, why it does not pass), on every backend
XFAIL = {
    r"test_training_dropout(?!_zero_ratio)": (AssertionError, "Dropout with training_mode=True "
                                              "runs as the identity (inference); the test "
                                              "expects random drops"),
    r"test_batchnorm_.*training_mode": (UnsupportedOpError, "BatchNormalization in training "
                                        "mode (inference only)"),
    r"test_gathernd_example_int32_batch_dim1": (UnsupportedOpError, "GatherND with "
                                                "batch_dims > 0"),
    r"test_identity_(opt|sequence)": (UnsupportedOpError, "optional and sequence values are "
                                      "not tensors"),
    r"test_(de)?quantizelinear_blocked": (UnsupportedOpError, "blocked quantization "
                                          "(block_size > 0): tensorc's parameters are per "
                                          "tensor or per axis"),
    r"test_maxpool_with_argmax_": (UnsupportedOpError, "MaxPool's second output (Indices): "
                                   "tensorc imports the pooled values only"),
    r"test_tensorscatter_circular": (UnsupportedOpError, "TensorScatter in circular mode (a "
                                     "ring buffer): tensorc's caches are linear"),
}

# the same, on one backend only
BACKEND_XFAIL = {
    "llvm": {
        r"test_attention_4d_causal_fp16(_expanded)?$": (
            AssertionError, "f16 attention as MatMul/Softmax (the Attention op composes the "
            "same for f16): llvm's f16 arithmetic rounds 2 of 192 values 1 ulp away from "
            "the expected (rtol 1e-3)"),
    },
}


def _dtypes(model) -> set[int]:
    g = model.graph
    codes = {v.type.tensor_type.elem_type for v in list(g.input) + list(g.output)
             if v.type.HasField("tensor_type")}
    codes |= {t.data_type for t in g.initializer}
    codes |= {a.i for n in g.node for a in n.attribute if a.name == "to"}
    return codes


with warnings.catch_warnings():  # the generators warn about their own overflow casts
    warnings.simplefilter("ignore")
    CASES = load_model_tests(kind="node")

REFUSED = {}      # case -> why the importer refuses it (an op, domain or opset it lacks)
DTYPE_XFAIL = {}  # case -> the dtypes it uses that the IR lacks (import raises UnsupportedOpError)
for c in CASES:
    try:
        supported_model(c.model)
    except UnsupportedOpError as e:
        REFUSED[c.name] = str(e)
        continue
    bad = sorted(TensorProto.DataType.Name(d) for d in _dtypes(c.model) - set(ONNX_DTYPES))
    if bad:
        DTYPE_XFAIL[c.name] = f"dtype {', '.join(bad)} is not in tensorc's IR"


def expected_failure(case: str, backend: str = "numpy"):
    """(the error, the reason) when `case` is an xfail on `backend`, else None."""
    why = REFUSED.get(case) or DTYPE_XFAIL.get(case)
    if why:
        return UnsupportedOpError, why
    table = {**XFAIL, **BACKEND_XFAIL.get(backend, {})}
    return next((why for pattern, why in table.items() if re.match(pattern, case)), None)


BACKENDS = [TensorcBackend] + [TensorcLLVMBackend] * ("llvm" in available_backends())
_included = {f"{c.name}_cpu" for c in CASES}
for _backend in BACKENDS:
    _suite = onnx.backend.test.BackendTest(_backend, __name__)
    _suite.include("^(" + "|".join(re.escape(c.name) for c in CASES) + ")_cpu$")
    for _cls in _suite.test_cases.values():
        for _name in [k for k in vars(_cls) if k.startswith("test_")]:
            if _name not in _included:   # the runner would add the rest as skips
                delattr(_cls, _name)
                continue
            _why = expected_failure(_name.removesuffix("_cpu"), _backend.name)
            if _why:
                setattr(_cls, _name, pytest.mark.xfail(raises=_why[0], reason=_why[1],
                                                       strict=True)(getattr(_cls, _name)))
        _cls.__name__ = _cls.__qualname__ = f"{_cls.__name__}_{_backend.name}"
        globals()[_cls.__name__] = _cls


def test_case_selection_is_broad():
    """Guard against an include pattern that silently selects nothing, and against a
    refusal list that swallows cases the importer claims."""
    ops = {n.op_type for c in CASES for n in c.model.graph.node}
    assert len(CASES) > 1800 and len(ops) > 150, (len(CASES), len(ops))
    assert len(CASES) - len(REFUSED) > 1300, len(REFUSED)
    assert all("unsupported ONNX op" in why or "opset" in why for why in REFUSED.values())
