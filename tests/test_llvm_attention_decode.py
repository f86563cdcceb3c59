"""Flash attention's path for a decode step's few query rows (`_decode_kernel` in
backends/llvm/attention.py) against the float64 definition and the op's reference."""

import ctypes
import math

import llvmlite.binding as llvm
import numpy as np
import pytest
from test_llvm_attention import naive  # the float64 definition, one home

from tensorc.backends.llvm import attention as A
from tensorc.backends.llvm import attention_schedule as S
from tensorc.backends.llvm import jit
from tensorc.backends.llvm.gemm import aligned_empty
from tensorc.ops.attention import attention as op_reference


def assert_close(got, want, tol=1e-4):
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    ok = ~np.isnan(want)
    err = np.abs(got - want)[ok].max(initial=0) / max(np.abs(want)[ok].max(initial=0), 1e-30)
    assert err <= tol, f"relative error {err:.2e}"


@pytest.fixture
def used(monkeypatch):
    """Records the row counts the decode plan ran with."""
    calls = []
    plan = A._decode_plan

    def spy(q, *args):
        calls.append(q.shape[2])
        return plan(q, *args)
    monkeypatch.setattr(A, "_decode_plan", spy)
    return calls


def randn(rng, *shape):
    return rng.standard_normal(shape, dtype=np.float32)


@pytest.mark.parametrize("threads", [1, 2])
def test_random_shapes_and_masks(used, threads):
    rng = np.random.default_rng(11)
    for trial in range(40):
        b, h = int(rng.integers(1, 4)), int(rng.integers(1, 5))
        t, s = int(rng.integers(1, S.DECODE_T + 1)), int(rng.integers(1, 300))
        d = int(rng.choice([1, 7, 16, 64, 80, 130]))
        dv = d if trial % 3 else int(rng.choice([5, 64, 100]))
        q, k, v = randn(rng, b, h, t, d), randn(rng, b, h, s, d), randn(rng, b, h, s, dv)
        kind = trial % 4
        mask = None if kind == 0 else rng.random((b, 1, 1, s)) > 0.3 if kind == 1 else \
            rng.random((b, 1, t, s)) > 0.3 if kind == 2 else randn(rng, 1, h, t, s)
        causal = trial % 5 == 0
        mv = -1e9 if trial % 7 == 0 else -math.inf
        scale = 1 / math.sqrt(d)
        got = A.attention(q, k, v, mask, scale, causal, mv, threads=threads)
        assert_close(got, naive(q, k, v, mask, scale, causal, mv))
    assert used and max(used) <= S.DECODE_T


