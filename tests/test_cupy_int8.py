"""The cupy backend's 8-bit integer GEMM (`matmul_integer`, a hand-written `__dp4a`
kernel in backends/cupy/kernels.py): it compiles with nvcc for sm_80 and sm_90, and on
the CPU emulator (emulate.py, whose `__dp4a` is a byte-by-byte shim with the hardware's
wrapping sum) it equals the numpy reference bit for bit, alone and inside the backend's
executable (a quantized model included)."""

import shutil
import subprocess

import numpy as np
import pytest

import tensorc
from tensorc.backends import get_backend
from tensorc.backends import lowering as L
from tensorc.backends.cupy import LOWERING, CupyBackend
from tensorc.backends.cupy import kernels as K
from tensorc.backends.cupy.emulate import EmulatedModule, EmulatedRuntime, host_compiler
from tensorc.ops.quant import matmul_integer_ref

needs_emulator = pytest.mark.skipif(host_compiler() is None, reason="g++ not installed: the "
                                    "CUDA emulator needs a C++20 host compiler")
RANGE = {np.uint8: (0, 256), np.int8: (-128, 128)}
rng = np.random.default_rng(11)


def _rand(shape, dtype):
    return rng.integers(*RANGE[dtype], shape).astype(dtype)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_int8_gemm_compiles_with_nvcc(arch, tmp_path):
    src = tmp_path / "mi.cu"
    src.write_text(K.matmul_integer_kernel().source)
    out = tmp_path / f"mi.{arch}.ptx"
    proc = subprocess.run(["nvcc", "-ptx", f"-arch={arch}", "-std=c++17", str(src), "-o",
                           str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ptx = out.read_text()
    assert ".entry tc_matmul_integer" in ptx and "dp4a.s32.s32" in ptx


@pytest.fixture(scope="module")
def module():
    k = K.matmul_integer_kernel()
    return EmulatedModule(k.source, {k.name: k.params})


CASES = [   # (batch, m, k, n, A dtype, B dtype, zero points)
    (1, 5, 7, 3, np.uint8, np.int8, "both"),
    (2, 70, 37, 67, np.int8, np.int8, "rows"),       # two tiles each way, k % 16 != 0
    (1, 33, 64, 17, np.uint8, np.uint8, "none"),
    (3, 1, 16, 65, np.int8, np.uint8, "b"),
]


@needs_emulator
@pytest.mark.parametrize("z,m,k,n,da,db,zps", CASES)
def test_int8_gemm_on_emulator_is_exact(module, z, m, k, n, da, db, zps):
    a, b = _rand((z, m, k), da), _rand((z, k, n), db)
    a.flat[:k], b.flat[:n] = RANGE[da][0], RANGE[db][1] - 1   # extremes
    za = _rand((z, m, 1) if zps in ("both", "rows") else (1, 1, 1), da) \
        if zps != "none" and zps != "b" else None
    zb = _rand((1, 1, n), db) if zps in ("both", "b") else None
    c = np.full((z, m, n), 7, np.int32)
    zb_arg = np.broadcast_to(zb, (z, 1, n)) if zb is not None else None
    za_arg = np.broadcast_to(za, (z, m, 1)) if za is not None else None
    launch = K.matmul_integer_launch(a, b, za_arg, zb_arg, c)
    module.launch(launch.kernel.name, launch.grid, launch.block, launch.args)
    np.testing.assert_array_equal(c, matmul_integer_ref(a, b, za, zb))


@needs_emulator
def test_int8_gemm_wraps_like_the_reference(module):
    """Past 2**31 the i32 result wraps modulo 2**32, as the reference's int32 does."""
    k = 4 * 16 * 2200   # 140800 products of 255 * (-128 - 127): -9.2e9, past -2**31
    a = np.full((1, 1, k), 255, np.uint8)
    b = np.full((1, k, 1), -128, np.int8)
    za, zb = np.zeros((1, 1, 1), np.uint8), np.array([[[127]]], np.int8)
    c = np.zeros((1, 1, 1), np.int32)
    launch = K.matmul_integer_launch(a, b, za, zb, c)
    module.launch(launch.kernel.name, launch.grid, launch.block, launch.args)
    want = matmul_integer_ref(a, b, za, zb)
    assert abs(int(k) * 255 * 255) > 2**31
    np.testing.assert_array_equal(c, want)


def _graph():
    T = tensorc.TensorType
    g = tensorc.Graph("mi")
    a = g.add_input("a", T(("batch", 5, 24), "u8"))
    b = g.add_constant("b", _rand((24, 7), np.int8))
    za = g.add_input("za", T((5, 1), "u8"))
    zb = g.add_constant("zb", _rand((7,), np.int8))
    g.outputs += [g.add("matmul_integer", a, b, za, zb), g.add("matmul_integer", a, b),
                  g.add("matmul_integer", g.add("transpose", a, perm=[0, 2, 1]), a)]
    feeds = {"a": _rand((3, 5, 24), np.uint8), "za": _rand((5, 1), np.uint8)}
    return g, feeds


def test_cupy_lowering_calls_the_kernel():
    """cupy lowers matmul_integer to the library call; without `int8_gemm` (llvm) it is
    the decomposition's generated kernels."""
    g, _ = _graph()
    calls = [s.op for s in L.lower(g, {"batch": 3}, **LOWERING).steps
             if isinstance(s, L.Call)]
    assert calls == ["matmul_integer"] * 3
    assert not any(isinstance(s, L.Call) for s in L.lower(g, {"batch": 3}).steps)


@needs_emulator
def test_executable_on_emulator_is_exact():
    g, feeds = _graph()
    want = get_backend("numpy").compile(g)(**feeds)
    runtime = EmulatedRuntime()
    exe = CupyBackend().compile(g, runtime=runtime)
    got = exe(**feeds)
    assert exe.stats["fallbacks"] == [] and runtime.launches == 3
    for x, w in zip(got, want, strict=True):
        assert x.dtype == np.int32
        np.testing.assert_array_equal(x, w)


@needs_emulator
def test_dynamically_quantized_models_on_emulator_match(tmp_path):
    """Models quantized by ORT's quantize_dynamic (per channel, s8 weights), imported and
    run by the cupy executable (emulated). The conv net of test_onnx_quant.py quantizes
    its input directly: every value equals numpy's bit for bit. In gpt (batch 1, 8
    tokens: emulated threads are slow) the activations are quantized after a layer norm
    whose generated CUDA kernel differs from numpy in the last bits, which can move a
    value across a rounding boundary, so there each DynamicQuantizeLinear and
    MatMulInteger node is fed ORT's values for its inputs and must give ORT's output."""
    oq = pytest.importorskip("onnxruntime.quantization")
    import onnx
    import test_onnx_quant as tq

    from tensorc.frontend import onnx as tx

    def cupy(model, feeds):
        exe = CupyBackend().compile(tx.from_model(model), runtime=EmulatedRuntime())
        out = exe(**feeds)
        assert exe.stats["fallbacks"] == []
        return out if isinstance(out, tuple) else (out,)

    def quantize(model, name):
        src, dst = tmp_path / f"{name}.onnx", tmp_path / f"{name}_q.onnx"
        onnx.save(model, src)
        oq.quantize_dynamic(str(src), str(dst), per_channel=True,
                            weight_type=oq.QuantType.QInt8)
        return onnx.load(dst)

    model, feeds = tq._convnet()
    q = quantize(model, "convnet")
    full = tq._with_outputs(q, tq._integer_values(q))
    want = get_backend("numpy").compile(tx.from_model(full))(**feeds[0])
    for x, w in zip(cupy(full, feeds[0]), want, strict=True):
        np.testing.assert_array_equal(x, w)

    gpt = tensorc.models.get("gpt")
    feeds = gpt.example_inputs(batch=1, seq=8)
    q = quantize(tx.to_model(tensorc.trace(gpt, **feeds)), "gpt")
    every = [o for n in q.graph.node for o in n.output if o]
    values = {**feeds, **tq._ort(tq._with_outputs(q, every), feeds)}
    nodes = [n for n in q.graph.node if n.op_type in ("DynamicQuantizeLinear",
                                                      "MatMulInteger")]
    assert len(nodes) > 10
    for node in nodes:
        one, node_feeds = tq._node_model(q, node, values)
        for o, x in zip([o for o in node.output if o], cupy(one, node_feeds), strict=True):
            np.testing.assert_array_equal(x, values[o], err_msg=f"{node.op_type} {o}")


def _gpu_reason():
    from tensorc.backends.cupy import unavailable_reason
    return unavailable_reason()


@pytest.mark.skipif(_gpu_reason() is not None, reason=f"GPU tests: {_gpu_reason()}")
def test_gpu_matmul_integer_matches_numpy():
    """On a real GPU (tools/gpu_check.sh runs tests named *gpu*): the __dp4a kernel,
    inside the executable and its CUDA graph, equals numpy bit for bit, with a shape
    of several tiles and a K that is not a multiple of 16."""
    g, feeds = _graph()
    big = tensorc.Graph("mi_big")
    a = big.add_input("a", tensorc.TensorType((300, 200), "i8"))
    b = big.add_constant("b", _rand((200, 130), np.int8))
    zb = big.add_constant("zb", _rand((130,), np.int8))
    big.outputs += [big.add("matmul_integer", a, b, big.add_constant(
        "za", np.int8(-3)), zb)]
    for graph, f in ((g, feeds), (big, {"a": _rand((300, 200), np.int8)})):
        want = get_backend("numpy").compile(graph)(**f)
        exe = get_backend("cupy").compile(graph)
        for _ in range(2):   # eager, then the captured graph's replay
            got = exe(**f)
            for x, w in zip(got if isinstance(got, tuple) else (got,),
                            want if isinstance(want, tuple) else (want,), strict=True):
                np.testing.assert_array_equal(x, w)
