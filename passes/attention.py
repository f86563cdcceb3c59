"""Attention fusion: ``softmax(matmul(q, transpose(k)) * scale + mask) @ v`` -> `attention`.

The rule's pattern is the outside of the computation,
``matmul(softmax(scores, last axis), v)``; `analyse` then peels `scores` from the
softmax inward, accepting the variants real exporters write:

- the scale as a `mul` or `div` by a scalar constant, on the scores, on q, on k (before
  or after its transpose), or split over q and k (sqrt(scale) each, as PyTorch's
  exported scaled_dot_product_attention does); scales multiply up;
- masks as `where(keep, scores, fill)` / `where(drop, fill, scores)` with a scalar
  constant `fill` (bool masks) and as `scores + bias` (additive masks), in any
  number and order, before or after the scale;
- k given as [b,h,s,d] and transposed for the matmul, or transposed inside it straight
  from the [b,s,h,d] head split (perm [0,2,3,1]), or transposed as 3-d between two
  reshapes (``[b,h,s,d] -> [b*h,s,d] -> [b*h,d,s] -> [b,h,d,s]``, PyTorch's dynamo
  exporter);
- k and v repeated per group of query heads (grouped-query attention, Hugging Face's
  `repeat_kv`: ``reshape(expand(unsqueeze(x, 2)), [b, h, s, d])`` from [b, hk, s, d],
  the unsqueeze also written as a reshape; k also reshaped straight from the expand to
  [b*h, s, d] and transposed as 3-d, as PyTorch's dynamo exporter writes Hugging Face's
  sdpa attention): the op takes the un-repeated k and v,
  which its kernels read in place (query head i reads kv head i // (h / hk));
- the probabilities NaN-guarded, ``where(isnan(p), 0, p)`` (PyTorch's exported
  scaled_dot_product_attention): the guard moves to the output, where a row of NaN
  (every key masked with -inf) becomes a row of zeros, as ``0 @ v`` is for finite v.

Causal masks (constant lower-triangular keep masks, `trilu(full(true))` with symbolic
sizes, a slice of a constant triangular buffer starting at 0, or an additive 0/-inf
constant) become ``causal=True``; any other mask is passed to the op as is, so
fusing never depends on guessing what a mask holds.

`explain_attention(graph)` runs the same analysis on every softmax left in a graph
and says which part failed and at which node.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tensorc.errors import ShapeError
from tensorc.ir import Graph, TensorType, Value, dim_product
from tensorc.ops import get_op

from .manager import EXPLAINERS
from .pattern import Var, all_equal, op, rule
from .rewrite import Context, apply_rules, dce, graph_pass, inline_regions

# An additive constant mask counts as causal when its masked entries are at most this:
# exp() of them is exactly 0 in float32 whatever the scores are.
ADDITIVE_NEG = -1e9


class Failure(Exception):
    """Why a softmax is not the middle of an attention: the reason and the node."""

    def __init__(self, reason: str, node=None, depth: int = 0):
        super().__init__(reason)
        self.reason, self.node, self.depth = reason, node, depth

    def line(self, softmax) -> str:
        at = f" at {self.node.where}" if self.node is not None else ""
        return f"softmax %{softmax.outputs[0].name}: not fused: {self.reason}{at}"


@dataclass
class Mask:
    value: Value
    kind: str            # "keep" (bool, True = attend), "drop" (bool, True = masked), "add"
    fill: float = 0.0    # what masked scores become (bool masks)
    factor: float = 1.0  # a scale applied after the mask (additive masks are scaled by it)


@dataclass
class Found:
    q: Value
    k: Value            # before `k_perm`
    k_perm: tuple       # the transpose that makes k [b,h,s,d] (identity: none)
    v: Value
    scale: float = 1.0
    masks: list = field(default_factory=list)   # as peeled, outermost last
    nan_guard: bool = False  # the probabilities were where(isnan(p), 0, p)
    # decided by _plan_masks:
    causal: bool = False
    mask_value: float = -np.inf
    bool_masks: list = field(default_factory=list)
    add_masks: list = field(default_factory=list)


def _scalar(ctx: Context, v: Value) -> float | None:
    data = ctx.constant(v)
    return None if data is None or data.dtype.kind != "f" else all_equal(data)


def _unscale(ctx: Context, v: Value) -> tuple[float, Value]:
    """Peel multiplications/divisions by scalar constants that keep v's type."""
    scale = 1.0
    while v.producer is not None and v.producer.op in ("mul", "div"):
        n = v.producer
        sides = (0, 1) if n.op == "mul" else (0,)
        for i in sides:
            c = _scalar(ctx, n.inputs[1 - i])
            if c is not None and c != 0 and n.inputs[i].type == v.type:
                scale *= c if n.op == "mul" else 1.0 / c
                v = n.inputs[i]
                break
        else:
            break
    return scale, v


