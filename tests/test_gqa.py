"""Grouped-query attention inside the `attention` op: k/v with hk heads, hk dividing the
h query heads (query head i reads kv head i // (h / hk)). Every backend against a plain
numpy computation that repeats k and v, which none of them does."""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_llvm_attention import naive  # the float64 definition, one home

import tensorc
from tensorc.backends import get_backend
from tensorc.errors import ShapeError
from tensorc.ir import Graph, TensorType
from tensorc.ops import get_op
from tensorc.passes import run_pipeline

H = 8
GROUPS = [1, 2, 4, 8]   # kv heads


def repeated(q, k, v, mask=None, scale=1.0, causal=False, mask_value=-math.inf):
    """The float64 definition with k and v repeated per group."""
    g = q.shape[1] // k.shape[1]
    return naive(q, np.repeat(k, g, axis=1), np.repeat(v, g, axis=1), mask, scale, causal,
                 mask_value)


def rel_err(got, want):
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def case(seed, hk, b=2, t=11, s=37, d=16, dv=16, mask=None):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, H, t, d), dtype=np.float32)
    k = rng.standard_normal((b, hk, s, d), dtype=np.float32)
    v = rng.standard_normal((b, hk, s, dv), dtype=np.float32)
    m = None
    if mask == "bool":      # per query head, so a wrong head mapping shows
        m = rng.random((b, H, t, s)) < 0.7
        m[..., 0] = True
    elif mask == "add":
        m = rng.standard_normal((1, H, t, s)).astype(np.float32)
    elif mask == "padding":
        m = (np.arange(s)[None, None, None, :] < rng.integers(1, s + 1, (b, 1, 1, 1)))
    return q, k, v, m


CASES = [(hk, causal, mask) for hk in GROUPS for causal in (False, True)
         for mask in (None, "bool", "add", "padding")]


def _ids(c):
    return f"hk{c[0]}-{'causal' if c[1] else 'full'}-{c[2] or 'nomask'}"


@pytest.mark.parametrize("c", CASES, ids=_ids)
def test_reference(c):
    hk, causal, mask = c
    q, k, v, m = case(1, hk, mask=mask)
    got = get_op("attention").reference(q, k, v, m, scale=0.25, causal=causal)
    assert got.shape == (2, H, 11, 16) and got.dtype == np.float32
    assert rel_err(got, repeated(q, k, v, m, 0.25, causal)) < 1e-5


@pytest.mark.parametrize("c", CASES, ids=_ids)
def test_llvm_kernel(c):
    from tensorc.backends.llvm.attention import attention
    hk, causal, mask = c
    q, k, v, m = case(2, hk, t=19, s=45, d=20, dv=24, mask=mask)
    want = repeated(q, k, v, m, 0.3, causal)
    for threads in (1, 2):
        got = attention(q, k, v, m, scale=0.3, causal=causal, threads=threads)
        assert rel_err(got, want) < 1e-4


def test_llvm_kernel_bound_and_threaded():
    """The runtime's path: `bind` with threads over heads, and over rows (one head)."""
    from tensorc.backends.llvm.attention import bind
    for b, t in ((2, 64), (1, 200)):
        q, k, v, m = case(3, 2, b=b, t=t, s=t, d=64, dv=64)
        want = repeated(q, k, v, None, 0.125, True)
        out = np.zeros(want.shape, np.float32)
        bind(q, k, v, None, 0.125, True, threads=2, out=out)()
        assert rel_err(out, want) < 1e-4


def test_llvm_kernel_rejects_heads_that_do_not_divide():
    from tensorc.backends.llvm.attention import attention
    q, k, v, _ = case(0, 2)
    with pytest.raises(ShapeError):
        attention(q, k[:, :1].repeat(3, axis=1), v[:, :1].repeat(3, axis=1))


