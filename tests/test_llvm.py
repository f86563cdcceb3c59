"""The LLVM backend against the numpy reference: every generated kernel kind on awkward
shapes (1, 3, 17, 129: not multiples of the vector width), strided and broadcast
inputs, GEMM epilogues, the model zoo through O0 and O2, the on-disk cache (hit,
miss, corrupt entry), threads, symbolic shapes and `emit_source`."""

from __future__ import annotations

import math

import llvmlite.binding as llvm
import numpy as np
import pytest

import tensorc
import tensorc.models
import tensorc.passes
from tensorc.backends import get_backend
from tensorc.backends.llvm import jit, runtime
from tensorc.errors import TensorcError
from tensorc.ir import Graph, TensorType

NP = {"f32": np.float32, "f64": np.float64, "i32": np.int32, "i64": np.int64,
      "bool": np.bool_}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORC_CACHE_DIR", str(tmp_path / "cache"))


def rand(rng, shape, dtype="f32"):
    if dtype == "bool":
        return rng.random(shape) < 0.5
    if dtype in ("i32", "i64"):
        return rng.integers(-5, 6, shape).astype(NP[dtype])
    return rng.uniform(-3, 3, shape).astype(NP[dtype])


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    if not want.size:
        return 0.0
    same_inf = np.isinf(want) & (got == want)
    with np.errstate(invalid="ignore"):
        diff = np.where(same_inf, 0.0, np.abs(got - want))
    return float(diff.max() / max(np.abs(np.where(same_inf, 0, want)).max(), 1e-30))


def check(g: Graph, feeds: dict, tol=1e-4, **compile_kw):
    """Compile g with llvm, compare every output with numpy; return the executable."""
    g.verify()
    want = tensorc.compile(g, "numpy").run(feeds)
    exe = get_backend("llvm").compile(g, **compile_kw)
    got = exe.run(feeds)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        if want[name].dtype.kind in "biu":
            np.testing.assert_array_equal(got[name], want[name])
        else:
            assert rel_err(got[name], want[name]) <= tol, (name, rel_err(got[name], want[name]))
    return exe


def graph(*types, op=None, **attrs):
    """A one-node graph over inputs of `types` ((shape, dtype) pairs)."""
    g = Graph("t")
    ins = [g.add_input(f"x{i}", TensorType(s, d)) for i, (s, d) in enumerate(types)]
    g.outputs = g.add_node(op, ins, attrs)
    return g


def feeds_for(g, rng):
    return {v.name: rand(rng, v.type.shape, v.type.dtype) for v in g.inputs}


SHAPES = [(1,), (3, 17), (2, 129), (17, 3, 5)]
UNARY = ["neg", "abs", "exp", "log", "sqrt", "rsqrt", "reciprocal", "tanh", "erf", "sigmoid",
         "relu", "sin", "cos", "floor"]


@pytest.mark.parametrize("op", UNARY + ["gelu"])
@pytest.mark.parametrize("shape", SHAPES)
def test_unary(op, shape):
    rng = np.random.default_rng(0)
    g = graph((shape, "f32"), op=op)
    x = rand(rng, shape)
    if op in ("log", "sqrt", "rsqrt"):
        x = np.abs(x) + 0.1
    check(g, {"x0": x})


def test_unary_extremes():
    """exp/tanh/erf/sigmoid at +-inf, 0, tiny and huge values; NaN propagates."""
    x = np.array([-np.inf, np.inf, 0.0, 1e-7, -1e-7, 1e-3, 0.39, 0.41, 0.49, 0.51, 20, -20, 88.5,
                  -88.5, -103, np.nan], np.float32)
    for op in ("exp", "tanh", "erf", "sigmoid"):
        g = graph(((16,), "f32"), op=op)
        got = get_backend("llvm").compile(g)(x)
        with np.errstate(over="ignore"):  # the reference's exp(-x) overflows at -inf
            want = tensorc.compile(g, "numpy")(x)
        assert np.isnan(got[-1]) and np.isnan(want[-1]), op
        assert rel_err(got[:-1], want[:-1]) <= 1e-6, op
        normal = (np.abs(want[:-1]) > 1e-37) & np.isfinite(want[:-1])
        assert np.all(np.abs(got[:-1][normal] / want[:-1][normal] - 1) <= 1e-5), op


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_forms(approximate):
    g = graph(((3, 129), "f32"), op="gelu", approximate=approximate)
    check(g, {"x0": rand(np.random.default_rng(1), (3, 129))})


BINARY = ["add", "sub", "mul", "div", "maximum", "minimum", "pow", "equal", "less",
          "less_equal", "greater", "greater_equal"]


@pytest.mark.parametrize("op", BINARY)
@pytest.mark.parametrize("shapes", [((17, 1), (1, 129)), ((3, 17, 5), (5,)), ((1,), (3, 17)),
                                    ((2, 3), ())])
