"""Quantization: the ops' semantics, the `quantize` pass in its three modes, calibration,
and int8 results on every backend against the numpy reference."""

from __future__ import annotations

import numpy as np
import pytest

from tensorc.backends import get_backend
from tensorc.backends.llvm import LOWERING as LLVM_LOWERING
from tensorc.backends.lowering import lower
from tensorc.errors import TensorcError
from tensorc.ir import Graph, TensorType
from tensorc.loading import load_model
from tensorc.passes import run_pipeline
from tensorc.passes.autodiff import grad
from tensorc.passes.quantize import calibrate, entropy_threshold, heads


def run(g, backend, feeds) -> list:
    outs = get_backend(backend).compile(g)(**feeds)
    return list(outs) if isinstance(outs, tuple) else [outs]


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def one_op(op, arrays, **attrs):
    g = Graph("t")
    ins = [g.add_input(f"x{i}", TensorType.of(a)) for i, a in enumerate(arrays)]
    g.outputs = g.add_node(op, ins, attrs)
    return g, {f"x{i}": a for i, a in enumerate(arrays)}


def test_quantize_rounds_half_to_even_and_saturates_on_every_backend():
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 300.0, -300.0, 126.6], np.float32)
    one = np.float32(1)
    want = {"u8": [10, 12, 12, 10, 8, 255, 0, 137], "i8": [0, 2, 2, 0, -2, 127, -128, 127]}
    for dtype, zp in (("u8", np.uint8(10)), ("i8", np.int8(0))):
        g, feeds = one_op("quantize", [x, one, zp])
        for backend in ("numpy", "llvm"):
            (q,) = run(g, backend, feeds)
            assert q.dtype == np.dtype(dtype.replace("i8", "int8").replace("u8", "uint8"))
            np.testing.assert_array_equal(q, want[dtype], err_msg=f"{dtype} on {backend}")


def test_dynamic_quantization_of_rows_matches_numpy_bit_for_bit_on_llvm():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3, 5, 67)) * rng.uniform(0.1, 4, (3, 5, 1))).astype(np.float32)
    w = rng.integers(-128, 128, (67, 33)).astype(np.int8)
    g = Graph("dq")
    xi = g.add_input("x", TensorType.of(x))
    s, z = g.add_node("quant_params", [xi], {"axes": (-1,)})
    q = g.add("quantize", xi, s, z)
    acc = g.add("matmul_integer", q, g.add_constant("w", w), z)
    g.outputs = [q, s, z, acc, g.add("fake_quantize", xi, s, z)]
    ref = run(g, "numpy", {"x": x})
    got = run(g, "llvm", {"x": x})
    for r, o in zip(ref, got, strict=True):
        np.testing.assert_array_equal(o, r)
    assert "i32[3,5,33] = matmul_integer" in str(g)   # the accumulation is visible


def test_fake_quantize_gradient_passes_straight_through_inside_the_range():
    x = np.array([[-3.0, -0.4, 0.2, 0.9, 2.6]], np.float32)
    g = Graph("fq")
    xi = g.add_input("x", TensorType.of(x))
    scale, zp = g.add_constant("s", np.float32(0.02)), g.add_constant("z", np.int8(0))
    y = g.add("fake_quantize", xi, scale, zp)
    wts = g.add_constant("w", np.arange(1, 6, dtype=np.float32).reshape(1, 5))
    loss = g.add("reduce_sum", g.add("mul", y, wts))
    g.rename(loss, "loss")
    g.outputs = [loss]
    (_, dx) = run(grad(g, "loss", ["x"]), "numpy", {"x": x})
    # |x| / 0.02 above 127.5 saturates: no gradient there; the others see w unchanged
    np.testing.assert_array_equal(dx, [[0, 2, 3, 4, 0]])


@pytest.fixture(scope="module")
def gpt_tiny():
    loaded = load_model("gpt", preset="tiny", batch=2, seq=16)
    fp32 = run(run_pipeline(loaded.graph, "O2"), "numpy", loaded.inputs)[0]
    return loaded, fp32


@pytest.mark.parametrize("spec", ["quantize", "quantize:act_scale=tensor",
                                  "quantize:weights=per_tensor", "quantize:activations=s8",
                                  "quantize:head=1", "quantize:mode=qdq"])
