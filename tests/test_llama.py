"""The Llama-family model and its layers: RMSNorm, rotary positions, SwiGLU and
grouped-query attention against plain numpy; the model fused (one attention op per
layer, k/v un-repeated), on llvm without fallbacks, through the CLI, with the cache
interface exercised by a test-only cache; and, when torch and transformers are
installed, against Hugging Face's LlamaForCausalLM with the same weights."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import tensorc
from tensorc import cli
from tensorc.backends import get_backend
from tensorc.frontend import (
    F,
    GroupedQueryAttention,
    RMSNorm,
    RotaryEmbedding,
    SwiGLU,
    Tensor,
)
from tensorc.passes import explain, run_pipeline


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def randn(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


# --- layers against numpy -------------------------------------------------------------------

def np_rope(x, positions, theta=10000.0):
    """Hugging Face's apply_rotary_pos_emb: x * cos + rotate_half(x) * sin."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
    ang = np.asarray(positions, np.float64)[..., None] * inv
    emb = np.concatenate([ang, ang], -1)
    if emb.ndim == 3:
        emb = emb[:, None]
    rot = np.concatenate([-x[..., d // 2:], x[..., :d // 2]], -1)
    return x * np.cos(emb) + rot * np.sin(emb)


def test_rms_norm():
    rng = np.random.default_rng(0)
    norm = RMSNorm(12, eps=1e-5).init_weights(1)
    x = randn(rng, 2, 5, 12)
    w = norm.weight.numpy()
    want = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-5) * w
    assert rel_err(norm(Tensor(x)).numpy(), want) < 1e-6


@pytest.mark.parametrize("positions", ["default", "1d", "2d"])
def test_rotary_matches_hf_formula(positions):
    rng = np.random.default_rng(1)
    rope = RotaryEmbedding(16)
    x = randn(rng, 2, 3, 7, 16)
    pos = {"default": np.arange(7), "1d": np.arange(5, 12),
           "2d": rng.integers(0, 50, (2, 7))}[positions]
    given = None if positions == "default" else Tensor(pos.astype(np.int64))
    cos, sin = rope.tables(F.arange(7) if given is None else given)
    got = rope.rotate(Tensor(x), cos, sin).numpy()
    assert rel_err(got, np_rope(x.astype(np.float64), pos)) < 1e-5


def test_rotary_scores_depend_on_relative_position_only():
    rng = np.random.default_rng(2)
    rope = RotaryEmbedding(8)
    q, k = randn(rng, 1, 1, 1, 8), randn(rng, 1, 1, 1, 8)

    def score(m, n):
        cq = rope.tables(Tensor(np.array([m], np.int64)))
        ck = rope.tables(Tensor(np.array([n], np.int64)))
        return float((rope.rotate(Tensor(q), *cq).numpy() * rope.rotate(Tensor(k), *ck)
                      .numpy()).sum())
    assert score(3, 1) == pytest.approx(score(12, 10), rel=1e-4)
    assert score(3, 1) != pytest.approx(score(3, 2), rel=1e-3)


def test_swiglu():
    rng = np.random.default_rng(3)
    ff = SwiGLU(8, 20).init_weights(0)
    x = randn(rng, 2, 3, 8)
    g, u = x @ ff.gate.weight.numpy(), x @ ff.up.weight.numpy()
    want = (g / (1 + np.exp(-g)) * u) @ ff.down.weight.numpy()
    assert rel_err(ff(Tensor(x)).numpy(), want) < 1e-5


def np_gqa(attn, x, positions=None):
    """Grouped-query attention the long way: every head's k/v repeated, float64."""
    b, t, _ = x.shape
    h, hk, d = attn.n_head, attn.n_kv_head, attn.d_head
    x = x.astype(np.float64)
    pos = np.arange(t) if positions is None else positions

    def heads(w, n):
        return (x @ w.numpy()).reshape(b, t, n, d).transpose(0, 2, 1, 3)
    q = np_rope(heads(attn.q.weight, h), pos)
    k = np.repeat(np_rope(heads(attn.k.weight, hk), pos), h // hk, axis=1)
    v = np.repeat(heads(attn.v.weight, hk), h // hk, axis=1)
    s = q @ np.swapaxes(k, -1, -2) / math.sqrt(d)
    s = np.where(np.tri(t, dtype=bool), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    out = (p / p.sum(-1, keepdims=True)) @ v
    return out.transpose(0, 2, 1, 3).reshape(b, t, h * d) @ attn.o.weight.numpy()


@pytest.mark.parametrize("hk", [1, 2, 4])
def test_grouped_query_attention_layer(hk):
    rng = np.random.default_rng(4)
    attn = GroupedQueryAttention(32, 4, hk).init_weights(hk)
    x = randn(rng, 2, 9, 32)
    assert rel_err(attn(Tensor(x)).numpy(), np_gqa(attn, x)) < 1e-5
    g = tensorc.trace(attn, x=x)
    fused = run_pipeline(g, "O2", verify=True)
    (node,) = [n for n in fused.nodes if n.op == "attention"]
    assert node.attrs["causal"] and node.inputs[1].type.shape[1] == hk
    for backend in ("numpy", "llvm"):
        got = get_backend(backend).compile(fused)(x=x)
        assert rel_err(got, np_gqa(attn, x)) < 1e-5, backend


def test_layer_errors():
    with pytest.raises(ValueError, match="n_kv_head"):
        GroupedQueryAttention(32, 4, 3)
    with pytest.raises(ValueError, match="even head dim"):
        RotaryEmbedding(7)
    with pytest.raises(tensorc.errors.TensorcError, match="n_kv_head"):
        tensorc.models.get("llama", n_kv_head=3)


# --- the cache interface, with a test-only cache -----------------------------------------

class ListCache:
    """What cached decoding will hand each attention layer: positions of the new
    tokens, update(k, v) -> all keys and values so far, and the visibility mask."""

    def __init__(self, past_k=None, past_v=None, start=0, t=1, batch=1):
        self.k, self.v, self.start, self.t = past_k, past_v, start, t
        self.positions = Tensor(np.broadcast_to(np.arange(start, start + t),
                                                (batch, t)).astype(np.int64))
        total = start + t
        keep = np.arange(total)[None, :] <= np.arange(start, total)[:, None]
        self.mask = Tensor(np.broadcast_to(keep, (batch, 1, t, total)).copy())

    def update(self, k, v):
        if self.k is not None:
            k, v = F.concat([self.k, k], 2), F.concat([self.v, v], 2)
        self.k, self.v = k, v
        return k, v


def test_cached_decoding_matches_the_full_sequence():
    """A prefix, then new tokens one step at a time through the cache interface, give
    the rows the full causal pass gives: the layer is ready for a cache."""
    rng = np.random.default_rng(5)
    attn = GroupedQueryAttention(32, 4, 2).init_weights(0)
    x = randn(rng, 2, 8, 32)
    full = attn(Tensor(x)).numpy()
    cache = ListCache(t=5, batch=2)
    rows = [attn(Tensor(x[:, :5]), cache=cache).numpy()]
    for i in range(5, 8):
        step = ListCache(cache.k, cache.v, start=i, t=1, batch=2)
        rows.append(attn(Tensor(x[:, i:i + 1]), cache=step).numpy())
        cache = step
    assert cache.k.shape == (2, 2, 8, 8)   # keys stored rotated, un-repeated
    assert rel_err(np.concatenate(rows, 1), full) < 1e-5


class TracedCache:
    """The cache interface over traced tensors: past keys/values and the mask are graph
    inputs, as a decoding step's graph would have them."""

    def __init__(self, past_k, past_v, positions, mask):
        self.past_k, self.past_v, self.positions, self.mask = past_k, past_v, positions, mask

    def update(self, k, v):
        return F.concat([self.past_k, k], 2), F.concat([self.past_v, v], 2)


def test_a_traced_decoding_step_fuses_to_one_attention_with_the_cache_mask():
    """What cached decoding will trace: past k/v [b, hk, P, d], absolute positions and a
    [b, 1, t, P + t] mask. It fuses into one attention op on the un-repeated k/v with the
    mask as its input, and runs on llvm without fallbacks."""
    from tensorc.frontend import Module
    attn = GroupedQueryAttention(32, 4, 2).init_weights(0)

    class Step(Module):
        def __init__(self):
            super().__init__()
            self.attn = attn

        def forward(self, x, past_k, past_v, positions, mask):
            return self.attn(x, cache=TracedCache(past_k, past_v, positions, mask))
    rng = np.random.default_rng(6)
    x = randn(rng, 2, 8, 32)
    full = attn(Tensor(x)).numpy()
    prefix = ListCache(t=6, batch=2)
    attn(Tensor(x[:, :6]), cache=prefix)
    step = ListCache(prefix.k, prefix.v, start=6, t=2, batch=2)
    feeds = {"x": x[:, 6:], "past_k": prefix.k.numpy(), "past_v": prefix.v.numpy(),
             "positions": step.positions.numpy(), "mask": step.mask.numpy()}
    g = run_pipeline(tensorc.trace(Step(), **feeds), "O2", verify=True)
    (node,) = [n for n in g.nodes if n.op == "attention"]
    assert not node.attrs["causal"] and len(node.inputs) == 4
    assert node.inputs[1].type.shape == (2, 2, 8, 8) and "softmax" not in g.op_counts()
    exe = get_backend("llvm").compile(g)
    assert rel_err(exe(**feeds), full[:, 6:]) < 1e-5
    assert exe.stats()["fallbacks"] == []


# --- the model ------------------------------------------------------------------------------

def test_tiny_fuses_one_attention_per_layer_on_unrepeated_kv():
    m = tensorc.models.get("llama", n_layer=3)
    ins = m.example_inputs(batch=2, seq=12)
    g = tensorc.trace(m, **ins)
    assert explain(g) == []
    out = run_pipeline(g, "O2", verify=True)
    counts = out.op_counts()
    assert counts["attention"] == 3 and "softmax" not in counts and "expand" not in counts
    for n in out.nodes:
        if n.op == "attention":
            assert n.attrs["causal"] and len(n.inputs) == 3
            assert n.inputs[1].type.shape == (2, 2, 12, 8)   # n_kv_head = 2
    want = m(**ins).numpy()
    exe = get_backend("llvm").compile(out)
    assert rel_err(exe(**ins), want) < 1e-5
    assert exe.stats()["fallbacks"] == []


def test_small_on_llvm_fuses_without_fallbacks():
    from tensorc.loading import load_model
    loaded = load_model("llama", "small", seq=32)
    g = run_pipeline(loaded.graph, "O2", verify=True)
    assert g.op_counts()["attention"] == 6
    exe = get_backend("llvm").compile(g)
    got = exe.run(loaded.inputs)["logits"]
    assert exe.stats()["fallbacks"] == []
    want = get_backend("numpy").compile(g).run(loaded.inputs)["logits"]
    assert rel_err(got, want) < 1e-4


def test_small_parameter_count():
    m = tensorc.models.get("llama", "small")
    c = m.config
    d, hd = c.d_model, c.d_model // c.n_head
    block = d * d * 2 + 2 * d * c.n_kv_head * hd + 3 * d * c.d_ff + 2 * d
    assert m.num_parameters() == 2 * c.vocab_size * d + c.n_layer * block + d


# --- the command line -----------------------------------------------------------------------

def cli_ok(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out


def test_cli_run_inspect_compare(capsys):
    out = cli_ok(capsys, "run", "llama", "--batch", "2", "--seq", "8")
    assert out.startswith("logits: f32[2,8,97]")
    info = json.loads(cli_ok(capsys, "inspect", "llama", "--format", "json", "--passes", "O2"))
    assert info["ops"]["attention"] == 2 and info["config"]["n_kv_head"] == 2
    rep = json.loads(cli_ok(capsys, "compare", "llama", "--json", "--backends", "numpy,llvm",
                            "--passes", "O2", "--repeat", "1"))
    for row in rep["results"]:
        assert row["rel_err"] <= 1e-5, row


# --- Hugging Face ---------------------------------------------------------------------------

def test_matches_hf_llama_for_causal_lm():
    torch = pytest.importorskip("torch", reason="torch not installed (pip install "
                                "torch==2.13.0 for the Hugging Face comparison)")
    transformers = pytest.importorskip("transformers", reason="transformers not installed")
    m = tensorc.models.get("llama")
    c = m.config
    hf_cfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff,
        num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
        num_key_value_heads=c.n_kv_head, max_position_embeddings=c.max_seq_len,
        rms_norm_eps=c.eps, rope_theta=c.rope_theta, attention_bias=False,
        mlp_bias=False, tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()

    def t(x, transpose=False):   # tensorc stores Linear weights [in, out]
        return torch.from_numpy(np.ascontiguousarray(x.numpy().T if transpose else x.numpy()))
    sd = {"model.embed_tokens.weight": t(m.embed.weight), "model.norm.weight": t(m.norm.weight),
          "lm_head.weight": t(m.lm_head.weight, True)}
    for i, blk in enumerate(m.layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = t(blk.attn_norm.weight)
        sd[p + "post_attention_layernorm.weight"] = t(blk.ff_norm.weight)
        for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"),
                             ("o", "o_proj")):
            sd[p + f"self_attn.{theirs}.weight"] = t(getattr(blk.attn, ours).weight, True)
        for ours in ("gate", "up", "down"):
            sd[p + f"mlp.{ours}_proj.weight"] = t(getattr(blk.ff, ours).weight, True)
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    ins = m.example_inputs(batch=2, seq=20)
    with torch.no_grad():
        want = hf(torch.from_numpy(ins["input_ids"])).logits.numpy()
    g = run_pipeline(tensorc.trace(m, **ins), "O2")
    for backend in ("numpy", "llvm"):
        err = rel_err(get_backend(backend).compile(g)(**ins), want)
        print(f"llama tiny vs HF LlamaForCausalLM on {backend}: rel err {err:.2e}")
        assert err < 1e-5, backend


def test_fused_model_exports_to_onnx_and_fuses_back():
    """The O2 graph (attention ops on un-repeated k/v, fused regions) exported: ONNX
    Runtime agrees, and importing it and fusing again gives one attention per layer."""
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed")
    from tensorc.frontend import onnx as tx
    m = tensorc.models.get("llama")
    ins = m.example_inputs(batch=2, seq=10)
    g = run_pipeline(tensorc.trace(m, **ins), "O2")
    proto = tx.to_model(g)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    want = m(**ins).numpy()
    assert rel_err(sess.run(None, ins)[0], want) < 1e-5
    back = run_pipeline(tx.from_model(proto), "O2", verify=True)
    counts = back.op_counts()
    assert counts["attention"] == 2 and "softmax" not in counts and "expand" not in counts
    assert rel_err(get_backend("numpy").compile(back)(**ins), want) < 1e-5