def test_binary_broadcast(op, shapes):
    rng = np.random.default_rng(2)
    g = graph((shapes[0], "f32"), (shapes[1], "f32"), op=op)
    feeds = feeds_for(g, rng)
    if op == "pow":
        feeds["x0"] = np.abs(feeds["x0"]) + 0.5
    check(g, feeds)


@pytest.mark.parametrize("op", ["add", "sub", "mul", "maximum", "less"])
def test_integer_ops(op):
    g = graph(((3, 17), "i64"), ((17,), "i64"), op=op)
    check(g, feeds_for(g, np.random.default_rng(3)))


def test_int_div_truncates():
    g = graph(((3, 17), "i32"), ((3, 17), "i32"), op="div")
    feeds = feeds_for(g, np.random.default_rng(4))
    feeds["x1"] = np.where(feeds["x1"] == 0, 3, feeds["x1"]).astype(np.int32)
    check(g, feeds)


def test_logic_where_cast_clip():
    rng = np.random.default_rng(5)
    g = Graph("t")
    a = g.add_input("a", TensorType((3, 17), "f32"))
    c = g.add_input("c", TensorType((17,), "bool"))
    n = g.add_input("n", TensorType((3, 1), "i32"))
    keep = g.add("logical_and", c, g.add("logical_not", g.add("less", a, g.add(
        "cast", n, dtype="f32"))))
    w = g.add("where", keep, a, g.add("clip", a, min=-1.0, max=0.5))
    g.outputs = [w, keep, g.add("cast", w, dtype="i64"), g.add("cast", keep, dtype="f32"),
                 g.add("logical_or", keep, c)]
    check(g, feeds_for(g, rng))


def test_strided_inputs_transpose_slice_expand():
    """Elementwise over transposed, sliced (step 2), expanded and reshaped views."""
    rng = np.random.default_rng(6)
    g = Graph("t")
    x = g.add_input("x", TensorType((17, 3, 129), "f32"))
    y = g.add_input("y", TensorType((129, 3), "f32"))
    xt = g.add("transpose", x, perm=(1, 0, 2))                       # [3,17,129]
    ys = g.add("slice", g.add("transpose", y, perm=(1, 0)), starts=(0,), ends=(129,),
               axes=(1,), steps=(2,))                                  # [3,65]
    xs = g.add("slice", xt, starts=(1,), ends=(130,), axes=(2,), steps=(2,))   # [3,17,64]
    e = g.add("expand", g.add("unsqueeze", g.add("slice", ys, starts=(0,), ends=(64,),
                                                  axes=(1,)), axes=(1,)), shape=(3, 17, 64))
    s = g.add("mul", g.add("exp", xs), e)
    r = g.add("reshape", g.add("transpose", s, perm=(0, 2, 1)), shape=(3, 64 * 17))
    g.outputs = [g.add("squeeze", g.add("unsqueeze", r, axes=(0,)), axes=(0,))]
    check(g, feeds_for(g, rng))


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
@pytest.mark.parametrize("shape,axis", [((1,), 0), ((3, 17), -1), ((2, 3, 129), 1),
                                        ((17, 5, 3), 0)])
def test_softmax(op, shape, axis):
    g = graph((shape, "f32"), op=op, axis=axis)
    check(g, feeds_for(g, np.random.default_rng(7)))


def test_softmax_of_masked_scaled_transposed_scores():
    """softmax(where(causal, x^T * c, -inf)): the prologue is fused into the kernel."""
    rng = np.random.default_rng(8)
    g = Graph("t")
    x = g.add_input("x", TensorType((2, 17, 17), "f32"))
    c = g.add_constant("c", np.array(0.125, np.float32))
    ninf = g.add_constant("ninf", np.array(-np.inf, np.float32))
    mask = g.add("trilu", g.add("full", shape=(17, 17), value=True, dtype="bool"))
    s = g.add("where", mask, g.add("mul", g.add("transpose", x, perm=(0, 2, 1)), c), ninf)
    g.outputs = [g.add("softmax", s)]
    exe = check(g, feeds_for(g, rng))
    assert exe.stats()["kernel_launches"] == 1  # the softmax kernel, prologue included


@pytest.mark.parametrize("shape,axis,params", [((3, 17), -1, 2), ((2, 3, 129), -1, 1),
                                               ((3, 5, 17), -2, 2), ((1, 1), -1, 0)])
def test_layer_norm(shape, axis, params):
    rng = np.random.default_rng(9)
    norm = shape[axis % len(shape):]
    g = Graph("t")
    x = g.add_input("x", TensorType(shape, "f32"))
    ps = [g.add_input(f"p{i}", TensorType(norm, "f32")) for i in range(params)]
    g.outputs = [g.add("layer_norm", x, *ps, axis=axis, eps=1e-5)]
    check(g, feeds_for(g, rng))