def _graph(hk, mask, causal):
    g = Graph("gqa")
    q = g.add_input("q", TensorType(("batch", H, "t", 16)))
    k = g.add_input("k", TensorType(("batch", hk, "s", 16)))
    v = g.add_input("v", TensorType(("batch", hk, "s", 16)))
    ins = [q, k, v]
    if mask is not None:
        dims = tuple(1 if n == 1 else sym for n, sym in
                     zip(mask.shape, ("batch", H, "t", "s"), strict=True))
        ins.append(g.add_input("mask", TensorType(dims, "bool")))
    g.outputs = [g.add("attention", *ins, scale=0.25, causal=causal)]
    return g.verify()


@pytest.mark.parametrize("hk", GROUPS)
@pytest.mark.parametrize("causal", [False, True])
def test_compiled_graph_on_numpy_and_llvm(hk, causal):
    q, k, v, m = case(4, hk, mask="bool")
    g = _graph(hk, m, causal)
    want = repeated(q, k, v, m, 0.25, causal)
    for backend in ("numpy", "llvm"):
        exe = tensorc.compile(g, backend, "O2")
        assert rel_err(exe(q=q, k=k, v=v, mask=m), want) < 1e-4, backend
        if backend == "llvm":
            env = {"batch": 2, "t": 11, "s": 37}
            assert exe.stats(env)["fallbacks"] == []


@pytest.mark.parametrize("hk", [2, 4])
def test_decompose_repeats_kv_and_fuses_back(hk):
    """decompose (what ONNX export writes) repeats k/v the Hugging Face way; fusion
    recognises that and gives back one attention op on the un-repeated k and v."""
    q, k, v, m = case(5, hk, mask="padding")
    g = _graph(hk, m, True)
    node = g.nodes[0]
    body = Graph("body")
    params = [body.add_input(x.name, x.type) for x in node.inputs]
    body.outputs = list(get_op("attention").decompose(body, params, **node.attrs))
    body.verify()
    assert body.op_counts()["expand"] == 2
    feeds = dict(q=q, k=k, v=v, mask=m)
    want = repeated(q, k, v, m, 0.25, True)
    assert rel_err(get_backend("numpy").compile(body)(**feeds), want) < 1e-5
    fused = run_pipeline(body, "O2", verify=True)
    (att,) = [n for n in fused.nodes if n.op == "attention"]
    assert att.inputs[1].type.shape[1] == hk and att.attrs["causal"]
    assert "expand" not in fused.op_counts()
    assert rel_err(get_backend("numpy").compile(fused)(**feeds), want) < 1e-5


def test_inference_rejects_heads_that_do_not_divide():
    g = Graph("bad")
    q = g.add_input("q", TensorType((1, 8, 4, 16)))
    k = g.add_input("k", TensorType((1, 3, 4, 16)))
    with pytest.raises(ShapeError, match="divide"):
        g.add("attention", q, k, k)


def test_onnx_export_runs_in_ort():
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed")
    from tensorc.frontend import onnx as tx
    q, k, v, m = case(6, 2, mask="bool")
    g = _graph(2, m, True)
    proto = tx.to_model(g)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = dict(q=q, k=k, v=v, mask=m)
    (got,) = sess.run(None, feeds)
    assert rel_err(got, repeated(q, k, v, m, 0.25, True)) < 1e-5
    back = run_pipeline(tx.from_model(proto), "O2", verify=True)
    assert back.op_counts().get("attention") == 1 and "expand" not in back.op_counts()


@pytest.fixture(scope="module")
def emulated():
    from tensorc.backends.cupy import kernels as K
    from tensorc.backends.cupy.emulate import EmulatedModule, host_compiler
    if host_compiler() is None:
        pytest.skip("g++ not installed: the CUDA emulator needs a C++20 host compiler")
    kernel = K.flash_attention_kernel(16, 16)
    return K, EmulatedModule(kernel.source, {kernel.name: kernel.params})


@pytest.mark.parametrize("c", [(hk, causal, mask) for hk in GROUPS for causal, mask in
                               ((False, None), (True, "bool"), (False, "add"),
                                (True, "padding"))], ids=_ids)
