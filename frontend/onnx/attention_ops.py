"""The ONNX handlers of opset 23+'s `Attention` and `RotaryEmbedding`, mapped onto
tensorc's own ops.

Attention becomes tensorc's `attention` op (so llvm runs its flash kernel and cupy its
own) whenever the node asks for nothing the op cannot say: no `softcap`, no
`qk_matmul_output`, a `softmax_precision` that is the inputs' dtype. ONNX's masks all
fold into the op's one mask input: a causal mask aligned top-left is its `causal`
attribute; the bottom-right (offset-aware) causal mask of a cache, the sliding window
(opset 25) and the padding of `nonpad_kv_seqlen` (opset 24) are boolean keep-masks built
from key and query positions (`range`), and-ed with a boolean `attn_mask` or turning a
float one to -inf where they drop a key. The rest is ONNX's own composition (matmul,
softcap, bias, softmax, matmul), which also yields `qk_matmul_output` in all 4 modes.

ONNX defines a fully masked query row (no key left) as a zero output row, where a plain
softmax gives NaN; both forms zero such rows with a `where` on the additive bias's row
maximum (computed from the masks only: a [.., t, s] pass, not the scores). Only a graph
with an `attn_mask` or a keep-mask (offset causal, window, padding) carries it: a plain
top-left causal mask never empties a row.

RotaryEmbedding is a composition (the model zoo's rotary layer is DSL code, not an op):
cos/sin gathered at `position_ids`, the rotated part split in halves or interleaved
(strided slices), rotated, and joined back (concat; interleaved: a concat on a new last
axis reshaped away); the part past `rotary_embedding_dim` passes through.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from tensorc.errors import ShapeError
from tensorc.ir import FLOAT_DTYPES, Value, dim_divide, dim_product

from .handlers import _dim, _scalar, _shape
from .values import Entry, _dtype, onnx_dtype

if TYPE_CHECKING:
    from .importer import OnnxNode, _Importer

QK_MODES = (0, 1, 2, 3)  # raw q k^T; after softcap; plus the bias; the softmax


def _split_heads(cx: _Importer, n: OnnxNode, x: Entry, heads, what: str) -> Entry:
    """[b, seq, heads * size] -> [b, heads, seq, size] (ONNX's 3-D inputs)."""
    b, seq, hidden = _shape(x)
    size = dim_divide(hidden, heads) if isinstance(heads, int) and heads > 0 else None
    if size is None:
        raise ShapeError(f"{n.where}: {what} hidden size {hidden} is not a multiple of "
                         f"{heads} heads")
    return cx.op("transpose", cx.op("reshape", x, shape=[b, seq, heads, size]),
                 perm=[0, 2, 1, 3])


def _repeat_heads(cx: _Importer, x: Entry, heads) -> Entry:
    """k or v [b, hk, s, d] with each head repeated heads / hk times (ONNX's np.repeat
    order: query head i reads key/value head i // (heads / hk))."""
    b, hk, s, d = _shape(x)
    if hk == heads:
        return x
    x5 = cx.op("expand", cx.op("unsqueeze", x, axes=[2]), shape=[b, hk, heads // hk, s, d])
    return cx.op("reshape", x5, shape=[b, heads, s, d])


class _Masks:
    """What removes keys from a query row: ONNX's `attn_mask` (bool keep-mask or float
    bias, padded to the keys), and boolean keep-conditions built from positions."""

    def __init__(self, cx: _Importer, dt: str, t, s):
        self.cx, self.dt, self.t, self.s = cx, dt, t, s
        self.mask: Entry | None = None       # attn_mask as given (padded)
        self.keeps: list[Entry] = []         # bool conditions, all must hold
        self._pos = None

    def positions(self, offset):
        """(query positions + offset [t, 1] or [b, 1, t, 1], key positions [1, s])."""
        cx = self.cx
        if self._pos is None:
            i = cx.op("reshape", cx.op("range", start=[0], limit=[self.t]), shape=[self.t, 1])
            j = cx.op("reshape", cx.op("range", start=[0], limit=[self.s]), shape=[1, self.s])
            self._pos = i, j
        i, j = self._pos
        if isinstance(offset, Value):    # per batch: [b] -> [b, 1, 1, 1]
            offset = cx.op("reshape", offset, shape=[_shape(offset)[0], 1, 1, 1])
        elif offset == 0:
            return i, j
        else:
            offset = _dim(offset, "i64")
        return cx.op("add", i, offset), j

    def keep_causal(self, offset, left: int, right: int, causal: bool):
        p, j = self.positions(offset)
        if causal:
            self.keeps.append(self.cx.op("less_equal", j, p))
        if left >= 0:
            self.keeps.append(self.cx.op("greater_equal", j, self.cx.op(
                "sub", p, _scalar(left, "i64"))))
        if right >= 0:
            self.keeps.append(self.cx.op("less_equal", j, self.cx.op(
                "add", p, _scalar(right, "i64"))))

    def keep_below(self, lengths: Value):
        """Keys at or past each batch's length are padding: [b, 1, 1, s]."""
        _, j = self.positions(0)
        b = _shape(lengths)[0]
        self.keeps.append(self.cx.op("less", j, self.cx.op(
            "reshape", lengths, shape=[b, 1, 1, 1])))

    def _neg_inf_where_not(self, keep: Entry) -> Entry:
        return self.cx.op("where", keep, _scalar(0, self.dt), _scalar(-np.inf, self.dt))

    def bias(self) -> Entry | None:
        """Everything as one additive bias (0 or -inf, plus a float mask), or None."""
        cx, parts = self.cx, []
        if self.mask is not None:
            parts.append(self._neg_inf_where_not(self.mask) if _dtype(self.mask) == "bool"
                         else self.mask)
        parts += [self._neg_inf_where_not(k) for k in self.keeps]
        if not parts:
            return None
        acc = parts[0]
        for p in parts[1:]:
            acc = cx.op("add", acc, p)
        return acc

    def one_mask(self) -> Entry | None:
        """Everything as the `attention` op's one mask: bool if the given mask is bool
        (or absent), else the float mask with -inf where a keep-condition fails."""
        cx = self.cx
        keep = None
        for k in self.keeps:
            keep = k if keep is None else cx.op("logical_and", keep, k)
        if self.mask is None or keep is None:
            return self.mask if keep is None else keep
        if _dtype(self.mask) == "bool":
            return cx.op("logical_and", self.mask, keep)
        return cx.op("where", keep, self.mask, _scalar(-np.inf, self.dt))


def _empty_rows(cx: _Importer, bias: Entry, dt: str) -> Entry:
    """True for query rows whose bias is -inf everywhere (ONNX zeroes their output)."""
    top = cx.op("reduce_max", bias, axes=[-1], keepdims=True)
    return cx.op("equal", top, _scalar(-np.inf, dt))


def _attention(cx: _Importer, n: OnnxNode):
    """Attention (opset 23-25): see the module docstring."""
    q, k, v = n.x(0), n.x(1), n.x(2)
    dt = _dtype(q)
    if dt not in FLOAT_DTYPES or _dtype(k) != dt or _dtype(v) != dt:
        raise ShapeError(f"{n.where}: Q, K, V must share one float dtype, got "
                         f"{_dtype(q)}, {_dtype(k)}, {_dtype(v)}")
    rank = len(_shape(q))
    if not rank == len(_shape(k)) == len(_shape(v)) or rank not in (3, 4):
        raise ShapeError(f"{n.where}: Q, K, V must all be 3-D or all 4-D, got "
                         f"{list(_shape(q))}, {list(_shape(k))}, {list(_shape(v))}")
    if rank == 3:
        hq, hk = n.attr("q_num_heads"), n.attr("kv_num_heads")
        if not hq or not hk:
            raise ShapeError(f"{n.where}: 3-D inputs need q_num_heads and kv_num_heads")
        q, k, v = (_split_heads(cx, n, x, h, w) for x, h, w in
                   ((q, hq, "Q"), (k, hk, "K"), (v, hk, "V")))
    past_k, past_v, nonpad = n.x(4), n.x(5), n.x(6)
    if (past_k is None) != (past_v is None):
        raise ShapeError(f"{n.where}: past_key and past_value come together")
    if nonpad is not None and past_k is not None:
        raise ShapeError(f"{n.where}: nonpad_kv_seqlen cannot be used with past_key")
    if past_k is not None:   # the cache update: present = concat(past, new)
        if not all(isinstance(_shape(x)[2], int) for x in (past_k, k)):
            raise n.unsupported(
                f"past_key {list(_shape(past_k))} and K {list(_shape(k))}: appending "
                "along a symbolic sequence length gives a sum of symbols, which tensorc's "
                "dims cannot say (a static cache written with TensorScatter can)")
        k = cx.op("concat", past_k, k, axis=2)
        v = cx.op("concat", past_v, v, axis=2)
    b, h, t, d = _shape(q)
    hk, s = _shape(k)[1], _shape(k)[2]
    if not (isinstance(h, int) and isinstance(hk, int) and hk > 0 and h % hk == 0):
        raise ShapeError(f"{n.where}: {hk} key/value heads do not divide {h} query heads")

    scale = n.attr("scale")
    if scale is None:
        if not isinstance(d, int):
            raise n.unsupported(f"the default scale needs a static head size, got {d}")
        scale = 1 / math.sqrt(d)
    causal = bool(n.attr("is_causal", 0))
    left, right = n.attr("left_window_size", -1), n.attr("right_window_size", -1)
    softcap = n.attr("softcap", 0.0)
    mode = n.attr("qk_matmul_output_mode", 0)
    if mode not in QK_MODES:
        raise n.unsupported(f"qk_matmul_output_mode {mode} (ONNX defines 0 to 3)")
    want_qk = len(n.outputs) > 3 and n.outputs[3] != ""
    precision = n.attr("softmax_precision")
    precision = dt if precision is None else onnx_dtype(precision, n.where)

    masks = _Masks(cx, dt, t, s)
    if n.has(3):
        masks.mask = _padded_mask(cx, n, n.x(3), dt, s)
    # the causal frontier and the window sit at offset + i for query i: the cached keys
    # before it (past_key), or each batch's valid keys past the query block
    if nonpad is not None:
        nonpad = nonpad if _dtype(nonpad) == "i64" else cx.op("cast", nonpad, dtype="i64")
    offset = _shape(past_k)[2] if past_k is not None else \
        cx.op("sub", nonpad, _dim(t, "i64")) if nonpad is not None else 0
    top_left = causal and isinstance(offset, int) and offset == 0
    # f16/bf16 go the composed way: the op's online softmax would round in the narrow type
    fused = softcap == 0 and not want_qk and precision == dt and dt in ("f32", "f64")
    causal_attr = fused and top_left and left < 0 and right < 0   # the op's own
    if causal and not causal_attr or left >= 0 or right >= 0:
        masks.keep_causal(offset, left, right, causal)
    if nonpad is not None:
        masks.keep_below(nonpad)
    may_empty = masks.mask is not None or masks.keeps

    if fused:
        mask = masks.one_mask()
        y = cx.op("attention", q, k, v, *([mask] if mask is not None else []),
                  scale=float(scale), causal=causal_attr)
        if may_empty:
            if causal_attr:   # the guard's bias needs the causal part too
                masks.keep_causal(0, -1, -1, True)
            y = cx.op("where", _empty_rows(cx, masks.bias(), dt), _scalar(0, dt), y)
        qk = None
    else:
        y, qk = _composed(cx, q, k, v, masks.bias(), scale, softcap, mode, precision, dt)
    if rank == 3:
        y = cx.op("reshape", cx.op("transpose", y, perm=[0, 2, 1, 3]),
                  shape=[b, t, dim_product([h, _shape(y)[3]])])
    return [y, k, v] + ([qk] if want_qk else [])


def _padded_mask(cx: _Importer, n: OnnxNode, mask: Entry, dt: str, s) -> Entry:
    """attn_mask with its key axis padded to s (False, or -inf for a float mask), as ONNX
    allows a shorter one; a float mask in q's dtype."""
    mdt = _dtype(mask)
    if mdt != "bool" and mdt not in FLOAT_DTYPES:
        raise ShapeError(f"{n.where}: attn_mask must be bool or float, got {mdt}")
    if mdt not in ("bool", dt):
        mask = cx.op("cast", mask, dtype=dt)
    shape = list(_shape(mask))
    last = shape[-1]
    if last == s:
        return mask
    if not (isinstance(last, int) and isinstance(s, int) and last < s):
        raise n.unsupported(f"attn_mask's key axis {last} does not fit the {s} keys")
    pad = cx.op("full", shape=shape[:-1] + [s - last],
                value=False if _dtype(mask) == "bool" else -math.inf, dtype=_dtype(mask))
    return cx.op("concat", mask, pad, axis=-1)


def _composed(cx: _Importer, q, k, v, bias, scale, softcap, mode, precision, dt):
    """ONNX's own composition: (y, qk_matmul_output in `mode`)."""
    h = _shape(q)[1]
    root = _scalar(np.sqrt(np.float64(scale)), dt)   # ONNX scales q and k by sqrt(scale)
    k, v = _repeat_heads(cx, k, h), _repeat_heads(cx, v, h)
    scores = cx.op("matmul", cx.op("mul", q, root),
                   cx.op("transpose", cx.op("mul", k, root), perm=[0, 1, 3, 2]))
    qk = scores
    if softcap > 0:
        c = _scalar(softcap, dt)
        scores = cx.op("mul", cx.op("tanh", cx.op("div", scores, c)), c)
        qk = scores if mode == 1 else qk
    if bias is not None:
        scores = cx.op("add", scores, bias)
    if mode == 2:
        qk = scores
    if precision != dt:
        scores = cx.op("cast", scores, dtype=precision)
    p = cx.op("softmax", scores, axis=-1)
    if bias is not None:
        p = cx.op("where", _empty_rows(cx, bias, dt), _scalar(0, precision), p)
    if precision != dt:
        p = cx.op("cast", p, dtype=dt)
    if mode == 3:
        qk = p
    return cx.op("matmul", p, v), qk


def _rotary_embedding(cx: _Importer, n: OnnxNode):
    """RotaryEmbedding (opset 23): see the module docstring."""
    x, cos, sin = n.x(0), n.x(1), n.x(2)
    shape = list(_shape(x))
    if len(shape) == 3:
        heads = n.attr("num_heads")
        size = dim_divide(shape[2], heads) if isinstance(heads, int) and heads > 0 else None
        if size is None:
            raise ShapeError(f"{n.where}: 3-D input {shape} needs num_heads dividing its "
                             f"hidden size, got {heads}")
        xs = cx.op("reshape", x, shape=[shape[0], shape[1], heads, size])
        head_axis = 2          # [b, s, heads, d]
    elif len(shape) == 4:
        xs, head_axis = x, 1   # [b, heads, s, d]
    else:
        raise ShapeError(f"{n.where}: input must be 3-D or 4-D, got {shape}")
    d = _shape(xs)[3]
    rot = n.attr("rotary_embedding_dim", 0) or d
    if not isinstance(rot, int) or rot % 2 or (isinstance(d, int) and rot > d):
        raise ShapeError(f"{n.where}: rotary_embedding_dim {rot} must be even and at most "
                         f"the head size {d}")
    if n.has(3):
        ids = n.x(3)
        cos, sin = cx.op("gather", cos, ids, axis=0), cx.op("gather", sin, ids, axis=0)
    for c in (cos, sin):
        if len(_shape(c)) != 3 or _shape(c)[-1] != rot // 2:
            raise ShapeError(f"{n.where}: cos/sin {list(_shape(c))} should be [batch, seq, "
                             f"{rot // 2}] (after position_ids)")
    cos, sin = (cx.op("unsqueeze", c, axes=[head_axis]) for c in (cos, sin))
    dt = _dtype(x)
    cos, sin = (c if _dtype(c) == dt else cx.op("cast", c, dtype=dt) for c in (cos, sin))

    def part(start, end, step=1):
        return cx.op("slice", xs, starts=[start], ends=[end], axes=[3], steps=[step])

    if n.attr("interleaved", 0):
        x1, x2 = part(0, rot, 2), part(1, rot, 2)
    else:
        x1, x2 = part(0, rot // 2), part(rot // 2, rot)
    real = cx.op("sub", cx.op("mul", cos, x1), cx.op("mul", sin, x2))
    imag = cx.op("add", cx.op("mul", sin, x1), cx.op("mul", cos, x2))
    if n.attr("interleaved", 0):   # real and imaginary parts alternate again
        pair = cx.op("concat", cx.op("unsqueeze", real, axes=[4]),
                     cx.op("unsqueeze", imag, axes=[4]), axis=4)
        rotated = cx.op("reshape", pair, shape=list(_shape(real)[:3]) + [rot])
    else:
        rotated = cx.op("concat", real, imag, axis=3)
    out = rotated if rot == d else cx.op("concat", rotated, part(rot, d), axis=3)
    return [cx.op("reshape", out, shape=shape) if len(shape) == 3 else out]


HANDLERS = {"Attention": _attention, "RotaryEmbedding": _rotary_embedding}