@pytest.mark.parametrize("op", ["reduce_sum", "reduce_mean", "reduce_max", "reduce_min"])
@pytest.mark.parametrize("axes,keepdims", [((1,), False), ((0, 2), True), (None, False),
                                           ((-1,), True)])
def test_reductions(op, axes, keepdims):
    g = graph(((3, 17, 129), "f32"), op=op, axes=axes, keepdims=keepdims)
    check(g, feeds_for(g, np.random.default_rng(10)))


@pytest.mark.parametrize("op", ["reduce_sum", "reduce_mean", "reduce_max", "reduce_min"])
@pytest.mark.parametrize("shape,axes,keepdims", [((5, 7, 48), (0, 1), False),
                                                 ((3, 2, 16), (0,), True),
                                                 ((9, 1, 4, 16), (0, 1), False),
                                                 ((2, 3, 160), (0, 1), True)])
def test_reductions_over_leading_axes(op, shape, axes, keepdims):
    """Kept trailing dims of a multiple of 16 elements: the column-block kernel (a bias
    gradient's sum over batch and sequence), on a computed and on a transposed input."""
    rng = np.random.default_rng(10)
    g = Graph("t")
    x = g.add_input("x", TensorType(shape, "f32"))
    y = g.add_input("y", TensorType(shape[::-1], "f32"))
    t = g.add("transpose", y, perm=tuple(range(len(shape)))[::-1])
    two = g.add_constant("two", np.array(2.0, np.float32))
    g.outputs = [g.add(op, g.add("mul", g.add("exp", x), two), axes=axes, keepdims=keepdims),
                 g.add(op, t, axes=axes, keepdims=keepdims)]
    exe = check(g, feeds_for(g, rng))
    kinds = [s.kernel.kind for s in exe.program({}).steps if hasattr(s, "kernel")]
    assert kinds.count(op) == 2


@pytest.mark.parametrize("shape,perm", [((96, 64), (1, 0)), ((2, 3, 32, 48), (0, 1, 3, 2)),
                                        ((64, 5, 32), (2, 1, 0)), ((64, 4, 64), (1, 2, 0))])
def test_transposing_writes(shape, perm):
    """Writes that read their last loop with a large stride run in tiles (a weight
    gradient's x^T copied into rows for the GEMM); computed, and into an output."""
    rng = np.random.default_rng(14)
    g = Graph("t")
    x = g.add_input("x", TensorType(shape, "f32"))
    t = g.add("transpose", x, perm=perm)
    g.outputs = [g.add("exp", t), g.add("neg", t)]
    check(g, feeds_for(g, rng))


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_argmax(axis):
    g = graph(((3, 17, 129), "f32"), op="argmax", axis=axis)
    check(g, feeds_for(g, np.random.default_rng(11)))


@pytest.mark.parametrize("axis", [0, 1])
def test_gather(axis):
    rng = np.random.default_rng(12)
    g = graph(((17, 129), "f32"), ((2, 3), "i64"), op="gather", axis=axis)
    n = (17, 129)[axis]
    check(g, {"x0": rand(rng, (17, 129)), "x1": rng.integers(-n, n, (2, 3))})


def test_gather_out_of_range_is_a_clear_error():
    g = graph(((17, 3), "f32"), ((2,), "i64"), op="gather")
    exe = get_backend("llvm").compile(g)
    with pytest.raises(TensorcError, match="out of range"):
        exe(np.ones((17, 3), np.float32), np.array([1, 17]))


def test_concat_split_range():
    rng = np.random.default_rng(13)
    g = Graph("t")
    a = g.add_input("a", TensorType((3, 17), "f32"))
    b = g.add_input("b", TensorType((3, 5), "f32"))
    cat = g.add("concat", g.add("exp", a), b, g.add("transpose", g.add_input(
        "c", TensorType((1, 3), "f32")), perm=(1, 0)), axis=1)           # [3, 23]
    p, q = g.add_node("split", [cat], {"axis": 1, "sizes": (20, 3)})
    r = g.add("cast", g.add("range", start=(2,), limit=(25,), delta=1), dtype="f32")
    g.outputs = [g.add("mul", p, g.add("slice", r, starts=(0,), ends=(20,))), q]
    check(g, feeds_for(g, rng))


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (3, 17, 129), (129, 33, 17)])
def test_matmul_with_epilogue(m, k, n):
    """matmul + bias -> gelu -> + residual: fuse-epilogues makes it one region, which
    runs as one GEMM with an epilogue (without the pass, plain kernels do the rest)."""
    rng = np.random.default_rng(14)
    g = Graph("t")
    x = g.add_input("x", TensorType((2, m, k), "f32"))
    w = g.add_constant("w", rand(rng, (k, n)))
    b = g.add_constant("b", rand(rng, (n,)))
    res = g.add_input("res", TensorType((2, m, n), "f32"))
    y = g.add("add", res, g.add("gelu", g.add("add", g.add("matmul", x, w), b)))
    g.outputs = [y]
    assert not _matmul_steps(check(g, feeds_for(g, rng)))[0].epilogue
    exe = check(_epilogues(g), feeds_for(g, rng))
    call = _matmul_steps(exe)[0]
    # a [1] "bias" is a scalar broadcast, not a GEMM bias: then the chain stays a kernel
    assert set(call.epilogue) == ({"bias", "activation", "residual"} if n > 1 else set())


