"""`GraphModule`: a graph as a trainable model (what pruning's recovery trains)."""

from __future__ import annotations

import numpy as np
import pytest

import tensorc
from tensorc import models, pruning
from tensorc.backends import get_backend
from tensorc.frontend import GraphModule
from tensorc.frontend import onnx as tx
from tensorc.training import DEFAULT_TASKS, TrainStep, example_batch, get_task


@pytest.mark.parametrize("name", ["gpt", "bert", "vit"])
def test_replaying_a_graph_is_the_model(name):
    """Eagerly, traced again (at other shapes than the symbolic graph was traced at),
    and its training step: the same numbers as the model it came from."""
    model = models.get(name, "tiny")
    graph = pruning.symbolic_trace(model)
    gm = GraphModule(graph)
    assert {n for n, _ in gm.named_parameters()} == {n for n, _ in model.named_parameters()}
    feeds = model.example_inputs(batch=2)
    want = get_backend("numpy").compile(tensorc.trace(model, **feeds)).run(feeds)["logits"]
    np.testing.assert_allclose(gm(**feeds).numpy(), want, rtol=1e-5, atol=1e-6)
    again = tensorc.trace(gm, **feeds)
    got = get_backend("llvm").compile(again).run(feeds)[again.outputs[0].name]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    task = get_task(DEFAULT_TASKS[name])
    batch = example_batch(model, task.name, 2)
    loss, grads = TrainStep(model, task, batch, "numpy")(batch)
    loss2, grads2 = TrainStep(gm, task, batch, "numpy")(batch)
    assert loss == pytest.approx(loss2, rel=1e-6)
    assert all(np.allclose(grads[k], grads2[k], rtol=1e-5, atol=1e-7) for k in grads)


def test_an_imported_onnx_graph_trains_and_gives_its_weights_back(tmp_path):
    model = models.get("gpt", "tiny")
    path = tmp_path / "gpt.onnx"
    tx.save(pruning.symbolic_trace(model), path)
    gm = GraphModule(tx.load(path))
    task = get_task("clm")
    batch = example_batch(model, "clm", 2, 16)
    step = TrainStep(gm, task, batch, "llvm")
    before = {n: p.copy() for n, p in step.params.items()}
    loss, grads = step(batch)
    for n, g in grads.items():   # one SGD step by hand, on the arrays the module holds
        step.params[n] -= 0.1 * g
    changed = gm.graph()
    assert any(not np.array_equal(changed.constants[n].data, before[n]) for n in before)
    assert step(batch)[0] < loss


def test_recovery_lowers_the_loss_of_a_damaged_model():
    """Recovery is training: a GPT with its weights scaled down trains back toward its
    teacher (held-out bits per byte go down)."""
    src = pruning.load("gpt")
    damaged = GraphModule(src.graph)
    for _, p in damaged.named_parameters():
        p.data = p.data * np.float32(0.5)
    broken = damaged.graph()
    kw = {"seq": 32, "data_bytes": 300_000}
    before = pruning.evaluate(broken, "clm", **kw)["bits_per_byte"]
    trained, record = pruning.recover(broken, src.graph, "clm", 30, batch=8, lr=3e-3, **kw)
    assert record["bits_per_byte"] < before
    assert pruning.evaluate(trained, "clm", **kw)["bits_per_byte"] == \
        pytest.approx(record["bits_per_byte"], rel=1e-4)
