"""Data parallelism: every rank of the mesh's `dp` axis runs the training step on its
rows of the batch, and the gradients are averaged over the axis inside the step graph.

The gradients are averaged in buckets, as PyTorch DDP's `bucket_cap_mb`: taken in the
order the backward produces them, flattened and concatenated up to `bucket_mb`, one
`all_reduce(axis="dp")` per bucket, split back. Each bucket's nodes sit right after the
node that finishes its last gradient, so a runtime that overlaps communication with the
rest of the backward could; ours run nodes one after another, so nothing overlaps yet.

Each rank's loss is a mean over its own labels; `dp.weight` (this rank's share of the
batch's counted labels, `share`) scales its loss and gradients before the sum, so the
result is the single-process mean over the whole batch even when ranks count different
labels (masked language modelling).

ZeRO-1 (`zero=True`): the parameters live in one flat buffer per bucket (padded to a
multiple of dp); a bucket's gradient is reduce-scattered instead, each rank updates only
its 1/dp slice with its 1/dp of the optimizer state (optim.py's compiled update on the
slices), then all-gathers the parameters. Global-norm clipping sums the slices' squared
norms over the axis.

Dropout: every rank uses the step's one seed, and its masks are shifted to the rows it
holds (`shift_dropout`), so a dp run drops exactly what the single-process run drops.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ..errors import TensorcError
from ..frontend.losses import IGNORE_INDEX
from ..ir import Graph, Node, Value
from ..mesh import Mesh
from ..ops.nn import shifted_salt
from ..passes.autodiff import GRAD_PREFIX
from ..types import TensorType
from .comm import MeshGroups
from .strategy import _Snapshot, check_mesh

AXIS = "dp"
WEIGHT = "dp.weight"      # the step's input: this rank's share of the batch's loss
BUCKET_MB = 25.0          # DDP's default bucket_cap_mb


@dataclasses.dataclass
class Bucket:
    """Gradients all-reduced together: parameter names in the order the backward finishes
    them, their shapes, and the flat length (padded to a multiple of dp under ZeRO)."""

    names: list[str]
    shapes: list[tuple[int, ...]]
    size: int

    @property
    def sizes(self) -> list[int]:
        return [math.prod(s) for s in self.shapes]

    def views(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """Each parameter's part of a flat array laid out like the bucket, in its shape."""
        out, at = {}, 0
        for n, s, k in zip(self.names, self.shapes, self.sizes, strict=True):
            out[n] = flat[at:at + k].reshape(s)
            at += k
        return out


