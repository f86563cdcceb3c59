"""MPI through mpi4py: one process per rank (started by `mpiexec`, see `launch.py`).

Buffer-based throughout (mpi4py's uppercase calls on contiguous numpy arrays: no
pickling). A collective along `dim` moves that dim first, where each rank's part is one
contiguous block, and back after. Reductions of dtypes MPI has no type for (f16, bf16,
bool) gather the ranks' arrays and reduce them in rank order, as the thread
communicator does. Sends are buffered (`Isend` of a copy, completed later), as with
threads, so a rank may send before its peer posts the matching recv.
"""

from __future__ import annotations

import numpy as np

from ..errors import TensorcError
from .comm import Communicator

TAG = 16   # point-to-point messages of collectives' send/recv


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise TensorcError(f"MPI needs mpi4py ({e}): pip install mpi4py mpich") from None
    return MPI


def _bytes(a: np.ndarray) -> np.ndarray:
    """A contiguous array's memory as bytes: moves data of any dtype (bf16 included)."""
    return a.reshape(-1).view(np.uint8)


def dim_first(x, dim: int, xp=np):
    """x with `dim` moved first, contiguous: each rank's part is one block (xp: numpy,
    or cupy for device arrays)."""
    return xp.ascontiguousarray(xp.moveaxis(xp.asarray(x), dim, 0))


def dim_back(x, dim: int, xp=np):
    return xp.ascontiguousarray(xp.moveaxis(x, 0, dim))


def scattered_part(whole, size: int, dim: int) -> tuple:
    """The shape of one rank's part of a reduce-scatter of `whole` (its dim first)."""
    if whole.shape[0] % size:
        raise TensorcError(f"reduce_scatter: dim {dim} of size {whole.shape[0]} does not "
                           f"split into {size} equal parts")
    return (whole.shape[0] // size,) + whole.shape[1:]


class MPICommunicator(Communicator):
    """One rank of an MPI communicator (COMM_WORLD by default)."""

    def __init__(self, comm=None):
        self.MPI = MPI = _mpi()
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self._ops = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}
        self._sends: list = []   # (request, buffer): Isends not yet known complete
        self._subgroups: list[MPICommunicator] = []

    def _native(self, x: np.ndarray) -> bool:
        """Whether MPI reduces this dtype itself."""
        if x.dtype.kind not in "fiu" or (x.dtype.kind == "f" and x.dtype.itemsize < 4):
            return False   # bool, f16, bf16
        from mpi4py.util.dtlib import from_numpy_dtype
        try:
            from_numpy_dtype(x.dtype)
        except (ValueError, KeyError, TypeError):
            return False
        return True

    def _exchange(self, x):
        x = np.asarray(x, order="C")   # (ascontiguousarray would make a scalar 1-d)
        out = np.empty((self.size,) + x.shape, x.dtype)
        self.comm.Allgather(_bytes(x), _bytes(out))
        return list(out)

    def all_reduce(self, x, op="sum"):
        x = np.asarray(x, order="C")
        if not self._native(x):
            return super().all_reduce(x, op)
        out = np.empty_like(x)
        self.comm.Allreduce(x, out, op=self._ops[op])
        return out

    def all_gather(self, x, dim):
        part = dim_first(x, dim)
        out = np.empty((self.size * part.shape[0],) + part.shape[1:], part.dtype)
        self.comm.Allgather(_bytes(part), _bytes(out))
        return dim_back(out, dim)

    def reduce_scatter(self, x, dim, op="sum"):
        whole = dim_first(x, dim)
        if not self._native(whole):
            return super().reduce_scatter(x, dim, op)
        out = np.empty(scattered_part(whole, self.size, dim), whole.dtype)
        self.comm.Reduce_scatter_block(whole, out, op=self._ops[op])
        return dim_back(out, dim)

    def broadcast(self, x, root):
        out = np.array(x, copy=True, order="C")
        self.comm.Bcast(_bytes(out), root=root)
        return out

    def send(self, x, dest):
        self._reap()
        buf = np.array(x, copy=True, order="C")   # kept until the send completes
        self._sends.append((self.comm.Isend(_bytes(buf), dest=dest, tag=TAG), buf))

    def recv(self, shape, dtype, source):
        out = np.empty(tuple(shape), dtype)
        status = self.MPI.Status()
        try:
            self.comm.Recv(_bytes(out), source=source, tag=TAG, status=status)
        except self.MPI.Exception as e:   # a longer message than expected: truncated
            raise TensorcError(f"recv expected {out.dtype}{list(out.shape)} from rank "
                               f"{source}: {e.Get_error_string()}") from None
        if status.Get_count(self.MPI.BYTE) != out.nbytes:
            raise TensorcError(f"recv expected {out.dtype}{list(out.shape)} ({out.nbytes} "
                               f"bytes) from rank {source}, got "
                               f"{status.Get_count(self.MPI.BYTE)} bytes")
        return out

    def _reap(self) -> None:
        self._sends = [(r, b) for r, b in self._sends if not r.Test()]

    def finish(self) -> None:
        """Wait for this rank's sends (its subgroups' too) to complete, before MPI shuts
        down."""
        if self._sends:
            self.MPI.Request.Waitall([r for r, _ in self._sends])
        self._sends = []
        for sub in self._subgroups:
            sub.finish()

    def subgroup(self, members):
        """Collective over `members` only (MPI_Comm_create_group): `MeshGroups` makes an
        axis's group on first use, which only that group's ranks reach together."""
        members = list(members)
        if self.rank not in members:
            raise TensorcError(f"rank {self.rank} is not in the group {members}")
        group = self.comm.Get_group().Incl(members)
        try:
            sub = MPICommunicator(self.comm.Create_group(group))
        finally:
            group.Free()
        self._subgroups.append(sub)
        return sub
