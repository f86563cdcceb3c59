"""The shard pass: every rank's local graph, run on a thread mesh, gives the
single-process answer; Megatron's collectives are where and as big as the formulas say."""

import numpy as np
import pytest

from tensorc.backends import get_backend
from tensorc.errors import TensorcError
from tensorc.ir import Graph, TensorType
from tensorc.loading import load_model
from tensorc.mesh import Mesh, Sharding
from tensorc.ops.collective import COLLECTIVES, comm_bytes
from tensorc.parallel.comm import run_threads
from tensorc.passes import run_pipeline
from tensorc.passes.shard import ShardError, plan, shard

RTOL = 1e-5


def run_sharded(graph, feeds, mesh, backend="numpy", specs=None, strategy="megatron"):
    """(plan, each rank's outputs, each rank's compiled local graph)."""
    p = plan(graph, mesh, strategy, specs)
    locs = [run_pipeline(p.local(r), "O2-local") for r in range(mesh.size)]
    exes = [get_backend(backend).compile(g) for g in locs]
    outs = run_threads(mesh, lambda grp: exes[grp.rank].run(p.local_inputs(feeds, grp.rank)))
    return p, outs, locs


def check_close(outs, want):
    for rank_out in outs:
        for k, w in want.items():
            err = np.abs(rank_out[k] - w).max() / np.abs(w).max()
            assert err <= RTOL, (k, err)


def load(name, preset="tiny", batch=2, **overrides):
    m = load_model(name, preset, overrides, batch=batch, seq=8 if name != "vit" else None)
    want = get_backend("numpy").compile(m.graph).run(m.inputs)
    assert all(np.abs(w).max() > 0 for w in want.values())
    return m, want


MESHES = ["tp=2", "tp=4", "dp=2", "tp=2,dp=2", "tp=4,dp=2"]


MODELS = [("gpt", {"vocab_size": 96}), ("gpt", {}), ("bert", {}), ("vit", {}),
          ("llama", {"vocab_size": 96})]
# every mesh that divides the model: llama tiny has 2 key/value heads, so no tp=4
CASES = [(name, o, mesh) for name, o in MODELS for mesh in MESHES
         if not (name == "llama" and "tp=4" in mesh)]


@pytest.mark.parametrize("name,overrides,mesh", CASES)
def test_tiny_matches_single_process(name, overrides, mesh):
    m, want = load(name, **overrides)
    p, outs, _ = run_sharded(m.graph, m.inputs, Mesh.parse(mesh))
    check_close(outs, want)


@pytest.mark.parametrize("name", ["gpt", "bert", "vit"])
def test_tiny_matches_on_llvm(name):
    m, want = load(name, vocab_size=96) if name == "gpt" else load(name)
    _, outs, _ = run_sharded(m.graph, m.inputs, Mesh.parse("tp=2,dp=2"), "llvm")
    check_close(outs, want)


@pytest.mark.parametrize("name,mesh", [("gpt", "tp=2,dp=2"), ("bert", "tp=4"),
                                       ("vit", "tp=2,dp=2")])
def test_small_one_layer_matches(name, mesh):
    m, want = load(name, "small", n_layer=1)
    _, outs, _ = run_sharded(m.graph, m.inputs, Mesh.parse(mesh))
    check_close(outs, want)


def collectives(g: Graph):
    return [n for n in g.nodes if n.op in COLLECTIVES]


@pytest.mark.parametrize("name,mesh", [("gpt", "tp=2"), ("gpt", "tp=4,dp=2"),
                                       ("llama", "tp=2,dp=2")])
def test_megatron_collectives_match_the_formulas(name, mesh):
    """Llama too: no biases (the residual add takes the all_reduce), RMSNorm, rotary
    embeddings, grouped-query attention (its 2 key/value heads split too), SwiGLU."""
    mesh = Mesh.parse(mesh)
    layers, b, s, h, v = 3, 4, 8, 32, 96
    m, _ = load(name, batch=b, n_layer=layers, vocab_size=v)
    p = plan(m.graph, mesh)
    assert p.notes == []
    g = p.local(0)
    got = [(n.op, n.attrs["axis"]) for n in collectives(g)]
    lb = b // mesh.dp
    # the embedding, then one per attention block and one per MLP block; the logits
    # gathered over tp (vocab), then over dp (batch)
    assert got == [("all_reduce", "tp")] * (1 + 2 * layers) + \
        [("all_gather", "tp")] + ([("all_gather", "dp")] if mesh.dp > 1 else [])
    per_layer = [n for n in collectives(g) if n.op == "all_reduce"]
    for n in per_layer:
        assert n.outputs[0].type.shape == (lb, s, h)
    p_tp = mesh.tp
    sent = sum(comm_bytes(n.op, n.inputs[0].type, n.outputs[0].type, n.attrs["size"])
               for n in collectives(g))
    want = (1 + 2 * layers) * 2 * (p_tp - 1) * lb * s * h * 4 // p_tp \
        + (p_tp - 1) * lb * s * v * 4 // p_tp \
        + (mesh.dp - 1) * b * s * v * 4 // mesh.dp
    assert sent == want


