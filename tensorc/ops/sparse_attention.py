"""Sparse and linear attention: `local_attention`, `block_sparse_attention`,
`linear_attention`.

The two sparse ops are the `attention` op (same layout, scale, mask and grouped-query
heads: `tensorc/ops/attention.py`) restricted to a *pattern* of visible (query, key)
pairs; a pair outside the pattern gets no weight at all (as if its score were -inf,
whatever `mask_value` says: that only applies to the explicit mask).

    local_attention      key j is visible to query i when i - before <= j <= i + after
                         and (i - j) % dilation == 0 (Longformer's sliding window;
                         Mistral's causal one is before = W - 1, after = 0)
    block_sparse_attention
                         blocks of `block` positions (aligned at 0): query block a sees
                         key blocks a - local_blocks .. a + local_blocks and
                         `random_blocks` more drawn per query block from `seed`
                         (BigBird's random attention)
    both                 `global_tokens` (positions) see every key and are seen by
                         every query (Longformer's / BigBird's global attention);
                         `causal` then removes every pair with j > i (top-left aligned,
                         as in `attention`)

`pattern(op, t, s, attrs)` spells a pattern out as row groups, each a range of query
rows with the key intervals its rows visit; an interval is either plain (every key in
it is visible) or *banded* (only keys within the window of the row). The reference,
the FLOP count, the decomposition and the kernels all read this one description, and
none of them ever builds the t x s scores: memory is O(t x window).

`linear_attention(q, k, v, features, [mask])` is Performer's FAVOR+ (Choromanski et
al. 2021), an approximation of softmax attention in time and memory linear in the
sequence: with x' = sqrt(scale) x (so that q'.k' = scale q.k) and positive random
features phi(x) = exp(w x' - |x'|^2 / 2) for the m rows w of `features` [m, d],
exp(q'.k') = E[phi(q) . phi(k)], and

    out_i = phi(q_i) . sum_j phi(k_j) v_j^T  /  phi(q_i) . sum_j phi(k_j)

summing over all keys, or j <= i when causal (prefix sums). Numerically stabilised as
Performer does: each query row's features are divided by their largest, and all the
keys' of one (batch, head) by their largest (factors that cancel in the ratio).
`performer_features(d, m, seed)` draws the features: blocks of orthogonal Gaussian
directions with chi-distributed lengths. The mask may only depend on the key (a
padding mask, broadcasting to [b, h, 1, s]): a bool keeps keys, a float is added to
their scores (multiplies their features by exp(mask)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ShapeError, TensorcError
from . import vjp
from .attention import _infer as _attention_infer
from .attention import _repeat_np, _scores, repeat_kv
from .registry import Attr, OpDef, get_op, numel, register

if TYPE_CHECKING:
    from ..ir import Graph

NO_LIMIT = 1 << 62   # a band edge that never cuts


@dataclass(frozen=True)
class Pattern:
    """Which keys each query row sees. `groups`: (i0, i1, intervals) with intervals
    (lo, hi, banded), disjoint within a group: rows i0 <= i < i1 see the keys lo <= j < hi
    of each interval, of a banded one only those with i - before <= j <= i + after and
    (i - j) % dilation == 0; and with `causal` only j <= i anywhere."""
    groups: tuple
    before: int = NO_LIMIT
    after: int = NO_LIMIT
    dilation: int = 1
    causal: bool = False

    def keys(self, i0: int, i1: int, lo: int, hi: int, banded: bool) -> tuple[int, int]:
        """The key range [lo, hi) an interval can contribute to rows [i0, i1)."""
        if banded:
            lo, hi = max(lo, i0 - self.before), min(hi, i1 + self.after)
        if self.causal:
            hi = min(hi, i1)
        return lo, max(lo, hi)

    def visible(self, rows: np.ndarray, cols: np.ndarray, banded: bool) -> np.ndarray:
        """Bool [len(rows), len(cols)]: which pairs an interval keeps (its bounds aside)."""
        di = rows[:, None] - cols[None, :]
        keep = np.ones(di.shape, bool)
        if banded:
            keep &= (di <= self.before) & (-di <= self.after)
            if self.dilation > 1:
                keep &= di % self.dilation == 0
        if self.causal:
            keep &= di >= 0
        return keep

    def dense(self, t: int, s: int) -> np.ndarray:
        """The pattern as a bool [t, s] matrix (tests and the decomposition only)."""
        out = np.zeros((t, s), bool)
        for i0, i1, intervals in self.groups:
            rows = np.arange(i0, i1)
            for lo, hi, banded in intervals:
                out[i0:i1, lo:hi] = self.visible(rows, np.arange(lo, hi), banded)
        return out

    def pairs(self) -> int:
        """How many (query, key) pairs are visible: the work of an exact kernel."""
        n = 0
        for i0, i1, intervals in self.groups:
            rows = np.arange(i0, i1)
            for lo, hi, banded in intervals:
                if not banded and not self.causal:
                    n += (i1 - i0) * (hi - lo)
                    continue
                first = np.full(rows.shape, lo)
                last = np.minimum(hi - 1, rows) if self.causal else np.full(rows.shape, hi - 1)
                if banded:
                    first = np.maximum(first, rows - self.before)
                    last = np.minimum(last, rows + self.after)
                width = np.maximum(last - first + 1, 0)
                if banded and self.dilation > 1:   # keys with i - j a multiple of dilation
                    width = (np.floor_divide(rows - first, self.dilation)
                             - np.floor_divide(rows - last - 1, self.dilation))
                    width = np.where(last >= first, width, 0)
                n += int(width.sum())
        return n


def window_attrs(window: int, causal: bool) -> dict:
    """`local_attention`'s before/after for a window of `window` keys: causal, the
    window ends at the query (Mistral); otherwise half of it on each side (Longformer)."""
    return {"before": window - 1, "after": 0} if causal else \
        {"before": window // 2, "after": window // 2}


def _tokens(tokens, n: int) -> list[int]:
    return sorted({g for g in tokens if 0 <= g < n})


def _runs(points: list[int]) -> list[tuple[int, int]]:
    """Sorted positions as maximal [lo, hi) runs."""
    runs: list[list[int]] = []
    for p in points:
        if runs and runs[-1][1] == p:
            runs[-1][1] = p + 1
        else:
            runs.append([p, p + 1])
    return [(lo, hi) for lo, hi in runs]


def _minus(lo: int, hi: int, cuts: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """[lo, hi) with the runs `cuts` taken out."""
    out = []
    for c0, c1 in cuts:
        if c1 <= lo or c0 >= hi:
            continue
        if c0 > lo:
            out.append((lo, c0))
        lo = max(lo, c1)
    return out + ([(lo, hi)] if hi > lo else [])


def _with_globals(t: int, s: int, row_ranges, global_tokens, banded: bool, causal: bool):
    """Row groups for `row_ranges` [(i0, i1, key runs)], with the global rows taken out
    (each run of them a group seeing every key) and the global keys added to every
    group as plain intervals (taken out of the others so intervals stay disjoint)."""
    g_rows = _runs(_tokens(global_tokens, t))
    g_keys = _runs(_tokens(global_tokens, s))
    groups = [(a, b, ((0, s, False),)) for a, b in g_rows] if s else []
    for i0, i1, runs in row_ranges:
        intervals = [(lo, hi, banded) for r0, r1 in runs for lo, hi in _minus(r0, r1, g_keys)]
        intervals += [(lo, hi, False) for lo, hi in g_keys]
        intervals.sort()
        if causal:   # an interval wholly after the group's last row adds nothing
            intervals = [iv for iv in intervals if iv[0] < i1]
        for a, b in _minus(i0, i1, g_rows):
            groups.append((a, b, tuple(intervals)))
    return tuple(sorted(groups))


def random_blocks(query_block: int, n_blocks: int, exclude, count: int, seed: int) -> list[int]:
    """`count` key blocks for one query block, drawn without replacement from those not
    in `exclude`; the same for a (seed, query block) whatever else is drawn."""
    pool = [j for j in range(n_blocks) if j not in exclude]
    if count <= 0 or not pool:
        return []
    rng = np.random.default_rng((seed, query_block))
    return sorted(int(j) for j in rng.choice(pool, min(count, len(pool)), replace=False))


def pattern(op: str, t: int, s: int, attrs: dict) -> Pattern:
    """The visible pairs of a sparse attention op over t queries and s keys."""
    causal = attrs["causal"]
    if op == "local_attention":
        before, after = attrs["before"], 0 if causal else attrs["after"]
        rows = [(0, t, [(0, s)])] if t else []
        return Pattern(_with_globals(t, s, rows, attrs["global_tokens"], True, causal),
                       before, after, attrs["dilation"], causal)
    if op != "block_sparse_attention":
        raise TensorcError(f"{op} has no sparsity pattern")
    bs, near = attrs["block"], attrs["local_blocks"]
    n_blocks = -(-s // bs)
    rows = []
    for a in range(-(-t // bs)):
        local = range(max(0, a - near), min(n_blocks, a + near + 1))
        top = a if causal else n_blocks - 1          # causal: no block after the query's
        chosen = {j for j in local if j <= top}
        chosen |= set(random_blocks(a, top + 1, chosen, attrs["random_blocks"], attrs["seed"]))
        runs = _runs([j for j in sorted(chosen)])
        rows.append((a * bs, min(t, (a + 1) * bs),
                     [(lo * bs, min(s, hi * bs)) for lo, hi in runs]))
    return Pattern(_with_globals(t, s, rows, attrs["global_tokens"], False, causal),
                   causal=causal)


# -- the sparse ops ---------------------------------------------------------------------

ROWS = 64     # query rows the reference takes at once
KEYS = 256    # keys the reference takes at once


def sparse_attention(q, k, v, mask, pat: Pattern, scale: float, mask_value: float):
    """The `attention` reference (online softmax) over the pattern's intervals only."""
    h = q.shape[1]
    k, v = _repeat_np(k, h), _repeat_np(v, h)
    b, _, t, _ = q.shape
    dt = q.dtype
    out = np.full((max(b, k.shape[0]), h, t, v.shape[-1]), np.nan, dt)
    if mask is not None:
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    for i0, i1, intervals in pat.groups:
        for r0 in range(i0, i1, ROWS):
            r1 = min(i1, r0 + ROWS)
            rows = np.arange(r0, r1)
            qs = q[:, :, r0:r1] * dt.type(scale)
            m = np.full(qs.shape[:-1] + (1,), -np.inf, dt)
            den = np.zeros(qs.shape[:-1] + (1,), dt)
            acc = np.zeros(qs.shape[:-1] + (v.shape[-1],), dt)
            for lo, hi, banded in intervals:
                lo, hi = pat.keys(r0, r1, lo, hi, banded)
                for j0 in range(lo, hi, KEYS):
                    j1 = min(hi, j0 + KEYS)
                    sc = (qs @ np.swapaxes(k[..., j0:j1, :], -1, -2)).astype(dt)
                    if mask is not None:
                        mb = mask[..., slice(r0, r1) if mask.shape[2] != 1 else slice(None),
                                  slice(j0, j1) if mask.shape[3] != 1 else slice(None)]
                        sc = np.where(mb, sc, dt.type(mask_value)) if mb.dtype == np.bool_ \
                            else sc + mb
                    keep = pat.visible(rows, np.arange(j0, j1), banded)
                    sc = np.where(keep, sc, dt.type(-np.inf))
                    m_new = np.maximum(m, sc.max(axis=-1, keepdims=True))
                    base = np.where(np.isneginf(m_new), dt.type(0), m_new)
                    p = np.exp(sc - base)
                    corr = np.exp(m - base)
                    den = den * corr + p.sum(axis=-1, keepdims=True)
                    acc = acc * corr + p @ v[..., j0:j1, :]
                    m = m_new
            with np.errstate(invalid="ignore", divide="ignore"):
                out[:, :, r0:r1] = acc / den
    return out


