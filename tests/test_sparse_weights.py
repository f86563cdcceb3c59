"""sparsify-weights (magnitude pruning) and the llvm sparse-weight GEMM."""

import numpy as np
import pytest

import tensorc
from tensorc.errors import TensorcError
from tensorc.ir import Graph, TensorType
from tensorc.passes import LOSSY, run_pipeline
from tensorc.passes.sparse_weights import density, prune

llvmlite = pytest.importorskip("llvmlite")
from tensorc.backends.llvm import sparse_gemm as sg  # noqa: E402
from tensorc.backends.llvm.gemm import PackedB  # noqa: E402


def _w(k, n, seed=0):
    return np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32)


# -- the pruning --------------------------------------------------------------------

@pytest.mark.parametrize("s", [0.3, 0.5, 0.9])
def test_unstructured_exact_count_and_smallest(s):
    w = _w(64, 48)
    p = prune(w, s)
    assert np.count_nonzero(p == 0) == round(s * w.size)
    kept = np.abs(w[p != 0])
    assert kept.min() >= np.abs(w[p == 0]).max()   # the smallest went
    assert np.array_equal(p[p != 0], w[p != 0])


@pytest.mark.parametrize("s", [0.5, 0.75, 0.9])
def test_block4x1_blocks(s):
    w = _w(64, 40, 1)
    p = prune(w, s, "block4x1")
    blocks = p.reshape(16, 4, 40)
    nz = np.count_nonzero(blocks, axis=1)
    assert set(np.unique(nz)) <= {0, 4}   # whole blocks go
    assert np.count_nonzero(nz == 0) == round(s * 16 * 40)
    norms = np.linalg.norm(w.reshape(16, 4, 40), axis=1)
    assert norms[nz == 4].min() >= norms[nz == 0].max()


def test_block4x1_ragged_k():
    p = prune(_w(10, 7, 2), 0.5, "block4x1")   # K = 10: blocks of 4, 4, 2
    nz = np.count_nonzero(np.vstack([p, np.ones((2, 7), np.float32)]).reshape(3, 4, 7),
                          axis=1)
    assert np.count_nonzero(nz[:2] == 0) + np.count_nonzero(nz[2] == 2) == round(0.5 * 21)


@pytest.mark.parametrize("s", [0.5, 0.8])
def test_two_of_four(s):
    w = _w(32, 24, 3)
    p = prune(w, s, "2:4")
    groups = p.reshape(8, 4, 24)
    assert np.count_nonzero(groups, axis=1).max() <= 2
    assert np.count_nonzero(p == 0) == round(s * w.size)
    if s == 0.5:   # the two largest of each group are kept
        mag = np.sort(np.abs(w.reshape(8, 4, 24)), axis=1)
        assert np.allclose(np.sort(np.abs(groups), axis=1)[:, 2:], mag[:, 2:])


def _graph(batch=1):
    model = tensorc.models.get("gpt", "tiny")
    feeds = model.example_inputs(batch=batch)
    return tensorc.trace(model, **feeds), feeds


def _densities(g):
    return {n: density(c.data) for n, c in g.constants.items()
            if c.type.rank == 2 and c.type.dtype == "f32"}


@pytest.mark.parametrize("pattern", ["unstructured", "block4x1", "2of4"])
def test_pass_per_matrix_and_head_kept(pattern):
    g, _ = _graph()
    g2 = run_pipeline(g, f"O2,sparsify-weights:sparsity=0.75:pattern={pattern}")
    before = _densities(run_pipeline(g, "O2"))
    after = _densities(g2)
    pruned = [n for n in after if after[n] < before[n]]
    assert len(pruned) >= 6   # q/k/v, o, up, down of both blocks
    for n in pruned:
        assert after[n] == pytest.approx(0.25, abs=0.02)
    # the embedding table (gathered; the tied head reads it transposed) stays dense
    assert after["wte.weight"] == 1.0
    assert "sparsify-weights" in LOSSY


def _mlp():
    """x @ w1 -> relu -> @ w2 + b (the head: its result is the output)."""
    g = Graph("mlp")
    x = g.add_input("x", TensorType((4, 32)))
    h = g.add("relu", g.add("matmul", x, g.add_constant("w1", _w(32, 64))))
    g.outputs = [g.add("add", g.add("matmul", h, g.add_constant("w2", _w(64, 16, 1))),
                       g.add_constant("b", np.ones(16, np.float32)))]
    return g


@pytest.mark.parametrize("pipeline", ["", "O2,"])
def test_pass_head_skipped_unless_asked(pipeline):
    g = _mlp()
    kept = run_pipeline(g, pipeline + "sparsify-weights:sparsity=0.5")
    assert density(kept.constants["w1"].data) == 0.5
    assert density(kept.constants["w2"].data) == 1.0
    both = run_pipeline(g, pipeline + "sparsify-weights:sparsity=0.5:head=1")
    assert density(both.constants["w2"].data) == 0.5


def test_pass_identity_and_errors():
    g, _ = _graph()
    o2 = run_pipeline(g, "O2")
    same = run_pipeline(g, "O2,sparsify-weights:sparsity=0")
    for n, c in o2.constants.items():
        assert np.array_equal(c.data, same.constants[n].data)
    for bad, what in (("sparsity=1.5", "sparsity"), ("sparsity=x", "sparsity"),
                      ("pattern=diag", "pattern"), ("pattern=2of4:sparsity=0.3", "2:4"),
                      ("head=3", "head")):
        with pytest.raises(TensorcError, match=what) as e:
            run_pipeline(g, f"sparsify-weights:{bad}")
        assert "\n" not in str(e.value)


# -- the kernel ----------------------------------------------------------------------

