"""ONNX ModelProto -> Graph: the import loop (opset and dtype checks, value names,
bindings, inputs and outputs); what each op does is its handler in `handlers.py`
(quantized ops: `quantized.py`; pooling, padding, instance/group norm: `spatial.py`;
Attention and RotaryEmbedding: `attention_ops.py`; losses: `losses.py`; If and Loop,
imported inline: `control.py`).

Handlers build IR ops through `_Importer.op`, which folds an op at import when all
its inputs are known: numbers (initializers, Constant nodes, small folded results) or
*dims* (`Sym`: a 1-D int tensor whose entries may be symbols, from Shape of an input
with a ``dim_param``).
That is how exporters' shape subgraphs (Shape -> Gather -> Concat -> Reshape, Range
from a shape, ConstantOfShape) become plain attributes such as
``reshape(shape=[batch,seq,4,8])`` that still run at any batch and sequence length.
"""

from __future__ import annotations

import re

import numpy as np
import onnx
from onnx import helper, numpy_helper

from tensorc.errors import ShapeError, TensorcError, UnsupportedOpError
from tensorc.ir import DTYPES, Dim, Graph, TensorType, Value
from tensorc.ops import get_op

from . import attention_ops, control, handlers, indexing, losses, quantized, spatial
from .values import (
    FOLD_LIMIT,
    MAX_OPSET,
    MIN_OPSET,
    NATIVE_OPSET,
    ONNX_DTYPES,
    SYM_ARITH,
    SYM_MOVES,
    Entry,
    NeedsConstantError,
    Sym,
    _CannotFold,
    _clean,
    _dtype,
    _known,
    _short,
    onnx_dtype,
)

# ONNX op type -> its handler
HANDLERS = {**handlers.HANDLERS, **quantized.HANDLERS, **spatial.HANDLERS, **indexing.HANDLERS,
            **attention_ops.HANDLERS, **losses.HANDLERS, **control.HANDLERS}
# ops that onnx's version converter renames when it upgrades an old model to NATIVE_OPSET
RENAMED_ON_UPGRADE = {"Upsample": "Resize", "Scatter": "ScatterElements"}

# --- the importer ---------------------------------------------------------------------

class OnnxNode:
    """One ONNX node as handlers see it."""

    def __init__(self, cx: _Importer, proto: onnx.NodeProto, index: int):
        self.cx, self.proto = cx, proto
        self.type = proto.op_type
        self.name = proto.name or f"#{index}"
        self.where = f"{proto.op_type} node {self.name!r}"
        self.attrs = {a.name: _short(helper.get_attribute_value(a)) for a in proto.attribute}
        self.inputs = list(proto.input)
        self.outputs = list(proto.output)

    def attr(self, name: str, default=None):
        v = self.attrs.get(name, default)
        return v.decode() if isinstance(v, bytes) else v

    def has(self, k: int) -> bool:
        return k < len(self.inputs) and self.inputs[k] != ""

    def x(self, k: int) -> Entry | None:
        return self.cx.entry(self.inputs[k]) if self.has(k) else None

    def consts(self, k: int, what: str, default=None) -> list | None:
        """Input k as a Python list of known ints/dims (it must be known at import)."""
        if not self.has(k):
            return default
        e = self.x(k)
        if isinstance(e, Value):
            src = self.cx.graph_inputs_of(e)
            raise NeedsConstantError(
                f"{self.where}: its {what} (input {self.inputs[k]!r}) is computed at run "
                f"time{' from graph input ' + ', '.join(map(repr, src)) if src else ''}; "
                "tensorc needs it known at import (a constant, or computed from shapes "
                "without needing a symbolic dim's value)", src)
        arr = e.dims if isinstance(e, Sym) else e
        return [d if isinstance(d, str) else d.item() if hasattr(d, "item") else d
                for d in np.asarray(arr).reshape(-1)]

    def const(self, k: int, what: str, default=None):
        vals = self.consts(k, what)
        if vals is None:
            return default
        if len(vals) != 1:
            raise ShapeError(f"{self.where}: {what} should be a scalar, got {vals}")
        return vals[0]

    def unsupported(self, why: str) -> UnsupportedOpError:
        return UnsupportedOpError(f"{self.where}: {why}")


