"""The GEMM's path for a few rows (backends/llvm/gemv.py): decode-shaped products
against float64 references (rel. error <= 1e-4), through gemm(), bind() and a graph."""

import ctypes

import llvmlite.binding as llvm
import numpy as np
import pytest

import tensorc
from tensorc.backends.llvm import gemm as G
from tensorc.backends.llvm import gemv, jit
from tensorc.ops.elementwise import gelu

ACTS = {None: lambda x: x, "relu": lambda x: np.maximum(x, 0), "gelu": gelu,
        "gelu_tanh": lambda x: gelu(x, "tanh")}


def ref(a, b, bias=None, activation=None, residual=None):
    z = a.astype(np.float64) @ b.astype(np.float64)
    z = z + bias if bias is not None else z
    z = ACTS[activation](z)
    return z + residual if residual is not None else z


def assert_close(got, want, tol=1e-4):
    assert got.shape == want.shape and got.dtype == np.float32
    err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)
    assert err <= tol, f"relative error {err:.2e}"


@pytest.fixture
def rng():
    return np.random.default_rng(7)


@pytest.fixture
def used(monkeypatch):
    """Records the row counts the GEMV path ran with."""
    calls = []
    steps = G._gemv_steps

    def spy(a, *args):
        calls.append(a.shape[0])
        return steps(a, *args)
    monkeypatch.setattr(G, "_gemv_steps", spy)
    return calls


def operands(rng, m, k, n):
    a = rng.standard_normal((m, k), np.float32)
    b = rng.standard_normal((k, n), np.float32) * np.float32(k ** -0.5)
    return a, b, rng.standard_normal(n).astype(np.float32), \
        rng.standard_normal((m, n)).astype(np.float32)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "per-call"])
@pytest.mark.parametrize("threads", [1, 2])
def test_random_shapes_and_epilogues(rng, used, packed, threads):
    """M in 1..8, odd K and N (partial last panel, K odd with two accumulator sets),
    every activation, with and without bias and residual."""
    for trial in range(24):
        m = trial % 8 + 1
        k, n = (int(x) for x in rng.integers(1, 700, 2))
        if trial % 3 == 0:   # big enough to be split across threads
            k, n = 2 * (k | 1) + 257, 513
        a, b, bias, res = operands(rng, m, k, n)
        act = list(ACTS)[trial % 4]
        kw = dict(bias=bias if trial % 2 else None, residual=res if trial % 5 else None)
        got = G.gemm(a, G.PackedB(b) if packed else b, activation=act, threads=threads, **kw)
        assert_close(got, ref(a, b, activation=act, **kw))
    assert used and max(used) <= gemv.GEMV_MAX_M


@pytest.mark.parametrize("m", range(1, 9))
def test_threads_give_identical_results(rng, m):
    """Threads split the columns: each output sums in the same order on any thread."""
    a, b, bias, res = operands(rng, m, 1031, 777)
    p = G.PackedB(b)
    one = G.gemm(a, p, bias=bias, activation="gelu", residual=res, threads=1)
    two = G.gemm(a, p, bias=bias, activation="gelu", residual=res, threads=2)
    np.testing.assert_array_equal(one, two)


def test_trans_b_per_call(rng, used):
    """B given transposed per call is packed, then streamed by the same kernels."""
    a, b, bias, _ = operands(rng, 3, 300, 97)
    got = G.gemm(a, np.ascontiguousarray(b.T), trans_b=True, bias=bias, activation="relu")
    assert_close(got, ref(a, b, bias, "relu"))
    assert used == [3]


def test_strided_rows_and_broadcast_residual(rng, used):
    a, b, bias, res = operands(rng, 5, 260, 70)
    wide = np.zeros((5, 300), np.float32)
    wide[:, :260] = a
    out = np.full((5, 100), np.nan, np.float32)
    G.gemm(wide[:, :260], G.PackedB(b), out[:, 10:80], residual=res[0], bias=bias)
    assert_close(out[:, 10:80], ref(a, b, bias, None, res[0]))
    assert np.isnan(out[:, :10]).all() and np.isnan(out[:, 80:]).all()


@pytest.mark.parametrize("threads,n", [(2, 1536), (1, 1536), (2, 40)])
def test_bind_takes_the_gemv_path(rng, used, threads, n):
    """The runtime's bound call of a packed weight with a few rows streams it: on the
    pool, or (one thread, or a B too small to share) as a direct call."""
    for m in (1, 4, 8):
        a, b, bias, res = operands(rng, m, 512, n)
        out = np.empty((m, n), np.float32)
        run = G.bind(a, G.PackedB(b), out, bias=bias, activation="gelu_tanh", residual=res,
                     threads=threads)
        run()
        assert_close(out, ref(a, b, bias, "gelu_tanh", res))
        a[...] = rng.standard_normal(a.shape, np.float32)   # bound to the arrays
        run()
        assert_close(out, ref(a, b, bias, "gelu_tanh", res))
    assert used == [1, 4, 8]


