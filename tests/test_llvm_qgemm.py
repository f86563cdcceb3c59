"""The LLVM backend's int8 GEMM (qgemm) against widened numpy references, bit for bit,
on every code path this host can run (the others are skipped, with the reason)."""

import numpy as np
import pytest

from tensorc.backends.llvm import gemm as G
from tensorc.backends.llvm import jit, runtime
from tensorc.backends.llvm import qgemm as Q
from tensorc.backends.llvm.qgemm_ir import build_module
from tensorc.errors import ShapeError, TensorcError
from tensorc.ops.elementwise import gelu


@pytest.fixture(params=Q.PATHS)
def path(request):
    why = Q.path_unavailable_reason(request.param)
    if why:
        pytest.skip(f"qgemm path {request.param!r} unavailable on this host: {why}")
    return request.param


@pytest.fixture
def rng():
    return np.random.default_rng(2024)


def operands(rng, m, k, n, batch=()):
    a = rng.integers(0, 256, batch + (m, k), dtype=np.uint8)
    b = rng.integers(-128, 128, (k, n), dtype=np.int8)
    return a, b


def ref_int(a, b, a_zero=None):
    """(a - a_zero[row]) @ b in int64, then int32; a_zero per row repeats per batch."""
    z = np.zeros(a.shape[-2], np.int64) if a_zero is None else \
        np.broadcast_to(np.asarray(a_zero, np.int64).reshape(-1), (a.shape[-2],))
    return ((a.astype(np.int64) - z[:, None]) @ b.astype(np.int64)).astype(np.int32)


def act_ref(y, act):
    """The float GEMM's own epilogue maths: y @ I through gemm with the activation."""
    if act is None:
        return y
    if act == "relu":
        return np.where(y < 0, np.float32(0), y)
    n = y.shape[-1]
    return G.gemm(y.reshape(-1, n), np.eye(n, dtype=np.float32), activation=act,
                  threads=1).reshape(y.shape)


def ref_float(acc, row_scale=None, col_scale=None, bias=None, act=None, residual=None):
    """The documented order, in numpy float32."""
    y = acc.astype(np.float32)
    if row_scale is not None:
        y = y * np.asarray(row_scale, np.float32).reshape(-1)[:, None] \
            if np.ndim(row_scale) else y * np.float32(row_scale)
    if col_scale is not None:
        y = y * np.asarray(col_scale, np.float32)
    if bias is not None:
        y = y + bias
    y = act_ref(y, act)
    if residual is not None:
        y = y + residual
    return y


SHAPES = [(1, 1, 1), (3, 17, 5), (17, 63, 33), (8, 64, 64), (65, 65, 127), (127, 127, 65),
          (9, 3, 16), (40, 256, 100), (33, 4097, 31), (130, 4100, 48)]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_int32_product(path, rng, m, k, n, threads):
    a, b = operands(rng, m, k, n)
    got = Q.qgemm(a, b, threads=threads, path=path)
    assert got.dtype == np.int32 and got.shape == (m, n)
    np.testing.assert_array_equal(got, ref_int(a, b))


@pytest.mark.parametrize("m", range(1, 9))
def test_decode_rows(path, rng, m):
    a, b = operands(rng, m, 300, 200)
    az = rng.integers(0, 256, m, dtype=np.uint8)
    for threads in (1, 2):
        np.testing.assert_array_equal(Q.qgemm(a, b, a_zero=az, threads=threads, path=path),
                                      ref_int(a, b, az))
    a, b = operands(rng, m, 2048, 512)   # big enough to split across threads
    np.testing.assert_array_equal(Q.qgemm(a, b, threads=2, path=path), ref_int(a, b))


@pytest.mark.parametrize("k", [64, 1024, 4097])
def test_extremes_do_not_saturate(path, k):
    """a = 255 times b = -128 or 127: u8 x s8 pairs overflow i16 (vpmaddubsw's trap)."""
    m, n = 9, 40
    a = np.full((m, k), 255, np.uint8)
    for fill in (-128, 127):
        b = np.full((k, n), fill, np.int8)
        got = Q.qgemm(a, b, path=path)
        np.testing.assert_array_equal(got, ref_int(a, b))
        assert got[0, 0] == 255 * fill * k
    b = np.where(np.arange(k * n).reshape(k, n) % 3, -128, 127).astype(np.int8)
    np.testing.assert_array_equal(Q.qgemm(a, b, path=path), ref_int(a, b))
    az = np.array([0, 255, 128, 1, 254, 7, 0, 255, 3], np.uint8)
    np.testing.assert_array_equal(Q.qgemm(a, b, a_zero=az, path=path), ref_int(a, b, az))


