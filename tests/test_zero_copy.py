"""Zero-copy calls on the llvm backend: inputs read where the caller keeps them (unless a
step writes their buffer, or their layout does not allow it), outputs computed straight
into fresh arrays or the caller's `out=` arrays, the per-signature fast path, and the
library calls' address patching (`gemm.bind`, `attention.bind`)."""

from __future__ import annotations

import re
import threading

import numpy as np
import pytest

import tensorc
import tensorc.models
from tensorc.backends import get_backend
from tensorc.backends.llvm import attention as A
from tensorc.backends.llvm import gemm as G
from tensorc.backends.llvm.runtime import Runner
from tensorc.backends.lowering import Buf, Call, Program, View
from tensorc.errors import InputError
from tensorc.ir import Graph, TensorType


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORC_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def mlp(m=5, k=7, n=9):
    """y = relu(x @ w + b) * s: a GEMM with an epilogue, then an elementwise kernel."""
    g = Graph("mlp")
    x = g.add_input("x", TensorType((m, k), "f32"))
    s = g.add_input("s", TensorType((m, n), "f32"))
    rng = np.random.default_rng(1)
    w = g.add_constant("w", rng.standard_normal((k, n)).astype(np.float32))
    b = g.add_constant("b", rng.standard_normal(n).astype(np.float32))
    h = g.add("relu", g.add("add", g.add("matmul", x, w), b))
    g.outputs = [g.add("mul", h, s)]
    return g


def runner(exe) -> Runner:
    (r,) = exe._runners.values()
    return r


def compiled(g, passes="O2"):
    return tensorc.compile(g, "llvm", passes=passes)


def test_results_equal_the_reference_on_random_inputs(rng):
    g = mlp()
    exe, ref = compiled(g), tensorc.compile(g, "numpy")
    for _ in range(3):
        feeds = {"x": rng.standard_normal((5, 7), np.float32),
                 "s": rng.standard_normal((5, 9), np.float32)}
        np.testing.assert_allclose(exe(**feeds), ref(**feeds), rtol=1e-5, atol=1e-5)


def test_inputs_are_read_in_place_and_left_alone(rng):
    exe = compiled(mlp())
    x = rng.standard_normal((5, 7), np.float32)
    s = rng.standard_normal((5, 9), np.float32)
    before = x.copy(), s.copy()
    exe(x, s)
    r = runner(exe)
    assert all(r.in_place)
    # the buffers point at the caller's arrays, not at the arena: nothing was copied
    assert [r._addr[b] for b in r.program.inputs] == [x.ctypes.data, s.ctypes.data]
    np.testing.assert_array_equal(x, before[0])
    np.testing.assert_array_equal(s, before[1])


def test_inputs_that_cannot_be_read_in_place_are_copied(rng):
    """Non-contiguous, misaligned, read-only and not-owned inputs all give the right
    results (the first two through a copy into the arena)."""
    exe, ref = compiled(mlp()), tensorc.compile(mlp(), "numpy")
    want = lambda x, s: ref(x, s)  # noqa: E731
    x = rng.standard_normal((5, 14), np.float32)[:, ::2]             # not contiguous
    raw = np.zeros(5 * 9 * 4 + 1, np.uint8)
    s = np.frombuffer(raw.data, np.uint8, 5 * 9 * 4, offset=1).view(np.float32).reshape(5, 9)
    s[...] = rng.standard_normal((5, 9))                             # misaligned
    assert not s.flags.aligned and not x.flags.c_contiguous
    np.testing.assert_allclose(exe(x, s), want(x, s), rtol=1e-5, atol=1e-5)
    r = runner(exe)
    assert r._addr[r.program.inputs[0]] != x.ctypes.data
    x2, s2 = np.ascontiguousarray(x), np.ascontiguousarray(s)
    x2.flags.writeable = s2.flags.writeable = False                  # read-only: in place
    np.testing.assert_allclose(exe(x2, s2), want(x2, s2), rtol=1e-5, atol=1e-5)
    assert r._addr[r.program.inputs[0]] == x2.ctypes.data


