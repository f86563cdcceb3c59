"""Pass counts on the official ONNX node tests (every case the installed onnx generates:
1,884 with onnx 1.23), for ONNX Runtime and for tensorc's backends, on the same list
and with the same comparison as `tests/test_onnx_conformance.py` (onnx's BackendTest:
each case's rtol/atol).

    python tools/onnx_conformance.py [--backends ort,numpy,llvm] [-k REGEX] [--list-failures]

Prints, per backend, how many cases pass, how many fail at import or session creation
(tensorc: `UnsupportedOpError`, the importer's refusal; ORT: no kernel, or a model it
rejects) and how many run but give other numbers or fail at run time. The pytest file
is what guards tensorc's figures (strict xfails, each with its reason); this script
gives them side by side with ONNX Runtime's.
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import re
import sys
import time
import warnings

import numpy as np
from onnx import TensorProto, helper
from onnx.backend.test.loader import load_model_tests
from onnx.backend.test.runner import Runner, _normalize_tensor

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

# numpy types (ml_dtypes) that ONNX Runtime's Python API cannot take or give: passed and
# read as raw bytes of the same width (byte-sized float8, 2-byte bfloat16)
_ONNX_CODE = {}
for _code in (TensorProto.BFLOAT16, TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E4M3FNUZ,
              TensorProto.FLOAT8E5M2, TensorProto.FLOAT8E5M2FNUZ, TensorProto.FLOAT8E8M0):
    _ONNX_CODE[np.dtype(helper.tensor_dtype_to_np_dtype(_code))] = _code


def _ort_run(model, inputs, expected):
    import ctypes

    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    try:
        sess = ort.InferenceSession(model.SerializeToString(), opts,
                                    providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001  (ORT raises its own exception types)
        raise _Refused(str(e)) from None
    feeds = {}
    for i, x in zip(sess.get_inputs(), inputs, strict=False):
        x = np.asarray(x) if isinstance(x, np.generic) else x   # 0-d arrays, not scalars
        code = _ONNX_CODE.get(getattr(x, "dtype", None))
        if code is not None:   # bfloat16, float8: numpy types ORT's Python API lacks
            x = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
                x.view(f"u{x.dtype.itemsize}"), code)
        feeds[i.name] = x
    if not any(isinstance(x, ort.OrtValue) for x in feeds.values()) and \
            not any(getattr(e, "dtype", None) in _ONNX_CODE for e in expected):
        return sess.run(None, feeds)
    feeds = {k: v if isinstance(v, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(v)
             for k, v in feeds.items()}
    outs = []
    for v, want in zip(sess.run_with_ort_values(None, feeds), expected, strict=False):
        dt = getattr(want, "dtype", None)
        if dt in _ONNX_CODE:   # read the raw bytes as the expected type
            raw = ctypes.string_at(v.data_ptr(), v.tensor_size_in_bytes())
            outs.append(np.frombuffer(raw, dtype=dt).reshape(v.shape()))
        else:
            outs.append(v.numpy())
    return outs


class _Refused(Exception):
    pass


def _tensorc_run(backend_cls):
    from tensorc.errors import UnsupportedOpError

    def run(model, inputs, expected):  # noqa: ARG001
        try:
            rep = backend_cls.prepare(model)
            return rep.run(inputs)
        except UnsupportedOpError as e:
            raise _Refused(str(e)) from None
    return run


def runners(names: list[str]):
    from tensorc.frontend.onnx.backend import TensorcBackend, TensorcLLVMBackend
    table = {"ort": _ort_run, "numpy": _tensorc_run(TensorcBackend),
             "llvm": _tensorc_run(TensorcLLVMBackend)}
    return {n: table[n] for n in names}


def check(run, case) -> str:
    """'pass', 'refused' or 'fail' for one case."""
    try:
        for inputs, expected in case.data_sets:
            inputs = [_normalize_tensor(x) for x in inputs]   # as onnx's runner does
            expected = [_normalize_tensor(x) for x in expected]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                got = run(case.model, inputs, expected)
            Runner.assert_similar_outputs(expected, got, rtol=case.rtol, atol=case.atol)
    except _Refused:
        return "refused"
    except Exception:  # noqa: BLE001  (wrong numbers, or a run-time failure)
        return "fail"
    return "pass"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default="ort,numpy,llvm")
    ap.add_argument("-k", default="", help="only cases whose name matches this regex")
    ap.add_argument("--list-failures", action="store_true")
    args = ap.parse_args(argv)
    logging.disable(logging.WARNING)   # llvm's per-case notes on reference fallbacks
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = [c for c in load_model_tests(kind="node") if re.search(args.k, c.name)]
    print(f"{len(cases)} official node cases")
    print("| backend | pass | refused at import | other failures | seconds |")
    print("| --- | --- | --- | --- | --- |")
    for name, run in runners(args.backends.split(",")).items():
        t0 = time.perf_counter()
        results = {c.name: check(run, c) for c in cases}
        counts = collections.Counter(results.values())
        print(f"| {name} | {counts['pass']} ({100 * counts['pass'] / len(cases):.1f} %) | "
              f"{counts['refused']} | {counts['fail']} | {time.perf_counter() - t0:.0f} |",
              flush=True)
        if args.list_failures:
            for c, r in results.items():
                if r != "pass":
                    print(f"    {r}: {c}")
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
