"""The schedule space of the generated kernels (`backends/llvm/loop_tuning.py`): the
default is today's IR, every candidate reaches the machine code, gives bitwise the
default's numbers on elementwise kernels and stays within `REDUCTION_RTOL` of them on
reductions (odd sizes: vector tails), and the codegen asks `tuning.schedule` per class."""

from __future__ import annotations

import re

import numpy as np
import pytest

import tensorc
from tensorc.backends import get_backend
from tensorc.backends.llvm import LOWERING, codegen, jit, loop_tuning, tuning
from tensorc.backends.lowering import lower
from tensorc.ir import DTYPES, Graph, TensorType

CANDIDATES = loop_tuning.candidates(None)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORC_CACHE_DIR", str(tmp_path / "cache"))


def on_schedule(monkeypatch, schedule):
    """Every generated kernel on `schedule` from now on."""
    monkeypatch.setattr(loop_tuning, "kernel_schedule", lambda kernel: schedule)


def run(monkeypatch, g: Graph, feeds: dict, schedule) -> dict:
    on_schedule(monkeypatch, schedule)
    return get_backend("llvm").compile(g).run(feeds)


def feeds_for(g: Graph, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {v.name: (rng.uniform(-3, 3, v.type.shape) + 1).astype(DTYPES[v.type.dtype])
            if v.type.dtype.startswith("f") else rng.integers(-50, 50, v.type.shape)
            .astype(DTYPES[v.type.dtype]) for v in g.inputs}


def elementwise_graph(shape, dtype="f32") -> Graph:
    """gelu(x) * y + x (ints: (x * y + x) max y) on a broadcast y: one fused kernel."""
    g = Graph("t")
    x = g.add_input("x", TensorType(shape, dtype))
    y = g.add_input("y", TensorType(shape[-1:], dtype))
    if dtype.startswith("f"):
        g.outputs = [g.add("add", g.add("mul", g.add("gelu", x), y), x)]
    else:
        g.outputs = [g.add("maximum", g.add("add", g.add("mul", x, y), x), y)]
    return g


REDUCTIONS = ("layer_norm", "softmax", "log_softmax", "reduce_sum", "reduce_mean",
              "reduce_max")


def reduction_graph(shape, ops=REDUCTIONS) -> Graph:
    """Each op of `ops` over the last axis of one x: an output each."""
    g = Graph("t")
    x = g.add_input("x", TensorType(shape, "f32"))
    ps = [g.add_input(f"p{i}", TensorType(shape[-1:], "f32")) for i in range(2)] \
        if "layer_norm" in ops else []
    outs = []
    for op in ops:
        if op == "layer_norm":
            outs.append(g.add(op, x, *ps, axis=-1, eps=1e-5))
        elif op.startswith("reduce"):
            outs.append(g.add(op, x, axes=[-1], keepdims=False))
        else:
            outs.append(g.add(op, x, axis=-1))
    g.outputs = outs
    return g


def kernels_of(g: Graph):
    return lower(g, {}, **LOWERING).kernels


def without_hints(text: str) -> str:
    """IR text less its loop metadata (attachments and nodes)."""
    text = re.sub(r", !llvm\.loop ![0-9]+", "", text)
    return "\n".join(line for line in text.splitlines() if line and not line.startswith("!"))


def test_default_adds_nothing_and_a_candidate_only_hints():
    kernels = kernels_of(reduction_graph((5, 1003), ["layer_norm"])) + kernels_of(
        elementwise_graph((7, 1001)))
    with tuning.defaults():   # every kernel on the default: as without a schedule
        default = codegen.render(kernels, loop_tuning.kernel_schedule)
    assert default == codegen.render(kernels)
    assert "llvm.loop.vectorize" not in default and "interleave" not in default
    module = codegen.new_module()
    for k in kernels:
        codegen.add_kernel(module, k, {"width": 4, "interleave": 2})
    tuned = str(module)
    assert without_hints(tuned) == without_hints(default)
    innermost = sum(len(loop_tuning._innermost(k.body)) for k in kernels)
    assert tuned.count("!llvm.loop") == innermost
    assert tuned.count('"llvm.loop.vectorize.width", i32 4') == 1   # one node, shared
    # the schedule is in the IR text, so in the JIT cache key
    assert jit.cache_key(tuned) != jit.cache_key(default)


def test_hints_reach_the_machine_code():
    k = loop_tuning.representative("reduction", ("reduce_sum", "f32", 1003, 1))
    asm = {}
    for s in ({"width": 4, "interleave": 1}, {"width": 16, "interleave": 4}):
        module = codegen.new_module()
        codegen.add_kernel(module, k, s)
        asm[s["width"]] = jit.assembly(module, vectorize=True, unroll=True)
    assert asm[4] != asm[16]


@pytest.mark.parametrize("shape,dtype", [((7, 1001), "f32"), ((4099,), "f32"),
                                         ((3, 5, 67), "f64"), ((5, 333), "i32")])
def test_elementwise_candidates_are_bitwise_the_default(monkeypatch, shape, dtype):
    g = elementwise_graph(shape, dtype)
    feeds = feeds_for(g)
    want = run(monkeypatch, g, feeds, loop_tuning.DEFAULT)
    ref = tensorc.compile(g, "numpy").run(feeds)
    for name in want:
        np.testing.assert_allclose(want[name], ref[name], rtol=1e-4, atol=1e-5)
    for schedule in CANDIDATES[1:]:
        got = run(monkeypatch, g, feeds, schedule)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=str(schedule))


