"""Sparse and linear attention: the ops' references against brute-force definitions,
the decompositions, the passes (zoo models, our ONNX export and a real exporter's file),
the zoo's attention options, and generation with a sliding window. The llvm and cupy
kernels have their own files."""

from __future__ import annotations

import math
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest
from test_llvm_attention import naive  # the dense float64 definition

import tensorc
from tensorc import models
from tensorc.backends import get_backend
from tensorc.errors import ShapeError, TensorcError
from tensorc.frontend import onnx as tx
from tensorc.generation import Generator
from tensorc.ir import Graph, TensorType
from tensorc.ops import get_op
from tensorc.ops.sparse_attention import (
    linear_attention,
    pattern,
    performer_features,
    random_blocks,
)
from tensorc.passes import explain, run_pipeline

HF = Path(__file__).parent / "data" / "hf"


# -- the patterns, against their definitions written pair by pair --------------------

def local_visible(i, j, before, after, dilation, causal, global_tokens):
    if causal and j > i:
        return False
    if i in global_tokens or j in global_tokens:
        return True
    after = 0 if causal else after
    return i - before <= j <= i + after and (i - j) % dilation == 0


def block_visible(i, j, t, s, block, near, rand, seed, causal, global_tokens):
    if causal and j > i:
        return False
    if i in global_tokens or j in global_tokens:
        return True
    a, c = i // block, j // block
    if abs(a - c) <= near:
        return True
    top = a if causal else -(-s // block) - 1
    local = {x for x in range(a - near, a + near + 1) if 0 <= x <= top}
    return c in random_blocks(a, top + 1, local, rand, seed)


def brute(fn, t, s, *args):
    return np.array([[fn(i, j, *args) for j in range(s)] for i in range(t)], bool)


LOCAL = [  # t, s, before, after, dilation, causal, global tokens
    (1, 1, 0, 0, 1, False, ()), (37, 37, 4, 2, 1, False, ()), (37, 37, 5, 9, 1, True, ()),
    (50, 50, 6, 6, 2, False, (0, 1, 2)), (50, 50, 9, 0, 3, True, (0, 7, 49)),
    (20, 45, 3, 3, 1, False, (44,)), (45, 20, 3, 3, 1, True, (2, 3, 30)),
]
BLOCK = [  # t, s, block, neighbours, random blocks, seed, causal, global tokens
    (1, 1, 4, 1, 0, 0, False, ()), (37, 37, 8, 1, 0, 0, False, ()),
    (37, 37, 8, 0, 2, 3, False, (0,)), (64, 64, 16, 1, 1, 5, True, (0, 1)),
    (70, 70, 10, 0, 3, 1, True, (33, 69)), (30, 50, 7, 1, 1, 2, False, ()),
]


def local_attrs(c):
    t, s, before, after, dilation, causal, g = c
    return get_op("local_attention").complete_attrs(
        {"before": before, "after": after, "dilation": dilation, "causal": causal,
         "global_tokens": g, "scale": 0.3})


def block_attrs(c):
    t, s, block, near, rand, seed, causal, g = c
    return get_op("block_sparse_attention").complete_attrs(
        {"block": block, "local_blocks": near, "random_blocks": rand, "seed": seed,
         "causal": causal, "global_tokens": g, "scale": 0.3})


@pytest.mark.parametrize("c", LOCAL)
def test_local_pattern_is_its_definition(c):
    t, s, *args = c
    p = pattern("local_attention", t, s, local_attrs(c))
    want = brute(local_visible, t, s, *args)
    assert (p.dense(t, s) == want).all()
    assert p.pairs() == want.sum()


@pytest.mark.parametrize("c", BLOCK)
def test_block_pattern_is_its_definition(c):
    t, s, *args = c
    p = pattern("block_sparse_attention", t, s, block_attrs(c))
    want = brute(block_visible, t, s, t, s, *args)
    assert (p.dense(t, s) == want).all()
    assert p.pairs() == want.sum()


def test_random_blocks_are_seeded_and_spread():
    draws = {tuple(random_blocks(3, 40, {2, 3, 4}, 3, seed)) for seed in range(20)}
    assert len(draws) > 15   # seeds differ
    assert random_blocks(3, 40, {2, 3, 4}, 3, 7) == random_blocks(3, 40, {2, 3, 4}, 3, 7)
    assert not {2, 3, 4} & set(random_blocks(3, 40, {2, 3, 4}, 30, 7))


# -- the references against dense attention under the pattern's mask ----------------

def inputs(seed, b, h, hk, t, s, d=16, dv=12):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, h, t, d), dtype=np.float32)
    k = rng.standard_normal((b, hk, s, d), dtype=np.float32)
    v = rng.standard_normal((b, hk, s, dv), dtype=np.float32)
    return q, k, v