class _Importer:
    def __init__(self, model: onnx.ModelProto, bind: dict[str, np.ndarray] | None):
        self.model = model
        self.graph = Graph(_clean(model.graph.name or "model"))
        self.env: dict[str, Entry] = {}
        self.materialized: dict[int, Value] = {}  # id(array) -> constant Value
        self.dim_values: dict[tuple, Value] = {}  # dims attributes -> their `dims` node
        self.names: dict[int, str] = {}           # id(array) -> initializer name
        self.input_names: dict[int, str] = {}     # id(graph input Value) -> its ONNX name
        self.bind = bind or {}
        self.loc: str | None = None
        self.scope = ("", "")  # the enclosing subgraphs: (error location, name prefix)
        self.names_init: set[str] = set()
        self.opset = 0

    # -- entries and values --
    def entry(self, name: str) -> Entry:
        try:
            return self.env[name]
        except KeyError:
            raise TensorcError(f"ONNX value {name!r} is used before it is defined "
                               f"({self.loc or 'graph outputs'})") from None

    def value(self, e: Entry) -> Value:
        """An IR value for an entry, adding known numbers as graph constants."""
        if isinstance(e, Value):
            return e
        if isinstance(e, Sym):  # dims used as data: a node reads them per call
            attrs = {"values": tuple(d if isinstance(d, str) else int(d)
                                     for d in e.dims.reshape(-1)),
                     "shape": e.dims.shape, "dtype": e.dtype}
            key = tuple(attrs.values())
            if key not in self.dim_values:
                (self.dim_values[key],) = self.graph.add_node("dims", [], attrs, loc=self.loc)
            return self.dim_values[key]
        key = id(e)
        if key not in self.materialized:
            hint = self.names.get(key, "c")
            self.materialized[key] = self.graph.add_constant(self.graph.fresh_name(hint), e)
        return self.materialized[key]

    def graph_inputs_of(self, v: Value) -> list[str]:
        """The ONNX names of the graph inputs that `v` is computed from (what a caller
        would bind to make it known at import)."""
        seen, stack, found = set(), [v], []
        while stack:
            x = stack.pop()
            if id(x) in seen:
                continue
            seen.add(id(x))
            if x.producer is not None:
                stack.extend(x.producer.inputs)
            elif id(x) in self.input_names:
                found.append(self.input_names[id(x)])
        return sorted(found)

    def op(self, op: str, *inputs: Entry, **attrs) -> Entry:
        return self.op_multi(op, *inputs, **attrs)[0]

    def op_multi(self, op: str, *inputs: Entry, **attrs) -> list[Entry]:
        """Apply an IR op: folded when its inputs are known, else appended as a node."""
        if all(not isinstance(x, Value) for x in inputs):
            folded = self._fold(op, inputs, attrs)
            if folded is not None:
                return folded
        return self.graph.add_node(op, [self.value(x) for x in inputs], attrs, loc=self.loc)

    def _fold(self, op: str, inputs, attrs) -> list[Entry] | None:
        opdef = get_op(op)
        attrs = opdef.complete_attrs(attrs, self.loc)
        types = [TensorType(x.dims.shape, x.dtype) if isinstance(x, Sym) else TensorType.of(x)
                 for x in inputs]
        try:
            out_types = opdef.infer(*types, **attrs)
        except ShapeError as e:
            raise ShapeError(f"{op} ({self.loc}): {e}") from None
        out_types = list(out_types) if isinstance(out_types, (list, tuple)) else [out_types]
        if any(isinstance(x, Sym) for x in inputs):
            arrays = [x.dims if isinstance(x, Sym) else x for x in inputs]
            try:
                if op in SYM_ARITH:
                    ints = [a.astype(object) for a in arrays]  # Python ints, not np.int64
                    outs = [np.frompyfunc(SYM_ARITH[op], 2, 1)(*ints)]
                elif op in SYM_MOVES:
                    outs = opdef.evaluate(arrays, attrs) if op != "cast" else [arrays[0]]
                else:
                    raise _CannotFold
            except _CannotFold:  # depends on a symbol's value: compute it at run time
                return None
            return [_known(np.asarray(o, dtype=object), t.dtype)
                    for o, t in zip(outs, out_types, strict=True)]
        if not all(t.is_static for t in out_types) or \
                sum(int(np.prod(t.shape)) for t in out_types) > FOLD_LIMIT:
            return None
        outs = opdef.evaluate(list(inputs), attrs)
        return [np.asarray(o).astype(t.np_dtype) for o, t in zip(outs, out_types, strict=True)]

    # -- the whole model --
    def run(self) -> Graph:
        g = self.model.graph
        self._check_opset()
        self._check_supported()
        inits = {t.name: t for t in g.initializer}
        for vi in g.input:
            if vi.name in inits:
                continue
            t = self._declared_type(vi, f"graph input {vi.name!r}")
            if vi.name in self.bind:
                arr = np.asarray(self.bind[vi.name])
                if arr.ndim != t.rank or any(isinstance(d, int) and d != k for d, k in
                                             zip(t.shape, arr.shape, strict=False)):
                    raise ShapeError(f"bound input {vi.name!r}: declared {t}, got "
                                     f"{list(arr.shape)}")
                self.env[vi.name] = arr.astype(t.np_dtype)
                continue
            self.env[vi.name] = self.graph.add_input(self.graph.fresh_name(_clean(vi.name)), t)
            self.input_names[id(self.env[vi.name])] = vi.name
        self.names_init = set(inits)
        declared = {vi.name: vi for vi in list(g.input) + list(g.value_info)}
        for name, t in inits.items():
            arr = self._tensor(t, f"initializer {name!r}")
            self.names[id(arr)] = self.graph.fresh_name(_clean(name))
            self.env[name] = arr
            if name in declared:  # old exporters list initializers as inputs too
                self._check_declared(arr, declared[name])
        self.run_nodes(g.node, declared)
        self.loc = None
        for vi in g.output:
            e = self.entry(vi.name)
            self._check_declared(e, vi)
            v = self.value(e)
            if v.producer is not None and v not in self.graph.outputs:
                self.graph.rename(v, _clean(vi.name))
            self.graph.outputs.append(v)
        return self.graph.verify()

    def run_nodes(self, nodes, declared: dict, scope: str = "", prefix: str = ""):
        """Import `nodes` in order into the graph; inside a subgraph (an If branch, one
        iteration of a Loop) `scope` prefixes error locations and `prefix` value names."""
        for i, proto in enumerate(nodes):
            n = OnnxNode(self, proto, i)
            self.loc = f"onnx {scope}{n.where}"
            try:
                outs = HANDLERS[n.type](self, n)
            except (ValueError, IndexError, KeyError, TypeError) as e:  # a malformed node
                raise TensorcError(f"{self.loc}: cannot import it ({type(e).__name__}: "
                                   f"{e})") from None
            except TensorcError as e:  # every import error names its node
                if n.where not in str(e):
                    e.args = (f"{self.loc}: {e}", *e.args[1:])
                raise
            wanted = [k for k, name in enumerate(n.outputs) if name]
            if wanted and wanted[-1] >= len(outs):
                raise n.unsupported(f"output {wanted[-1]} ({n.outputs[wanted[-1]]!r}) is not "
                                    "supported")
            for name, out in zip(n.outputs, outs, strict=False):
                if name:
                    self.env[name] = out
                    if isinstance(out, Value) and out.producer is not None \
                            and out.name.isdigit():  # keep the model's names for errors
                        self.graph.rename(out, prefix + _clean(name))
                    if name in declared:
                        self._check_declared(out, declared[name])

    def subgraph(self, g: onnx.GraphProto, bindings: dict[str, Entry], scope: str,
                 prefix: str) -> list[Entry]:
        """Import subgraph `g` inline: its formal inputs bound to `bindings`, names of
        the enclosing graphs visible (outer-scope references), its own names local to it.
        Returns its outputs' entries."""
        saved, saved_loc, saved_scope = self.env, self.loc, self.scope
        self.env = {**saved, **bindings}
        scope, prefix = saved_scope[0] + scope, saved_scope[1] + prefix
        self.scope = (scope, prefix)
        try:
            for t in g.initializer:
                self.env[t.name] = self._tensor(t, f"{scope}initializer {t.name!r}")
            self.run_nodes(g.node, {vi.name: vi for vi in g.value_info}, scope, prefix)
            self.loc = saved_loc
            outs = [self.entry(vi.name) for vi in g.output]
        finally:
            self.env, self.loc, self.scope = saved, saved_loc, saved_scope
        return outs

    def _check_opset(self):
        self.opset = _opset(self.model)
        if not NATIVE_OPSET <= self.opset <= MAX_OPSET:  # from_model upgrades older ones
            raise UnsupportedOpError(f"ONNX opset {self.opset} is not supported (supported: "
                                     f"{NATIVE_OPSET} to {MAX_OPSET}; from_model upgrades "
                                     f"opsets {MIN_OPSET} to {NATIVE_OPSET - 1})")

    def _check_supported(self):
        _check_ops(self.model)

    def _declared_type(self, vi: onnx.ValueInfoProto, where: str) -> TensorType:
        if not vi.type.HasField("tensor_type"):
            raise UnsupportedOpError(f"{where} is not a tensor")
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            raise TensorcError(f"{where} declares no shape; give it one (dims may be names "
                               "such as 'batch')")
        dims: list[Dim] = []
        for k, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            elif d.dim_param and re.fullmatch(r"(\d+\*)?[A-Za-z_][\w.]*(\*[A-Za-z_][\w.]*)*",
                                              d.dim_param):
                dims.append(d.dim_param)
            elif d.dim_param:
                dims.append(_clean(d.dim_param) if not d.dim_param[0].isdigit()
                            else "d_" + _clean(d.dim_param))
            else:
                dims.append(f"{_clean(vi.name)}_dim{k}")
        return TensorType(tuple(dims), onnx_dtype(tt.elem_type, where))

    def _check_declared(self, e: Entry, vi: onnx.ValueInfoProto):
        """The model's declared static dims must agree with what the ops compute."""
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type") or not tt.HasField("shape"):
            return
        got = e.type.shape if isinstance(e, Value) else (
            e.dims.shape if isinstance(e, Sym) else e.shape)
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        if len(dims) != len(got) or any(d is not None and isinstance(h, int) and d != h
                                        for d, h in zip(dims, got, strict=False)):
            want = "[" + ",".join("?" if d is None else str(d) for d in dims) + "]"
            raise ShapeError(f"value {vi.name!r}: the model declares shape {want} but its "
                             f"{'data has' if vi.name in self.names_init else 'ops compute'} "
                             f"[{','.join(map(str, got))}]")
        declared = ONNX_DTYPES.get(tt.elem_type)
        if declared and declared != _dtype(e):
            raise ShapeError(f"value {vi.name!r}: the model declares dtype {declared} but "
                             f"its ops compute {_dtype(e)}")

    def _tensor(self, t: onnx.TensorProto, where: str) -> np.ndarray:
        onnx_dtype(t.data_type, where)
        try:
            a = numpy_helper.to_array(t)
        except Exception as e:  # noqa: BLE001  (missing external data, bad raw bytes)
            raise TensorcError(f"{where}: cannot read its data ({e})") from None
        # an onnx older than 1.17 decodes bfloat16 to float32 (exactly): narrow it back
        return a.astype(DTYPES["bf16"]) if t.data_type == onnx.TensorProto.BFLOAT16 else a


