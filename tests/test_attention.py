"""The attention op and the attention-fusion pass, on our models and on graphs shaped
like those PyTorch's exporters write for HF GPT-2, BERT and ViT."""

from __future__ import annotations

import math

import numpy as np
import pytest

import tensorc
from tensorc.backends import get_backend
from tensorc.ir import Graph, TensorType, dim_product
from tensorc.ops import get_op
from tensorc.ops.attention import attention
from tensorc.passes import explain, run_pipeline

B, T, H, D = 2, 6, 2, 4
E = H * D
F32_MIN = float(np.finfo(np.float32).min)


def rel_err(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def run(g, feeds):
    with np.errstate(over="ignore"):  # finfo.min + finfo.min in masks is -inf, as in torch
        return get_backend("numpy").compile(g)(**feeds)


def deep_counts(g):
    """Op counts including the bodies of fused regions."""
    counts = dict(g.op_counts())
    for n in g.nodes:
        if n.op == "fused":
            for op_, c in deep_counts(n.attrs["body"]).items():
                counts[op_] = counts.get(op_, 0) + c
    return counts


def not_fused(g):
    """Run O2; check no attention appeared and the softmax survived (maybe inside a
    fused region); the explanation must not depend on how far the graph got."""
    out = run_pipeline(g, "O2", verify=True)
    assert "attention" not in out.op_counts() and "softmax" in deep_counts(out)
    lines = explain(out)
    assert [line.split(":")[2] for line in lines] == \
        [line.split(":")[2] for line in explain(run_pipeline(g, "O1"))]
    return lines


# --- the op ------------------------------------------------------------------------------

def naive(q, k, v, mask=None, scale=1.0, causal=False, mask_value=-np.inf):
    s = scale * (q @ np.swapaxes(k, -1, -2))
    if causal:
        t, n = s.shape[-2:]
        s = np.where(np.tri(t, n, dtype=bool), s, mask_value)
    if mask is not None:
        s = np.where(mask, s, mask_value) if mask.dtype == bool else s + mask
    e = np.exp(s - s.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)) @ v


@pytest.mark.parametrize("case", ["plain", "causal", "bool", "additive", "broadcast_kv",
                                  "finite_fill_full_row", "long"])
def test_attention_reference_matches_naive(case):
    rng = np.random.default_rng(0)
    t, s = (5, 7) if case != "long" else (40, 100)  # 100 keys: several key blocks
    q = rng.standard_normal((2, 3, t, 8)).astype(np.float32)
    k = rng.standard_normal((2, 3, s, 8)).astype(np.float32)
    v = rng.standard_normal((2, 3, s, 5)).astype(np.float32)
    kw = {"scale": 0.3}
    if case in ("causal", "long"):
        kw["causal"] = True
    if case == "bool":
        kw["mask"] = rng.random((2, 1, t, s)) > 0.3
        kw["mask"][..., 0] = True
    if case == "additive":
        kw["mask"] = rng.standard_normal((2, 1, 1, s)).astype(np.float32)
    if case == "broadcast_kv":
        k, v = k[:, :1], v[:, :1]
    if case == "finite_fill_full_row":  # a row with every key masked: uniform weights
        kw["mask"] = rng.random((1, 1, t, s)) > 0.5
        kw["mask"][..., 1, :] = False
        kw["mask"][..., 0, :] = True
        kw["mask_value"] = F32_MIN
    got = attention(q, k, v, **kw)
    want = naive(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), **kw)
    assert got.dtype == np.float32 and got.shape == (2, 3, t, 5)
    assert rel_err(got, want) <= 1e-5


def test_attention_decompose_equals_reference():
    rng = np.random.default_rng(1)
    g = Graph("att")
    q = g.add_input("q", TensorType((2, 2, 5, 4)))
    k = g.add_input("k", TensorType((2, 2, 7, 4)))
    v = g.add_input("v", TensorType((2, 2, 7, 3)))
    m = g.add_input("m", TensorType((2, 1, 1, 7)))
    g.outputs = [g.add("attention", q, k, v, m, scale=0.5, causal=True)]
    feeds = {"q": rng.standard_normal((2, 2, 5, 4)), "k": rng.standard_normal((2, 2, 7, 4)),
             "v": rng.standard_normal((2, 2, 7, 3)), "m": rng.standard_normal((2, 1, 1, 7))}
    feeds = {n: a.astype(np.float32) for n, a in feeds.items()}
    want = run(g, feeds)
    d = Graph("dec")
    ins = [d.add_input(x.name, x.type) for x in g.inputs]
    d.outputs = get_op("attention").decompose(d, ins, **g.nodes[0].attrs)
    d.verify()
    assert "attention" not in d.op_counts()
    assert rel_err(run(d, feeds), want) <= 1e-5


