"""Quantized ONNX models made by ONNX Runtime's own tools, against ONNX Runtime.

Float models (tensorc's exports of the zoo's tiny `gpt` and `bert`, and a small conv net
built with onnx.helper) are quantized at test time by `onnxruntime.quantization`:
`quantize_dynamic` (per tensor and per channel, QInt8 and QUInt8 weights) and
`quantize_static` with a calibration reader (QDQ and QOperator formats, per tensor and
per channel). Then:

- every quantization node (QuantizeLinear, DynamicQuantizeLinear, MatMulInteger,
  ConvInteger, QLinearMatMul, QLinearConv, DequantizeLinear) fed the values ONNX Runtime
  computed for its inputs gives ORT's output bit for bit, on numpy and llvm;
- the whole model's integer values equal ORT's (run node by node, graph optimizations
  off), and its float outputs are within 1e-5 relative of that and of ORT's default
  session (which fuses QDQ pairs and dynamic quantization into its own kernels).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import tensorc
from tensorc.backends import available_backends, get_backend
from tensorc.frontend import onnx as tx

oq = pytest.importorskip("onnxruntime.quantization")

BACKENDS = ["numpy"] + ["llvm"] * ("llvm" in available_backends())
QUANT_NODES = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger",
               "ConvInteger", "QLinearMatMul", "QLinearConv"}


# --- the float models and their quantized versions ------------------------------------

def _convnet() -> tuple[onnx.ModelProto, list[dict]]:
    """Conv(3->4, 3x3, pad 1) + bias, Relu, Conv(4->6, 3x3, stride 2) + bias, Relu,
    Flatten, MatMul + Add: the ops static and dynamic quantization rewrite."""
    rng = np.random.default_rng(0)
    F = TensorProto.FLOAT

    def init(name, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32),
                                       name)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Flatten", ["r2"], ["f"]),
        helper.make_node("MatMul", ["f", "w3"], ["m"]),
        helper.make_node("Add", ["m", "b3"], ["y"]),
    ]
    g = helper.make_graph(nodes, "convnet", [helper.make_tensor_value_info("x", F, [2, 3, 9, 9])],
                          [helper.make_tensor_value_info("y", F, [2, 10])],
                          initializer=[init("w1", 4, 3, 3, 3), init("b1", 4),
                                       init("w2", 6, 4, 3, 3), init("b2", 6),
                                       init("w3", 6 * 4 * 4, 10), init("b3", 10)])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    feeds = [{"x": rng.standard_normal((2, 3, 9, 9)).astype(np.float32)} for _ in range(5)]
    return model, feeds


def _zoo(name: str) -> tuple[onnx.ModelProto, list[dict]]:
    model = tensorc.models.get(name)
    feeds = [model.example_inputs(batch=2, seed=s) for s in range(5)]
    return tx.to_model(tensorc.trace(model, **feeds[0])), feeds


FLOAT_MODELS = {"gpt": lambda: _zoo("gpt"), "bert": lambda: _zoo("bert"), "convnet": _convnet}


class _Reader(oq.CalibrationDataReader):
    def __init__(self, feeds):
        self.it = iter(feeds)

    def get_next(self):
        return next(self.it, None)


SCHEMES = {
    "dynamic_s8": dict(per_channel=False, weight_type="QInt8"),
    "dynamic_s8_per_channel": dict(per_channel=True, weight_type="QInt8"),
    "dynamic_u8": dict(per_channel=False, weight_type="QUInt8"),
    "dynamic_u8_per_channel": dict(per_channel=True, weight_type="QUInt8"),
    "static_qdq": dict(quant_format="QDQ"),
    "static_qdq_per_channel": dict(quant_format="QDQ", per_channel=True),
    "static_qoperator": dict(quant_format="QOperator"),
    "static_qoperator_per_channel": dict(quant_format="QOperator", per_channel=True),
}
_CACHE: dict = {}


def quantized(name: str, scheme: str, tmp: str) -> tuple[onnx.ModelProto, list[dict]]:
    """The float model `name` quantized by ONNX Runtime's tool with `scheme`."""
    key = (name, scheme)
    if key not in _CACHE:
        model, feeds = FLOAT_MODELS[name]()
        src, dst = f"{tmp}/{name}.onnx", f"{tmp}/{name}_{scheme}.onnx"
        onnx.save(model, src)
        opts = dict(SCHEMES[scheme])
        if scheme.startswith("dynamic"):
            oq.quantize_dynamic(src, dst, per_channel=opts["per_channel"],
                                weight_type=getattr(oq.QuantType, opts["weight_type"]))
        else:
            oq.quantize_static(src, dst, _Reader(feeds[1:]),
                               quant_format=getattr(oq.QuantFormat, opts["quant_format"]),
                               per_channel=opts.get("per_channel", False),
                               activation_type=oq.QuantType.QUInt8,
                               # the contractions: a masked score's range is -inf
                               op_types_to_quantize=["MatMul", "Conv", "Gemm"],
                               weight_type=oq.QuantType.QInt8)
        _CACHE[key] = (onnx.load(dst), feeds[:1])
    return _CACHE[key]