def _peel(ctx: Context, v: Value, depth: int = 0):
    """scores -> (scale, masks, q·k^T matmul node), from the softmax inward."""
    n = v.producer
    if n is None:
        raise Failure(f"the scores %{v.name} are an input or constant, not q @ k^T", None, depth)
    if n.op == "matmul":
        return 1.0, [], n
    if n.op in ("mul", "div"):
        for i in ((0, 1) if n.op == "mul" else (0,)):
            c = _scalar(ctx, n.inputs[1 - i])
            if c is not None and c != 0 and n.inputs[i].type == v.type:
                c = c if n.op == "mul" else 1.0 / c
                scale, masks, mm = _peel(ctx, n.inputs[i], depth + 1)
                for mk in masks:
                    if mk.kind != "add" and c <= 0:
                        raise Failure("a non-positive scale after a boolean mask", n, depth)
                    mk.fill *= c
                    mk.factor *= c
                return scale * c, masks, mm
        raise Failure(f"the scores are scaled by %{n.inputs[-1].name}, not a scalar "
                      "constant", n, depth)
    if n.op == "add":
        fails = []
        for i in (0, 1):
            s, m = n.inputs[i], n.inputs[1 - i]
            if s.type != v.type or m.type.dtype != v.type.dtype:
                continue
            try:
                scale, masks, mm = _peel(ctx, s, depth + 1)
                return scale, masks + [Mask(m, "add")], mm
            except Failure as f:
                fails.append(f)
        raise max(fails, key=lambda f: f.depth) if fails else \
            Failure("an add that broadcasts the scores to a bigger shape", n, depth)
    if n.op == "where":
        cond, a, b = n.inputs
        for scores, fill, kind in ((a, b, "keep"), (b, a, "drop")):
            c = _scalar(ctx, fill)
            if c is not None and scores.type == v.type:
                scale, masks, mm = _peel(ctx, scores, depth + 1)
                return scale, masks + [Mask(cond, kind, c)], mm
        raise Failure("a where that does not fill masked scores with a scalar constant",
                      n, depth)
    raise Failure(f"the scores come from {n.op}; expected q @ k^T, a scale or a mask",
                  n, depth)


def _nan_guarded(ctx: Context, p: Value) -> Value | None:
    """``where(isnan(p), 0, p)`` (isnan imported as ``not(equal(p, p))``) when it is the
    only use of `p`: what PyTorch's exported scaled_dot_product_attention writes so
    that rows whose keys are all masked give 0 instead of NaN."""
    users = ctx.users.get(p, [])
    uses = list(dict.fromkeys(users))  # equal(p, p) is listed once per input
    eq = [u for u in uses if u.op == "equal" and u.inputs[0] is p and u.inputs[1] is p]
    guards = [u for u in uses if u.op == "where" and u.inputs[2] is p]
    if len(eq) != 1 or len(guards) != 1 or len(uses) != 2 or p in ctx.outputs:
        return None
    nots = ctx.users.get(eq[0].outputs[0], [])
    where = guards[0]
    if len(nots) != 1 or nots[0].op != "logical_not" or \
            where.inputs[0] is not nots[0].outputs[0] or _scalar(ctx, where.inputs[1]) != 0:
        return None
    return where.outputs[0]


