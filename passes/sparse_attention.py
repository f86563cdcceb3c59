"""`sparsify-attention` and `linearize-attention`: fused `attention` ops (after
`fuse-attention`, so models imported from ONNX too) become sparse or linear ones.

    sparsify-attention:window=W[:global=N|tokens=A+B][:dilation=D][:always=1]
        -> local_attention: causal attention sees the W keys up to and including its
           own position (Mistral's sliding window); non-causal W/2 keys each side
    sparsify-attention:block=B[:neighbours=N][:random=R][:seed=S][:global=N|tokens=A+B]
        [:always=1]
        -> block_sparse_attention: blocks of B positions see their N neighbour blocks
           each side and R seeded random blocks (BigBird)
    linearize-attention:features=F[:seed=S][:always=1]
        -> linear_attention with F Performer random features (a constant [F, d])

Both change the model (the sparse pattern drops pairs; Performer approximates the
softmax): `passes.LOSSY` lists them, so `tensorc compare` shows the error they add.
Each attention keeps its scale, mask and grouped key/value heads.

They refuse, leaving the dense op (a warning says why, and `inspect --explain` too
where some other attention changed), where the rewrite would be wrong: queries and
keys of different lengths (a key cache: positions are then not the row indices the
pattern is written in), and for linear attention a mask that depends on the query
(it only takes key masks). Exporters often expand a padding mask to [b, 1, t, s]:
where the graph shows every row equal (built by broadcasting from a mask without a
query axis), linear attention takes its first row. A mask that mixes a causal
triangle into the padding (GPT-2's and Llama's exports) is refused: its query
dependence is real. The sparse patterns take any mask, but read such an attention
as `causal=False`: the window is split around the query and the mask removes its
later half.

Where the lengths are static and the rewrite would not be faster (the pattern keeps
more than DENSE_ABOVE of the pairs; for Performer, fewer pairs than LINEAR_BELOW x
(queries + keys) x features), it is only less exact, so the dense op stays (a warning
says how many); `always=1` rewrites anyway.
"""

from __future__ import annotations

import warnings

from tensorc.errors import TensorcError
from tensorc.ir import Graph, Node, Value
from tensorc.ops import get_op
from tensorc.ops.sparse_attention import pattern, performer_features, window_attrs

from .manager import EXPLAINERS
from .rewrite import graph_pass

# Keep dense attention where a static pattern keeps more than this share of the
# pairs dense attention computes, or where the pairs are fewer than this many times
# (queries + keys) x features for Performer: the crossovers `benchmarks/attention.py`
# measured (benchmarks/README.md). `always=1` rewrites anyway (quality studies at
# training lengths).
DENSE_ABOVE = 0.85
LINEAR_BELOW = 1.3
SPARSE_OPS = ("local_attention", "block_sparse_attention", "linear_attention")


def rows_equal(v: Value, outer: dict | None = None) -> bool:
    """Whether every row (axis -2) of `v` is provably the same: it has one row (or
    fewer than two axes), or it is a constant whose rows are equal, or it comes from
    such values through broadcasting: elementwise ops, `expand`, fused regions of them.
    `outer`: a region body's inputs -> the values they stand for."""
    outer = outer or {}
    v = outer.get(v, v)
    t = v.type
    if t.rank < 2 or t.shape[-2] == 1:
        return True
    n = v.producer
    if n is None:
        data = getattr(v, "data", None)
        return data is not None and bool((data == data[..., :1, :]).all())
    if n.op == "expand":
        return rows_equal(n.inputs[0], outer)
    if n.op == "fused":
        body = n.attrs["body"]
        inner = {b: outer.get(x, x) for b, x in zip(body.inputs, n.inputs, strict=True)}
        return rows_equal(body.outputs[n.outputs.index(v)], inner)
    if _never_false(n, outer):
        return True
    return get_op(n.op).kind == "elementwise" and all(rows_equal(x, outer) for x in n.inputs)