CASES = [(m, s) for m in FLOAT_MODELS for s in SCHEMES]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return str(tmp_path_factory.mktemp("quant"))


# --- running ---------------------------------------------------------------------------

def _ort_int8_exact() -> bool:
    """Whether ONNX Runtime's u8 x s8 integer kernels are exact here: on x86 without
    VNNI (AVX2, e.g. Zen 3) MLAS sums pairs of products in int16 (vpmaddubsw), which
    saturates, so its MatMulInteger and QLinear* outputs are not the exact answer."""
    import platform
    if platform.machine() not in ("x86_64", "AMD64"):
        return True
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return True
    return "avx512_vnni" in flags or "avx_vnni" in flags


ORT_INT8_EXACT = _ort_int8_exact()


def _ort(model: onnx.ModelProto, feeds: dict, optimize: bool = False) -> dict:
    """ONNX Runtime's outputs. A model whose integer products have signed 8-bit
    operands is skipped (with the reason) where ORT's saturate (`_ort_int8_exact`):
    ORT is no exact answer there, and these tests compare bit for bit."""
    ops = {n.op_type for n in model.graph.node}
    products = ops & {"MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv"} or \
        optimize and "DequantizeLinear" in ops   # ORT fuses QDQ into its integer kernels
    if not ORT_INT8_EXACT and products and any(t.data_type == TensorProto.INT8
                                                 for t in _tensors(model)):
        pytest.skip("ONNX Runtime's u8 x s8 kernels saturate on this host (x86 without "
                    "VNNI): no exact answer to compare with")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, feeds), strict=True))


def _tensors(model: onnx.ModelProto):
    """The model's constant tensors and its typed values (as (data_type,) holders)."""
    yield from model.graph.initializer
    for n in model.graph.node:
        yield from (a.t for a in n.attribute if a.HasField("t"))
    for v in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        if v.type.HasField("tensor_type"):
            yield TensorProto(data_type=v.type.tensor_type.elem_type)


def _tensorc(model: onnx.ModelProto, feeds: dict, backend: str) -> dict:
    graph = tx.from_model(model)
    out = get_backend(backend).compile(graph)(**feeds)
    out = out if isinstance(out, tuple) else (out,)
    return {o.name: a for o, a in zip(model.graph.output, out, strict=True)}


def _types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    return {v.name: v.type.tensor_type.elem_type
            for v in list(g.input) + list(g.value_info) + list(g.output)}


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """`model` with `names` (intermediate values) added to its outputs."""
    types = _types(model)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    have = {o.name for o in out.graph.output}
    out.graph.output.extend(helper.make_tensor_value_info(n, types[n], None)
                            for n in names if n not in have)
    return out