def test_batched_matmul_transposed_and_f64():
    rng = np.random.default_rng(15)
    g = Graph("t")
    q = g.add_input("q", TensorType((2, 3, 17, 8), "f32"))
    k = g.add_input("k", TensorType((2, 3, 17, 8), "f32"))
    d = g.add_input("d", TensorType((5, 7), "f64"))
    g.outputs = [g.add("matmul", q, g.add("transpose", k, perm=(0, 1, 3, 2))),
                 g.add("matmul", d, g.add("transpose", d, perm=(1, 0)))]
    check(g, feeds_for(g, rng))


def test_fallback_is_listed():
    """An op without a lowering (grouped conv2d) runs its reference, listed in stats."""
    rng = np.random.default_rng(16)
    g = graph(((1, 4, 9, 9), "f32"), ((4, 2, 3, 3), "f32"), op="conv2d", group=2)
    exe = check(g, feeds_for(g, rng))
    assert exe.stats()["fallbacks"] == [{"node": g.nodes[0].where,
                                         "reason": "conv2d with groups or non-f32 data"}]


@pytest.mark.parametrize("attrs", [{}, {"pads": (1, 2, 0, 1), "strides": (2, 1)},
                                   {"dilations": (2, 2), "pads": (2, 2, 2, 2)},
                                   {"strides": (3, 3)}])
@pytest.mark.parametrize("bias", [False, True])
def test_conv2d_im2col_gemm(attrs, bias):
    rng = np.random.default_rng(19)
    types = [((2, 3, 17, 13), "f32"), ((5, 3, 3, 3), "f32")] + [((5,), "f32")] * bias
    g = graph(*types, op="conv2d", **attrs)
    exe = check(g, feeds_for(g, rng))
    assert not exe.stats()["fallbacks"]


def test_attention_op_uses_flash_kernel():
    rng = np.random.default_rng(17)
    g = graph(((1, 2, 17, 8), "f32"), ((1, 2, 17, 8), "f32"), ((1, 2, 17, 8), "f32"),
              op="attention", scale=0.3, causal=True)
    exe = check(g, feeds_for(g, rng))
    assert [s.op for s in exe.program().steps if hasattr(s, "op")] == ["attention"]


def test_fused_region_is_one_kernel():
    """A fused elementwise region becomes a single generated kernel."""
    rng = np.random.default_rng(18)
    body = Graph("region")
    a = body.add_input("a", TensorType((3, 129), "f32"))
    b = body.add_input("b", TensorType((129,), "f32"))
    body.outputs = [body.add("tanh", body.add("mul", body.add("add", a, b), a))]
    g = graph(((3, 129), "f32"), ((129,), "f32"), op="fused", body=body)
    exe = check(g, feeds_for(g, rng))
    assert exe.stats()["kernel_launches"] == 1


# --- models -----------------------------------------------------------------------------

PIPELINES = ["O0"] + (["O2"] if "O2" in tensorc.passes.PIPELINES else [])


@pytest.mark.parametrize("pipeline", PIPELINES)
@pytest.mark.parametrize("name", sorted(tensorc.models.MODELS))
def test_models(name, pipeline):
    model = tensorc.models.get(name, "tiny")
    feeds = model.example_inputs(batch=2)
    g = tensorc.trace(model, **feeds)
    want = tensorc.compile(g, "numpy").run(feeds)
    got = tensorc.compile(g, "llvm", passes=pipeline).run(feeds)
    for key in want:
        assert rel_err(got[key], want[key]) <= 1e-4, key


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_symbolic_shapes_specialise_per_call(pipeline):
    model = tensorc.models.get("gpt", "tiny")
    g = tensorc.trace(model, input_ids=tensorc.TensorSpec(("batch", "seq"), "i64"))
    exe = tensorc.compile(g, "llvm", passes=pipeline)
    ref = tensorc.compile(g, "numpy")
    for batch, seq in [(1, 5), (2, 17), (1, 5)]:
        ids = model.example_inputs(batch, seq)["input_ids"]
        assert rel_err(exe(ids), ref(ids)) <= 1e-4
    assert len(exe._runners) == 2


