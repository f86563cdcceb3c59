"""tensor x data x pipeline parallel composed (`parallel/run.py`, `tensorc run --mesh`):
every rank ends with the single-process answer, on threads and under mpiexec."""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import numpy as np
import pytest

from tensorc.backends import get_backend
from tensorc.cli import main
from tensorc.loading import load_model
from tensorc.mesh import Mesh
from tensorc.parallel import launch
from tensorc.parallel.comm import run_threads
from tensorc.parallel.run import check, run_rank

SIZES = {"gpt": {"seq": 8}, "bert": {"seq": 8},
         "vit": {"overrides": {"image_size": 8, "patch_size": 2, "channels": 1}}}


def rel_err(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@functools.cache
def model(name: str, preset: str = "tiny", layers: int = 3):
    kw = dict(SIZES[name])
    overrides = {"n_layer": layers, **kw.pop("overrides", {})}
    m = load_model(name, preset=preset, overrides=overrides, batch=4, symbolic=True, **kw)
    return m, get_backend("numpy").compile(m.graph).run(m.inputs)


def run_mesh(name, mesh_text, backend="numpy", micro=1, schedule="1f1b", preset="tiny",
             layers=3):
    m, want = model(name, preset, layers)
    mesh = Mesh.parse(mesh_text)
    stages = check(m.graph, m.inputs, mesh, micro)
    got = run_threads(mesh, lambda g: run_rank(stages, m.inputs, g, mesh, backend, "O2",
                                               micro, schedule))
    for r in got:
        for k, a in want.items():
            assert rel_err(r.outputs[k], a) <= 1e-5, (name, mesh_text, k)
    return got


MESHES = [f"tp={tp},dp={dp},pp={pp}" for tp in (1, 2, 4) for dp in (1, 2) for pp in (1, 2, 3)]


@pytest.mark.parametrize("name", ["gpt", "bert", "vit"])
@pytest.mark.parametrize("mesh", MESHES)
def test_every_mesh_gives_the_single_process_answer(name, mesh):
    """Every tp x dp x pp the tiny models divide (4 heads, 3 layers, batch 4), with two
    micro-batches where the batch allows."""
    run_mesh(name, mesh, micro=2 if "dp=1" in mesh and "pp=1" not in mesh else 1)


@pytest.mark.parametrize("name", ["gpt", "bert", "vit"])
def test_composed_on_llvm(name):
    run_mesh(name, "tp=2,dp=2,pp=2", "llvm", micro=1, schedule="gpipe")


@pytest.mark.parametrize("name", ["gpt", "bert", "vit"])
def test_small_preset(name):
    """The small presets (two layers: one per stage) on tp=2 x pp=2 (vit small has 6 heads)."""
    run_mesh(name, "tp=2,pp=2", preset="small", layers=2)


def test_every_rank_sends_one_activation_per_boundary():
    got = run_mesh("gpt", "tp=2,pp=2", micro=2)
    m, _ = model("gpt")
    d = m.graph.values()["input_ids"].type   # [batch, seq]
    hidden = 4 * 8 * 32 * 4                  # b x s x d_model floats, both micro-batches
    assert d.shape[0] == "batch" and [r.sent_bytes for r in got] == [hidden, hidden, 0, 0]
    assert got[0].timeline is not None and 0 < got[0].timeline.bubble < 1


@pytest.mark.parametrize("argv,message", [
    (["gpt", "--mesh", "tp=3"], "tp=3 does not divide the 4 heads"),
    (["gpt", "--mesh", "pp=3"], "fewer than the 3 pipeline stages"),
    (["gpt", "--mesh", "dp=2", "--batch", "3"], "does not split into dp=2"),
    (["gpt", "--mesh", "tp=2", "--passes", "O2,quantize"], "--mesh runs O0, O1 or O2"),
    (["gpt", "--mesh", "xp=2"], "bad mesh"),
])
def test_mesh_errors_are_one_line_before_any_rank(argv, message, capsys):
    assert main(["run", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_run_mesh_in_threads_prints_once(tmp_path, capsys):
    args = ["run", "gpt", "--batch", "4", "--seq", "8", "--passes", "O2"]
    assert main([*args, "--output", str(tmp_path / "one.npz")]) == 0
    assert main([*args, "--mesh", "tp=2,pp=2", "--mesh-threads", "--micro-batches", "2",
                 "--timeline", str(tmp_path / "t.png"),
                 "--output", str(tmp_path / "mesh.npz")]) == 0
    out = capsys.readouterr().out
    assert out.count("mesh pp=2,tp=2: 4 ranks (threads)") == 1 and "bubble" in out
    assert (tmp_path / "t.png").stat().st_size > 1000
    one, mesh = np.load(tmp_path / "one.npz"), np.load(tmp_path / "mesh.npz")
    assert rel_err(mesh["logits"], one["logits"]) <= 1e-5


# --- under mpiexec: the CLI starts its own ranks ---------------------------------------

def _tensorc(args, cwd):
    env = {k: v for k, v in os.environ.items() if k not in ("TENSORC_MESH",
                                                                *launch.SIZE_VARIABLES)}
    return subprocess.run([sys.executable, "-m", "tensorc", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def mpiexec():
    try:
        return launch.mpiexec_path()
    except Exception as e:   # noqa: BLE001
        pytest.skip(f"no mpiexec here ({e}): pip install mpi4py mpich")


@pytest.mark.parametrize("name,mesh,extra", [
    ("gpt", "tp=2", []),
    ("bert", "pp=3", ["--set", "n_layer=3", "--micro-batches", "2"]),
    ("vit", "tp=2,dp=2", []),
    ("gpt", "dp=2,pp=2", ["--micro-batches", "2", "--backend", "llvm"]),
])
def test_run_mesh_under_mpiexec(mpiexec, tmp_path, name, mesh, extra):
    args = ["run", name, "--batch", "4", "--passes", "O2", *extra]
    if name != "vit":
        args += ["--seq", "8"]
    one = _tensorc([*args, "--output", "one.npz"], tmp_path)
    assert one.returncode == 0, one.stderr
    many = _tensorc([*args, "--mesh", mesh, "--output", "mesh.npz"], tmp_path)
    assert many.returncode == 0, many.stderr
    ranks = Mesh.parse(mesh).size
    assert many.stdout.count(f"{ranks} ranks (MPI processes)") == 1, many.stdout
    a, b = np.load(tmp_path / "one.npz"), np.load(tmp_path / "mesh.npz")
    for k in a.files:
        assert rel_err(b[k], a[k]) <= 1e-5, k


@pytest.mark.parametrize("mesh", [["dp=2", "--zero"], ["tp=2"],
                                  ["pp=2", "--micro-batches", "2"]])
def test_train_mesh_under_mpiexec(mpiexec, tmp_path, mesh):
    """Data-, tensor- and pipeline-parallel training as two MPI processes equals one
    process on the whole batch (tests/test_train_mesh.py: the same in threads)."""
    from tensorc.training import load_checkpoint_model
    base = ["train", "gpt", "--set", "d_model=16", "--set", "d_ff=32", "--set", "n_layer=2",
            "--steps", "3", "--batch", "4", "--seq", "8", "--data-bytes", "60000", "--quiet"]
    one = _tensorc([*base, "-o", "one"], tmp_path)
    assert one.returncode == 0, one.stderr
    two = _tensorc([*base, "--mesh", *mesh, "-o", "two"], tmp_path)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count('"checkpoint"') == 1   # rank 0 alone reports
    a = load_checkpoint_model(str(tmp_path / "one")).state_dict()
    b = load_checkpoint_model(str(tmp_path / "two")).state_dict()
    for k, w in a.items():
        assert rel_err(b[k], w) <= 1e-5, k


def test_inspect_mesh_with_stages(capsys):
    """inspect --mesh with pp: each stage's ranks, their collectives at the analytic
    minimum, and the rows of the boundary activation they send on."""
    import json
    argv = ["inspect", "gpt", "--set", "n_layer=4", "--set", "vocab_size=96", "--batch", "4",
            "--seq", "8",
            "--mesh", "tp=2,dp=2,pp=2", "--format", "json"]
    assert main(argv) == 0
    rep = json.loads(capsys.readouterr().out)
    first, last = rep["per_rank"]
    assert (first["ranks"], last["ranks"]) == ([0, 1, 2, 3], [4, 5, 6, 7])
    assert first["layers"] + last["layers"] == 4
    assert first["pipeline_sent_bytes"] == 4 * 8 * 32 * 4 // 2 and "pipeline_sent_bytes" \
        not in last or last["pipeline_sent_bytes"] == 0
    for grp in rep["per_rank"]:
        assert grp["sent_bytes"] == grp["analytic_min_bytes"] > 0
    # only the last stage gathers the logits
    assert [c["op"] for c in first["collectives"]] == ["all_reduce"]
    assert {c["op"] for c in last["collectives"]} == {"all_reduce", "all_gather"}