def masks(rng, b, t, s):
    keep = rng.random((b, 1, 1, s)) < 0.8
    keep[..., 0] = True
    return {"none": None, "keep": keep,
            "add": rng.standard_normal((1, 1, t, s)).astype(np.float32)}


def dense_with(q, k, v, mask, visible, scale, mask_value):
    """The float64 definition: scores masked by the user's mask, then every pair the
    pattern leaves out at -inf."""
    g = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
    if mask is not None and mask.dtype == np.bool_:
        bias = np.where(mask, 0.0, -np.inf)   # only used with mask_value = -inf
        mask = bias if mask_value == -math.inf else np.where(mask, 0.0, mask_value)
        if mask_value != -math.inf:   # replacement, not addition: do it by hand
            sc = scale * q.astype(np.float64) @ np.swapaxes(k.astype(np.float64), -1, -2)
            sc = np.where(mask == 0.0, sc, mask_value)
            sc = np.where(visible, sc, -np.inf)
            w = np.exp(sc - sc.max(-1, keepdims=True))
            return (w / w.sum(-1, keepdims=True)) @ v
    full = np.where(visible, 0.0, -np.inf) + (0.0 if mask is None else mask)
    return naive(q, k, v, full, scale)


@pytest.mark.parametrize("hk", [1, 2, 4])
@pytest.mark.parametrize("mask", ["none", "keep", "add"])
@pytest.mark.parametrize("op,c", [("local_attention", c) for c in LOCAL[1:]]
                         + [("block_sparse_attention", c) for c in BLOCK[1:]])
