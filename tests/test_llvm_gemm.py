"""The LLVM backend's scheduled GEMM against numpy (float64 references, rel. error <= 1e-4)."""

import numpy as np
import pytest

from tensorc.backends.llvm import gemm as G
from tensorc.backends.llvm.gemm_ir import AVX2_TILE, AVX512_TILE, KC_MAX, MC_MAX, Tile
from tensorc.errors import ShapeError, TensorcError
from tensorc.ops.elementwise import gelu

ACTS = {None: lambda x: x, "relu": lambda x: np.maximum(x, 0), "gelu": gelu,
        "gelu_tanh": lambda x: gelu(x, "tanh")}


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def randn(rng, *shape):
    return rng.standard_normal(shape, dtype=np.float32)


def assert_close(got, want, tol=1e-4):
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape
    assert got.dtype == np.float32
    err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)
    assert err <= tol, f"relative error {err:.2e}"


def ref(a, b, bias=None, activation=None, residual=None, trans_b=False):
    b = np.swapaxes(b, -1, -2) if trans_b else b
    z = np.matmul(a.astype(np.float64), b.astype(np.float64))
    z = z + bias if bias is not None else z
    z = ACTS[activation](z)
    return z + residual if residual is not None else z


# M, N, K: ones, odd sizes, non-multiples of 16/32 and of the micro-tile, K across
# several KC blocks, M across several MC blocks.
SHAPES = [(1, 1, 1), (3, 17, 5), (17, 3, 129), (129, 129, 17), (1, 257, 300),
          (33, 65, 513), (200, 40, 300), (8, 32, 256)]


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_plain(rng, m, n, k):
    a, b = randn(rng, m, k), randn(rng, k, n)
    assert_close(G.gemm(a, b), ref(a, b))


@pytest.mark.parametrize("activation", list(ACTS))
@pytest.mark.parametrize("m,n,k", [(17, 33, 300), (5, 70, 9)])
def test_epilogues(rng, m, n, k, activation):
    a, b = randn(rng, m, k), randn(rng, k, n) * np.float32(0.3)
    bias, res = randn(rng, n), randn(rng, m, n)
    assert_close(G.gemm(a, b, activation=activation), ref(a, b, activation=activation))
    assert_close(G.gemm(a, b, bias=bias, activation=activation, residual=res),
                 ref(a, b, bias, activation, res))


def test_activation_tails(rng):
    """gelu's negative tail and large inputs stay accurate (erfc form, clamped exp)."""
    x = np.linspace(-12, 12, 4001, dtype=np.float32)[:, None]
    one = np.ones((1, 1), np.float32)
    for act in ("gelu", "gelu_tanh"):
        got = G.gemm(x, one, activation=act)
        want = ACTS[act](x.astype(np.float64))
        big = np.abs(want) > 1e-30
        assert np.all(np.abs(got - want)[big] <= 1e-5 * np.abs(want)[big] + 1e-7)


@pytest.mark.parametrize("activation", list(ACTS))
def test_nan_propagates(rng, activation):
    a, b = randn(rng, 5, 40), randn(rng, 40, 20)
    a[2, 7] = np.nan
    got = G.gemm(a, b, activation=activation)
    assert np.isnan(got[2]).all() and not np.isnan(np.delete(got, 2, axis=0)).any()


def test_bias_only_and_residual_broadcast(rng):
    a, b = randn(rng, 9, 20), randn(rng, 20, 45)
    bias, row = randn(rng, 45), randn(rng, 1, 45)
    assert_close(G.gemm(a, b, bias=bias), ref(a, b, bias))
    assert_close(G.gemm(a, b, residual=row), ref(a, b, residual=row))


@pytest.mark.parametrize("m,n,k", [(3, 17, 5), (129, 65, 33), (16, 100, 257)])
def test_trans_b(rng, m, n, k):
    a, bt = randn(rng, m, k), randn(rng, n, k)
    assert_close(G.gemm(a, bt, trans_b=True), ref(a, bt, trans_b=True))
    packed = G.PackedB(bt, trans_b=True)
    assert_close(G.gemm(a, packed), ref(a, bt, trans_b=True))


