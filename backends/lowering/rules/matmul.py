"""Matmul: the target's GEMM as a library call, and the epilogue it can absorb."""

from __future__ import annotations

import math

import numpy as np

from tensorc.ir import TensorType
from tensorc.ops.quant import dequantize_chain

from ... import kernel_ir as K
from ..program import Buf, Call, NotLowerable, View
from ..views import Access, Lazy, broadcast_to, constant, reshape, transpose
from .reduction import reduce_into, widened


def _matmul(lw, node, ins, attrs):
    """GEMMs take matrices: a vector operand is a [1, k] or [k, 1] view, as in np.matmul,
    and the result drops that dim again. The target's GEMM is float32; other types get
    a generated kernel."""
    t = node.outputs[0].type.concrete(lw.env)
    a, b = ins
    a = a if len(a.shape) > 1 else reshape(a, (1,) + a.shape)
    b = b if len(b.shape) > 1 else reshape(b, b.shape + (1,))
    batch = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    if t.dtype != "f32":
        return [reshape(_matmul_kernel(lw, a, b, batch, t.dtype, node.op), t.shape)]
    out = lw.out_view(TensorType(batch + (a.shape[-2], b.shape[-1]), t.dtype))
    rows = isinstance(a.expr, Access) and a.expr.coefs[-1] == 1
    columns = isinstance(a.expr, Access) and len(a.shape) == 2 and a.expr.coefs[0] == 1
    b = _narrow_weight(b) if lw.target.bf16_weights else b
    if a.shape[-1] > 1 and not rows and not columns:
        # the GEMM packs A from rows, or a 2-D A from columns (a weight gradient's x^T,
        # read from x as it lies); any other layout (a batched transpose) is copied into
        # rows here, by a threaded kernel into a planned buffer, rather than by the
        # library on every call
        a = lw.materialize(a)
    call = Call("matmul", attrs, [lw.view(a), lw.view(b)], [out], where=node.where)
    lw.steps.append(call)
    if lw.region:   # a fuse-epilogues region: the ops after it become its epilogue
        lw.pending[node.outputs[0]] = call
    return [reshape(lw.of_view(out), t.shape)]

def _matmul_integer(lw, node, ins, attrs):
    """The target's integer GEMM (`lw.target.int8_gemm`): "batched" takes any u8/i8 operands
    (cupy, below); "weights" u8 activations times a constant 2-D i8 weight (llvm). Inside
    a fuse-epilogues region the dequantize after it (cast to f32, times the row scale,
    times the column scale: `ops/quant.py` `dequantize_chain`) and then bias,
    activation and residual become its epilogue, so the i32 accumulators never reach
    memory. Anything else (other types, a weight zero point) runs the decomposition."""
    if lw.target.int8_gemm == "batched":
        return _matmul_integer_batched(lw, node, ins)
    if lw.target.int8_gemm != "weights":
        raise NotLowerable("no integer GEMM on this target")
    a, b, *zps = ins
    if len(zps) == 2 and _zeros(zps[1]):   # a weight zero point of 0 (ONNX Runtime's files)
        zps = zps[:1]
    if a.dtype not in ("u8", "i8") or b.dtype != "i8" or len(b.shape) != 2 \
            or len(a.shape) < 2 or len(zps) > 1 \
            or not (isinstance(b.expr, Access) and b.expr.buf.kind == "const"):
        raise NotLowerable("the integer GEMM takes 8-bit activations and a constant 2-D i8 "
                           "weight without a zero point")
    if a.dtype == "i8":   # a - zp = (a + 128) - (zp + 128): the same product in u8
        a = _plus_128(a)
        zps = [_plus_128(zps[0]) if zps else
               Lazy((), K.Const(128, "u8"))]
    rows, n = math.prod(a.shape[:-1]), b.shape[-1]
    shape = tuple(a.shape[:-1]) + (n,)
    epi = {}
    if zps:
        epi["a_zero"] = _per_row(lw, zps[0], a.shape[:-1], rows)
    chain = dequantize_chain(node, lw.users, lw.graph.outputs) if lw.region else None
    prev = node
    for u, role in chain or ():
        if role != "cast":
            scale = lw.vals[next(v for v in u.inputs if v is not prev.outputs[0])]
            if role == "row":
                epi["row_scale"] = _per_row(lw, scale, a.shape[:-1], rows)
            else:
                epi["col_scale"] = lw.view(reshape(scale, (math.prod(scale.shape),)))
        prev = u
    out = lw.out_view(TensorType(shape, "f32" if chain else "i32"))
    call = Call("matmul_integer", attrs, [lw.view(a), lw.view(b)], [out], where=node.where,
                epilogue=epi)
    lw.steps.append(call)
    result = lw.of_view(out)
    for u, _ in chain or ():   # the cast and the scales are the call's: their nodes
        lw.absorbed[u] = (result, call)   # return its output
    return [result]


