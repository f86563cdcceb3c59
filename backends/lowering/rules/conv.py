"""conv2d as im2col + GEMM."""

from __future__ import annotations

from tensorc.ir import TensorType

from ... import kernel_ir as K
from ..kernels import write_kernel
from ..program import Call, NotLowerable, View
from ..views import Access, Lazy, affine_map, broadcast_to, contiguous, reshape, transpose


def _conv2d(lw, node, ins, attrs):
    """im2col + GEMM: pad into a zeroed buffer, read the windows as one strided view,
    copy them into rows (the im2col kernel), multiply by the weight as [C*KH*KW, O]."""
    x, w, *bias = ins
    if attrs["group"] != 1 or x.dtype != "f32":
        raise NotLowerable("conv2d with groups or non-f32 data")
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    pt, pl, pb, pr = attrs["pads"]
    (s0, s1), (d0, d1) = attrs["strides"], attrs["dilations"]
    _, _, oh, ow = node.outputs[0].type.concrete(lw.env).shape
    hp, wp = h + pt + pb, wd + pl + pr
    if any(attrs["pads"]):
        padded = lw.new_buf((n, c, hp, wp), x.dtype)
        full = View(padded, 0, (n, c, hp, wp), contiguous((n, c, hp, wp)))
        lw.steps.append(write_kernel("pad", Lazy(full.shape, K.Const(0.0, x.dtype)), full))
        lw.steps.append(write_kernel("pad", x, View(padded, pt * wp + pl, x.shape,
                                                    full.strides)))
        x = lw.of_view(full)
    rows = [(0, [1, 0, 0, 0, 0, 0]), (0, [0, 0, 0, 1, 0, 0]),
            (0, [0, s0, 0, 0, d0, 0]), (0, [0, 0, s1, 0, 0, d1])]
    cols = affine_map(x, (n, oh, ow, c, kh, kw), rows)
    shape2 = (n * oh * ow, c * kh * kw)
    a = reshape(cols, shape2) or reshape(lw.materialize(cols, "im2col"), shape2)
    wt = transpose(reshape(lw.materialize(w), (o, c * kh * kw)), (1, 0))
    out = lw.out_view(TensorType((n * oh * ow, o), x.dtype))
    call = Call("matmul", {}, [lw.view(a), lw.view(wt)], [out], where=node.where)
    lw.steps.append(call)
    y = lw.of_view(out)
    if bias:
        b = bias[0].expr
        if lw.gemm_epilogues and isinstance(b, Access) and b.coefs == (1,) and o > 1:
            call.epilogue["bias"] = View(b.buf, b.offset, (o,), (1,))
        else:
            y = Lazy(y.shape, K.binary("add", y.expr, broadcast_to(bias[0], y.shape).expr))
    return [transpose(reshape(y, (n, oh, ow, o)), (0, 3, 1, 2))]


RULES = {  # op name -> rule(lowering, node, inputs, attrs) -> outputs
    "conv2d": _conv2d,
}