def test_strided_inputs_and_out(rng):
    big_a, big_b = randn(rng, 60, 90), randn(rng, 80, 100)
    a, b = big_a[::2, 3:50], big_b[5:52, ::1][:, 7:70]       # row strides != row lengths
    out_big = np.zeros((40, 100), np.float32)
    out = out_big[1:31, 10:73]
    res = randn(rng, 30, 200)[:, ::2][:, :63]                # non-unit inner stride
    got = G.gemm(a, b, out=out, residual=res)
    assert got is out
    assert_close(out, ref(a, b, residual=res))
    assert np.all(out_big[0] == 0) and np.all(out_big[:, :10] == 0)   # nothing outside
    a_t = randn(rng, 50, 30).T                                # column-major input
    b2 = randn(rng, 50, 7)
    assert_close(G.gemm(a_t, b2), ref(a_t, b2))


def test_residual_aliasing_out(rng):
    """out=residual (an in-place skip connection) must not read partial sums."""
    a, b = randn(rng, 20, 600), randn(rng, 600, 40)
    x = randn(rng, 20, 40)
    want = ref(a, b, residual=x)
    G.gemm(a, b, out=x, residual=x)
    assert_close(x, want)


def test_packed_b_reused(rng):
    w = randn(rng, 300, 70)
    packed = G.PackedB(w)
    assert packed.shape == (300, 70)
    for m in (1, 13, 40):
        a = randn(rng, m, 300)
        assert_close(G.gemm(a, packed, activation="gelu"), ref(a, w, activation="gelu"))


def test_batched_and_broadcast(rng):
    a, b = randn(rng, 2, 3, 17, 20), randn(rng, 2, 3, 20, 33)
    assert_close(G.gemm(a, b), ref(a, b))
    a1, b1 = randn(rng, 3, 9, 20), randn(rng, 2, 1, 20, 5)       # both sides broadcast
    assert_close(G.gemm(a1, b1), ref(a1, b1))
    x, w = randn(rng, 4, 7, 40), randn(rng, 40, 50)               # [b, t, d] @ [d, n]
    bias, res = randn(rng, 50), randn(rng, 4, 7, 50)
    assert_close(G.gemm(x, w, bias=bias, activation="relu", residual=res),
                 ref(x, w, bias, "relu", res))
    kt = randn(rng, 2, 3, 33, 20)                                 # q @ k^T
    assert_close(G.gemm(a, kt, trans_b=True), ref(a, kt, trans_b=True))
    vec = randn(rng, 40)
    assert_close(G.gemm(x, vec), ref(x, vec))                     # matrix @ vector
    assert_close(G.gemm(vec, w), ref(vec, w))                     # vector @ matrix


@pytest.mark.parametrize("m,n,k", [(300, 70, 129), (40, 600, 257), (3, 1000, 800)])
def test_threads_give_identical_results(rng, m, n, k):
    a, b, bias = randn(rng, m, k), randn(rng, k, n), randn(rng, n)
    one = G.gemm(a, b, bias=bias, activation="gelu_tanh", threads=1)
    two = G.gemm(a, b, bias=bias, activation="gelu_tanh", threads=2)
    packed = G.PackedB(b)   # a weight: split by rows or by panels, not packed per call
    two_packed = G.gemm(a, packed, bias=bias, activation="gelu_tanh", threads=2)
    assert np.array_equal(one, two) and np.array_equal(one, two_packed)
    assert_close(two, ref(a, b, bias, "gelu_tanh"))


def test_concurrent_callers_share_the_pool_without_deadlock(rng):
    """Two threads calling at once: one gets the pool, the other runs serially."""
    import threading
    a, b = randn(rng, 200, 300), randn(rng, 300, 300)   # big enough to use the pool
    results = []
    callers = [threading.Thread(target=lambda: results.extend(
        G.gemm(a, b, threads=2) for _ in range(5))) for _ in range(2)]
    for t in callers:
        t.start()
    for t in callers:
        t.join(timeout=60)
    assert len(results) == 10
    for got in results:
        assert_close(got, ref(a, b))


def test_gemm_range_disjoint_blocks(rng):
    """The runtime-facing entry: blocks written separately make the whole product."""
    a, b = randn(rng, 37, 50), randn(rng, 50, 100)
    packed, out = G.PackedB(b), np.full((37, 100), np.nan, np.float32)
    for m0, m1 in ((0, 16), (16, 37)):
        for jp0, jp1 in ((0, 2), (2, packed.panels)):
            G.gemm_range(a, packed, out, m0, m1, jp0, jp1)
    assert_close(out, ref(a, b))


