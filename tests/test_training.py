"""Whole-model gradients (against finite differences in float64), the compiled training
step on every CPU backend, and training runs that must learn."""

from __future__ import annotations

import numpy as np
import pytest

from tensorc import data
from tensorc.backends import get_backend
from tensorc.models import get
from tensorc.passes.autodiff import GRAD_PREFIX, as_inputs, convert_float, grad
from tensorc.training import TrainStep, get_task, loss_graph


def batch_for(task, model, rng, batch=2, seq=8):
    out = _batch_for(task, model, rng, batch, seq)
    if model.config.dropout:
        out["dropout_seed"] = np.array(12345, np.int64)
    return out


def _batch_for(task, model, rng, batch, seq):
    c = model.config
    if task == "classify":
        return {"pixel_values": rng.uniform(0, 1, (batch, c.channels, c.image_size,
                                                   c.image_size)).astype(np.float32),
                "labels": rng.integers(0, c.vocab_size, batch)}
    if task == "translate":
        src = rng.integers(0, c.vocab_size, (batch, seq))
        tgt = rng.integers(0, c.vocab_size, (batch, seq - 2))
        labels = rng.integers(0, c.vocab_size, (batch, seq - 2))
        labels[0, -1] = -100
        return {"src_ids": src, "tgt_ids": tgt, "labels": labels}
    ids = rng.integers(0, c.vocab_size, (batch, seq))
    labels = rng.integers(0, c.vocab_size, (batch, seq))
    labels[1, :3] = -100                                   # ignored positions
    out = {"input_ids": ids, "labels": labels}
    if task == "mlm":
        out["attention_mask"] = (np.arange(seq)[None] < np.array([[seq], [seq - 3]])).astype(
            np.int64)
    return out


MODELS = [("gpt", "clm", {}), ("gpt", "clm", {"dropout": 0.2}), ("llama", "clm", {}),
          ("bert", "mlm", {"dropout": 0.1}),
          ("vit", "classify", {"image_size": 8, "patch_size": 4, "channels": 1}),
          ("transformer", "translate", {})]
MODEL_IDS = [m[0] + "-dropout" * bool(m[2].get("dropout")) for m in MODELS]


@pytest.mark.parametrize("name,task,sets", MODELS, ids=MODEL_IDS)
def test_model_gradient_matches_finite_differences(name, task, sets):
    """The directional derivative along random directions of all weights at once,
    float64 through the whole model: grad's dot product against central differences."""
    rng = np.random.default_rng(1)
    model = get(name, "tiny", seed=0, **sets)
    batch = batch_for(task, model, rng)
    graph, names = loss_graph(model, get_task(task), batch)
    g64 = convert_float(as_inputs(graph, names))
    step = get_backend("numpy").compile(grad(g64, "loss", names))
    loss_only = get_backend("numpy").compile(g64)
    params = {n: p.data.astype(np.float64) for n, p in model.named_parameters()}
    feeds = {**{k: v.astype(np.float64) if v.dtype.kind == "f" else v
                for k, v in batch.items()}, **params}
    out = step.run(feeds)
    assert np.isfinite(out["loss"]) and out["loss"] > 0
    for _ in range(2):
        direction = {n: rng.standard_normal(a.shape) for n, a in params.items()}
        eps = 1e-5
        up = loss_only.run({**feeds, **{n: a + eps * direction[n] for n, a in params.items()}})
        dn = loss_only.run({**feeds, **{n: a - eps * direction[n] for n, a in params.items()}})
        numeric = (float(up["loss"]) - float(dn["loss"])) / (2 * eps)
        analytic = sum(float(np.sum(out[GRAD_PREFIX + n] * direction[n])) for n in params)
        assert analytic == pytest.approx(numeric, rel=1e-6, abs=1e-8), name


@pytest.mark.parametrize("name,task,sets", MODELS, ids=MODEL_IDS)
def test_llvm_step_matches_numpy(name, task, sets):
    rng = np.random.default_rng(2)
    model = get(name, "tiny", seed=0, **sets)
    batch = batch_for(task, model, rng)
    want_loss, want = TrainStep(model, get_task(task), batch, backend="numpy")(batch)
    got_loss, got = TrainStep(model, get_task(task), batch, backend="llvm")(batch)
    assert got_loss == pytest.approx(want_loss, rel=1e-5)
    for n, a in want.items():
        scale = max(float(np.abs(a).max()), 1e-6)
        assert float(np.abs(got[n] - a).max()) <= 1e-4 * scale, n


def test_clm_batch_from_the_stdlib_trains_the_step():
    corpus = data.stdlib_corpus(max_bytes=200_000)
    model = get("gpt", "tiny", seed=0, vocab_size=257)
    rng = np.random.default_rng(0)
    b = data.clm_batch(corpus.train, 2, 16, rng)
    loss, grads = TrainStep(model, get_task("clm"), b, backend="numpy")(b)
    assert abs(loss - np.log(257)) < 0.5      # an untrained model: about uniform
    assert set(grads) == {n for n, _ in model.named_parameters()}


@pytest.mark.parametrize("backend", ["numpy", "llvm"])
def test_a_step_writes_its_gradients_into_the_last_steps_arrays(backend):
    rng = np.random.default_rng(5)
    model = get("gpt", "tiny", seed=0)
    a, b = batch_for("clm", model, rng), batch_for("clm", model, rng)
    step = TrainStep(model, get_task("clm"), a, backend=backend)
    _, first = step(a)
    kept = {n: g.copy() for n, g in first.items()}
    loss_b, second = step(b)
    assert all(second[n] is first[n] for n in first)        # no fresh memory per step
    fresh_loss, fresh = TrainStep(model, get_task("clm"), b, backend=backend)(b)
    assert loss_b == fresh_loss
    for n, g in fresh.items():
        np.testing.assert_array_equal(second[n], g)
    assert any(not np.array_equal(kept[n], second[n]) for n in kept)