def _sparse_reference(op: str):
    def reference(q, k, v, mask=None, **attrs):
        a = get_op(op).complete_attrs(attrs)   # defaults, for callers passing a few
        pat = pattern(op, q.shape[2], k.shape[2], a)
        return sparse_attention(q, k, v, mask, pat, a["scale"], a["mask_value"])
    return reference


def _sparse_flops(op: str):
    def flops(outs, q, k, v, *mask, scale, mask_value, **attrs):
        b, h, t, d = q.shape
        pairs = pattern(op, t, k.shape[2], attrs).pairs()
        return b * h * pairs * (2 * (d + v.shape[3]) + 5) + numel(outs[0])
    return flops


def _sparse_decompose(op: str):
    def decompose(graph: Graph, inputs, scale, mask_value, **attrs) -> list:
        """The dense attention's primitive ops with the pattern as one more keep-mask:
        a constant [t, s] for static lengths; with symbolic ones only a plain window
        (a band of two `trilu`s) can be written."""
        q, k, v, *mask = inputs
        t, s = q.type.shape[2], k.type.shape[2]
        if isinstance(t, int) and isinstance(s, int):
            keep = graph.add_constant(graph.fresh_name("pattern"),
                                      pattern(op, t, s, attrs).dense(t, s))
        elif op == "local_attention" and attrs["dilation"] == 1 and not attrs["global_tokens"]:
            full = graph.add("full", shape=(t, s), value=True, dtype="bool")
            after = 0 if attrs["causal"] else attrs["after"]
            keep = graph.add("logical_and", graph.add("trilu", full, k=after),
                             graph.add("trilu", full, upper=True, k=-attrs["before"]))
        else:
            raise TensorcError(f"{op} with global tokens, dilation or blocks needs static "
                               f"sequence lengths to be written as dense ops, got {t} "
                               f"queries and {s} keys")
        k, v = repeat_kv(graph, k, q.type.shape[1]), repeat_kv(graph, v, q.type.shape[1])
        scores = _scores(graph, q, k, mask, scale, False, mask_value)
        fill = graph.add_constant(graph.fresh_name("mask_value"),
                                  np.array(-np.inf, q.type.np_dtype))
        scores = graph.add("where", keep, scores, fill)
        return [graph.add("matmul", graph.add("softmax", scores, axis=-1), v)]
    return decompose