def _as_transpose(v: Value) -> tuple[Value, tuple] | None:
    """v as (x, perm) with v == transpose(x, perm): a transpose, or the
    reshape -> transpose -> reshape that merges leading dims, transposes the rest and
    splits them back (``[b,h,s,d] -> [b*h,s,d] -> [b*h,d,s] -> [b,h,d,s]``)."""
    n = v.producer
    if n is None:
        return None
    if n.op == "transpose":
        x = n.inputs[0]
        return x, tuple(n.attrs["perm"] or range(x.type.rank - 1, -1, -1))
    t = n.inputs[0].producer if n.op == "reshape" else None
    r = t.inputs[0].producer if t is not None and t.op == "transpose" else None
    if r is None or r.op != "reshape" or not t.attrs["perm"] or t.attrs["perm"][0] != 0:
        return None
    x = r.inputs[0].type.shape
    merged, moved = r.outputs[0].type.shape, t.outputs[0].type.shape
    for j in range(1, len(x) + 1):
        if merged == (dim_product(x[:j]), *x[j:]) and v.type.shape == (*x[:j], *moved[1:]):
            return r.inputs[0], tuple(range(j)) + tuple(j - 1 + a for a in t.attrs["perm"][1:])
    return None


def _repeat_source(e: Value) -> tuple[Value, int] | None:
    """e [b, hk, g, s, d] as (x, g) when e is x [b', hk, s, d] with a unit axis
    inserted after the heads (unsqueeze or reshape) and expanded to g copies."""
    n = e.producer
    u = n.inputs[0].producer if n is not None and n.op == "expand" else None
    if u is None or u.op not in ("unsqueeze", "reshape") or e.type.rank != 5:
        return None
    x = u.inputs[0]
    b, hk, g, s, d = e.type.shape
    if x.type.rank != 4 or u.outputs[0].type.shape != \
            (x.type.shape[0], x.type.shape[1], 1, *x.type.shape[2:]) \
            or x.type.shape[0] not in (b, 1) or x.type.shape[1:] != (hk, s, d) \
            or not (isinstance(hk, int) and isinstance(g, int)):
        return None
    return x, g


def _unrepeat(v: Value) -> tuple[Value, int] | None:
    """v [b, h, s, d] as (x, g) with v == x [b', h/g, s, d] repeated g times per head
    (Hugging Face's repeat_kv: a reshape of `_repeat_source`'s expand)."""
    r = v.producer
    if r is None or r.op != "reshape" or v.type.rank != 4:
        return None
    found = _repeat_source(r.inputs[0])
    b, h, s, d = v.type.shape
    five = r.inputs[0].type.shape
    if found is None or not isinstance(h, int) or five[1] * five[2] != h \
            or five[0] != b or five[3:] != (s, d):
        return None
    return found


def _unrepeat_kt(kt: Value) -> tuple[Value, int] | None:
    """k^T [b, h, d, s] as (x, g) with k == x repeated g times per head, transposed as
    3-d between two reshapes straight from the expand (PyTorch's dynamo export of
    repeat_kv then matmul: ``[b,hk,g,s,d] -> [b*h,s,d] -> [b*h,d,s] -> [b,h,d,s]``)."""
    r2 = kt.producer
    t = r2.inputs[0].producer if r2 is not None and r2.op == "reshape" else None
    r1 = t.inputs[0].producer if t is not None and t.op == "transpose" else None
    if r1 is None or r1.op != "reshape" or tuple(t.attrs["perm"] or ()) != (0, 2, 1):
        return None
    found = _repeat_source(r1.inputs[0])
    if found is None or kt.type.rank != 4:
        return None
    b, hk, g, s, d = r1.inputs[0].type.shape
    h = hk * g
    if r1.outputs[0].type.shape != (dim_product((b, h)), s, d) \
            or kt.type.shape != (b, h, d, s):
        return None
    return found


