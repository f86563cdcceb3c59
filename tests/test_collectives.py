"""Collectives in compiled graphs: each op on thread meshes of 2, 3 and 4 ranks, run by
the numpy and llvm executables (llvm: a library call, not a fallback), against numpy
formulas over every rank's input; their gradient rules across ranks; `comm_bytes`
against the ring formulas; llvm executables compiled by several threads at once."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from ml_dtypes import bfloat16 as BF16

from tensorc.backends import get_backend
from tensorc.errors import TensorcError
from tensorc.ir import Graph, TensorType
from tensorc.mesh import Mesh
from tensorc.ops.collective import comm_bytes
from tensorc.parallel.comm import run_threads
from tensorc.passes.autodiff import grad

BACKENDS = ["numpy", "llvm"]
SHAPE = (12, 12)   # per rank: splits 2, 3 and 4 ways


def rank_input(rank: int, shape=SHAPE, seed=0) -> np.ndarray:
    return np.random.default_rng([seed, rank]).uniform(-2, 2, shape).astype(np.float32)


def collective_graph(op: str, attrs: dict, shape=SHAPE) -> Graph:
    """y = op(2 x) + 1: generated kernels on both sides of the collective, so on llvm its
    buffers come from and go to the arena."""
    g = Graph(op)
    x = g.add_input("x", TensorType(shape, "f32"))
    (y,) = g.add_node(op, [g.add("mul", x, g.add_constant("two", np.float32(2)))], attrs)
    g.outputs = [g.add("add", y, g.add_constant("one", np.float32(1)))]
    return g


def expected(op: str, attrs: dict, xs: list[np.ndarray], rank: int) -> np.ndarray:
    """The formula, written with numpy on all the ranks' inputs."""
    ys = [2 * x for x in xs]
    if op == "all_reduce":
        out = {"sum": np.sum, "max": np.max, "min": np.min}[attrs.get("op", "sum")](ys, axis=0)
    elif op == "all_gather":
        out = np.concatenate(ys, axis=attrs["dim"])
    elif op == "reduce_scatter":
        out = np.array_split(np.sum(ys, axis=0), len(xs), axis=attrs["dim"])[rank]
    elif op == "broadcast":
        out = ys[attrs.get("root", 0)]
    return out + 1


CASES = [("all_reduce", {}), ("all_reduce", {"op": "max"}), ("all_gather", {"dim": 1}),
         ("all_gather", {"dim": 0}), ("reduce_scatter", {"dim": 0}),
         ("reduce_scatter", {"dim": -1}), ("broadcast", {"root": 1})]


def run_mesh(mesh: Mesh, graph_for, inputs, backend: str):
    """Each rank compiles its graph (graph_for(rank)) and runs it on inputs[rank]."""
    def rank_fn(groups):
        exe = get_backend(backend).compile(graph_for(groups.rank))
        return exe(inputs[groups.rank]), exe
    return run_threads(mesh, rank_fn)


def check_close(got, want):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", [2, 3, 4])
@pytest.mark.parametrize("op,extra", CASES, ids=[f"{o}-{a}" for o, a in CASES])
def test_collective_matches_formula_on_thread_mesh(op, extra, size, backend):
    attrs = {"axis": "tp", "size": size, **extra}
    xs = [rank_input(r) for r in range(size)]
    results = run_mesh(Mesh(tp=size), lambda r: collective_graph(op, attrs), xs, backend)
    for r, (got, exe) in enumerate(results):
        check_close(got, expected(op, attrs, xs, r))
        if backend == "llvm":   # a library call, never the reference as a fallback
            stats = exe.stats()
            assert stats["collectives"] == 1 and stats["fallbacks"] == [], stats


