"""The CUDA library kernels, run on the CPU emulator (no GPU needed), against the numpy
reference. The emulator runs each CUDA thread as a host thread with real barriers and
warp shuffles, so this checks the kernels' indexing, masking and online softmax; it
says nothing about speed."""

import math

import numpy as np
import pytest

from tensorc.backends.cupy import kernels as K
from tensorc.backends.cupy.emulate import EmulatedModule, host_compiler
from tensorc.ops import get_op

if host_compiler() is None:
    pytest.skip("g++ not installed: the CUDA emulator needs a C++20 host compiler",
                allow_module_level=True)

HEAD_DIMS = [(16, 16), (8, 24), (6, 80)]   # 8 and 4 warps; d not a multiple of 4


@pytest.fixture(scope="module")
def module():
    ks = [K.flash_attention_kernel(d, dv) for d, dv in HEAD_DIMS]
    return EmulatedModule("".join(k.source for k in ks), {k.name: k.params for k in ks})


def run(module, launch: K.Launch):
    module.launch(launch.kernel.name, launch.grid, launch.block, launch.args)


def ref(op, *arrays, **attrs):
    opdef = get_op(op)
    return opdef.evaluate(list(arrays), opdef.complete_attrs(attrs))[0]


def rel_err(got, want):
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


rng = np.random.default_rng(7)


def _attention_case(b, h, t, s, d, dv, hk=None, mask=None, **attrs):
    hk = h if hk is None else hk
    q = rng.standard_normal((b, h, t, d)).astype(np.float32)
    k = rng.standard_normal((b, hk, s, d)).astype(np.float32)
    v = rng.standard_normal((b, hk, s, dv)).astype(np.float32)
    inputs = [q, k, v] + ([mask] if mask is not None else [])
    return inputs, ref("attention", *inputs, **attrs)


ATTENTION_CASES = {
    "plain": dict(b=1, h=2, t=37, s=45, d=16, dv=16, scale=0.25),
    "causal": dict(b=2, h=1, t=40, s=40, d=16, dv=16, scale=0.25, causal=True),
    "shared-kv-head": dict(b=1, h=3, t=9, s=33, d=8, dv=24, hk=1, scale=0.3),
    "wide-value-odd-head-dim": dict(b=1, h=2, t=21, s=37, d=6, dv=80, scale=0.4, causal=True),
    "padding-bool": dict(b=2, h=1, t=20, s=35, d=16, dv=16, scale=0.25,
                         mask=np.arange(35)[None, None, None, :] < np.array([35, 17])[
                             :, None, None, None]),
    "additive-bias": dict(b=1, h=2, t=12, s=40, d=16, dv=16, scale=0.25,
                          mask=rng.standard_normal((1, 2, 12, 40)).astype(np.float32)),
    "causal+bias-finite-fill": dict(b=1, h=1, t=33, s=33, d=16, dv=16, scale=0.25,
                                    causal=True, mask_value=-1e4,
                                    mask=rng.standard_normal((33, 33)).astype(np.float32)),
}


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_flash_attention(module, case):
    inputs, want = _attention_case(**ATTENTION_CASES[case])
    q, k, v, *mask = inputs
    o = np.full(want.shape, np.nan, np.float32)
    attrs = {a: ATTENTION_CASES[case][a] for a in ("scale", "causal", "mask_value")
             if a in ATTENTION_CASES[case]}
    run(module, K.attention_launch(q, k, v, o, mask[0] if mask else None, **attrs))
    assert rel_err(o, want) < 1e-5, case


def test_flash_attention_fully_masked_rows_match_reference(module):
    """A query row with every key masked: NaN with mask_value=-inf (as the reference),
    uniform weights with a finite fill."""
    keep = np.ones((1, 1, 6, 40), bool)
    keep[..., 2, :] = False
    for fill in (-math.inf, -1e9):
        with np.errstate(invalid="ignore"):   # the reference's 0/0 on the masked row
            inputs, want = _attention_case(1, 1, 6, 40, 16, 16, mask=keep, scale=0.5,
                                           mask_value=fill)
        o = np.zeros(want.shape, np.float32)
        run(module, K.attention_launch(*inputs[:3], o, keep, scale=0.5, mask_value=fill))
        np.testing.assert_array_equal(np.isnan(o), np.isnan(want))
        ok = ~np.isnan(want)
        assert rel_err(o[ok], want[ok]) < 1e-5


# --- kernel IR rendered to CUDA, run on the emulator --------------------------------