def test_each_rank_holds_its_share_of_the_weights():
    m, _ = load("gpt", vocab_size=96)
    whole = m.graph.param_count()
    locs = [shard(m.graph, Mesh(tp=4), r) for r in range(4)]
    per_rank = [g.param_count() for g in locs]
    assert len(set(per_rank)) == 1
    # what stays whole on every rank: layer norms, position table, row-parallel biases
    assert per_rank[0] < whole / 2
    q = [g.constants["blocks.0.attn.q.weight"].data for g in locs]
    assert np.array_equal(np.concatenate(q, axis=1),
                          m.graph.constants["blocks.0.attn.q.weight"].data)


def test_fusion_never_reaches_across_a_collective():
    m, want = load("gpt", vocab_size=96)
    _, outs, locs = run_sharded(m.graph, m.inputs, Mesh.parse("tp=2"), "llvm")
    check_close(outs, want)
    g = locs[0]
    assert "fused" in g.op_counts()
    assert len(collectives(g)) == 1 + 2 * 2 + 1   # all still top-level nodes
    for n in g.nodes:
        if n.op == "fused":
            assert not collectives(n.attrs["body"])


def test_heads_that_do_not_divide_are_a_clear_error():
    m, _ = load("gpt")
    with pytest.raises(ShardError, match=r"tp=8 does not divide the 4 heads of layer 0"):
        plan(m.graph, Mesh(tp=8))


def test_key_value_heads_that_do_not_divide_are_a_clear_error():
    m, _ = load("llama")
    with pytest.raises(ShardError, match=r"tp=4 does not divide the 2 key/value heads"):
        plan(m.graph, Mesh(tp=4))


def test_batch_that_does_not_divide_is_a_clear_error():
    m, _ = load("gpt", batch=3)
    with pytest.raises(ShardError, match="dp=2 does not divide the batch 3"):
        plan(m.graph, Mesh(dp=2))


def test_vocab_that_does_not_divide_stays_whole_with_a_note():
    m, _ = load("gpt")   # vocab 97
    p = plan(m.graph, Mesh(tp=2))
    assert any("97 rows of embedding" in n for n in p.notes)
    assert p.local(0).constants["wte.weight"].type.shape == (97, 32)


def _mlp(n=8):
    g = Graph("mlp")
    x = g.add_input("x", TensorType((4, n), "f32"))
    rng = np.random.default_rng(0)
    w = g.add_constant("w", rng.standard_normal((n, n)).astype(np.float32))
    y = g.add("matmul", x, w)
    g.rename(y, "y")
    g.outputs = [g.add("trilu", g.add("tanh", y))]
    feeds = {"x": rng.standard_normal((4, n)).astype(np.float32)}
    return g, feeds


def test_partial_to_split_is_a_reduce_scatter_and_unknown_ops_fall_back():
    g, feeds = _mlp()
    want = get_backend("numpy").compile(g).run(feeds)
    specs = {"x": Sharding((None, "tp")), "w": Sharding(("tp", None)),
             "y": Sharding((None, "tp"))}
    p, outs, locs = run_sharded(g, feeds, Mesh(tp=2), specs=specs, strategy=None)
    check_close(outs, want)
    ops = [n.op for n in collectives(locs[0])]
    assert ops == ["reduce_scatter", "all_gather"]   # y, then trilu's operand whole
    assert any("trilu" in n and "computed whole" in n for n in p.notes)


def test_bad_specs_are_clear_errors():
    g, _ = _mlp()
    with pytest.raises(ShardError, match="does not have"):
        plan(g, Mesh(tp=2), specs={"nope": Sharding((None,))})
    with pytest.raises(ShardError, match="has 1 dims"):
        plan(g, Mesh(tp=2), specs={"x": Sharding(("tp",))})
    with pytest.raises(ShardError, match="cannot be split 3 ways"):
        plan(g, Mesh(tp=3), specs={"x": Sharding((None, "tp"))})
    with pytest.raises(ShardError, match="unknown strategy"):
        plan(g, Mesh(tp=2), strategy="zigzag")
    assert issubclass(ShardError, TensorcError)