def test_a_read_only_matmul_operand_is_not_taken_for_a_weight(rng):
    """A read-only input B is read on every call (only constants are packed once)."""
    g = Graph("mm")
    a = g.add_input("a", TensorType((4, 6), "f32"))
    b = g.add_input("b", TensorType((6, 40), "f32"))
    g.outputs = [g.add("matmul", a, b)]
    exe = compiled(g)
    av = rng.standard_normal((4, 6), np.float32)
    for _ in range(2):
        bv = rng.standard_normal((6, 40), np.float32)
        bv.flags.writeable = False
        np.testing.assert_allclose(exe(av, bv), av @ bv, rtol=1e-5, atol=1e-5)


def test_an_input_a_step_writes_into_is_copied(rng):
    """The zero-copy rule: a buffer some step writes is never the caller's array."""
    x = Buf(4 * 6, "f32", "input", name="x", numel=6)
    y = Buf(4 * 6, "f32", "arena", name="y", numel=6, offset=64)
    xv, yv = View(x, 0, (6,), (1,)), View(y, 0, (6,), (1,))
    steps = [Call("relu", {}, [xv], [xv], fallback=True),     # updates its input in place
             Call("neg", {}, [xv], [yv], fallback=True)]
    r = Runner(Program(steps, [x], [yv], [x, y], arena_bytes=128))
    assert r.in_place == [False]
    a = np.array([-1, 2, -3, 4, -5, 6], np.float32)
    before = a.copy()
    (got,) = r.run([a])
    np.testing.assert_array_equal(got, -np.maximum(before, 0))
    np.testing.assert_array_equal(a, before)


def test_outputs_are_fresh_arrays(rng):
    exe = compiled(mlp())
    x = rng.standard_normal((5, 7), np.float32)
    s = rng.standard_normal((5, 9), np.float32)
    y1 = exe(x, s)
    want = y1.copy()
    y1[...] = 123.0                       # the caller owns it: the next call is unaffected
    y2 = exe(x, s)
    assert y2 is not y1 and not np.may_share_memory(y1, y2)
    np.testing.assert_array_equal(y2, want)
    r = runner(exe)
    assert not np.may_share_memory(y2, r.arena) and y2.flags.owndata
    assert np.all(y1 == 123.0)            # and not written again
    assert r._addr[r.program.outputs[0].buf] == y2.ctypes.data   # computed in place


def test_out_arrays_are_written_and_returned(rng):
    g = mlp()
    exe = compiled(g)
    x = rng.standard_normal((5, 7), np.float32)
    s = rng.standard_normal((5, 9), np.float32)
    name = exe.output_names[0]
    out = np.full((5, 9), np.nan, np.float32)
    got = exe.run({"x": x, "s": s}, out={name: out})[name]
    assert got is out
    np.testing.assert_allclose(out, exe(x, s), rtol=1e-6)
    numpy_out = np.empty((5, 9), np.float32)   # the numpy backend takes out= too
    got = tensorc.compile(g, "numpy").run({"x": x, "s": s}, out={name: numpy_out})[name]
    assert got is numpy_out
    np.testing.assert_allclose(numpy_out, out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad, message", [
    (np.empty((5, 9), np.float64), "expected a writeable C-contiguous f32[5,9]"),
    (np.empty((5, 8), np.float32), "got float32[5, 8]"),
    (np.empty((9, 5), np.float32).T, "not C-contiguous"),
    ("readonly", "read-only"),
    ([[0.0] * 9] * 5, "expected a numpy array, got list"),
])
def test_out_arrays_are_checked(rng, bad, message):
    exe = compiled(mlp())
    if isinstance(bad, str):
        bad = np.empty((5, 9), np.float32)
        bad.flags.writeable = False
    feeds = {"x": np.zeros((5, 7), np.float32), "s": np.zeros((5, 9), np.float32)}
    with pytest.raises(InputError, match=re.escape(message)) as e:
        exe.run(feeds, out={exe.output_names[0]: bad})
    assert "\n" not in str(e.value)
    with pytest.raises(InputError, match="unknown outputs"):
        exe.run(feeds, out={"nope": np.empty((5, 9), np.float32)})
    with pytest.raises(InputError, match="out must be a dict"):
        exe.run(feeds, out=[np.empty((5, 9), np.float32)])