def _never_false(n: Node, outer: dict) -> bool:
    """`range(start, ..., delta > 0) >= c` with c <= start (through unsqueezes and
    reshapes): Hugging Face's mask functions AND such a query-index test into padding
    masks, which makes them look query-dependent."""
    bound = getattr(outer.get(n.inputs[-1], n.inputs[-1]), "data", None)
    if n.op != "greater_equal" or bound is None:
        return False
    x = outer.get(n.inputs[0], n.inputs[0])
    while x.producer is not None and x.producer.op in ("unsqueeze", "reshape"):
        x = outer.get(x.producer.inputs[0], x.producer.inputs[0])
    r = x.producer
    return r is not None and r.op == "range" and isinstance(r.attrs["start"][0], int) \
        and r.attrs["delta"] > 0 and bool((bound <= r.attrs["start"][0]).all())


def _mask(node: Node) -> Value | None:
    return node.inputs[3 if node.op == "attention" else 4] if len(node.inputs) > \
        (3 if node.op == "attention" else 4) else None


def refusal(node: Node, linear: bool) -> str | None:
    """Why `node` (an `attention`) cannot become sparse (or linear) attention."""
    q, k = node.inputs[0].type, node.inputs[1].type
    if q.shape[2] != k.shape[2]:
        return (f"queries ({q.shape[2]}) and keys ({k.shape[2]}) differ in length (a key "
                "cache?): the pattern is written in positions the rows do not carry")
    if linear:
        mask = _mask(node)
        if mask is not None and not rows_equal(mask):
            return (f"its mask {mask.type} depends on the query; linear attention takes "
                    "key masks")
    return None


def _tokens(spec, count) -> tuple[int, ...]:
    """`global=N` (the first N positions) or `tokens=A+B` (those positions)."""
    if count and spec != "":
        raise TensorcError("sparsify-attention takes global=N or tokens=A+B, not both")
    if count:
        return tuple(range(int(count)))
    try:
        toks = tuple(int(x) for x in str(spec).split("+") if x != "")
    except ValueError:
        raise TensorcError(f"sparsify-attention: tokens={spec!r} should be positions joined "
                           "by + (tokens=0+5)") from None
    if any(x < 0 for x in toks):
        raise TensorcError(f"sparsify-attention: tokens are positions from 0, got {spec!r}")
    return toks


def _rewritable(g: Graph, name: str, linear: bool) -> list[Node]:
    """The attention nodes the pass may rewrite; a warning for the others."""
    nodes = [n for n in g.nodes if n.op == "attention"]
    for n in nodes:
        why = refusal(n, linear)
        if why:
            warnings.warn(f"{name} leaves {n.where} dense: {why}", stacklevel=3)
    return [n for n in nodes if not refusal(n, linear)]


def _dense_pairs(t, s, causal) -> int:
    return sum(min(s, i + 1) for i in range(t)) if causal else t * s