def test_attention_rejects_bad_shapes():
    g = Graph("bad")
    q = g.add_input("q", TensorType((2, 2, 5, 4)))
    k = g.add_input("k", TensorType((2, 2, 7, 3)))
    with pytest.raises(tensorc.TensorcError, match="do not fit"):
        g.add("attention", q, k, k)


# --- exporter-shaped graphs ------------------------------------------------------------------

class Block:
    """Builds one self-attention block the way an exporter lays it out; options pick
    the variant. Inputs: x [B, T, E] (and a padding mask for BERT-like graphs)."""

    def __init__(self, seq=T, symbolic=False):
        self.rng = np.random.default_rng(7)
        self.g = Graph("exported")
        bdim, tdim = ("batch", "seq") if symbolic else (B, seq)
        self.b, self.t = bdim, tdim
        self.x = self.g.add_input("x", TensorType((bdim, tdim, E)))
        self.feeds = {"x": self.rng.standard_normal((B, seq, E)).astype(np.float32)}
        self.seq = seq

    def const(self, data, name="c"):
        return self.g.add_constant(self.g.fresh_name(name), np.asarray(data))

    def weight(self, *shape):
        return self.const((self.rng.standard_normal(shape) * 0.3).astype(np.float32), "w")

    def linear(self, x, n_out):
        return self.g.add("add", self.g.add("matmul", x, self.weight(E, n_out)),
                          self.weight(n_out))

    def heads(self, x):  # [b,t,E] -> [b,t,h,d]
        return self.g.add("reshape", x, shape=(self.b, self.t, H, D))

    def bmm(self, a, b):  # dynamo: expand, flatten to 3-d, bmm, view back to 4-d
        g = self.g
        a3, b3 = (g.add("reshape", g.add("expand", x, shape=x.type.shape),
                        shape=(B * H,) + x.type.shape[2:]) for x in (a, b))
        return g.add("reshape", g.add("matmul", a3, b3),
                     shape=(B, H, a.type.shape[2], b.type.shape[3]))

    def build(self, scale="div", k_layout="two_transposes", masks=(), fused_qkv=False,
              prob_users=1, bmm=False, nan_guard=False):
        g = self.g
        if fused_qkv:  # GPT-2's c_attn, split in three
            q, k, v = g.add_node("split", [self.linear(self.x, 3 * E)],
                                 {"axis": -1, "sizes": (E, E, E)})
        else:
            q, k, v = (self.linear(self.x, E) for _ in range(3))
        q = g.add("transpose", self.heads(q), perm=(0, 2, 1, 3))
        v = g.add("transpose", self.heads(v), perm=(0, 2, 1, 3))
        k4 = self.heads(k)                                       # [b,s,h,d]
        sq = math.sqrt(1 / math.sqrt(D))
        if scale == "k_before_transpose":
            k4 = g.add("mul", k4, self.const(np.float32(1 / math.sqrt(D))))
        if k_layout == "two_transposes":
            kt = g.add("transpose", g.add("transpose", k4, perm=(0, 2, 1, 3)), perm=(0, 1, 3, 2))
        elif k_layout == "reshape_sandwich":  # dynamo sdpa: k^T as a 3-d transpose
            k3 = g.add("reshape", g.add("transpose", k4, perm=(0, 2, 1, 3)),
                       shape=(dim_product([self.b, H]), self.t, D))
            kt = g.add("reshape", g.add("transpose", k3, perm=(0, 2, 1)),
                       shape=(self.b, H, D, self.t))
        else:                                                    # folded into one
            kt = g.add("transpose", k4, perm=(0, 2, 3, 1))
        if scale == "sqrt_both":  # legacy exporter's scaled_dot_product_attention
            q = g.add("mul", q, g.add("sqrt", self.const(np.float32(1 / math.sqrt(D)))))
            kt = g.add("mul", kt, self.const(np.float32(sq)))
        if scale == "q_mul":
            q = g.add("mul", self.const(np.float32(1 / math.sqrt(D))), q)
        s = self.bmm(q, kt) if bmm else g.add("matmul", q, kt)
        if scale == "div":
            s = g.add("div", s, self.const(np.float32(math.sqrt(D))))
        if scale == "mul":
            s = g.add("mul", s, self.const(np.float32(1 / math.sqrt(D))))
        for kind in masks:
            s = getattr(self, "mask_" + kind)(s)
        if scale == "div_after_mask":
            s = g.add("div", s, self.const(np.float32(math.sqrt(D))))
        p = g.add("softmax", s, axis=-1)
        if nan_guard:  # sdpa: where(isnan(p), 0, p), isnan imported as not(equal(p, p))
            p = g.add("where", g.add("logical_not", g.add("equal", p, p)),
                      self.const(np.float32(0.0 if nan_guard is True else nan_guard)), p)
        o = self.bmm(p, v) if bmm else g.add("matmul", p, v)
        o = g.add("reshape", g.add("transpose", o, perm=(0, 2, 1, 3)), shape=(self.b, self.t, E))
        g.outputs = [g.add("matmul", o, self.weight(E, E))]
        if prob_users > 1:
            g.outputs.append(g.add("reduce_sum", p, axes=(-1,)))
        return g.verify()

    # causal masks, as the various exporters build them
    def tt(self):
        return self.t, self.t

    def mask_where_trilu(self, s):
        keep = self.g.add("trilu", self.g.add("full", shape=self.tt(), value=True, dtype="bool"))
        return self.g.add("where", keep, s, self.const(np.float32(F32_MIN)))

    def mask_where_buffer(self, s):  # HF GPT-2: bias[:, :, :t, :s] of a [1,1,M,M] buffer
        buf = self.const(np.tri(16, 16, dtype=bool)[None, None], "attn.bias")
        keep = self.g.add("slice", buf, starts=(0, 0), ends=self.tt(), axes=(2, 3))
        return self.g.add("where", keep, s, self.const(np.float32(F32_MIN)))

    def mask_less_equal(self, s):  # arange(s)[None, :] <= arange(t)[:, None]
        n = self.seq
        cols = self.g.add("reshape", self.const(np.arange(n)), shape=(1, n))
        rows = self.g.add("reshape", self.const(np.arange(n)), shape=(n, 1))
        keep = self.g.add("less_equal", cols, rows)
        return self.g.add("where", keep, s, self.const(np.float32(-np.inf)))

    def mask_sdpa_additive(self, s):  # Where(Equal(Trilu(ones), 0), -inf, 0) + scores
        tri = self.g.add("trilu", self.g.add("full", shape=self.tt(), value=1.0))
        drop = self.g.add("equal", tri, self.const(np.float32(0)))
        bias = self.g.add("where", drop, self.const(np.float32(-np.inf)), self.const(np.float32(0)))
        return self.g.add("add", bias, s)

    def mask_masked_fill(self, s):  # masked_fill(~tril, -inf): where(drop, fill, scores)
        keep = self.g.add("trilu", self.g.add("full", shape=self.tt(), value=True, dtype="bool"))
        return self.g.add("where", self.g.add("logical_not", keep),
                          self.const(np.float32(-np.inf)), s)

    def mask_padding(self, s):  # BERT: (1 - mask[:, None, None, :]) * finfo.min
        m = self.g.add_input("attention_mask", TensorType((self.b, self.t), "i64"))
        lengths = [self.seq, self.seq - 2]
        self.feeds["attention_mask"] = (np.arange(self.seq)[None] <
                                        np.array(lengths)[:, None]).astype(np.int64)
        ext = self.g.add("unsqueeze", self.g.add("cast", m, dtype="f32"), axes=(1, 2))
        bias = self.g.add("mul", self.g.add("sub", self.const(np.float32(1)), ext),
                          self.const(np.float32(F32_MIN)))
        return self.g.add("add", s, bias)

    def mask_causal_neg_inf(self, s):
        keep = self.g.add("trilu", self.g.add("full", shape=self.tt(), value=True, dtype="bool"))
        return self.g.add("where", keep, s, self.const(np.float32(-np.inf)))

    def mask_hf_sdpa_neg_inf(self, s):  # as torch's sdpa writes it: a row can be all -inf
        return self.mask_hf_sdpa(s, fill=-np.inf)

    def mask_hf_sdpa(self, s, fill=F32_MIN):
        """HF GPT-2 (sdpa) through the legacy exporter: causal (ranges, less_equal) and
        padding (from the attention_mask input) anded, expanded, then turned additive by
        Where(mask, 0, finfo.min) and added to q*sqrt(scale) @ (k^T*sqrt(scale))."""
        n = self.seq
        cols = self.g.add("unsqueeze", self.const(np.arange(n)), axes=(0,))
        rows = self.g.add("unsqueeze", self.const(np.arange(n)), axes=(1,))
        causal = self.g.add("less_equal", cols, rows)                           # [t, s]
        m = self.g.add_input("attention_mask", TensorType((self.b, self.t), "i64"))
        self.feeds["attention_mask"] = (np.arange(n)[None] < np.array([n, n - 3])[:, None]
                                        ).astype(np.int64)
        pad = self.g.add("cast", self.g.add("unsqueeze", m, axes=(1, 2)), dtype="bool")
        keep = self.g.add("expand", self.g.add("logical_and", causal, pad),
                          shape=(self.b, 1, self.t, self.t))
        bias = self.g.add("where", keep, self.const(np.float32(0)),
                          self.const(np.float32(fill)))
        return self.g.add("add", s, bias)

    def mask_bool_padding_fill_10(self, s):  # a mild fill: not interchangeable with -inf
        return self.mask_bool_padding(s, fill=-10.0)

    def mask_bool_padding(self, s, fill=F32_MIN):  # a non-causal keep mask from an input
        m = self.g.add_input("keep", TensorType((self.b, 1, 1, self.t), "bool"))
        keep = np.ones((B, 1, 1, self.seq), bool)
        keep[1, ..., -2:] = False
        self.feeds["keep"] = keep
        return self.g.add("where", m, s, self.const(np.float32(fill)))


