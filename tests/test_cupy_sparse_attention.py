"""The cupy backend's sparse and linear attention kernels (backends/cupy/attention_kernels.py):
`local_attention` and `block_sparse_attention` (row chunks walking their pattern's key
intervals) and Performer `linear_attention` (key max, state, rows; causal chunks).

Without a GPU: every kernel compiles with nvcc for sm_80 and sm_90; on the CPU
emulator (emulate.py: CUDA threads as host threads, real barriers and shuffles) each
matches the numpy reference, alone and inside the backend's executable, where the
ops lower to these kernels (no host step) on cupy's target and to their
decomposition on a target without them. The GPU tests at the bottom run only where
cupy finds a CUDA device."""

import shutil
import subprocess

import numpy as np
import pytest

import tensorc
from tensorc.backends import get_backend
from tensorc.backends import lowering as L
from tensorc.backends.cupy import (
    LOWERING,
    CupyBackend,
    host_steps,
    library_kernels,
    program_source,
    unavailable_reason,
)
from tensorc.backends.cupy import attention_kernels as AK
from tensorc.backends.cupy.emulate import EmulatedModule, EmulatedRuntime, host_compiler
from tensorc.ops import get_op
from tensorc.ops.sparse_attention import pattern, performer_features

needs_emulator = pytest.mark.skipif(host_compiler() is None, reason="g++ not installed: the "
                                    "CUDA emulator needs a C++20 host compiler")
GPU_REASON = unavailable_reason()
HEAD_DIMS = [(16, 16), (8, 24), (6, 80)]   # 8 and 4 warps; chunks of 32 and 16 rows
rng = np.random.default_rng(5)


def ref(op, *arrays, **attrs):
    opdef = get_op(op)
    return opdef.evaluate(list(arrays), opdef.complete_attrs(attrs))[0]


def rel_err(got, want):
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def _rand(*shape):
    return rng.standard_normal(shape).astype(np.float32)


