"""`tensorc train --mesh` beyond data parallel (`tensorc/parallel/strategy.py`): tensor
parallel (tp, tp x dp), pipeline parallel (pp, pp x dp) and both (tp x pp, tp x dp x pp:
each stage sharded over tp) training leave the checkpoint rank 0
writes (whole weights and optimizer state, gathered) where the single-process run on the
whole batch leaves it; resuming slices a whole checkpoint; what is not supported is one
error line before any rank starts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tensorc.cli import main
from tensorc.mesh import Mesh
from tensorc.optim import load_checkpoint
from tensorc.parallel import strategy_for
from tensorc.parallel.comm import run_threads
from tensorc.training import Run, TrainConfig, fit

BASE = ["train", "gpt", "--set", "d_model=16", "--set", "d_ff=32", "--set", "n_layer=2",
        "--steps", "3", "--batch", "4", "--seq", "8", "--data-bytes", "60000", "--quiet",
        "--clip", "0.05"]   # clipping at work: the global norm is ~1.3


def _rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-6))


def _same_checkpoint(got, want):
    a, b = load_checkpoint(want), load_checkpoint(got)
    assert b.step == a.step and set(b.params) == set(a.params)
    assert set(b.optimizer_state) == set(a.optimizer_state)
    for name, w in a.params.items():
        assert _rel(b.params[name], w) <= 1e-5, name
    for name, s in a.optimizer_state.items():
        assert _rel(b.optimizer_state[name], s) <= 1e-5, name


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The single-process run per optimizer and arguments that the mesh run shares:
    (its summary line, its checkpoint)."""
    done = {}

    def get(optimizer, capsys, same=()):
        key = optimizer, tuple(same)
        if key not in done:
            out = tmp_path_factory.mktemp(optimizer) / "ck"
            assert main(BASE + ["--optimizer", optimizer, "-o", str(out), *same]) == 0
            line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
            done[key] = line, out
        return done[key]
    return get


@pytest.mark.parametrize("optimizer,mesh", [
    ("adamw", ["tp=2"]),
    ("sgd", ["tp=2"]),
    ("adamw", ["tp=2,dp=2"]),
    ("adamw", ["pp=2"]),
    ("sgd", ["pp=2", "--micro-batches", "2", "--schedule", "gpipe"]),
    ("adamw", ["pp=2", "--micro-batches", "4"]),
    ("adamw", ["pp=2,dp=2", "--micro-batches", "2"]),
    ("adamw", ["tp=2,pp=2"]),
    ("sgd", ["tp=2,pp=2"]),
    # vocabulary 258: tp splits the tied embedding (stage 0) and head (stage 1) alike
    ("adamw", ["tp=2,pp=2", "--micro-batches", "2", "--set", "vocab_size=258"]),
    ("adamw", ["tp=2,dp=2,pp=2", "--batch", "8"]),
    ("sgd", ["tp=2,dp=2,pp=2", "--batch", "8", "--micro-batches", "2", "--set",
             "vocab_size=258"]),
])
def test_train_cli_mesh_equals_single_process(optimizer, mesh, single, tmp_path, capsys):
    same = [a for i in range(len(mesh)) if mesh[i] in ("--batch", "--set")
            for a in mesh[i:i + 2]]   # what the single process takes too
    want, ck = single(optimizer, capsys, same)
    assert main(BASE + ["--optimizer", optimizer, "-o", str(tmp_path / "m"),
                        "--mesh-threads", "--mesh", *mesh]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len([line for line in out if line.startswith("{")]) == 1   # rank 0 alone prints
    got = json.loads(out[-1])
    for k in ("loss", "grad_norm", "val_loss"):   # the global loss and norm, whole model
        assert got[k] == pytest.approx(want[k], rel=1e-4), k
    _same_checkpoint(tmp_path / "m", ck)


@pytest.mark.parametrize("mesh", ["tp=2", "pp=2", "tp=2,pp=2"])
def test_resume_slices_a_whole_checkpoint(mesh, tmp_path):
    """A single-process checkpoint at step 2 resumed on the mesh (each rank its slices or
    its stage) continues as the single process does."""
    cfg = TrainConfig(steps=4, lr=1e-3, warmup=0, clip=0.05)

    def run(out):
        return Run("gpt", "tiny", {"d_model": 16, "d_ff": 32, "n_layer": 2}, "clm",
                   batch=4, seq=8, data_bytes=60_000, backend="numpy", out=str(out))
    fit(run(tmp_path / "straight"), cfg)

    class Stop(Exception):
        pass

    def stop_at_2(r):
        if r["step"] == 2:
            raise Stop
    half = run(tmp_path / "half")
    half.eval_every = 2
    with pytest.raises(Stop):
        fit(half, cfg, on_step=stop_at_2)
    run_threads(Mesh.parse(mesh), lambda g: fit(half, cfg, resume=half.out,
                                                 parallel=strategy_for(g)))
    _same_checkpoint(tmp_path / "half", tmp_path / "straight")


@pytest.mark.parametrize("argv,message", [
    (["--mesh", "pp=2,dp=2", "--micro-batches", "4"],
     "batch 4 does not split into dp=2 x 4 micro-batches"),
    (["--mesh", "tp=2", "--zero"], "--zero shards the optimizer over dp only"),
    (["--mesh", "dp=2", "--micro-batches", "2"], "--micro-batches splits the batch over"),
    (["--micro-batches", "2"], "--micro-batches splits the batch over"),
    (["--mesh", "pp=2", "--micro-batches", "3"], "does not split into dp=1 x 3 micro-batches"),
    (["--mesh", "pp=2,dp=2", "--task", "mlm"], "training mlm on pp x dp is not supported"),
    (["--mesh", "tp=2,dp=2", "--task", "mlm"], "training mlm on tp x dp is not supported"),
    (["--mesh", "pp=2", "--set", "dropout=0.1"], "pipeline training does not support dropout"),
    (["--mesh", "tp=2", "--recompute"], "tensor-parallel training does not support --recompute"),
])
def test_train_mesh_errors_are_one_line(argv, message, capsys):
    assert main(["train", "gpt", "--steps", "1", "--batch", "4", "--seq", "8",
                 "--data-bytes", "60000", "--quiet", "--mesh-threads"] + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "\n".join(err)