def _ref(a, w, bias, act, res):
    from tensorc.ops.elementwise import gelu
    z = a.astype(np.float64) @ w.astype(np.float64)
    if bias is not None:
        z = z + bias
    z = {None: lambda x: x, "relu": lambda x: np.maximum(x, 0),
         "gelu": lambda x: gelu(x.astype(np.float32)),
         "gelu_tanh": lambda x: gelu(x.astype(np.float32), "tanh")}[act](z)
    return z + res if res is not None else z


@pytest.mark.parametrize("m", [1, 7, 128, 129])
@pytest.mark.parametrize("k,n", [(37, 21), (64, 48), (130, 35)])
@pytest.mark.parametrize("d", [0.0, 0.1, 0.5, 1.0])
def test_kernel_matches_numpy(m, k, n, d):
    rng = np.random.default_rng(m * 1000 + k + n)
    a = rng.standard_normal((m, k)).astype(np.float32)
    w = (_w(k, n, k) * (rng.random((k, n)) < d)).astype(np.float32)
    packed = sg.SparseB(w)
    for threads in (1, 2):
        got = sg.sparse_gemm(a, packed, threads=threads)
        np.testing.assert_allclose(got, a.astype(np.float64) @ w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("act", [None, "relu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_epilogue(act, threads):
    rng = np.random.default_rng(7)
    m, k, n = 129, 100, 70
    a = rng.standard_normal((m, k)).astype(np.float32)
    w = (_w(k, n) * (rng.random((k, n)) < 0.2)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    res = rng.standard_normal((m, n)).astype(np.float32)
    got = sg.sparse_gemm(a, w, bias=bias, activation=act, residual=res, threads=threads)
    np.testing.assert_allclose(got, _ref(a, w, bias, act, res), rtol=1e-4, atol=1e-4)
    row = res[0]   # a broadcast residual row
    got = sg.sparse_gemm(a, w, bias=bias, activation=act, residual=row, threads=threads)
    np.testing.assert_allclose(got, _ref(a, w, bias, act, row), rtol=1e-4, atol=1e-4)


def test_bind_patch_and_choice():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((20, 40)).astype(np.float32)
    w = (_w(40, 30) * (rng.random((40, 30)) < 0.1)).astype(np.float32)
    packed = sg.pack_weight(w)
    assert isinstance(packed, sg.SparseB) and packed.density < sg.DENSITY_MAX
    assert isinstance(sg.pack_weight(_w(40, 30)), PackedB)   # dense stays dense
    out = np.empty((20, 30), np.float32)
    run = sg.bind(a, packed, out, threads=2)
    assert run.kernel == "sparse"
    run()
    np.testing.assert_allclose(out, a @ w, rtol=1e-4, atol=1e-5)
    a2, out2 = a[::-1].copy(), np.empty_like(out)
    run.patch("a", a2.ctypes.data)
    run.patch("out", out2.ctypes.data)
    run()
    np.testing.assert_allclose(out2, a2 @ w, rtol=1e-4, atol=1e-5)
    # few rows (a decode step): the dense GEMM unless W is very sparse, or asked
    w2 = prune(_w(40, 30), 0.8)
    few = np.empty((4, 30), np.float32)
    assert sg.bind(a[:4], sg.SparseB(w2), few).kernel == "dense"
    forced = sg.bind(a[:4], sg.SparseB(w2), few, always=True)
    assert forced.kernel == "sparse"
    forced()
    np.testing.assert_allclose(few, a[:4] @ w2, rtol=1e-4, atol=1e-5)
    # an A whose rows are no 2-D view (batches apart): the dense GEMM, same numbers
    a3 = np.zeros((2, 11, 40), np.float32)[:, :10]
    a3[...] = a.reshape(2, 10, 40)
    out3 = np.empty((2, 10, 30), np.float32)
    fallback = sg.bind(a3, packed, out3)
    assert fallback.kernel == "dense"
    fallback()
    np.testing.assert_allclose(out3.reshape(20, 30), a @ w, rtol=1e-4, atol=1e-5)


def test_gpt_end_to_end_sparse_kernel():
    g, feeds = _graph(batch=4)   # 64 rows: the sparse kernel's side of density_limit
    g2 = run_pipeline(g, "O2,sparsify-weights:sparsity=0.9")
    want = tensorc.compile(g2, "numpy").run(feeds)
    exe = tensorc.compile(g2, "llvm")
    got = exe.run(feeds)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5)
    assert exe.stats()["fallbacks"] == []
    runner = next(iter(exe._runners.values()))
    kinds = [getattr(s, "kernel", None) for s in runner.steps]
    assert kinds.count("sparse") >= 6
    # unpruned, the same graph keeps the dense GEMM
    dense = tensorc.compile(run_pipeline(g, "O2"), "llvm")
    dense.run(feeds)
    assert "sparse" not in [getattr(s, "kernel", None)
                            for s in next(iter(dense._runners.values())).steps]


@pytest.mark.parametrize("row_split", [False, True])
def test_kernel_thread_splits(monkeypatch, row_split):
    monkeypatch.setattr(sg, "ROW_SPLIT", row_split)
    rng = np.random.default_rng(5)
    m, k, n = 129, 300, 600   # 38 panels: more than one group of 32
    a = rng.standard_normal((m, k)).astype(np.float32)
    w = prune(_w(k, n, 4), 0.7)
    bias = rng.standard_normal(n).astype(np.float32)
    got = sg.sparse_gemm(a, w, bias=bias, activation="gelu_tanh", threads=2)
    np.testing.assert_allclose(got, _ref(a, w, bias, "gelu_tanh", None), rtol=1e-4,
                               atol=1e-4)