@pytest.mark.parametrize("shape", [(5, 1003), (2, 4099)])
def test_reduction_candidates_within_the_tolerance(monkeypatch, shape):
    """Width x interleave partial sums: the order, so the last bits, change. The measured
    worst is 5e-7 of the result's scale (a sum's: the sum of |x|); max is exact."""
    g = reduction_graph(shape)
    feeds = feeds_for(g, 1)
    names = [v.name for v in g.outputs]
    want = run(monkeypatch, g, feeds, loop_tuning.DEFAULT)
    ref = tensorc.compile(g, "numpy").run(feeds)
    scale = {}
    for op, name in zip(REDUCTIONS, names, strict=True):
        np.testing.assert_allclose(want[name], ref[name], rtol=1e-4, atol=1e-5)
        count = shape[-1] if op == "reduce_mean" else 1
        scale[name] = np.abs(feeds["x"]).sum(-1) / count if op.startswith("reduce") \
            else np.abs(want[name]).max()
    for schedule in CANDIDATES[1:]:
        got = run(monkeypatch, g, feeds, schedule)
        for op, name in zip(REDUCTIONS, names, strict=True):
            if op == "reduce_max":
                np.testing.assert_array_equal(got[name], want[name], err_msg=str(schedule))
            worst = np.max(np.abs(got[name] - want[name]) / scale[name])
            assert worst <= loop_tuning.REDUCTION_RTOL, (op, schedule, worst)


@pytest.mark.parametrize("space,key", [("elementwise", ("f32", 997, 3, "")),
                                       ("elementwise", ("f32", 1001, 2, "tanh")),
                                       ("elementwise", ("f64", 67, 1, "log+sqrt")),
                                       ("elementwise", ("i64", 8, 1, "")),
                                       ("reduction", ("layer_norm", "f32", 1001, 3)),
                                       ("reduction", ("softmax", "f64", 67, 1)),
                                       ("reduction", ("reduce_max", "f32", 4099, 1))])
def test_representative_kernels_agree_and_time(space, key):
    """What `measure` times: a kernel of the key's class on random inputs, same numbers
    on every candidate (bitwise where nothing is summed)."""
    kernel = loop_tuning.representative(space, key)
    sizes = loop_tuning._sizes(space, key)
    results = []
    for schedule in CANDIDATES:
        arrays = loop_tuning.random_inputs(kernel, sizes)
        assert loop_tuning.run_kernel(kernel, schedule, arrays) > 0
        results.append(arrays[-1])
    exact = space == "elementwise" or key[0] == "reduce_max"
    for got in results[1:]:
        if exact:
            np.testing.assert_array_equal(got, results[0])
        else:
            np.testing.assert_allclose(got, results[0], rtol=loop_tuning.REDUCTION_RTOL,
                                       atol=loop_tuning.REDUCTION_RTOL)
    assert np.any(results[0] != 0)
    seconds = tuning.SPACES[space].measure(key, CANDIDATES[1], 3)
    assert 0 < seconds < 1


def test_codegen_asks_one_key_per_kernel_class():
    kernels = kernels_of(reduction_graph((5, 1003), ["layer_norm"]))
    kernels += kernels_of(elementwise_graph((7, 1001)))
    kernels += kernels_of(elementwise_graph((9, 1000)))   # the same class
    with tuning.record() as seen:
        codegen.render(kernels, loop_tuning.kernel_schedule)
    assert seen == {("reduction", ("layer_norm", "f32", 1024, 3)),
                    ("elementwise", ("f32", 1024, 2, "exp"))}   # gelu's erf
    for space, key in seen:
        assert tuning.SPACES[space].default(key) == loop_tuning.DEFAULT
        assert tuning.schedule(space, key) in tuning.SPACES[space].candidates(key)


def test_untuned_dtypes_and_loopless_kernels_keep_the_default():
    g = Graph("t")
    x = g.add_input("x", TensorType((3, 17), "f32"))
    g.outputs = [g.add("less", x, g.add("neg", x))]   # a bool result
    (kernel,) = kernels_of(g)
    assert loop_tuning.kernel_key(kernel) is None
    assert loop_tuning.kernel_schedule(kernel) == loop_tuning.DEFAULT


@pytest.mark.parametrize("dtype", ["f32", "f64"])
def test_loops_llvm_cannot_widen_keep_the_default(monkeypatch, capfd, dtype):
    """Told a width it cannot honour (a libm call, argmax's carried index) LLVM prints a
    remark: such kernels are left to it, and every other one widens silently."""
    g = Graph("t")
    x = g.add_input("x", TensorType((3, 1001), dtype))
    g.outputs = [g.add("argmax", x, axis=-1), g.add("softmax", x, axis=-1),
                 g.add("gelu", g.add("exp", x)), g.add("reduce_max", x, axes=[-1])]
    keys = {k.kind: loop_tuning.kernel_key(k) for k in kernels_of(g)}
    assert len(keys) == 4 and keys.pop("argmax") is None and keys.pop("reduce_max")
    assert all((key is None) == (dtype == "f64") for key in keys.values())   # exp: libm
    feeds = feeds_for(g)
    want = tensorc.compile(g, "numpy").run(feeds)
    monkeypatch.setattr(loop_tuning, "kernel_schedule", lambda kernel: {
        "width": 8, "interleave": 2} if loop_tuning.kernel_key(kernel) else loop_tuning.DEFAULT)
    got = get_backend("llvm").compile(g).run(feeds)
    assert "not vectorized" not in capfd.readouterr().err
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-6)