VARIANTS = {
    # our own tracer's layout, and the scale placements
    "mul_on_scores": dict(scale="mul"),
    "div_on_scores": dict(scale="div"),
    "mul_on_q": dict(scale="q_mul"),
    "mul_on_k_before_transpose": dict(scale="k_before_transpose"),
    "sqrt_scale_on_q_and_k": dict(scale="sqrt_both"),
    "div_after_the_mask": dict(scale="div_after_mask", masks=("padding",)),
    "k_transposed_inside_matmul": dict(k_layout="inside"),
    # HF GPT-2, legacy exporter (opset 17): c_attn split, div, buffer slice, padding
    "gpt2_legacy": dict(fused_qkv=True, scale="div", masks=("where_buffer", "padding")),
    # HF GPT-2 with sdpa through the legacy exporter: sqrt scale on q and k, additive
    # causal built from Trilu/Equal/Where
    "gpt2_sdpa": dict(fused_qkv=True, scale="sqrt_both", masks=("sdpa_additive",)),
    # ... and as HF really exports it (tests/data/hf/gpt2_sdpa_legacy.onnx): k transposed
    # straight from the head split, causal and padding merged into one additive mask
    "gpt2_sdpa_hf_padding": dict(fused_qkv=True, scale="sqrt_both", k_layout="inside",
                                 masks=("hf_sdpa",)),
    # ... through the dynamo exporter (tests/data/hf/*_sdpa_dynamo.onnx): the
    # probabilities NaN-guarded, k^T as reshape -> 3-d transpose -> reshape
    "sdpa_dynamo_nan_guard": dict(fused_qkv=True, scale="sqrt_both", masks=("hf_sdpa",),
                                  k_layout="reshape_sandwich", nan_guard=True),
    "sdpa_legacy_nan_guard": dict(scale="sqrt_both", k_layout="inside", masks=("hf_sdpa",),
                                  nan_guard=True),
    "vit_sdpa_dynamo": dict(scale="sqrt_both", k_layout="reshape_sandwich", nan_guard=True),
    # dynamo: masked_fill(~tril), mask built from two ranges
    "gpt2_dynamo_masked_fill": dict(fused_qkv=True, scale="mul", masks=("masked_fill",)),
    "gpt2_ranges_less_equal": dict(scale="mul", masks=("less_equal",)),
    "causal_where_trilu": dict(scale="mul", masks=("where_trilu",)),
    # dynamo writes 4-d matmuls as expand + reshape to 3-d + bmm + reshape back
    "gpt2_dynamo_bmm": dict(fused_qkv=True, scale="sqrt_both", masks=("sdpa_additive",),
                            bmm=True),
    "bert_dynamo_bmm": dict(scale="mul", k_layout="inside", masks=("padding",), bmm=True),
    # HF BERT legacy: transposes merged into perm [0,2,3,1], div, additive padding mask
    "bert_legacy": dict(scale="div", k_layout="inside", masks=("padding",)),
    "bert_bool_keep_mask": dict(scale="div", masks=("bool_padding",)),
    # HF ViT: no mask; sdpa flavour too
    "vit_legacy": dict(scale="div"),
    "vit_sdpa": dict(scale="sqrt_both"),
    # two masks: causal bool + additive padding (GPT-2 with attention_mask)
    "causal_trilu_and_padding": dict(scale="mul", masks=("where_trilu", "padding")),
    # causal (-inf) and a bool padding mask (finfo.min): both fills underflow alike
    "causal_and_bool_padding": dict(scale="div", masks=("causal_neg_inf", "bool_padding")),
    "additive_causal_and_bool_padding": dict(scale="div",
                                             masks=("sdpa_additive", "bool_padding")),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_exporter_variant_fuses_and_keeps_results(name):
    blk = Block()
    g = blk.build(**VARIANTS[name])
    want = run(g, blk.feeds)
    fused = run_pipeline(g, "O2", verify=True)
    counts = fused.op_counts()
    assert counts.get("attention") == 1 and "softmax" not in counts, (name, counts,
                                                                       explain(g))
    assert rel_err(run(fused, blk.feeds), want) <= 1e-5
    assert explain(fused) == []


def test_causal_masks_become_the_causal_flag():
    for masks in (("where_trilu",), ("where_buffer",), ("less_equal",), ("sdpa_additive",),
                  ("masked_fill",)):
        blk = Block()
        g = run_pipeline(blk.build(scale="mul", masks=masks), "O2")
        (att,) = [n for n in g.nodes if n.op == "attention"]
        assert att.attrs["causal"] and len(att.inputs) == 3, masks


def test_symbolic_shapes_fuse_with_causal_flag():
    blk = Block(symbolic=True)
    g = blk.build(scale="div", masks=("where_trilu",))
    want = run(g, blk.feeds)
    fused = run_pipeline(g, "O2", verify=True)
    (att,) = [n for n in fused.nodes if n.op == "attention"]
    assert att.attrs["causal"] and len(att.inputs) == 3
    assert rel_err(run(fused, blk.feeds), want) <= 1e-5


def test_symbolic_reshape_sandwich_k_fuses():
    blk = Block(symbolic=True)
    g = blk.build(scale="sqrt_both", k_layout="reshape_sandwich", nan_guard=True)
    want = run(g, blk.feeds)
    fused = run_pipeline(g, "O2", verify=True)
    assert fused.op_counts().get("attention") == 1 and "softmax" not in deep_counts(fused)
    assert rel_err(run(fused, blk.feeds), want) <= 1e-5


def test_nan_guard_keeps_zeros_where_every_key_is_masked():
    """A batch row with no key to attend: softmax is NaN there, the guard makes it 0;
    the fused graph must give the same zeros (not NaN)."""
    blk = Block()
    g = blk.build(scale="sqrt_both", masks=("hf_sdpa_neg_inf",), nan_guard=True)
    blk.feeds["attention_mask"][1] = 0
    with np.errstate(invalid="ignore"):  # the NaNs the guard removes
        want = run(g, blk.feeds)
        fused = run_pipeline(g, "O2", verify=True)
        got = run(fused, blk.feeds)
    assert np.isfinite(want).all() and np.all(want[1] == 0)
    assert fused.op_counts().get("attention") == 1
    assert np.isfinite(got).all() and rel_err(got, want) <= 1e-5


def test_guard_with_a_nonzero_fill_is_not_fused():
    blk = Block()
    g = blk.build(scale="div", nan_guard=0.5)
    (line,) = not_fused(g)
    assert "not one matmul with v" in line and "where" in line


def test_padding_mask_stays_a_mask_input():
    blk = Block()
    g = run_pipeline(blk.build(scale="div", masks=("padding",)), "O2")
    (att,) = [n for n in g.nodes if n.op == "attention"]
    assert not att.attrs["causal"] and len(att.inputs) == 4
    assert att.inputs[3].type.shape == (B, 1, 1, T)


# --- near misses: must not fuse, and explain says why ------------------------------------

def test_softmax_over_wrong_axis_is_not_fused():
    blk = Block()
    g = blk.build(scale="div")
    sm = next(n for n in g.nodes if n.op == "softmax")
    sm.attrs["axis"] = 2
    g.verify()
    (line,) = not_fused(g)
    assert "not the last (key) axis" in line and "softmax" in line


def test_scale_by_runtime_value_is_not_fused():
    blk = Block()
    g = blk.build(scale="none")
    s_in = g.add_input("temperature", TensorType(()))
    sm = next(n for n in g.nodes if n.op == "softmax")
    scaled = g.add("mul", sm.inputs[0], s_in)
    g.nodes.insert(g.nodes.index(sm), g.nodes.pop())
    sm.inputs = [scaled]
    g.verify()
    (line,) = not_fused(g)
    assert "not a scalar constant" in line and "mul" in line


def test_where_with_tensor_fill_is_not_fused():
    blk = Block()
    g = blk.build(scale="div")
    sm = next(n for n in g.nodes if n.op == "softmax")
    other = g.add_input("other", sm.inputs[0].type)
    keep = g.add("trilu", g.add("full", shape=(T, T), value=True, dtype="bool"))
    masked = g.add("where", keep, sm.inputs[0], other)
    new = g.nodes[-3:]
    del g.nodes[-3:]
    at = g.nodes.index(sm)
    g.nodes[at:at] = new
    sm.inputs = [masked]
    g.verify()
    (line,) = not_fused(g)
    assert "where" in line and "scalar constant" in line


def test_probabilities_used_twice_are_not_fused():
    blk = Block()
    g = blk.build(scale="div", prob_users=2)
    (line,) = not_fused(g)
    assert "not one matmul with v" in line


def test_bool_masks_with_different_mild_fills_are_not_fused():
    blk = Block()
    g = blk.build(scale="div", masks=("causal_neg_inf", "bool_padding_fill_10"))
    (line,) = not_fused(g)
    assert "different values" in line


def test_finite_fill_bool_mask_with_additive_mask_is_not_fused():
    blk = Block()
    g = blk.build(scale="div", masks=("bool_padding", "padding"))
    (line,) = not_fused(g)
    assert "finite fill and an additive mask" in line


def test_rank3_scores_are_explained():
    g = Graph("bmm")
    q = g.add_input("q", TensorType((4, T, D)))
    k = g.add_input("k", TensorType((4, T, D)))
    p = g.add("softmax", g.add("matmul", q, g.add("transpose", k, perm=(0, 2, 1))))
    g.outputs = [g.add("matmul", p, k)]
    (line,) = not_fused(g)
    assert "[batch, heads, queries, keys]" in line and "matmul" in line


# --- the built-in models ------------------------------------------------------------------

BLOCKS = {"gpt": 2, "bert": 2, "transformer": 6, "vit": 2, "llama": 2}  # tiny presets: 2 layers


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_every_attention_block_of_every_model_fuses(name):
    m = tensorc.models.get(name)
    g = tensorc.trace(m, **m.example_inputs(batch=2))
    assert explain(g) == []
    counts = run_pipeline(g, "O2", verify=True).op_counts()
    assert counts.get("attention") == BLOCKS[name] and "softmax" not in counts


def test_gpt_three_layers_gives_three_attention_ops():
    m = tensorc.models.get("gpt", n_layer=3)
    g = tensorc.trace(m, **m.example_inputs(batch=1, seq=8))
    out = run_pipeline(g, "O2", verify=True)
    assert out.op_counts()["attention"] == 3
    assert all(n.attrs["causal"] for n in out.nodes if n.op == "attention")


def test_real_hf_gpt2_export_fuses_every_layer():
    """A GPT-2 exported by PyTorch's legacy exporter (HF, sdpa attention), in tests/data."""
    import os

    from tensorc.frontend.onnx import load
    path = os.path.join(os.path.dirname(__file__), "data", "hf", "gpt2_sdpa_legacy.onnx")
    g = load(path)
    import onnx
    layers = sum(n.op_type == "Softmax" for n in onnx.load(path).graph.node)
    data = np.load(path[:-5] + ".npz")
    feeds = {v.name: data["in:" + v.name] for v in g.inputs}
    out = run_pipeline(g, "O2", verify=True)
    assert out.op_counts().get("attention") == layers and "softmax" not in deep_counts(out)
    with np.errstate(over="ignore"):
        got = get_backend("numpy").compile(out).run(feeds)["logits"]
    assert rel_err(got, data["out:logits"]) <= 1e-4