def test_zero_points(path, rng):
    a, b = operands(rng, 21, 75, 37)
    for az in (0, 128, 255, np.uint8(3), np.array(77, np.uint8),
               rng.integers(0, 256, 21, dtype=np.uint8),
               rng.integers(-300, 300, 21).astype(np.int32)):
        np.testing.assert_array_equal(Q.qgemm(a, b, a_zero=az, path=path), ref_int(a, b, az))


def test_strided_a(path, rng):
    big = rng.integers(0, 256, (50, 200), dtype=np.uint8)
    a = big[3:40, 5:104]   # row stride 200 > K = 99, and an offset
    b = rng.integers(-128, 128, (99, 70), dtype=np.int8)
    for threads in (1, 2):
        np.testing.assert_array_equal(Q.qgemm(a, b, a_zero=17, threads=threads, path=path),
                                      ref_int(a, b, 17))
    odd = big[::2, ::2]   # no unit inner stride: copied
    b2 = rng.integers(-128, 128, (100, 20), dtype=np.int8)
    np.testing.assert_array_equal(Q.qgemm(odd, b2, path=path), ref_int(odd, b2))


@pytest.mark.parametrize("act", [None, "relu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("threads", [1, 2])
def test_float_epilogue(path, rng, act, threads):
    m, k, n = 37, 150, 70
    a, b = operands(rng, m, k, n)
    az = rng.integers(0, 256, m, dtype=np.uint8)
    rs = (rng.random(m, dtype=np.float32) * 1e-3).astype(np.float32)
    cs = (rng.random(n, dtype=np.float32) * 1e-2).astype(np.float32)
    bias = rng.standard_normal(n, dtype=np.float32)
    res = rng.standard_normal((m, n), dtype=np.float32)
    got = Q.qgemm(a, b, a_zero=az, row_scale=rs, col_scale=cs, bias=bias, activation=act,
                  residual=res, threads=threads, path=path)
    assert got.dtype == np.float32
    want = ref_float(ref_int(a, b, az), rs, cs, bias, act, res)
    np.testing.assert_array_equal(got, want)
    if act in ("gelu", "gelu_tanh"):   # and the float GEMM's maths is gelu's
        y = ref_float(ref_int(a, b, az), rs, cs, bias)
        close = gelu(y.astype(np.float64), "tanh" if act == "gelu_tanh" else "none") + res
        np.testing.assert_allclose(got, close, rtol=1e-5, atol=1e-6)


def test_scales_alone_and_scalar(path, rng):
    a, b = operands(rng, 19, 33, 45)
    acc = ref_int(a, b, 5)
    rs = rng.random(19, dtype=np.float32)
    cs = rng.random(45, dtype=np.float32)
    cases = [dict(row_scale=rs), dict(col_scale=cs), dict(row_scale=np.float32(0.25)),
             dict(col_scale=np.float32(0.125)), dict(row_scale=0.5, col_scale=cs),
             dict(row_scale=rs, col_scale=np.array([0.75], np.float32))]
    for kw in cases:
        got = Q.qgemm(a, b, a_zero=5, path=path, **kw)
        np.testing.assert_array_equal(got, ref_float(acc, **kw), err_msg=str(kw.keys()))


def test_batched_rows(path, rng):
    a, b = operands(rng, 5, 40, 24, batch=(2, 3))
    az = rng.integers(0, 256, 5, dtype=np.uint8)   # per row of the last two dims
    got = Q.qgemm(a, b, a_zero=az, path=path)
    assert got.shape == (2, 3, 5, 24)
    np.testing.assert_array_equal(got, ref_int(a, b, az))
    rs = rng.random(5, dtype=np.float32)
    res = rng.standard_normal(24, dtype=np.float32)   # broadcasts
    got = Q.qgemm(a, b, a_zero=az, row_scale=rs, col_scale=np.float32(0.5), residual=res,
                  activation="relu", path=path)
    want = ref_float(ref_int(a, b, az).reshape(-1, 24), np.tile(rs, 6), np.float32(0.5),
                     None, "relu", res).reshape(2, 3, 5, 24)
    np.testing.assert_array_equal(got, want)


def test_packed_weight_is_int8(path, rng):
    a, b = operands(rng, 12, 70, 50)
    pb = Q.PackedQB(b, path=path)
    assert pb.data.dtype == np.uint8 and pb.shape == (70, 50)
    assert pb.nbytes <= (128 * 64) * 1.0 and pb.kp % (64 if path == "amx" else 4) == 0
    np.testing.assert_array_equal(pb.colsum[:50], b.sum(0, dtype=np.int32))
    assert not pb.colsum[50:].any()
    out = np.empty((12, 50), np.int32)
    Q.qgemm(a, pb, out=out, path=path)
    np.testing.assert_array_equal(out, ref_int(a, b))


@pytest.mark.parametrize("m,k,n", [(20, 96, 40), (64, 128, 40)])   # amx: A copied, in place
def test_bind_and_patch(path, rng, m, k, n):
    a, b = operands(rng, m, k, n)
    az = rng.integers(0, 256, m, dtype=np.uint8)
    rs = rng.random(m, dtype=np.float32)
    bias = rng.standard_normal(n, dtype=np.float32)
    res = rng.standard_normal((m, n), dtype=np.float32)
    out = np.empty((m, n), np.float32)
    cs = rng.random(n, dtype=np.float32)
    run = Q.bind(a, Q.PackedQB(b, path=path), out, a_zero=az, row_scale=rs, col_scale=cs,
                 bias=bias, activation="gelu", residual=res, threads=2, path=path)
    run()
    np.testing.assert_array_equal(out, ref_float(ref_int(a, b, az), rs, cs, bias, "gelu",
                                                 res))
    a2, _ = operands(rng, m, k, n)
    az2 = rng.integers(0, 256, m, dtype=np.uint8)
    rs2, bias2 = rng.random(m, dtype=np.float32), rng.standard_normal(n, dtype=np.float32)
    res2, out2 = rng.standard_normal((m, n), dtype=np.float32), np.empty((m, n), np.float32)
    for role, x in (("a", a2), ("a_zero", az2), ("row_scale", rs2), ("bias", bias2),
                    ("residual", res2), ("out", out2)):
        run.patch(role, x.ctypes.data)
    run.patch("b", 0)   # packed once: ignored
    run()
    np.testing.assert_array_equal(out2, ref_float(ref_int(a2, b, az2), rs2, cs, bias2, "gelu",
                                                  res2))
    with pytest.raises(KeyError):
        run.patch("nonsense", 0)


def test_runtime_library_entry(rng):
    assert runtime.ROLES["matmul_integer"] == ("a", "b")
    a, b = operands(rng, 6, 64, 48)
    az = np.array([9], np.uint8)
    out = np.empty((6, 48), np.int32)
    run = runtime.LIBRARY["matmul_integer"]({}, [a, Q.PackedQB(b)], [out], {"a_zero": az}, 2)
    run()
    np.testing.assert_array_equal(out, ref_int(a, b, 9))
    assert hasattr(run, "patch")
    rs = rng.random(6, dtype=np.float32)
    fout = np.empty((6, 48), np.float32)
    runtime.LIBRARY["matmul_integer"]({}, [a, b], [fout], {"row_scale": rs,
                                                          "activation": "relu"}, 1)()
    np.testing.assert_array_equal(fout, ref_float(ref_int(a, b), rs, act="relu"))


def test_assembly_per_path():
    """The portable module compiles without VNNI (no vpdpbusd, though the host has it);
    the VNNI module uses it, the AVX-VNNI one its VEX form on ymm only, the AMX one
    tdpbusd."""
    portable = jit.assembly(build_module("portable"), Q.features("portable"))
    assert "vpdpbusd" not in portable and "vpmaddubsw" not in portable
    assert "tdpbusd" not in portable
    if Q.path_unavailable_reason("vnni") is None:
        assert "vpdpbusd" in jit.assembly(build_module("vnni"), Q.features("vnni"))
    else:
        print("vnni assembly not checked:", Q.path_unavailable_reason("vnni"))
    if Q.path_unavailable_reason("avxvnni") is None:   # VEX-encoded, 256-bit only
        avx = jit.assembly(build_module("avxvnni"), Q.features("avxvnni"))
        assert "{vex}\tvpdpbusd" in avx and "zmm" not in avx
    else:
        print("avxvnni assembly not checked:", Q.path_unavailable_reason("avxvnni"))
    if "+amx-int8" in jit.target().features:
        assert "tdpbusd" in jit.assembly(build_module("amx"), Q.features("amx"))


def test_paths_and_override(monkeypatch):
    paths = Q.host_paths()
    assert "portable" in paths and Q.default_path() == paths[0]
    monkeypatch.setenv("TENSORC_QGEMM_PATH", "portable")
    assert Q.default_path() == "portable"
    a = np.zeros((2, 8), np.uint8)
    assert Q.bind(a, np.zeros((8, 4), np.int8), np.empty((2, 4), np.int32)).path == "portable"
    monkeypatch.setenv("TENSORC_QGEMM_PATH", "nonsense")
    with pytest.raises(TensorcError, match="unknown path"):
        Q.default_path()


def test_errors(rng):
    a, b = operands(rng, 4, 8, 5)
    with pytest.raises(TensorcError, match="uint8"):
        Q.qgemm(a.astype(np.int8), b)
    with pytest.raises(TensorcError, match="int8"):
        Q.qgemm(a, b.astype(np.int16))
    with pytest.raises(ShapeError, match="inner dims"):
        Q.qgemm(a, b[:7])
    with pytest.raises(TensorcError, match="float result"):
        Q.qgemm(a, b, bias=np.zeros(5, np.float32))
    with pytest.raises(TensorcError, match="out must"):
        Q.qgemm(a, b, out=np.empty((4, 5), np.float32))
    with pytest.raises(ShapeError, match="a_zero"):
        Q.qgemm(a, b, a_zero=np.zeros(3, np.uint8))


def test_empty(path):
    a = np.zeros((0, 8), np.uint8)
    assert Q.qgemm(a, np.zeros((8, 3), np.int8), path=path).shape == (0, 3)
    got = Q.qgemm(np.ones((2, 0), np.uint8), np.zeros((0, 3), np.int8), row_scale=1.0,
                  bias=np.ones(3, np.float32), path=path)
    np.testing.assert_array_equal(got, np.ones((2, 3), np.float32))


def test_bound_unpacked_b_follows_its_contents(path, rng):
    """A B that is not a PackedQB (an activation) is packed again on every call."""
    a, b = operands(rng, 10, 70, 33)
    out = np.empty((10, 33), np.int32)
    run = Q.bind(a, b, out, path=path)
    assert not hasattr(run, "patch")   # the runtime binds it again when B moves
    run()
    np.testing.assert_array_equal(out, ref_int(a, b))
    b[...] = rng.integers(-128, 128, b.shape, dtype=np.int8)
    run()
    np.testing.assert_array_equal(out, ref_int(a, b))


def test_runner_packs_a_const_weight_once_and_follows_moving_operands(rng):
    """A Program's `matmul_integer` Call, as the lowering emits it: the const int8 B is
    a PackedQB made once in Runner.bind; A and a_zero are inputs read in place (their
    moves are followed by patch), the output is a fresh float32 array per call."""
    from tensorc.backends.llvm.runtime import Runner
    from tensorc.backends.lowering import Buf, Call, Program, View
    m, k, n = 6, 40, 24
    w = rng.integers(-128, 128, (k, n), dtype=np.int8)
    cs = rng.random(n, dtype=np.float32)
    a_buf = Buf(m * k, "u8", "input", name="a", numel=m * k)
    z_buf = Buf(m, "u8", "input", name="az", numel=m, offset=256)
    w_buf = Buf(k * n, "i8", "const", data=w, name="w", numel=k * n)
    c_buf = Buf(4 * n, "f32", "const", data=cs, name="cs", numel=n)
    y_buf = Buf(4 * m * n, "f32", "arena", name="y", numel=m * n, offset=512)
    y = View(y_buf, 0, (m, n), (n, 1))
    call = Call("matmul_integer", {}, [View(a_buf, 0, (m, k), (k, 1)),
                                      View(w_buf, 0, (k, n), (n, 1))], [y],
                epilogue={"a_zero": View(z_buf, 0, (m,), (1,)),
                          "col_scale": View(c_buf, 0, (n,), (1,)), "activation": "relu"})
    r = Runner(Program([call], [a_buf, z_buf], [y], [a_buf, z_buf, w_buf, c_buf, y_buf],
                       arena_bytes=4096), threads=2)
    assert isinstance(r._packed[call], Q.PackedQB)
    assert r._patches[a_buf] and r._patches[z_buf] and not r._rebind[a_buf]
    for _ in range(3):
        a = rng.integers(0, 256, (m * k,), dtype=np.uint8)
        az = rng.integers(0, 256, m, dtype=np.uint8)
        (got,) = r.run([a, az])
        want = ref_float(ref_int(a.reshape(m, k), w, az), col_scale=cs, act="relu")
        np.testing.assert_array_equal(got, want)


def test_bound_call_keeps_its_operands_alive(rng):
    """The argument block holds addresses only: the bound call keeps the arrays (a
    caller that drops its own references must not leave the kernel writing freed
    memory)."""
    a, b = operands(rng, 5, 16, 8)
    out = np.empty((2, 5, 8)[1:], np.int32)
    run = Q.bind(a[None], b, out[None])   # temporaries: views made here
    assert any(np.shares_memory(x, a) for x in run.keep if isinstance(x, np.ndarray))
    assert any(np.shares_memory(x, out) for x in run.keep if isinstance(x, np.ndarray))
    run()
    np.testing.assert_array_equal(out, ref_int(a, b))


def test_weight_packed_for_a_register_path_runs_by_default(rng, monkeypatch):
    """A PackedQB padded to 4 k (packed for vnni/portable) cannot feed AMX tiles: the
    default path then falls back to the best register path; forcing amx is an error."""
    monkeypatch.delenv("TENSORC_QGEMM_PATH", raising=False)
    a, b = operands(rng, 40, 70, 30)
    pb = Q.PackedQB(b, path="portable")
    assert pb.kp == 72
    np.testing.assert_array_equal(Q.qgemm(a, pb), ref_int(a, b))
    if Q.path_unavailable_reason("amx") is None:
        with pytest.raises(TensorcError, match="another path"):
            Q.qgemm(a, pb, path="amx")


def test_int32_wraps_as_numpy_cast(path, rng):
    """Past 2^31 the sums wrap modulo 2^32, as the int64 reference cast to int32 does."""
    a, b = operands(rng, 9, 100, 20)
    az = np.full(9, -(1 << 24), np.int32)   # (a - az) * b overflows int32
    want = ref_int(a, b, az)
    assert np.abs((a.astype(np.int64) + (1 << 24)) @ b.astype(np.int64)).max() > 1 << 31
    np.testing.assert_array_equal(Q.qgemm(a, b, a_zero=az, path=path), want)


def test_bound_operands_that_are_not_rows(path, rng):
    """A (batched, transposed leading dims, or strided along k) and out that do not
    flatten to rows are copied in and out on each call (and the call has no patch)."""
    x = rng.integers(0, 256, (4, 3, 50), dtype=np.uint8)
    a = x.transpose(1, 0, 2)            # [3, 4, 50]: leading dims do not flatten
    b = rng.integers(-128, 128, (50, 20), dtype=np.int8)
    out = np.zeros((4, 3, 20), np.int32).transpose(1, 0, 2)
    run = Q.bind(a, Q.PackedQB(b), out, a_zero=3, path=path)
    assert not hasattr(run, "patch")
    run()
    np.testing.assert_array_equal(out, ref_int(a, b, 3))
    x[...] = rng.integers(0, 256, x.shape, dtype=np.uint8)   # read again on each call
    run()
    np.testing.assert_array_equal(out, ref_int(a, b, 3))
    strided = rng.integers(0, 256, (7, 100), dtype=np.uint8)[:, ::2]
    o2 = np.empty((7, 20), np.int32)
    Q.bind(strided, b, o2, path=path)()
    np.testing.assert_array_equal(o2, ref_int(strided, b))