def test_dropout_drops_in_training_only_and_the_same_on_every_backend():
    rng = np.random.default_rng(3)
    model = get("gpt", "tiny", seed=0, dropout=0.5)
    batch = batch_for("clm", model, rng)
    step = TrainStep(model, get_task("clm"), batch, backend="llvm")
    # embeddings and two residual branches per layer, forward and backward; generated code
    assert step.graph.op_counts()["dropout"] == 2 * (1 + 2 * model.config.n_layer)
    assert not [f for f in step.exe.stats()["fallbacks"] if f["node"].startswith("dropout")]
    loss_a, _ = step(batch)
    loss_b, _ = step({**batch, "dropout_seed": np.array(777, np.int64)})
    assert loss_a != loss_b                                # a new seed, a new mask
    assert step(batch)[0] == loss_a                        # the same seed, the same mask
    from tensorc import trace
    inference = trace(model, input_ids=batch["input_ids"])
    assert "dropout" not in inference.op_counts()          # inference never drops


def test_a_tied_embeddings_gradient_is_one_product_not_a_transposed_copy():
    """GPT's LM head reads wte transposed; grad writes its gradient as dlogits^T x."""
    rng = np.random.default_rng(4)
    model = get("gpt", "tiny", seed=0)
    batch = batch_for("clm", model, rng)
    graph, names = loss_graph(model, get_task("clm"), batch)
    g = grad(as_inputs(graph, names), "loss", names)
    swaps = [n for n in g.nodes if n.op == "transpose" and n.inputs[0].type.rank == 2]
    assert swaps, "the LM head reads wte transposed"
    for n in swaps:
        src = n.inputs[0].producer
        assert src is None or src.op != "matmul", f"{n} transposes a product"


def test_recompute_lowers_peak_memory_and_keeps_the_gradients():
    from tensorc.backends.plan import peak_memory_bytes
    from tensorc.training import example_batch, step_graph
    model = get("gpt", "tiny", seed=0, n_layer=4, vocab_size=17, d_ff=256)
    batch = example_batch(model, "clm", batch=4, seq=32)
    kept, _ = step_graph(model, get_task("clm"), batch)
    again, _ = step_graph(model, get_task("clm"), batch, recompute=True)
    assert peak_memory_bytes(again, {}) < 0.9 * peak_memory_bytes(kept, {})
    feeds = {**batch, **{n: p.data for n, p in model.named_parameters()}}
    a = get_backend("numpy").compile(kept).run(feeds)
    b = get_backend("numpy").compile(again).run(feeds)
    for n in a:
        np.testing.assert_array_equal(a[n], b[n], err_msg=n)


def test_losses_match_their_formulas():
    from tensorc.frontend import F
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((3, 4, 7)).astype(np.float32)
    labels = rng.integers(0, 7, (3, 4))
    labels[0, :2] = -100
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    keep = labels != -100
    nll = -np.take_along_axis(logp, np.where(keep, labels, 0)[..., None], -1)[..., 0]
    assert float(F.cross_entropy(logits, labels).numpy()) == pytest.approx(
        nll[keep].mean(), rel=1e-6)
    t = rng.standard_normal((3, 4, 7)).astype(np.float32)
    p = np.exp(t / 2) / np.exp(t / 2).sum(-1, keepdims=True)
    lq = logits / 2 - np.log(np.exp(logits / 2).sum(-1, keepdims=True))
    assert float(F.soft_cross_entropy(logits, t, 2.0).numpy()) == pytest.approx(
        -(p * lq).sum(-1).mean() * 4, rel=1e-5)
    a, b = rng.standard_normal((5, 3)), rng.standard_normal((5, 3))
    assert float(F.mse_loss(a.astype(np.float32), b.astype(np.float32)).numpy()) == \
        pytest.approx(((a - b) ** 2).mean(), rel=1e-5)
    an = a / np.linalg.norm(a, axis=1, keepdims=True)
    bn = b / np.linalg.norm(b, axis=1, keepdims=True)
    sims = an @ bn.T * 10.0

    def ce(s):   # rows of s against the diagonal
        return -(np.diag(s) - np.log(np.exp(s).sum(1))).mean()
    got = F.contrastive_loss(a.astype(np.float32), b.astype(np.float32), 10.0).numpy()
    assert float(got) == pytest.approx((ce(sims) + ce(sims.T)) / 2, rel=1e-5)


def test_accumulating_two_micro_batches_is_one_batch_of_both():
    from tensorc.training import TrainConfig, train_steps

    class Keep:   # an optimizer that records the gradients it is given
        def step(self, grads, lr=None):
            self.grads = {n: a.copy() for n, a in grads.items()}
    rng = np.random.default_rng(6)
    model = get("gpt", "tiny", seed=0)
    halves = [batch_for("clm", model, rng, batch=2) for _ in range(2)]
    for h in halves:
        h["labels"] = h["input_ids"]          # no ignored labels: equal counts per half
    whole = {k: np.concatenate([h[k] for h in halves]) for k in halves[0]}
    opts = []
    for batches, cfg in ((halves, TrainConfig(steps=1, accumulate=2, clip=None)),
                         ([whole], TrainConfig(steps=1, clip=None))):
        step = TrainStep(model, get_task("clm"), batches[0], backend="numpy")
        opts.append(Keep())
        list(train_steps(step, opts[-1], lambda i: 1e-3, iter(batches), cfg))
    for n, g in opts[1].grads.items():
        np.testing.assert_allclose(opts[0].grads[n], g, rtol=1e-4, atol=1e-7, err_msg=n)