def _all_nodes(g: onnx.GraphProto, where: str = ""):
    """(node, its name for messages) for every node of g and of its subgraphs."""
    for i, node in enumerate(g.node):
        name = where + (node.name or f"#{i}")
        yield node, name
        for a in node.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else
                        a.graphs if a.type == onnx.AttributeProto.GRAPHS else []):
                yield from _all_nodes(sub, f"{name} > {a.name} > ")


def _check_ops(model: onnx.ModelProto, renamed: dict[str, str] | None = None):
    """Every op (subgraphs included) must have a handler: the unsupported ones are
    listed all at once with their nodes."""
    bad: dict[str, list[str]] = {}
    for node, name in _all_nodes(model.graph):
        key = node.op_type if node.domain in ("", "ai.onnx") else \
            f"{node.domain}.{node.op_type}"
        if (renamed or {}).get(key, key) not in HANDLERS:
            bad.setdefault(key, []).append(name)
    if bad:
        raise UnsupportedOpError(
            f"unsupported ONNX op{'s' * (len(bad) > 1)}: " + "; ".join(
                f"{op} (node{'s' * (len(ns) > 1)} {', '.join(map(repr, ns[:8]))}"
                f"{f' and {len(ns) - 8} more' if len(ns) > 8 else ''})"
                for op, ns in bad.items()))