def analyse(ctx: Context, softmax) -> Found:
    """Match the attention around `softmax`, or raise `Failure` saying why not."""
    p = softmax.outputs[0]
    rank = p.type.rank
    if softmax.attrs["axis"] % rank != rank - 1:
        raise Failure(f"softmax over axis {softmax.attrs['axis']}, not the last (key) axis",
                      softmax, 0)
    guarded = _nan_guarded(ctx, p)
    p = guarded or p
    users = ctx.users.get(p, [])
    if len(users) != 1 or users[0].op != "matmul" or users[0].inputs[0] is not p:
        ops = ", ".join(u.op for u in dict.fromkeys(users)) or "nothing"
        raise Failure(f"the probabilities feed {ops}, not one matmul with v", softmax, 0)
    pv = users[0]
    scale, masks, mm = _peel(ctx, softmax.inputs[0], 1)
    if rank != 4 or any(v.type.rank != 4 for v in (*mm.inputs, pv.inputs[1])):
        raise Failure(f"the scores are {mm.outputs[0].type} from {mm.inputs[0].type} @ "
                      f"{mm.inputs[1].type}; attention needs [batch, heads, queries, keys] "
                      "from rank-4 q, k^T and v", mm, 99)
    sq, q = _unscale(ctx, mm.inputs[0])
    sk, kt = _unscale(ctx, mm.inputs[1])
    k, perm = kt, (0, 1, 3, 2)
    seen = _as_transpose(kt)
    if seen is not None and len(seen[1]) == 4:
        inner = seen[1]
        sk2, k = _unscale(ctx, seen[0])
        sk *= sk2
        perm = tuple(inner[:2]) + (inner[3], inner[2])
    v = pv.inputs[1]
    # grouped-query attention: attend to k and v un-repeated
    rk = _unrepeat(k) if perm == (0, 1, 2, 3) else \
        _unrepeat_kt(k) if perm == (0, 1, 3, 2) else None
    rv = _unrepeat(v) if rk is not None else None
    if rk is not None and rv is not None and rk[1] == rv[1]:
        k, perm, v = rk[0], (0, 1, 2, 3), rv[0]
    found = Found(q, k, perm, v, scale * sq * sk, masks, guarded is not None)
    split = _split_causal(ctx, masks, *mm.outputs[0].type.shape[-2:])
    if split is not None:   # a causal triangle ANDed into the padding mask
        try:
            _plan_masks(ctx, Found(**{**found.__dict__, "masks": split, "causal": True}), mm)
            found.masks, found.causal = split, True
        except Failure:
            pass
    _plan_masks(ctx, found, mm)
    return found


def _positions(v: Value, axis: int):
    """The `range` from 0 by 1 that `v` is, laid along `axis` (-1 keys, -2 queries) of
    its last two dims through unsqueezes and reshapes; else None."""
    shape = v.type.shape
    if v.type.rank < 2 or shape[axis] == 1 or shape[-3 - axis] != 1:
        return None
    while v.producer is not None and v.producer.op in ("unsqueeze", "reshape"):
        v = v.producer.inputs[0]
    r = v.producer
    if r is None or r.op != "range" or r.attrs["start"] != (0,) or r.attrs["delta"] != 1:
        return None
    return r


def _and_terms(v: Value) -> list[Value]:
    n = v.producer
    if n is not None and n.op == "logical_and":
        return _and_terms(n.inputs[0]) + _and_terms(n.inputs[1])
    return [v]


