"""Data-parallel training (tensorc/parallel/data_parallel.py): a dp run on threads equals
the single-process run on the whole batch, plain and ZeRO-1, SGD and AdamW with clipping,
dropout on; the bucketed all-reduces sit where their gradients are ready; the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tensorc.cli import main
from tensorc.ir import Graph
from tensorc.mesh import Mesh
from tensorc.models import get
from tensorc.ops.collective import comm_bytes
from tensorc.ops.nn import _dropout_ref
from tensorc.optim import AdamW, load_checkpoint
from tensorc.parallel.comm import run_threads
from tensorc.parallel.data_parallel import (
    WEIGHT,
    DataParallel,
    data_parallel_graph,
    plan_buckets,
    shift_dropout,
)
from tensorc.training import Run, TrainConfig, example_batch, fit, get_task, step_graph
from tensorc.types import TensorType

TINY = {"d_model": 16, "d_ff": 32, "n_layer": 1}
BUCKET_MB = 0.004   # ~1000 floats: several buckets even in a tiny model


def rel_err(a, b, floor=0.0):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), floor, 1e-30))


def _run(tmp, model, task, backend, **over):
    return Run(model, "tiny", {**TINY, **over}, task, batch=6, seq=8, data_bytes=60_000,
               backend=backend, out=str(tmp))


@pytest.mark.parametrize("model,task,backend,dp,zero,optimizer,accumulate,over", [
    ("gpt", "clm", "numpy", 2, False, "adamw", 1, {}),
    ("gpt", "clm", "llvm", 2, True, "adamw", 2, {}),
    ("gpt", "clm", "llvm", 3, False, "sgd", 1, {}),
    ("gpt", "clm", "numpy", 3, True, "sgd", 1, {"dropout": 0.2}),
    ("gpt", "clm", "llvm", 2, False, "adamw", 1, {"dropout": 0.2}),
    ("bert", "mlm", "numpy", 2, True, "adamw", 1, {}),   # ranks count different labels
    ("vit", "classify", "llvm", 2, True, "sgd", 1, {}),
])
def test_dp_run_equals_single_process(tmp_path, model, task, backend, dp, zero, optimizer,
                                      accumulate, over):
    # AdamW at its default lr: its update divides by sqrt(v) + 1e-8, so a gradient near
    # 1e-8 that is a cancelling sum turns its rounding into lr-sized steps (at lr 1e-2 the
    # weights of an accumulated run differ by 2e-5; SGD's by 3e-8)
    lr = 1e-3 if optimizer == "adamw" else 1e-2
    cfg = TrainConfig(steps=3, lr=lr, warmup=0, optimizer=optimizer, clip=0.05,
                      accumulate=accumulate)
    single, ranks = [], []
    fit(_run(tmp_path / "one", model, task, backend, **over), cfg, on_step=single.append)

    def rank(groups):
        par = DataParallel(groups, zero=zero, bucket_mb=BUCKET_MB)
        fit(_run(tmp_path / "dp", model, task, backend, **over), cfg,
            on_step=ranks.append if par.writer else None, parallel=par)
        return par.buckets
    buckets = run_threads(Mesh(dp=dp), rank)[0]
    assert len(buckets) > 1
    assert all(r["grad_norm"] > cfg.clip for r in single)   # clipping was at work
    for a, b in zip(single, ranks, strict=True):             # the global mean loss
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * a["grad_norm"]
    one, par = load_checkpoint(tmp_path / "one"), load_checkpoint(tmp_path / "dp")
    for name, w in one.params.items():
        assert rel_err(par.params[name], w) <= 1e-5, name
    # the whole optimizer state, gathered under ZeRO; a gradient that is zero in exact
    # arithmetic (the key bias's) is rounding noise in both, hence the floor
    for name, s in one.optimizer_state.items():
        assert rel_err(par.optimizer_state[name], s, floor=1e-6) <= 1e-5, name
    assert par.optimizer_hyper == one.optimizer_hyper


def _step(model="gpt", task="clm"):
    m = get(model, "tiny", **TINY)
    return step_graph(m, get_task(task), example_batch(m, task, batch=2, seq=8))


def test_buckets_follow_the_backward_and_sit_where_ready():
    graph, names = _step()
    n_nodes = len(graph.nodes)
    buckets = plan_buckets(graph, names, BUCKET_MB * 2**20)
    assert sorted(n for b in buckets for n in b.names) == sorted(names)
    for b in buckets:   # at most the cap, unless one gradient alone is bigger
        assert 4 * b.size <= BUCKET_MB * 2**20 or len(b.names) == 1
    producer = {v.name: i for i, n in enumerate(graph.nodes) for v in n.outputs}
    ready = [producer.get("grad." + n, -1) for b in buckets for n in b.names]
    assert ready == sorted(ready)   # the order backward finishes them

    dp_graph, grad_names = data_parallel_graph(graph, names, 2, buckets)
    assert grad_names == [n for b in buckets for n in b.names]
    reduces = [i for i, n in enumerate(dp_graph.nodes) if n.op == "all_reduce"]
    assert len(reduces) == len(buckets) + 1   # one per bucket, one for the loss
    # the first bucket's all-reduce runs before the backward is over
    assert reduces[1] < n_nodes - len(buckets)
    # every bucket's nodes come right after its last gradient: nothing but its own
    # flattening and weighting between them
    at = {v: i for i, n in enumerate(dp_graph.nodes) for v in n.outputs}
    for j in reduces[1:]:
        weighted = dp_graph.nodes[j].inputs[0].producer              # flat * dp.weight
        flat = weighted.inputs[0].producer                            # concat (or a reshape)
        parts = [v.producer for v in flat.inputs] if flat.op == "concat" else [flat]
        last = max(at.get(p.inputs[0], -1) for p in parts)
        assert {n.op for n in dp_graph.nodes[last + 1:j]} <= {"reshape", "concat", "mul"}
    # bytes per rank: the ring all-reduce of every gradient once (and the loss)
    sent = sum(comm_bytes(n.op, n.inputs[0].type, n.outputs[0].type, 2)
               for n in dp_graph.nodes if n.op == "all_reduce")
    grad_bytes = sum(4 * b.size for b in buckets)
    assert sent == grad_bytes + 4   # 2 (p - 1) / p = 1 at p = 2


def test_zero_keeps_a_slice_of_the_optimizer_state():
    m0 = get("gpt", "tiny", **TINY)
    batch = example_batch(m0, "clm", batch=6, seq=8)

    def rank(groups):
        dp = DataParallel(groups, zero=True, bucket_mb=BUCKET_MB)
        m = get("gpt", "tiny", **TINY)
        step = dp.step(m, get_task("clm"), dp.shard(batch), "numpy")
        opt = dp.optimizer(step.params, AdamW)
        return opt.state_bytes(), sum(b.size for b in dp.buckets)
    (state, padded), _, _ = run_threads(Mesh(dp=3), rank)
    whole = AdamW({n: p.data for n, p in m0.named_parameters()}).state
    plain = sum(a.nbytes for per in whole.values() for a in per.values())
    assert state == 2 * 4 * padded // 3       # exp_avg and exp_avg_sq of 1/3 of the floats
    assert plain // 3 <= state < plain // 3 + 2 * 4 * 3 * len(_step()[1])


def test_dropout_masks_follow_the_rows():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 3, 5)).astype(np.float32) + 1.0
    seed, salt = np.array(1234, np.int64), 3
    whole = _dropout_ref(x, seed, p=0.5, salt=salt)
    for start in (0, 2, 4):
        g = Graph()
        v = g.add_input("x", TensorType((2, 3, 5), "f32"))
        s = g.add_input("seed", TensorType((), "i64"))
        g.outputs = [g.add("dropout", v, s, p=0.5, salt=salt)]
        shift_dropout(g, start, 2)
        got = _dropout_ref(x[start:start + 2], seed, **g.nodes[0].attrs)
        np.testing.assert_array_equal(got, whole[start:start + 2])
    unshifted = _dropout_ref(x[2:4], seed, p=0.5, salt=salt)
    assert not np.array_equal(unshifted, whole[2:4])   # without the shift: other masks


def test_shard_weights_by_counted_labels():
    batch = {"input_ids": np.zeros((4, 3), np.int64),
             "labels": np.array([[1, -100, -100]] * 2 + [[1, 2, 3]] * 2)}
    shares = run_threads(Mesh(dp=2), lambda g: float(DataParallel(g).shard(batch)[WEIGHT]))
    assert shares == [2 / 8, 6 / 8]


def test_train_cli_mesh_equals_the_whole_batch(tmp_path, capsys):
    base = ["train", "gpt", "--set", "d_model=16", "--set", "d_ff=32", "--set", "n_layer=1",
            "--steps", "3", "--batch", "4", "--seq", "8", "--data-bytes", "60000", "--quiet",
            "--clip", "0.05"]
    assert main(base + ["-o", str(tmp_path / "one")]) == 0
    one = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(base + ["-o", str(tmp_path / "dp"), "--mesh", "dp=2", "--mesh-threads", "--zero",
                        "--bucket-mb", "0.004"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len([line for line in out if line.startswith("{")]) == 1   # rank 0 alone prints
    dp = json.loads(out[-1])
    assert abs(dp["loss"] - one["loss"]) <= 1e-4 and dp["checkpoint"] == str(tmp_path / "dp")
    a, b = load_checkpoint(tmp_path / "one"), load_checkpoint(tmp_path / "dp")
    for name, w in a.params.items():
        assert rel_err(b.params[name], w) <= 1e-5, name


@pytest.mark.parametrize("argv,message", [
    (["--mesh", "tp=2,pp=2", "--zero"], "--zero shards the optimizer over dp only; mesh pp=2,tp=2"),
    (["--mesh", "dp=3", "--batch", "4"], "batch 4 does not split over dp=3"),
    (["--zero"], "--zero shards the optimizer over --mesh dp=N ranks"),
    (["--mesh", "dp=x"], "bad mesh 'dp=x'"),
])
def test_train_mesh_errors_are_one_line(argv, message, capsys):
    assert main(["train", "gpt", "--steps", "1", "--data-bytes", "60000", "--quiet"]
                + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "\n".join(err)


def test_zero_resumes_a_single_process_checkpoint(tmp_path):
    """A checkpoint's whole optimizer state is sliced over the ranks on resume, and
    gathered back when they write: the run continues as the single process would."""
    cfg = TrainConfig(steps=4, lr=1e-3, warmup=0, clip=0.05)
    fit(_run(tmp_path / "straight", "gpt", "clm", "numpy"), cfg)

    class Stop(Exception):
        pass

    def stop_at_2(r):
        if r["step"] == 2:
            raise Stop
    half = _run(tmp_path / "half", "gpt", "clm", "numpy")
    half.eval_every = 2
    with pytest.raises(Stop):
        fit(half, cfg, on_step=stop_at_2)
    assert load_checkpoint(half.out).step == 2
    run_threads(Mesh(dp=2), lambda g: fit(half, cfg, resume=half.out, parallel=DataParallel(
        g, zero=True, bucket_mb=BUCKET_MB)))
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(half.out)
    assert b.step == 4
    for name, w in a.params.items():
        assert rel_err(b.params[name], w) <= 1e-5, name
    for name, s in a.optimizer_state.items():
        assert rel_err(b.optimizer_state[name], s, floor=1e-6) <= 1e-5, name
