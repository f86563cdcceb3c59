"""Pipeline parallelism (tensorc/parallel/pipeline.py): the cut, the schedules and their
timeline, and the runtime on a thread mesh against the single-process answer."""

import functools

import numpy as np
import pytest

from tensorc.backends import get_backend
from tensorc.loading import load_model
from tensorc.mesh import Mesh
from tensorc.models import get
from tensorc.parallel.comm import run_threads
from tensorc.parallel.pipeline import (
    PipelineForward,
    PipelineStep,
    backward_graph,
    cut,
    default_compile,
    split_batch,
)
from tensorc.parallel.schedule import (
    Action,
    PipelineError,
    depends,
    gpipe,
    one_f_one_b,
    simulate,
    timeline_png,
    timeline_text,
)
from tensorc.passes import run_pipeline
from tensorc.training import DEFAULT_TASKS, FORWARD_PASSES, TrainStep, example_batch, get_task

MODELS = ("gpt", "bert", "vit")
BATCH = 4
VIT = {"image_size": 8, "patch_size": 2, "channels": 1, "vocab_size": 10}


def sizes(name):
    return {} if name == "vit" else {"seq": 8}


@functools.cache
def model(name, layers=3, symbolic=False):
    """A tiny model traced at BATCH (symbolic: at any batch), and its numpy answer."""
    m = load_model(name, overrides={"n_layer": layers}, batch=BATCH, symbolic=symbolic,
                   **sizes(name))
    return m, get_backend("numpy").compile(m.graph).run(m.inputs)


@functools.cache
def stages_of(name, p, layers=3):
    m, _ = model(name, layers, symbolic=True)
    return cut(run_pipeline(m.graph, FORWARD_PASSES), p, env={"batch": 1, "seq": 8})


def rel_err(got, want):
    return float(np.abs(got - want).max() / np.abs(want).max())


# --- the cut ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("p", [2, 3])
def test_cut_at_layer_boundaries(name, p):
    """Consecutive layers per stage, one activation crossing each boundary (a mask is
    computed again from the inputs, not sent), every layer on exactly one stage, costs
    balanced (each stage within the largest layer of the mean), the graph inputs it reads
    among its inputs."""
    stages = stages_of(name, p, layers=6)
    layers = [x for s in stages for x in s.layers]
    assert len(layers) == 6 == len(set(layers))
    assert [int(x.rsplit(".", 1)[1]) for x in layers] == list(range(6))
    for s in stages[:-1]:
        assert len(s.send) == 1, s
    for s in stages[1:]:
        assert len(s.recv) == 1, s
        assert s.graph.inputs[0].name == s.recv[0]
    for a, b in zip(stages, stages[1:], strict=False):
        assert a.send == b.recv
    if name == "bert":   # every stage reads the attention mask from the inputs
        assert all("attention_mask" in [v.name for v in s.graph.inputs] for s in stages)
    flops = [s.flops for s in stages]
    assert min(flops) > 0 and max(flops) < 2 * sum(flops) / p
    assert all(s.param_bytes > 0 for s in stages)


def test_cut_balances_cost():
    """Six gpt layers in two stages: three each (the head's cost tips none over)."""
    stages = stages_of("gpt", 2, layers=6)
    assert [len(s.layers) for s in stages] == [3, 3]


def test_cut_errors():
    m, _ = model("gpt", 2)
    g = run_pipeline(m.graph, FORWARD_PASSES)
    with pytest.raises(PipelineError, match="2 layers, fewer than the 3 pipeline stages"):
        cut(g, 3)
    with pytest.raises(PipelineError, match="positive number of stages"):
        cut(g, 0)
    assert len(cut(g, 1)) == 1 and cut(g, 1)[0].graph.outputs[0].name == "logits"


# --- schedules and the timeline ---------------------------------------------------------

@pytest.mark.parametrize("p,m", [(1, 1), (2, 1), (2, 4), (3, 2), (4, 8), (5, 3)])
def test_bubble_formula(p, m):
    """Balanced stages: GPipe's bubble is (p-1)/(m+p-1), 1F1B's the same, with at most
    p - s micro-batches in flight on stage s (GPipe: m)."""
    want = (p - 1) / (m + p - 1)
    g, f = simulate(gpipe(p, m)), simulate(one_f_one_b(p, m))
    assert g.bubble == pytest.approx(want) and f.bubble == pytest.approx(want)
    assert g.makespan == pytest.approx(f.makespan) == pytest.approx(3 * (m + p - 1))
    assert g.in_flight() == [m] * p
    assert f.in_flight() == [min(p - s, m) for s in range(p)]
    assert simulate(gpipe(p, m, backward=False)).bubble == pytest.approx(want)


