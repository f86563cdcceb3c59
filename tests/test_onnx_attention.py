"""ONNX's Attention (opset 23/24) and RotaryEmbedding (opset 23) imported onto tensorc's
ops: single-node models built with onnx.helper with a symbolic batch and sequence, run
on numpy and llvm (strict: no reference fallback, f32) at two sizes against ONNX
Runtime, and Attention after O2 held as tensorc's `attention` op."""

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from tensorc.backends import available_backends, get_backend
from tensorc.errors import ShapeError, UnsupportedOpError
from tensorc.frontend import onnx as tx
from tensorc.passes import run_pipeline

BACKENDS = ["numpy"] + ["llvm"] * ("llvm" in available_backends())
SIZES = [(2, 5), (3, 9)]   # (batch, seq) for each symbolic model
CODES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.int64): TensorProto.INT64,
         np.dtype(np.bool_): TensorProto.BOOL}


def _model(op, inputs: dict, outputs: list, opset=23, **attrs):
    """One `op` node; `inputs` maps a name to (symbolic shape, dtype), or to None for a
    left-out optional input."""
    node = helper.make_node(op, [k if spec else "" for k, spec in inputs.items()], outputs,
                            **attrs)
    ins = [helper.make_tensor_value_info(k, CODES[np.dtype(spec[1])], spec[0])
           for k, spec in inputs.items() if spec]
    outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs if o]
    g = helper.make_graph([node], "m", ins, outs)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _feeds(model, rng, sizes: dict):
    """Random inputs for the model's declared shapes, symbols from `sizes`."""
    feeds = {}
    for vi in model.graph.input:
        shape = [d.dim_value if d.HasField("dim_value") else sizes[d.dim_param]
                 for d in vi.type.tensor_type.shape.dim]
        code = vi.type.tensor_type.elem_type
        if code == TensorProto.BOOL:
            x = rng.random(shape) < 0.7
            x[..., 0] = True   # no row fully masked (a test of its own covers that)
        elif code == TensorProto.INT64:   # position ids / valid lengths
            x = rng.integers(1, sizes["seq"] + 1, shape).astype(np.int64)
        else:
            x = rng.standard_normal(shape).astype(np.float32)
        feeds[vi.name] = x
    return feeds


def _ort(model, feeds):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _check(model, backend, monkeypatch, passes="O0", rtol=1e-5):
    """Every output equals ORT's at each size; returns the compiled graph."""
    monkeypatch.setenv("TENSORC_STRICT", "1")
    graph = run_pipeline(tx.from_model(model), passes)
    exe = get_backend(backend).compile(graph)
    rng = np.random.default_rng(0)
    for batch, seq in SIZES:
        feeds = _feeds(model, rng, {"batch": batch, "seq": seq})
        want = _ort(model, feeds)
        got = exe(**feeds)
        got = list(got) if isinstance(got, tuple) else [got]
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert g.shape == w.shape, (g.shape, w.shape)
            np.testing.assert_array_equal(np.isnan(g), np.isnan(w))
            ok = ~np.isnan(w)
            err = np.abs(g[ok].astype(np.float64) - w[ok]).max() / max(np.abs(w[ok]).max(), 1e-6)
            assert err <= rtol, f"relative error {err:.2e} at batch {batch}, seq {seq}"
    return graph


F32 = np.float32
B, S = "batch", "seq"


def _qkv(hq, hk, d=8, dv=8, rank=4, kv_seq=S):
    if rank == 3:
        return {"Q": ([B, S, hq * d], F32), "K": ([B, kv_seq, hk * d], F32),
                "V": ([B, kv_seq, hk * dv], F32)}
    return {"Q": ([B, hq, S, d], F32), "K": ([B, hk, kv_seq, d], F32),
            "V": ([B, hk, kv_seq, dv], F32)}


# name -> (inputs, outputs, attributes, opset, whether O2 keeps one fused `attention`)
ATTENTION = {
    "mha": (_qkv(4, 4), ["Y"], {}, 23, True),
    "gqa_causal": (_qkv(4, 2), ["Y"], {"is_causal": 1}, 23, True),
    "mqa_scaled_diff_v": (_qkv(4, 1, dv=6), ["Y"], {"scale": 0.3}, 23, True),
    "3d_gqa_causal": (_qkv(6, 2, rank=3), ["Y"],
                      {"is_causal": 1, "q_num_heads": 6, "kv_num_heads": 2}, 23, True),
    "bool_mask": ({**_qkv(4, 2), "attn_mask": ([B, 1, S, S], np.bool_)}, ["Y"], {}, 23,
                  True),
    "float_mask_causal": ({**_qkv(4, 4), "attn_mask": ([S, S], F32)}, ["Y"],
                          {"is_causal": 1}, 23, True),
    "past_present_causal": ({"Q": ([B, 4, 2, 8], F32), "K": ([B, 2, 2, 8], F32),
                             "V": ([B, 2, 2, 8], F32), "mask": None,
                             "past_key": ([B, 2, 3, 8], F32),
                             "past_value": ([B, 2, 3, 8], F32)},
                            ["Y", "present_key", "present_value"], {"is_causal": 1}, 23,
                            True),
    "softcap": (_qkv(4, 2), ["Y"], {"softcap": 2.0, "is_causal": 1}, 23, False),
    "qk_softmax": ({**_qkv(4, 4), "attn_mask": ([B, 1, S, S], np.bool_)},
                   ["Y", "", "", "qk"], {"qk_matmul_output_mode": 3}, 23, False),
    "qk_bias_3d": ({**_qkv(2, 2, rank=3), "attn_mask": ([S, S], F32)}, ["Y", "", "", "qk"],
                   {"qk_matmul_output_mode": 2, "q_num_heads": 2, "kv_num_heads": 2}, 23,
                   False),
}