# --- nvcc ------------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_kernels_compile_with_nvcc(arch, tmp_path):
    """Every sparse / linear kernel instance, one translation unit (test_cupy also
    compiles them with the rest)."""
    ks = AK.all_attention_kernels()
    src = tmp_path / "attn.cu"
    src.write_text("\n".join(k.source for k in ks))
    out = tmp_path / f"attn.{arch}.ptx"
    proc = subprocess.run(["nvcc", "-ptx", f"-arch={arch}", "-std=c++17", str(src), "-o",
                           str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ptx = out.read_text()
    assert all(f".entry {k.name}(" in ptx for k in ks)


# --- the kernels alone, on the emulator ------------------------------------------------

@pytest.fixture(scope="module")
def module():
    ks = [AK.sparse_attention_kernel(d, dv) for d, dv in HEAD_DIMS]
    ks += [AK.linear_attention_kernel(st, d, dv) for d, dv in HEAD_DIMS
           for st in AK.LINEAR_STAGES]
    return EmulatedModule("".join(k.source for k in ks), {k.name: k.params for k in ks})


def _run(module, launches):
    for x in launches:
        module.launch(x.kernel.name, x.grid, x.block, x.args)


def _sparse_inputs(b, h, t, s, d, dv, hk=None, bk=None):
    hk = h if hk is None else hk
    bk = b if bk is None else bk
    return _rand(b, h, t, d), _rand(bk, hk, s, d), _rand(bk, hk, s, dv)


def _padding(b, s, lengths):
    return np.arange(s)[None, None, None, :] < np.array(lengths)[:, None, None, None]


SPARSE_CASES = {
    "local": dict(op="local_attention", b=1, h=2, t=45, s=45, d=16, dv=16,
                  before=5, after=3, scale=0.25),
    "local-causal": dict(op="local_attention", b=2, h=1, t=70, s=70, d=16, dv=16,
                         before=9, causal=True, scale=0.25),
    "local-dilated-globals": dict(op="local_attention", b=1, h=2, t=53, s=53, d=8, dv=24,
                                  before=12, after=7, dilation=3, global_tokens=(0, 1, 30),
                                  scale=0.3),
    "local-causal-dilated-globals": dict(op="local_attention", b=1, h=1, t=61, s=61, d=16,
                                         dv=16, before=20, dilation=2, causal=True,
                                         global_tokens=(2, 40), scale=0.25),
    "local-gqa-t-ne-s": dict(op="local_attention", b=1, h=4, hk=2, t=29, s=47, d=16, dv=16,
                             before=4, after=10, scale=0.25),
    "local-shared-kv-batch": dict(op="local_attention", b=2, h=3, hk=1, bk=1, t=37, s=37,
                                  d=6, dv=80, before=8, after=8, scale=0.4),
    "local-padding-mask": dict(op="local_attention", b=2, h=1, t=40, s=40, d=16, dv=16,
                               before=6, after=6, global_tokens=(0,), scale=0.25,
                               mask=_padding(2, 40, [40, 23])),
    "local-bias-finite-fill": dict(op="local_attention", b=1, h=2, t=33, s=33, d=16, dv=16,
                                   before=5, after=2, scale=0.25, mask_value=-1e4,
                                   mask=_rand(1, 2, 33, 33)),
    "block": dict(op="block_sparse_attention", b=1, h=2, t=75, s=75, d=16, dv=16, block=8,
                  local_blocks=1, random_blocks=2, seed=3, scale=0.25),
    "block-causal-globals": dict(op="block_sparse_attention", b=1, h=2, t=70, s=70, d=8,
                                 dv=24, block=16, local_blocks=0, random_blocks=1,
                                 global_tokens=(0, 33), causal=True, scale=0.3),
    "block-gqa-globals-mask": dict(op="block_sparse_attention", b=2, h=4, hk=2, t=50, s=50,
                                   d=16, dv=16, block=12, random_blocks=2, seed=7,
                                   global_tokens=(5, 6, 7), scale=0.25,
                                   mask=_padding(2, 50, [50, 31])),
    "block-wide-value": dict(op="block_sparse_attention", b=1, h=1, t=41, s=41, d=6, dv=80,
                             block=8, local_blocks=1, random_blocks=1, scale=0.4),
}


@needs_emulator
@pytest.mark.parametrize("case", list(SPARSE_CASES))
def test_sparse_attention_kernel(module, case):
    c = dict(SPARSE_CASES[case])
    op, mask = c.pop("op"), c.pop("mask", None)
    dims = {n: c.pop(n) for n in ("b", "h", "t", "s", "d", "dv", "hk", "bk") if n in c}
    q, k, v = _sparse_inputs(**dims)
    want = ref(op, q, k, v, *([mask] if mask is not None else []), **c)
    o = np.full(want.shape, np.nan, np.float32)
    attrs = get_op(op).complete_attrs(c)
    _run(module, [AK.sparse_attention_launch(op, q, k, v, o, mask, **attrs)])
    assert rel_err(o, want) < 1e-4, case


@needs_emulator
def test_sparse_attention_reads_strided_layouts(module):
    """q, k, v and o as [b, t, h, d] memory viewed as [b, h, t, d] (no copy)."""
    b, h, t, d = 2, 3, 38, 16
    q, k, v = (_rand(b, t, h, d).transpose(0, 2, 1, 3) for _ in range(3))
    attrs = get_op("local_attention").complete_attrs(dict(before=6, after=4, scale=0.25,
                                                          global_tokens=(3,)))
    want = ref("local_attention", q, k, v, **attrs)
    o = np.full((b, t, h, d), np.nan, np.float32).transpose(0, 2, 1, 3)
    _run(module, [AK.sparse_attention_launch("local_attention", q, k, v, o, **attrs)])
    assert rel_err(o, want) < 1e-4


@needs_emulator
def test_sparse_attention_rows_without_keys_match_reference(module):
    """A row whose visible keys are all masked: NaN with mask_value=-inf, as the
    reference; a finite fill spreads it over the pattern's keys only."""
    keep = np.ones((1, 1, 20, 20), bool)
    keep[..., 7, 2:12] = False          # every key row 7's window reaches
    q, k, v = _sparse_inputs(1, 1, 20, 20, 16, 16)
    for fill in (-np.inf, -1e9):
        attrs = get_op("local_attention").complete_attrs(
            dict(before=3, after=3, scale=0.5, mask_value=fill))
        with np.errstate(invalid="ignore"):
            want = ref("local_attention", q, k, v, keep, **attrs)
        o = np.zeros(want.shape, np.float32)
        _run(module, [AK.sparse_attention_launch("local_attention", q, k, v, o, keep,
                                                 **attrs)])
        np.testing.assert_array_equal(np.isnan(o), np.isnan(want))
        ok = ~np.isnan(want)
        assert rel_err(o[ok], want[ok]) < 1e-4


def test_sparse_tables_cover_every_row_once():
    """Chunks stay inside one row group, hold at most `rows` rows and tile [0, t)."""
    attrs = get_op("block_sparse_attention").complete_attrs(
        dict(block=8, random_blocks=1, global_tokens=(3, 20, 21)))
    pat = pattern("block_sparse_attention", 70, 70, attrs)
    intervals, chunks = AK.sparse_tables(pat, 16)
    rows = np.zeros(70, int)
    for i0, i1, iv0, iv1 in chunks:
        assert 0 < i1 - i0 <= 16
        group = [g for g in pat.groups if g[0] <= i0 and i1 <= g[1]]
        assert len(group) == 1
        assert [tuple(x) for x in intervals[iv0:iv1]] == [
            (lo, hi, int(bd)) for lo, hi, bd in group[0][2]]
        rows[i0:i1] += 1
    assert (rows == 1).all()


LINEAR_CASES = {
    "plain": dict(b=1, h=2, t=45, s=45, d=16, dv=16, m=40),
    "causal": dict(b=2, h=1, t=70, s=70, d=16, dv=16, m=40, causal=True),
    "t-ne-s": dict(b=1, h=2, t=19, s=77, d=8, dv=24, m=70),
    "causal-t-gt-s": dict(b=1, h=1, t=50, s=37, d=8, dv=24, m=33, causal=True),
    "gqa-shared-batch": dict(b=2, h=4, hk=2, bk=1, t=37, s=37, d=16, dv=16, m=32),
    "causal-gqa": dict(b=1, h=3, hk=1, t=41, s=41, d=16, dv=16, m=64, causal=True),
    "wide-value": dict(b=1, h=2, t=35, s=35, d=6, dv=80, m=20),
    "wide-value-causal": dict(b=1, h=1, t=35, s=35, d=6, dv=80, m=50, causal=True),
    "padding-mask": dict(b=2, h=2, t=30, s=30, d=16, dv=16, m=40,
                         mask=_padding(2, 30, [30, 17])),
    "causal-bias-per-head": dict(b=1, h=2, t=40, s=40, d=16, dv=16, m=40, causal=True,
                                 mask=0.5 * _rand(1, 2, 1, 40)),
    "causal-padding-mask-gqa": dict(b=2, h=4, hk=2, t=45, s=45, d=8, dv=24, m=36,
                                    causal=True, mask=_padding(2, 45, [45, 40])),
}


def _linear(module, b, h, t, s, d, dv, m, hk=None, bk=None, mask=None, causal=False,
            scale=0.3, w=None):
    q, k, v = _sparse_inputs(b, h, t, s, d, dv, hk, bk)
    w = performer_features(d, m, seed=m) if w is None else w
    want = ref("linear_attention", q, k, v, w, *([mask] if mask is not None else []),
               scale=scale, causal=causal)
    o = np.full(want.shape, np.nan, np.float32)
    scratch = np.full(AK.linear_scratch_floats(q, k, v, w), np.nan, np.float32)
    _run(module, AK.linear_attention_launches(q, k, v, w, o, mask, scratch=scratch,
                                              scale=scale, causal=causal))
    return o, want


@needs_emulator
@pytest.mark.parametrize("case", list(LINEAR_CASES))
def test_linear_attention_kernels(module, case):
    o, want = _linear(module, **LINEAR_CASES[case])
    assert rel_err(o, want) < 1e-4, case


@needs_emulator
def test_linear_attention_reads_transposed_features(module):
    """The features as a transposed view (any layout: they are read once per tile)."""
    w = np.ascontiguousarray(performer_features(16, 40, seed=2).T).T
    assert w.strides[1] != 4
    o, want = _linear(module, 1, 2, 33, 33, 16, 16, 40, w=w, causal=True)
    assert rel_err(o, want) < 1e-4


# --- inside the backend ---------------------------------------------------------------

def _graph():
    """local, block-sparse and linear attention (causal and not, with masks and GQA)
    side by side in one graph."""
    g = tensorc.Graph("sparse")
    t, d = 37, 16
    q = g.add_input("q", tensorc.TensorType((2, 4, t, d), "f32"))
    k = g.add_input("k", tensorc.TensorType((2, 2, t, d), "f32"))
    v = g.add_input("v", tensorc.TensorType((2, 2, t, d), "f32"))
    keep = g.add_input("keep", tensorc.TensorType((2, 1, 1, t), "bool"))
    w = g.add_constant("features", performer_features(d, 40, seed=1))
    g.outputs = [
        g.add("local_attention", q, k, v, keep, before=5, after=2, dilation=2,
              global_tokens=(0,), scale=0.25),
        g.add("block_sparse_attention", q, k, v, block=8, random_blocks=1, causal=True,
              global_tokens=(9,), scale=0.25),
        g.add("linear_attention", q, k, v, w, keep, scale=0.25),
        g.add("linear_attention", q, k, v, w, scale=0.25, causal=True),
    ]
    feeds = {"q": _rand(2, 4, t, d), "k": _rand(2, 2, t, d), "v": _rand(2, 2, t, d),
             "keep": _padding(2, t, [t, 25])}
    return g, feeds


OPS = {"local_attention", "block_sparse_attention", "linear_attention"}


def test_ops_lower_to_library_calls_on_cupy_only():
    g, _ = _graph()
    program = L.lower(g, {}, **LOWERING)
    calls = [s for s in program.steps if isinstance(s, L.Call)]
    assert sorted(s.op for s in calls if s.op in OPS) == sorted(
        ["local_attention", "block_sparse_attention", "linear_attention", "linear_attention"])
    assert not any(s.fallback for s in calls) and host_steps(program) == []
    library = library_kernels(program)
    names = {"tc_sparse_attention_d16_v16"} | {
        f"tc_linear_attention_{st}_d16_v16" for st in AK.LINEAR_STAGES}
    assert set(library) == names
    source = program_source({}, library)
    assert all(f"{n}(" in source for n in names)
    # a target without the kernels (the default Target) decomposes them
    plain = L.lower(g, {})
    assert not any(isinstance(s, L.Call) and s.op in OPS for s in plain.steps)


@needs_emulator
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_backend_runs_the_kernels_on_emulator(cuda_graph):
    """Eagerly with device inputs read in place (the steps that read them are bound
    again per call: the pattern tables and the scratch are kept), and recorded as a
    CUDA graph (no host round trip in the steps)."""
    g, feeds = _graph()
    want = get_backend("numpy").compile(g)(**feeds)
    runtime = EmulatedRuntime(can_capture=cuda_graph, device_inputs=not cuda_graph)
    exe = CupyBackend(cuda_graph=cuda_graph).compile(g, runtime=runtime)
    for _ in range(2):
        got = exe(**feeds)
        for a, b in zip(got, want, strict=True):
            assert rel_err(a, b) < 1e-4
    assert exe.stats["fallbacks"] == []
    assert exe.stats["graph_replays"] == (2 if cuda_graph else 0)
    assert exe.stats["inputs_in_place"] == (0 if cuda_graph else 2 * len(feeds))
    (prep,) = exe._prepared.values()
    assert len(prep.extras) == 4
    assert runtime.launches >= 1 + 1 + 3 + 2   # sparse x2, linear 3 + 2 stages


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_emitted_program_source_compiles_with_nvcc(tmp_path):
    """emit_source's one .cu: generated kernels and these library kernels together."""
    g, _ = _graph()
    (path,) = CupyBackend().emit_source(g, str(tmp_path))
    text = open(path).read()
    assert "tc_sparse_attention_d16_v16(" in text and "tc_linear_attention_causal_d16_v16(" in text
    proc = subprocess.run(["nvcc", "-ptx", "-arch=sm_80", "-std=c++17", path, "-o",
                           str(tmp_path / "g.ptx")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


@needs_emulator
def test_a_sparse_attention_the_kernel_cannot_take_runs_on_the_host():
    g = tensorc.Graph("wide")
    q, k, v = (g.add_input(n, tensorc.TensorType((1, 1, 9, 160), "f32")) for n in "qkv")
    g.outputs = [g.add("local_attention", q, k, v, before=2, scale=0.1)]
    arrays = [_rand(1, 1, 9, 160) for _ in range(3)]
    exe = CupyBackend().compile(g, runtime=EmulatedRuntime())
    assert rel_err(exe(*arrays), get_backend("numpy").compile(g)(*arrays)) < 1e-5
    assert [f["reason"] for f in exe.stats["fallbacks"]] == [
        "the sparse-attention kernel takes float32 with head dims <= 128 and a contiguous "
        "head dim"]


# --- on a GPU ----------------------------------------------------------------------------

needs_gpu = pytest.mark.skipif(GPU_REASON is not None, reason=f"no GPU: {GPU_REASON}")


@needs_gpu
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_backend_on_gpu(cuda_graph):
    g, feeds = _graph()
    want = get_backend("numpy").compile(g)(**feeds)
    exe = CupyBackend(cuda_graph=cuda_graph).compile(g)
    for _ in range(2):   # the second call replays the CUDA graph
        got = exe(**feeds)
        for a, b in zip(got, want, strict=True):
            assert rel_err(a, b) < 1e-4
    assert exe.stats["fallbacks"] == []


@needs_gpu
@pytest.mark.parametrize("case", ["local-causal-dilated-globals", "block-gqa-globals-mask",
                                  "local-shared-kv-batch"])
def test_sparse_kernel_on_gpu(case):
    import cupy as cp
    c = dict(SPARSE_CASES[case])
    op, mask = c.pop("op"), c.pop("mask", None)
    dims = {n: c.pop(n) for n in ("b", "h", "t", "s", "d", "dv", "hk", "bk") if n in c}
    q, k, v = _sparse_inputs(**dims)
    want = ref(op, q, k, v, *([mask] if mask is not None else []), **c)
    dq, dk, dv_, dmask = (cp.asarray(x) if x is not None else None for x in (q, k, v, mask))
    o = cp.full(want.shape, np.nan, np.float32)
    attrs = get_op(op).complete_attrs(c)
    pat, *tables = AK.sparse_attention_tables(op, q, k, v, **attrs)
    x = AK.sparse_attention_launch(op, dq, dk, dv_, o, dmask,
                                   tables=(pat, *(cp.asarray(t) for t in tables)), **attrs)
    from tensorc.backends.cupy import CupyRuntime
    rt = CupyRuntime()
    fn = rt.load(x.kernel.source, {x.kernel.name: x.kernel.params})[x.kernel.name]
    rt.launch(fn, x.kernel.params, x.grid, x.block, x.args)
    assert rel_err(cp.asnumpy(o), want) < 1e-4


@needs_gpu
@pytest.mark.parametrize("case", ["causal-padding-mask-gqa", "t-ne-s", "wide-value-causal"])
def test_linear_kernels_on_gpu(case):
    import cupy as cp

    from tensorc.backends.cupy import CupyRuntime
    c = dict(LINEAR_CASES[case])
    mask, causal = c.pop("mask", None), c.pop("causal", False)
    q, k, v = _sparse_inputs(c["b"], c["h"], c["t"], c["s"], c["d"], c["dv"], c.get("hk"),
                             c.get("bk"))
    w = performer_features(c["d"], c["m"], seed=c["m"])
    want = ref("linear_attention", q, k, v, w, *([mask] if mask is not None else []),
               scale=0.3, causal=causal)
    dev = [cp.asarray(x) for x in (q, k, v, w)]
    o = cp.full(want.shape, np.nan, np.float32)
    scratch = cp.empty(AK.linear_scratch_floats(q, k, v, w), np.float32)
    launches = AK.linear_attention_launches(
        *dev, o, cp.asarray(mask) if mask is not None else None, scratch=scratch, scale=0.3,
        causal=causal)
    rt = CupyRuntime()
    source = "".join(x.kernel.source for x in launches)
    fns = rt.load(source, {x.kernel.name: x.kernel.params for x in launches})
    for x in launches:
        rt.launch(fns[x.kernel.name], x.kernel.params, x.grid, x.block, x.args)
    assert rel_err(cp.asnumpy(o), want) < 1e-4