def test_cupy_kernel_on_the_emulator(emulated, c):
    K, module = emulated
    hk, causal, mask = c
    q, k, v, m = case(7, hk, b=2, t=9, s=35, mask=mask)
    o = np.full(q.shape, np.nan, np.float32)
    launch = K.attention_launch(q, k, v, o, m, scale=0.25, causal=causal)
    module.launch(launch.kernel.name, launch.grid, launch.block, launch.args)
    assert rel_err(o, repeated(q, k, v, m, 0.25, causal)) < 1e-5


@pytest.mark.parametrize("hk", GROUPS)
def test_cupy_backend_on_a_gpu(hk):
    from tensorc.backends.cupy import unavailable_reason
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"GPU tests: {reason}")
    q, k, v, m = case(8, hk, b=2, t=70, s=70, d=16, dv=16, mask="padding")
    g = _graph(hk, m, True)
    got = get_backend("cupy").compile(g)(q=q, k=k, v=v, mask=m)
    assert rel_err(got, repeated(q, k, v, m, 0.25, True)) < 1e-4


# --- fusion of the repeat idioms in hand-built graphs ---------------------------------------

def _repeat_graph(k_style: str, v_style: str = "repeat_kv", b=2, hk=2, t=6, d=8):
    """softmax(q @ k^T / sqrt(d)) @ v with k, v written [b, hk, t, d] and repeated to
    H heads: "repeat_kv" (unsqueeze, expand, reshape), "reshape5" (the unit axis by a
    reshape), "sandwich" (k^T reshaped to [b*H, t, d] from the expand, transposed as
    3-d, reshaped back: the dynamo export of HF sdpa), "tile" (heads repeated as a
    whole: head i reads kv head i % hk, which the op cannot express), or "none" (v
    already has H heads)."""
    g = Graph("rep")
    q = g.add_input("q", TensorType((b, H, t, d)))
    k = g.add_input("k", TensorType((b, hk, t, d)))
    v = g.add_input("v", TensorType((b, hk if v_style != "none" else H, t, d)))
    n = H // hk

    def five(x):
        if k_style == "tile":
            return g.add("expand", g.add("unsqueeze", x, axes=(1,)), shape=(b, n, hk, t, d))
        unit = g.add("reshape", x, shape=(b, hk, 1, t, d)) if k_style == "reshape5" \
            else g.add("unsqueeze", x, axes=(2,))
        return g.add("expand", unit, shape=(b, hk, n, t, d))

    def repeat(x):
        return g.add("reshape", five(x), shape=(b, H, t, d))
    if k_style == "sandwich":
        flat = g.add("reshape", five(k), shape=(b * H, t, d))
        kt = g.add("reshape", g.add("transpose", flat, perm=(0, 2, 1)), shape=(b, H, d, t))
    else:
        kt = g.add("transpose", repeat(k), perm=(0, 1, 3, 2))
    scores = g.add("mul", g.add("matmul", q, kt),
                   g.add_constant("scale", np.array(1 / math.sqrt(d), np.float32)))
    vv = v if v_style == "none" else repeat(v)
    g.outputs = [g.add("matmul", g.add("softmax", scores, axis=-1), vv)]
    return g.verify()


@pytest.mark.parametrize("k_style,v_style,unrepeated", [
    ("repeat_kv", "repeat_kv", True), ("reshape5", "repeat_kv", True),
    ("sandwich", "repeat_kv", True), ("tile", "repeat_kv", False),
    ("repeat_kv", "none", False)])
def test_repeat_idioms_fuse(k_style, v_style, unrepeated):
    g = _repeat_graph(k_style, v_style)
    rng = np.random.default_rng(9)
    feeds = {x.name: rng.standard_normal(x.type.shape).astype(np.float32) for x in g.inputs}
    want = get_backend("numpy").compile(g)(**feeds)
    out = run_pipeline(g, "O2", verify=True)
    (att,) = [n for n in out.nodes if n.op == "attention"]
    assert (att.inputs[1].type.shape[1] == 2) == unrepeated
    assert ("expand" not in out.op_counts()) == unrepeated
    for backend in ("numpy", "llvm"):
        assert rel_err(get_backend(backend).compile(out)(**feeds), want) < 1e-5, backend