def _ir_kernels():
    """Small kernels in the shapes lowering produces: an elementwise nest with
    broadcasting, a row reduction (two Decl'd reductions of the same name in a row),
    integer index math, casts and bool selects."""
    from tensorc.backends import kernel_ir as KI
    rows, n = 5, 37
    x, y = KI.Buffer("x", "f32"), KI.Buffer("y", "f32")
    out = KI.Buffer("out", "f32", readonly=False)
    i, j = KI.Var("i"), KI.Var("j")
    xi = KI.Load(x, KI.affine(0, [(i, n), (j, 1)]))
    ew = KI.Kernel([x, y, out], [KI.Loop(i, rows, [KI.Loop(j, n, [KI.Store(
        out, KI.affine(0, [(i, n), (j, 1)]),
        KI.Select(KI.Binary("gt", xi, KI.Const(0.0)),
                  KI.Binary("mul", xi, KI.Load(y, j)),
                  KI.Binary("max", KI.Unary("tanh", xi), KI.Const(-0.5))))])], parallel=True)],
        kind="ew")
    acc = KI.Var("acc", "f32")
    red = KI.Kernel([x, out], [KI.Loop(i, rows, [
        KI.Decl(acc, KI.Const(float("-inf"))),
        KI.Loop(j, n, [KI.Assign(acc, KI.Binary("max", acc, xi))]),
        KI.Store(out, i, acc),
        KI.Decl(acc, KI.Const(0.0)),
        KI.Loop(j, n, [KI.Assign(acc, KI.Binary("add", acc, KI.Unary("exp", xi)))]),
        KI.Store(out, KI.affine(rows, [(i, 1)]), acc)], parallel=True)], kind="rowmax")
    ids, tab = KI.Buffer("ids", "i64"), KI.Buffer("tab", "f32")
    gat = KI.Kernel([ids, tab, out], [KI.Loop(i, rows * 4, [KI.Store(
        out, i, KI.Binary("add", KI.Load(tab, KI.Binary("add", KI.Binary(
            "mul", KI.Load(ids, KI.Binary("floordiv", i, KI.const_index(4))),
            KI.const_index(4)), KI.Binary("mod", i, KI.const_index(4)))),
            KI.Cast(KI.Cast(KI.Binary("mod", i, KI.const_index(3)), "bool"), "f32")))],
        parallel=True)], kind="gather")
    return ew, red, gat


@pytest.fixture(scope="module")
def ir_module():
    from tensorc.backends.cupy.cuda_codegen import render_kernel
    rendered = [render_kernel(k) for k in _ir_kernels()]
    return rendered, EmulatedModule("".join(r.source for r in rendered),
                                    {r.name: r.params for r in rendered})


def _run_ir(ir_module, which, *args):
    from tensorc.backends.cupy.cuda_codegen import launch_config
    rendered, mod = ir_module
    r = rendered[which]
    blocks, threads = launch_config(r.extent, threads=64)
    mod.launch(r.name, (blocks,), (threads,), [*args, 0, r.extent])


def test_rendered_elementwise_kernel(ir_module):
    x = rng.standard_normal((5, 37)).astype(np.float32)
    x[0, :3] = [np.nan, -np.inf, np.inf]
    y = rng.standard_normal(37).astype(np.float32)
    out = np.zeros_like(x)
    _run_ir(ir_module, 0, x, y, out)
    want = np.where(x > 0, x * y, np.maximum(np.tanh(x), np.float32(-0.5)))
    np.testing.assert_allclose(out, want, rtol=1e-6, equal_nan=True)
    assert np.isnan(out[0, 0])   # max() keeps NaN, as numpy's maximum does


def test_rendered_reduction_kernel(ir_module):
    x = rng.standard_normal((5, 37)).astype(np.float32)
    out = np.zeros(10, np.float32)
    _run_ir(ir_module, 1, x, out)
    np.testing.assert_allclose(out[:5], x.max(1), rtol=1e-6)
    np.testing.assert_allclose(out[5:], np.exp(x).sum(1), rtol=1e-5)


def test_rendered_index_math_and_casts(ir_module):
    ids = np.array([3, 0, 2, 1, 3], np.int64)
    tab = rng.standard_normal((4, 4)).astype(np.float32)
    out = np.zeros(20, np.float32)
    _run_ir(ir_module, 2, ids, tab, out)
    want = tab[ids].reshape(-1) + (np.arange(20) % 3 != 0)
    np.testing.assert_allclose(out, want, rtol=1e-6)
