"""Honest fallbacks: whatever runs the numpy reference on a compiled backend is listed in
`stats()["fallbacks"]` with its node and reason, warned about, and an error in strict
mode; the kernels that replaced the old fallbacks match numpy on random inputs."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from tensorc.backends import available_backends, get_backend
from tensorc.errors import FallbackError
from tensorc.ir import Graph, TensorType
from tensorc.loading import load_model
from tensorc.models import list_models
from tensorc.passes import run_pipeline

pytestmark = pytest.mark.skipif("llvm" not in available_backends(), reason="needs llvm")

HF = Path(__file__).parent / "data" / "hf"
NP = {"f16": np.float16, "f32": np.float32, "f64": np.float64, "i8": np.int8, "u8": np.uint8,
      "i32": np.int32, "i64": np.int64}


def _programs(exe):
    return [r.program for r in exe._runners.values()]


def _no_fallbacks(graph: Graph, feeds: dict) -> None:
    exe = get_backend("llvm").compile(graph)
    exe.run(feeds)
    fallbacks = [f for p in _programs(exe) for f in p.stats()["fallbacks"]]
    assert fallbacks == []


@pytest.mark.parametrize("pipeline", ["O0", "O2"])
@pytest.mark.parametrize("preset", ["tiny", "small"])
@pytest.mark.parametrize("model", sorted(list_models()))
def test_builtin_models_run_on_llvm_without_fallbacks(model, preset, pipeline):
    loaded = load_model(model, preset)
    _no_fallbacks(run_pipeline(loaded.graph, pipeline), loaded.inputs)


@pytest.mark.parametrize("pipeline", ["O0", "O2"])
@pytest.mark.parametrize("stem", sorted(p.stem for p in HF.glob("*.onnx")))
def test_hf_exports_run_on_llvm_without_fallbacks(stem, pipeline):
    loaded = load_model(str(HF / f"{stem}.onnx"))
    with np.load(HF / f"{stem}.npz") as d:
        feeds = {k.removeprefix("in:"): d[k] for k in d.files if k.startswith("in:")}
    _no_fallbacks(run_pipeline(loaded.graph, pipeline), feeds)


# --- the kernels that replaced fallbacks, against numpy ---------------------------------

def _rand(rng, shape, dtype):
    if dtype in ("i8", "u8", "i32", "i64"):
        lo = 0 if dtype == "u8" else -9
        return rng.integers(lo, 10, shape).astype(NP[dtype])
    return rng.standard_normal(shape).astype(NP[dtype])


def _check(op, types, rng, tol=1e-12, **attrs):
    """One `op` node over inputs of `types`; llvm must match the reference and run no
    fallback. Integers must be exact; floats within `tol` (relative to the largest)."""
    g = Graph("t")
    ins = [g.add_input(f"x{i}", TensorType(s, d)) for i, (s, d) in enumerate(types)]
    g.outputs = g.add_node(op, ins, attrs)
    feeds = {v.name: _rand(rng, v.type.shape, v.type.dtype) for v in g.inputs}
    want = get_backend("numpy").compile(g).run(feeds)
    exe = get_backend("llvm").compile(g)
    got = exe.run(feeds)
    assert [f for p in _programs(exe) for f in p.stats()["fallbacks"]] == []
    for name, w in want.items():
        assert got[name].dtype == w.dtype and got[name].shape == w.shape
        if w.dtype.kind in "biu":
            np.testing.assert_array_equal(got[name], w)
        else:
            w64, g64 = w.astype(np.float64), got[name].astype(np.float64)
            err = np.abs(g64 - w64).max(initial=0) / max(np.abs(w64).max(initial=0), 1e-30)
            assert err <= tol, (name, err)


MATMUL_SHAPES = [((5, 7), (7, 3)), ((2, 4, 6), (6, 5)), ((3, 1, 4, 6), (2, 6, 5)),
                 ((6,), (6, 4)), ((4, 6), (6,)), ((2, 0, 3), (3, 4))]


@pytest.mark.parametrize("dtype,tol", [("f64", 1e-12), ("i32", 0), ("i64", 0), ("i8", 0),
                                       ("u8", 0), ("f16", 2e-3)])
@pytest.mark.parametrize("shapes", MATMUL_SHAPES, ids=str)
def test_matmul_kernel_off_float32(dtype, tol, shapes):
    _check("matmul", [(s, dtype) for s in shapes], np.random.default_rng(1), tol)


@pytest.mark.parametrize("op", ["reduce_sum", "reduce_mean", "reduce_max", "reduce_min",
                                "reduce_prod"])
@pytest.mark.parametrize("dtype,tol", [("i32", 0), ("i64", 0), ("i8", 0), ("u8", 0),
                                       ("f16", 2e-3)])
@pytest.mark.parametrize("shape,axes", [((4, 9), (1,)), ((3, 5, 2), (0, 2)), ((7,), None),
                                        ((), None)])
def test_reductions_on_ints_f16_and_scalars(op, dtype, tol, shape, axes):
    _check(op, [(shape, dtype)], np.random.default_rng(2), tol, axes=axes)


@pytest.mark.parametrize("dtype", ["i32", "i64", "i8", "u8", "f16", "f64"])
def test_argmax_on_ints_and_f16(dtype):
    _check("argmax", [((6, 11), dtype)], np.random.default_rng(3), axis=1)
    _check("argmax", [((6, 11), dtype)], np.random.default_rng(4), axis=0, keepdims=True)


@pytest.mark.parametrize("dtype", ["f32", "f64", "f16", "i32", "i64", "i8", "u8"])
@pytest.mark.parametrize("shape,k,axis", [((6, 11), 3, 1), ((5, 4, 3), 4, 0), ((2, 300), 7, -1),
                                          ((8,), 8, 0)])
def test_topk_kernel(dtype, shape, k, axis):
    """Integers in [-9, 9] tie often: equal values come out lower index first."""
    for largest in (True, False):
        _check("topk", [(shape, dtype)], np.random.default_rng(7), 0, k=k, axis=axis,
               largest=largest)


@pytest.mark.parametrize("reduction", ["none", "add", "mul", "max", "min"])
@pytest.mark.parametrize("dtype", ["f32", "f64", "i32", "i64"])
def test_scatter_kernel(reduction, dtype):
    """Repeated indices apply in order (none: the last one wins), on every reduction."""
    rng = np.random.default_rng(8)
    for ds, axis, idx in [((6, 5), 0, np.array([5, 0, -1, 2, 5])),
                          ((3, 7, 40), 1, np.array([[6, 0], [6, 3], [-7, 2]]))]:
        g = Graph("t")
        ax = axis % len(ds)
        us = ds[:ax] + idx.shape + ds[ax + 1:]
        ins = [g.add_input("d", TensorType(ds, dtype)), g.add_input("u", TensorType(us, dtype))]
        g.outputs = g.add_node("scatter", [ins[0], g.add_constant("i", idx), ins[1]],
                               {"axis": axis, "reduction": reduction})
        feeds = {"d": _rand(rng, ds, dtype), "u": _rand(rng, us, dtype)}
        want = get_backend("numpy").compile(g).run(feeds)
        exe = get_backend("llvm").compile(g)
        got = exe.run(feeds)
        assert [f for p in _programs(exe) for f in p.stats()["fallbacks"]] == []
        for name, w in want.items():
            np.testing.assert_array_equal(got[name], w)


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
def test_softmax_in_f16_computes_in_f32(op):
    _check(op, [((4, 33), "f16")], np.random.default_rng(5), 2e-3, axis=-1)


def test_layer_norm_in_f16_computes_in_f32():
    _check("layer_norm", [((4, 3, 40), "f16"), ((40,), "f16"), ((40,), "f16")],
           np.random.default_rng(6), 1e-2)


def test_dims_op_is_a_constant_per_shape():
    g = Graph("t")
    x = g.add_input("x", TensorType(("batch", "seq"), "f32"))
    (d,) = g.add_node("dims", [], {"values": ("seq", "batch", 7), "shape": (3,)})
    (y,) = g.add_node("cast", [d], {"dtype": "f32"})
    (z,) = g.add_node("reduce_sum", [x], {"axes": (1,)})
    g.outputs = [y, z]
    exe = get_backend("llvm").compile(g)
    for b, s in ((2, 5), (3, 4)):
        out = exe.run({"x": np.ones((b, s), np.float32)})
        np.testing.assert_array_equal(out[y.name], [s, b, 7])
    assert [f for p in _programs(exe) for f in p.stats()["fallbacks"]] == []


# --- a fallback is reported, and refused in strict mode -----------------------------------

def _grouped_conv() -> Graph:
    g = Graph("t")
    ins = [g.add_input("x", TensorType((1, 4, 9, 9), "f32")),
           g.add_input("w", TensorType((4, 2, 3, 3), "f32"))]
    g.outputs = g.add_node("conv2d", ins, {"group": 2})
    return g


def _conv_feeds():
    rng = np.random.default_rng(7)
    return {"x": rng.standard_normal((1, 4, 9, 9)).astype(np.float32),
            "w": rng.standard_normal((4, 2, 3, 3)).astype(np.float32)}


def test_fallback_is_warned_with_node_and_reason(caplog):
    g = _grouped_conv()
    with caplog.at_level(logging.WARNING, logger="tensorc"):
        get_backend("llvm").compile(g).run(_conv_feeds())
    (record,) = [r for r in caplog.records if "numpy reference" in r.getMessage()]
    assert g.nodes[0].where in record.getMessage()
    assert "conv2d with groups" in record.getMessage()


def test_strict_mode_refuses_a_fallback(monkeypatch):
    monkeypatch.setenv("TENSORC_STRICT", "1")
    with pytest.raises(FallbackError, match="strict mode: 1 op"):
        get_backend("llvm").compile(_grouped_conv()).run(_conv_feeds())
    monkeypatch.setenv("TENSORC_STRICT", "0")
    get_backend("llvm").compile(_grouped_conv()).run(_conv_feeds())
