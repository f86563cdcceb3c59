"""Graph -> ONNX ModelProto.

Plain ops map to standard ONNX ops through `EXPORTERS` (one entry per IR op).
A composite op (its `OpDef` has a `decompose`) becomes a call of a model-local
function in the ``tensorc`` domain whose body is its decomposition, so any ONNX
runtime can run it. Symbolic dims stay symbolic: an attribute such as
``reshape(shape=[batch,seq,4,8])`` becomes a Shape/Concat computation on the input
that carries ``batch`` and ``seq``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tensorc.errors import TensorcError, UnsupportedOpError
from tensorc.ir import DTYPES, Dim, Graph, Node, TensorType, Value, dim_product
from tensorc.ops import get_op
from tensorc.types import _split_dim

from .values import ONNX_DTYPES

OPSET = 20          # Gelu is standard from 20; LayerNormalization from 17
IR_VERSION = 9      # the IR version that goes with opset 20
# Ops newer than OPSET: a graph using one is written at its opset (with its IR version).
NEWER = {"tensor_scatter": (24, 10)}
DOMAIN = "tensorc"  # where composite ops' functions live
ONNX_OF = {v: k for k, v in ONNX_DTYPES.items()}


def tensor_proto(array: np.ndarray, name: str) -> onnx.TensorProto:
    """numpy_helper.from_array, but a bfloat16 array is written from its bits (an onnx
    older than 1.17 does not know ml_dtypes' bfloat16)."""
    if array.dtype == DTYPES["bf16"]:
        return helper.make_tensor(name, TensorProto.BFLOAT16, array.shape,
                                  np.ascontiguousarray(array).view(np.uint16).tobytes(),
                                  raw=True)
    return numpy_helper.from_array(array, name)


class _Scope:
    """Where ONNX nodes are written: the main graph (constants become initializers)
    or a function body (constants become Constant nodes)."""

    def __init__(self, ex: _Exporter, sources: list[Value], is_function: bool):
        self.ex, self.is_function = ex, is_function
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.dim_cache: dict[tuple, str] = {}
        # where each symbol can be read at run time: (value name, axis)
        self.sources: dict[str, tuple[str, int]] = {}
        for v in sources:
            for axis, d in enumerate(v.type.shape):
                if isinstance(d, str):
                    self.sources.setdefault(d, (v.name, axis))

    def node(self, op_type: str, inputs: list[str], n_out: int = 1, outputs=None,
             domain: str = "", **attrs) -> list[str]:
        outputs = outputs or [self.ex.fresh(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outputs,
                                           name=self.ex.fresh("n_" + op_type), domain=domain,
                                           **{k: v for k, v in attrs.items() if v is not None}))
        return outputs

    def const(self, array: np.ndarray, hint: str = "const", name: str | None = None) -> str:
        name = name or self.ex.fresh(hint)
        tensor = tensor_proto(np.asarray(array), name)
        if self.is_function:
            self.node("Constant", [], outputs=[name], value=tensor)
        else:
            self.initializers.append(tensor)
        return name

    def ints(self, values) -> str:
        return self.const(np.asarray(values, np.int64), "ints")

    def _dim(self, d: Dim) -> str:
        """A 1-D int64 tensor [d] computed from the scope's inputs."""
        if d in self.sources:
            src, axis = self.sources[d]
            return self.node("Shape", [src], start=axis, end=axis + 1)[0]
        coef, syms = _split_dim(d)
        missing = [s for s in syms if s not in self.sources]
        if missing:
            raise TensorcError(f"cannot export dim {d}: symbol {missing[0]!r} is not a dim of "
                               "any input")
        parts = [self._dim(s) for s in syms.elements()]
        if coef != 1:
            parts.append(self.ints([coef]))
        out = parts[0]
        for p in parts[1:]:
            out = self.node("Mul", [out, p])[0]
        return out

    def dims(self, dims) -> str:
        """A 1-D int64 tensor holding `dims`; symbols are read from the inputs' shapes."""
        key = tuple(dims)
        if key not in self.dim_cache:
            if all(isinstance(d, int) for d in key):
                self.dim_cache[key] = self.ints(list(key))
            else:
                parts, run = [], []
                for d in key:
                    if isinstance(d, int):
                        run.append(d)
                        continue
                    if run:
                        parts.append(self.ints(run))
                        run = []
                    parts.append(self._dim(d))
                if run:
                    parts.append(self.ints(run))
                self.dim_cache[key] = parts[0] if len(parts) == 1 else \
                    self.node("Concat", parts, axis=0)[0]
        return self.dim_cache[key]

    def scalar_dim(self, d: Dim) -> str:
        if isinstance(d, int):
            return self.const(np.asarray(d, np.int64), "dim")
        return self.node("Squeeze", [self.dims([d]), self.ints([0])])[0]

    def write(self, graph: Graph) -> None:
        """Write the constants and nodes of `graph` (values keep their IR names)."""
        for v in graph.constants.values():
            self.const(v.data, name=v.name)
        for node in graph.nodes:
            ins = [v.name for v in node.inputs]
            outs = [v.name for v in node.outputs]
            EXPORTERS.get(node.op, _composite)(self, node, ins, outs)


class _Exporter:
    def __init__(self):
        self.used: set[str] = set()
        self.functions: dict[tuple, onnx.FunctionProto] = {}

    def fresh(self, hint: str) -> str:
        k, name = 0, hint
        while name in self.used:
            k += 1
            name = f"{hint}_{k}"
        self.used.add(name)
        return name

    def run(self, graph: Graph) -> onnx.ModelProto:
        bad = sorted({n.op for n in _all_nodes(graph)
                      if n.op not in EXPORTERS and get_op(n.op).decompose is None})
        if bad:
            raise UnsupportedOpError(f"cannot export op{'s' * (len(bad) > 1)} "
                                     f"{', '.join(bad)} to ONNX: no ONNX mapping and no "
                                     "decompose in the registry")
        self.used.update(graph.values())
        self.opset, self.ir_version = max([(OPSET, IR_VERSION)] + [
            NEWER[n.op] for n in _all_nodes(graph) if n.op in NEWER])
        scope = _Scope(self, graph.inputs, is_function=False)
        scope.write(graph)
        g = helper.make_graph(scope.nodes, graph.name,
                              [_value_info(v) for v in graph.inputs],
                              [_value_info(v) for v in graph.outputs],
                              initializer=scope.initializers)
        opsets = [helper.make_opsetid("", self.opset)]
        if self.functions:
            opsets.append(helper.make_opsetid(DOMAIN, 1))
        model = helper.make_model(g, opset_imports=opsets, producer_name="tensorc",
                                  functions=list(self.functions.values()))
        model.ir_version = self.ir_version
        return model

    def function(self, node: Node) -> str:
        """The local function computing composite `node` (made once per op, attrs and
        input types, since a decomposition may depend on all three)."""
        key = (node.op, tuple((k, str(v) if isinstance(v, Graph) else v)
                              for k, v in sorted(node.attrs.items())),
               tuple(str(v.type) for v in node.inputs))
        if key not in self.functions:
            body = Graph(node.op)
            params = [body.add_input(f"x{i}", v.type) for i, v in enumerate(node.inputs)]
            body.outputs = list(get_op(node.op).decompose(body, params, **node.attrs))
            scope = _Scope(self, params, is_function=True)
            scope.write(body)
            outs = []
            for v in body.outputs:  # a function output must come out of a node
                if v.producer is None:
                    outs.append(scope.node("Identity", [v.name])[0])
                else:
                    outs.append(v.name)
            name = self.fresh(node.op)
            opsets = [helper.make_opsetid("", self.opset), helper.make_opsetid(DOMAIN, 1)]
            self.functions[key] = helper.make_function(
                DOMAIN, name, [p.name for p in params], outs, scope.nodes, opsets)
        return self.functions[key].name


def _all_nodes(graph: Graph):
    for n in graph.nodes:
        yield n
        for v in n.attrs.values():
            if isinstance(v, Graph):
                yield from _all_nodes(v)


def _value_info(v: Value) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(v.name, ONNX_OF[v.type.dtype], list(v.type.shape))


def to_model(graph: Graph) -> onnx.ModelProto:
    """The ONNX model of `graph`: opset 20 (24 for a graph with a TensorScatter), composite
    ops as local functions."""
    return _Exporter().run(graph)


# --- one exporter per IR op --------------------------------------------------------------

Exporter = Callable[[_Scope, Node, list[str], list[str]], None]


def _composite(sc: _Scope, node: Node, ins, outs):
    sc.node(sc.ex.function(node), ins, outputs=outs, domain=DOMAIN)


def _same(op_type: str, **fixed) -> Exporter:
    def ex(sc, node, ins, outs):
        sc.node(op_type, ins, outputs=outs, **fixed)
    return ex


def _scalar_like(sc: _Scope, value, v: Value) -> str:
    return sc.const(np.asarray(value, v.type.np_dtype), "scalar")


def _rsqrt(sc, node, ins, outs):
    sc.node("Reciprocal", sc.node("Sqrt", ins), outputs=outs)


def _reshape(sc, node, ins, outs):
    shape = node.attrs["shape"]
    sc.node("Reshape", [ins[0], sc.dims(shape)], outputs=outs,
            allowzero=1 if 0 in shape else None)


def _transpose(sc, node, ins, outs):
    sc.node("Transpose", ins, outputs=outs, perm=node.attrs["perm"])


def _axis(op_type: str) -> Exporter:
    return lambda sc, node, ins, outs: sc.node(op_type, ins, outputs=outs,
                                               axis=node.attrs["axis"])


def _split(sc, node, ins, outs):
    sc.node("Split", [ins[0], sc.ints(node.attrs["sizes"])], outputs=outs,
            axis=node.attrs["axis"])


def _slice(sc, node, ins, outs):
    a = node.attrs
    extra = [sc.ints(a["axes"]) if a["axes"] is not None else "",
             sc.ints(a["steps"]) if a["steps"] is not None else ""]
    while extra and not extra[-1]:
        extra.pop()
    sc.node("Slice", [ins[0], sc.dims(a["starts"]), sc.dims(a["ends"])] + extra, outputs=outs)


def _expand(sc, node, ins, outs):
    sc.node("Expand", [ins[0], sc.dims(node.attrs["shape"])], outputs=outs)


def _axes_input(op_type: str) -> Exporter:
    def ex(sc, node, ins, outs):
        axes = node.attrs["axes"]
        sc.node(op_type, ins + ([sc.ints(axes)] if axes is not None else []), outputs=outs,
                keepdims=int(node.attrs["keepdims"]) if "keepdims" in node.attrs else None)
    return ex


def _full(sc, node, ins, outs):
    a = node.attrs
    value = tensor_proto(np.asarray([a["value"]], TensorType((), a["dtype"]).np_dtype), "value")
    sc.node("ConstantOfShape", [sc.dims(a["shape"])], outputs=outs, value=value)


def _range(sc, node, ins, outs):
    a = node.attrs
    args = [sc.scalar_dim(a["start"][0]), sc.scalar_dim(a["limit"][0]),
            sc.const(np.asarray(a["delta"], np.int64), "delta")]
    if a["dtype"] == "i64":
        sc.node("Range", args, outputs=outs)
    else:
        sc.node("Cast", sc.node("Range", args), outputs=outs, to=ONNX_OF[a["dtype"]])


def _dims(sc, node, ins, outs):
    a = node.attrs
    flat = sc.dims(a["values"])
    if a["dtype"] != "i64":
        flat = sc.node("Cast", [flat], to=ONNX_OF[a["dtype"]])[0]
    sc.node("Reshape", [flat, sc.ints(a["shape"])], outputs=outs)


def _trilu(sc, node, ins, outs):
    k = sc.const(np.asarray(node.attrs["k"], np.int64), "k")
    sc.node("Trilu", [ins[0], k], outputs=outs, upper=int(node.attrs["upper"]))


def _tensor_scatter(sc, node, ins, outs):
    cache, update, index = ins
    if node.inputs[2].type.dtype != "i64":   # ONNX takes int64 write indices only
        index = sc.node("Cast", [index], to=ONNX_OF["i64"])[0]
    sc.node("TensorScatter", [cache, update, index], outputs=outs, axis=node.attrs["axis"])


def _cast(sc, node, ins, outs):
    sc.node("Cast", ins, outputs=outs, to=ONNX_OF[node.attrs["dtype"]])


def _clip(sc, node, ins, outs):
    x = node.inputs[0]
    bounds = [_scalar_like(sc, node.attrs[k], x) if node.attrs[k] is not None else ""
              for k in ("min", "max")]
    while bounds and not bounds[-1]:
        bounds.pop()
    sc.node("Clip", ins + bounds, outputs=outs)


def _gelu(sc, node, ins, outs):
    sc.node("Gelu", ins, outputs=outs, approximate=node.attrs["approximate"])


def _argmax(sc, node, ins, outs):
    sc.node("ArgMax", ins, outputs=outs, axis=node.attrs["axis"],
            keepdims=int(node.attrs["keepdims"]))


def _topk(sc, node, ins, outs):
    sc.node("TopK", [ins[0], sc.ints([node.attrs["k"]])], outputs=outs,
            axis=node.attrs["axis"], largest=int(node.attrs["largest"]), sorted=1)


def _scatter(sc, node, ins, outs):
    """ScatterElements over the slices: the indices flattened to the axis and expanded
    over every other dim of the updates (reshaped to match)."""
    data, idx, _ = node.inputs
    rank, ax = data.type.rank, node.attrs["axis"] % data.type.rank
    m = dim_product(idx.type.shape)
    upd = sc.node("Reshape", [ins[2], sc.dims(data.type.shape[:ax] + (m,) +
                                              data.type.shape[ax + 1:])])[0]
    where = sc.node("Reshape", [ins[1], sc.dims([1] * ax + [m] + [1] * (rank - ax - 1))])[0]
    where = sc.node("Expand", [where, sc.node("Shape", [upd])[0]])[0]
    sc.node("ScatterElements", [ins[0], where, upd], outputs=outs, axis=ax,
            reduction=node.attrs["reduction"])


def _layer_norm(sc, node, ins, outs):
    x, axis = node.inputs[0], node.attrs["axis"]
    if len(ins) == 1:  # ONNX needs a scale
        norm = x.type.shape[axis % x.type.rank:]
        if not all(isinstance(d, int) for d in norm):
            raise TensorcError(f"{node.where}: cannot export layer_norm without weight over "
                               f"symbolic dims {list(norm)}")
        ins = ins + [sc.const(np.ones(norm, x.type.np_dtype), "ones")]
    sc.node("LayerNormalization", ins, outputs=outs, axis=axis, epsilon=node.attrs["eps"])


def _conv2d(sc, node, ins, outs):
    a = node.attrs
    sc.node("Conv", ins, outputs=outs, kernel_shape=list(node.inputs[1].type.shape[2:]),
            strides=a["strides"], pads=a["pads"], dilations=a["dilations"], group=a["group"])


# --- quantization: QDQ, MatMulInteger, DynamicQuantizeLinear ----------------------------
# The IR's scale and zero point broadcast against the tensor; ONNX's are a scalar (per
# tensor) or 1-D along `axis`. A parameter with one non-1 dim is written as 1-D + axis, an
# all-ones one as a scalar; any other shape (ONNX has no general broadcast here) is the
# op's decomposition, a local function, as for composite ops.

def _param_axis(x: TensorType, p: TensorType):
    """(axis, per_axis) for parameter type `p` against `x`: axis None for per tensor;
    None overall if ONNX cannot say it."""
    big = [i for i, d in enumerate(p.shape) if d != 1]
    if not big:
        return None, False
    if len(big) > 1:
        return None
    return big[0] + x.rank - p.rank, True


def _param(sc: _Scope, name: str, p: TensorType, per_axis: bool) -> str:
    """A broadcast parameter as ONNX's scalar or 1-D tensor."""
    if p.rank == (1 if per_axis else 0):
        return name
    return sc.node("Reshape", [name, sc.ints([-1] if per_axis else [])])[0]


def _qdq(sc: _Scope, node: Node, ins, outs, kinds) -> None:
    """`kinds` ("QuantizeLinear" and/or "DequantizeLinear") on x with the node's scale and
    zero point; the decomposition where ONNX cannot hold the parameters."""
    x, s, _ = node.inputs
    where = _param_axis(x.type, s.type)
    if where is None or x.type.dtype == "i32":   # ONNX's int32 zero point must be 0
        return _composite(sc, node, ins, outs)
    axis, per_axis = where
    scale, zp = (_param(sc, n, s.type, per_axis) for n in ins[1:])
    cur = ins[0]
    for k, kind in enumerate(kinds):
        cur = sc.node(kind, [cur, scale, zp], outputs=outs if k == len(kinds) - 1 else None,
                      axis=axis if per_axis else None)[0]


def _quantize(sc, node, ins, outs):
    _qdq(sc, node, ins, outs, ["QuantizeLinear"])


def _dequantize(sc, node, ins, outs):
    _qdq(sc, node, ins, outs, ["DequantizeLinear"])


def _fake_quantize(sc, node, ins, outs):
    _qdq(sc, node, ins, outs, ["QuantizeLinear", "DequantizeLinear"])


def _matmul_integer(sc, node, ins, outs):
    """MatMulInteger: A's zero point per tensor (ONNX Runtime takes no other), B's per
    tensor or per column ([N]); anything else is the decomposition."""
    a, b, *zps = node.inputs
    args = ins[:2]
    for k, (x, z) in enumerate(zip((a, b), zps, strict=False)):
        where = _param_axis(x.type, z.type)
        if where is None or (where[1] and (k == 0 or x.type.rank < 2 or
                                           where[0] != x.type.rank - 1)):
            return _composite(sc, node, ins, outs)
        args.append(_param(sc, ins[2 + k], z.type, where[1]))
    sc.node("MatMulInteger", args, outputs=outs)


def _quant_params(sc, node, ins, outs):
    """u8 over every axis is DynamicQuantizeLinear's scale and zero point (its quantized
    output unused); other axes and i8 are the decomposition."""
    (x,) = node.inputs
    axes = node.attrs["axes"]
    if node.attrs["dtype"] != "u8" or (
            axes is not None and {a % x.type.rank for a in axes} != set(range(x.type.rank))):
        return _composite(sc, node, ins, outs)
    _, scale, zp = sc.node("DynamicQuantizeLinear", ins, n_out=3)
    ones = sc.ints([1] * x.type.rank)
    for src, out in zip((scale, zp), outs, strict=True):
        sc.node("Reshape", [src, ones], outputs=[out])


EXPORTERS: dict[str, Exporter] = {
    **{op: _same(t) for op, t in {
        "neg": "Neg", "abs": "Abs", "exp": "Exp", "log": "Log", "sqrt": "Sqrt",
        "reciprocal": "Reciprocal", "tanh": "Tanh", "erf": "Erf", "sigmoid": "Sigmoid",
        "relu": "Relu", "sin": "Sin", "cos": "Cos", "floor": "Floor", "round": "Round",
        "logical_not": "Not",
        "add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "pow": "Pow",
        "maximum": "Max", "minimum": "Min", "equal": "Equal", "less": "Less",
        "less_equal": "LessOrEqual", "greater": "Greater", "greater_equal": "GreaterOrEqual",
        "logical_and": "And", "logical_or": "Or", "where": "Where", "matmul": "MatMul",
    }.items()},
    "rsqrt": _rsqrt, "gelu": _gelu, "cast": _cast, "clip": _clip,
    "reshape": _reshape, "transpose": _transpose, "concat": _axis("Concat"),
    "split": _split, "slice": _slice, "expand": _expand, "gather": _axis("Gather"),
    "squeeze": _axes_input("Squeeze"), "unsqueeze": _axes_input("Unsqueeze"),
    "full": _full, "range": _range, "dims": _dims, "trilu": _trilu,
    "reduce_sum": _axes_input("ReduceSum"), "reduce_mean": _axes_input("ReduceMean"),
    "reduce_max": _axes_input("ReduceMax"), "reduce_min": _axes_input("ReduceMin"),
    "reduce_prod": _axes_input("ReduceProd"), "topk": _topk, "scatter": _scatter,
    "argmax": _argmax, "softmax": _axis("Softmax"), "log_softmax": _axis("LogSoftmax"),
    "layer_norm": _layer_norm, "conv2d": _conv2d, "tensor_scatter": _tensor_scatter,
    "quantize": _quantize, "dequantize": _dequantize, "fake_quantize": _fake_quantize,
    "matmul_integer": _matmul_integer, "quant_params": _quant_params,
}