def _zeros(x: Lazy) -> bool:
    e = x.expr
    return isinstance(e, Access) and e.buf.kind == "const" and not np.any(e.buf.data)


def _plus_128(x: Lazy) -> Lazy:
    """An i8 value + 128 as u8 (exact: -128..127 -> 0..255)."""
    wide = K.binary("add", K.Cast(x.expr, "i32"), K.Const(128, "i32"))
    return Lazy(x.shape, K.Cast(wide, "u8"))


def _per_row(lw, x: Lazy, lead, rows: int) -> View:
    """A per-row parameter ([..., M, 1]) as a [rows] view; one for all rows (per tensor)
    as a [1] view, which the GEMM reads for every row."""
    if math.prod(x.shape) == 1:
        return lw.view(reshape(x, (1,)))
    return lw.view(reshape(broadcast_to(x, tuple(lead) + (1,)), (rows,)))


def _narrow_weight(b: Lazy) -> Lazy:
    """B read as it is stored where it is a bf16 weight widened by a cast (what
    `cast-weights:bf16` makes): the target packs it as bf16 and widens it in the GEMM,
    rather than a kernel writing a float32 copy (twice the bytes) for it to read."""
    e = b.expr
    if len(b.shape) == 2 and isinstance(e, K.Cast) and e.dtype == "f32" \
            and isinstance(e.x, Access) and e.x.buf.dtype == "bf16" \
            and e.x.buf.kind == "const":
        return Lazy(b.shape, e.x)
    return b


def _matmul_kernel(lw, a: Lazy, b: Lazy, batch, dtype: str, name: str) -> Lazy:
    """out[..., i, j] = sum_k a[..., i, k] * b[..., k, j] as a reduction over a lazy
    [..., m, n, k] product. Integers wrap in their own type, as numpy's do; float16
    multiplies and sums in float32 and rounds once."""
    if dtype == "bool":
        raise NotLowerable("matmul on bool")
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    full = tuple(batch) + (m, n, k)
    ra = reshape(a, a.shape[:-1] + (1, k))                      # [..., m, 1, k]
    rb = reshape(transpose(b, _swap_last(len(b.shape))), b.shape[:-2] + (1, n, k))
    x, y = (widened(broadcast_to(v, full)) for v in (ra, rb))
    prod = Lazy(full, K.binary("mul", x.expr, y.expr))
    return reduce_into(lw, prod, [len(full) - 1], "add", dtype, prod.dtype, name=name)


def _swap_last(rank: int) -> tuple[int, ...]:
    return tuple(range(rank - 2)) + (rank - 1, rank - 2)


def into_gemm_epilogue(lw, node, ins, attrs) -> Lazy | None:
    """Fold `+ bias`, gelu/relu and `+ residual` into the matmul that produced an input:
    the GEMM applies act(a @ b + bias) + residual to its accumulators, saving a pass.
    The input must be the GEMM's whole output (perhaps reshaped) read by this node alone,
    and the node's result must have that input's shape (no broadcasting it bigger)."""
    shape = tuple(node.outputs[0].type.concrete(lw.env).shape)
    for v, mm in zip(node.inputs, ins, strict=True):
        call = lw.pending.get(v)
        if call is not None and lw.uses.get(v) == 1 and mm.shape == shape \
                and mm.dtype == "f32" and _grow_epilogue(lw, node, ins, attrs, mm, call):
            return mm
    return None