def test_quantized_gpt_is_close_to_fp32_and_llvm_matches_numpy(gpt_tiny, spec):
    loaded, fp32 = gpt_tiny
    g = run_pipeline(loaded.graph, "O2," + spec)
    ref = run(g, "numpy", loaded.inputs)[0]
    assert 0 < rel(ref, fp32) < 0.05, f"{spec}: error vs fp32 {rel(ref, fp32):.3g}"
    exe = get_backend("llvm").compile(g)
    got = exe(**loaded.inputs)
    assert rel(got, ref) < 1e-4
    assert not exe.stats()["fallbacks"]
    # every integer matmul is one int8 GEMM call with its dequantize as the epilogue
    calls = [s for s in lower(g, {}, **LLVM_LOWERING).steps
             if getattr(s, "op", "") == "matmul_integer"]
    assert len(calls) == str(g).count("matmul_integer(")
    assert all("col_scale" in c.epilogue for c in calls)
    # again on other tokens: nothing the first call computed (a scale, a zero point) is kept
    ids = np.random.default_rng(1).integers(0, 97, loaded.inputs["input_ids"].shape)
    assert rel(exe(input_ids=ids), run(g, "numpy", {"input_ids": ids})[0]) < 1e-4


def test_qdq_simulates_the_integer_graph(gpt_tiny):
    loaded, _ = gpt_tiny
    int8 = run(run_pipeline(loaded.graph, "O2,quantize"), "numpy", loaded.inputs)[0]
    qdq = run(run_pipeline(loaded.graph, "O2,quantize:mode=qdq"), "numpy", loaded.inputs)[0]
    assert rel(qdq, int8) < 1e-4   # only float rounding differs: the quantization is shared


def _const_bytes(g, dtype):
    return sum(v.data.nbytes for v in g.constants.values() if v.type.dtype == dtype)


def test_weights_are_int8_and_the_head_stays_float_unless_asked(gpt_tiny):
    loaded, _ = gpt_tiny
    base = run_pipeline(loaded.graph, "O1")
    (head,) = heads(base)
    assert head.outputs[0].name == "logits"
    q = run_pipeline(loaded.graph, "O1,quantize")
    assert str(q).count("matmul_integer(") == 6 * 2        # q, k, v, o, up, down per layer
    assert "matmul(" in str(q)                               # the head
    f32_matmul_weights = sum(n.inputs[1].data.nbytes for n in base.nodes
                             if n.op == "matmul" and n.inputs[1].is_constant)
    assert _const_bytes(q, "i8") * 4 == f32_matmul_weights
    assert str(run_pipeline(loaded.graph, "O1,quantize:head=1")).count("matmul_integer(") == 13
    skipped = run_pipeline(loaded.graph, "O1,quantize:skip=ff.up+attn.o")
    assert str(skipped).count("matmul_integer(") == 8


@pytest.mark.parametrize("calib", ["minmax", "percentile", "entropy"])
def test_static_quantization_with_each_calibrator(gpt_tiny, calib):
    loaded, fp32 = gpt_tiny
    g = run_pipeline(loaded.graph, f"O2,quantize:mode=static:calib={calib}",
                     options={"quantize": {"data": [loaded.inputs]}})
    assert "quant_params" not in str(g)   # scales are constants
    ref = run(g, "numpy", loaded.inputs)[0]
    assert rel(ref, fp32) < 0.1
    assert rel(run(g, "llvm", loaded.inputs)[0], ref) < 1e-4


def test_calibrators_on_a_known_distribution():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 256)).astype(np.float32)
    x[0, 0] = 40.0   # one outlier
    g = Graph("c")
    xi = g.add_input("x", TensorType(("n", 256), "f32"))
    y = g.add("mul", xi, g.add_constant("two", np.float32(2)))
    g.outputs = [y]
    batches = [{"x": x[:32]}, {"x": x[32:]}]
    lo, hi = calibrate(g, [y], batches, "minmax")[y]
    assert (lo, hi) == (float(2 * x.min()), 80.0)
    plo, phi = calibrate(g, [y], batches, "percentile", percentile=99.0)[y]
    assert -6 < plo < -4 and 4 < phi < 6   # 2 * the normal's 1 % and 99 % points (2.33)
    elo, ehi = calibrate(g, [y], batches, "entropy")[y]
    assert 4 < ehi < 40 and elo < -4       # the outlier is clipped, the bulk kept
    assert entropy_threshold(np.zeros(10)) == 1.0


