"""conv2d and its gradient as im2col + GEMM."""

from __future__ import annotations

from tensorc.ir import TensorType

from ... import kernel_ir as K
from ..kernels import KernelBuilder, write_kernel
from ..program import Call, KernelStep, NotLowerable, View
from ..views import Access, Lazy, affine_map, broadcast_to, contiguous, reshape, transpose


def _conv2d(lw, node, ins, attrs):
    """im2col + GEMM: pad into a zeroed buffer, read the windows as one strided view,
    copy them into rows (the im2col kernel), multiply by the weight as [C*KH*KW, O]."""
    x, w, *bias = ins
    if attrs["group"] != 1 or x.dtype != "f32":
        raise NotLowerable("conv2d with groups or non-f32 data")
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    (s0, s1), (d0, d1) = attrs["strides"], attrs["dilations"]
    _, _, oh, ow = node.outputs[0].type.concrete(lw.env).shape
    x = _padded(lw, x, tuple(attrs["pads"]))
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
        if lw.target.gemm_epilogues and isinstance(b, Access) and b.coefs == (1,) and o > 1:
            call.epilogue["bias"] = View(b.buf, b.offset, (o,), (1,))
        else:
            y = Lazy(y.shape, K.binary("add", y.expr, broadcast_to(bias[0], y.shape).expr))
    return [transpose(reshape(y, (n, oh, ow, o)), (0, 3, 1, 2))]


def _conv2d_grad(lw, node, ins, attrs):
    """(dx, dw) of conv2d as GEMMs over the input windows (im2col, as the forward): with
    P = n*oh*ow windows of K = c/group*kh*kw values, dy as [P, o] and per group
        dw[o, K] = dy^T @ windows        dwindows[P, K] = dy @ w[o, K]
    then dx gathers, per input element, the entries of dwindows that read it (col2im).
    A patch embedding (stride = kernel, no padding or dilation, one group: a ViT's) has
    disjoint windows, so there col2im is a permutation, one copy kernel."""
    x, w, dy = ins
    if x.dtype != "f32":
        raise NotLowerable("conv2d_grad of non-f32 data")
    n, c, h, wd = x.shape
    o, ci, kh, kw = w.shape
    grp, pads = attrs["group"], tuple(attrs["pads"])
    (s0, s1), (d0, d1) = attrs["strides"], attrs["dilations"]
    _, _, oh, ow = dy.shape
    og, k1 = o // grp, ci * kh * kw
    p, k = n * oh * ow, c * kh * kw
    xt, wt = node.outputs[0].type.concrete(lw.env), node.outputs[1].type.concrete(lw.env)
    if p == 0 or k == 0 or o == 0:
        raise NotLowerable("conv2d_grad of an empty tensor")
    patch = grp == 1 and not any(pads) and (d0, d1) == (1, 1) and (s0, s1) == (kh, kw)
    rows = [(0, [1, 0, 0, 0, 0, 0]), (0, [0, 0, 0, 1, 0, 0]),
            (0, [0, s0, 0, 0, d0, 0]), (0, [0, 0, s1, 0, 0, d1])]
    cols = lw.view(lw.materialize(affine_map(_padded(lw, x, pads), (n, oh, ow, c, kh, kw),
                                             rows), "im2col"))
    dy_po = lw.view(lw.materialize(transpose(dy, (0, 2, 3, 1))))   # [n, oh, ow, o]
    dy_op = lw.view(lw.materialize(transpose(dy, (1, 0, 2, 3))))   # [o, n, oh, ow]
    wv = lw.view(lw.materialize(w))
    dw = lw.out_view(wt)
    dcols = lw.out_view(TensorType((p, k), xt.dtype))
    for gi in range(grp):
        lw.steps.append(Call("matmul", {}, [
            View(dy_op.buf, dy_op.offset + gi * og * p, (og, p), (p, 1)),
            View(cols.buf, cols.offset + gi * k1, (p, k1), (k, 1))],
            [View(dw.buf, gi * og * k1, (og, k1), (k1, 1))], where=node.where))
        lw.steps.append(Call("matmul", {}, [
            View(dy_po.buf, dy_po.offset + gi * og, (p, og), (o, 1)),
            View(wv.buf, wv.offset + gi * og * k1, (og, k1), (k1, 1))],
            [View(dcols.buf, gi * k1, (p, k1), (k, 1))], where=node.where))
    dx = lw.out_view(xt)
    if not patch:
        lw.steps.append(_col2im(dcols, dx, (oh, ow, kh, kw), pads, (s0, s1), (d0, d1)))
        return [lw.of_view(dx), lw.of_view(dw)]
    if oh * kh != h or ow * kw != wd:   # rows/columns no window reaches
        lw.steps.append(write_kernel("fill", Lazy(dx.shape, K.Const(0.0, xt.dtype)), dx))
    sn, sc, sh, sw = dx.strides
    windows = View(dx.buf, 0, (n, oh, ow, c, kh, kw), (sn, kh * sh, kw * sw, sc, sh, sw))
    lw.steps.append(write_kernel("col2im", reshape(lw.of_view(dcols),
                                                   (n, oh, ow, c, kh, kw)), windows))
    return [lw.of_view(dx), lw.of_view(dw)]


