"""The model zoo: every model traces, verifies, and runs on the numpy backend exactly
as it runs eagerly, at fixed and at symbolic shapes."""

from __future__ import annotations

import numpy as np
import pytest

import tensorc
from tensorc.errors import TensorcError
from tensorc.models import MODELS

# name -> (symbolic input specs, two concrete (batch, seq) sizes to run them at)
SYMBOLIC = {
    "gpt": {"input_ids": (("batch", "seq"), "i64")},
    "llama": {"input_ids": (("batch", "seq"), "i64")},
    "bert": {"input_ids": (("batch", "seq"), "i64"), "attention_mask": (("batch", "seq"), "i64")},
    "transformer": {"src_ids": (("batch", "src"), "i64"), "tgt_ids": (("batch", "tgt"), "i64")},
    "vit": {"pixel_values": (("batch", 3, 32, 32), "f32")},
}
SIZES = [(1, 5), (3, 12)]


def attention_blocks(name, cfg):
    return {"gpt": cfg.n_layer, "bert": cfg.n_layer, "transformer": 3 * cfg.n_layer,
            "vit": cfg.n_layer, "llama": cfg.n_layer}[name]


def example(model, name, batch, seq):
    return model.example_inputs(batch) if name == "vit" else model.example_inputs(batch, seq)


def test_every_model_has_a_symbolic_spec():
    assert sorted(SYMBOLIC) == sorted(MODELS)


@pytest.fixture(scope="module", params=sorted(MODELS))
def tiny(request):
    return request.param, tensorc.models.get(request.param, "tiny")


def test_tiny_traces_verifies_and_matches_eager(tiny):
    name, model = tiny
    inputs = example(model, name, 2, 16)
    g = tensorc.trace(model, **inputs)
    g.verify()
    assert [v.name for v in g.outputs] == ["logits"]
    out = tensorc.compile(g, "numpy", "O0")(**inputs)
    want = model(**inputs).numpy()
    assert out.dtype == np.float32 and np.all(np.isfinite(out)) and np.any(out != 0)
    assert out.shape == want.shape
    np.testing.assert_array_equal(out, want)  # the same reference ops: bit-exact


def test_tiny_with_symbolic_batch_and_seq(tiny):
    name, model = tiny
    specs = {k: tensorc.TensorSpec(*v) for k, v in SYMBOLIC[name].items()}
    g = tensorc.trace(model, **specs)
    assert g.outputs[0].type.shape[0] == "batch"
    exe = tensorc.compile(g, "numpy", "O0")
    for batch, seq in SIZES:
        inputs = example(model, name, batch, seq)
        out = exe(**inputs)
        np.testing.assert_array_equal(out, model(**inputs).numpy())
        assert out.shape[0] == batch


@pytest.mark.parametrize("name", ["bert", "transformer"])  # the models with two inputs
def test_symbolic_graph_rejects_inconsistent_batches(name):
    model = tensorc.models.get(name, "tiny")
    specs = {k: tensorc.TensorSpec(*v) for k, v in SYMBOLIC[name].items()}
    exe = tensorc.compile(tensorc.trace(model, **specs))
    a, b = example(model, name, 2, 6), example(model, name, 3, 6)
    first, second = list(specs)
    with pytest.raises(tensorc.errors.InputError, match=rf"input '{second}'.*batch=2"):
        exe(**{first: a[first], second: b[second]})


def test_attention_structure(tiny):
    name, model = tiny
    g = tensorc.trace(model, **example(model, name, 1, 8))
    counts = g.op_counts()
    n = attention_blocks(name, model.config)
    assert counts.get("softmax", 0) == n
    if name == "llama":   # RMSNorm is composed: a mean of squares, rsqrt, scale
        assert counts["rsqrt"] == counts["reduce_mean"] == 2 * n + 1
    else:
        assert counts["layer_norm"] >= n
    # q, k, v, o projections plus the two feed-forward matmuls and one QK^T and one PV per
    # attention; cross attention reads k, v from memory but still has 4 projections
    assert counts["matmul"] >= 6 * n


def test_config_override_changes_depth():
    model = tensorc.models.get("gpt", "tiny", n_layer=3)
    assert len(model.blocks) == 3 and model.config.n_layer == 3
    g = tensorc.trace(model, **model.example_inputs(1, 4))
    assert g.op_counts()["softmax"] == 3
    assert tensorc.models.get("gpt", "tiny").config.n_layer == 2  # the preset is untouched
    t = tensorc.models.get("transformer", "tiny", n_layer=1)
    assert tensorc.trace(t, **t.example_inputs(1, 6)).op_counts()["softmax"] == 3


def test_config_errors():
    with pytest.raises(TensorcError) as info:
        tensorc.models.get("gpt", "tiny", n_layers=3)
    msg = str(info.value)
    assert "n_layers" in msg and "n_layer" in msg and "d_model" in msg and "vocab_size" in msg
    for bad in ("3", 2.5, None, True):
        with pytest.raises(TensorcError, match="n_layer"):
            tensorc.models.get("gpt", "tiny", n_layer=bad)
    assert tensorc.models.get("bert", "tiny", eps=1).config.eps == 1  # int for a float is fine
    with pytest.raises(TensorcError, match="unknown model 'gpt5'"):
        tensorc.models.get("gpt5")
    with pytest.raises(TensorcError, match="no preset 'huge'.*tiny"):
        tensorc.models.get("gpt", "huge")
    with pytest.raises(TensorcError, match="not divisible"):
        tensorc.models.get("gpt", "tiny", n_head=5)
    with pytest.raises(TensorcError, match="max_seq_len"):
        tensorc.models.get("gpt", "tiny").example_inputs(1, 1000)


def test_gpt_small_parameter_count():
    model = tensorc.models.get("gpt", "small")
    assert model.num_parameters() == 23_633_920
    cfg = model.config
    d, v, f, t, n = cfg.d_model, cfg.vocab_size, cfg.d_ff, cfg.max_seq_len, cfg.n_layer
    block = 4 * (d * d + d) + (d * f + f) + (f * d + d) + 2 * 2 * d
    assert model.num_parameters() == v * d + t * d + n * block + 2 * d


def test_example_inputs_are_deterministic(tiny):
    name, model = tiny
    a, b = example(model, name, 2, 7), example(model, name, 2, 7)
    assert sorted(a) == sorted(b) == sorted(SYMBOLIC[name])
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