def test_bad_options_and_missing_calibration_data_are_one_line_errors(gpt_tiny, tmp_path):
    loaded, _ = gpt_tiny
    with pytest.raises(TensorcError, match="mode='fast' should be one of dynamic, static, qdq"):
        run_pipeline(loaded.graph, "quantize:mode=fast")
    with pytest.raises(TensorcError, match="needs calibration data"):
        run_pipeline(loaded.graph, "quantize:mode=static")
    with pytest.raises(TensorcError, match=r"lacks input\(s\) \['input_ids'\]"):
        run_pipeline(loaded.graph, "quantize:mode=static", options={"quantize": {"data": [{}]}})
    for bad, says in (("sensitive=x", "should be a count of matmuls"),
                      ("head=2", "head=2 should be one of"),
                      ("percentile=10", r"should be in \(50, 100\]")):
        with pytest.raises(TensorcError, match=says):
            run_pipeline(loaded.graph, "quantize:" + bad)
    wrong = {"input_ids": np.zeros((2, 3, 4), np.int64)}
    with pytest.raises(TensorcError, match="calibration data: input 'input_ids': expected"):
        run_pipeline(loaded.graph, "quantize:mode=static", options={"quantize": {"data": [wrong]}})
    with pytest.raises(TensorcError, match="cannot read calibration data"):
        run_pipeline(loaded.graph, f"quantize:mode=static:data={tmp_path / 'none.npz'}")
    path = tmp_path / "calib.npz"
    np.savez(path, **loaded.inputs)
    g = run_pipeline(loaded.graph, f"O1,quantize:mode=static:data={path}")
    assert "matmul_integer" in str(g)


def test_quantization_aware_training_step_fake_quantizes_and_learns():
    from tensorc.models import get
    from tensorc.training import TrainStep, example_batch, get_task
    model = get("gpt", "tiny", seed=0)
    batch = example_batch(model, "clm", 2, 16)
    step = TrainStep(model, get_task("clm"), batch, backend="llvm", qat=True)
    text = str(step.graph)
    # per layer the 6 weights (q, k, v, o, up, down) and the 4 distinct row inputs (q, k
    # and v read one); the head stays float
    assert text.count("fake_quantize(") == 2 * 10
    reference = TrainStep(model, get_task("clm"), batch, backend="numpy", qat=True)
    loss, grads = step(batch)
    ref_loss, ref_grads = reference(batch)
    assert abs(loss - ref_loss) < 1e-5 * abs(ref_loss)
    for name, g in ref_grads.items():   # (a key bias's gradient is zero: rounding noise)
        np.testing.assert_allclose(grads[name], g, rtol=1e-3, atol=1e-6, err_msg=name)
    params = step.params
    for _ in range(20):   # plain SGD on the fake-quantized loss goes down
        _, grads = step(batch)
        for name, g in grads.items():
            params[name] -= 0.5 * g
    assert step(batch)[0] < loss - 0.1


def test_head_and_tied_embedding_share_one_int8_table(gpt_tiny):
    loaded, fp32 = gpt_tiny
    g = run_pipeline(loaded.graph, "O1,quantize:head=1")
    sizes = g.weight_bytes()
    f32_before = run_pipeline(loaded.graph, "O1").weight_bytes()["f32"]
    # every matrix is int8 now, the tied embedding once; f32 keeps norms, biases, scales
    assert sizes["i8"] * 4 > 0.9 * f32_before and sizes["f32"] < sizes["i8"] / 2
    text = str(g)
    assert "gather(%wte.weight.q, %input_ids)" in text
    assert "transpose(%wte.weight.q, perm=[1,0])" in text and "%wte.weight:" not in text
    assert rel(run(g, "numpy", loaded.inputs)[0], fp32) < 0.05
    assert rel(run(g, "llvm", loaded.inputs)[0], run(g, "numpy", loaded.inputs)[0]) < 1e-4


def test_sensitive_keeps_the_matmuls_the_output_depends_on_most_in_float(gpt_tiny):
    loaded, fp32 = gpt_tiny
    calib = {"quantize": {"data": [loaded.inputs]}}
    all_int8 = run_pipeline(loaded.graph, "O2,quantize")
    mixed = run_pipeline(loaded.graph, "O2,quantize:sensitive=2", options=calib)
    assert str(mixed).count("matmul_integer(") == str(all_int8).count("matmul_integer(") - 2
    err_mixed = rel(run(mixed, "numpy", loaded.inputs)[0], fp32)
    assert err_mixed < rel(run(all_int8, "numpy", loaded.inputs)[0], fp32)
    with pytest.raises(TensorcError, match="sensitive=N needs calibration data"):
        run_pipeline(loaded.graph, "quantize:sensitive=1")