@pytest.mark.parametrize("schedule", [gpipe, one_f_one_b])
@pytest.mark.parametrize("p,m", [(2, 3), (3, 4), (4, 2)])
def test_timeline_respects_dependencies(schedule, p, m):
    """Each stage runs F and B of every micro-batch once, each action after what it
    depends on, never two at once; unbalanced stages too."""
    tl = simulate(schedule(p, m), forward=[1.0 + 0.5 * s for s in range(p)],
                  backward=[3.0] * p)
    end = {(s, a): e for s, row in enumerate(tl.rows) for _, e, a in row}
    for s, row in enumerate(tl.rows):
        assert sorted((a.kind, a.micro) for _, _, a in row) == \
            sorted((k, i) for k in "FB" for i in range(m))
        for (start, _, _), (_, prev_end, _) in zip(row[1:], row, strict=False):
            assert start >= prev_end
        for start, _, a in row:
            assert all(start >= end[d] for d in depends(s, a, p))


def test_deadlocked_schedule():
    bad = [[Action("B", 0), Action("F", 0)], [Action("F", 0), Action("B", 0)]]
    with pytest.raises(PipelineError, match="deadlocks"):
        simulate(bad)
    with pytest.raises(PipelineError, match="forward costs"):
        simulate(gpipe(2, 2), forward=[1.0])


