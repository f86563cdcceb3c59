"""Views and data movement: transposes, reshapes, slices and broadcasts stay lazy;
concat, gather and constants of a shape are written by small kernels."""

from __future__ import annotations

import math

import numpy as np

from tensorc.ir import DTYPES
from tensorc.ops.registry import norm_axis
from tensorc.ops.shape import tensor_scatter_bounds

from ... import kernel_ir as K
from ..kernels import KernelBuilder, write_kernel
from ..program import IndexCheck, NotLowerable, View
from ..views import (
    Access,
    Index,
    Lazy,
    affine_map,
    broadcast_to,
    constant,
    is_contiguous,
    reshape,
    transpose,
)


def _transpose(lw, node, ins, attrs):
    perm = attrs["perm"] or tuple(reversed(range(len(ins[0].shape))))
    return [transpose(ins[0], perm)]


def _reshape(lw, node, ins, attrs):
    shape = tuple(node.outputs[0].type.concrete(lw.env).shape)
    out = reshape(ins[0], shape)
    return [out if out is not None else reshape(lw.materialize(ins[0]), shape)]


def _expand(lw, node, ins, attrs):
    return [broadcast_to(ins[0], node.outputs[0].type.concrete(lw.env).shape)]


def _slice(lw, node, ins, attrs):
    x = ins[0]
    rank = len(x.shape)
    starts, ends = attrs["starts"], attrs["ends"]
    axes = attrs["axes"] if attrs["axes"] is not None else range(len(starts))
    steps = attrs["steps"] if attrs["steps"] is not None else (1,) * len(starts)
    rows = [(0, [int(p == s) for s in range(rank)]) for p in range(rank)]
    shape = list(x.shape)
    for s, e, a, st in zip(starts, ends, axes, steps, strict=True):
        a = norm_axis(a, rank)
        r = range(*slice(s, e, st).indices(x.shape[a]))
        shape[a] = len(r)
        rows[a] = (r.start if len(r) else 0, [st * int(a == q) for q in range(rank)])
    return [affine_map(x, shape, rows)]


def _split(lw, node, ins, attrs):
    x, rank = ins[0], len(ins[0].shape)
    ax = norm_axis(attrs["axis"], rank)
    outs, start = [], 0
    for size in attrs["sizes"]:
        shape = list(x.shape)
        shape[ax] = size
        rows = [((start if p == ax else 0), [int(p == q) for q in range(rank)])
                for p in range(rank)]
        outs.append(affine_map(x, shape, rows))
        start += size
    return outs


def _concat(lw, node, ins, attrs):
    t = node.outputs[0].type.concrete(lw.env)
    out = lw.out_view(t)
    ax = norm_axis(attrs["axis"], len(t.shape))
    start = 0
    for x in ins:
        if x.shape[ax]:
            part = View(out.buf, start * out.strides[ax], x.shape, out.strides)
            lw.steps.append(write_kernel("concat", x, part))
        start += x.shape[ax]
    return [lw.of_view(out)]


def _full(lw, node, ins, attrs):
    t = node.outputs[0].type.concrete(lw.env)
    value = attrs["value"]
    if t.dtype in ("f16", "f32", "f64"):
        value = float(value)
    elif t.dtype == "bool":
        value = bool(value)
    else:
        value = int(value)
    return [Lazy(tuple(t.shape), K.Const(value, t.dtype))]


def _dims(lw, node, ins, attrs):
    """Symbols are bound for the whole Program, so the values are its constants."""
    t = node.outputs[0].type.concrete(lw.env)
    return [constant(np.array(attrs["values"], DTYPES[t.dtype]).reshape(t.shape), t.dtype)]


def _range(lw, node, ins, attrs):
    t = node.outputs[0].type.concrete(lw.env)
    if t.dtype not in ("i64", "i32"):
        raise NotLowerable(f"range of {t.dtype}")
    return [Lazy(tuple(t.shape), Index(int(attrs["start"][0]), (attrs["delta"],), t.dtype))]