def _integer_values(model: onnx.ModelProto) -> list[str]:
    """The integer outputs of the model's quantization nodes."""
    types = _types(model)
    return [o for n in model.graph.node if n.op_type in QUANT_NODES for o in n.output
            if o and types.get(o) in (TensorProto.UINT8, TensorProto.INT8, TensorProto.INT32)]


def _node_model(model: onnx.ModelProto, node: onnx.NodeProto, values: dict) -> tuple:
    """One node of `model` alone: its initializers kept, its other inputs graph inputs
    fed with `values`."""
    inits = {t.name: t for t in model.graph.initializer}
    types = _types(model)
    ins, feeds, used = [], {}, []
    for name in node.input:
        if not name or name in feeds:
            continue
        if name in inits:
            used.append(inits[name])
        else:
            ins.append(helper.make_tensor_value_info(name, types[name], values[name].shape))
            feeds[name] = values[name]
    outs = [helper.make_tensor_value_info(o, types[o], values[o].shape)
            for o in node.output if o]
    g = helper.make_graph([node], "one", ins, outs, initializer=used)
    one = helper.make_model(g, opset_imports=list(model.opset_import))
    one.ir_version = model.ir_version
    return one, feeds


# --- the tests -------------------------------------------------------------------------

@pytest.mark.parametrize("name,scheme", CASES)
def test_each_quantization_node_matches_ort_bit_for_bit(name, scheme, tmp):
    model, (feeds,) = quantized(name, scheme, tmp)
    nodes = [n for n in model.graph.node if n.op_type in QUANT_NODES]
    assert nodes, "the tool quantized nothing"
    every = [o for n in model.graph.node for o in n.output if o]
    values = {**feeds, **_ort(_with_outputs(model, every), feeds)}
    seen = set()
    for node in nodes:
        one, node_feeds = _node_model(model, node, values)
        seen.add(node.op_type)
        for backend in BACKENDS:
            got = _tensorc(one, node_feeds, backend)
            for o, arr in got.items():
                want = values[o]
                assert arr.dtype == want.dtype and arr.shape == want.shape, (node.name, o)
                assert np.array_equal(arr, want, equal_nan=arr.dtype.kind == "f"), (
                    f"{backend}: {node.op_type} {node.name!r} output {o!r}: "
                    f"{np.count_nonzero(arr != want)} of {arr.size} differ, max "
                    f"{np.abs(arr.astype(np.float64) - want).max()}")
    expect = {"dynamic": {"DynamicQuantizeLinear", "MatMulInteger"},
              "static_qdq": {"QuantizeLinear", "DequantizeLinear"},
              "static_qoperator": {"QuantizeLinear", "DequantizeLinear", "QLinearMatMul"}}
    assert next(v for k, v in expect.items() if scheme.startswith(k)) <= seen, seen
    if name == "convnet":
        conv = {"dynamic": "ConvInteger", "static_qoperator": "QLinearConv"}
        want = next((v for k, v in conv.items() if scheme.startswith(k)), None)
        assert want is None or want in seen, seen


def _rel(got, want) -> float:
    scale = max(float(np.abs(want).max()), 1e-6)
    return float(np.abs(got.astype(np.float64) - want).max()) / scale


def measure(name: str, scheme: str, tmp: str, backend: str) -> dict:
    """Float outputs' relative error against ORT run node by node and against its default
    (fused) session, and how many integer values differ from ORT's."""
    model, (feeds,) = quantized(name, scheme, tmp)
    ints = _integer_values(model)
    full = _with_outputs(model, ints)
    got = _tensorc(full, feeds, backend)
    plain, fused = _ort(full, feeds), _ort(model, feeds, optimize=True)
    floats = [o.name for o in model.graph.output]
    differ = sum(int(np.count_nonzero(got[o] != plain[o])) for o in ints)
    total = sum(plain[o].size for o in ints)
    return {"rel": max(_rel(got[o], plain[o]) for o in floats),
            "rel_fused": max(_rel(got[o], fused[o]) for o in floats),
            "int_differ": differ, "int_total": total}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,scheme", CASES)
