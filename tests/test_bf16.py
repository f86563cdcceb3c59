"""bf16 weights (issue 13): the dtype through text, artifacts and ONNX; the
`cast-weights:bf16` pass; the llvm GEMM that packs a bf16 weight as bf16 and widens it
in its kernels."""

from __future__ import annotations

import zipfile

import ml_dtypes
import numpy as np
import pytest

import tensorc
import tensorc.models
from tensorc.artifact import load_artifact, save_artifact
from tensorc.backends import get_backend
from tensorc.backends.llvm import gemm as G
from tensorc.backends.llvm.gemv import GEMV_MAX_M
from tensorc.errors import TensorcError
from tensorc.ir import DTYPES, Graph, TensorType
from tensorc.passes import parse_pipeline, run_pipeline
from tensorc.text import parse_graph

BF16 = ml_dtypes.bfloat16


def _weights_graph(k=40, n=24, seed=0) -> Graph:
    """x @ widen(w) + b with a bf16 weight too big to print inline."""
    rng = np.random.default_rng(seed)
    g = Graph("bf")
    x = g.add_input("x", TensorType(("batch", k)))
    w = g.add_constant("w", rng.standard_normal((k, n)).astype(BF16))
    b = g.add_constant("b", rng.standard_normal(n).astype(np.float32))
    small = g.add_constant("s", np.array([1.5, -0.0, np.inf, 3.0e38], BF16))
    y = g.add("add", g.add("matmul", x, g.add("cast", w, dtype="f32")), b)
    g.outputs = [y, g.add("cast", small, dtype="f32")]
    return g.verify()


def _bits(a) -> np.ndarray:
    return np.asarray(a).view(np.uint16)


# -- the dtype -----------------------------------------------------------------------

def test_bf16_is_ml_dtypes_bfloat16():
    assert DTYPES["bf16"] == np.dtype(BF16)
    assert str(TensorType((2, "seq"), "bf16")) == "bf16[2,seq]"
    assert TensorType.of(np.zeros(3, BF16)).dtype == "bf16"


def test_text_round_trip():
    g = _weights_graph()
    text = str(g)
    assert "%w: bf16[40,24] = const" in text and "cast(%w, dtype=f32)" in text
    back = parse_graph(text)
    assert str(back) == text
    s = back.constants["s"].data   # inline: printed as exact decimals, read back exactly
    assert s.dtype == BF16 and _bits(s).tolist() == _bits(g.constants["s"].data).tolist()


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast")
def test_cast_rounds_to_nearest_even_as_ml_dtypes_on_every_backend():
    g = Graph("c")
    x = g.add_input("x", TensorType((1 << 16,)))
    down = g.add("cast", x, dtype="bf16")
    g.outputs = [down, g.add("cast", down, dtype="f32")]
    rng = np.random.default_rng(1)
    xs = rng.integers(0, 1 << 32, 1 << 16, dtype=np.uint64).astype(np.uint32).view(np.float32)
    xs[:6] = [np.inf, -np.inf, 0.0, -0.0, 3.3961e38, 1.00390625]   # 1 + 2^-8: a tie
    with np.errstate(invalid="ignore"):
        want = xs.astype(BF16)
    ok = ~np.isnan(xs)
    for backend in ("numpy", "llvm"):
        got, wide = get_backend(backend).compile(g)(x=xs)
        assert got.dtype == BF16
        assert np.array_equal(_bits(got)[ok], _bits(want)[ok]), backend
        assert np.isnan(wide[~ok]).all() and np.isnan(got[~ok].astype(np.float32)).all()
        assert np.array_equal(wide[ok], want[ok].astype(np.float32)), backend


def test_artifact_stores_bits_and_restores_the_dtype(tmp_path):
    g = _weights_graph()
    path = str(tmp_path / "a.tensorc")
    x = np.ones((2, 40), np.float32)
    save_artifact(path, g, {"x": x}, {"name": "bf"})
    with zipfile.ZipFile(path) as zf:   # a plain uint16 array, no pickled dtype
        with zf.open("const/w.npy") as f:
            assert np.lib.format.read_array(f, allow_pickle=False).dtype == np.uint16
    back, inputs, _ = load_artifact(path)
    w = back.constants["w"]
    assert w.type == TensorType((40, 24), "bf16") and w.data.dtype == BF16
    assert np.array_equal(_bits(w.data), _bits(g.constants["w"].data))
    assert np.array_equal(get_backend("numpy").compile(back)(**inputs)[0],
                          get_backend("numpy").compile(g)(x=x)[0])