def _trilu(lw, node, ins, attrs):
    x = ins[0]
    rank = len(x.shape)
    row = Index(0, tuple(int(d == rank - 2) for d in range(rank)))
    col = Index(-attrs["k"], tuple(int(d == rank - 1) for d in range(rank)))
    keep = K.Binary("ge" if attrs["upper"] else "le", col, row)  # col - k vs row
    zero = K.Const(False if x.dtype == "bool" else 0, x.dtype)
    if x.dtype in ("f16", "f32", "f64"):
        zero = K.Const(0.0, x.dtype)
    return [Lazy(x.shape, K.Select(keep, x.expr, zero))]


def _gather(lw, node, ins, attrs):
    data, idx = ins
    ax = norm_axis(attrs["axis"], len(data.shape))
    t = node.outputs[0].type.concrete(lw.env)
    dview, iview = lw.view(data), lw.view(idx)
    n = data.shape[ax]
    lw.check_indices(IndexCheck(iview, n, node.where))
    out = lw.out_view(t)
    kb = KernelBuilder("gather")
    kout, kdata = kb.buf(out.buf, readonly=False), kb.buf(dview.buf)
    ishape = idx.shape
    pre = data.shape[:ax]
    loop_vars = [kb.var() for _ in t.shape]
    ivars = loop_vars[len(pre):len(pre) + len(ishape)]
    index = kb.at(Access(iview.buf, iview.offset, iview.strides), ivars)
    index = index if index.dtype == "i64" else K.Cast(index, "i64")
    wrapped = K.Select(K.binary("lt", index, K.const_index(0)),
                       K.binary("add", index, K.const_index(n)), index)
    dvars = loop_vars[:len(pre)] + [wrapped] + loop_vars[len(pre) + len(ishape):]
    src = K.Load(kdata, K.affine(dview.offset, list(zip(dvars, dview.strides, strict=True))))
    body = [K.Store(kout, K.affine(0, list(zip(loop_vars, out.strides, strict=True))), src)]
    for v, ext in reversed(list(zip(loop_vars, t.shape, strict=True))):
        body = [K.Loop(v, ext, body)]
    if body and isinstance(body[0], K.Loop):
        body[0].parallel = True
    lw.steps.append(kb.kernel(body, math.prod(t.shape)))
    return [lw.of_view(out)]


def _tensor_scatter(lw, node, ins, attrs):
    """The cache copied, then the update's rows stored at index[b] + i. When the cache is
    a graph input read by nothing else, a caller may hand the same array back as the
    result's `out` (`Program.aliases`): the runtime then skips the copy, and a decode
    step writes only its new rows."""
    cache, update, index = ins
    ax = norm_axis(attrs["axis"], len(cache.shape))
    out = lw.out_view(node.outputs[0].type.concrete(lw.env))
    copy = write_kernel("copy", cache, out)
    leaf = cache.expr
    if isinstance(leaf, Access) and leaf.buf.kind == "input" and is_contiguous(leaf, cache.shape) \
            and lw.uses.get(node.inputs[0]) == 1:
        copy.skip_if_same = (leaf.buf, out.buf)
        lw.aliases[out.buf] = leaf.buf
    lw.steps.append(copy)
    iview = lw.view(index)
    lo, hi = tensor_scatter_bounds(cache.shape[ax], update.shape[ax])
    lw.check_indices(IndexCheck(iview, cache.shape[ax], node.where, lo, hi,
                               f"writing {update.shape[ax]} rows into an axis of {{n}}"))
    kb = KernelBuilder("scatter")
    kout = kb.buf(out.buf, readonly=False)
    loop_vars = [kb.var() for _ in update.shape]
    start = kb.at(Access(iview.buf, iview.offset, iview.strides), loop_vars[:1])
    start = start if start.dtype == "i64" else K.Cast(start, "i64")
    dst = list(loop_vars)
    dst[ax] = K.binary("add", start, loop_vars[ax])
    body = [K.Store(kout, K.affine(out.offset, list(zip(dst, out.strides, strict=True))),
                    kb.at(update.expr, loop_vars))]
    for v, ext in reversed(list(zip(loop_vars, update.shape, strict=True))):
        body = [K.Loop(v, ext, body)]
    body[0].parallel = True
    lw.steps.append(kb.kernel(body, math.prod(update.shape)))
    return [lw.of_view(out)]