def test_whole_model_against_ort(name, scheme, tmp, backend):
    """Every integer value of the model equals ORT's (node by node), and the float outputs
    are within 1e-5 relative of ORT, unoptimized and with its fused kernels (measured:
    at most 4e-7, from the float ops between the quantized ones)."""
    m = measure(name, scheme, tmp, backend)
    assert m["int_differ"] == 0, m
    assert m["rel"] <= 1e-5 and m["rel_fused"] <= 1e-5, m


# --- hand-made cases: exactness beyond f32, per-axis parameters, errors ---------------

def _one_node(op_type, inputs, inits, outputs, opset=21, **attrs):
    g = helper.make_graph([helper.make_node(op_type, [i[0] for i in inputs] + list(inits),
                                            [o[0] for o in outputs], **attrs)], "one",
                          [helper.make_tensor_value_info(*i) for i in inputs],
                          [helper.make_tensor_value_info(*o) for o in outputs],
                          initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _agree(model, feeds):
    want = _ort(model, feeds)
    for backend in BACKENDS:
        for o, arr in _tensorc(model, feeds, backend).items():
            assert arr.dtype == want[o].dtype
            np.testing.assert_array_equal(arr, want[o], err_msg=f"{backend} {o}")


def test_conv_integer_is_exact_beyond_f32():
    """Sums past 2**24 (64 channels a group x 3x3 of 252 * -127 reach 1.8e7), where an f32
    convolution would round: the i32 formulation equals ORT exactly; with zero points,
    padding, stride and two groups (ORT takes only per-tensor zero points here)."""
    rng = np.random.default_rng(1)
    x = np.full((1, 128, 6, 6), 255, np.uint8)
    x[0, :, 2:, 3:] = rng.integers(0, 256, (128, 4, 3))
    w = np.full((4, 64, 3, 3), -128, np.int8)
    w[1:] = rng.integers(-128, 128, (3, 64, 3, 3))
    inits = {"w": w, "xz": np.uint8(3), "wz": np.int8(-1)}
    model = _one_node("ConvInteger", [("x", TensorProto.UINT8, [1, 128, 6, 6])], inits,
                      [("y", TensorProto.INT32, None)], pads=[1, 1, 0, 1], strides=[2, 1],
                      group=2)
    want = _ort(model, {"x": x})["y"]
    assert np.abs(want).max() > 2**24
    _agree(model, {"x": x})


def test_per_axis_quantize_and_qlinear_matmul():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 4, 5)).astype(np.float32) * 3
    q = _one_node("QuantizeLinear", [("x", TensorProto.FLOAT, [3, 4, 5])],
                  {"s": np.array([0.01, 0.02, 0.05, 0.1], np.float32),
                   "z": np.array([-3, 0, 7, 120], np.int8)},
                  [("y", TensorProto.INT8, [3, 4, 5])], axis=1)
    _agree(q, {"x": x})
    a = rng.integers(0, 256, (2, 6, 7)).astype(np.uint8)
    mm = _one_node("QLinearMatMul", [("a", TensorProto.UINT8, [2, 6, 7])], {}, [], opset=21)
    inits = {"sa": np.float32(0.03), "za": np.uint8(130),
             "b": rng.integers(-128, 128, (7, 5)).astype(np.int8),
             "sb": rng.uniform(0.01, 0.05, 5).astype(np.float32),
             "zb": np.zeros(5, np.int8), "sy": np.float32(0.2), "zy": np.uint8(100)}
    node = helper.make_node("QLinearMatMul", ["a", "sa", "za", "b", "sb", "zb", "sy", "zy"],
                            ["y"])
    mm.graph.node[0].CopyFrom(node)
    mm.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in inits.items())
    mm.graph.output.append(helper.make_tensor_value_info("y", TensorProto.UINT8, None))
    _agree(mm, {"a": a})