# --- cache, threads, source ------------------------------------------------------------

ELEMENTWISE_IR = """
define void @twice(float* %x, i64 %n) {
entry:
  br label %loop
loop:
  %i = phi i64 [0, %entry], [%i1, %loop]
  %p = getelementptr float, float* %x, i64 %i
  %v = load float, float* %p
  %w = fmul float %v, 2.0
  store float %w, float* %p
  %i1 = add i64 %i, 1
  %c = icmp slt i64 %i1, %n
  br i1 %c, label %loop, label %done
done:
  ret void
}
"""


def _run_twice(addrs):
    import ctypes
    f = jit.cfunc(addrs["twice"], None, [ctypes.c_void_p, ctypes.c_int64])
    x = np.arange(1, 6, dtype=np.float32)
    f(x.ctypes.data, 5)
    np.testing.assert_array_equal(x, 2 * np.arange(1, 6, dtype=np.float32))


def test_cache_miss_hit_and_corrupt_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORC_CACHE_DIR", str(tmp_path / "c"))
    before = dict(jit.stats)
    jit.clear_memo()
    _run_twice(jit.compile_ir(ELEMENTWISE_IR, ["twice"]))         # miss: compiles
    assert jit.stats["compiled"] == before["compiled"] + 1
    (entry,) = (tmp_path / "c").rglob("*.o")
    jit.clear_memo()
    _run_twice(jit.compile_ir(ELEMENTWISE_IR, ["twice"]))         # hit: loads from disk
    assert jit.stats["disk_hits"] == before["disk_hits"] + 1
    assert jit.stats["compiled"] == before["compiled"] + 1
    for damage in (lambda b: b[:-7] + b"garbage", lambda b: b[:20]):
        entry.write_bytes(damage(entry.read_bytes()))
        jit.clear_memo()
        _run_twice(jit.compile_ir(ELEMENTWISE_IR, ["twice"]))     # corrupt: rebuilt
    assert jit.stats["corrupt"] == before["corrupt"] + 2
    assert jit.stats["compiled"] == before["compiled"] + 3
    jit.clear_memo()
    _run_twice(jit.compile_ir(ELEMENTWISE_IR, ["twice"]))         # the rebuilt entry is good
    assert jit.stats["disk_hits"] == before["disk_hits"] + 2


def test_invalid_ir_is_a_clear_error():
    with pytest.raises(TensorcError, match="invalid"):
        jit.compile_ir("define void @f() { ret i32 0 }", ["f"])


def test_threads_one_and_two_agree(monkeypatch):
    monkeypatch.setattr(runtime, "MIN_WORK_PER_THREAD", 1)   # split even tiny kernels
    model = tensorc.models.get("bert", "tiny")
    feeds = model.example_inputs(batch=2)
    g = tensorc.trace(model, **feeds)
    outs = []
    for n in (1, 2):
        monkeypatch.setenv("TENSORC_NUM_THREADS", str(n))
        outs.append(tensorc.compile(g, "llvm").run(feeds))
    for key in outs[0]:
        np.testing.assert_allclose(outs[0][key], outs[1][key], rtol=1e-6, atol=1e-6)


def test_bad_thread_count(monkeypatch):
    monkeypatch.setenv("TENSORC_NUM_THREADS", "zero")
    with pytest.raises(TensorcError, match="TENSORC_NUM_THREADS"):
        runtime.num_threads()


def test_emit_source_writes_parseable_ll(tmp_path):
    model = tensorc.models.get("gpt", "tiny")
    g = tensorc.trace(model, **model.example_inputs(batch=1))
    paths = get_backend("llvm").emit_source(g, str(tmp_path))
    assert paths and all(p.endswith(".ll") for p in paths)
    for p in paths:
        with open(p) as f:
            llvm.parse_assembly(f.read()).verify()


def test_memory_plan_reuses_buffers():
    from tensorc.backends.lowering import lower
    from tensorc.backends.plan import peak_memory_bytes
    model = tensorc.models.get("gpt", "tiny")
    g = tensorc.trace(model, **model.example_inputs(batch=1))
    p = lower(g)
    total = sum(b.nbytes for b in p.buffers)
    assert p.live_peak_bytes <= p.arena_bytes < total
    assert p.arena_bytes <= peak_memory_bytes(g) + 64 * len(p.buffers)
    assert math.isfinite(p.arena_bytes)


def test_edge_graphs_scalar_empty_identity_constant_output():
    rng = np.random.default_rng(20)
    g = Graph("t")
    s = g.add_input("s", TensorType((), "f32"))
    e = g.add_input("e", TensorType((0, 3), "f32"))
    x = g.add_input("x", TensorType((3,), "f32"))
    k = g.add_constant("k", rand(rng, (2, 3)))
    g.outputs = [g.add("exp", s), g.add("softmax", e), x, k, g.add("reduce_sum", x),
                 g.add("add", x, s)]
    check(g, feeds_for(g, rng))