def _opset(model: onnx.ModelProto) -> int:
    versions = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    if "ai.onnx" not in versions:
        raise UnsupportedOpError("the model imports no default-domain ONNX opset")
    return versions["ai.onnx"]


def supported_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` ready for the handlers, or an UnsupportedOpError line saying why it is
    refused: an op without a handler, or an opset out of range. Local functions are
    inlined; a model below NATIVE_OPSET is upgraded by onnx's version converter, so the
    handlers read each op in its opset-13+ form only (axes as inputs, Clip's min/max as
    inputs, Dropout's ratio as an input, ...)."""
    if model.functions:  # model-local functions (ours, or an exporter's): inline them
        from onnx import inliner
        model = inliner.inline_local_functions(model)
    old = any(o.domain in ("", "ai.onnx") and o.version < NATIVE_OPSET
              for o in model.opset_import)   # to be upgraded, which renames some ops
    _check_ops(model, RENAMED_ON_UPGRADE if old else None)
    v = _opset(model)
    if not MIN_OPSET <= v <= MAX_OPSET:
        raise UnsupportedOpError(f"ONNX opset {v} is not supported (supported: "
                                 f"{MIN_OPSET} to {MAX_OPSET})")
    if v < NATIVE_OPSET:
        from onnx import version_converter
        try:
            model = version_converter.convert_version(model, NATIVE_OPSET)
        except Exception as e:  # noqa: BLE001  (the converter raises bare RuntimeErrors)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UnsupportedOpError(f"ONNX opset {v}: onnx's version converter cannot "
                                     f"upgrade the model to opset {NATIVE_OPSET}: "
                                     f"{first}") from None
        _check_ops(model)
    return model


def from_model(model: onnx.ModelProto, bind: dict[str, np.ndarray] | None = None) -> Graph:
    """Import an in-memory ONNX model. `bind` fixes graph inputs to known values (the
    conformance tests pass shape-like inputs this way)."""
    return _Importer(supported_model(model), bind).run()