def _hand_cases():
    """(id, model, feeds): attributes and parameter layouts the tools do not produce."""
    r = np.random.default_rng(5)
    U8, I8, I32, F = TensorProto.UINT8, TensorProto.INT8, TensorProto.INT32, TensorProto.FLOAT
    x = (r.standard_normal((4, 6)) * 50).astype(np.float32)
    q = r.integers(-128, 128, (4, 6)).astype(np.int8)
    yield "quantize-output_dtype", _one_node("QuantizeLinear", [("x", F, [4, 6])], {
        "s": np.float32(0.3)}, [("y", I8, [4, 6])], output_dtype=I8), {"x": x}
    yield "quantize-default-u8", _one_node("QuantizeLinear", [("x", F, [4, 6])], {
        "s": np.float32(0.3)}, [("y", U8, [4, 6])]), {"x": x}
    for axis, size in ((0, 4), (-1, 6)):
        yield f"dequantize-axis{axis}", _one_node("DequantizeLinear", [("q", I8, [4, 6])], {
            "s": r.uniform(0.01, 1, size).astype(np.float32),
            "z": r.integers(-9, 9, size).astype(np.int8)}, [("y", F, [4, 6])], axis=axis), {"q": q}
    yield "dequantize-int32", _one_node("DequantizeLinear", [("q", I32, [4, 6])], {
        "s": np.float32(0.001)}, [("y", F, [4, 6])]), {
        "q": r.integers(-10**6, 10**6, (4, 6)).astype(np.int32)}
    yield "matmulinteger-nd-zero-point", _one_node("MatMulInteger", [("a", U8, [2, 3, 5])], {
        "b": r.integers(0, 256, (2, 5, 4)).astype(np.uint8), "az": np.uint8(7),
        "bz": r.integers(0, 256, (2, 1, 4)).astype(np.uint8)}, [("y", I32, [2, 3, 4])]), {
        "a": r.integers(0, 256, (2, 3, 5)).astype(np.uint8)}
    yield "matmulinteger-s8-no-zero-points", _one_node("MatMulInteger", [("a", I8, [3, 5])], {
        "b": r.integers(-128, 128, (5, 4)).astype(np.int8)}, [("y", I32, [3, 4])]), {
        "a": r.integers(-128, 128, (3, 5)).astype(np.int8)}
    mm = {"sa": np.float32(0.03), "za": np.uint8(130),
          "b": r.integers(-128, 128, (2, 5, 4)).astype(np.int8),
          "sb": r.uniform(0.01, 0.05, (2, 1, 4)).astype(np.float32),
          "zb": np.zeros((2, 1, 4), np.int8), "sy": np.float32(0.2), "zy": np.uint8(100)}
    model = _one_node("QLinearMatMul", [("a", U8, [2, 3, 5])], {}, [("y", U8, None)])
    model.graph.node[0].input[:] = ["a", "sa", "za", "b", "sb", "zb", "sy", "zy"]
    model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in mm.items())
    yield "qlinearmatmul-nd-per-column", model, {
        "a": r.integers(0, 256, (2, 3, 5)).astype(np.uint8)}
    inits = {"xs": np.float32(0.02), "xz": np.uint8(120),
             "w": r.integers(-128, 128, (4, 3, 3, 3)).astype(np.int8),
             "ws": r.uniform(0.001, 0.01, 4).astype(np.float32), "wz": np.zeros(4, np.int8),
             "ys": np.float32(0.05), "yz": np.uint8(128),
             "B": r.integers(-5000, 5000, 4).astype(np.int32)}
    xq = {"x": r.integers(0, 256, (1, 3, 7, 7)).astype(np.uint8)}
    yield "qlinearconv-bias-per-channel", _one_node(
        "QLinearConv", [("x", U8, [1, 3, 7, 7])], inits, [("y", U8, None)],
        pads=[1, 1, 1, 1], strides=[2, 2]), xq
    inits = {k: v for k, v in inits.items() if k != "B"}
    inits["ws"], inits["wz"] = np.float32(0.004), np.int8(0)
    yield "qlinearconv-same-upper", _one_node(
        "QLinearConv", [("x", U8, [1, 3, 7, 7])], inits, [("y", U8, None)],
        auto_pad="SAME_UPPER", strides=[2, 2]), xq