def test_timeline_text_and_png(tmp_path):
    text = timeline_text(simulate(gpipe(3, 3), backward=1.0))
    assert text.splitlines()[0] == "stage 0 | F0 F1 F2 .  .  .  .  B2 B1 B0"
    assert text.splitlines()[2] == "stage 2 | .  .  F0 F1 F2 B2 B1 B0 .  ."
    assert text.endswith("p=3 stages, m=3 micro-batches: makespan 10, bubble 40.0%")
    assert "B0 --" in timeline_text(simulate(one_f_one_b(2, 2)))   # backward: 2 cells
    path = tmp_path / "timeline.png"
    timeline_png(simulate(one_f_one_b(3, 4)), str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- the runtime ------------------------------------------------------------------------

def run_inference(name, p, backend, schedule, ms=(1, 2, 4)):
    full, ref = model(name)
    stages = stages_of(name, p)

    def rank(groups):
        pipe = PipelineForward(stages, groups, schedule, default_compile(backend))
        return [pipe.run(full.inputs, m) for m in ms]
    for per_rank in run_threads(Mesh(pp=p), rank):
        for got in per_rank:
            assert set(got) == set(ref)
            for k in ref:
                assert got[k].shape == ref[k].shape
                assert rel_err(got[k], ref[k]) <= 1e-5


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("p", [1, 2, 3])
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_forward_numpy(name, p, schedule):
    """Every rank gets the single-process outputs, for m = 1, 2, 4 micro-batches."""
    run_inference(name, p, "numpy", schedule)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("p,schedule", [(1, "gpipe"), (2, "gpipe"), (3, "1f1b")])
def test_forward_llvm(name, p, schedule):
    run_inference(name, p, "llvm", schedule)


def test_runtime_errors():
    full, _ = model("gpt")
    with pytest.raises(PipelineError, match="3 stages need a pp axis of 3 ranks"):
        run_threads(Mesh(pp=2), lambda g: PipelineForward(stages_of("gpt", 3), g))
    with pytest.raises(PipelineError, match="does not split into 3 equal micro-batches"):
        split_batch(full.inputs, 3)
    fixed = cut(run_pipeline(full.graph, FORWARD_PASSES), 2)   # traced at the whole batch
    with pytest.raises(PipelineError, match="micro-batch does not fit the stages"):
        run_threads(Mesh(pp=2), lambda g: PipelineForward(fixed, g).run(full.inputs, 2))
    with pytest.raises(PipelineError, match="unknown pipeline schedule"):
        run_threads(Mesh(pp=2), lambda g: PipelineForward(stages_of("gpt", 2), g, "zigzag"))


def train_case(name, p, m, schedule, backend="numpy"):
    """Gradients of every weight (gathered from the ranks) and the loss, against one
    TrainStep on the whole batch."""
    task = DEFAULT_TASKS[name]
    overrides = {"n_layer": 3, **(VIT if name == "vit" else {})}
    batch = example_batch(get(name, "tiny", **overrides), task, batch=BATCH, **sizes(name))
    want_loss, want = TrainStep(get(name, "tiny", **overrides), get_task(task), batch,
                                backend="numpy")(batch)
    want = {n: g.copy() for n, g in want.items()}

    def rank(groups):
        step = PipelineStep(get(name, "tiny", **overrides), get_task(task), batch, groups,
                            m, schedule, backend)
        loss, grads = step(batch)
        assert set(grads) == set(step.params)
        return loss, grads
    got = {}
    for loss, grads in run_threads(Mesh(pp=p), rank):
        assert loss == pytest.approx(want_loss, rel=1e-5)
        for n, g in grads.items():   # a tied weight: the same sum on each rank holding it
            if n in got:
                np.testing.assert_array_equal(got[n], g)
            got[n] = g
    assert set(got) == set(want)
    # k's bias has no gradient (softmax ignores a per-row shift): ~1e-12 noise, so the
    # tolerance is relative to the largest gradient, not to each tensor's own
    scale = max(np.abs(g).max() for g in want.values())
    worst = max(np.abs(got[n] - want[n]).max() for n in want) / scale
    assert worst <= 1e-5, worst


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("p,m,schedule", [(2, 2, "1f1b"), (3, 4, "gpipe"), (3, 1, "1f1b")])
def test_training_gradients(name, p, m, schedule):
    train_case(name, p, m, schedule)


@pytest.mark.parametrize("name", MODELS)
def test_training_gradients_llvm(name):
    train_case(name, 2, 4, "1f1b", "llvm")


def test_backward_graph_shape():
    """A middle stage's backward: its weights' gradients and the received activation's,
    from the cotangent of what it sends; the last stage's from the loss alone."""
    m, _ = model("gpt")
    from tensorc.passes.autodiff import as_inputs
    from tensorc.training import loss_graph
    task = get_task("clm")
    gm = get("gpt", "tiny", n_layer=3)
    batch = example_batch(gm, "clm", batch=1, seq=8)
    graph, names = loss_graph(gm, task, batch)
    stages = cut(run_pipeline(as_inputs(graph, names), FORWARD_PASSES), 3, weights=names)
    mid = backward_graph(stages[1])
    assert [v.name for v in mid.inputs if v.name.startswith("cot.")] == \
        ["cot." + stages[1].send[0]]
    assert sorted(v.name for v in mid.outputs) == sorted(
        "grad." + n for n in stages[1].params + stages[1].recv)
    last = backward_graph(stages[2], 0.25)
    assert not any(v.name.startswith("cot.") for v in last.inputs)
    assert "grad.wte.weight" in [v.name for v in last.outputs]   # tied: the head's share


@pytest.mark.parametrize("clip", [None, 0.05])
def test_train_steps_with_a_pipeline_step(clip):
    """PipelineStep plugs into training.train_steps and an optimizer like a TrainStep:
    two SGD steps leave every rank's weights where the single-process run leaves them.
    (SGD: AdamW divides k's bias's ~1e-12 noise gradient by its own size, so it moves
    that bias by ~lr * 1e-4 either way.) Clipping by the global norm is the step's own
    (train_steps clips by the norm of the gradients it is given: one stage's)."""
    import itertools

    from tensorc.training import TrainConfig, make_optimizer, train_steps
    cfg = TrainConfig(steps=2, lr=1e-2, clip=clip, optimizer="sgd")
    task = get_task("clm")
    batches = [example_batch(get("gpt", "tiny", n_layer=3), "clm", batch=BATCH, seq=8,
                             seed=i) for i in range(2)]

    def train(step):
        opt = make_optimizer(step.params, cfg, "numpy")
        records = list(train_steps(step, opt, lambda i: cfg.lr, itertools.cycle(batches), cfg))
        return [r["loss"] for r in records], {n: a.copy() for n, a in step.params.items()}
    want_losses, want = train(TrainStep(get("gpt", "tiny", n_layer=3), task, batches[0],
                                        backend="numpy"))
    ranks = run_threads(Mesh(pp=3), lambda g: train(PipelineStep(
        get("gpt", "tiny", n_layer=3), task, batches[0], g, 2, clip=clip)))
    for losses, params in ranks:
        assert losses == pytest.approx(want_losses, rel=1e-5)
        for n, a in params.items():
            np.testing.assert_allclose(a, want[n], rtol=1e-5, atol=1e-6)
    assert set().union(*(p for _, p in ranks)) == set(want)


def test_pp_axis_of_a_larger_mesh():
    """On pp=2 x dp=2 each dp replica is its own pipeline over its pp group."""
    full, ref = model("bert")
    stages = stages_of("bert", 2)
    for got in run_threads(Mesh(pp=2, dp=2), lambda g: PipelineForward(stages, g).run(
            full.inputs, 2)):
        assert rel_err(got["logits"], ref["logits"]) <= 1e-5


def test_step_stages_sharded_over_tp():
    """tp=2 x pp=3: each rank's gradients are its slices of the whole step's, the tied
    embedding and head split alike on the first and last stage (vocabulary 96) and the
    middle stage, which holds neither, taking part in their all-reduce at their size."""
    def make():
        return get("gpt", "tiny", n_layer=3, vocab_size=96)
    task = get_task("clm")
    batch = example_batch(make(), "clm", batch=4, seq=8)
    want_loss, want = TrainStep(make(), task, batch, backend="numpy")(batch)
    want = {n: g.copy() for n, g in want.items()}
    mesh = Mesh(tp=2, pp=3)

    def rank(groups):
        step = PipelineStep(make(), task, batch, groups, 2)
        loss, grads = step(batch)
        return groups.rank, loss, step.specs, {n: g.copy() for n, g in grads.items()}
    split = set()
    scale = max(np.abs(g).max() for g in want.values())   # k's bias: ~1e-12 noise
    for r, loss, specs, grads in run_threads(mesh, rank):
        assert loss == pytest.approx(want_loss, rel=1e-5)
        for n, g in grads.items():
            w = want[n]
            for d, ax in enumerate(specs[n].dims if n in specs else ()):
                if ax:
                    w = np.split(w, 2, axis=d)[mesh.coords(r)["tp"]]
                    split.add(n)
            assert np.abs(g - w).max() <= 1e-5 * scale, n
    assert "wte.weight" in split and "blocks.1.ff.up.weight" in split


def test_measured_timeline():
    """The ranks' measured forward/backward times placed on the schedule: every stage
    has a positive cost and the bubble is what the timeline says it is."""
    task = get_task("clm")
    batch = example_batch(get("gpt", "tiny", n_layer=3), "clm", batch=BATCH, seq=8)

    def rank(groups):
        step = PipelineStep(get("gpt", "tiny", n_layer=3), task, batch, groups, 4)
        step(batch)
        return step.measured_timeline(4)
    for tl in run_threads(Mesh(pp=3), rank):
        assert len(tl.rows) == 3 and all(len(row) == 8 for row in tl.rows)
        assert all(end > start for row in tl.rows for start, end, _ in row)
        assert 0 < tl.bubble < 1


def test_sends_the_analytic_minimum():
    """A step moves one activation per boundary and micro-batch forward and its gradient
    back: each rank sends batch x seq x d_model x 4 bytes to each neighbour it has,
    however many micro-batches (the minimum: the residual stream must cross)."""
    task = get_task("clm")
    gm = get("gpt", "tiny", n_layer=3)
    batch = example_batch(gm, "clm", batch=BATCH, seq=8)
    whole = BATCH * 8 * gm.config.d_model * 4

    def rank(groups):
        step = PipelineStep(get("gpt", "tiny", n_layer=3), task, batch, groups, 4)
        step(batch)
        return step.sent_bytes
    assert run_threads(Mesh(pp=3), rank) == [whole, 2 * whole, whole]


def test_encoder_decoder_forwards_the_memory():
    """transformer: the encoder's output is read by every decoder layer, so a middle
    stage receives it and sends it on beside its own activation."""
    full, ref = model("transformer", 2)
    stages = cut(run_pipeline(full.graph, FORWARD_PASSES), 3)
    memory = stages[0].send[0]
    assert stages[1].recv == [memory] and memory in stages[2].recv
    assert len(stages[1].send) == 2
    for got in run_threads(Mesh(pp=3), lambda g: PipelineForward(stages, g).run(full.inputs)):
        assert rel_err(got["logits"], ref["logits"]) <= 1e-5