def test_reference_is_dense_attention_under_the_pattern(op, c, mask, hk):
    t, s = c[:2]
    attrs = local_attrs(c) if op == "local_attention" else block_attrs(c)
    q, k, v = inputs(7, 2, 4, hk, t, s)
    m = masks(np.random.default_rng(3), 2, t, s)[mask]
    got = get_op(op).evaluate([q, k, v] + ([m] if m is not None else []), attrs)[0]
    want = dense_with(q, k, v, m, pattern(op, t, s, attrs).dense(t, s), 0.3, -math.inf)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_a_finite_mask_value_replaces_masked_scores_but_not_the_pattern():
    c = LOCAL[2]
    attrs = {**local_attrs(c), "mask_value": -5.0}
    t, s = c[:2]
    q, k, v = inputs(1, 1, 2, 2, t, s)
    keep = np.random.default_rng(0).random((1, 1, t, s)) < 0.5
    got = get_op("local_attention").evaluate([q, k, v, keep], attrs)[0]
    want = dense_with(q, k, v, keep, pattern("local_attention", t, s, attrs).dense(t, s), 0.3,
                      -5.0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_the_reference_never_builds_the_scores():
    """seq 16384, window 64: dense scores would take 1 GiB; the reference stays small."""
    q, k, v = inputs(0, 1, 1, 1, 16384, 16384, d=8, dv=8)
    attrs = get_op("local_attention").complete_attrs({"before": 63, "causal": True})
    tracemalloc.start()
    out = get_op("local_attention").evaluate([q, k, v], attrs)[0]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 64 << 20, f"peak {peak / 2**20:.0f} MiB"
    i = 5000   # one row against its definition
    sc = 1.0 * k[0, 0, i - 63:i + 1] @ q[0, 0, i]
    w = np.exp(sc - sc.max())
    np.testing.assert_allclose(out[0, 0, i], w @ v[0, 0, i - 63:i + 1] / w.sum(), rtol=1e-4)


def test_bad_attributes_are_clear_errors():
    g = Graph("g")
    q = g.add_input("q", TensorType((1, 2, 8, 4)))
    with pytest.raises(ShapeError, match="before >= 0"):
        g.add("local_attention", q, q, q, before=-1)
    with pytest.raises(ShapeError, match="block >= 1"):
        g.add("block_sparse_attention", q, q, q, block=0)
    with pytest.raises(ShapeError, match="global tokens are positions"):
        g.add("local_attention", q, q, q, before=2, global_tokens=(-1,))
    w = g.add_input("w", TensorType((16, 3)))
    with pytest.raises(ShapeError, match=r"features must be f32\[m, 4\]"):
        g.add("linear_attention", q, q, q, w)
    m = g.add_input("m", TensorType((1, 1, 8, 8), "bool"))
    w4 = g.add_input("w4", TensorType((16, 4)))
    with pytest.raises(ShapeError, match="only a key mask"):
        g.add("linear_attention", q, q, q, w4, m)


# -- the decompositions (what ONNX export writes, and what runs without a kernel) ----

def run_decomposed(op, arrays, attrs, shapes=None):
    g = Graph("d")
    ins = [g.add_input(f"x{i}", TensorType(shapes[i] if shapes else a.shape,
                                           "bool" if a.dtype == np.bool_ else "f32"))
           for i, a in enumerate(arrays)]
    g.outputs = list(get_op(op).decompose(g, ins, **attrs))
    exe = get_backend("numpy").compile(g)
    return exe(*arrays)


@pytest.mark.parametrize("op,c", [("local_attention", LOCAL[4]),
                                  ("block_sparse_attention", BLOCK[3])])
def test_decomposition_equals_the_reference(op, c):
    t, s = c[:2]
    attrs = local_attrs(c) if op == "local_attention" else block_attrs(c)
    q, k, v = inputs(2, 2, 4, 2, t, s)
    m = masks(np.random.default_rng(1), 2, t, s)["keep"]
    want = get_op(op).evaluate([q, k, v, m], attrs)[0]
    np.testing.assert_allclose(run_decomposed(op, [q, k, v, m], attrs), want, rtol=1e-4,
                               atol=1e-6)


def test_a_symbolic_window_decomposes_into_a_band():
    attrs = get_op("local_attention").complete_attrs({"before": 3, "after": 2, "scale": 0.5})
    q, k, v = inputs(4, 1, 2, 2, 19, 19)
    sym = [(1, 2, "seq", 16), (1, 2, "seq", 16), (1, 2, "seq", 12)]
    got = run_decomposed("local_attention", [q, k, v], attrs, sym)
    want = get_op("local_attention").evaluate([q, k, v], attrs)[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    with pytest.raises(TensorcError, match="needs static sequence lengths"):
        run_decomposed("local_attention", [q, k, v], {**attrs, "dilation": 2}, sym)


# -- linear attention ----------------------------------------------------------------

def favor_naive(q, k, v, w, mask, scale, causal):
    """FAVOR+ written out in float64 as a t x s matrix of feature products."""
    q, k, v, w = (x.astype(np.float64) for x in (q, k, v, w))
    g = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)

    def phi(x):
        x = x * math.sqrt(scale)
        return np.exp(x @ w.T - (x * x).sum(-1, keepdims=True) / 2)
    a = phi(q) @ np.swapaxes(phi(k), -1, -2)             # [b, h, t, s]
    if mask is not None:
        a = a * (mask if mask.dtype == np.bool_ else np.exp(mask))
    if causal:
        a = np.tril(a)
    return (a @ v) / a.sum(-1, keepdims=True)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hk", [1, 2, 4])
@pytest.mark.parametrize("mask", ["none", "keep", "add"])
@pytest.mark.parametrize("t,s", [(1, 1), (70, 70), (130, 130), (9, 40)])
def test_linear_attention_is_favor(causal, hk, mask, t, s):
    q, k, v = inputs(5, 2, 4, hk, t, s)
    w = performer_features(16, 48, seed=1)
    m = masks(np.random.default_rng(2), 2, t, s)[mask]
    if m is not None and m.shape[2] != 1:
        m = m[:, :, :1]
    got = linear_attention(q * 0.5, k * 0.5, v, w, m, 0.25, causal)
    want = favor_naive(q * 0.5, k * 0.5, v, w, m, 0.25, causal)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_performer_features_are_orthogonal_blocks_with_gaussian_lengths():
    w = performer_features(16, 40, seed=3).astype(np.float64)
    unit = w / np.linalg.norm(w, axis=1, keepdims=True)
    np.testing.assert_allclose(unit[:16] @ unit[:16].T, np.eye(16), atol=1e-5)
    np.testing.assert_allclose(unit[16:32] @ unit[16:32].T, np.eye(16), atol=1e-5)
    assert abs(np.mean(np.linalg.norm(w, axis=1) ** 2) / 16 - 1) < 0.3   # E|g|^2 = d
    assert (performer_features(16, 40, 3) == performer_features(16, 40, 3)).all()


@pytest.mark.parametrize("causal", [False, True])
def test_performer_approaches_softmax_as_features_grow(causal):
    """The approximation error (mean |out - softmax attention| / mean |softmax attention|,
    8 feature seeds) shrinks as the feature count grows."""
    q, k, v = inputs(0, 1, 4, 4, 128, 128, d=16, dv=16)
    q, k = q * 0.4, k * 0.4
    exact = naive(q, k, v, None, 0.25, causal)
    errs = []
    for m in (16, 128, 1024):
        e = [np.abs(linear_attention(q, k, v, performer_features(16, m, seed), None, 0.25,
                                     causal) - exact).mean() for seed in range(8)]
        errs.append(np.mean(e) / np.abs(exact).mean())
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[2] < 0.06, errs


def test_linear_decomposition_equals_the_reference():
    q, k, v = inputs(6, 2, 4, 2, 33, 33)
    w = performer_features(16, 24, 0)
    m = masks(np.random.default_rng(4), 2, 33, 33)["add"][:, :, :1]
    for causal in (False, True):
        want = linear_attention(q, k, v, w, m, 0.25, causal)
        got = run_decomposed("linear_attention", [q, k, v, w, m],
                             {"scale": 0.25, "causal": causal})
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


# -- the passes ----------------------------------------------------------------------

def outputs(graph, feeds, backend="numpy"):
    return get_backend(backend).compile(graph).run(feeds)


SPARSE = {"local_attention", "block_sparse_attention", "linear_attention"}
ZOO_CASES = [
    ("gpt", "window=4", {"attention": "local", "window": 4}),
    ("gpt", "block=4:global=1", {"attention": "block", "block": 4, "global_tokens": 1}),
    ("gpt", "features=32", {"attention": "performer", "features": 32}),
    ("bert", "window=6:global=2", {"attention": "local", "window": 6, "global_tokens": 2}),
    ("bert", "block=4", {"attention": "block", "block": 4}),
    ("bert", "features=64", {"attention": "performer", "features": 64}),
]


@pytest.mark.parametrize("name,opts,fields", ZOO_CASES, ids=lambda x: str(x))
def test_pass_on_a_dense_model_equals_the_zoo_model_built_sparse(name, opts, fields):
    """The rewrite of a traced dense model and the same weights traced with sparse or
    linear attention compute the same thing (and differ from dense)."""
    dense = models.get(name, "tiny")
    sparse = models.get(name, "tiny", **fields)
    feeds = dense.example_inputs(batch=2, seq=32)
    pass_name = "linearize-attention" if "features" in opts else "sparsify-attention"
    symbolic = {k: tensorc.TensorSpec(("batch", "seq"), "i64") for k in feeds}
    rewritten = run_pipeline(tensorc.trace(dense, **symbolic), f"O2,{pass_name}:{opts}",
                             verify=True)   # symbolic lengths: no length rule
    ops = [n.op for n in rewritten.nodes]
    assert "attention" not in ops and len([o for o in ops if o in SPARSE]) == 2, ops
    traced = run_pipeline(tensorc.trace(sparse, **feeds), "O2")
    assert [o for o in ops if o in SPARSE] == [n.op for n in traced.nodes if n.op in SPARSE]
    got, want = outputs(rewritten, feeds), outputs(traced, feeds)
    np.testing.assert_allclose(got["logits"], want["logits"], rtol=1e-4, atol=1e-5)
    base = outputs(run_pipeline(tensorc.trace(dense, **feeds), "O2"), feeds)["logits"]
    assert np.abs(base - got["logits"]).max() > 1e-5
    llvm = outputs(rewritten, feeds, "llvm")["logits"]
    np.testing.assert_allclose(llvm, got["logits"], rtol=1e-4, atol=1e-5)


def test_the_pass_takes_an_imported_onnx_export(tmp_path):
    """Our ONNX export of the dense GPT, imported and sparsified, equals the zoo's local
    GPT; and the sparse model's own export (the decomposition) runs in ONNX Runtime."""
    ort = pytest.importorskip("onnxruntime")
    dense = models.get("gpt", "tiny")
    feeds = dense.example_inputs(seq=16)
    path = tmp_path / "gpt.onnx"
    tx.save(tensorc.trace(dense, **feeds), path)
    g = run_pipeline(tx.load(path), "O2,sparsify-attention:window=4", verify=True)
    assert sum(n.op == "local_attention" for n in g.nodes) == 2
    sparse = models.get("gpt", "tiny", attention="local", window=4)
    want = outputs(tensorc.trace(sparse, **feeds), feeds)["logits"]
    np.testing.assert_allclose(outputs(g, feeds, "llvm")["logits"], want, rtol=1e-4, atol=1e-5)
    tx.save(run_pipeline(tensorc.trace(sparse, **feeds), "O2"), tmp_path / "local.onnx")
    sess = ort.InferenceSession(str(tmp_path / "local.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, feeds)[0], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("stem", ["bert_sdpa_dynamo", "bert_eager_legacy", "gpt2_eager_legacy",
                                  "vit_eager_dynamo"])
def test_the_passes_take_real_exporters_files(stem):
    """Hugging Face exports (both PyTorch exporters): every fused attention becomes
    sparse or linear (BERT's padding mask, expanded to [b, 1, t, s] with a query test
    that is always true, counts as a key mask; GPT-2's merged causal + padding mask
    fuses as causal with a key mask), and llvm runs the rewritten graph as numpy
    does."""
    with np.load(HF / f"{stem}.npz") as d:
        feeds = {k.removeprefix("in:"): d[k] for k in d.files if k.startswith("in:")}
    graph = tx.load(HF / f"{stem}.onnx")
    for spec, op in (("sparsify-attention:window=4", "local_attention"),
                     ("linearize-attention:features=32:always=1", "linear_attention")):
        g = run_pipeline(graph, "O2," + spec, verify=True)
        ops = [n.op for n in g.nodes]
        assert "attention" not in ops and ops.count(op) == 2, ops
        want = outputs(g, feeds)
        got = outputs(g, feeds, "llvm")
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-4,
                                       atol=1e-5 * np.abs(want[name]).max())


