"""MPI: `tests/mpi_ranks.py` under `mpiexec -n 2, 3, 4` (oversubscribed on a small
machine: MPICH allows it) checks every collective of MPICommunicator against the thread
communicator and runs a compiled graph through `run_ranks`; the launcher's environment
detection, relaunch and errors."""

from __future__ import annotations

import ctypes
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tensorc.errors import TensorcError
from tensorc.mesh import Mesh
from tensorc.parallel import launch
from tensorc.parallel.comm import ThreadWorld, run_threads

SCRIPT = Path(__file__).with_name("mpi_ranks.py")
ROOT = Path(__file__).resolve().parent.parent


def _mpiexec() -> str:
    try:
        return launch.mpiexec_path()
    except TensorcError as e:
        pytest.skip(str(e))


def _run(n: int, *args, timeout=120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in launch.SIZE_VARIABLES}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([_mpiexec(), "-n", str(n), sys.executable, str(SCRIPT), *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_every_collective_under_mpiexec_matches_threads(n):
    pytest.importorskip("mpi4py", reason="MPI tests need mpi4py: pip install mpi4py mpich")
    res = _run(n)
    assert res.returncode == 0, res.stderr[-3000:]
    # the ranks' lines may interleave
    assert sorted(map(int, re.findall(r"OK rank (\d+)", res.stdout))) == list(range(n)), \
        res.stdout


def test_a_failing_rank_aborts_the_job_instead_of_hanging():
    pytest.importorskip("mpi4py", reason="MPI tests need mpi4py: pip install mpi4py mpich")
    res = _run(2, "fail", timeout=60)
    assert res.returncode != 0
    assert "tensorc: error: rank 1: rank 1 fails on purpose" in res.stderr


def test_mpiexec_is_detected_from_its_environment(monkeypatch):
    for name in launch.SIZE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert not launch.under_mpiexec() and launch.mpiexec_size() is None
    # without mpiexec the ranks are threads, and the caller gets every rank's result
    assert launch.run_ranks(Mesh(tp=3), lambda groups: groups.rank * 10) == \
        {0: 0, 1: 10, 2: 20}
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    assert launch.mpiexec_size() == 4
    monkeypatch.setenv("PMI_SIZE", "3")
    assert launch.under_mpiexec() and launch.mpiexec_size() == 3
    with pytest.raises(TensorcError, match="mpiexec started 3 processes, the mesh tp=2 has 2 "
                                           "ranks: run mpiexec -n 2"):
        launch.run_ranks(Mesh(tp=2), lambda groups: None)


def test_missing_mpiexec_names_the_install(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(TensorcError, match="pip install mpi4py mpich"):
        launch.mpiexec_path()


def test_start_relaunches_only_outside_mpiexec_and_threads(monkeypatch):
    calls = []
    monkeypatch.setattr(launch, "relaunch", lambda n, argv: calls.append((n, argv)) or 3)
    for name in launch.SIZE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("TENSORC_MESH", raising=False)
    argv = ["run", "gpt", "--mesh", "tp=2,dp=2"]
    assert launch.start(Mesh(tp=2, dp=2), argv) == 3 and calls == [(4, argv)]
    assert launch.start(Mesh(tp=2), argv, threads=True) is None
    assert launch.start(Mesh(), argv) is None   # one rank: nothing to start
    monkeypatch.setenv("TENSORC_MESH", "threads")
    assert launch.start(Mesh(tp=2), argv) is None
    monkeypatch.delenv("TENSORC_MESH")
    monkeypatch.setenv("PMI_SIZE", "2")   # already one of mpiexec's ranks
    assert launch.start(Mesh(tp=2), argv) is None
    assert len(calls) == 1


def test_relaunch_returns_the_ranks_exit_code(capfd, monkeypatch):
    _mpiexec()
    assert launch.relaunch(2, ["--help"]) == 0
    assert capfd.readouterr().out.count("usage: tensorc") == 2   # one per rank
    assert launch.relaunch(2, ["no-such-command"]) == 2
    # each rank's thread pool gets a share of the cores, unless the user chose
    seen = []
    monkeypatch.setattr(launch.subprocess, "call", lambda cmd, env: seen.append(env) or 0)
    monkeypatch.delenv("TENSORC_NUM_THREADS", raising=False)
    launch.relaunch(64, ["run"])
    monkeypatch.setenv("TENSORC_NUM_THREADS", "3")
    launch.relaunch(2, ["run"])
    assert [e["TENSORC_NUM_THREADS"] for e in seen] == ["1", "3"]


def test_nccl_imports_without_cupy_and_refuses_without_a_gpu():
    from tensorc.parallel import nccl
    reason = nccl.unavailable_reason()
    if reason is None:
        pytest.skip("NCCL is usable here: test_nccl_collectives_on_gpus runs it")
    with pytest.raises(TensorcError, match="the NCCL communicator is unavailable: .+"):
        nccl.NCCLCommunicator()


def test_nccl_collectives_on_gpus():
    """Every collective on NCCL, one GPU per rank, against the thread communicator."""
    from tensorc.parallel import nccl
    reason = nccl.unavailable_reason()
    if reason:
        pytest.skip(f"NCCL cannot run here: {reason}")
    import cupy
    if cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("NCCL across ranks needs two GPUs (one per rank); this machine has one")
    res = _run(2, "nccl")
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(map(int, re.findall(r"OK rank (\d+)", res.stdout))) == [0, 1], res.stdout


# --- NCCL's plumbing without a GPU: cupy and cupy.cuda.nccl stood in for by numpy and
# the thread communicator, with the call signatures of cupy's nccl.pyx (pointers, counts
# in elements, a datatype code, the stream). This checks NCCLCommunicator's own logic
# (moving dims, counts, dtype codes, the unique id's broadcast, subgroups), not NCCL.

class _Device(np.ndarray):
    """A numpy array with cupy's `.data.ptr`."""

    @property
    def data(self):
        return SimpleNamespace(ptr=self.ctypes.data)


def _dev(x):
    return np.asarray(x).view(_Device)


FAKE_CUPY = SimpleNamespace(
    asarray=lambda x, order=None: _dev(np.asarray(x, order=order)),
    ascontiguousarray=lambda x: _dev(np.ascontiguousarray(x)),
    moveaxis=lambda x, a, b: _dev(np.moveaxis(x, a, b)),
    empty=lambda shape, dtype: _dev(np.empty(shape, dtype)),
    empty_like=lambda x: _dev(np.empty_like(x)),
    array=lambda x, copy, order: _dev(np.array(x, copy=copy, order=order)),
    asnumpy=lambda x: np.asarray(x).view(np.ndarray),
    cuda=SimpleNamespace(get_current_stream=lambda: SimpleNamespace(ptr=0)))


class _FakeNccl:
    TYPES = ["float32", "float16", "float64", "int32", "int64", "int8", "uint8"]

    def __init__(self):
        for i, t in enumerate(self.TYPES):
            setattr(self, f"NCCL_{t.upper()}", i)
        self.NCCL_SUM, self.NCCL_MAX, self.NCCL_MIN = 10, 11, 12
        self.worlds: dict = {}
        self.lock = threading.Lock()

    def get_unique_id(self):
        return tuple(int(b) for b in np.random.default_rng().integers(-128, 128, 128))

    def NcclCommunicator(self, n, uid, rank):   # noqa: N802  (cupy's name)
        with self.lock:
            world = self.worlds.setdefault(uid, ThreadWorld(n))
        return _FakeNcclComm(self, world.communicator(rank))


class _FakeNcclComm:
    def __init__(self, nccl, comm):
        self.nccl, self.comm = nccl, comm

    def _at(self, ptr, count, datatype):
        dtype = np.dtype(self.nccl.TYPES[datatype])
        raw = (ctypes.c_char * (count * dtype.itemsize)).from_address(ptr)
        return np.frombuffer(raw, dtype)

    def _op(self, op):
        return {10: "sum", 11: "max", 12: "min"}[op]

    def allReduce(self, send, recv, count, datatype, op, stream):   # noqa: N802
        self._at(recv, count, datatype)[:] = self.comm.all_reduce(
            self._at(send, count, datatype).copy(), self._op(op))

    def allGather(self, send, recv, count, datatype, stream):   # noqa: N802
        self._at(recv, count * self.comm.size, datatype)[:] = self.comm.all_gather(
            self._at(send, count, datatype).copy(), 0)

    def reduceScatter(self, send, recv, count, datatype, op, stream):   # noqa: N802
        self._at(recv, count, datatype)[:] = self.comm.reduce_scatter(
            self._at(send, count * self.comm.size, datatype).copy(), 0, self._op(op))

    def bcast(self, buf, count, datatype, root, stream):
        b = self._at(buf, count, datatype)
        b[:] = self.comm.broadcast(b.copy(), root)

    def send(self, buf, count, datatype, peer, stream):
        self.comm.send(self._at(buf, count, datatype).copy(), peer)

    def recv(self, buf, count, datatype, peer, stream):
        b = self._at(buf, count, datatype)
        b[:] = self.comm.recv(b.shape, b.dtype, peer)


def test_nccl_communicator_plumbing_on_a_stand_in(monkeypatch):
    from mpi_ranks import OnDevice, exercise

    from tensorc.parallel import nccl
    monkeypatch.setattr(nccl, "_nccl", lambda: (FAKE_CUPY, _FakeNccl.instance))
    _FakeNccl.instance = _FakeNccl()
    mesh = Mesh(dp=2, tp=2)

    def per_rank(groups):
        device = nccl.NCCLCommunicator(groups.world)
        sub = device.subgroup(mesh.group(groups.rank, "tp"))   # a new NCCL communicator
        want = exercise(groups.world) + exercise(groups.group("tp"))
        got = exercise(OnDevice(device, FAKE_CUPY)) + exercise(OnDevice(sub, FAKE_CUPY))
        return want, got

    for want, got in run_threads(mesh, per_rank):
        assert len(got) == len(want) > 50
        for g, w in zip(got, want, strict=True):
            assert g.dtype == w.dtype and g.shape == w.shape
            np.testing.assert_array_equal(g, w)