def test_empty_dims(rng):
    a, b, bias = randn(rng, 4, 0), randn(rng, 0, 6), randn(rng, 6)
    assert_close(G.gemm(a, b, bias=bias, activation="relu"), ref(a, b, bias, "relu"))
    assert G.gemm(randn(rng, 0, 5), randn(rng, 5, 3)).shape == (0, 3)


def test_bad_inputs_raise_one_clear_error(rng, monkeypatch):
    a = randn(rng, 4, 5)
    with pytest.raises(ShapeError, match="inner dims"):
        G.gemm(a, randn(rng, 6, 3))
    with pytest.raises(TensorcError, match="float32"):
        G.gemm(a.astype(np.float64), randn(rng, 5, 3))
    with pytest.raises(TensorcError, match="activation"):
        G.gemm(a, randn(rng, 5, 3), activation="swish")
    with pytest.raises(ShapeError, match="bias"):
        G.gemm(a, randn(rng, 5, 3), bias=randn(rng, 4))
    with pytest.raises(ShapeError, match="batch"):
        G.gemm(randn(rng, 2, 4, 5), randn(rng, 3, 5, 3))
    monkeypatch.setenv("TENSORC_NUM_THREADS", "zero")
    with pytest.raises(TensorcError, match="TENSORC_NUM_THREADS"):
        G.gemm(a, randn(rng, 5, 3))
    monkeypatch.setenv("TENSORC_NUM_THREADS", "1")
    assert G.num_threads() == 1


# -- the native pool, A packed once and shared, and bound calls ------------------------

@pytest.mark.parametrize("m,n,k", [(128, 300, 512), (37, 900, 700), (8, 1000, 300)])
def test_shared_packed_a_path_matches_one_thread(rng, m, n, k):
    """A few rows and a packed weight: A packed once, threads claim panel groups."""
    a, w, bias, res = randn(rng, m, k), randn(rng, k, n), randn(rng, n), randn(rng, m, n)
    packed = G.PackedB(w)
    assert m * n * k >= 1 << 21 and G._prepacked_size(m, k, G.tile_for(m, k, n)) <= G.PREPACK_A
    one = G.gemm(a, packed, bias=bias, activation="gelu", residual=res, threads=1)
    two = G.gemm(a, packed, bias=bias, activation="gelu", residual=res, threads=2)
    assert np.array_equal(one, two)
    assert_close(two, ref(a, w, bias, "gelu", res))


@pytest.mark.parametrize("batch,m,n,k", [((), 128, 600, 512), ((2,), 64, 600, 512),
                                         ((), 300, 70, 129), ((1,), 5, 7, 3)])
def test_bind_follows_the_arrays_it_was_given(rng, batch, m, n, k):
    a, w, bias = randn(rng, *batch, m, k), randn(rng, k, n), randn(rng, n)
    res, out = randn(rng, *batch, m, n), np.full((*batch, m, n), np.nan, np.float32)
    run = G.bind(a, G.PackedB(w), out, bias=bias, activation="relu", residual=res, threads=2)
    run()
    assert_close(out, ref(a, w, bias, "relu", res))
    a[...] = randn(rng, *a.shape)      # new contents, same memory: the next run sees them
    res[...] = randn(rng, *res.shape)
    run()
    assert_close(out, ref(a, w, bias, "relu", res))


