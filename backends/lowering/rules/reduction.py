"""Reductions and normalisations: one kernel each, reading lazy inputs."""

from __future__ import annotations

import math

import numpy as np

from tensorc.ir import DTYPES, TensorType
from tensorc.ops.registry import norm_axis

from ... import kernel_ir as K
from ..kernels import KernelBuilder, Rows, assign_group, merge_dims, outer_indices
from ..kernels import const as _f
from ..program import NotLowerable
from ..views import Lazy, broadcast_to, leaves

_NEG_INF = -math.inf
_FLOATS = ("f16", "f32", "f64")


def _float_input(node, x: Lazy):
    if x.dtype not in ("f32", "f64"):
        raise NotLowerable(f"{node.op} on {x.dtype}")


def widened(x: Lazy) -> Lazy:
    """float16 read as float32: the kernels compute in float32 (numpy's own f16 sums
    and means accumulate in float32 too) and round once when they store."""
    return Lazy(x.shape, K.Cast(x.expr, "f32")) if x.dtype == "f16" else x


def in_f32(rule):
    """A float rule that also takes float16: inputs widened, results rounded back."""
    def wrapped(lw, node, ins, attrs):
        if ins[0].dtype != "f16":
            return rule(lw, node, ins, attrs)
        outs = rule(lw, node, [widened(x) for x in ins], attrs)
        return [Lazy(o.shape, K.Cast(o.expr, "f16")) for o in outs]
    return wrapped


def _lowest(dtype: str):
    """The identity of max: -inf, or an integer type's minimum."""
    return -math.inf if dtype in _FLOATS else int(np.iinfo(DTYPES[dtype]).min)


def _highest(dtype: str):
    return math.inf if dtype in _FLOATS else int(np.iinfo(DTYPES[dtype]).max)


def _softmax(lw, node, ins, attrs):
    x = ins[0]
    _float_input(node, x)
    ax = norm_axis(attrs["axis"], len(x.shape))
    out = lw.out_view(TensorType(x.shape, x.dtype))
    r = Rows(node.op, x.shape, [ax], [x], [out])
    kb, t = r.kb, x.dtype
    m, s = kb.var(t), kb.var(t)
    body = [K.Decl(m, _f(t, _NEG_INF))]
    body += r.over_reduced(lambda: [K.Assign(m, K.binary("max", m, r.at(x)))])
    # A row of only -inf gives NaN (-inf - -inf), as in the reference.
    body.append(K.Decl(s, _f(t, 0.0)))
    if node.op == "softmax":
        def second():
            e = K.Unary("exp", K.binary("sub", r.at(x), m))
            return [r.store(out, e, False), K.Assign(s, K.binary("add", s, e))]
        body += r.over_reduced(second)
        inv = kb.var(t)
        body.append(K.Decl(inv, K.binary("div", _f(t, 1.0), s)))
        kout = kb.buf(out.buf, readonly=False)

        def third():
            st = r.store(out, _f(t, 0.0), False)
            return [K.Store(kout, st.index, K.binary("mul", K.Load(kout, st.index), inv))]
        body += r.over_reduced(third)
    else:
        body += r.over_reduced(lambda: [K.Assign(s, K.binary("add", s, K.Unary(
            "exp", K.binary("sub", r.at(x), m))))])
        lse = kb.var(t)
        body.append(K.Decl(lse, K.binary("add", m, K.Unary("log", s))))
        body += r.over_reduced(lambda: [r.store(out, K.binary("sub", r.at(x), lse), False)])
    lw.steps.append(r.kernel(body, 3))
    return [lw.of_view(out)]