def test_collectives_run_on_their_mesh_axis():
    """On a dp=2 x tp=2 mesh, a tp all-reduce sums over ranks {0,1} and {2,3}, a dp one
    over {0,2} and {1,3}."""
    mesh = Mesh(dp=2, tp=2)
    xs = [rank_input(r) for r in range(4)]
    for axis in ("tp", "dp"):
        attrs = {"axis": axis, "size": 2}
        results = run_mesh(mesh, lambda r, a=attrs: collective_graph("all_reduce", a), xs,
                           "llvm")
        for r, (got, _) in enumerate(results):
            group = mesh.group(r, axis)
            check_close(got, 2 * (xs[group[0]] + xs[group[1]]) + 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_send_recv_in_compiled_graphs(backend):
    """A three-stage chain: rank 0 sends, rank 1 receives, adds and sends on, rank 2
    receives (the shape of a pipeline's activations)."""
    shape, attrs = (3, 5), {"axis": "pp", "size": 3}

    def graph_for(rank):
        g = Graph(f"stage{rank}")
        x = g.add_input("x", TensorType(shape, "f32"))
        if rank > 0:
            x = g.add("add", x, g.add("recv", **attrs, peer=-1, shape=shape, dtype="f32"))
        if rank < 2:
            x = g.add("send", x, **attrs, peer=1)
        g.outputs = [g.add("mul", x, g.add_constant("three", np.float32(3)))]
        return g

    xs = [rank_input(r, shape) for r in range(3)]
    results = run_mesh(Mesh(pp=3), graph_for, xs, backend)
    sums = np.cumsum(xs, axis=0)
    for r, (got, exe) in enumerate(results):
        check_close(got, 3 * sums[r])
        if backend == "llvm":
            assert exe.stats()["collectives"] == (1 if r != 1 else 2)


def test_row_parallel_matmul_equals_the_single_process_product():
    """x @ W with W's rows (and x's columns) split over tp=2 and 4: each rank's GEMM (big
    enough to run on llvm's thread pool, which the ranks share) and an all-reduce give
    the whole product within 1e-5."""
    rng = np.random.default_rng(3)
    x = rng.uniform(-1, 1, (96, 256)).astype(np.float32)
    w = rng.uniform(-1, 1, (256, 192)).astype(np.float32)
    want = x.astype(np.float64) @ w.astype(np.float64)
    for p in (2, 4):
        k = 256 // p
        g = Graph("row_parallel")
        xs = g.add_input("x", TensorType((96, k), "f32"))
        ws = g.add_input("w", TensorType((k, 192), "f32"))
        g.outputs = [g.add("all_reduce", g.add("matmul", xs, ws), axis="tp", size=p)]
        outs = run_threads(Mesh(tp=p), lambda gr, k=k, g=g: get_backend("llvm").compile(g)(
            np.ascontiguousarray(x[:, gr.rank * k:(gr.rank + 1) * k]),
            w[gr.rank * k:(gr.rank + 1) * k]))
        for got in outs:
            assert np.abs(got - want).max() / np.abs(want).max() <= 1e-5


def test_strict_mode_accepts_collectives(monkeypatch):
    monkeypatch.setenv("TENSORC_STRICT", "1")
    attrs = {"axis": "tp", "size": 2}
    xs = [rank_input(r) for r in range(2)]
    results = run_mesh(Mesh(tp=2), lambda r: collective_graph("all_reduce", attrs), xs, "llvm")
    check_close(results[0][0], 2 * (xs[0] + xs[1]) + 1)
    # bf16 too: the collective is no bf16 arithmetic in a kernel (that would fall back)
    g = Graph("bf16")
    x = g.add_input("x", TensorType(SHAPE, "bf16"))
    g.outputs = [g.add("all_gather", x, **attrs, dim=0)]
    bf = [x.astype(BF16) for x in xs]
    for got, _ in run_mesh(Mesh(tp=2), lambda r: g, bf, "llvm"):
        np.testing.assert_array_equal(got, np.concatenate(bf))


@pytest.mark.parametrize("backend", BACKENDS)
def test_collective_without_communicator_is_a_clear_error(backend):
    exe = get_backend(backend).compile(collective_graph("all_reduce", {"axis": "tp",
                                                                        "size": 2}))
    with pytest.raises(TensorcError, match="with no communicator"):
        exe(rank_input(0))
    # a group of one needs none: the identity
    solo = get_backend(backend).compile(collective_graph("all_gather", {"axis": "tp",
                                                                         "size": 1, "dim": 0}))
    check_close(solo(rank_input(0)), 2 * rank_input(0) + 1)


def test_one_llvm_executable_shared_by_ranks_is_a_clear_error():
    """Calls on one llvm executable take turns (one arena), so a rank waiting for the
    arena while the holder waits for it in a collective would deadlock."""
    exe = get_backend("llvm").compile(collective_graph("all_reduce", {"axis": "tp",
                                                                       "size": 2}))
    with pytest.raises(TensorcError, match="compile one executable per rank"):
        run_threads(Mesh(tp=2), lambda groups: exe(rank_input(groups.rank)))


def test_mesh_of_other_size_than_the_graph_is_a_clear_error():
    exe = get_backend("numpy").compile(collective_graph("all_reduce", {"axis": "tp",
                                                                        "size": 4}))
    with pytest.raises(TensorcError, match="expects 4 ranks, the running mesh has 2"):
        run_threads(Mesh(tp=2), lambda groups: exe(rank_input(groups.rank)))


def test_comm_bytes_are_the_ring_formulas():
    """f32[8, 16] is 512 bytes; on p ranks a ring all-reduce sends 2(p-1)/p of it per
    rank, all-gather and reduce-scatter (p-1)/p of the full tensor."""
    t = TensorType((8, 16), "f32")
    part = TensorType((2, 16), "f32")
    for p, ar, ag in [(2, 512, 256), (4, 768, 384)]:
        assert comm_bytes("all_reduce", t, t, p) == ar
        assert comm_bytes("all_gather", TensorType((8 // p, 16), "f32"), t, p) == ag
        assert comm_bytes("reduce_scatter", t, TensorType((8 // p, 16), "f32"), p) == ag
    assert comm_bytes("reduce_scatter", t, part, 4) == 384
    assert comm_bytes("broadcast", t, t, 3) == comm_bytes("send", t, t, 3) == 512
    assert comm_bytes("recv", None, t, 3) == 0
    assert comm_bytes("all_reduce", t, t, 1) == 0
    sym = TensorType(("batch", 16), "f32")
    assert comm_bytes("all_reduce", sym, sym, 2, {"batch": 8}) == 512
    with pytest.raises(TensorcError, match="not a collective"):
        comm_bytes("matmul", t, t, 2)


@pytest.mark.parametrize("size", [2, 3])
@pytest.mark.parametrize("op,extra", [("all_reduce", {}), ("all_gather", {"dim": 1}),
                                      ("reduce_scatter", {"dim": 0}),
                                      ("broadcast", {"root": 1})])
def test_gradient_rules_across_ranks(op, extra, size):
    """The collectives are linear: with the total loss L = sum over ranks of
    <op(x)_r, w_r>, each rank's grad.x is dL/dx_r, so sum_r <x_r, grad.x_r> = L (the
    dot-product test of a transpose), and perturbing one rank's x by eps changes L by
    eps * grad.x there."""
    shape = (6, 4)
    attrs = {"axis": "tp", "size": size, **extra}
    g = Graph("g")
    x = g.add_input("x", TensorType(shape, "f64"))
    w = g.add_input("w", TensorType(g.add(op, x, **attrs).type.shape, "f64"))
    g.nodes.pop()   # the probe above only gave the output's shape
    y = g.add(op, x, **attrs)
    loss = g.add("reduce_sum", g.add("mul", y, w))
    g.rename(loss, "loss")
    g.outputs = [loss]
    step = get_backend("numpy").compile(grad(g, "loss", ["x"]))
    forward = get_backend("numpy").compile(g)
    rng = np.random.default_rng(size)
    xs = [rng.uniform(-1, 1, shape) for _ in range(size)]
    ws = [rng.uniform(-1, 1, w.type.shape) for _ in range(size)]
    outs = run_threads(Mesh(tp=size), lambda gr: step(xs[gr.rank], ws[gr.rank]))
    total = sum(float(o[0]) for o in outs)
    dot = sum(float(np.sum(x * o[1])) for x, o in zip(xs, outs, strict=True))
    np.testing.assert_allclose(dot, total, rtol=1e-12)
    bumped = [x.copy() for x in xs]
    bumped[size - 1][1, 2] += 1e-3
    again = sum(float(v) for v in run_threads(
        Mesh(tp=size), lambda gr: forward(bumped[gr.rank], ws[gr.rank])))
    np.testing.assert_allclose((again - total) / 1e-3, outs[size - 1][1][1, 2], rtol=1e-8)


def test_llvm_compiles_from_several_threads_at_once(tmp_path, monkeypatch):
    """A thread mesh compiles one executable per rank. llvmlite holds a process-wide
    lock and the JIT (`jit._compile`) one of its own, so concurrent compiles take turns:
    four threads compiling distinct programs at once, on a cold disk cache, many times
    over, each get correct code."""
    from tensorc.backends.llvm import jit
    monkeypatch.setenv("TENSORC_CACHE_DIR", str(tmp_path))
    errors: list = []

    def compile_and_run(t: int, round_: int):
        try:
            shape = (2, 7 + 4 * round_ + t)   # distinct sizes: distinct modules
            g = Graph(f"g{t}_{round_}")
            x = g.add_input("x", TensorType(shape, "f32"))
            g.outputs = [g.add("tanh", g.add("mul", x, g.add_constant(
                "c", np.float32(t + 1))))]
            a = rank_input(t, shape, seed=round_)
            np.testing.assert_allclose(get_backend("llvm").compile(g)(a),
                                       np.tanh(a * (t + 1)), rtol=1e-5, atol=1e-6)
        except BaseException as e:   # noqa: BLE001  (reported by the main thread)
            errors.append(e)

    before = jit.stats["compiled"]
    for round_ in range(6):
        threads = [threading.Thread(target=compile_and_run, args=(t, round_))
                   for t in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    assert not errors, errors[0]
    assert jit.stats["compiled"] - before >= 24   # each really compiled, none cached


def test_cupy_runs_collectives_on_the_host_not_as_fallbacks():
    """Emulated on the CPU: the cupy executable hands the collective's arrays to the
    rank's communicator through host memory, and lists no fallback."""
    from tensorc.backends.cupy import CupyBackend
    from tensorc.backends.cupy.emulate import EmulatedRuntime, host_compiler
    if host_compiler() is None:
        pytest.skip("g++ not installed: the CUDA emulator needs a C++20 host compiler")
    attrs = {"axis": "tp", "size": 2}
    xs = [rank_input(r) for r in range(2)]

    def rank_fn(groups):
        exe = CupyBackend().compile(collective_graph("all_reduce", attrs),
                                    runtime=EmulatedRuntime())
        return exe(xs[groups.rank]), exe.stats["fallbacks"]

    for got, fallbacks in run_threads(Mesh(tp=2), rank_fn):
        check_close(got, 2 * (xs[0] + xs[1]) + 1)
        assert fallbacks == []