def test_onnx_round_trip_is_bfloat16():
    from onnx import TensorProto

    from tensorc.frontend.onnx.exporter import to_model
    from tensorc.frontend.onnx.importer import from_model
    g = _weights_graph()
    model = to_model(g)
    w = next(t for t in model.graph.initializer if t.name == "w")
    assert w.data_type == TensorProto.BFLOAT16
    back = from_model(model)
    (c,) = [v for v in back.constants.values() if v.type.dtype == "bf16" and v.data.size > 4]
    assert np.array_equal(_bits(c.data), _bits(g.constants["w"].data))
    x = np.random.default_rng(2).standard_normal((3, 40)).astype(np.float32)
    want = get_backend("numpy").compile(g)(x=x)
    for a, b in zip(get_backend("numpy").compile(back)(x=x), want, strict=True):
        assert np.array_equal(a, b)
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": x})
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)


def test_matmul_reference_widens_bf16():
    from tensorc.ops import get_op
    a = np.arange(6, dtype=np.float32).reshape(2, 3).astype(BF16)
    (out,) = get_op("matmul").evaluate([a, a.T], {})
    assert out.dtype == BF16
    assert np.array_equal(out, (a.astype(np.float32) @ a.T.astype(np.float32)).astype(BF16))


# -- the pass --------------------------------------------------------------------------

def test_pipeline_text_and_errors():
    assert parse_pipeline("O2,cast-weights:bf16")[-1] == ("cast-weights", {"dtype": "bf16"})
    assert parse_pipeline("cast-weights:dtype=bf16") == [("cast-weights", {"dtype": "bf16"})]
    g = _weights_graph()
    with pytest.raises(TensorcError, match="unknown dtype 'f8'"):
        run_pipeline(g, "cast-weights:f8")
    with pytest.raises(TensorcError, match="missing a required argument: 'dtype'"):
        run_pipeline(g, "cast-weights")
    with pytest.raises(TensorcError, match="dce takes no arguments"):
        run_pipeline(g, "dce:bf16")


def _gpt(batch=2, seq=16):
    model = tensorc.models.get("gpt", "tiny")
    feeds = model.example_inputs(batch=batch, seq=seq)
    return tensorc.trace(model, **feeds), feeds


def test_pass_narrows_matmul_weights_only():
    g, _ = _gpt()
    o2 = run_pipeline(g, "O2")
    bf = run_pipeline(g, "O2,cast-weights:bf16", verify=True)
    narrow = {n for n, v in bf.constants.items() if v.type.dtype == "bf16"}
    # per layer the merged q/k/v, the output projection, the MLP's two: all in fused
    # regions or plain matmuls after O2
    assert len(narrow) == 4 * 2 and all(n.endswith(".bf16") for n in narrow)
    assert {n.split(".", 2)[2] for n in narrow} == {
        "attn.q.weight.merged.bf16", "attn.o.weight.bf16", "ff.up.weight.bf16",
        "ff.down.weight.bf16"}
    # biases, layer norms, the tied embedding (gathered, and the LM head through a
    # transpose) and the positions (sliced and folded) stay float32
    wide = {n for n, v in bf.constants.items() if v.type.dtype == "f32" and v.type.rank == 2}
    assert "wte.weight" in wide and not any(".attn." in n or ".ff." in n for n in wide)
    assert sum(v.data.nbytes for v in bf.constants.values()) < \
        sum(v.data.nbytes for v in o2.constants.values())
    # fold-constants does not undo it
    again = run_pipeline(bf, "O1")
    assert {n for n, v in again.constants.items() if v.type.dtype == "bf16"} == narrow
    # before fusion the same weights are narrowed, and O2 keeps them so
    early = run_pipeline(g, "O1,fuse-patterns,fuse-attention,merge-projections,"
                            "cast-weights:bf16,fuse-epilogues,fuse-regions", verify=True)
    assert len([v for v in early.constants.values() if v.type.dtype == "bf16"]) == 8


@pytest.mark.parametrize("batch,seq", [(2, 16), (1, 1), (1, 20)])
def test_gpt_bf16_llvm_matches_numpy(batch, seq):
    g, feeds = _gpt(batch, seq)
    bf = run_pipeline(g, "O2,cast-weights:bf16")
    ref = get_backend("numpy").compile(bf)(**feeds)[0]
    exe = get_backend("llvm").compile(bf)
    got = exe(**feeds)[0]
    scale = np.abs(ref).max()
    assert np.abs(got - ref).max() <= 1e-4 * scale
    f32 = get_backend("numpy").compile(g)(**feeds)[0]
    err = np.abs(ref - f32).max() / np.abs(f32).max()
    print(f"gpt tiny b{batch} s{seq}: bf16 weights vs f32, max |d logits| / max |logits| "
          f"= {err:.2e}")
    assert 0 < err < 2e-2
    # no f32 copy of a bf16 weight: every matmul reading one takes it as stored
    program = exe.program({"batch": batch, "seq": seq})
    calls = [s for s in program.steps if getattr(s, "op", None) == "matmul"]
    narrow = [c for c in calls if c.inputs[1].buf.dtype == "bf16"]
    assert len(narrow) == 8 and all(c.inputs[1].buf.kind == "const" for c in narrow)
    assert program.stats()["fallbacks"] == []