def _split_causal(ctx: Context, masks: list, t, s) -> list | None:
    """Hugging Face's merged masks, ``scores + where(kpos <= qpos & keep, 0, min)``
    (kpos, qpos: one range from 0 along the key and the query axes), as the causal
    flag plus the other terms as keep-masks; None where there is no such mask."""
    for i, mk in enumerate(masks):
        n = mk.value.producer
        if mk.kind != "add" or n is None or n.op != "where":
            continue
        zero, fill = _scalar(ctx, n.inputs[1]), _scalar(ctx, n.inputs[2])
        if zero != 0 or fill is None or fill * mk.factor > ADDITIVE_NEG:
            continue
        terms = _and_terms(n.inputs[0])
        for j, term in enumerate(terms):
            c = term.producer
            if c is None or c.op not in ("less_equal", "greater_equal"):
                continue
            key, query = c.inputs if c.op == "less_equal" else c.inputs[::-1]
            rk, rq = _positions(key, -1), _positions(query, -2)
            if rk is None or rq is None or rk.attrs["limit"] != (s,) \
                    or rq.attrs["limit"] != (t,):
                continue
            keeps = [Mask(x, "keep", fill * mk.factor) for x in terms[:j] + terms[j + 1:]
                     if ctx.constant(x) is None or not ctx.constant(x).all()]
            return masks[:i] + keeps + [Mask(term, "causal", fill * mk.factor)] \
                + masks[i + 1:]
    return None


def _is_tril(data: np.ndarray, t, s) -> bool:
    """Whether bool `data` is the [t, s] keep-mask j <= i (leading dims of size 1)."""
    if data.dtype != np.bool_ or data.shape[-2:] != (t, s) or data.size != t * s:
        return False
    return bool(np.array_equal(data.reshape(t, s), np.tri(t, s, dtype=bool)))


def _causal(ctx: Context, mk: Mask, t, s) -> bool:
    """Whether a mask says exactly 'query i sees keys j <= i'."""
    data = ctx.constant(mk.value, limit=1 << 22)
    if data is not None and isinstance(t, int) and isinstance(s, int):
        if mk.kind == "add":
            if data.dtype.kind != "f" or data.shape[-2:] != (t, s) or data.size != t * s:
                return False
            tri = np.tri(t, s, dtype=bool)
            d = data.reshape(t, s)
            return bool(np.all(d[tri] == 0) and np.all(d[~tri] * mk.factor <= ADDITIVE_NEG))
        return _is_tril(data if mk.kind == "keep" else ~data, t, s)
    # Symbolic sizes: recognise the two causal constructions structurally.
    n = mk.value.producer
    if mk.kind != "keep" or n is None or mk.value.type.shape[-2:] != (t, s):
        return False
    if n.op == "trilu" and not n.attrs["upper"] and n.attrs["k"] == 0:
        f = n.inputs[0].producer
        return f is not None and f.op == "full" and f.attrs["value"] is True
    if n.op == "slice" and all(x == 0 for x in n.attrs["starts"]) \
            and (n.attrs["steps"] is None or set(n.attrs["steps"]) == {1}):
        buf = ctx.constant(n.inputs[0], limit=1 << 24)
        return buf is not None and buf.ndim >= 2 and _is_tril(buf, *buf.shape[-2:])
    return False


def _plan_masks(ctx: Context, f: Found, mm) -> None:
    """Decide causal / mask input / mask_value; raises Failure when they cannot be one op."""
    t, s = mm.outputs[0].type.shape[-2:]
    rest = []
    # An additive causal mask may become the flag only if masked scores stay tiny
    # under the bool masks' fill value too.
    soft_fill = any(mk.fill > ADDITIVE_NEG for mk in f.masks if mk.kind != "add")
    for mk in f.masks:
        if mk.kind == "causal":   # split out of a merged mask already (_split_causal)
            rest.append(mk)
            continue
        if not f.causal and not (mk.kind == "add" and soft_fill) and _causal(ctx, mk, t, s):
            f.causal = True
            if mk.kind != "add":
                rest.append(Mask(mk.value, "causal", mk.fill))
            continue
        rest.append(mk)
    fills = {mk.fill for mk in rest if mk.kind in ("keep", "drop")}
    causal_fill = [mk.fill for mk in rest if mk.kind == "causal"]
    if causal_fill and fills and causal_fill[0] not in fills \
            and max(causal_fill[0], *fills) <= ADDITIVE_NEG:
        causal_fill = []  # causal never masks a whole row: any tiny fill gives exp() = 0
    fills.update(causal_fill)
    if len(fills) > 1:
        raise Failure(f"boolean masks fill with different values {sorted(fills)}", mm, 99)
    f.mask_value = fills.pop() if fills else -np.inf
    bools = [mk for mk in rest if mk.kind in ("keep", "drop")]
    adds = [mk for mk in rest if mk.kind == "add"]
    if bools and adds and f.mask_value != -np.inf:
        raise Failure("a boolean mask with a finite fill and an additive mask together",
                      mm, 99)
    f.bool_masks, f.add_masks = bools, adds