def test_calls_from_several_threads_at_once(rng):
    """One caller gets the pool, the others run on their own thread; all correct."""
    import threading
    a, w = randn(rng, 128, 512), randn(rng, 512, 600)
    packed, want, bad = G.PackedB(w), ref(a, w), []

    def caller():
        for _ in range(10):
            got = G.gemm(a, packed, threads=2)
            if np.abs(got - want).max() > 1e-4 * np.abs(want).max():
                bad.append(got)
    threads = [threading.Thread(target=caller) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad


@pytest.mark.parametrize("tile", [AVX512_TILE, AVX2_TILE, Tile(5, 1, 128, 40)],
                         ids=lambda t: t.tag)
def test_pool_workers_sleep_and_wake(rng, monkeypatch, tile):
    """With no spinning a worker sleeps after every job: each post must wake it (a lost
    wake-up would hang here) and every item must run exactly once (the packing of A for
    each micro-tile height: 8 rows, and the general shuffles for 6 and 5)."""
    import time

    from tensorc.backends.llvm import pool
    monkeypatch.setenv("TENSORC_SPIN_US", "0")
    workers = pool.Pool(3)
    job = G.kernels(tile)["jobs"]["tc_pack_a_job"]
    MR, KC = tile.mr, tile.kc
    for trial in range(60):
        m, k = 8 * (1 + trial % 5) - trial % 3, 1 + 7 * trial % 40   # one K block
        a = randn(rng, m, k)
        mt = -(-m // MR)
        ap = G.aligned_empty(G._prepacked_size(m, k, tile))
        ap.fill(np.nan)
        items = [x for i in range(mt) for x in (i, i + 1)]
        block = np.array([a.ctypes.data, k, k, m, 1, KC, workers.threads,   # lda k, ldka 1
                          *[ap.ctypes.data] * workers.threads, *items], np.int64)
        with workers.lock:
            workers.run(job, block.ctypes.data, mt)
        padded = np.zeros((mt * MR, k), np.float32)
        padded[:m] = a
        assert np.array_equal(ap.reshape(mt, KC, MR)[:, :k],
                              padded.reshape(mt, MR, k).transpose(0, 2, 1))
        if trial % 10 == 0:
            time.sleep(0.002)


def test_bad_spin_setting_raises(monkeypatch):
    from tensorc.backends.llvm import pool
    monkeypatch.setenv("TENSORC_SPIN_US", "soon")
    with pytest.raises(TensorcError, match="TENSORC_SPIN_US"):
        pool.Pool(2)


def test_bind_batched_b_uses_the_arrays_as_given(rng):
    """Not the bound fast path (B per batch): the call still writes the 4-D out."""
    a, w = randn(rng, 2, 3, 40, 17), randn(rng, 2, 3, 17, 30)
    out = np.full((2, 3, 40, 30), np.nan, np.float32)
    G.bind(a, w, out, threads=2)()
    assert_close(out, ref(a, w))


# -- operands that change every call (training): B an activation or a transposed view
# (W^T), A transposed (x^T of a weight gradient); bound as the runtime binds them

def _layout(rng, rows, cols, transposed):
    """A [rows, cols] float32 operand: row-major, or a transposed view of [cols, rows]."""
    return randn(rng, cols, rows).T if transposed else randn(rng, rows, cols)


BOUND_SHAPES = [(1, 1, 1), (3, 17, 5), (9, 33, 17), (13, 70, 300), (130, 33, 70),
                (128, 512, 2048), (128, 2048, 512), (512, 128, 2048), (200, 300, 257),
                (64, 8192, 128), (700, 40, 129)]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (False, True), (True, False),
                                             (True, True)])
@pytest.mark.parametrize("m,k,n", BOUND_SHAPES)
def test_bound_per_call_operands(rng, m, k, n, trans_a, trans_b, threads):
    """B packed on every call (rows, or W^T read from W's rows), A in rows or x^T read
    from x's rows: the same numbers as numpy, on one and two threads, with epilogues,
    and the next call sees new contents of the same memory."""
    a, b = _layout(rng, m, k, trans_a), _layout(rng, k, n, trans_b)
    assert a.flags.c_contiguous != trans_a or m == 1 or k == 1
    bias, res = randn(rng, n), randn(rng, m, n)
    out = np.full((m, n), np.nan, np.float32)
    run = G.bind(a, b, out, bias=bias, activation="gelu", residual=res, threads=threads)
    assert hasattr(run, "patch")   # the bound path, not gemm() on every call
    run()
    assert_close(out, ref(a, b, bias, "gelu", res))
    a[...] = randn(rng, *a.shape)
    b[...] = randn(rng, *b.shape)
    run()
    assert_close(out, ref(a, b, bias, "gelu", res))
    plain = np.full((m, n), np.nan, np.float32)
    G.bind(a, b, plain, threads=threads)()
    assert_close(plain, ref(a, b))