def _padded(lw, x: Lazy, pads) -> Lazy:
    """x inside a zeroed buffer with `pads` (top, left, bottom, right); x if none."""
    if not any(pads):
        return x
    n, c, h, wd = x.shape
    pt, pl, pb, pr = pads
    hp, wp = h + pt + pb, wd + pl + pr
    padded = lw.new_buf((n, c, hp, wp), x.dtype)
    full = View(padded, 0, (n, c, hp, wp), contiguous((n, c, hp, wp)))
    lw.steps.append(write_kernel("pad", Lazy(full.shape, K.Const(0.0, x.dtype)), full))
    lw.steps.append(write_kernel("pad", x, View(padded, pt * wp + pl, x.shape, full.strides)))
    return lw.of_view(full)


def _col2im(dcols: View, dx: View, geometry, pads, strides, dilations) -> KernelStep:
    """dx[n, c, y, x] = the sum of dcols[window, (c, i, j)] over the windows that read
    input element (y, x) at kernel offset (i, j): window row oy with
    oy * stride + i * dilation = y + pad_top, if such an oy exists (same for columns).
    A gather, so race-free in parallel over dx."""
    n, c, h, wd = dx.shape
    oh, ow, kh, kw = geometry
    k = c * kh * kw
    kb = KernelBuilder("col2im")
    kout, kin = kb.buf(dx.buf, readonly=False), kb.buf(dcols.buf)
    flat, i, j, acc = kb.var(), kb.var(), kb.var(), kb.var(dx.buf.dtype)

    def ix(op, a, b):
        return K.binary(op, a, K.const_index(b))
    xx, yy = ix("mod", flat, wd), ix("mod", ix("floordiv", flat, wd), h)
    cc, nn = ix("mod", ix("floordiv", flat, wd * h), c), ix("floordiv", flat, wd * h * c)

    def window(pos, pad, off, stride, dil, extent):
        """(whether a window reaches pos at kernel offset `off`, its index or 0)."""
        num = K.binary("sub", ix("add", pos, pad), ix("mul", off, dil))
        ok = K.binary("and", K.binary("ge", num, K.const_index(0)),
                      K.binary("lt", num, K.const_index(extent * stride)))
        if stride > 1:
            ok = K.binary("and", ok, K.binary("eq", ix("mod", num, stride), K.const_index(0)))
        return ok, num if stride == 1 else ix("floordiv", num, stride)
    oky, oy = window(yy, pads[0], i, strides[0], dilations[0], oh)
    okx, ox = window(xx, pads[1], j, strides[1], dilations[1], ow)
    ok = K.binary("and", oky, okx)
    zero = K.const_index(0)
    address = K.affine(dcols.offset, [(nn, oh * ow * k), (K.Select(ok, oy, zero), ow * k),
                                      (K.Select(ok, ox, zero), k), (cc, kh * kw), (i, kw),
                                      (j, 1)])
    term = K.Select(ok, K.Load(kin, address), K.Const(0.0, dx.buf.dtype))
    body = [K.Decl(acc, K.Const(0.0, dx.buf.dtype)),
            K.Loop(i, kh, [K.Loop(j, kw, [K.Assign(acc, K.binary("add", acc, term))])]),
            K.Store(kout, K.affine(dx.offset, [(flat, 1)]), acc)]
    return kb.kernel([K.Loop(flat, n * c * h * wd, body, parallel=True)],
                     n * c * h * wd * kh * kw)


RULES = {  # op name -> rule(lowering, node, inputs, attrs) -> outputs
    "conv2d": _conv2d,
    "conv2d_grad": _conv2d_grad,
}