@pytest.mark.parametrize("disable", [(), ("merge-projections",)])
def test_sibling_weight_matmuls_share_one_gemm(disable):
    """x @ Wq + bq, x @ Wk + bk, x @ Wv + bv: O2's merge-projections makes one GEMM over
    [Wq Wk Wv] with [bq bk bv]; disabled, each stays its own."""
    rng = np.random.default_rng(21)
    g = Graph("t")
    x = g.add_input("x", TensorType((2, 17, 33), "f32"))
    outs = []
    for i, n in enumerate((33, 5, 129)):
        w = g.add_constant(f"w{i}", rand(rng, (33, n)))
        b = g.add_constant(f"b{i}", rand(rng, (n,)))
        outs.append(g.add("tanh", g.add("add", g.add("matmul", x, w), b)))
    g.outputs = outs
    exe = check(tensorc.passes.run_pipeline(g, "O2", disable=disable), feeds_for(g, rng))
    calls = _matmul_steps(exe)
    if disable:
        assert [c.outputs[0].shape[-1] for c in calls] == [33, 5, 129]
    else:
        (call,) = calls
        assert call.outputs[0].shape == (2, 17, 33 + 5 + 129)
        assert set(call.epilogue) == {"bias"}


def test_merged_matmul_member_reading_a_later_value():
    """x @ W1 -> exp -> r, and x @ W2 + r: merged into one GEMM placed before its first
    member, the second member's residual read after it."""
    rng = np.random.default_rng(22)
    g = Graph("t")
    x = g.add_input("x", TensorType((3, 17), "f32"))
    first = g.add("matmul", x, g.add_constant("w1", rand(rng, (17, 5))))
    r = g.add("exp", first)
    g.outputs = [g.add("add", g.add("matmul", x, g.add_constant("w2", rand(rng, (17, 5)))), r)]
    exe = check(tensorc.passes.run_pipeline(g, "O2"), feeds_for(g, rng))
    assert len(_matmul_steps(exe)) == 1


@pytest.mark.parametrize("shape,perm,new", [
    ((2, 1, 3), (0, 1, 2), (6,)), ((3, 1, 1, 5), (0, 1, 2, 3), (1, 15, 1)),
    ((4, 6), (1, 0), (3, 8)), ((1, 16, 4, 8), (0, 2, 1, 3), (1, 4, 128)),
    ((2, 3, 4), (0, 2, 1), (2, 12)), ((2, 3, 4), (2, 0, 1), (4, 6, 1)),
    ((0, 3), (1, 0), (0,)), ((5,), (0,), (1, 5, 1))])
def test_reshape_of_views(shape, perm, new):
    """Reshape after a transpose: a stride rewrite where linear, else a copy first."""
    g = Graph("t")
    x = g.add_input("x", TensorType(shape, "f32"))
    g.outputs = [g.add("neg", g.add("reshape", g.add("transpose", x, perm=perm), shape=new))]
    check(g, feeds_for(g, np.random.default_rng(23)))