def _check_tokens(global_tokens):
    if any(g < 0 for g in global_tokens):
        raise ShapeError(f"global tokens are positions from 0, got {list(global_tokens)}")


def _local_infer(q, k, v, *mask, before, after, dilation, global_tokens, **attrs):
    if before < 0 or after < 0 or dilation < 1:
        raise ShapeError(f"window needs before >= 0, after >= 0, dilation >= 1: got "
                         f"before={before}, after={after}, dilation={dilation}")
    _check_tokens(global_tokens)
    return _attention_infer(q, k, v, *mask, scale=1.0, causal=False, mask_value=0.0)


def _block_infer(q, k, v, *mask, block, local_blocks, random_blocks, global_tokens, **attrs):
    if block < 1 or local_blocks < 0 or random_blocks < 0:
        raise ShapeError(f"needs block >= 1, local_blocks >= 0, random_blocks >= 0: got "
                         f"{block}, {local_blocks}, {random_blocks}")
    _check_tokens(global_tokens)
    return _attention_infer(q, k, v, *mask, scale=1.0, causal=False, mask_value=0.0)


_COMMON = {"scale": Attr("float", 1.0), "causal": Attr("bool", False),
           "global_tokens": Attr("ints", ()), "mask_value": Attr("float", -math.inf)}