def test_more_rows_keep_the_packed_gemm(rng, used):
    a, b, _, _ = operands(rng, 9, 300, 200)
    assert_close(G.gemm(a, G.PackedB(b)), ref(a, b))
    out = np.empty((9, 2048), np.float32)
    a, b, _, _ = operands(rng, 9, 512, 2048)
    G.bind(a, G.PackedB(b), out, threads=2)()
    assert_close(out, ref(a, b))
    assert used == []


def test_nan_stays_in_its_row(rng):
    a, b, _, _ = operands(rng, 4, 100, 70)
    a[2, 5] = np.nan
    got = G.gemm(a, G.PackedB(b), activation="relu")
    assert np.isnan(got[2]).all() and not np.isnan(np.delete(got, 2, axis=0)).any()


def test_graph_decode_matmuls(rng, used):
    """x @ W (+ bias, gelu) and the tied-embedding logits x @ E.T through the llvm
    backend, with batch-many rows."""
    from tensorc.frontend import functional as F
    from tensorc.frontend.tensor import Tensor
    w = rng.standard_normal((64, 96), np.float32) * np.float32(0.125)
    bias = rng.standard_normal(96).astype(np.float32)
    emb = rng.standard_normal((200, 96), np.float32) * np.float32(0.1)

    def step(x):
        return F.gelu(x @ w + bias) @ Tensor(emb).T

    x = rng.standard_normal((3, 64), np.float32)
    exe = tensorc.compile(tensorc.trace(step, x=tensorc.TensorSpec(("batch", 64), "f32")),
                          "llvm", passes="O2")
    for m in (1, 3, 8):
        x = rng.standard_normal((m, 64), np.float32)
        want = gelu(x.astype(np.float64) @ w + bias) @ emb.T.astype(np.float64)
        assert_close(exe(x), want)
    assert set(used) >= {1, 3, 8}


def _without_avx512():
    """The GEMV module compiled for this CPU with AVX-512 switched off (the portable
    path: 16-lane vectors become pairs of 8-lane ones), and its engine."""
    t = jit.target()
    feats = ",".join("-" + f[1:] if f[1:].startswith("avx512") else f
                     for f in t.features.split(",") if f)
    machine = llvm.Target.from_triple(t.triple).create_target_machine(
        cpu="x86-64-v3", features=feats, opt=3, reloc="static", codemodel="jitdefault")
    mod = jit.parse(gemv.build_module())
    mod.triple, mod.data_layout = t.triple, str(machine.target_data)
    pto = llvm.create_pipeline_tuning_options(speed_level=3)
    pb = llvm.create_pass_builder(machine, pto)
    pb.getModulePassManager().run(mod, pb)
    asm = machine.emit_assembly(mod)
    engine = llvm.create_mcjit_compiler(mod, machine)
    engine.finalize_object()
    return engine, asm


@pytest.mark.skipif(not jit.target().triple.startswith("x86_64"), reason="x86-64 only")
def test_portable_path_without_avx512(rng):
    engine, asm = _without_avx512()
    assert "zmm" not in asm
    P, I = ctypes.c_void_p, ctypes.c_int64
    fn = jit.cfunc(engine.get_function_address("tc_gemv_gelu_erf"), None,
                   [P, I, P, I, I, I, P, I, I, I, P, I, P, I, I, I, I])
    for m, k, n in [(1, 33, 50), (5, 300, 97), (8, 1000, 64)]:
        a, b, bias, res = operands(rng, m, k, n)
        p = G.PackedB(b)
        out = np.empty((m, n), np.float32)
        fn(a.ctypes.data, k, p.ptr, 32, k * 32, k, out.ctypes.data, n, n, m,
           bias.ctypes.data, 1, res.ctypes.data, n, 1, 0, p.panels)
        assert_close(out, ref(a, b, bias, "gelu", res))
        fn(a.ctypes.data, k, b.ctypes.data, n, 32, k, out.ctypes.data, n, n, m,   # row-major
           bias.ctypes.data, 0, res.ctypes.data, n, 0, 0, p.panels)
        assert_close(out, ref(a, b, None, "gelu"))
    del engine
