"""NCCL through cupy: collectives on cupy arrays on each rank's current GPU.

The ranks are MPI processes (one GPU each): rank 0's NCCL unique id reaches the others
over MPI, then every collective is one NCCL call on the current stream (asynchronous to
the host, ordered with the kernels around it). A subgroup is a new NCCL communicator
over the MPI subgroup. Unlike MPI and threads, `send` is not buffered: a rank's sends and
the peer's recvs must come in matching order (a pipeline schedule's do).

Importing this module needs neither cupy nor a GPU; constructing a communicator does.
"""

from __future__ import annotations

import numpy as np

from ..errors import TensorcError
from .comm import Communicator
from .mpi import MPICommunicator, dim_back, dim_first, scattered_part

UNIQUE_ID_BYTES = 128   # NCCL_UNIQUE_ID_BYTES


def unavailable_reason() -> str | None:
    """Why NCCL cannot run here (no cupy, no NCCL in cupy, no GPU), or None."""
    from ..backends.cupy import unavailable_reason as cupy_reason
    reason = cupy_reason()
    if reason:
        return reason
    try:
        from cupy.cuda import nccl
    except ImportError as e:
        return f"cupy has no NCCL ({e})"
    return None if nccl.available else "cupy was built without NCCL"


def _nccl():
    reason = unavailable_reason()
    if reason:
        raise TensorcError(f"the NCCL communicator is unavailable: {reason}")
    import cupy
    from cupy.cuda import nccl
    return cupy, nccl


class NCCLCommunicator(Communicator):
    """One rank (one process, its current cupy device) of an NCCL communicator made over
    an MPI communicator's ranks (COMM_WORLD's by default)."""

    def __init__(self, mpi: MPICommunicator | None = None):
        self.cp, nccl = _nccl()
        self.mpi = MPICommunicator() if mpi is None else mpi
        self.rank, self.size = self.mpi.rank, self.mpi.size
        uid = np.zeros(UNIQUE_ID_BYTES, np.int64)
        if self.rank == 0:
            uid[:] = nccl.get_unique_id()
        uid = tuple(int(b) for b in self.mpi.broadcast(uid, 0))
        self.comm = nccl.NcclCommunicator(self.size, uid, self.rank)
        self._ops = {"sum": nccl.NCCL_SUM, "max": nccl.NCCL_MAX, "min": nccl.NCCL_MIN}
        self._types = {np.dtype(k): getattr(nccl, v) for k, v in (
            ("float32", "NCCL_FLOAT32"), ("float16", "NCCL_FLOAT16"),
            ("float64", "NCCL_FLOAT64"), ("int32", "NCCL_INT32"), ("int64", "NCCL_INT64"),
            ("int8", "NCCL_INT8"), ("uint8", "NCCL_UINT8")) if hasattr(nccl, v)}

    def _type(self, x) -> int:
        if x.dtype not in self._types:
            raise TensorcError(f"NCCL collectives take {', '.join(map(str, self._types))}, "
                               f"not {x.dtype}")
        return self._types[x.dtype]

    def _stream(self) -> int:
        return self.cp.cuda.get_current_stream().ptr

    def all_reduce(self, x, op="sum"):
        x = self.cp.asarray(x, order="C")   # numpy arrays are copied to the device
        out = self.cp.empty_like(x)
        self.comm.allReduce(x.data.ptr, out.data.ptr, x.size, self._type(x), self._ops[op],
                            self._stream())
        return out

    def all_gather(self, x, dim):
        part = dim_first(x, dim, self.cp)
        out = self.cp.empty((self.size * part.shape[0],) + part.shape[1:], part.dtype)
        self.comm.allGather(part.data.ptr, out.data.ptr, part.size, self._type(part),
                            self._stream())
        return dim_back(out, dim, self.cp)

    def reduce_scatter(self, x, dim, op="sum"):
        whole = dim_first(x, dim, self.cp)
        out = self.cp.empty(scattered_part(whole, self.size, dim), whole.dtype)
        self.comm.reduceScatter(whole.data.ptr, out.data.ptr, out.size, self._type(whole),
                                self._ops[op], self._stream())
        return dim_back(out, dim, self.cp)

    def broadcast(self, x, root):
        out = self.cp.array(x, copy=True, order="C")
        self.comm.bcast(out.data.ptr, out.size, self._type(out), root, self._stream())
        return out

    def send(self, x, dest):
        x = self.cp.asarray(x, order="C")
        self.comm.send(x.data.ptr, x.size, self._type(x), dest, self._stream())

    def recv(self, shape, dtype, source):
        out = self.cp.empty(tuple(shape), dtype)
        self.comm.recv(out.data.ptr, out.size, self._type(out), source, self._stream())
        return out

    def subgroup(self, members):
        return NCCLCommunicator(self.mpi.subgroup(members))