def test_refusals_and_the_length_rule():
    model = models.get("gpt", "tiny")
    from tensorc.frontend.cache import decoder_step
    step = run_pipeline(decoder_step(model), "O2")
    with pytest.warns(UserWarning, match=r"differ in length \(a key cache\?\)"):
        kept = run_pipeline(step, "sparsify-attention:window=4,linearize-attention")
    assert [n.op for n in kept.nodes] == [n.op for n in step.nodes]
    assert explain(kept) == []   # nothing sparse: nobody asked
    feeds = model.example_inputs(seq=8)
    g = run_pipeline(tensorc.trace(model, **feeds), "O2")
    with pytest.warns(UserWarning, match="kept 2 attention"):   # window 6 of 8: no gain
        same = run_pipeline(g, "sparsify-attention:window=6")
    assert [n.op for n in same.nodes] == [n.op for n in g.nodes]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "local_attention" in {n.op for n in run_pipeline(
            g, "sparsify-attention:window=2").nodes}
        assert "local_attention" in {n.op for n in run_pipeline(
            g, "sparsify-attention:window=6:always=1").nodes}
    with pytest.warns(UserWarning, match="dense attention is faster than 16 features"):
        same = run_pipeline(g, "linearize-attention:features=16")   # 36 pairs < 1.3 x 16 x 16
    assert [n.op for n in same.nodes] == [n.op for n in g.nodes]
    long = run_pipeline(tensorc.trace(model, **model.example_inputs(seq=64)), "O2")
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # 2080 causal pairs > 1.3 x 128 x 8
        assert "linear_attention" in {n.op for n in run_pipeline(
            long, "linearize-attention:features=8").nodes}