def _build(f: Found, b):
    """The replacement: one attention node (plus the mask combination, if any)."""
    dtype = f.q.type.np_dtype
    k = f.k if f.k_perm == (0, 1, 2, 3) else b.op("transpose", f.k, perm=f.k_perm)
    keeps = [mk.value if mk.kind == "keep" else b.op("logical_not", mk.value)
             for mk in f.bool_masks]
    keep = None
    for m in keeps:
        keep = m if keep is None else b.op("logical_and", keep, m)
    adds = [mk.value if mk.factor == 1.0 else
            b.op("mul", mk.value, b.const(mk.factor, dtype, "mask_scale")) for mk in f.add_masks]
    if keep is not None and adds:  # fill is -inf here, so this is exact
        adds.append(b.op("where", keep, b.const(0, dtype, "zero"),
                         b.const(-np.inf, dtype, "neg_inf")))
        keep = None
    mask = keep
    for a in adds:
        mask = a if mask is None else b.op("add", mask, a)
    out = b.op("attention", f.q, k, f.v, *([mask] if mask is not None else []),
               scale=float(f.scale), causal=f.causal, mask_value=float(f.mask_value))
    if f.nan_guard:  # a row of NaN probabilities makes a row of NaN outputs: zero those
        nan = b.op("logical_not", b.op("equal", out, out))
        out = b.op("where", nan, b.const(0, dtype, "zero"), out)
    return out


_probs = op.softmax(Var("scores"), name="p")


@rule(op.matmul(_probs | op.where(Var("isnan"), Var("zero"), _probs), Var("v")))
def fuse_attention_rule(m, b):
    """matmul(softmax(scale * q @ k^T + masks), v) -> attention(q, k, v, mask), also with
    the probabilities NaN-guarded"""
    try:
        return _build(analyse(m.ctx, m["p"].producer), b)
    except (Failure, ShapeError):
        return None


@graph_pass("fuse-attention")
def fuse_attention(g: Graph) -> Graph:
    """Rewrite every scaled-dot-product attention into one `attention` op."""
    apply_rules(g, [fuse_attention_rule])
    dce(g)


def explain_attention(g: Graph) -> list[str]:
    """One line per softmax that attention fusion would not rewrite, saying why
    (softmaxes inside fused regions included)."""
    if any(n.op == "fused" for n in g.nodes):
        g = inline_regions(g)
    ctx = Context(g)
    lines = []
    for n in g.nodes:
        if n.op != "softmax":
            continue
        try:
            _check_types(analyse(ctx, n))
        except Failure as f:
            lines.append(f.line(n))
    return lines


def _check_types(f: Found) -> None:
    k = f.k.type
    kt = TensorType(tuple(k.shape[i] for i in f.k_perm), k.dtype)
    try:
        get_op("attention").infer(f.q.type, kt, f.v.type, scale=1.0, causal=False,
                                  mask_value=0.0)
    except ShapeError as e:
        raise Failure(f"q, k, v do not fit the attention op: {e}", f.q.producer, 99) from None


EXPLAINERS["attention"] = explain_attention