def test_registered_pass_gives_the_same_local_graph():
    m, _ = load("gpt", vocab_size=96)
    by_pass = run_pipeline(m.graph, "shard:tp=2:dp=2:rank=3")
    assert str(by_pass) == str(shard(m.graph, Mesh(tp=2, dp=2), 3))


def test_inspect_mesh_reports_ranks_and_collectives(capsys):
    from tensorc import cli
    argv = ["inspect", "gpt", "--set", "vocab_size=96", "--batch", "2", "--mesh", "tp=2,dp=2"]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "ranks 0,1,2,3: params" in text
    assert "5 x all_reduce     over tp  f32[1,16,32]" in text
    assert cli.main(argv + ["--format", "json"]) == 0
    import json
    rep = json.loads(capsys.readouterr().out)
    (grp,) = rep["per_rank"]
    assert grp["ranks"] == [0, 1, 2, 3]
    assert grp["sent_bytes"] == rep["analytic_min_bytes"] > 0
    assert grp["params"] < rep["whole_params"]


def test_inspect_mesh_that_does_not_divide_is_one_line(capsys):
    from tensorc import cli
    assert cli.main(["inspect", "gpt", "--mesh", "tp=8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "tp=8 does not divide the 4 heads" in err


@pytest.mark.parametrize("name,mesh", [("gpt", "tp=2"), ("gpt", "dp=2"), ("gpt", "tp=2,dp=2"),
                                       ("bert", "tp=2,dp=2"), ("llama", "tp=2,dp=2")])
def test_training_step_gradients_match_single_process(name, mesh):
    """The step sharded after `grad`: loss and every gradient equal the single-process
    step's on the whole batch; a split weight's gradient is the rank's slice of it."""
    from tensorc.models import get
    from tensorc.passes.shard import plan_step
    from tensorc.training import (
        DEFAULT_TASKS,
        as_inputs,
        example_batch,
        get_task,
        loss_graph,
        step_graph,
    )
    mesh = Mesh.parse(mesh)
    model = get(name, "tiny", vocab_size=96)
    task = get_task(DEFAULT_TASKS[name])
    batch = example_batch(model, DEFAULT_TASKS[name], 4, 8)
    whole, names = step_graph(model, task, batch, passes="O0")
    feeds = {v.name: batch[v.name] for v in whole.inputs if v.name in batch}
    feeds.update((n, p.data) for n, p in model.named_parameters())
    want = get_backend("numpy").compile(whole).run(feeds)
    forward, names = loss_graph(model, task, batch)
    p = plan_step(as_inputs(forward, names), "loss", names, mesh)
    locs = [run_pipeline(p.local(r), "O2-local") for r in range(mesh.size)]
    exes = [get_backend("numpy").compile(g) for g in locs]
    outs = run_threads(mesh, lambda grp: exes[grp.rank].run(p.local_inputs(feeds, grp.rank)))
    scale = max(np.abs(w).max() for w in want.values())
    for r, out in enumerate(outs):
        assert abs(out["loss"] - want["loss"]) <= RTOL * abs(want["loss"])
        for n in names:
            (w,) = p.local_inputs({n: want["grad." + n]}, r).values()
            # some gradients are zero but for rounding (a key bias): against the largest
            np.testing.assert_allclose(out["grad." + n], w, rtol=RTOL, atol=RTOL * scale,
                                       err_msg=n)
    axes = {(n.op, n.attrs["axis"]) for n in collectives(locs[0])}
    for a in ("tp", "dp"):   # Megatron's f in the backward; data parallel's gradient sum
        assert (("all_reduce", a) in axes) == (mesh.sizes[a] > 1)
    if name == "gpt":   # Megatron's volume: per layer 2 all_reduces forward, 2 backward,
        # and one each way at the embedding / tied head (norms' small sums aside)
        stream = (4 // mesh.dp, 8, 32)
        big = [n for n in collectives(locs[0]) if n.op == "all_reduce"
               and n.attrs["axis"] == "tp" and n.outputs[0].type.shape == stream]
        assert len(big) == (2 * (1 + 2 * 2) if mesh.tp > 1 else 0)
    q = next(n for n in names if n.endswith("0.attn.q.weight"))
    shapes = [{v.name: v.type.shape for v in g.inputs}[q] for g in (whole, locs[0])]
    assert shapes[1] == (shapes[0][0], shapes[0][1] // mesh.tp)   # column-parallel