@graph_pass("sparsify-attention")
def sparsify_attention(g: Graph, window: int = 0, block: int = 0, neighbours: int = 1,
                       random: int = 0, seed: int = 0, dilation: int = 1, tokens="",
                       always: bool = False, **options):
    """Every dense attention to `local_attention` (window=) or `block_sparse_attention`
    (block=); `global=N` adds the first N positions as global tokens."""
    unknown = set(options) - {"global"}
    if unknown:
        raise TensorcError(f"sparsify-attention: unknown option(s) {sorted(unknown)}")
    if (window > 0) == (block > 0):
        raise TensorcError("sparsify-attention needs window=W (local) or block=B (block "
                           f"sparse), exactly one of them and positive: got window={window}, "
                           f"block={block}")
    global_tokens = _tokens(tokens, options.get("global", 0))
    kept = 0
    for node in _rewritable(g, "sparsify-attention", linear=False):
        a = node.attrs
        common = {"scale": a["scale"], "causal": a["causal"], "mask_value": a["mask_value"],
                  "global_tokens": global_tokens}
        if window:
            op = "local_attention"
            attrs = {**common, **window_attrs(window, a["causal"]), "dilation": dilation}
        else:
            op = "block_sparse_attention"
            attrs = {**common, "block": block, "local_blocks": neighbours,
                     "random_blocks": random, "seed": seed}
        attrs = get_op(op).complete_attrs(attrs, node.where)
        t, s = node.inputs[0].type.shape[2], node.inputs[1].type.shape[2]
        if not always and isinstance(t, int) and isinstance(s, int) and t * s and \
                pattern(op, t, s, attrs).pairs() > DENSE_ABOVE * _dense_pairs(t, s, a["causal"]):
            kept += 1
            continue
        get_op(op).infer(*[v.type for v in node.inputs], **attrs)   # checks the options
        node.op, node.attrs = op, attrs
    if kept:
        warnings.warn(f"sparsify-attention kept {kept} attention(s) dense: at their length "
                      f"the pattern keeps over {DENSE_ABOVE:.0%} of the pairs, where sparse "
                      "attention is no faster (always=1 rewrites anyway)", stacklevel=2)


@graph_pass("linearize-attention")
def linearize_attention(g: Graph, features: int = 256, seed: int = 0, always: bool = False):
    """Every dense attention to Performer `linear_attention` with `features` random
    features (one seeded [features, d] constant per head size)."""
    if features < 1:
        raise TensorcError(f"linearize-attention: features={features} must be positive")
    tables = {}
    kept = 0
    for node in _rewritable(g, "linearize-attention", linear=True):
        q = node.inputs[0].type
        t, s, d = q.shape[2], node.inputs[1].type.shape[2], q.shape[3]
        if not always and isinstance(t, int) and isinstance(s, int) and \
                _dense_pairs(t, s, node.attrs["causal"]) < LINEAR_BELOW * (t + s) * features:
            kept += 1
            continue
        if (d, q.dtype) not in tables:
            w = performer_features(d, features, seed).astype(q.np_dtype)
            tables[d, q.dtype] = g.add_constant(g.fresh_name("performer_features"), w)
        q_, k, v, *mask = node.inputs
        if mask and mask[0].type.rank >= 2 and mask[0].type.shape[-2] != 1:
            mask = [_first_row(g, node, mask[0])]
        node.inputs = [q_, k, v, tables[d, q.dtype], *mask]
        node.op = "linear_attention"
        node.attrs = get_op("linear_attention").complete_attrs(
            {"scale": node.attrs["scale"], "causal": node.attrs["causal"]}, node.where)
    if kept:
        warnings.warn(f"linearize-attention kept {kept} attention(s) dense: at their length "
                      f"dense attention is faster than {features} features (always=1 "
                      "rewrites anyway)", stacklevel=2)


def _first_row(g: Graph, node: Node, mask: Value) -> Value:
    """mask[..., :1, :], made just before `node` (its rows are all equal)."""
    row = g.add("slice", mask, starts=(0,), ends=(1,), axes=(mask.type.rank - 2,))
    g.nodes.insert(g.nodes.index(node), g.nodes.pop())
    return row


def explain_sparse(g: Graph) -> list[str]:
    """Where a graph holds sparse or linear attention, one line per dense attention
    left that the rewrites would refuse, with why (a graph without any says nothing:
    nobody asked)."""
    lines = []
    if not any(n.op in SPARSE_OPS for n in g.nodes):
        return lines
    for node in g.nodes:
        if node.op != "attention":
            continue
        sparse, linear = refusal(node, linear=False), refusal(node, linear=True)
        if sparse:   # then linear refuses for the same reason
            lines.append(f"sparsify-attention and linearize-attention leave {node.where} "
                         f"dense: {sparse}")
        elif linear:
            lines.append(f"linearize-attention leaves {node.where} dense: {linear}")
    return lines


EXPLAINERS["sparse-attention"] = explain_sparse
