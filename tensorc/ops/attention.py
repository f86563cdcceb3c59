"""`attention`: scaled dot-product attention as one op.

    attention(q, k, v, [mask], scale, causal, mask_value)

Layout: q [b, h, t, d], k [bk, hk, s, d], v [bk, hk, s, dv] -> [b, h, t, dv], where
bk equals b or is 1 (broadcast) and hk divides h: grouped-query attention, query head
i reads key/value head i // (h / hk). hk = h is plain multi-head attention, hk = 1
one shared key/value head (multi-query); no backend repeats k and v in memory.

Meaning, step by step (exactly what the unfused graph computes):

    scores = scale * q @ k^T                          [b, h, t, s]
    causal:      scores[..., i, j] = mask_value  where j > i  (top-left aligned)
    bool mask:   scores = where(mask, scores, mask_value)     (mask keeps True)
    float mask:  scores = scores + mask                       (additive bias)
    out = softmax(scores, axis=-1) @ v

`mask` broadcasts to [b, h, t, s]. `mask_value` is what masked scores become:
-inf by default; exporters often write a large finite negative number (finfo.min),
which only differs from -inf on rows where every key is masked (uniform weights
instead of NaN), so the op keeps the exporter's value.

Rotary position embedding (Llama) is not part of the op: it is applied to q and k
before they reach it (`frontend/layers.py`, `RotaryEmbedding`), as elementwise maths
on the two halves of the head dim that `fuse-regions` makes two `fused` regions,
evaluated inside the kernels that write the rotated q and k (a `concat` of the
halves); the cos/sin tables fold to constants when the positions are static. A key
cache stores keys after rotation (each at its absolute position), so the rotation
belongs before the cache write: inside the op it would have to be undone or redone
for every cached key, and the op stays the plain softmax(q k^T) v that every backend
and ONNX export already share.

The reference walks the keys in blocks with an online softmax (running max and
sum), so it never holds the [t, s] score matrix: extra memory is O(t * block).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ShapeError
from ..types import FLOAT_DTYPES, TensorType

if TYPE_CHECKING:
    from ..ir import Graph
from . import vjp
from .registry import Attr, OpDef, broadcast_shapes, numel, register

KEY_BLOCK = 32


def _infer(q: TensorType, k: TensorType, v: TensorType, *mask: TensorType, scale, causal,
           mask_value) -> TensorType:
    if q.dtype not in FLOAT_DTYPES or not q.dtype == k.dtype == v.dtype:
        raise ShapeError(f"q, k, v must share one float dtype: {q}, {k}, {v}")
    if not q.rank == k.rank == v.rank == 4:
        raise ShapeError(f"expects q [b,h,t,d], k [b,h,s,d], v [b,h,s,dv]: got {q}, {k}, {v}")
    b, h, t, d = q.shape
    if k.shape[3] != d or k.shape[2] != v.shape[2] or k.shape[:2] != v.shape[:2]:
        raise ShapeError(f"k {k} and v {v} do not fit q {q}")
    if broadcast_shapes(TensorType((b,)), TensorType(k.shape[:1])) != (b,) \
            or kv_group(h, k.shape[1]) is None:
        raise ShapeError(f"batch and head dims of k {k} do not fit q {q} (k heads must "
                         "equal q's, be 1, or divide them)")
    full = TensorType((b, h, t, k.shape[2]))
    if mask:
        m = mask[0]
        if m.dtype not in ("bool", q.dtype):
            raise ShapeError(f"mask must be bool (keep) or {q.dtype} (additive), got {m}")
        if m.rank > 4 or broadcast_shapes(m, full) != full.shape:
            raise ShapeError(f"mask {m} does not broadcast to the scores {full.shape}")
    return TensorType((b, h, t, v.shape[3]), q.dtype)


def kv_group(h, hk):
    """How many query heads share one key/value head: h for hk = 1, h // hk when hk
    divides h; None when hk does not fit h (symbolic head counts must be equal)."""
    if hk == 1 or hk == h:
        return h if hk == 1 else 1
    if isinstance(h, int) and isinstance(hk, int) and hk > 0 and h % hk == 0:
        return h // hk
    return None


def attention(q, k, v, mask=None, scale=1.0, causal=False, mask_value=-math.inf,
              block=KEY_BLOCK):
    """Blockwise attention with an online softmax (see the module docstring)."""
    b, h, t = q.shape[0], q.shape[1], q.shape[-2]
    hk = k.shape[1]
    if q.ndim == 4 and hk not in (1, h):
        # grouped query heads: q as [b, hk, g, t, d] against k, v as [bk, hk, 1, s, d]
        g = h // hk
        if mask is not None:
            m4 = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
            if m4.shape[1] != 1:
                m4 = m4.reshape(m4.shape[0], hk, g, *m4.shape[2:])
            else:
                m4 = m4[:, :, None]
            mask = m4
        out = attention(q.reshape(b, hk, g, t, -1), k[:, :, None], v[:, :, None], mask,
                        scale, causal, mask_value, block)
        return out.reshape(b, h, t, -1)
    s = k.shape[-2]
    dt = q.dtype
    qs = q * dt.type(scale)
    m = np.full(q.shape[:-1] + (1,), -np.inf, dt)             # running row max
    den = np.zeros(q.shape[:-1] + (1,), dt)                   # running sum of exp
    acc = np.zeros(q.shape[:-1] + (v.shape[-1],), dt)         # running weighted sum
    rows = np.arange(t)[:, None]
    for j0 in range(0, s, block):
        j1 = min(j0 + block, s)
        sc = (qs @ np.swapaxes(k[..., j0:j1, :], -1, -2)).astype(dt)   # [b,h,t,blk]
        if causal:
            sc = np.where(np.arange(j0, j1)[None, :] > rows, dt.type(mask_value), sc)
        if mask is not None:
            mb = mask[..., j0:j1] if mask.shape[-1] != 1 else mask
            sc = np.where(mb, sc, dt.type(mask_value)) if mb.dtype == np.bool_ else sc + mb
        m_new = np.maximum(m, sc.max(axis=-1, keepdims=True))
        base = np.where(np.isneginf(m_new), dt.type(0), m_new)   # rows masked so far
        p = np.exp(sc - base)
        corr = np.exp(m - base)
        den = den * corr + p.sum(axis=-1, keepdims=True)
        acc = acc * corr + p @ v[..., j0:j1, :]
        m = m_new
    return (acc / den).astype(dt)


def _flops(outs, q, k, v, *mask, **attrs):
    b, h, t, d = q.shape
    s, dv = k.shape[2], v.shape[3]
    return 2 * b * h * t * s * (d + dv) + 5 * b * h * t * s + numel(outs[0])


def decompose(graph: Graph, inputs, scale, causal, mask_value) -> list:
    """The unfused primitive ops (what ONNX export writes as the op's function)."""
    q, k, v, *mask = inputs
    k, v = repeat_kv(graph, k, q.type.shape[1]), repeat_kv(graph, v, q.type.shape[1])
    scores = _scores(graph, q, k, mask, scale, causal, mask_value)
    return [graph.add("matmul", graph.add("softmax", scores, axis=-1), v)]


def repeat_kv(graph: Graph, x, heads):
    """x [bk, hk, s, d] with each head repeated h / hk times, the way Hugging Face's
    `repeat_kv` writes it (unsqueeze, expand, reshape); x itself when hk is 1 or h
    (broadcasting covers those). `fuse-attention` recognises this pattern."""
    bk, hk, s, d = x.type.shape
    g = kv_group(heads, hk)
    if hk in (1, heads) or g is None:
        return x
    x5 = graph.add("expand", graph.add("unsqueeze", x, axes=(2,)), shape=(bk, hk, g, s, d))
    return graph.add("reshape", x5, shape=(bk, heads, s, d))


def _scores(graph: Graph, q, k, mask, scale, causal, mask_value):
    """The masked, scaled scores [b, h, t, s] (k already repeated to q's heads)."""
    dtype = q.type.np_dtype
    scores = graph.add("matmul", q, graph.add("transpose", k, perm=(0, 1, 3, 2)))
    scores = graph.add("mul", scores, graph.add_constant(graph.fresh_name("scale"),
                                                         np.array(scale, dtype)))
    fill = graph.add_constant(graph.fresh_name("mask_value"), np.array(mask_value, dtype))
    if causal:
        t, s = q.type.shape[2], k.type.shape[2]
        keep = graph.add("trilu", graph.add("full", shape=(t, s), value=True, dtype="bool"))
        scores = graph.add("where", keep, scores, fill)
    if mask:
        scores = graph.add("where", mask[0], scores, fill) if mask[0].type.dtype == "bool" \
            else graph.add("add", scores, mask[0])
    return scores


def _group_sum(graph: Graph, dx, like):
    """A gradient taken per query head [b, h, s, d], summed onto the key/value heads
    (and batch) of `like` that each served several."""
    b, h, s, d = dx.type.shape
    bk, hk = like.type.shape[:2]
    if hk not in (1, h):
        dx = graph.add("reduce_sum", graph.add("reshape", dx, shape=(b, hk, h // hk, s, d)),
                       axes=(2,))
    return vjp.sum_to(graph, dx, like.type)


def _repeat_np(x, heads):
    hk = x.shape[1]
    return np.repeat(x, heads // hk, axis=1) if hk not in (1, heads) else x


def attention_grad(q, k, v, *rest, scale=1.0, causal=False, mask_value=-math.inf):
    """(dq, dk, dv) of attention given the output's gradient (the last input), computed
    from scratch in float64: softmax's Jacobian on the recomputed weights."""
    *mask, dy = rest
    dt, h = q.dtype, q.shape[1]
    q64, dy64 = q.astype(np.float64), dy.astype(np.float64)
    kr, vr = (_repeat_np(x, h).astype(np.float64) for x in (k, v))
    sc = scale * q64 @ np.swapaxes(kr, -1, -2)
    if causal:
        t, s = sc.shape[-2:]
        sc = np.where(np.arange(s)[None, :] > np.arange(t)[:, None], mask_value, sc)
    if mask:
        m = mask[0]
        sc = np.where(m, sc, mask_value) if m.dtype == np.bool_ else sc + m
    p = np.exp(sc - sc.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    dp = dy64 @ np.swapaxes(vr, -1, -2)
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))
    dq = scale * ds @ kr
    dk, dv = scale * np.swapaxes(ds, -1, -2) @ q64, np.swapaxes(p, -1, -2) @ dy64

    def onto(dx, like):   # per-query-head gradient summed onto shared key/value heads
        b, hh, s, d = dx.shape
        if like.shape[1] not in (1, hh):
            dx = dx.reshape(b, like.shape[1], hh // like.shape[1], s, d).sum(axis=2)
        axes = tuple(i for i in range(4) if like.shape[i] == 1 and dx.shape[i] != 1)
        return dx.sum(axis=axes, keepdims=True) if axes else dx
    return dq.astype(dt), onto(dk, k).astype(dt), onto(dv, v).astype(dt)


def decompose_grad(graph: Graph, inputs, scale, causal, mask_value) -> list:
    """attention_grad in primitive ops: the scores recomputed, then softmax's backward."""
    q, k, v, *mask, dy = inputs
    kr, vr = repeat_kv(graph, k, q.type.shape[1]), repeat_kv(graph, v, q.type.shape[1])
    p = graph.add("softmax", _scores(graph, q, kr, mask, scale, causal, mask_value), axis=-1)
    dp = graph.add("matmul", dy, vjp.swap_last(graph, vr))
    dot = graph.add("reduce_sum", graph.add("mul", dp, p), axes=(-1,), keepdims=True)
    ds = vjp.scale(graph, graph.add("mul", p, graph.add("sub", dp, dot)), scale)
    dq = graph.add("matmul", ds, kr)
    dk = graph.add("matmul", vjp.swap_last(graph, ds), q)
    dv = graph.add("matmul", vjp.swap_last(graph, p), dy)
    return [dq, _group_sum(graph, dk, k), _group_sum(graph, dv, v)]


def _vjp(graph: Graph, node, dys):
    (dy,), mask = dys, node.inputs[3:]
    grads = graph.add_node("attention_grad", node.inputs + [dy], node.attrs)
    if mask and mask[0].type.dtype != "bool":
        return grads + [vjp.NoGradient("an additive attention mask")]
    return grads + [None] * len(mask)


def _grad_flops(outs, q, k, v, *rest, **attrs):
    return 2 * _flops([outs[0]], q, k, v)   # the scores again, and four products, not two


register(OpDef(
    "attention", infer=_infer, reference=attention, inputs=(3, 4), flops=_flops,
    attrs={"scale": Attr("float", 1.0), "causal": Attr("bool", False),
           "mask_value": Attr("float", -math.inf)},
    decompose=decompose, vjp=_vjp,
    doc="softmax(scale * q @ k^T, masked) @ v; q [b,h,t,d], k [b,hk,s,d], v [b,hk,s,dv] "
        "(hk divides h: grouped-query attention)",
))
register(OpDef(
    "attention_grad", infer=lambda q, k, v, *rest, **attrs: [q, k, v], inputs=(4, 5),
    reference=attention_grad, flops=_grad_flops, decompose=decompose_grad,
    attrs={"scale": Attr("float", 1.0), "causal": Attr("bool", False),
           "mask_value": Attr("float", -math.inf)},
    doc="(dq, dk, dv) of attention(q, k, v, [mask]) given the output's gradient, the last "
        "input: the fused backward, which recomputes the weights instead of keeping them",
))
