"""Collectives as IR ops: all_reduce, all_gather, reduce_scatter, broadcast, send, recv.

Each names the mesh axis it runs over (`axis`) and that axis's size (`size`), so type
inference stays local: a graph holds one rank's shapes. The reference runs the op on the
communicator the running rank installed (`use_groups`); with none installed only a
group of one works (the op is then the identity, or a copy), so a sharded graph never
silently computes one rank's share as if it were the whole.

`comm_bytes` is what one rank sends for an op under the ring algorithms NCCL and MPI use
for large messages: all_reduce 2(p-1)/p of the tensor, all_gather and reduce_scatter
(p-1)/p of the full tensor, broadcast and send the tensor.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Protocol

import numpy as np

from ..errors import ShapeError, TensorcError
from ..types import TensorType, dim_divide, dim_product
from .registry import Attr, OpDef, norm_axis, register
from .vjp import zeros

REDUCTIONS = ("sum", "max", "min")
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "send", "recv")


class Communicator(Protocol):
    """One rank's view of a group of ranks. Arrays in, new arrays out; every rank of the
    group calls the same collectives in the same order."""

    rank: int   # index in the group
    size: int

    def all_reduce(self, x: np.ndarray, op: str = "sum") -> np.ndarray: ...
    def all_gather(self, x: np.ndarray, dim: int) -> np.ndarray: ...
    def reduce_scatter(self, x: np.ndarray, dim: int, op: str = "sum") -> np.ndarray: ...
    def broadcast(self, x: np.ndarray, root: int) -> np.ndarray: ...
    def send(self, x: np.ndarray, dest: int) -> None: ...
    def recv(self, shape: tuple, dtype, source: int) -> np.ndarray: ...


class Groups(Protocol):
    """What a running rank installs: its communicator over each mesh axis."""

    def group(self, axis: str) -> Communicator: ...


_GROUPS: contextvars.ContextVar[Groups | None] = contextvars.ContextVar(
    "tensorc_groups", default=None)


@contextlib.contextmanager
def use_groups(groups: Groups):
    """Run collectives in this block (this thread) on `groups`."""
    token = _GROUPS.set(groups)
    try:
        yield groups
    finally:
        _GROUPS.reset(token)


def group(axis: str, size: int) -> Communicator:
    """The communicator a collective over `axis` of `size` ranks runs on."""
    groups = _GROUPS.get()
    if groups is None:
        if size == 1:
            return _SOLO
        raise TensorcError(f"a collective over mesh axis {axis!r} ({size} ranks) ran with no "
                           "communicator: run sharded graphs through tensorc.parallel")
    comm = groups.group(axis)
    if comm.size != size:
        raise TensorcError(f"a collective over {axis!r} expects {size} ranks, the running "
                           f"mesh has {comm.size}")
    return comm


class _Solo:
    """A group of one rank."""

    rank, size = 0, 1

    def all_reduce(self, x, op="sum"):
        return np.array(x, copy=True)

    def all_gather(self, x, dim):
        return np.array(x, copy=True)

    def reduce_scatter(self, x, dim, op="sum"):
        return np.array(x, copy=True)

    def broadcast(self, x, root):
        return np.array(x, copy=True)

    def send(self, x, dest):
        raise TensorcError("send to another rank in a group of one")

    def recv(self, shape, dtype, source):
        raise TensorcError("recv from another rank in a group of one")


_SOLO = _Solo()


def _peer(comm: Communicator, peer: int, axis: str) -> int:
    r = comm.rank + peer
    if not 0 <= r < comm.size:
        raise TensorcError(f"rank {comm.rank} of {comm.size} along {axis!r} has no peer "
                           f"{peer:+d}")
    return r


def _same(x: TensorType, **_) -> TensorType:
    return x


def _gathered(x: TensorType, axis, size, dim) -> TensorType:
    d = norm_axis(dim, x.rank)
    shape = list(x.shape)
    shape[d] = dim_product([shape[d], size])
    return TensorType(tuple(shape), x.dtype)


def _scattered(x: TensorType, axis, size, dim, op="sum") -> TensorType:
    d = norm_axis(dim, x.rank)
    part = dim_divide(x.shape[d], size)
    if part is None:
        raise ShapeError(f"reduce_scatter over {axis!r}: dim {d} of {x} does not split into "
                         f"{size} equal parts")
    return TensorType(x.shape[:d] + (part,) + x.shape[d + 1:], x.dtype)


def _recv_type(shape, dtype, **_) -> TensorType:
    return TensorType(tuple(shape), dtype)


GROUP = {"axis": Attr("str"), "size": Attr("int")}


def _rule(transpose):
    """A collective's vjp is its linear transpose, with the total loss the sum of every
    rank's: all_reduce <-> all_reduce, all_gather <-> reduce_scatter, send <-> recv.
    (Sharding runs after `grad`, so a sharded step never needs these; they keep the
    collectives differentiable like every other op.)"""
    def vjp(g, node, dys):
        (dy,) = dys
        if dy is None:
            return [None] * len(node.inputs)
        return transpose(g, node, dy)
    return vjp


def _sum_only(node):
    if node.attrs.get("op", "sum") != "sum":
        raise TensorcError(f"{node.where}: only a sum {node.op} has a gradient")


def _all_reduce_t(g, node, dy):
    _sum_only(node)
    return [g.add("all_reduce", dy, axis=node.attrs["axis"], size=node.attrs["size"])]


def _all_gather_t(g, node, dy):
    a = node.attrs
    return [g.add("reduce_scatter", dy, axis=a["axis"], size=a["size"], dim=a["dim"])]


def _reduce_scatter_t(g, node, dy):
    _sum_only(node)
    a = node.attrs
    return [g.add("all_gather", dy, axis=a["axis"], size=a["size"], dim=a["dim"])]


def _broadcast_t(g, node, dy):
    # the root's input reaches every rank: its gradient is the sum of theirs, and the
    # other ranks' inputs have none. The graph is the same on every rank, so: each rank
    # puts its dy in slot `root` of p zero slots, and a reduce-scatter hands rank r the
    # group's sum of slot r (the sum at the root, zeros elsewhere)
    a = node.attrs
    p, root = a["size"], a["root"]
    slot = g.add("unsqueeze", dy, axes=(0,))
    zero = zeros(g, slot.type)
    slots = g.add("concat", *([zero] * root + [slot] + [zero] * (p - 1 - root)), axis=0)
    mine = g.add("reduce_scatter", slots, axis=a["axis"], size=p, dim=0)
    return [g.add("squeeze", mine, axes=(0,))]


register(OpDef(
    "all_reduce", infer=_same,
    reference=lambda x, axis, size, op="sum": group(axis, size).all_reduce(x, op),
    attrs={**GROUP, "op": Attr("str", "sum", choices=REDUCTIONS)},
    flops=lambda outs, x, axis, size, op="sum": math.prod(
        d if isinstance(d, int) else 1 for d in x.shape) * (size - 1),
    vjp=_rule(_all_reduce_t),
    doc="every rank of the axis's group gets the elementwise sum (max, min) of their x"))
register(OpDef(
    "all_gather", infer=_gathered,
    reference=lambda x, axis, size, dim: group(axis, size).all_gather(x, dim),
    attrs={**GROUP, "dim": Attr("int")}, vjp=_rule(_all_gather_t),
    doc="every rank gets the group's x concatenated along dim, in rank order"))
register(OpDef(
    "reduce_scatter", infer=_scattered,
    reference=lambda x, axis, size, dim, op="sum":
        group(axis, size).reduce_scatter(x, dim, op),
    attrs={**GROUP, "dim": Attr("int"), "op": Attr("str", "sum", choices=REDUCTIONS)},
    vjp=_rule(_reduce_scatter_t),
    doc="the group's sum of x, split along dim: rank r keeps part r"))
register(OpDef(
    "broadcast", infer=_same,
    reference=lambda x, axis, size, root=0: group(axis, size).broadcast(x, root),
    attrs={**GROUP, "root": Attr("int", 0)}, vjp=_rule(_broadcast_t),
    doc="every rank gets the root's x"))


def _send_ref(x, axis, size, peer):
    comm = group(axis, size)
    comm.send(np.ascontiguousarray(x), _peer(comm, peer, axis))
    return np.array(x, copy=True)


def _recv_ref(axis, size, peer, shape, dtype):
    comm = group(axis, size)
    return comm.recv(tuple(shape), TensorType((), dtype).np_dtype, _peer(comm, peer, axis))


def _send_t(g, node, dy):
    # x went to the peer; its gradient comes back from there (and dy, x's own use here)
    a = node.attrs
    back = g.add("recv", axis=a["axis"], size=a["size"], peer=a["peer"],
                 shape=node.inputs[0].type.shape, dtype=node.inputs[0].type.dtype)
    return [g.add("add", dy, back)]


register(OpDef(
    "send", infer=_same, reference=_send_ref,
    attrs={**GROUP, "peer": Attr("int")}, vjp=_rule(_send_t),
    doc="sends x to the rank `peer` steps along the axis and passes x on (so the send "
        "stays live in the graph)"))
register(OpDef(
    "recv", inputs=(0, 0), infer=_recv_type, reference=_recv_ref,
    attrs={**GROUP, "peer": Attr("int"), "shape": Attr("dims"), "dtype": Attr("dtype")},
    doc="receives a tensor of shape and dtype from the rank `peer` steps along the axis"))


def comm_bytes(op: str, in_type: TensorType | None, out_type: TensorType, size: int,
               env: dict[str, int] | None = None) -> int:
    """Bytes one rank sends for one collective (ring algorithms; see the module doc)."""
    if size == 1:
        return 0
    full = max(in_type.nbytes(env) if in_type is not None else 0, out_type.nbytes(env))
    p = size
    if op == "all_reduce":
        return 2 * (p - 1) * full // p
    if op in ("all_gather", "reduce_scatter"):
        return (p - 1) * full // p
    if op in ("broadcast", "send"):
        return full
    if op == "recv":
        return 0
    raise TensorcError(f"{op} is not a collective")
