"""Communicators: what collectives run on. One interface (`ops.collective.Communicator`),
three implementations: threads in one process (tests, and `--mesh` without mpiexec),
MPI through mpi4py (`mpi.py`), NCCL through cupy (`nccl.py`).

A rank's `MeshGroups` hands each collective the communicator of its mesh axis: the ranks
that share every other coordinate (`Mesh.group`).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import TensorcError
from ..mesh import Mesh
from ..ops.collective import use_groups

TIMEOUT_S = 600.0   # a rank that never arrives is a bug; fail instead of hanging CI


def reduce(arrays: list[np.ndarray], op: str) -> np.ndarray:
    """Elementwise reduction in rank order (every rank computes the same bits)."""
    fn = {"sum": np.add, "max": np.maximum, "min": np.minimum}[op]
    out = np.array(arrays[0], copy=True)
    for a in arrays[1:]:
        fn(out, a, out=out)
    return out


class Communicator:
    """What every implementation shares: collectives built from `_exchange` (each rank
    hands in an array, gets every rank's) unless an implementation has its own."""

    rank: int
    size: int

    def _exchange(self, x: np.ndarray) -> list[np.ndarray]:
        raise NotImplementedError

    def all_reduce(self, x, op="sum"):
        return reduce(self._exchange(x), op)

    def all_gather(self, x, dim):
        return np.concatenate(self._exchange(x), axis=dim)

    def reduce_scatter(self, x, dim, op="sum"):
        total = self.all_reduce(x, op)
        return np.ascontiguousarray(np.split(total, self.size, axis=dim)[self.rank])

    def broadcast(self, x, root):
        return np.array(self._exchange(x)[root], copy=True)

    def subgroup(self, members: list[int]) -> Communicator:
        """A communicator over these ranks (of this one's numbering), in their order."""
        raise NotImplementedError


class _Rendezvous:
    """Where the threads of one group meet: a slot per rank and a barrier."""

    def __init__(self, n: int):
        self.slots: list[Any] = [None] * n
        self.barrier = threading.Barrier(n, timeout=TIMEOUT_S)


class ThreadWorld:
    """N ranks as threads of this process."""

    def __init__(self, size: int):
        self.size = size
        self._lock = threading.Lock()
        self._groups: dict[tuple[int, ...], _Rendezvous] = {}
        self._mail: dict[tuple[int, int], queue.Queue] = {}
        self.failed = threading.Event()

    def communicator(self, rank: int) -> ThreadCommunicator:
        return ThreadCommunicator(self, tuple(range(self.size)), rank)

    def rendezvous(self, members: tuple[int, ...]) -> _Rendezvous:
        with self._lock:
            return self._groups.setdefault(members, _Rendezvous(len(members)))

    def mailbox(self, src: int, dst: int) -> queue.Queue:
        with self._lock:
            return self._mail.setdefault((src, dst), queue.Queue())

    def abort(self) -> None:
        """A rank failed: wake every other rank waiting on it."""
        self.failed.set()
        with self._lock:
            for r in self._groups.values():
                r.barrier.abort()


class ThreadCommunicator(Communicator):
    def __init__(self, world: ThreadWorld, members: tuple[int, ...], rank: int):
        self.world, self.members, self.rank, self.size = world, members, rank, len(members)
        self._meet = world.rendezvous(members)

    def _wait(self):
        try:
            self._meet.barrier.wait()
        except threading.BrokenBarrierError:
            raise TensorcError("another rank failed or never arrived at a collective") \
                from None

    def _exchange(self, x):
        # a copy: the others read it after the rank has moved on, and a backend may
        # reuse the memory of x (llvm's arena) by then
        self._meet.slots[self.rank] = np.array(x, copy=True)
        self._wait()
        got = list(self._meet.slots)
        self._wait()   # nobody overwrites a slot before every rank has read them all
        return got

    def send(self, x, dest):
        self.world.mailbox(self.members[self.rank], self.members[dest]).put(
            np.array(x, copy=True))

    def recv(self, shape, dtype, source):
        box = self.world.mailbox(self.members[source], self.members[self.rank])
        waited = 0.0
        while True:
            try:
                got = box.get(timeout=1.0)
                break
            except queue.Empty:
                waited += 1.0
                if self.world.failed.is_set() or waited > TIMEOUT_S:
                    raise TensorcError("recv: the sending rank failed or never sent") \
                        from None
        if got.shape != tuple(shape) or got.dtype != np.dtype(dtype):
            raise TensorcError(f"recv expected {np.dtype(dtype)}{list(shape)}, got "
                               f"{got.dtype}{list(got.shape)}")
        return got

    def subgroup(self, members):
        world_ranks = tuple(self.members[m] for m in members)
        me = self.members[self.rank]
        if me not in world_ranks:
            raise TensorcError(f"rank {me} is not in the group {list(world_ranks)}")
        return ThreadCommunicator(self.world, world_ranks, world_ranks.index(me))


class MeshGroups:
    """One rank's communicators over the mesh axes (made on first use, then kept)."""

    def __init__(self, world: Communicator, mesh: Mesh):
        if world.size != mesh.size:
            raise TensorcError(f"mesh {mesh} needs {mesh.size} ranks, the communicator has "
                               f"{world.size}")
        self.world, self.mesh, self.rank = world, mesh, world.rank
        self.coords = mesh.coords(world.rank)
        self._axes: dict[str, Communicator] = {}

    def group(self, axis: str) -> Communicator:
        if axis == "world":
            return self.world
        if axis not in self._axes:
            self._axes[axis] = self.world.subgroup(self.mesh.group(self.rank, axis))
        return self._axes[axis]


def run_threads(mesh: Mesh, fn: Callable[[MeshGroups], Any]) -> list[Any]:
    """Run fn(groups) on every rank of the mesh, one thread each, with the rank's
    collectives installed; returns the ranks' results in rank order. The first error
    (by rank) is raised once every thread has stopped."""
    world = ThreadWorld(mesh.size)
    results: list[Any] = [None] * mesh.size
    errors: list[BaseException | None] = [None] * mesh.size

    def main(rank: int):
        groups = MeshGroups(world.communicator(rank), mesh)
        try:
            with use_groups(groups):
                results[rank] = fn(groups)
        except BaseException as e:   # noqa: BLE001  (re-raised below, in the caller)
            errors[rank] = e
            world.abort()

    threads = [threading.Thread(target=main, args=(r,), name=f"rank{r}")
               for r in range(mesh.size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # the rank that failed first, not the ones it woke with "another rank failed"
    firsts = [e for e in errors if e is not None and "another rank failed" not in str(e)]
    for e in firsts or [e for e in errors if e is not None]:
        raise e
    return results