# -- the GEMM -------------------------------------------------------------------------

def test_packed_bf16_weight_is_half_the_bytes():
    w = np.random.default_rng(3).standard_normal((300, 100)).astype(np.float32)
    f32, bf = G.PackedB(w), G.PackedB(w.astype(BF16))
    assert bf.dtype == "bf16" and f32.dtype == "f32"
    assert bf.data.nbytes * 2 == f32.data.nbytes
    assert bf.ptr % G.ALIGN == 0 and bf.shape == f32.shape == (300, 100)


SHAPES = [(1, 64, 40), (3, 100, 70), (GEMV_MAX_M, 256, 96), (9, 300, 33), (40, 513, 130),
          (128, 512, 512), (200, 700, 300)]


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("threads", [1, 2])
def test_bf16_gemm_matches_widened_reference(m, k, n, threads):
    """Every schedule (GEMV, plain, shared packed A) with every epilogue: f32 math on
    the widened weights, within 1e-5 relative (the summation order differs)."""
    rng = np.random.default_rng(m * k + n)
    a = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(BF16)
    bias = rng.standard_normal(n).astype(np.float32)
    res = rng.standard_normal((m, n)).astype(np.float32)
    packed = G.PackedB(w)
    exact = a.astype(np.float64) @ w.astype(np.float64)
    for act in ("none", "relu", "gelu_tanh"):
        out = np.full((m, n), np.nan, np.float32)
        G.bind(a, packed, out, bias=bias, activation=act, residual=res, threads=threads)()
        want = exact + bias
        want = {"none": want, "relu": np.maximum(want, 0),
                "gelu_tanh": 0.5 * want * (1 + np.tanh(np.sqrt(2 / np.pi)
                                                       * (want + 0.044715 * want ** 3)))}[act]
        want = want + res
        assert np.abs(out - want).max() <= 1e-5 * np.abs(want).max(), act
    plain = G.gemm(a, packed, threads=threads)
    assert np.abs(plain - exact).max() <= 1e-5 * np.abs(exact).max()
    unpacked = G.gemm(a, w, threads=threads)   # a bf16 array: packed by gemm
    assert np.abs(unpacked - exact).max() <= 1e-5 * np.abs(exact).max()
    wt = G.gemm(a, np.ascontiguousarray(w.T), trans_b=True, threads=threads)
    assert np.abs(wt - exact).max() <= 1e-5 * np.abs(exact).max()
    # A given transposed (x^T), packed from its columns
    at = np.ascontiguousarray(a.T).T
    out = np.empty((m, n), np.float32)
    G.bind(at, packed, out, threads=threads)()
    assert np.abs(out - exact).max() <= 1e-5 * np.abs(exact).max()


def test_cuda_kernels_convert_bf16_like_ml_dtypes():
    """The CUDA rendering of bf16 casts (cupy keeps the widening cast as a kernel), run
    on the CPU emulator."""
    from tensorc.backends import kernel_ir as KI
    from tensorc.backends.cupy.cuda_codegen import launch_config, render_kernel
    from tensorc.backends.cupy.emulate import EmulatedModule, host_compiler
    if host_compiler() is None:
        pytest.skip("no C++ compiler for the emulator")
    n = 4096
    x, mid = KI.Buffer("x", "f32"), KI.Buffer("mid", "bf16", readonly=False)
    back = KI.Buffer("back", "f32", readonly=False)
    i = KI.Var("i")
    down = KI.Kernel([x, mid], [KI.Loop(i, n, [KI.Store(mid, i, KI.Cast(KI.Load(x, i), "bf16"))],
                                        parallel=True)], kind="down")
    up = KI.Kernel([mid, back], [KI.Loop(i, n, [KI.Store(back, i, KI.Cast(KI.Load(mid, i),
                                                                             "f32"))],
                                         parallel=True)], kind="up")
    rendered = [render_kernel(k) for k in (down, up)]
    mod = EmulatedModule("".join(r.source for r in rendered), {r.name: r.params for r in rendered})
    rng = np.random.default_rng(4)
    xs = rng.integers(0, 1 << 32, n, dtype=np.uint64).astype(np.uint32).view(np.float32)
    xs[:3] = [1.00390625, -np.inf, 0.0]
    got, wide = np.zeros(n, np.uint16), np.zeros(n, np.float32)
    for r, args in zip(rendered, ([xs, got], [got, wide]), strict=True):
        blocks, threads = launch_config(r.extent, threads=64)
        mod.launch(r.name, (blocks,), (threads,), [*args, 0, r.extent])
    with np.errstate(invalid="ignore"):
        want = xs.astype(BF16)
    ok = ~np.isnan(xs)
    assert np.array_equal(got[ok], _bits(want)[ok])
    assert np.isnan(wide[~ok]).all() and np.array_equal(wide[ok], want[ok].astype(np.float32))