def _layer_norm(lw, node, ins, attrs):
    x, *params = ins
    _float_input(node, x)
    rank = len(x.shape)
    ax = norm_axis(attrs["axis"], rank)
    params = [broadcast_to(p, x.shape) for p in params]
    out = lw.out_view(TensorType(x.shape, x.dtype))
    r = Rows("layer_norm", x.shape, range(ax, rank), [x, *params], [out])
    kb, t = r.kb, x.dtype
    acc, mean, var, rstd = kb.var(t), kb.var(t), kb.var(t), kb.var(t)
    inv_n = _f(t, 1.0 / max(r.n, 1))
    body = [K.Decl(acc, _f(t, 0.0))]
    body += r.over_reduced(lambda: [K.Assign(acc, K.binary("add", acc, r.at(x)))])
    body.append(K.Decl(mean, K.binary("mul", acc, inv_n)))
    body.append(K.Decl(var, _f(t, 0.0)))

    def centred():
        d = K.binary("sub", r.at(x), mean)
        return [K.Assign(var, K.binary("add", var, K.binary("mul", d, d)))]
    body += r.over_reduced(centred)
    body.append(K.Decl(rstd, K.Unary("rsqrt", K.binary(
        "add", K.binary("mul", var, inv_n), _f(t, attrs["eps"])))))

    def normalise():
        y = K.binary("mul", K.binary("sub", r.at(x), mean), rstd)
        if len(params) > 0:
            y = K.binary("mul", y, r.at(params[0]))
        if len(params) > 1:
            y = K.binary("add", y, r.at(params[1]))
        return [r.store(out, y, False)]
    body += r.over_reduced(normalise)
    lw.steps.append(r.kernel(body, 3))
    return [lw.of_view(out)]


_REDUCE = {"reduce_sum": "add", "reduce_mean": "add", "reduce_max": "max",
           "reduce_min": "min", "reduce_prod": "mul"}


def reduce_into(lw, x: Lazy, axes, op: str, out_dtype: str, acc: str, keep=None,
                mean=False, name="reduce") -> Lazy:
    """A kernel folding `op` over `axes` of `x` (each element cast to `acc`), divided by
    the count for a mean; the result, cast to `out_dtype`, has shape `keep` (default:
    the kept dims)."""
    kept = tuple(d for i, d in enumerate(x.shape) if i not in axes)
    out = lw.out_view(TensorType(kept if keep is None else keep, out_dtype))
    block = _column_block(x.shape, axes) if acc == out_dtype else 0
    if block:
        lw.steps.append(_columns_kernel(x, axes, op, acc, out, mean, name, block))
        return lw.of_view(out)
    r = Rows(name, x.shape, axes, [x], [])
    v = r.kb.var(acc)
    init = {"add": 0, "mul": 1, "max": _lowest(acc), "min": _highest(acc)}[op]
    body = [K.Decl(v, _f(acc, float(init) if acc in _FLOATS else init))]

    def step():
        e = r.at(x)
        return [K.Assign(v, K.binary(op, v, e if e.dtype == acc else K.Cast(e, acc)))]
    body += r.over_reduced(step)
    result = K.binary("mul", v, _f(acc, 1.0 / max(r.n, 1))) if mean else v
    body.append(r.store(out, result if acc == out_dtype else K.Cast(result, out_dtype), True))
    lw.steps.append(r.kernel(body, 1))
    return lw.of_view(out)


def _column_block(shape, axes) -> int:
    """The width of the column blocks a reduction over leading axes runs in (0: it does
    not): the kept trailing dims are then the unit-stride ones, which a row-at-a-time
    reduction reads with the stride of a whole row, one element per cache line."""
    kept = math.prod(shape[len(axes):])
    if not axes or list(axes) != list(range(len(axes))) or len(axes) == len(shape) \
            or math.prod(shape[:len(axes)]) < 2:
        return 0
    return next((w for w in (64, 32, 16) if kept % w == 0), 0)