def test_one_row_many_keys_threads_split_heads(used):
    rng = np.random.default_rng(3)
    for b, s in ((1, 1024), (4, 512)):
        q, k, v = randn(rng, b, 8, 1, 64), randn(rng, b, 8, s, 64), randn(rng, b, 8, s, 64)
        mask = np.ones((b, 1, 1, s), bool)
        mask[..., s // 2::3] = False
        one = A.attention(q, k, v, mask, 0.125, threads=1)
        assert_close(one, naive(q, k, v, mask, 0.125))
        np.testing.assert_array_equal(A.attention(q, k, v, mask, 0.125, threads=2), one)
    assert used == [1] * 4


def test_fully_masked_rows_match_the_reference():
    """A row whose keys are all masked: NaN with -inf, uniform weights with a finite
    mask value, as the op's reference computes."""
    rng = np.random.default_rng(5)
    q, k, v = randn(rng, 2, 2, 1, 16), randn(rng, 2, 2, 40, 16), randn(rng, 2, 2, 40, 16)
    mask = np.ones((2, 1, 1, 40), bool)
    mask[1] = False
    for mv in (-math.inf, -1e9):
        got = A.attention(q, k, v, mask, 0.25, mask_value=mv)
        with np.errstate(invalid="ignore"):
            want = op_reference(q, k, v, mask, scale=0.25, mask_value=mv)
        assert_close(got, want)


def test_broadcast_kv_heads_and_strided_views():
    """k, v with one head for all (broadcast) and q a strided view of a wider array."""
    rng = np.random.default_rng(9)
    wide = randn(rng, 2, 4, 3, 96)
    q = wide[..., 16:80]
    k, v = randn(rng, 2, 1, 50, 64), randn(rng, 2, 1, 50, 64)
    got = A.attention(q, k, v, None, 0.125)
    assert_close(got, naive(q, np.broadcast_to(k, (2, 4, 50, 64)),
                            np.broadcast_to(v, (2, 4, 50, 64)), None, 0.125))


@pytest.mark.parametrize("threads,s", [(2, 256), (1, 256), (2, 3)])
def test_bind_runs_the_decode_plan(used, threads, s):
    """Bound once (threaded, or planned once for this thread alone), then reading the
    arrays' contents at each run."""
    rng = np.random.default_rng(2)
    q, k, v = randn(rng, 1, 8, 1, 64), randn(rng, 1, 8, s, 64), randn(rng, 1, 8, s, 64)
    mask = rng.random((1, 1, 1, s)) > 0.2
    mask[..., 0] = True
    out = np.empty((1, 8, 1, 64), np.float32)
    run = A.bind(q, k, v, mask, 0.125, threads=threads, out=out)
    for _ in range(2):
        k[...] = randn(rng, *k.shape)
        q[...] = randn(rng, *q.shape)
        run()
        assert_close(out, naive(q, k, v, mask, 0.125))
    assert used


@pytest.mark.skipif(not jit.target().triple.startswith("x86_64"), reason="x86-64 only")
def test_portable_path_without_avx512():
    """The attention module compiled for this CPU with AVX-512 switched off (16-lane
    vectors become pairs of 8-lane ones), its decode kernel run directly."""
    t = jit.target()
    feats = ",".join("-" + f[1:] if f[1:].startswith("avx512") else f
                     for f in t.features.split(",") if f)
    machine = llvm.Target.from_triple(t.triple).create_target_machine(
        cpu="x86-64-v3", features=feats, opt=3, reloc="static", codemodel="jitdefault")
    mod = jit.parse(A.build_module())
    mod.triple, mod.data_layout = t.triple, str(machine.target_data)
    pb = llvm.create_pass_builder(machine, llvm.create_pipeline_tuning_options(speed_level=3))
    pb.getModulePassManager().run(mod, pb)
    assert "zmm" not in machine.emit_assembly(mod)
    engine = llvm.create_mcjit_compiler(mod, machine)
    engine.finalize_object()
    P, I = ctypes.c_void_p, ctypes.c_int64
    fn = jit.cfunc(engine.get_function_address("tc_attention_decode_keep"), None,
                   [P] * 6 + [ctypes.c_float] * 2 + [I] * 5 + [P])
    rng = np.random.default_rng(4)
    for b, h, t_, s, d in [(1, 2, 1, 37, 64), (2, 3, 3, 100, 20)]:
        q, k, v = randn(rng, b, h, t_, d), randn(rng, b, h, s, d), randn(rng, b, h, s, d)
        mask = rng.random((b, 1, t_, s)) > 0.3
        mask[..., 0] = True
        out = np.empty((b, h, t_, d), np.float32)
        _, fixed, _, _, work_size, keep = A._plan(q, k, v, mask, 0.2, False, -math.inf, 1,
                                                  out)
        work = aligned_empty(work_size)
        fn(*fixed[:6], 0.2, -math.inf, 0, 0, b * h, 0, t_, work.ctypes.data)
        assert_close(out, naive(q, k, v, mask, 0.2))
        del keep
    del engine


@pytest.mark.parametrize("hk", [1, 2, 4])
def test_grouped_kv_heads(hk):
    """Query head i reads key/value head i // (8 / hk), in place (a llama decode step)."""
    rng = np.random.default_rng(10 + hk)
    q = randn(rng, 2, 8, 1, 32)
    k, v = randn(rng, 2, hk, 40, 32), randn(rng, 2, hk, 40, 32)
    mask = rng.random((2, 1, 1, 40)) < 0.8
    got = A.attention(q, k, v, mask, 0.2)
    rep = 8 // hk
    assert_close(got, naive(q, np.repeat(k, rep, 1), np.repeat(v, rep, 1), mask, 0.2))