def test_linear_refuses_a_query_dependent_mask():
    """A per-query mask stays dense (a warning says why; `explain` too, beside an
    attention that did change)."""
    g = Graph("g")
    q = g.add_input("q", TensorType((1, 2, 8, 4)))
    m = g.add_input("m", TensorType((1, 1, 8, 8)))
    g.outputs = [g.add("attention", q, q, q, m, scale=0.5), g.add("attention", q, q, q)]
    with pytest.warns(UserWarning, match="depends on the query"):
        out = run_pipeline(g, "linearize-attention:always=1")
    assert [n.op for n in out.nodes] == ["attention", "linear_attention"]
    assert any("depends on the query" in line for line in explain(out))


@pytest.mark.parametrize("spec,message", [
    ("sparsify-attention", "needs window=W"),
    ("sparsify-attention:window=4:block=4", "exactly one"),
    ("sparsify-attention:window=4:global=2:tokens=1+2", "not both"),
    ("sparsify-attention:window=4:tokens=a", "positions joined by"),
    ("sparsify-attention:window=4:globl=2", "unknown option"),
    ("linearize-attention:features=0", "must be positive"),
])
def test_bad_pass_options_are_clear_errors(spec, message):
    g = tensorc.trace(models.get("gpt", "tiny"), **models.get("gpt", "tiny").example_inputs())
    with pytest.raises(TensorcError, match=message):
        run_pipeline(g, "O2," + spec)