register(OpDef(
    "local_attention", infer=_local_infer, reference=_sparse_reference("local_attention"),
    inputs=(3, 4), flops=_sparse_flops("local_attention"),
    decompose=_sparse_decompose("local_attention"), vjp=vjp.through_decomposition,
    attrs={**_COMMON, "before": Attr("int"), "after": Attr("int", 0),
           "dilation": Attr("int", 1)},
    doc="attention where query i sees keys i-before..i+after (every dilation-th), plus "
        "global tokens; q [b,h,t,d], k [b,hk,s,d], v [b,hk,s,dv]",
))
register(OpDef(
    "block_sparse_attention", infer=_block_infer,
    reference=_sparse_reference("block_sparse_attention"), inputs=(3, 4),
    flops=_sparse_flops("block_sparse_attention"),
    decompose=_sparse_decompose("block_sparse_attention"), vjp=vjp.through_decomposition,
    attrs={**_COMMON, "block": Attr("int"), "local_blocks": Attr("int", 1),
           "random_blocks": Attr("int", 0), "seed": Attr("int", 0)},
    doc="attention within blocks of positions and their neighbours, seeded random blocks "
        "and global tokens (BigBird); q [b,h,t,d], k [b,hk,s,d], v [b,hk,s,dv]",
))


# -- linear attention (Performer) --------------------------------------------------------