def _columns_kernel(x: Lazy, axes, op: str, acc: str, out, mean: bool, name: str,
                    block: int):
    """out[j] = op over the rows i of x[i, j], as a parallel loop over blocks of `block`
    columns, each running over the rows in order and, per row, over its columns: the
    output block is the accumulator and the innermost loop is unit stride, so it
    vectorises (the same additions, in the same order, as a row-at-a-time loop)."""
    shape, rank = x.shape, len(x.shape)
    kept = [d for d in range(len(axes), rank) if shape[d] != 1]
    kb = KernelBuilder(name)
    kout = kb.buf(out.buf, readonly=False)
    blk = kb.var()
    coef_lists = [leaf.coefs for leaf in leaves(x.expr)]
    red_groups = merge_dims(shape, coef_lists, axes)

    def columns(body_fn):
        """A loop over this block's columns; body_fn(address, idx) builds its body."""
        j = kb.var()
        flat = K.binary("add", K.binary("mul", blk, K.const_index(block)), j)
        idx: list[K.Expr] = [K.const_index(0)] * rank
        outer_indices(kb, shape, [[d] for d in kept], flat, idx)
        return K.Loop(j, block, body_fn(K.binary("add", K.const_index(out.offset), flat), idx))

    init = {"add": 0, "mul": 1, "max": _lowest(acc), "min": _highest(acc)}[op]
    body = [columns(lambda a, idx: [K.Store(kout, a, _f(acc, float(init) if acc in _FLOATS
                                                        else init))])]

    def fold(a, idx):
        e = kb.at(x.expr, idx)
        e = e if e.dtype == acc else K.Cast(e, acc)
        return [K.Store(kout, a, K.binary(op, K.Load(kout, a), e))]
    loops = []
    for g in red_groups:
        v = kb.var()
        loops.append((v, g, math.prod(shape[d] for d in g)))

    def fold_at(a, idx):
        for v, g, _ in loops:
            assign_group(shape, g, v, idx)
        return fold(a, idx)
    red = [columns(fold_at)]
    for v, _, ext in reversed(loops):
        red = [K.Loop(v, ext, red)]
    body += red
    if mean:
        n = math.prod(shape[d] for d in axes)
        body.append(columns(lambda a, idx: [K.Store(kout, a, K.binary(
            "mul", K.Load(kout, a), _f(acc, 1.0 / max(n, 1))))]))
    cols = math.prod(shape[len(axes):])
    return kb.kernel([K.Loop(blk, cols // block, body, parallel=True)], math.prod(shape))


def _reduce(lw, node, ins, attrs):
    """Floats accumulate in their own type (f16 in f32), integers in theirs (wrapping, as
    numpy's sum cast back does); an integer mean sums in f64 and truncates, as numpy's
    mean cast back does."""
    x = ins[0]
    t = node.outputs[0].type.concrete(lw.env)
    if x.dtype == "bool":
        raise NotLowerable(f"{node.op} on bool")
    axes = range(len(x.shape)) if attrs["axes"] is None else \
        [norm_axis(a, len(x.shape)) for a in attrs["axes"]]
    mean = node.op == "reduce_mean"
    acc = "f32" if x.dtype == "f16" else "f64" if mean and x.dtype not in _FLOATS \
        else x.dtype
    return [reduce_into(lw, x, sorted(axes), _REDUCE[node.op], t.dtype, acc, t.shape, mean,
                        node.op)]


def _argmax(lw, node, ins, attrs):
    x = widened(ins[0])
    if x.dtype == "bool" or not x.shape:
        raise NotLowerable(f"argmax on {x.dtype}{list(x.shape)}")
    ax = norm_axis(attrs["axis"], len(x.shape))
    out = lw.out_view(node.outputs[0].type.concrete(lw.env))
    r = Rows("argmax", x.shape, [ax], [x], [])
    best, arg = r.kb.var(x.dtype), r.kb.var("i64")
    body = [K.Decl(best, _f(x.dtype, _lowest(x.dtype))), K.Decl(arg, K.const_index(0))]

    def step():
        v = r.at(x)
        # Strict, so the first maximum wins; the first NaN beats everything: numpy's rules
        # (v == v always holds for integers).
        first_nan = K.binary("and", K.Unary("not", K.binary("eq", v, v)),
                             K.binary("eq", best, best))
        better = K.binary("or", K.binary("gt", v, best), first_nan)
        return [K.Assign(arg, K.Select(better, r.idx[ax], arg)),
                K.Assign(best, K.Select(better, v, best))]
    body += r.over_reduced(step)
    body.append(r.store(out, arg, True))
    lw.steps.append(r.kernel(body, 1))
    return [lw.of_view(out)]


def _sorts_above(a: K.Expr, b: K.Expr) -> K.Expr:
    """a > b with NaN above every number (numpy's sort order; equal NaNs are not)."""
    nan_a, nan_b = (K.Unary("not", K.binary("eq", v, v)) for v in (a, b))
    return K.binary("or", K.binary("gt", a, b), K.binary("and", nan_a, K.Unary("not", nan_b)))


def _sorts_level(a: K.Expr, b: K.Expr) -> K.Expr:
    both_nan = K.binary("and", K.Unary("not", K.binary("eq", a, a)),
                        K.Unary("not", K.binary("eq", b, b)))
    return K.binary("or", K.binary("eq", a, b), both_nan)


_TOPK_LANES = 8   # independent running picks a pass keeps: they overlap in the CPU


def _topk(lw, node, ins, attrs):
    """Per row, k selection passes: pass t takes the best element ordered after pass
    t-1's pick (largest: a smaller value, or an equal one at a higher index), so equal
    values come out lower index first, as the reference's stable sort; NaN sorts above
    every number, as there. A pass keeps 8 running picks over interleaved elements
    (lane l sees l, l + 8, ...: no one long dependency chain), merged at its end. O(k n)
    a row: for the small k of models' top-k; no scratch memory."""
    x = widened(ins[0])
    if x.dtype == "bool":
        raise NotLowerable("topk on bool")
    ax, k = norm_axis(attrs["axis"], len(x.shape)), attrs["k"]
    n, largest = x.shape[ax], attrs["largest"]
    t_out = node.outputs[0].type.concrete(lw.env)
    vals, idxs = lw.out_view(t_out), lw.out_view(TensorType(t_out.shape, "i64"))
    r = Rows("topk", x.shape, [ax], [x], [])
    kb, dt = r.kb, x.dtype
    rows = [(r.idx[d], d) for d in range(len(x.shape)) if d != ax]
    lanes = _TOPK_LANES if n >= 4 * _TOPK_LANES else 1
    prev_v, prev_i, take, t, c = kb.var(dt), kb.var("i64"), kb.var("bool"), kb.var(), kb.var()
    best = [(kb.var(dt), kb.var("i64")) for _ in range(lanes)]
    zero, none = _f(dt, 0.0 if dt in _FLOATS else 0), K.const_index(-1)
    body = [K.Decl(prev_v, zero), K.Decl(prev_i, none), K.Decl(take, K.Const(False, "bool"))]
    body += [K.Decl(v, init) for pair in best for v, init in zip(pair, (zero, none),
                                                                 strict=True)]

    def above(a, b):   # a is picked before b
        return _sorts_above(a, b) if largest else _sorts_above(b, a)

    def visit(i, bv, bi):
        r.idx[ax] = i
        v = r.at(x)
        later = K.binary("or", K.binary("lt", prev_i, K.const_index(0)), K.binary(
            "or", above(prev_v, v), K.binary("and", _sorts_level(v, prev_v),
                                             K.binary("gt", i, prev_i))))
        return [K.Assign(take, K.binary("and", later, K.binary(
                    "or", K.binary("lt", bi, K.const_index(0)), above(v, bv)))),
                K.Assign(bi, K.Select(take, i, bi)), K.Assign(bv, K.Select(take, v, bv))]

    chunks = n // lanes
    scan = [K.Assign(bi, none) for _, bi in best]
    step = []
    for lane, (bv, bi) in enumerate(best):
        step += visit(K.binary("add", K.binary("mul", c, K.const_index(lanes)),
                               K.const_index(lane)), bv, bi)
    scan.append(K.Loop(c, chunks, step))
    for j in range(chunks * lanes, n):   # the tail: lane 0, after its other elements
        scan += visit(K.const_index(j), *best[0])
    (bv0, bi0) = best[0]
    for bv, bi in best[1:]:   # merge: the better pick, the lower index among equals
        wins = K.binary("or", above(bv, bv0), K.binary("and", _sorts_level(bv, bv0),
                                                        K.binary("lt", bi, bi0)))
        scan += [K.Assign(take, K.binary("and", K.binary("ge", bi, K.const_index(0)),
                                         K.binary("or", K.binary("lt", bi0, K.const_index(0)),
                                                  wins))),
                 K.Assign(bi0, K.Select(take, bi, bi0)), K.Assign(bv0, K.Select(take, bv, bv0))]

    def put(out, value):
        terms = [(e, out.strides[d]) for e, d in rows] + [(t, out.strides[ax])]
        return K.Store(kb.buf(out.buf, readonly=False), K.affine(out.offset, terms), value)
    keep = K.Cast(bv0, t_out.dtype) if t_out.dtype != dt else bv0
    scan += [put(vals, keep), put(idxs, bi0), K.Assign(prev_v, bv0), K.Assign(prev_i, bi0)]
    body.append(K.Loop(t, k, scan))
    lw.steps.append(r.kernel(body, max(k, 1)))
    return [lw.of_view(vals), lw.of_view(idxs)]


def _quant_params(lw, node, ins, attrs):
    """A scale and zero point per row (dynamic quantization) in one kernel: the row's
    range in one pass, then, when a `quantize` of the same x by them is the reader (as the
    quantize pass writes it), the quantized row in a second, so x is read twice and no
    small kernel runs in between. The arithmetic is the reference's, step for step."""
    x = ins[0]
    _float_input(node, x)
    if x.dtype != "f32":
        raise NotLowerable(f"quant_params on {x.dtype}")
    shape, dtype = x.shape, attrs["dtype"]
    axes = range(len(shape)) if attrs["axes"] is None else \
        sorted({norm_axis(a, len(shape)) for a in attrs["axes"]})
    pt = node.outputs[0].type.concrete(lw.env)
    scale_out, zp_out = lw.out_view(pt), lw.out_view(TensorType(pt.shape, dtype))
    (quant,) = lw.users.get(node.outputs[0], [None])[:1] or [None]
    fuse = quant is not None and quant.op == "quantize" and \
        quant.inputs == [node.inputs[0], *node.outputs]
    q_out = lw.out_view(TensorType(shape, dtype)) if fuse else None
    r = Rows(node.op, shape, list(axes), [x], [scale_out, zp_out] + [q_out] * fuse)
    kb = r.kb
    lo, hi = (0, 255) if dtype == "u8" else (-128, 127)
    zero, one = _f("f32", 0.0), _f("f32", 1.0)
    scale, zp = kb.var("f32"), kb.var("f32")
    if dtype == "u8":
        mn, mx = kb.var("f32"), kb.var("f32")
        body = [K.Decl(mn, _f("f32", math.inf)), K.Decl(mx, _f("f32", _NEG_INF))]
        body += r.over_reduced(lambda: [K.Assign(mn, K.binary("min", mn, r.at(x))),
                                        K.Assign(mx, K.binary("max", mx, r.at(x)))])
        body += [K.Assign(mn, K.binary("min", mn, zero)), K.Assign(mx, K.binary("max", mx, zero)),
                 K.Decl(scale, K.binary("div", K.binary("sub", mx, mn), _f("f32", 255.0)))]
        body.append(K.Assign(scale, K.Select(K.binary("eq", scale, zero), one, scale)))
        z = K.Unary("round", K.binary("div", K.Unary("neg", mn), scale))
        body.append(K.Decl(zp, K.binary("min", K.binary("max", z, _f("f32", lo)),
                                         _f("f32", hi))))
    else:
        amax = kb.var("f32")
        body = [K.Decl(amax, zero)]
        body += r.over_reduced(lambda: [K.Assign(amax, K.binary("max", amax,
                                                                 K.Unary("abs", r.at(x))))])
        body.append(K.Decl(scale, K.binary("div", amax, _f("f32", 127.0))))
        body.append(K.Assign(scale, K.Select(K.binary("eq", scale, zero), one, scale)))
        body.append(K.Decl(zp, zero))
    body += [r.store(scale_out, scale, True), r.store(zp_out, K.Cast(zp, dtype), True)]
    if fuse:
        def write():
            v = K.binary("add", K.Unary("round", K.binary("div", r.at(x), scale)), zp)
            v = K.binary("min", K.binary("max", v, _f("f32", lo)), _f("f32", hi))
            return [r.store(q_out, K.Cast(v, dtype), False)]
        body += r.over_reduced(write)
    # the quantizing pass divides, rounds and clamps every element: about 16 plain
    # passes' work by measure (128 x 512 rows: 40 us on one thread, 21 us on two), which
    # is what lets the runtime split it across threads
    lw.steps.append(r.kernel(body, 1 + 16 * fuse))
    outs = [lw.of_view(scale_out), lw.of_view(zp_out)]
    if fuse:
        lw.absorbed[quant] = (lw.of_view(q_out), None)
    return outs


RULES = {  # op name -> rule(lowering, node, inputs, attrs) -> outputs
    "quant_params": _quant_params,
    "softmax": in_f32(_softmax),
    "log_softmax": in_f32(_softmax),
    "layer_norm": in_f32(_layer_norm),
    **dict.fromkeys(_REDUCE, _reduce),
    "argmax": _argmax,
    "topk": _topk,
}