def _attention_model(name):
    inputs, outputs, attrs, opset, _ = ATTENTION[name]
    return _model("Attention", inputs, outputs, opset, **attrs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(ATTENTION))
def test_attention_matches_ort(name, backend, monkeypatch):
    _check(_attention_model(name), backend, monkeypatch)


@pytest.mark.parametrize("name", list(ATTENTION))
def test_attention_after_o2(name, monkeypatch):
    """After O2 the mappable forms are one fused `attention` (and no softmax), and still
    equal ORT on llvm (its flash kernel)."""
    backend = "llvm" if "llvm" in BACKENDS else "numpy"
    graph = _check(_attention_model(name), backend, monkeypatch, passes="O2")
    ops = [n.op for n in graph.nodes]
    if ATTENTION[name][-1]:
        assert ops.count("attention") == 1 and "softmax" not in ops, ops
    else:
        assert "attention" not in ops


def test_attention_nonpad_kv_seqlen(monkeypatch):
    """opset 24's external cache: keys past each batch's valid length are padding and
    the causal frontier sits at nonpad_kv_seqlen - q_len (a static cache of 7 keys)."""
    model = _model("Attention", {**_qkv(4, 2, kv_seq=7), "mask": None, "past_key": None,
                                 "past_value": None, "nonpad": ([B], np.int64)}, ["Y"], 24,
                   is_causal=1)
    monkeypatch.setenv("TENSORC_STRICT", "1")
    rng = np.random.default_rng(1)
    for backend in BACKENDS:
        exe = get_backend(backend).compile(tx.from_model(model))
        for batch, seq in [(2, 3), (3, 5)]:
            feeds = _feeds(model, rng, {"batch": batch, "seq": seq})
            feeds["nonpad"] = rng.integers(seq, 8, batch).astype(np.int64)
            want = _ort(model, feeds)[0]
            np.testing.assert_allclose(exe(**feeds), want, rtol=1e-5, atol=1e-6)


def test_attention_fully_masked_row_is_zero():
    """ONNX defines a row with no key left as zeros (a plain softmax gives NaN)."""
    model = _attention_model("bool_mask")
    exe = get_backend("numpy").compile(tx.from_model(model))
    rng = np.random.default_rng(2)
    feeds = _feeds(model, rng, {"batch": 2, "seq": 4})
    feeds["attn_mask"][1, 0, 2] = False
    with np.errstate(invalid="ignore"):
        y = exe(**feeds)
    assert np.all(y[1, :, 2] == 0) and np.isfinite(y).all()
    np.testing.assert_allclose(y, _ort(model, feeds)[0], rtol=1e-5, atol=1e-6)


def test_attention_bad_inputs():
    bad_heads = _model("Attention", _qkv(3, 2), ["Y"])
    with pytest.raises(ShapeError, match="do not divide"):
        tx.from_model(bad_heads)
    no_heads = _model("Attention", _qkv(2, 2, rank=3), ["Y"])
    with pytest.raises(ShapeError, match="q_num_heads"):
        tx.from_model(no_heads)
    bad_mode = _model("Attention", _qkv(2, 2), ["Y", "", "", "qk"], qk_matmul_output_mode=7)
    with pytest.raises(UnsupportedOpError, match="qk_matmul_output_mode 7"):
        tx.from_model(bad_mode)


def _rotary_model(rank, interleaved=0, rot=0, ids=True):
    x = ([B, 4, S, 8], F32) if rank == 4 else ([B, S, 4 * 8], F32)
    half = (rot or 8) // 2
    inputs = {"x": x}
    if ids:
        inputs |= {"cos": ([16, half], F32), "sin": ([16, half], F32),
                   "pos": ([B, S], np.int64)}
    else:
        inputs |= {"cos": ([B, S, half], F32), "sin": ([B, S, half], F32)}
    attrs = {"interleaved": interleaved, "rotary_embedding_dim": rot}
    if rank == 3:
        attrs["num_heads"] = 4
    return _model("RotaryEmbedding", inputs, ["y"], **attrs)


ROTARY = {"4d": (4, 0, 0, True), "3d": (3, 0, 0, True), "interleaved": (4, 1, 0, True),
          "partial": (4, 0, 4, True), "partial_interleaved_3d": (3, 1, 4, True),
          "no_ids": (4, 0, 0, False), "no_ids_interleaved_3d": (3, 1, 0, False)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(ROTARY))
def test_rotary_embedding_matches_ort(name, backend, monkeypatch):
    _check(_rotary_model(*ROTARY[name]), backend, monkeypatch)


def test_rotary_embedding_bad_dim():
    with pytest.raises(ShapeError, match="even"):
        tx.from_model(_rotary_model(4, rot=3))
