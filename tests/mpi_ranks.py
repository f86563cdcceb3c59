"""Run under `mpiexec -n N` by tests/test_mpi.py: every collective on MPICommunicator
(the world and the mesh's subgroups) against the thread communicator's answer for this
rank, and a compiled llvm graph through `run_ranks`. Prints `OK rank R` when all pass.

`python mpi_ranks.py fail`: rank 1 raises inside run_ranks (the job must abort, not
hang). `python mpi_ranks.py nccl`: the collectives on NCCL instead (a GPU per rank)."""

from __future__ import annotations

import sys

import numpy as np

from tensorc.backends import get_backend
from tensorc.ir import Graph, TensorType
from tensorc.mesh import Mesh
from tensorc.parallel.comm import run_threads
from tensorc.parallel.launch import mpiexec_size, run_ranks
from tensorc.parallel.mpi import MPICommunicator


def rank_input(rank: int, shape, dtype) -> np.ndarray:
    x = np.random.default_rng([7, rank]).uniform(-3, 3, shape)
    return x.astype(dtype)


def exercise(comm) -> list[np.ndarray]:
    """Every collective on `comm` (a rank's world or axis group), in one order."""
    p, r = comm.size, comm.rank
    scalar = rank_input(r, (), np.float32)   # a loss: stays a scalar
    out = [comm.all_reduce(scalar), comm.broadcast(scalar, 0)]
    for dtype in (np.float32, np.float16, np.int32, np.float64):
        x = rank_input(r, (p * 2, 3, p), dtype)
        for op in ("sum", "max", "min"):
            out.append(comm.all_reduce(x, op))
        for dim in (0, 1, 2, -1):
            out.append(comm.all_gather(x, dim))
        for dim in (0, 2):
            out.append(comm.reduce_scatter(x, dim, "sum"))
        out.append(comm.reduce_scatter(x, -1, "max"))
        out.append(comm.broadcast(x, p - 1))
        if p > 1:   # a ring; even ranks send first, odd ones receive first (NCCL's
            # sends are not buffered: a ring of sends first would wait forever)
            if r % 2 == 0:
                comm.send(x, (r + 1) % p)
            out.append(comm.recv(x.shape, x.dtype, (r - 1) % p))
            if r % 2:
                comm.send(x, (r + 1) % p)
    return out


def check_against_threads(mesh: Mesh, mpi_world: MPICommunicator) -> int:
    def per_rank(groups):
        return [exercise(groups.world)] + [exercise(groups.group(a)) for a in
                                           ("pp", "dp", "tp") if mesh.sizes[a] > 1]
    want = run_threads(mesh, per_rank)[mpi_world.rank]
    from tensorc.parallel.comm import MeshGroups
    got = per_rank(MeshGroups(mpi_world, mesh))
    mpi_world.finish()
    n = 0
    for g_list, w_list in zip(got, want, strict=True):
        for g, w in zip(g_list, w_list, strict=True):
            assert g.dtype == w.dtype and g.shape == w.shape, (g.dtype, g.shape, w.shape)
            # MPI may sum in another order than rank order: a few ulps apart
            tol = 2e-3 if g.dtype == np.float16 else 1e-6
            np.testing.assert_allclose(g.astype(np.float64), w.astype(np.float64),
                                       rtol=tol, atol=tol)
            n += 1
    return n


def same_bits_on_every_rank(world: MPICommunicator) -> None:
    """MPI's all-reduce adds in its own order, but every rank gets the same bits (short
    and long messages take different algorithms): replicated values stay replicated."""
    for n in (10, 1 << 20):
        y = world.all_reduce(rank_input(world.rank, (n,), np.float32))
        every = world.all_gather(y[None], 0)
        assert all(np.array_equal(e, y) for e in every), "ranks' all-reduce bits differ"


def compiled(mesh: Mesh):
    """y = all_reduce_tp(x) then all_gather_dp: an llvm executable per rank."""
    g = Graph("g")
    x = g.add_input("x", TensorType((4, 6), "f32"))
    y = g.add("all_reduce", x, axis="tp", size=mesh.tp)
    g.outputs = [g.add("all_gather", g.add("tanh", y), axis="dp", size=mesh.dp, dim=0)]
    exe = get_backend("llvm").compile(g)
    xs = [rank_input(r, (4, 6), np.float32) for r in range(mesh.size)]
    got = run_ranks(mesh, lambda groups: exe(xs[groups.rank]))
    (rank, y), = got.items()
    parts = []
    for d in range(mesh.dp):
        peers = mesh.group(mesh.rank({**mesh.coords(rank), "dp": d}), "tp")
        parts.append(np.tanh(sum(xs[q] for q in peers)))
    np.testing.assert_allclose(y, np.concatenate(parts), rtol=1e-5, atol=1e-6)
    assert exe.stats()["collectives"] == 2 and exe.stats()["fallbacks"] == []
    return rank


MESHES = {2: Mesh(tp=2), 3: Mesh(pp=3), 4: Mesh(dp=2, tp=2)}


class OnDevice:
    """A device communicator seen with numpy arrays: in to the GPU, out to the host
    (cp: cupy, or a stand-in for it)."""

    def __init__(self, comm, cp=None):
        if cp is None:
            import cupy as cp
        self.cp, self.comm, self.rank, self.size = cp, comm, comm.rank, comm.size

    def __getattr__(self, name):
        fn = getattr(self.comm, name)

        def call(x, *args):
            got = fn(self.cp.asarray(x), *args) if name != "recv" else fn(x, *args)
            return None if got is None else self.cp.asnumpy(got)
        return call


def nccl_check(mesh: Mesh) -> int:
    """Every collective on NCCL (one GPU per rank) against threads."""
    import cupy

    from tensorc.parallel.comm import MeshGroups
    from tensorc.parallel.nccl import NCCLCommunicator
    cupy.cuda.Device(MPICommunicator().rank % cupy.cuda.runtime.getDeviceCount()).use()
    world = NCCLCommunicator()
    want = run_threads(mesh, lambda groups: exercise(groups.world))[world.rank]
    got = exercise(OnDevice(world))
    sub = MeshGroups(world, mesh).group("tp")   # a subgroup: a new NCCL communicator
    assert sub.size == mesh.tp
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g.astype(np.float64), w.astype(np.float64),
                                   rtol=2e-3, atol=2e-3)
    return len(got)


def main() -> None:
    n = mpiexec_size()
    assert n is not None, "run me under mpiexec"
    mesh = MESHES[n]
    if sys.argv[1:] == ["fail"]:
        def fn(groups):
            if groups.rank == 1:
                raise ValueError("rank 1 fails on purpose")
            groups.world.all_reduce(np.ones(3))   # the others wait for rank 1
        run_ranks(mesh, fn)
        return
    if sys.argv[1:] == ["nccl"]:
        print(f"OK rank {MPICommunicator().rank}: {nccl_check(mesh)} NCCL collectives "
              "match the thread communicator", flush=True)
        return
    world = MPICommunicator()
    checked = check_against_threads(mesh, world)
    same_bits_on_every_rank(world)
    rank = compiled(Mesh(dp=2, tp=2) if n == 4 else Mesh(tp=n))
    assert rank == world.rank
    print(f"OK rank {rank}: {checked} collectives match the thread communicator", flush=True)


if __name__ == "__main__":
    main()