@pytest.mark.parametrize("k,n", [(1, 1), (5, 3), (16, 32), (17, 33), (300, 70), (512, 2048)])
def test_pack_kernels_give_the_panels(rng, k, n):
    """tc_pack_b and tc_pack_bt lay B (or W with B = W^T) out as Bp[jp][k][NR], columns
    past N zero, whatever the K and N tails."""
    b = randn(rng, k, n)
    panels = -(-n // G.NR)
    want = np.zeros((panels, k, G.NR), np.float32)
    padded = np.zeros((k, panels * G.NR), np.float32)
    padded[:, :n] = b
    want[...] = padded.reshape(k, panels, G.NR).transpose(1, 0, 2)
    for src, trans in ((b, False), (np.ascontiguousarray(b.T), True)):
        p = G.PackedB(src, trans_b=trans, threads=1)
        assert np.array_equal(p.data.reshape(panels, k, G.NR), want)


def test_transposed_a_patch_moves_it(rng):
    """patch("a", ...) points a bound x^T product at another array of the same layout."""
    x, x2, dy = randn(rng, 128, 300), randn(rng, 128, 300), randn(rng, 128, 200)
    out = np.empty((300, 200), np.float32)
    run = G.bind(x.T, dy, out, threads=2)
    run()
    assert_close(out, ref(x.T, dy))
    run.patch("a", x2.ctypes.data)
    run()
    assert_close(out, ref(x2.T, dy))


@pytest.mark.parametrize("in_blocks", [True, False])
@pytest.mark.parametrize("m,k,n,trans_b", [(128, 300, 1100, True), (100, 513, 300, False),
                                           (300, 70, 900, True), (1000, 40, 200, False)])
def test_per_call_b_packed_in_blocks_or_first(rng, monkeypatch, m, k, n, trans_b, in_blocks):
    """Both schedules of a per-call B on two threads (tc_gemm_pb packing it per K block
    while multiplying, or all panels packed first) match numpy, across K blocks, NCP
    panel chunks and edges."""
    monkeypatch.setattr(G, "PACK_IN_BLOCKS", in_blocks)
    a, b = randn(rng, m, k), _layout(rng, k, n, trans_b)
    bias, res = randn(rng, n), randn(rng, m, n)
    out = np.full((m, n), np.nan, np.float32)
    run = G.bind(a, b, out, bias=bias, activation="relu", residual=res, threads=2)
    run()
    assert_close(out, ref(a, b, bias, "relu", res))
    b2 = _layout(rng, k, n, trans_b)
    run.patch("b", b2.ctypes.data)   # a transposed view starts where its W does
    run()
    assert_close(out, ref(a, b2, bias, "relu", res))

def test_bind_batched_products_bound_once(rng):
    """A B per batch (attention's backward): each product bound once, transposed Bs
    included; the same arrays again give the new values, as a bound call must."""
    a, w = randn(rng, 2, 3, 40, 17), randn(rng, 2, 3, 30, 17).swapaxes(-1, -2)
    out = np.full((2, 3, 40, 30), np.nan, np.float32)
    run = G.bind(a, w, out, threads=2)
    run()
    assert_close(out, ref(a, w))
    a[...] = randn(rng, *a.shape)
    run()
    assert_close(out, ref(a, w))


def test_a_bound_gemm_keeps_its_operands_alive():
    """bind reads A where it is: a temporary A must live as long as the bound call."""
    import gc
    rng = np.random.default_rng(0)
    a = rng.standard_normal((64, 128)).astype(np.float32)
    w = rng.standard_normal((128, 96)).astype(np.float32)
    out = np.empty((64, 96), np.float32)
    for make in (np.copy, np.asfortranarray):
        run = G.bind(make(a), G.PackedB(w), out)
        gc.collect()
        junk = [np.ones((64, 128), np.float32) for _ in range(16)]   # reuse freed memory
        run()
        np.testing.assert_allclose(out, a @ w, rtol=1e-4, atol=1e-3)
        del junk


# -- the schedule space (gemm_space.py): every tile the tuner may pick -----------------

def _tiles_of_both_hosts(monkeypatch, key) -> list:
    """The candidate tiles of an AVX2 and an AVX-512 host (any runs anywhere: LLVM
    splits or merges the vectors), each micro-tile shape once, plus other blockings."""
    from tensorc.backends.llvm import gemm_space
    tiles = []
    for avx512 in (False, True):
        monkeypatch.setattr(gemm_space, "_avx512", lambda v=avx512: v)
        tiles += [Tile(**s) for s in gemm_space.candidates(key)]
    monkeypatch.undo()
    shapes = {}
    for t in tiles:   # each micro-tile shape, and other blockings of the defaults
        if (t.mr, t.nv) not in shapes or t in (AVX2_TILE, AVX512_TILE) or t.mr == 5:
            shapes.setdefault((t.mr, t.nv), set()).add(t)
    return sorted({t for ts in shapes.values() for t in ts})


@pytest.mark.parametrize("m,k,n", [(128, 300, 600), (37, 700, 90)])
def test_every_candidate_tile_computes_the_product(rng, monkeypatch, m, k, n):
    """Each micro-tile shape the tuner may choose, and other blockings, on a path of
    its own (a packed weight, B packed per call, also transposed, A transposed; the
    defaults on all, with each way threads split the work), equals the float64 product
    with the epilogue; tiles with the default's kc equal the default's result bit for
    bit (the micro-tile does not change any sum's order). Compiling every tile for
    every path would take minutes."""
    a, w, bias, res = randn(rng, m, k), randn(rng, k, n), randn(rng, n), randn(rng, m, n)
    want = ref(a, w, bias, "gelu", res)
    a_t = np.ascontiguousarray(a.T).T   # the same values, A given transposed
    operands = {"weight": (a, G.PackedB(w)), "per call": (a, w),
                "per call, B^T": (a, np.ascontiguousarray(w.T).T), "A^T": (a_t, w)}
    tiles = _tiles_of_both_hosts(monkeypatch, (m, k, n, 0))
    splits = [t._replace(split=s) for t in (AVX2_TILE, AVX512_TILE)
              for s in ("shared", "rows", "panels", "blocks")]   # the same code
    for i, (path, (x, b)) in enumerate(operands.items()):
        base = None
        for tile in [t for j, t in enumerate(tiles)
                     if j % len(operands) == i or t in (AVX2_TILE, AVX512_TILE)] + splits:
            out = np.full((m, n), np.nan, np.float32)
            G.bind(x, b, out, bias=bias, activation="gelu", residual=res, threads=2,
                   tile=tile)()
            assert_close(out, want), (path, tile)
            if tile.kc == G.AVX512_TILE.kc:
                base = out if base is None else base
                assert np.array_equal(out, base), (path, tile)


def test_space_candidates_are_legal_and_start_with_the_default(monkeypatch):
    from tensorc.backends.llvm import gemm_space
    for avx512, regs in ((False, 16), (True, 32)):
        monkeypatch.setattr(gemm_space, "_avx512", lambda v=avx512: v)
        for key in [(128, 768, 2304, 0), (8, 64, 64, 1), (4096, 3072, 768, 1)]:
            cands = [Tile(**s) for s in gemm_space.candidates(key)]
            assert cands[0] == Tile(**gemm_space.default(key))
            assert cands[0] == (AVX512_TILE if avx512 else AVX2_TILE)
            assert len(cands) == len(set(cands)) and 4 <= len(cands) <= 40
            per = 1 if avx512 else 2
            for t in cands:   # accumulators + B vectors + a broadcast fit the registers
                assert (t.mr * t.nv + t.nv) * per + 1 <= regs, t
                assert t.mc % t.mr == 0 and t.kc <= KC_MAX and t.mc <= MC_MAX, t


@pytest.mark.parametrize("threads", [1, 2])
def test_patching_a_bound_call_with_b_per_call_moves_only_that_operand(rng, threads):
    """`patch` finds each operand's slot in the steps, the packing of a per-call B (a
    step of the default tile's library) included: after moving A and B the product is
    the new one (a slot mistaken for another wrote A's address into B's)."""
    a, b = randn(rng, 200, 4), randn(rng, 4, 3)
    out = np.full((200, 3), np.nan, np.float32)
    run = G.bind(a, b, out, threads=threads)
    a2, b2 = randn(rng, 200, 4), randn(rng, 4, 3)
    run.patch("a", a2.ctypes.data)
    run.patch("b", b2.ctypes.data)
    run()
    assert_close(out, ref(a2, b2))