@pytest.mark.parametrize("model,feeds", [pytest.param(m, f, id=i) for i, m, f in _hand_cases()])
def test_hand_made_cases_match_ort(model, feeds):
    _agree(model, feeds)


@pytest.mark.parametrize("op,attrs,inits,match", [
    ("QuantizeLinear", {"block_size": 2}, {"s": np.ones((2, 2), np.float32)},
     "blocked quantization"),
    ("QuantizeLinear", {"output_dtype": TensorProto.INT4}, {"s": np.float32(1)},
     "output_dtype INT4: only uint8 and int8"),
    ("DequantizeLinear", {}, {"s": np.float32(1), "z": np.int32(3)},
     "an int32 input's zero point must be 0"),
])
def test_unsupported_quantization_is_one_line(op, attrs, inits, match):
    from tensorc.errors import UnsupportedOpError
    dt = TensorProto.INT32 if op == "DequantizeLinear" else TensorProto.FLOAT
    model = _one_node(op, [("x", dt, [2, 4])], inits, [("y", TensorProto.UNDEFINED, None)],
                      **attrs)
    model.graph.output[0].type.tensor_type.elem_type = TensorProto.FLOAT
    with pytest.raises(UnsupportedOpError, match=match):
        tx.from_model(model)


# --- export: a tensorc graph with the quantization ops, run by ORT ---------------------

def test_quantized_graph_exports_and_ort_agrees():
    """Dynamic quantization written with tensorc's ops, exported: quant_params (u8, every
    axis) -> DynamicQuantizeLinear, quantize -> QuantizeLinear (a per-column weight scale
    as 1-D + axis), matmul_integer -> MatMulInteger, fake_quantize -> Quantize- and
    DequantizeLinear, round -> Round; i8 per-row quant_params and an i32 dequantize are
    local functions (their decompositions). ORT equals numpy bit for bit."""
    rng = np.random.default_rng(3)
    T = tensorc.TensorType
    g = tensorc.Graph("qmlp")
    x = g.add_input("x", T(("batch", 16), "f32"))
    w = g.add_constant("w", rng.standard_normal((16, 8)).astype(np.float32))
    ws = g.add_constant("ws", rng.uniform(0.01, 0.03, (1, 8)).astype(np.float32))
    wz = g.add_constant("wz", np.zeros((1, 8), np.int8))
    s, z = g.add_node("quant_params", [x])
    xq = g.add("quantize", x, s, z)
    wq = g.add("quantize", w, ws, wz)
    acc = g.add("matmul_integer", xq, wq, g.add("reshape", z, shape=[]),
                g.add("reshape", wz, shape=[8]))
    y = g.add("dequantize", acc, g.add("mul", s, ws), g.add_constant("z32", np.zeros((1, 8),
                                                                                     np.int32)))
    fq = g.add("fake_quantize", x, s, z)
    rs, rz = g.add_node("quant_params", [x], {"dtype": "i8", "axes": [1]})
    rq = g.add("quantize", x, rs, rz)
    r = g.add("round", g.add("mul", x, g.add_constant("three", np.float32(3))))
    g.outputs += [xq, acc, y, fq, rq, r]
    proto = tx.to_model(g)
    onnx.checker.check_model(proto, full_check=True)
    ops = {n.op_type for n in proto.graph.node}
    assert {"DynamicQuantizeLinear", "QuantizeLinear", "MatMulInteger", "DequantizeLinear",
            "Round", "quant_params", "dequantize"} <= ops, ops
    for batch in (3, 5):
        feeds = {"x": (rng.standard_normal((batch, 16)) * 2).astype(np.float32)}
        want = get_backend("numpy").compile(g)(**feeds)
        got = _ort(proto, feeds, optimize=True).values()
        for a, b in zip(got, want, strict=True):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)