def plan_buckets(graph: Graph, names: list[str], cap_bytes: float, dp: int = 1,
                 pad: bool = False) -> list[Bucket]:
    """The gradients `grad.<name>` of a step graph grouped into buckets of at most
    `cap_bytes` (a bigger gradient is a bucket of its own), in the order their producing
    nodes run; `pad`: each bucket's length rounded up to a multiple of dp."""
    outputs = {v.name: v for v in graph.outputs}
    index = {v: i for i, n in enumerate(graph.nodes) for v in n.outputs}
    ready = sorted(names, key=lambda n: index.get(outputs[GRAD_PREFIX + n], -1))
    buckets: list[Bucket] = []
    used = 0
    for n in ready:
        t = outputs[GRAD_PREFIX + n].type
        if not buckets or (used and used + t.nbytes() > cap_bytes):
            buckets.append(Bucket([], [], 0))
            used = 0
        buckets[-1].names.append(n)
        buckets[-1].shapes.append(tuple(t.shape))
        used += t.nbytes()
    for b in buckets:
        b.size = sum(b.sizes)
        if pad:
            b.size = -(-b.size // dp) * dp
    return buckets


def data_parallel_graph(graph: Graph, names: list[str], dp: int, buckets: list[Bucket],
                        zero: bool = False) -> tuple[Graph, list[str]]:
    """The step graph (modified in place) averaging its loss and gradients over the dp
    axis: an input `dp.weight` scales them, then each bucket is concatenated,
    all-reduced (reduce-scattered with `zero`) and split back. Returns the graph and its
    gradient names: the parameters', or with `zero` one flat slice per bucket,
    `bucket<i>`."""
    weight = graph.add_input(WEIGHT, TensorType((), "f32"))
    outputs = {v.name: v for v in graph.outputs}
    index = {v: i for i, n in enumerate(graph.nodes) for v in n.outputs}
    after: dict[int, list[Node]] = {}   # node index -> the nodes to run right after it

    def emit(anchor_values: list[Value], build) -> list[Value]:
        first = len(graph.nodes)
        got = build()
        anchor = max((index.get(v, -1) for v in anchor_values), default=-1)
        after.setdefault(anchor, []).extend(graph.nodes[first:])
        del graph.nodes[first:]
        return got

    def reduced(v: Value, name: str) -> Value:
        graph.rename(v, graph.fresh_name(name + ".local"))
        return v

    loss = reduced(outputs["loss"], "loss")
    new_outputs = {"loss": emit([loss], lambda: [graph.add(
        "all_reduce", graph.add("mul", loss, weight), axis=AXIS, size=dp)])[0]}
    grad_names = []
    for i, b in enumerate(buckets):
        grads = [reduced(outputs[GRAD_PREFIX + n], GRAD_PREFIX + n) for n in b.names]

        def build(grads=grads, b=b):
            parts = [graph.add("reshape", g, shape=(g.type.numel,)) for g in grads]
            if b.size > sum(b.sizes):
                parts.append(graph.add("full", shape=(b.size - sum(b.sizes),), value=0,
                                       dtype="f32"))
            flat = graph.add("concat", *parts, axis=0) if len(parts) > 1 else parts[0]
            flat = graph.add("mul", flat, weight)
            if zero:
                return [graph.add("reduce_scatter", flat, axis=AXIS, size=dp, dim=0)]
            total = graph.add("all_reduce", flat, axis=AXIS, size=dp)
            pieces = graph.add_node("split", [total], {"axis": 0, "sizes": b.sizes}) \
                if len(b.sizes) > 1 else [total]
            return [graph.add("reshape", p, shape=s) for p, s in zip(pieces, b.shapes,
                                                                      strict=True)]
        got = emit(grads, build)
        if zero:
            new_outputs[f"{GRAD_PREFIX}bucket{i}"] = got[0]
            grad_names.append(f"bucket{i}")
        else:
            new_outputs.update((GRAD_PREFIX + n, v) for n, v in zip(b.names, got, strict=True))
            grad_names += b.names
    graph.nodes[:] = after.get(-1, []) + [m for i, n in enumerate(graph.nodes)
                                          for m in [n] + after.get(i, [])]
    for name, v in new_outputs.items():
        if not graph.rename(v, name):
            raise AssertionError(f"cannot name {v.name} {name}")
    graph.outputs = list(new_outputs.values())
    return graph.verify(), grad_names


def shift_dropout(graph: Graph, row_offset: int, rows: int) -> Graph:
    """Dropout masks of the rows a rank holds: each dropout's element index shifted by
    the elements of the rows before them (`row_offset` rows of `rows` per rank), so the
    ranks together drop what one process running the whole batch drops. Every dropout
    (in fused bodies too) must read a tensor whose first dim is the batch's."""
    for node in _all_nodes(graph):
        if node.op != "dropout":
            continue
        shape = node.inputs[0].type.shape
        if not shape or shape[0] != rows or not all(isinstance(d, int) for d in shape):
            raise TensorcError(f"{node.where}: dropout over {node.inputs[0].type} is not "
                               f"batch-major ({rows} rows): its masks cannot follow the "
                               "batch's split; train with dropout 0 or without --mesh dp")
        node.attrs["salt"] = shifted_salt(node.attrs["salt"],
                                          row_offset * math.prod(shape[1:]))
    return graph


def _all_nodes(graph: Graph):
    for node in graph.nodes:
        yield node
        body = node.attrs.get("body")
        if isinstance(body, Graph):
            yield from _all_nodes(body)


class DataParallel:
    """One rank's side of data-parallel training, a strategy `training.fit(...,
    parallel=)` calls (`strategy.py` has the interface): `shard` (its rows of a batch and
    their loss weight), `step` (the compiled step with the gradient all-reduces),
    `optimizer`, `clip_grad_norm`, `save_checkpoint` (rank 0 writes; every rank takes
    part). `groups`: the rank's communicators (`MeshGroups`; only its `dp` axis is
    used)."""

    def __init__(self, groups: MeshGroups, zero: bool = False, bucket_mb: float = BUCKET_MB):
        if bucket_mb <= 0:
            raise TensorcError(f"bucket size {bucket_mb} MB should be positive")
        self.comm = groups.group(AXIS)
        self.rank, self.size = self.comm.rank, self.comm.size
        self.zero, self.bucket_bytes = zero, bucket_mb * 2**20
        self.buckets: list[Bucket] = []
        self.flat: list[np.ndarray] = []   # ZeRO: the parameters, one buffer per bucket

    @property
    def writer(self) -> bool:
        """Whether this rank prints, evaluates and writes checkpoints."""
        return self.rank == 0

    # -- the batch --
    def rows(self, batch_size: int) -> slice:
        check_mesh(Mesh(dp=self.size), batch_size)
        n = batch_size // self.size
        return slice(self.rank * n, (self.rank + 1) * n)

    def shard(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """This rank's rows of every batch array (a scalar, the dropout seed, is shared),
        and `dp.weight`: its share of the counted labels (ignored ones do not count)."""
        size = next(len(a) for a in batch.values() if np.ndim(a))
        rows = self.rows(size)
        out = {k: (a[rows] if np.ndim(a) else a) for k, a in batch.items()}
        labels = batch.get("labels")
        share = 1.0 / self.size
        if labels is not None:
            total = int(np.count_nonzero(labels != IGNORE_INDEX))
            if total:
                share = np.count_nonzero(out["labels"] != IGNORE_INDEX) / total
        if "teacher_logits" in batch and share != 1.0 / self.size:
            raise TensorcError("distillation under --mesh dp needs every rank to count "
                               "the same labels (the soft loss is a plain mean)")
        out[WEIGHT] = np.array(share, np.float32)
        return out

    # -- the step --
    def rewrite(self, graph: Graph, names: list[str], rows: int) -> tuple[Graph, list[str]]:
        """The step graph of `rows` rows made this rank's (`TrainStep`'s hook)."""
        self.buckets = plan_buckets(graph, names, self.bucket_bytes, self.size, pad=self.zero)
        shift_dropout(graph, self.rank * rows, rows)
        return data_parallel_graph(graph, names, self.size, self.buckets, self.zero)

    def step(self, model, task, batch, backend="llvm", distill=None, recompute=False,
             qat=False):
        """A `TrainStep` on this rank's rows (`batch`: already `shard`ed); with ZeRO the
        model's parameters move into flat per-bucket buffers."""
        from ..training import TrainStep
        batch = {k: a for k, a in batch.items() if k != WEIGHT}   # `rewrite` adds it
        rows = next(len(a) for a in batch.values() if np.ndim(a))
        step = TrainStep(model, task, batch, backend, distill, recompute, qat,
                         rewrite=lambda graph, names: self.rewrite(graph, names, rows))
        if self.zero:
            self.flat = []
            for b in self.buckets:
                flat = np.zeros(b.size, np.float32)
                for n, view in b.views(flat).items():
                    view[...] = step.params[n]
                    step.params[n] = view
                self.flat.append(flat)
            for n, p in model.named_parameters():
                p.data = step.params[n]
        return step

    # -- the update --
    def optimizer(self, params, make):
        """`make(params)` -> an optim.Optimizer: over the whole parameters (plain DP: every
        rank updates them alike), or with ZeRO over this rank's slices of the buckets."""
        if not self.zero:
            return make(params)
        return ZeroOptimizer(self, make)

    def clip_grad_norm(self, grads, max_norm: float) -> float:
        """optim.clip_grad_norm over the gradients every rank holds a part of (ZeRO: the
        squared norms of the slices summed over the axis)."""
        from ..optim import clip_grad_norm
        if not self.zero:
            return clip_grad_norm(grads, max_norm)
        return clip_grad_norm(grads, max_norm, sum_over=lambda s: float(
            self.comm.all_reduce(np.array(s, np.float64))))

    def gather(self, model, params):
        """The whole weights: every rank holds them (the model's own arrays)."""
        return params

    def restore(self, ck, params, optimizer, rng) -> None:
        """A whole checkpoint into every rank (ZeRO: each keeps its slices of the state)."""
        ck.restore(params, optimizer, rng)

    def save_checkpoint(self, directory, params, optimizer, step, extra=None, **kw):
        """optim.save_checkpoint from rank 0, with the whole optimizer state (ZeRO: its
        slices gathered; every rank must call this)."""
        from ..optim import save_checkpoint
        whole = optimizer.gathered() if self.zero else optimizer
        if self.writer:
            save_checkpoint(directory, params, whole, step, extra, **kw)


class ZeroOptimizer:
    """ZeRO-1: an optim.Optimizer over this rank's slice of each bucket's flat
    parameters (and so 1/dp of the state), then the slices all-gathered. Speaks the
    optimizer's checkpoint interface with whole, per-parameter state."""

    def __init__(self, dp: DataParallel, make):
        self.dp = dp
        n = dp.size
        self.slices = [slice(dp.rank * (b.size // n), (dp.rank + 1) * (b.size // n))
                       for b in dp.buckets]
        self.inner = make({f"bucket{i}": flat[s] for i, (flat, s) in
                           enumerate(zip(dp.flat, self.slices, strict=True))})

    def step(self, grads, lr=None) -> None:
        self.inner.step(grads, lr=lr)
        for i, flat in enumerate(self.dp.flat):
            flat[...] = self.dp.comm.all_gather(self.inner.params[f"bucket{i}"], 0)

    def state_bytes(self) -> int:
        """Optimizer state this rank keeps."""
        return sum(a.nbytes for per in self.inner.state.values() for a in per.values())

    def hyper(self) -> dict:
        return self.inner.hyper()

    def gathered(self):
        """The whole state, as an object `optim.save_checkpoint` takes (a collective)."""
        state = {}
        for k, per in self.inner.state.items():
            for i, b in enumerate(self.dp.buckets):
                whole = self.dp.comm.all_gather(per[f"bucket{i}"], 0)
                state.update((f"{k}.{n}", v.copy()) for n, v in b.views(whole).items())
        return _Snapshot(state, self.hyper())

    def load_state_dict(self, state, hyper=None) -> None:
        """Whole per-parameter state (a checkpoint's): this rank keeps its slices."""
        mine = {}
        for k in self.inner.state:
            for i, b in enumerate(self.dp.buckets):
                flat = np.zeros(b.size, np.float32)
                for n, view in b.views(flat).items():
                    got = state.get(f"{k}.{n}")
                    if got is None or np.shape(got) != view.shape:
                        raise TensorcError(f"optimizer state {k}.{n}: expected "
                                           f"{list(view.shape)}, got "
                                           f"{'none' if got is None else list(np.shape(got))}")
                    view[...] = got
                mine[f"{k}.bucket{i}"] = flat[self.slices[i]]
        self.inner.load_state_dict(mine, hyper)