def performer_features(d: int, m: int, seed: int = 0) -> np.ndarray:
    """[m, d] float32: FAVOR+'s positive orthogonal random features. Blocks of d
    orthonormal directions (QR of a Gaussian matrix), each row scaled to the length of
    a d-dimensional Gaussian vector (chi with d degrees of freedom)."""
    rng = np.random.default_rng(seed)
    blocks = []
    for _ in range(-(-m // d)):
        qm, _ = np.linalg.qr(rng.standard_normal((d, d)))
        blocks.append(qm.T)
    w = np.concatenate(blocks)[:m]
    return (w * np.linalg.norm(rng.standard_normal((m, d)), axis=1)[:, None]).astype(np.float32)


CHUNK = 64    # query rows the causal reference takes at once


def feature_logits(x, features, scale):
    """w x' - |x'|^2 / 2 with x' = sqrt(scale) x: the log of phi(x), [..., n, m]."""
    xs = x * x.dtype.type(math.sqrt(scale))
    return xs @ features.T - 0.5 * (xs * xs).sum(axis=-1, keepdims=True)


def linear_attention(q, k, v, features, mask=None, scale=1.0, causal=False):
    """Performer's FAVOR+ (see the module docstring), without any t x s matrix."""
    dt, h = q.dtype, q.shape[1]
    lq = feature_logits(q, features, scale)
    pq = np.exp(lq - lq.max(axis=-1, keepdims=True))                      # [b,h,t,m]
    lk = feature_logits(k, features, scale)
    pk = np.exp(lk - lk.max(axis=(-2, -1), keepdims=True))                # [bk,hk,s,m]
    pk, v = _repeat_np(pk, h), _repeat_np(v, h)
    if mask is not None:
        mk = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)[:, :, 0, :, None]
        pk = np.where(mk, pk, dt.type(0)) if mk.dtype == np.bool_ else pk * np.exp(mk)
    with np.errstate(invalid="ignore", divide="ignore"):
        if not causal:
            kv = np.swapaxes(pk, -1, -2) @ v                               # [b,h,m,dv]
            z = pk.sum(axis=-2)[..., None]                                 # [b,h,m,1]
            return ((pq @ kv) / (pq @ z)).astype(dt)
        t, s = q.shape[2], k.shape[2]
        shape = np.broadcast_shapes(pq.shape[:2], pk.shape[:2])
        kv = np.zeros(shape + (features.shape[0], v.shape[-1]), dt)
        z = np.zeros(shape + (features.shape[0], 1), dt)
        out = np.empty(shape + (t, v.shape[-1]), dt)
        for c0 in range(0, t, CHUNK):    # state of the keys before the chunk, then within
            c1 = min(t, c0 + CHUNK)
            a = pq[:, :, c0:c1]
            kc, vc = pk[:, :, c0:min(c1, s)], v[:, :, c0:min(c1, s)]
            tri = np.tril(a @ np.swapaxes(kc, -1, -2))
            num = a @ kv + tri @ vc
            den = a @ z + tri.sum(axis=-1, keepdims=True)
            out[:, :, c0:c1] = num / den
            kv = kv + np.swapaxes(kc, -1, -2) @ vc
            z = z + kc.sum(axis=-2)[..., None]
        return out


def _linear_infer(q, k, v, features, *mask, scale, causal):
    out = _attention_infer(q, k, v, scale=1.0, causal=False, mask_value=0.0)
    if features.rank != 2 or features.shape[1] != q.shape[3] or features.dtype != q.dtype:
        raise ShapeError(f"features must be {q.dtype}[m, {q.shape[3]}] (one row per random "
                         f"feature), got {features}")
    if mask:
        m = mask[0]
        m4 = (1,) * (4 - m.rank) + tuple(m.shape)
        if m.rank > 4 or m4[2] != 1 or m.dtype not in ("bool", q.dtype):
            raise ShapeError(f"linear attention takes only a key mask, bool or {q.dtype}, "
                             f"broadcasting to [b, h, 1, s]: got {m}")
        _attention_infer(q, k, v, m, scale=1.0, causal=False, mask_value=0.0)
    return out


def _linear_flops(outs, q, k, v, features, *mask, **attrs):
    b, h, t, d = q.shape
    s, dv, m = k.shape[2], v.shape[3], features.shape[0]
    phi = 2 * m * d + 3 * m
    return b * h * (t * phi + s * phi + 2 * s * m * (dv + 1) + 2 * t * m * (dv + 1)) \
        + numel(outs[0])


def _linear_decompose(graph: Graph, inputs, scale, causal) -> list:
    """FAVOR+ in primitive ops; causal as the masked t x s product (exact, quadratic:
    what an export writes, and what runs where no kernel takes it)."""
    q, k, v, w, *mask = inputs
    dtype = q.type.np_dtype

    def const(x):
        return graph.add_constant(graph.fresh_name("c"), np.array(x, dtype))

    def logits(x):
        xs = graph.add("mul", x, const(math.sqrt(scale)))
        sq = graph.add("reduce_sum", graph.add("mul", xs, xs), axes=(-1,), keepdims=True)
        proj = graph.add("matmul", xs, graph.add("transpose", w, perm=(1, 0)))
        return graph.add("sub", proj, graph.add("mul", sq, const(0.5)))
    lq, lk = logits(q), logits(k)
    pq = graph.add("exp", graph.add("sub", lq, graph.add("reduce_max", lq, axes=(-1,),
                                                         keepdims=True)))
    pk = graph.add("exp", graph.add("sub", lk, graph.add("reduce_max", lk, axes=(-2, -1),
                                                         keepdims=True)))
    h = q.type.shape[1]
    pk, v = repeat_kv(graph, pk, h), repeat_kv(graph, v, h)
    if mask:
        mk = graph.add("transpose", mask[0] if mask[0].type.rank == 4 else
                       graph.add("reshape", mask[0], shape=(1,) * (4 - mask[0].type.rank)
                                 + tuple(mask[0].type.shape)), perm=(0, 1, 3, 2))
        pk = graph.add("where", mk, pk, const(0.0)) if mask[0].type.dtype == "bool" \
            else graph.add("mul", pk, graph.add("exp", mk))
    if not causal:
        kv = graph.add("matmul", graph.add("transpose", pk, perm=(0, 1, 3, 2)), v)
        z = graph.add("reduce_sum", pk, axes=(-2,), keepdims=True)   # [b,h,1,m]
        num = graph.add("matmul", pq, kv)
        den = graph.add("reduce_sum", graph.add("mul", pq, z), axes=(-1,), keepdims=True)
        return [graph.add("div", num, den)]
    a = graph.add("trilu", graph.add("matmul", pq, graph.add("transpose", pk,
                                                             perm=(0, 1, 3, 2))))
    den = graph.add("reduce_sum", a, axes=(-1,), keepdims=True)
    return [graph.add("div", graph.add("matmul", a, v), den)]


register(OpDef(
    "linear_attention", infer=_linear_infer, reference=linear_attention, inputs=(4, 5),
    flops=_linear_flops, decompose=_linear_decompose, vjp=vjp.through_decomposition,
    attrs={"scale": Attr("float", 1.0), "causal": Attr("bool", False)},
    doc="Performer FAVOR+ attention with random features [m, d]: linear in the sequence; "
        "q [b,h,t,d], k [b,hk,s,d], v [b,hk,s,dv], an optional key mask",
))