def _scatter_block(post: int, pre: int) -> int:
    """The slice of the trailing dims one parallel item of scatter_add owns: a divisor of
    `post`, at least one AVX-512 vector (16) where `post` allows, small enough that
    `pre` x (post / block) items keep a few threads busy."""
    want = max(16, post // max(1, -(-16 // pre)))
    return max(d for d in range(1, post + 1) if post % d == 0 and d <= want)


_COMBINE = {"add": "add", "mul": "mul", "max": "max", "min": "min"}


def _scatter_add(lw, node, ins, attrs):
    """`data` copied into the result, then each update slice added at its index (scatter:
    written, or combined by its reduction). Race free without atomics: the parallel loop
    runs over (leading dims, blocks of the trailing dims), so one item owns its elements
    of every row, and walks the index positions serially inside (repeated indices apply
    in index order, as np.add.at; for none the last one wins)."""
    data, idx, upd = ins
    combine = _COMBINE.get(attrs.get("reduction", "add"))
    if data.dtype == "bool":
        raise NotLowerable(f"{node.op} of bool")
    rank = len(data.shape)
    ax = norm_axis(attrs["axis"], rank)
    n = data.shape[ax]
    pre, post = math.prod(data.shape[:ax]), math.prod(data.shape[ax + 1:])
    m = math.prod(idx.shape)
    iflat = reshape(idx, (m,))
    iview = lw.view(iflat if iflat is not None else reshape(lw.materialize(idx), (m,)))
    lw.check_indices(IndexCheck(iview, n, node.where))
    out = lw.out_view(node.outputs[0].type.concrete(lw.env))
    lw.steps.append(write_kernel("copy", data, out))
    if pre * m * post == 0:
        return [lw.of_view(out)]
    upd3 = reshape(upd, (pre, m, post))
    if upd3 is None:
        upd3 = reshape(lw.materialize(upd), (pre, m, post))
    block = _scatter_block(post, pre)
    nb = post // block
    kb = KernelBuilder(node.op)
    kout = kb.buf(out.buf, readonly=False)
    item, i, j, row = kb.var(), kb.var(), kb.var(), kb.var()
    p = K.const_index(0) if pre == 1 else item if nb == 1 else \
        K.binary("floordiv", item, K.const_index(nb))
    blk = K.const_index(0) if nb == 1 else item if pre == 1 else \
        K.binary("mod", item, K.const_index(nb))
    q0 = K.binary("mul", blk, K.const_index(block))
    q = K.binary("add", q0, j)
    index = kb.at(Access(iview.buf, iview.offset, iview.strides), [i])
    index = index if index.dtype == "i64" else K.Cast(index, "i64")
    wrapped = K.Select(K.binary("lt", index, K.const_index(0)),
                       K.binary("add", index, K.const_index(n)), index)
    address = K.affine(0, [(p, n * post), (row, post), (q, 1)])
    value = kb.at(upd3.expr, [p, i, q])
    add = K.Store(kout, address, K.binary(combine, K.Load(kout, address), value)
                  if combine else value)
    body = [K.Loop(item, pre * nb, [
        K.Loop(i, m, [K.Decl(row, wrapped), K.Loop(j, block, [add])])], parallel=True)]
    lw.steps.append(kb.kernel(body, 3 * pre * m * post))
    return [lw.of_view(out)]


RULES = {  # op name -> rule(lowering, node, inputs, attrs) -> outputs
    "transpose": _transpose,
    "reshape": _reshape,
    "squeeze": _reshape,
    "unsqueeze": _reshape,
    "expand": _expand,
    "slice": _slice,
    "split": _split,
    "concat": _concat,
    "full": _full,
    "range": _range,
    "dims": _dims,
    "trilu": _trilu,
    "gather": _gather,
    "tensor_scatter": _tensor_scatter,
    "scatter_add": _scatter_add,
    "scatter": _scatter_add,
}