# -- the zoo -------------------------------------------------------------------------

@pytest.mark.parametrize("fields", [{"attention": "block", "window": 2},
                                    {"attention": "performer", "features": 16}])
def test_vit_attention_options_run_on_llvm(fields):
    vit = models.get("vit", "tiny", **fields)
    feeds = vit.example_inputs(batch=2)
    g = run_pipeline(tensorc.trace(vit, **feeds), "O2")
    want = outputs(g, feeds)["logits"]
    np.testing.assert_allclose(outputs(g, feeds, "llvm")["logits"], want, rtol=1e-4, atol=1e-5)


def test_vit_windows_group_each_square_of_patches():
    vit = models.get("vit", "tiny", attention="block", window=2)   # 4 x 4 patches
    ids = np.arange(16, dtype=np.float32).reshape(1, 16, 1)
    order = vit._windows(tensorc.frontend.Tensor(ids)).numpy().ravel().astype(int)
    rows, cols = order // 4, order % 4
    for w in range(4):   # each block of 4 positions is one 2 x 2 square
        r, c = rows[4 * w:4 * w + 4], cols[4 * w:4 * w + 4]
        assert r.max() - r.min() == 1 and c.max() - c.min() == 1
    assert sorted(order) == list(range(16))


def test_one_window_over_the_whole_grid_is_dense_vit():
    dense = models.get("vit", "tiny")
    whole = models.get("vit", "tiny", attention="block", window=4)
    feeds = dense.example_inputs()
    np.testing.assert_allclose(outputs(tensorc.trace(whole, **feeds), feeds)["logits"],
                               outputs(tensorc.trace(dense, **feeds), feeds)["logits"],
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name,fields,message", [
    ("vit", {"attention": "local"}, "not local"),
    ("vit", {"attention": "block", "window": 3}, "multiple of window=3"),
    ("gpt", {"attention": "sparse"}, "one of dense, local, block, performer"),
    ("gpt", {"global_tokens": -1}, "must be >= 0"),
])
def test_bad_zoo_options(name, fields, message):
    with pytest.raises(TensorcError, match=message):
        models.get(name, "tiny", **fields)


@pytest.mark.parametrize("backend", ["numpy", "llvm"])
def test_sliding_window_generation_equals_whole_sequence_forwards(backend):
    """A GPT with a window of 3 keys: cached greedy decoding (the cache's mask cut to
    the window) picks what whole forwards of the sequence pick."""
    gpt = models.get("gpt", "tiny", attention="local", window=3, global_tokens=1)
    prompts = [[5, 1, 4, 1, 5, 9], [2, 7]]
    cached = Generator(gpt, backend).generate(prompts, 8, warmup=False)
    forward = tensorc.compile(tensorc.trace(gpt, tensorc.TensorSpec(("batch", "seq"), "i64")),
                              "numpy")
    for prompt, new in zip(prompts, cached.new_tokens, strict=True):
        seq = list(prompt)
        for tok in new:
            assert tok == int(forward(np.array([seq]))[0, -1].argmax())
            seq.append(tok)
    with pytest.raises(TensorcError, match="no key/value cache step"):
        Generator(models.get("gpt", "tiny", attention="performer"), backend).generate(
            [[1, 2]], 2, warmup=False)


@pytest.mark.parametrize("spec", ["sparsify-attention:window=8",
                                  "linearize-attention:features=32:always=1"])
def test_compare_reports_the_error_each_rewrite_adds(spec, capsys):
    """`compare --per-pass` shows the float pipeline exact and the rewrite's error on its
    own row (they are in passes.LOSSY)."""
    import json

    from tensorc.cli import main
    assert main(["compare", "gpt", "--seq", "32", "--passes", "O2," + spec, "--per-pass",
                 "--backends", "llvm", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {r["passes"]: r["rel_err"] for r in report["results"]}
    assert rows["O2"] < 1e-5 < rows["O2," + spec]
    last = report["per_pass"][-1]
    assert last["pass"] == spec.split(":")[0] and last["rel_err"] > 1e-4
    assert all(p["rel_err"] < 1e-5 for p in report["per_pass"][:-1])