def test_an_out_array_that_is_also_an_input(rng):
    """y = relu(x @ w + b) * s into s itself: s is read after y is written, so the
    result is computed aside and copied in."""
    exe = compiled(mlp())
    x = rng.standard_normal((5, 7), np.float32)
    s = rng.standard_normal((5, 9), np.float32)
    want = exe(x, s)
    got = exe.run({"x": x, "s": s}, out={exe.output_names[0]: s})[exe.output_names[0]]
    assert got is s
    np.testing.assert_allclose(s, want, rtol=1e-6)


def test_the_out_overlap_test_is_may_share_memorys(rng):
    """`_Spans` (the runtime's overlap test for `out` arrays, O(log n) a test) answers as
    np.may_share_memory's bounds test over the inputs and the `out` arrays taken before,
    on views of one base: strided, reversed, empty, overlapping, disjoint."""
    from tensorc.backends.llvm.runtime import _Spans
    base = np.zeros(400, np.float32)
    for _ in range(200):
        views = []
        for _ in range(rng.integers(1, 8)):
            lo, n = int(rng.integers(0, 400)), int(rng.integers(0, 40))
            step = int(rng.choice([1, 1, 2, -1]))
            views.append(base[lo:lo + n:step] if step > 0 else base[lo:max(lo - n, 0):step])
        arrays, outs = views[:len(views) // 2 + 1], views[len(views) // 2 + 1:]
        donated = arrays[0] if rng.random() < 0.5 else None
        spans, taken = _Spans(arrays), []
        for o in outs:
            want = any(np.may_share_memory(o, x) for x in [*arrays, *taken]
                       if x is not donated)
            assert spans.overlaps(o, donated) == want
            if not want:
                spans.add(o)
                taken.append(o)


def test_many_out_arrays_one_call(rng):
    """Hundreds of outputs written into the caller's arrays, one of them an input (computed
    aside), others fresh: the overlap test per output is not a pass over every array."""
    g = Graph("many")
    xs = [g.add_input(f"x{i}", TensorType((3,), "f32")) for i in range(300)]
    g.outputs = [g.add("mul", x, x) for x in xs]
    exe = compiled(g)
    feeds = {f"x{i}": rng.standard_normal(3, np.float32) for i in range(300)}
    want = {f"x{i}": feeds[f"x{i}"] ** 2 for i in range(300)}
    out = {n: np.empty(3, np.float32) for n in exe.output_names}
    out[exe.output_names[7]] = feeds["x7"]
    got = exe.run(feeds, out=out)
    for i, n in enumerate(exe.output_names):
        assert got[n] is out[n]
        np.testing.assert_allclose(got[n], want[f"x{i}"], rtol=1e-6)


def in_place_cases():
    """name -> (graph, the outputs' in-place inputs by name, as `Program.in_place` lists)."""
    cases = {}
    g = Graph("axpy")   # elementwise: y may be written over x or over a
    x = g.add_input("x", TensorType((33, 17), "f32"))
    a = g.add_input("a", TensorType((33, 17), "f32"))
    g.outputs = [g.add("add", g.add("mul", x, x), a)]
    cases["elementwise"] = (g, {0: ["x", "a"]})
    g = Graph("transposed")   # y[i, j] reads x[j, i]: not element for element
    x = g.add_input("x", TensorType((16, 16), "f32"))
    g.outputs = [g.add("add", x, g.add("transpose", x, perm=(1, 0)))]
    cases["transposed"] = (g, {})
    g = Graph("later")   # x is read again after the first output's kernel
    x = g.add_input("x", TensorType((40,), "f32"))
    y1 = g.add("mul", x, x)
    g.outputs = [y1, g.add("add", g.add("exp", x), y1)]
    cases["read later"] = (g, {1: ["x"]})
    g = Graph("centred")   # a reduction reads x first; the last kernel is elementwise
    x = g.add_input("x", TensorType((8, 50), "f32"))
    mean = g.add("reduce_mean", x, axes=(1,), keepdims=True)
    g.outputs = [g.add("sub", x, mean)]
    cases["after a reduction"] = (g, {0: ["x"]})
    g = Graph("broadcast")   # b is smaller: read at another index than written
    x = g.add_input("x", TensorType((6, 10), "f32"))
    b = g.add_input("b", TensorType((10,), "f32"))
    g.outputs = [g.add("mul", x, b)]
    cases["broadcast"] = (g, {0: ["x"]})
    return cases


@pytest.mark.parametrize("case", list(in_place_cases()))
def test_in_place_updates(rng, monkeypatch, case):
    """`Program.in_place`: an output whose one kernel reads an input only at the element it
    writes, and nothing reads that input later, may be given that input as its `out`; it
    is then updated in place (no fresh array); any other input given as `out` is
    computed aside. Results equal the reference either way."""
    from tensorc.backends.llvm import runtime
    g, want = in_place_cases()[case]
    exe = compiled(g)
    feeds = {v.name: rng.standard_normal(v.type.shape).astype(np.float32)
             for v in g.inputs}
    ref = get_backend("numpy").compile(g).run(feeds)
    program = exe.program()
    assert {i: [b.name for b in bufs] for i, bufs in program.in_place.items()} == want
    for i, name in enumerate(exe.output_names):
        for inp, arr in feeds.items():
            if arr.shape != ref[name].shape:
                continue
            fresh = {k: v.copy() for k, v in feeds.items()}
            target = fresh[inp]
            donated = inp in want.get(i, [])
            if donated:   # computed straight into the input: no array of its own
                monkeypatch.setattr(runtime.np, "empty", None)
            out = {o: np.empty_like(ref[o]) for o in ref}   # every output given one
            out[name] = target
            got = exe.run(fresh, out=out)
            monkeypatch.undo()
            assert got[name] is target
            np.testing.assert_allclose(target, ref[name], rtol=1e-6, atol=1e-6,
                                       err_msg=f"{name} over {inp}")
            for other in ref:
                if other != name:
                    np.testing.assert_allclose(got[other], ref[other], rtol=1e-6, atol=1e-6)


def aliasing_graph():
    """Outputs that alias an input, a constant, views, each other, a part of a buffer,
    and a buffer later steps read."""
    g = Graph("alias")
    x = g.add_input("x", TensorType((4, 6), "f32"))
    w = g.add_constant("w", np.arange(6 * 8, dtype=np.float32).reshape(6, 8) / 10)
    y = g.add("matmul", x, w)                                 # [4, 8], a library call
    z = g.add("relu", y)                                      # reads y after it is written
    g.outputs = [x,                                           # the input itself
                 w,                                           # a weight
                 g.add("transpose", x, perm=(1, 0)),          # a view of the input
                 g.add("transpose", y, perm=(1, 0)),          # a view of an intermediate
                 y, z, y,                                     # y twice, and read by z
                 g.add("slice", y, starts=(0,), ends=(2,), axes=(0,))]   # a part of y
    return g


@pytest.mark.parametrize("passes", ["O0", "O2"])
def test_outputs_that_alias_inputs_constants_and_views(rng, passes):
    g = aliasing_graph()
    exe, ref = compiled(g, passes), tensorc.compile(g, "numpy")
    x = rng.standard_normal((4, 6), np.float32)
    xc = x.copy()
    want = ref(x)
    got = exe(x)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    for i, a in enumerate(got):   # every output is an array of its own
        assert a.flags.c_contiguous and a.flags.writeable
        assert not np.may_share_memory(a, x) and not np.may_share_memory(a, runner(exe).arena)
        assert all(not np.may_share_memory(a, b) for b in got[i + 1:])
    assert not np.may_share_memory(got[1], g.constants["w"].data)
    for a in got:
        a[...] = -7.0                       # the caller's to change: nothing else moves
    np.testing.assert_array_equal(x, xc)
    for a, b in zip(exe(x), want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    outs = {n: np.empty(a.shape, a.dtype) for n, a in zip(exe.output_names, want, strict=True)}
    res = exe.run({"x": x}, out=outs)
    for n, b in zip(exe.output_names, want, strict=True):
        assert res[n] is outs[n]
        np.testing.assert_allclose(outs[n], b, rtol=1e-5, atol=1e-5)


def test_two_threads_share_one_executable(rng):
    g = mlp(m=33, k=64, n=96)
    exe, ref = compiled(g), tensorc.compile(g, "numpy")
    cases = [(rng.standard_normal((33, 64), np.float32), rng.standard_normal((33, 96),
              np.float32)) for _ in range(4)]
    wants = [ref(*c) for c in cases]
    errors = []

    def work(t):
        try:
            for i in range(60):
                j = (i + t) % len(cases)
                got = exe(*cases[j])
                if not np.allclose(got, wants[j], rtol=1e-4, atol=1e-4):
                    errors.append((t, i))
        except Exception as e:   # noqa: BLE001 (reported below)
            errors.append(e)
    threads = [threading.Thread(target=work, args=(t,)) for t in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_a_known_signature_skips_the_checks(rng, monkeypatch):
    exe = compiled(mlp())
    x = rng.standard_normal((5, 7), np.float32)
    s = rng.standard_normal((5, 9), np.float32)
    want = exe(x, s)
    import tensorc.backends as B
    calls = []
    real = B.bind_shapes
    monkeypatch.setattr(B, "bind_shapes", lambda *a: calls.append(a) or real(*a))
    np.testing.assert_array_equal(exe(x, s), want)
    np.testing.assert_array_equal(exe.run({"x": x, "s": s})[exe.output_names[0]], want)
    np.testing.assert_array_equal(exe(x, np.asfortranarray(s)), want)   # same signature
    assert calls == []
    np.testing.assert_array_equal(exe(x, memoryview(s)), want)   # not an ndarray: checked
    assert len(calls) == 1
    with pytest.raises(InputError, match="input 's'"):   # a new signature: checked
        exe(x, s.astype(np.float64))


def test_symbolic_sizes_bind_per_signature(rng):
    model = tensorc.models.get("gpt", "tiny")
    g = tensorc.trace(model, input_ids=tensorc.TensorSpec(("batch", "seq"), "i64"))
    exe, ref = compiled(g), tensorc.compile(g, "numpy")
    for seq in (16, 5, 16, 9):
        ids = rng.integers(0, 97, (1, seq))
        np.testing.assert_allclose(exe(ids), ref(ids), rtol=1e-4, atol=1e-4)
    assert len(exe._runners) == 3 and len(exe._bound) == 3


def test_gpt_tiny_matches_the_reference_call_after_call(rng):
    model = tensorc.models.get("gpt", "tiny")
    feeds = model.example_inputs(batch=1, seq=16)
    g = tensorc.trace(model, **feeds)
    exe, ref = compiled(g), tensorc.compile(g, "numpy")
    for _ in range(3):
        ids = rng.integers(0, 97, (1, 16))
        np.testing.assert_allclose(exe(ids), ref(ids), rtol=1e-4, atol=1e-4)
    with pytest.raises(Exception, match="out of range"):   # the index check follows too
        exe(np.full((1, 16), 500))


# -- library calls: operands patched to other memory --------------------------------

@pytest.mark.parametrize("m, k, n, weight", [(3, 5, 40, True), (16, 64, 97, False),
                                             (128, 512, 256, True), (128, 256, 512, False)])
def test_gemm_bind_patch_moves_operands(rng, m, k, n, weight):
    def arrays():
        return (rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32),
                rng.standard_normal(n).astype(np.float32),
                rng.standard_normal((m, n), np.float32), np.empty((m, n), np.float32))
    a, b, bias, res, out = arrays()
    run = G.bind(a, G.PackedB(b) if weight else b, out, bias=bias, activation="relu",
                 residual=res, threads=2)
    run()
    np.testing.assert_allclose(out, np.maximum(a @ b + bias, 0) + res, rtol=1e-4, atol=1e-4)
    a2, b2, bias2, res2, out2 = arrays()
    for role, x in (("a", a2), ("out", out2), ("bias", bias2), ("residual", res2)) + \
            (() if weight else (("b", b2),)):
        run.patch(role, x.ctypes.data)
    run()
    want_b = b if weight else b2
    np.testing.assert_allclose(out2, np.maximum(a2 @ want_b + bias2, 0) + res2,
                               rtol=1e-4, atol=1e-4)


def test_gemm_bind_packs_a_transposed_b_per_call(rng):
    a = rng.standard_normal((6, 8), np.float32)
    bt = rng.standard_normal((50, 8), np.float32)
    out = np.empty((6, 50), np.float32)
    run = G.bind(a, bt.T, out)
    assert hasattr(run, "patch")
    run()
    np.testing.assert_allclose(out, a @ bt.T, rtol=1e-5, atol=1e-5)
    bt[...] = rng.standard_normal((50, 8))
    run()
    np.testing.assert_allclose(out, a @ bt.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
def test_attention_bind_patch_moves_operands(rng, threads):
    def arrays():
        return [rng.standard_normal((1, 4, 32, 16), np.float32) for _ in range(3)] + \
            [np.empty((1, 4, 32, 16), np.float32)]
    q, k, v, out = arrays()
    run = A.bind(q, k, v, None, 0.25, True, threads=threads, out=out)
    run()
    np.testing.assert_allclose(out, A.attention(q, k, v, None, 0.25, True), rtol=1e-5,
                               atol=1e-5)
    q2, k2, v2, out2 = arrays()
    for role, x in zip(("q", "k", "v", "out"), (q2, k2, v2, out2), strict=True):
        run.patch(role, x.ctypes.data)
    run()
    np.testing.assert_allclose(out2, A.attention(q2, k2, v2, None, 0.25, True), rtol=1e-5,
                               atol=1e-5)


def test_other_backends_still_run():
    g = mlp()
    feeds = {"x": np.ones((5, 7), np.float32), "s": np.ones((5, 9), np.float32)}
    want = tensorc.compile(g, "numpy")(**feeds)
    np.testing.assert_allclose(get_backend("llvm").compile(g)(**feeds), want, rtol=1e-5)


def test_inputs_by_name_take_the_fast_path_and_keep_their_errors(rng):
    exe = compiled(mlp())
    x = rng.standard_normal((5, 7), np.float32)
    s = rng.standard_normal((5, 9), np.float32)
    want = exe(x, s)
    np.testing.assert_array_equal(exe(s=s, x=x), want)
    with pytest.raises(InputError, match="unknown"):
        exe(x=x, t=s)
    with pytest.raises(InputError, match="missing"):
        exe(x=x)
    g = Graph("noinput")
    g.outputs = [g.add_constant("c", np.ones(3, np.float32))]
    exe = compiled(g)
    np.testing.assert_array_equal(exe(), np.ones(3, np.float32))
    with pytest.raises(InputError, match="unknown"):
        exe(c=np.ones(3, np.float32))


def test_a_reference_fallback_follows_moving_inputs_and_outputs(rng):
    """A grouped conv runs its numpy reference: its views are made again when the
    input and output buffers move."""
    g = Graph("t")
    ins = [g.add_input("x", TensorType((1, 4, 9, 9), "f32")),
           g.add_input("w", TensorType((4, 2, 3, 3), "f32"))]
    g.outputs = g.add_node("conv2d", ins, {"group": 2})
    exe, ref = get_backend("llvm").compile(g), tensorc.compile(g, "numpy")
    outs = []
    for _ in range(3):
        x = rng.standard_normal((1, 4, 9, 9), np.float32)
        w = rng.standard_normal((4, 2, 3, 3), np.float32)
        outs.append(exe(x, w))
        np.testing.assert_allclose(outs[-1], ref(x, w), rtol=1e-5, atol=1e-5)
    assert not np.may_share_memory(outs[0], outs[1])