@pytest.mark.parametrize("seed", range(12))
def test_random_view_and_elementwise_chains(seed):
    """Random chains of transposes, slices, reshapes, broadcasts and arithmetic: the
    lazy stride rewriting must agree with numpy wherever it lands."""
    rng = np.random.default_rng(100 + seed)
    g = Graph("t")
    shape = tuple(int(d) for d in rng.choice([1, 2, 3, 5, 17], size=rng.integers(2, 5)))
    x = g.add_input("x", TensorType(shape, "f32"))
    y = g.add_input("y", TensorType(shape[-1:], "f32"))
    v, outs = x, []
    for _ in range(6):
        rank = v.type.rank
        choice = rng.integers(0, 6)
        if choice == 0 and rank > 1:
            v = g.add("transpose", v, perm=tuple(int(p) for p in rng.permutation(rank)))
        elif choice == 1:
            a = int(rng.integers(0, rank))
            n = v.type.shape[a]
            v = g.add("slice", v, starts=(int(rng.integers(0, n)),), ends=(n,), axes=(a,),
                      steps=(int(rng.integers(1, 3)),))
        elif choice == 2:
            v = g.add("reshape", v, shape=(-1,) + tuple(v.type.shape[-1:]))
        elif choice == 3:
            v = g.add("unsqueeze", v, axes=(int(rng.integers(0, rank + 1)),))
        elif choice == 4 and v.type.shape[-1] == shape[-1]:
            v = g.add("mul", v, y)
        else:
            v = g.add("tanh", g.add("add", v, v))
        outs.append(v)
    g.outputs = [outs[-1], g.add("reduce_sum", outs[len(outs) // 2], axes=(-1,))]
    check(g, feeds_for(g, rng))


# --- regressions from real exports and the differential fuzzer ---------------------------

def _matmul_steps(exe):
    return [s for s in exe.program().steps if getattr(s, "op", None) == "matmul"]


def _epilogues(g):
    return tensorc.passes.run_pipeline(g, "fuse-epilogues")


def test_residual_after_reshaped_gemm_is_framed_like_the_gemm():
    """GPT-2's Conv1D: x[2,7,32] -> [14,32] @ w -> [2,7,32] + x. The residual folds into
    the GEMM, read through the GEMM's own [14,32] frame."""
    rng = np.random.default_rng(30)
    g = Graph("t")
    x = g.add_input("x", TensorType((2, 7, 32), "f32"))
    w = g.add_constant("w", rand(rng, (32, 32)))
    b = g.add_constant("b", rand(rng, (32,)))
    m = g.add("add", g.add("matmul", g.add("reshape", x, shape=(14, 32)), w), b)
    g.outputs = [g.add("add", g.add("reshape", m, shape=(2, 7, 32)), x)]
    exe = check(_epilogues(g), feeds_for(g, rng))
    (call,) = _matmul_steps(exe)
    assert set(call.epilogue) == {"bias", "residual"}
    assert call.epilogue["residual"].shape == call.outputs[0].shape == (14, 32)


def test_bias_over_a_split_last_dim_is_not_a_gemm_bias():
    """[14,32] viewed as [14,4,8] + b[8]: b repeats every 8 columns, not a [32] bias."""
    rng = np.random.default_rng(31)
    g = Graph("t")
    x = g.add_input("x", TensorType((14, 16), "f32"))
    w = g.add_constant("w", rand(rng, (16, 32)))
    b = g.add_constant("b", rand(rng, (8,)))
    g.outputs = [g.add("add", g.add("reshape", g.add("matmul", x, w), shape=(14, 4, 8)), b)]
    exe = check(_epilogues(g), feeds_for(g, rng))
    assert not _matmul_steps(exe)[0].epilogue


@pytest.mark.parametrize("view", ["reshape", "cast"])
def test_gemm_output_read_elsewhere_keeps_its_epilogue_empty(view):
    """m = x @ w is a graph output and, through a view, gets + r: folding + r into the
    GEMM would change m too."""
    rng = np.random.default_rng(32)
    g = Graph("t")
    x = g.add_input("x", TensorType((6, 16), "f32"))
    m = g.add("matmul", x, g.add_constant("w", rand(rng, (16, 8))))
    v = g.add("reshape", m, shape=(2, 3, 8)) if view == "reshape" else \
        g.add("cast", m, dtype="f32")
    r = g.add_input("r", v.type)
    g.outputs = [g.add("add", v, r), m]
    exe = check(_epilogues(g), feeds_for(g, rng))
    assert not _matmul_steps(exe)[0].epilogue


def test_add_that_broadcasts_the_gemm_output_bigger_is_not_folded():
    """(x @ w)[5,8] + b[3,1,8] is [3,5,8]: not the GEMM's shape, so not its bias."""
    rng = np.random.default_rng(33)
    g = Graph("t")
    x = g.add_input("x", TensorType((5, 16), "f32"))
    b = g.add("expand", g.add_input("b", TensorType((8,), "f32")), shape=(3, 1, 8))
    g.outputs = [g.add("add", g.add("matmul", x, g.add_constant("w", rand(rng, (16, 8)))), b)]
    check(_epilogues(g), feeds_for(g, rng))


def test_gather_with_scalar_constant_index():
    """ViT's class token: x[:, 0] as gather(x, 0-d constant 0, axis=1) drops the axis."""
    rng = np.random.default_rng(34)
    g = Graph("t")
    x = g.add_input("x", TensorType(("batch", 17, 32), "f32"))
    i = g.add_constant("i", np.array(0, np.int64))
    j = g.add_constant("j", np.array(-1, np.int64))
    g.outputs = [g.add("gather", x, i, axis=1), g.add("add", x, g.add("cast", j, dtype="f32"))]
    exe = check(g, {"x": rand(rng, (2, 17, 32))})
    assert exe.run({"x": rand(rng, (2, 17, 32))})[g.outputs[0].name].shape == (2, 32)


def test_nan_propagates_through_max_min_and_reductions_like_numpy():
    """np.maximum/minimum, np.max/min, np.clip and np.argmax all let a NaN win."""
    rng = np.random.default_rng(35)
    g = Graph("t")
    x = g.add_input("x", TensorType((4, 33), "f32"))
    y = g.add_input("y", TensorType((4, 33), "f32"))
    g.outputs = [g.add("maximum", x, y), g.add("minimum", x, y), g.add("clip", x, min=-1.0,
                                                                       max=1.0),
                 g.add("relu", x), *[g.add(op, x, axes=(a,)) for op in ("reduce_max",
                                                                         "reduce_min")
                                     for a in (0, 1)],
                 g.add("argmax", x, axis=1), g.add("argmax", x, axis=0)]
    a, b = rand(rng, (4, 33)), rand(rng, (4, 33))
    a[1, 2] = a[2, 0] = a[2, 30] = b[3, 4] = np.nan
    a[0] = -np.inf
    want = tensorc.compile(g, "numpy")(a, b)
    got = get_backend("llvm").compile(g)(a, b)
    for i, (o, w) in enumerate(zip(got, want, strict=True)):
        np.testing.assert_array_equal(o, w, err_msg=g.outputs[i].name)


def test_gemm_gelu_tanh_epilogue_at_minus_inf():
    """numpy gives -inf * 0 = NaN there (the kernel IR gelu does too)."""
    g = Graph("t")
    x = g.add_input("x", TensorType((2, 1), "f32"))
    w = g.add_constant("w", np.ones((1, 16), np.float32))
    g.outputs = [g.add("gelu", g.add("matmul", x, w), approximate="tanh")]
    a = np.array([[-np.inf], [1.0]], np.float32)
    with np.errstate(invalid="ignore"):
        want = tensorc.compile(g, "numpy")(a)
    exe = get_backend("llvm").compile(_epilogues(g))
    np.testing.assert_array_equal(exe(a), want)
    assert _matmul_steps(exe)[0].epilogue["activation"] == "gelu_tanh"


@pytest.mark.parametrize("shapes", [((5,), (5, 3)), ((2, 5), (5,)), ((5,), (5,)),
                                    ((2, 4, 5), (5,))])
def test_matmul_with_a_vector_operand(shapes):
    """np.matmul's vector rules: the GEMM sees [1, k] / [k, 1], the result drops that dim;
    a following + bias or + residual still folds into the GEMM."""
    rng = np.random.default_rng(36)
    g = Graph("t")
    a = g.add_input("a", TensorType(shapes[0], "f32"))
    b = g.add_input("b", TensorType(shapes[1], "f32"))
    m = g.add("matmul", a, b)
    g.outputs = [g.add("add", m, g.add_constant("c", rand(rng, m.type.shape)))]
    exe = check(_epilogues(g), feeds_for(g, rng))
    assert _matmul_steps(exe)[0].epilogue


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_keeps_relative_precision_in_the_negative_tail(approximate):
    """1 + erf(x/sqrt2) cancels in float32 below x = -3; the kernel uses erfc / sigmoid.
    Compared with float64 math.erfc (the reference's own 1 + erf loses digits there too)."""
    x = np.linspace(-9, 3, 1201).astype(np.float32)
    g = graph((x.shape, "f32"), op="gelu", approximate=approximate)
    got = get_backend("llvm").compile(g)(x).astype(np.float64)
    x64 = x.astype(np.float64)
    if approximate == "tanh":
        u = math.sqrt(2 / math.pi) * (x64 + 0.044715 * x64 ** 3)
        want = x64 / (1 + np.exp(-2 * u))
    else:
        want = 0.5 * x64 * np.array([math.erfc(-v / math.sqrt(2)) for v in x64])
    normal = np.abs(want) > 1e-30
    assert np.abs(got[normal] / want[normal] - 1).max() <= 2e-5


def test_float64_sigmoid_and_integer_division_by_zero():
    """sigmoid on f64 once built invalid IR (an f32 exp on a double); x / 0 on integers is
    0 on both backends (the reference used to cast inf to int: INT_MIN)."""
    rng = np.random.default_rng(37)
    g = Graph("t")
    x = g.add_input("x", TensorType((3, 17), "f64"))
    n = g.add_input("n", TensorType((3, 17), "i32"))
    d = g.add_input("d", TensorType((17,), "i32"))
    g.outputs = [g.add("sigmoid", x), g.add("div", n, d)]
    feeds = feeds_for(g, rng)
    feeds["d"][::3] = 0
    check(g, feeds)


def test_o2_keeps_a_folded_scalar_constant_scalar():
    """fold-constants once stored a 0-d result as [1], so O2 changed the output's shape."""
    g = Graph("t")
    x = g.add_input("x", TensorType((), "f32"))
    c = g.add("add", g.add("abs", g.add_constant("c", np.array(-0.5, np.float32))),
              g.add_constant("one", np.array(1.0, np.float32)))
    g.outputs = [g.add("div", x, c)]
    exe = check(tensorc.passes.run_pipeline(g, "O2"), {"x": np.array(3.0, np.float32)})
    assert exe(np.array(3.0, np.float32)).shape == ()