def _grow_epilogue(lw, node, ins, attrs, mm: Lazy, call: Call) -> bool:
    epi, out = call.epilogue, call.outputs[0]
    if node.op in ("gelu", "relu") and not ({"activation", "residual"} & set(epi)):
        epi["activation"] = "relu" if node.op == "relu" else \
            ("gelu_tanh" if attrs["approximate"] == "tanh" else "gelu")
        return True
    if node.op != "add" or "residual" in epi or len(ins) != 2:
        return False
    other = ins[1] if ins[0] is mm else ins[0]
    # The addend in the GEMM's own frame: `mm` may be a reshape of the GEMM's output.
    framed = reshape(broadcast_to(other, mm.shape), out.shape)
    e = framed.expr if framed is not None else None
    if not isinstance(e, Access) or e.buf is out.buf or _written_after(lw, e.buf, call):
        return False
    n = out.shape[-1]
    if n > 1 and e.coefs[-1] == 1 and not any(e.coefs[:-1]) \
            and not ({"bias", "activation", "residual"} & set(epi)):
        epi["bias"] = View(e.buf, e.offset, (n,), (1,))
        return True
    if other.shape == mm.shape and e.coefs[-1] in (1, 0):
        epi["residual"] = View(e.buf, e.offset, out.shape, e.coefs)
        return True
    return False


def _written_after(lw, buf: Buf, call: Call) -> bool:
    """Whether a step after `call` writes `buf` (then it is not ready when the GEMM runs)."""
    after = lw.steps[lw.steps.index(call) + 1:]
    return any(buf in s.writes() for s in after)


def _matmul_integer_batched(lw, node, ins):
    """cupy's integer GEMM (`__dp4a`) on batched views: a [z, m, k], b [z, k, n], zero
    points a [z, m, 1] and b [z, 1, n] (zeros when absent), out [z, m, n] i32. A vector
    operand or a zero point that varies along k runs the decomposition."""
    a, b, za, zb = list(ins) + [None] * (4 - len(ins))
    if len(a.shape) < 2 or len(b.shape) < 2:
        raise NotLowerable("matmul_integer of a vector operand")
    if (za is not None and za.shape[-1:] not in ((), (1,))) or \
            (zb is not None and len(zb.shape) >= 2 and zb.shape[-2] != 1):
        raise NotLowerable("a zero point that varies along k")
    t = node.outputs[0].type.concrete(lw.env)
    batch = tuple(np.broadcast_shapes(a.shape[:-2], b.shape[:-2]))
    (m, k), n = a.shape[-2:], b.shape[-1]
    z = int(np.prod(batch))
    if 0 in (z, m, n) or z > 65535 or -(-m // 64) > 65535:   # CUDA's grid y/z limit
        raise NotLowerable("an empty or too large matmul_integer for the kernel's grid")

    def batched(x, dtype, tail):
        x = x if x is not None else constant(np.zeros(tail, _NP[dtype]), dtype)
        full = broadcast_to(x, batch + tail)
        r = reshape(full, (z,) + tail)
        return lw.view(r if r is not None else reshape(lw.materialize(full), (z,) + tail))
    da, db = a.dtype, b.dtype
    views = [batched(a, da, (m, k)), batched(b, db, (k, n)), batched(za, da, (m, 1)),
             batched(zb, db, (1, n))]
    out = lw.out_view(TensorType((z, m, n), "i32"))
    lw.steps.append(Call("matmul_integer", {}, views, [out], where=node.where))
    return [reshape(lw.of_view(out), t.shape)]


_NP = {"u8": np.uint8, "i8": np.int8}


RULES = {  # op name -> rule(lowering, node, inputs, attrs) -> outputs
    "matmul": _matmul,
    "matmul_integer": _matmul_integer,
}