def test_conv_integer_with_a_huge_kernel_is_refused():
    """One matmul per kernel offset: a 70x70 kernel would be 4,900 nodes."""
    from tensorc.errors import UnsupportedOpError
    model = _one_node("ConvInteger", [("x", TensorProto.UINT8, [1, 1, 70, 70])],
                      {"w": np.ones((1, 1, 70, 70), np.uint8)},
                      [("y", TensorProto.INT32, [1, 1, 1, 1])])
    with pytest.raises(UnsupportedOpError, match="70x70 kernel in 1 groups is 4900 integer"):
        tx.from_model(model)


@pytest.mark.parametrize("scheme", ["dynamic_s8_per_channel", "dynamic_s8", "static_qdq"])
def test_ort_quantized_gpt_runs_on_the_int8_gemm(scheme, tmp):
    """ONNX Runtime's dynamic files (MatMulInteger with a zero weight zero point, then
    Cast and Mul by a_scale * b_scale) reach llvm's int8 GEMM with the dequantize as its
    epilogue, not the generated i32 kernel; a static QDQ file does through `quantize`,
    which keeps the file's own activation integers and scales."""
    from tensorc.backends.llvm import LOWERING
    from tensorc.backends.lowering import lower
    from tensorc.passes import run_pipeline
    model, feeds = quantized("gpt", scheme, tmp)
    graph = run_pipeline(tx.from_model(model), "O2,quantize" if "qdq" in scheme else "O2")
    calls = [s for s in lower(graph, {}, **LOWERING).steps
             if getattr(s, "op", "") == "matmul_integer"]
    assert len(calls) == str(graph).count("matmul_integer(") > 0
    assert all({"row_scale", "col_scale"} & set(c.epilogue) for c in calls)
    got = get_backend("llvm").compile(graph)(**feeds[0])
    want = _ort(model, feeds[0])
    got = got if isinstance(got, tuple) else (got,)
    # the static file quantizes the logits too: a last-bit difference in the integer
    # path's float scaling moves a logit by one step of that grid (3.5e-3 here)
    bound = 0.05 if "qdq" in scheme else 1e-5
    for g, w in zip(got, want.values(), strict=True):
        assert _rel(g, w) < bound


@pytest.mark.parametrize("x_type,w_type,w_zero", [("uint8", "int8", False),
                                                  ("uint8", "uint8", True),
                                                  ("int8", "int8", True)])
def test_patch_conv_integer_is_one_integer_matmul(x_type, w_type, w_zero):
    """A ConvInteger whose windows tile the image (a ViT's patch embedding) is one
    matmul_integer of the patches, equal to ORT bit for bit."""
    rng = np.random.default_rng(3)
    xt, wt = np.dtype(x_type), np.dtype(w_type)

    def ints(dt, shape):
        info = np.iinfo(dt)
        return rng.integers(info.min, info.max + 1, shape).astype(dt)
    inits = {"w": ints(wt, (24, 3, 4, 4)), "zx": np.array(7, xt)}
    if w_zero:
        inits["zw"] = np.array(5, wt)
    elem = helper.np_dtype_to_tensor_dtype(xt)
    model = _one_node("ConvInteger", [("x", elem, [2, 3, 16, 12])], inits,
                      [("y", onnx.TensorProto.INT32, None)], opset=13,
                      strides=[4, 4], kernel_shape=[4, 4])
    feeds = {"x": ints(xt, (2, 3, 16, 12))}
    graph = tx.from_model(model)
    assert str(graph).count("matmul_integer(") == 1 and "conv" not in str(graph)
    want = _ort(model, feeds)["y"]
    for backend in ("numpy", "llvm"):
        np.testing.assert_array_equal(_tensorc(model, feeds, backend)["y"], want)
