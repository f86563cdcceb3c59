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


def _conv2d_grad(lw, node, ins, attrs):
    """(dx, dw) of a patch embedding (a ViT's: stride = kernel, no padding, no dilation,
    one group) as two GEMMs over the patches: each input element lies in at most one
    window, so im2col is a permutation of x and col2im one of dx. With P = n*oh*ow
    patches of K = c*kh*kw values and dy as [P, o]:
        dw[o, K] = dy^T @ patches        dpatches[P, K] = dy @ w[o, K]
    and dx is dpatches written back to where each patch came from (zero where the
    windows do not reach: the last rows/columns when kh/kw do not divide h/w). Other
    convolutions overlap windows or skip pixels: they raise NotLowerable."""
    x, w, dy = ins
    if x.dtype != "f32":
        raise NotLowerable("conv2d_grad of non-f32 data")
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    if attrs["group"] != 1 or any(attrs["pads"]) or tuple(attrs["dilations"]) != (1, 1) \
            or tuple(attrs["strides"]) != (kh, kw):
        raise NotLowerable("conv2d_grad is native only for patch embeddings (stride = "
                           "kernel, no padding, dilation 1, one group)")
    _, _, oh, ow = dy.shape
    p, k = n * oh * ow, c * kh * kw
    xt, wt = node.outputs[0].type.concrete(lw.env), node.outputs[1].type.concrete(lw.env)
    if p == 0 or k == 0 or o == 0:
        raise NotLowerable("conv2d_grad of an empty tensor")
    rows = [(0, [1, 0, 0, 0, 0, 0]), (0, [0, 0, 0, 1, 0, 0]),
            (0, [0, kh, 0, 0, 1, 0]), (0, [0, 0, kw, 0, 0, 1])]
    patches = lw.materialize(affine_map(x, (n, oh, ow, c, kh, kw), rows), "im2col")
    dy_po = lw.materialize(transpose(dy, (0, 2, 3, 1)))          # [n, oh, ow, o]
    dy_op = lw.materialize(transpose(dy, (1, 0, 2, 3)))          # [o, n, oh, ow]
    w2 = reshape(lw.materialize(w), (o, k))
    dw = lw.out_view(TensorType((o, k), wt.dtype))
    lw.steps.append(Call("matmul", {}, [lw.view(reshape(dy_op, (o, p))),
                                        lw.view(reshape(patches, (p, k)))], [dw],
                         where=node.where))
    dpatch = lw.out_view(TensorType((p, k), xt.dtype))
    lw.steps.append(Call("matmul", {}, [lw.view(reshape(dy_po, (p, o))), lw.view(w2)],
                         [dpatch], where=node.where))
    dx = lw.out_view(xt)
    if oh * kh != h or ow * kw != wd:
        lw.steps.append(write_kernel("fill", Lazy(dx.shape, K.Const(0.0, xt.dtype)), dx))
    sn, sc, sh, sw = dx.strides
    windows = View(dx.buf, 0, (n, oh, ow, c, kh, kw), (sn, kh * sh, kw * sw, sc, sh, sw))
    lw.steps.append(write_kernel("col2im", reshape(lw.of_view(dpatch),
                                                   (n, oh, ow, c, kh, kw)), windows))
    return [lw.of_view(dx), reshape(lw.of_view(dw), tuple(wt.shape))]


RULES = {  # op name -> rule(lowering, node, inputs, attrs) -> outputs
    "conv2d": _conv2d,
    "conv2d_grad": _conv2d_grad,
}
