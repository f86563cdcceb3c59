"""Sharding: the local graph of one rank of a device mesh (issue 16).

``shard(graph, mesh, rank)`` runs in three steps:

1. `prepare` (``O1,fuse-patterns,fuse-attention``, prune's preparation): attention is one
   `attention` node, q/k/v still three matmuls, nothing fused yet. The rest of O2
   (the ``O2-local`` pipeline) then runs on the local graph: collectives are opaque
   ops, so no fused region or epilogue reaches across one.
2. Specs: a `mesh.Sharding` for graph inputs and constants (weights), from `specs` (by
   value name) and the strategy. ``megatron`` (Shoeybi et al. 2019) splits q/k/v and
   FFN-up weights by columns (whole heads and neurons) and the attention output and
   FFN-down weights by rows over ``tp``, the embedding table by rows (vocabulary
   parallel; a tied output head shares the split), an untied output head by columns;
   every strategy splits the graph inputs' batch dim over ``dp``.
3. Propagation and partition, one walk in graph order: each op's rule reads its
   operands' shardings and says which it takes and what it gives (a matmul contracting
   over a split dim gives a ``partial`` sum); where an operand lies otherwise, a
   collective converts it: partial -> replicated `all_reduce`, partial -> split
   `reduce_scatter`, split -> replicated `all_gather`, replicated -> split a local
   `slice` (for a weight: its slice of the data, no op). Outputs end replicated, so
   every rank returns the whole answer. An op without a rule for its operands'
   shardings computes whole on every rank (its operands gathered): correct, listed in
   `Plan.notes`.

With megatron's specs the walk gives Megatron's arrangement without a rule knowing it:
a row-parallel matmul's partial output meets the bias add (or the residual add), which
cannot take a partial operand beside a whole one, so exactly one all_reduce follows each
attention block and each MLP block.

Training (`plan_step`): the same walk over the step after `grad`, weights and their
gradients split alike; the backward's collectives come out of the same rules (a
column-parallel matmul's input gradient is partial over tp, a weight gradient summed
over dp's batch rows partial over dp).

Every rank's local graph has the same ops in the same order (only slice offsets and
weight data differ), so the ranks call the same collectives in the same order.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tensorc.errors import TensorcError
from tensorc.ir import Graph, Node, TensorType, Value
from tensorc.mesh import AXES, Mesh, Sharding
from tensorc.ops import get_op

from .autodiff import GRAD_PREFIX, grad
from .manager import register_pass
from .prune import PruneError, prepare, structures
from .rewrite import copy_graph, dce

STRATEGIES = ("megatron", "none")


class ShardError(TensorcError):
    """A mesh or spec that does not fit the graph (one line, naming the value or layer)."""


class _NoRule(Exception):
    """An op's rule cannot take its operands' shardings: compute it whole instead."""


# --- specs ------------------------------------------------------------------------------

def _spec(dims, partial=()) -> Sharding:
    return Sharding(tuple(dims), frozenset(partial))


def _replicated(v: Value) -> Sharding:
    return Sharding.replicated(v.type.rank)


def _whole(s: Sharding) -> Sharding:
    """`s` with its partial sums added up."""
    return _spec(s.dims)


def _weight_of(v: Value) -> tuple[Value, list[int]] | None:
    """The weight `v` is made of through transposes, and where each of v's dims comes
    from in it (a tied output head reads the embedding table transposed). A weight is a
    constant, or a graph input (a training step's)."""
    perm = list(range(v.type.rank))
    while v.producer is not None and v.producer.op == "transpose":
        p = v.producer.attrs.get("perm") or tuple(range(v.type.rank))[::-1]
        perm = [p[i] for i in perm]
        v = v.producer.inputs[0]
    return (v, perm) if v.producer is None else None


def _split_weight(specs: dict, w: Value, dim: int, axis: str, what: str) -> None:
    """Split matmul operand `w` (a constant, maybe transposed) on `dim` over `axis`."""
    found = _weight_of(w)
    if found is None:
        raise ShardError(f"shard: {what} multiplies by %{w.name}, which is not a weight "
                         "(a constant or graph input)")
    c, perm = found
    dims = list(specs.get(c, _replicated(c)).dims)
    dims[perm[dim % w.type.rank]] = axis
    specs[c] = _spec(dims)


def _split_column(specs: dict, mm: Node, users: dict, what: str) -> None:
    """A column-parallel matmul: its weight's columns and its bias (a weight added to its
    output) split over tp. (The walk would slice a constant bias anyway; a training
    step's bias is an input, whose gradient then stays split too.)"""
    _split_weight(specs, mm.inputs[1], -1, "tp", what)
    for u in users.get(mm.outputs[0], []):
        if u.op != "add":
            continue
        for b in u.inputs:
            if b.producer is None and b.type.rank == 1 and \
                    b.type.shape == mm.outputs[0].type.shape[-1:]:
                specs[b] = _spec(("tp",))


def megatron(g: Graph, mesh: Mesh, notes: list[str]) -> dict[Value, Sharding]:
    """Megatron-LM's tensor-parallel specs for the weights of prepared graph `g`."""
    specs: dict[Value, Sharding] = {}
    tp = mesh.tp
    if tp == 1:
        return specs
    users = g.users()
    try:
        layers = structures(g)
    except PruneError as e:
        notes.append(f"megatron: no transformer layers to split ({e}); weights replicated")
        layers = []
    for lay in layers:
        where = f"layer {lay.index} ({lay.attention.where})"
        for what, n in (("heads", lay.heads), ("key/value heads", lay.kv_heads)):
            if n % tp:
                raise ShardError(f"shard: tp={tp} does not divide the {n} {what} of {where}")
        for mm in lay.qkv:
            _split_column(specs, mm, users, where)
        for mm in lay.out:
            _split_weight(specs, mm.inputs[1], -2, "tp", where)
        if lay.ffn is not None:
            if lay.ffn.width % tp:
                raise ShardError(f"shard: tp={tp} does not divide the {lay.ffn.width} "
                                 f"feed-forward neurons of {where}")
            for mm in lay.ffn.up:
                _split_column(specs, mm, users, where)
            for mm in lay.ffn.down:
                _split_weight(specs, mm.inputs[1], -2, "tp", where)
    claimed = {mm for lay in layers for mm in lay.qkv + lay.out +
               (lay.ffn.up + lay.ffn.down if lay.ffn else [])}
    for n in g.nodes:   # vocabulary-parallel embeddings: the table's rows
        if n.op == "gather" and _weight_of(n.inputs[0]) and n.attrs["axis"] == 0:
            table = n.inputs[0]
            rows = table.type.shape[0]
            if rows % tp:
                notes.append(f"megatron: tp={tp} does not divide the {rows} rows of "
                             f"embedding %{table.name}: kept whole")
            elif table.type.rank == 2:
                specs[table] = _spec(("tp", None))
    for out in g.outputs:   # an untied output head: its columns
        mm = out.producer
        while mm is not None and mm.op == "add" and any(v.is_constant for v in mm.inputs):
            mm = next(v for v in mm.inputs if not v.is_constant).producer
        if mm is None or mm.op != "matmul" or mm in claimed:
            continue
        found = _weight_of(mm.inputs[1])
        cols = mm.inputs[1].type.shape[-1]
        if found is None or found[0] in specs:
            continue   # tied: the embedding's split decides
        if cols % tp:
            notes.append(f"megatron: tp={tp} does not divide the {cols} outputs of "
                         f"{mm.where}: kept whole")
        else:
            _split_weight(specs, mm.inputs[1], -1, "tp", mm.where)
    return specs


def batch_specs(g: Graph, mesh: Mesh, names: list[str] | None = None
                ) -> dict[Value, Sharding]:
    """Data parallel: the graph inputs `names` (by default every input whose first dim is
    the batch, the first input's first dim) split on their first dim over ``dp``."""
    inputs = [v for v in g.inputs if names is None or v.name in names]
    if mesh.dp == 1 or not inputs or not inputs[0].type.rank:
        return {}
    batch = inputs[0].type.shape[0]
    specs = {}
    for v in inputs:
        if v.type.rank and v.type.shape[0] == batch:
            if not isinstance(batch, int) or batch % mesh.dp:
                raise ShardError(f"shard: dp={mesh.dp} does not divide the batch {batch} of "
                                 f"input %{v.name}")
            specs[v] = _spec(("dp",) + (None,) * (v.type.rank - 1))
    return specs


def _check_spec(v: Value, s: Sharding, mesh: Mesh) -> Sharding:
    if not isinstance(s, Sharding):
        s = _spec(s)
    if len(s.dims) != v.type.rank:
        raise ShardError(f"shard: spec {s} for %{v.name} has {len(s.dims)} dims, the value "
                         f"has {v.type.rank} ({v.type})")
    for a in list(s.dims) + sorted(s.partial):
        if a is not None and a not in AXES:
            raise ShardError(f"shard: spec {s} for %{v.name} names {a!r}, not a mesh axis "
                             f"({', '.join(AXES)})")
    used = [a for a in s.dims if a is not None]
    if len(used) != len(set(used)):
        raise ShardError(f"shard: spec {s} for %{v.name} splits two dims over one axis")
    try:
        s.local_shape(v.type.shape, mesh)
    except TensorcError as e:
        raise ShardError(f"shard: %{v.name} {v.type}: {e}") from None
    if s.partial and (v.is_constant or v.producer is None):
        raise ShardError(f"shard: %{v.name} is a graph input or weight: it cannot be partial")
    # an axis of one rank splits nothing
    return _spec([a if a and mesh.sizes[a] > 1 else None for a in s.dims],
                 [a for a in s.partial if mesh.sizes[a] > 1])


# --- rules: (operand shardings) -> (the shardings they are taken in, the outputs') ------

def _operand_dims(out: TensorType, dims: list, t: TensorType) -> list:
    """How operand type `t` lies when an elementwise result of type `out` lies as `dims`
    (aligned from the right; a broadcast dim of size 1 stays whole)."""
    r = out.rank
    return [None if t.shape[b] == 1 and out.shape[b + r - t.rank] != 1
            else dims[b + r - t.rank] for b in range(t.rank)]


def _broadcast_dims(out: TensorType, ins: list[TensorType], have: list[Sharding]
                    ) -> tuple[list, list]:
    """Elementwise broadcasting: the output's split per dim (the first operand split on
    it decides), and how each operand is taken."""
    r = out.rank
    dims: list = [None] * r
    for t, s in zip(ins, have, strict=True):
        for b, a in enumerate(s.dims):
            if a is not None and dims[b + r - t.rank] is None and a not in dims:
                dims[b + r - t.rank] = a
    return dims, [_operand_dims(out, dims, t) for t in ins]


def _elementwise(n: Node, have: list[Sharding]):
    ins = [v.type for v in n.inputs]
    dims, wants = _broadcast_dims(n.outputs[0].type, ins, have)
    parts = [s.partial for s in have]
    # linear ops keep partial sums: a sum of partial sums, a partial times a whole
    keep = frozenset()
    if n.op in ("add", "sub") and parts[0] and all(p == parts[0] for p in parts):
        keep = parts[0]
    elif n.op in ("mul", "div", "neg") and parts[0] and not any(parts[1:]):
        keep = parts[0]
    elif n.op == "mul" and len(parts) == 2 and parts[1] and not parts[0]:
        keep = parts[1]
    if keep & set(dims):   # a partial sum cannot also be split over its own axis
        keep = frozenset()
    want = [_spec(w, p if p == keep else ()) for w, p in zip(wants, parts, strict=True)]
    return want, [_spec(dims, keep)]


def _matmul(n: Node, have: list[Sharding]):
    x, w = n.inputs
    hx, hw = have
    if x.type.rank < 2 or w.type.rank < 2:
        raise _NoRule("a vector operand")
    out = n.outputs[0].type
    batch = TensorType(out.shape[:-2], out.dtype)
    bdims, (bx, bw) = _broadcast_dims(
        batch, [TensorType(x.type.shape[:-2]), TensorType(w.type.shape[:-2])],
        [_spec(hx.dims[:-2]), _spec(hw.dims[:-2])])
    kx, kw = hx.dims[-1], hw.dims[-2]
    k = kx if kx is not None else kw
    if kx is not None and kw is not None and kx != kw:
        k = None
    used = [a for a in bdims if a is not None]
    m = hx.dims[-2] if hx.dims[-2] not in used else None
    used.append(m)
    nn = hw.dims[-1] if hw.dims[-1] not in used else None
    used.append(nn)
    if k in used:
        k = None
    used.append(k)
    # the splits win over partial operands (a split weight is free, its gather is not):
    # an operand partial over an axis that splits something is added up first
    px, pw = hx.partial - set(used), hw.partial - set(used)
    if px and pw:
        pw = frozenset()
    partial = px | pw | ({k} if k else set())
    return ([_spec(bx + [m, k], px), _spec(bw + [k, nn], pw)],
            [_spec(bdims + [m, nn], partial)])


def _transpose(n: Node, have: list[Sharding]):
    (h,) = have
    perm = n.attrs.get("perm") or tuple(range(len(h.dims)))[::-1]
    return [h], [_spec([h.dims[p] for p in perm], h.partial)]


def _blocks(src: tuple, dst: tuple) -> list[tuple[list[int], list[int]]] | None:
    """A reshape's dims grouped into blocks of equal products (size-1 dims alone), or None
    when symbolic dims do not line up one to one."""
    out, i, j = [], 0, 0
    while i < len(src) or j < len(dst):
        if i < len(src) and src[i] == 1:
            out.append(([i], [j] if j < len(dst) and dst[j] == 1 else []))
            j += bool(out[-1][1])
            i += 1
            continue
        if j < len(dst) and dst[j] == 1:
            out.append(([], [j]))
            j += 1
            continue
        if i == len(src) or j == len(dst):
            return None
        if not (isinstance(src[i], int) and isinstance(dst[j], int)):
            if str(src[i]) != str(dst[j]):
                return None
            out.append(([i], [j]))
            i, j = i + 1, j + 1
            continue
        block = ([i], [j])
        ps, pd = src[i], dst[j]
        while ps != pd:
            if ps < pd:
                i += 1
                if i == len(src) or not isinstance(src[i], int):
                    return None
                block[0].append(i)
                ps *= src[i]
            else:
                j += 1
                if j == len(dst) or not isinstance(dst[j], int):
                    return None
                block[1].append(j)
                pd *= dst[j]
        out.append(block)
        i, j = i + 1, j + 1
    return out


def _reshape(n: Node, have: list[Sharding], mesh: Mesh):
    """A split dim that is the outermost of its block stays split on the outermost dim of
    what it becomes ([b,s,heads*d] <-> [b,s,heads,d]): both are equal runs of the block's
    flat index."""
    (h,) = have
    src, dst = n.inputs[0].type.shape, n.outputs[0].type.shape
    blocks = _blocks(src, dst)
    if blocks is None:
        raise _NoRule(f"{n.op} {list(src)} -> {list(dst)}")
    dims: list = [None] * len(dst)
    for d, a in enumerate(h.dims):
        if a is None:
            continue
        ins, outs = next(b for b in blocks if d in b[0])
        if d != ins[0] or not outs or dst[outs[0]] % mesh.sizes[a]:
            raise _NoRule(f"{n.op} {list(src)} -> {list(dst)} with dim {d} split over {a}")
        dims[outs[0]] = a
    return [h], [_spec(dims, h.partial)]


def _reduced(n: Node, rank: int) -> set[int]:
    if n.op in ("softmax", "log_softmax", "argmax"):
        return {n.attrs["axis"] % rank}
    if n.op == "layer_norm":
        return set(range(n.attrs["axis"] % rank, rank))
    axes = n.attrs.get("axes")
    return set(range(rank)) if axes is None else {a % rank for a in axes}


def _reduction(n: Node, have: list[Sharding]):
    """Along unsplit dims; a sum or mean over split dims is a partial sum over their axes
    (a mean's local result is scaled by `_node`: it divided by the local count)."""
    x = n.inputs[0]
    red = _reduced(n, x.type.rank)
    h = have[0]
    linear = n.op in ("reduce_sum", "reduce_mean")
    summed = {a for d, a in enumerate(h.dims) if d in red and a} if linear else set()
    dims = [a if a in summed or d not in red else None for d, a in enumerate(h.dims)]
    keep = h.partial if linear else frozenset()
    want = [_spec(dims, keep)] + [_replicated(v) for v in n.inputs[1:]]
    keep = keep | summed
    dims = [None if d in red else a for d, a in enumerate(dims)]
    if n.op.startswith("reduce_") or n.op == "argmax":
        if not n.attrs.get("keepdims", True):
            dims = [a for d, a in enumerate(dims) if d not in red]
    return want, [_spec(dims, keep)]


def _attention(n: Node, have: list[Sharding], mesh: Mesh):
    """attention(q, k, v, [mask]) and attention_grad(q, k, v, [mask], dy): split on batch
    (dim 0) and heads (dim 1); sequence and head dims whole; a mask by broadcasting."""
    q, k = n.inputs[:2]
    heads = n.inputs[:3] + n.inputs[4:] if n.op == "attention_grad" else n.inputs[:3]
    masks = n.inputs[3:-1] if n.op == "attention_grad" else n.inputs[3:]
    tensors = [have[n.inputs.index(v)] for v in heads]
    b = next((s.dims[0] for s in tensors if s.dims[0]), None)
    h = next((s.dims[1] for s in tensors if s.dims[1] and s.dims[1] != b), None)
    if h is not None and k.type.shape[1] % mesh.sizes[h]:
        h = None
    dims = [b, h, None, None]
    full = TensorType(q.type.shape[:3] + k.type.shape[2:3])
    want = [_spec(_operand_dims(full, dims, v.type)) if v in masks else _spec(dims)
            for v in n.inputs]
    return want, [_spec(dims) for _ in n.outputs]


def _gather(n: Node, have: list[Sharding]):
    ht, hi = have
    ax = n.attrs["axis"] % n.inputs[0].type.rank
    dims = list(ht.dims[:ax]) + list(hi.dims) + list(ht.dims[ax + 1:])
    rows = ht.dims[ax]
    if rows is not None and (ax != 0 or rows in dims):
        raise _NoRule("table rows split beside other splits")
    if len([a for a in dims if a]) != len({a for a in dims if a}):
        raise _NoRule("one axis on two dims")
    return [_whole(ht), _whole(hi)], [_spec(dims, {rows} if rows else ())]


def _scatter_add(n: Node, have: list[Sharding]):
    """gather's transpose: the table (data) whole along the axis; indices split over an
    axis (dp's batch) make the result a partial sum over it, when data is zeros."""
    data, idx, upd = n.inputs
    hd, hi, hu = have
    ax = n.attrs["axis"] % data.type.rank
    dims = [None if d == ax else a for d, a in enumerate(hd.dims)]
    for d, a in enumerate(hu.dims[:ax] + hu.dims[ax + idx.type.rank:]):
        e = d if d < ax else d + 1
        if a and dims[e] is None and a not in dims:
            dims[e] = a
    summed = {a for a in hi.dims if a and a not in dims}
    zeros = data.producer is not None and data.producer.op == "full" \
        and data.producer.attrs["value"] == 0
    if summed and not zeros:
        raise _NoRule("split indices into data that is not zeros")
    idims = [a if a in summed else None for a in hi.dims]
    udims = dims[:ax] + idims + dims[ax + 1:]
    return ([_spec(dims), _spec(idims), _spec(udims, hu.partial)],
            [_spec(dims, summed | hu.partial)])


def _concat_like(n: Node, have: list[Sharding]):
    """concat, split, slice: the dims they cut stay whole, the others pass."""
    x = n.inputs[0]
    r = x.type.rank
    if n.op == "slice":
        axes = n.attrs.get("axes") or range(len(n.attrs["starts"]))
        cut = {a % r for a in axes}
    else:
        cut = {n.attrs["axis"] % r}
    dims: list = [None] * r
    for s in have:
        for d, a in enumerate(s.dims):
            if d not in cut and a is not None and dims[d] is None and a not in dims:
                dims[d] = a
    return [_spec(dims) for _ in have], [_spec(dims) for _ in n.outputs]


def _batch_only(n: Node, have: list[Sharding]):
    """conv2d and the like: the batch dim passes, everything else whole."""
    b = have[0].dims[0]
    out = n.outputs[0].type.rank
    return ([_spec([b] + [None] * (n.inputs[0].type.rank - 1))] +
            [_replicated(v) for v in n.inputs[1:]], [_spec([b] + [None] * (out - 1))])


def _rule(n: Node, have: list[Sharding], mesh: Mesh):
    op = n.op
    if not n.inputs:
        return [], [_replicated(v) for v in n.outputs]
    if op == "dropout":
        raise _NoRule("its mask hashes global indices")
    if get_op(op).kind == "elementwise" or op == "expand":
        return _elementwise(n, have)
    if op == "matmul":
        return _matmul(n, have)
    if op == "transpose":
        return _transpose(n, have)
    if op in ("reshape", "squeeze", "unsqueeze") and len(n.inputs) == 1:
        return _reshape(n, have, mesh)
    if op in ("reduce_sum", "reduce_mean", "reduce_max", "reduce_min", "argmax", "softmax",
              "log_softmax", "layer_norm"):
        return _reduction(n, have)
    if op in ("attention", "attention_grad"):
        return _attention(n, have, mesh)
    if op == "scatter_add":
        return _scatter_add(n, have)
    if op == "gather":
        return _gather(n, have)
    if op in ("concat", "split", "slice"):
        return _concat_like(n, have)
    if op in ("conv2d",):
        return _batch_only(n, have)
    raise _NoRule("no sharding rule")


# --- the plan and its partition ---------------------------------------------------------

@dataclasses.dataclass
class Plan:
    """A prepared graph, a mesh and the specs of its inputs and weights; `local(rank)` is
    that rank's graph. `notes` lists what was kept whole and why."""

    graph: Graph
    mesh: Mesh
    specs: dict[Value, Sharding]
    notes: list[str]

    def local(self, rank: int) -> Graph:
        return _Partition(self, rank).run()

    def input_specs(self) -> dict[str, Sharding]:
        return {v.name: self.specs.get(v, _replicated(v)) for v in self.graph.inputs}

    def local_inputs(self, feeds: dict[str, np.ndarray], rank: int) -> dict[str, np.ndarray]:
        """Rank `rank`'s part of whole inputs `feeds` (the batch slice of a dp rank)."""
        coords = self.mesh.coords(rank)
        return {k: _take(np.asarray(a), self.input_specs().get(k, Sharding(())), self.mesh,
                         coords) for k, a in feeds.items()}


def _take(a: np.ndarray, s: Sharding, mesh: Mesh, coords: dict) -> np.ndarray:
    for d, ax in enumerate(s.dims):
        if ax is not None:
            a = np.split(a, mesh.sizes[ax], axis=d)[coords[ax]]
    return a


def plan(graph: Graph, mesh: Mesh, strategy: str | None = "megatron",
         specs: dict[str, Sharding | tuple] | None = None,
         batch: list[str] | None = None) -> Plan:
    """Specs for `graph` (prepared on the way) on `mesh`: the strategy's, then `specs`
    (by value name; a value that is neither input nor weight is resharded to its spec
    where it is made; an output stays in its spec, else it is gathered whole). `batch`:
    the inputs dp splits (`batch_specs`)."""
    if strategy not in STRATEGIES and strategy is not None:
        raise ShardError(f"shard: unknown strategy {strategy!r} (known: "
                         f"{', '.join(STRATEGIES)})")
    g = prepare(graph)
    notes: list[str] = []
    if mesh.pp > 1:
        notes.append(f"pp={mesh.pp}: cutting stages is tensorc.parallel.pipeline's; here "
                     "each stage holds the whole graph")
    out = batch_specs(g, mesh, batch)
    if strategy == "megatron":
        out.update(megatron(g, mesh, notes))
    values = g.values()
    for name, s in (specs or {}).items():
        if name not in values:
            raise ShardError(f"shard: a spec names %{name}, which the graph does not have")
        out[values[name]] = s
    out = {v: _check_spec(v, s, mesh) for v, s in out.items()}
    return Plan(g, mesh, out, notes)


def shard(graph: Graph, mesh: Mesh, rank: int, strategy: str | None = "megatron",
          specs: dict | None = None) -> Graph:
    """The local graph of `rank` on `mesh` (see the module doc). Run ``O2-local`` on it
    for O2's fusion."""
    return plan(graph, mesh, strategy, specs).local(rank)


def _weights_constant(g: Graph, names: list[str]) -> Graph:
    """A copy of `g` whose weight inputs `names` are constants (of zeros that take no
    memory): `structures` follows heads into constants only."""
    g = copy_graph(g)
    for v in [v for v in g.inputs if v.name in names]:
        g.inputs.remove(v)
        v.data = np.broadcast_to(np.zeros((), v.type.np_dtype), v.type.shape)
        g.constants[v.name] = v
    return g


def step_specs(forward: Graph, weights: list[str], mesh: Mesh,
               strategy: str | None = "megatron", notes: list[str] | None = None
               ) -> dict[str, Sharding]:
    """The strategy's specs, by name, of the weights `weights` of prepared graph `forward`
    (weights as inputs: a step's forward, or a pipeline stage's) and of their gradients
    (``grad.<weight>`` lies as its weight); replicated weights are left out."""
    found = megatron(_weights_constant(forward, weights), mesh,
                     [] if notes is None else notes) if strategy == "megatron" else {}
    specs = {}
    for v, s in found.items():
        if v.name in weights:
            specs[v.name] = specs[GRAD_PREFIX + v.name] = s
    return specs


def plan_step(forward: Graph, loss: str, weights: list[str], mesh: Mesh,
              strategy: str | None = "megatron") -> Plan:
    """A training step's plan. `forward`: the loss graph with the weights as inputs (what
    `training.step_graph` has before `grad`). The strategy's specs are found on it (a
    backward has no `structures`), then the step (loss and ``grad.<weight>``) is sharded:
    batch inputs split over dp, weights and their gradients as the strategy says. The
    walk adds the collectives training needs by itself: a column-parallel matmul's input
    gradient is partial over tp (Megatron's f: all_reduce), a weight gradient summed
    over dp's batch rows is partial over dp (data parallel's gradient all_reduce)."""
    g = prepare(forward)
    notes: list[str] = []
    specs = step_specs(g, weights, mesh, strategy, notes)
    step = grad(g, loss, weights)
    batch = [v.name for v in step.inputs if v.name not in weights]
    p = plan(step, mesh, None, specs, batch)
    p.notes[:0] = notes
    return p


class _Partition:
    def __init__(self, p: Plan, rank: int):
        self.p, self.mesh = p, p.mesh
        self.coords = p.mesh.coords(rank)
        self.g = Graph(p.graph.name)
        self.local: dict[Value, Value] = {}
        self.spec: dict[Value, Sharding] = {}
        self.consts: dict[tuple, Value] = {}
        self.made: dict[tuple, Value] = {}   # (value, sharding) -> converted already

    def run(self) -> Graph:
        p, g = self.p, self.g
        for v in p.graph.inputs:
            s = p.specs.get(v, _replicated(v))
            self.local[v] = g.add_input(v.name, TensorType(s.local_shape(v.type.shape,
                                                                         self.mesh),
                                                           v.type.dtype))
            self.spec[v] = s
        for n in p.graph.nodes:
            self._node(n)
        outs = []
        for v in p.graph.outputs:
            x = self.get(v, p.specs.get(v, _replicated(v)))
            if x.name != v.name:   # the output keeps its name
                holder = g.values().get(v.name)
                if holder is not None:
                    g.rename(holder, g.fresh_name(v.name + ".part"))
                g.rename(x, v.name)
            outs.append(x)
        g.outputs = outs
        dce(g)
        return g.verify()

    def _node(self, n: Node) -> None:
        have = [self.spec_of(v) for v in n.inputs]
        try:
            want, made = _rule(n, have, self.mesh)
            for v, s in zip(n.outputs, made, strict=True):
                s.local_shape(v.type.shape, self.mesh)
        except (_NoRule, TensorcError) as e:
            if any(s.partial or any(s.dims) for s in have):
                self.note(f"{n.where}: computed whole on every rank ({e})")
            want, made = [_replicated(v) for v in n.inputs], [_replicated(v) for v in n.outputs]
        ins = [self.get(v, s) for v, s in zip(n.inputs, want, strict=True)]
        if n.op == "gather" and made[0].partial:
            outs = [self._vocab_parallel(n, ins, want[0])]
        else:
            outs = self.g.add_node(n.op, ins, self._attrs(n, made),
                                   names=[self.g.fresh_name(v.name) for v in n.outputs],
                                   loc=n.loc)
        new = made[0].partial - want[0].partial if n.op == "reduce_mean" else ()
        if new:   # each rank divided its sum by its own count, not the whole's
            ranks = int(np.prod([self.mesh.sizes[a] for a in new]))
            scale = self.g.add_constant(self.g.fresh_name(f"{n.outputs[0].name}.ranks"),
                                        np.array(1 / ranks, outs[0].type.np_dtype))
            outs = [self._add_node("mul", [outs[0], scale], n.outputs[0].name)]
        for v, x, s in zip(n.outputs, outs, made, strict=True):
            want_shape = s.local_shape(v.type.shape, self.mesh)
            if tuple(map(str, x.type.shape)) != tuple(map(str, want_shape)):
                raise AssertionError(f"shard: {n.where} made {x.type}, its sharding {s} "
                                     f"says {want_shape}")
            self.local[v], self.spec[v] = x, s
            if v in self.p.specs:   # a user's spec on an intermediate value
                self.local[v], self.spec[v] = self.get(v, self.p.specs[v]), self.p.specs[v]

    def note(self, line: str) -> None:
        if line not in self.p.notes:
            self.p.notes.append(line)

    def spec_of(self, v: Value) -> Sharding:
        if v.is_constant:
            return self.p.specs.get(v, _replicated(v))
        return self.spec[v]

    def _attrs(self, n: Node, made: list[Sharding]) -> dict:
        attrs = dict(n.attrs)
        if n.op in ("reshape", "expand") and "shape" in attrs:
            shape = list(attrs["shape"])
            for d, a in enumerate(made[0].dims):
                if a is not None and shape[d] != -1:
                    shape[d] = shape[d] // self.mesh.sizes[a]
            attrs["shape"] = tuple(shape)
        return attrs

    # -- getting a value in a given sharding --
    def get(self, v: Value, want: Sharding) -> Value:
        if v.is_constant:
            return self._const(v, want)
        x, have = self.local[v], self.spec[v]
        if have == want:
            return x
        if (v, want) in self.made:
            return self.made[v, want]
        sizes = self.mesh.sizes
        dims = list(have.dims)
        for a in sorted(have.partial - want.partial):
            d = next((d for d, b in enumerate(want.dims) if b == a and dims[d] is None
                      and a not in dims), None)
            if d is not None:
                x = self._add("reduce_scatter", x, v.name, axis=a, size=sizes[a], dim=d)
                dims[d] = a
            else:
                x = self._add("all_reduce", x, v.name, axis=a, size=sizes[a])
        if have.partial - want.partial:   # later readers take the sum too: add up once
            self.local[v], self.spec[v] = x, _spec(dims, have.partial & want.partial)
        if want.partial - have.partial:
            raise AssertionError(f"shard: %{v.name} cannot become partial")
        # innermost axis first: tp's gather moves the smaller tensor, on the fastest links
        for d, a in sorted(enumerate(dims), key=lambda da: -AXES.index(da[1] or "pp")):
            if a is not None and a != want.dims[d]:
                x = self._add("all_gather", x, v.name, axis=a, size=sizes[a], dim=d)
                dims[d] = None
        for d, a in enumerate(want.dims):
            if a is not None and dims[d] is None:
                part = x.type.shape[d] // sizes[a]
                start = self.coords[a] * part
                x = self._add("slice", x, v.name, starts=(start,), ends=(start + part,),
                              axes=(d,))
                dims[d] = a
        self.made[v, want] = x
        return x

    def _add(self, op: str, x: Value, hint: str, **attrs) -> Value:
        return self._add_node(op, [x], hint, **attrs)

    def _add_node(self, op: str, xs: list[Value], hint: str, **attrs) -> Value:
        """A node the partition adds, named after what it converts (`%27.all_reduce`)."""
        (out,) = self.g.add_node(op, xs, attrs, names=[self.g.fresh_name(f"{hint}.{op}")])
        return out

    def _const(self, c: Value, want: Sharding) -> Value:
        key = (c, want.dims)
        if key not in self.consts:
            data = _take(c.data, want, self.mesh, self.coords)
            name = c.name if not any(k[0] is c for k in self.consts) else \
                self.g.fresh_name(c.name + ".shard")
            self.consts[key] = self.g.add_constant(name, np.array(data, order="C"))
        return self.consts[key]

    def _vocab_parallel(self, n: Node, ins: list[Value], table_spec: Sharding) -> Value:
        """Rows [r*V/p, (r+1)*V/p) of the table on rank r: ids outside them look up row 0
        and are zeroed, so the ranks' outputs sum to the whole lookup."""
        g = self.g
        table, ids = ins
        (a,) = [x for x in table_spec.dims[:1] if x]
        rows = table.type.shape[0]
        dt = ids.type.dtype
        off = g.add_constant(g.fresh_name("vocab.offset"),
                             np.array(self.coords[a] * rows, TensorType((), dt).np_dtype))
        zero = g.add_constant(g.fresh_name("vocab.zero"), np.array(0, off.data.dtype))
        top = g.add_constant(g.fresh_name("vocab.rows"), np.array(rows, off.data.dtype))
        local = g.add("sub", ids, off)
        mine = g.add("logical_and", g.add("greater_equal", local, zero),
                     g.add("less", local, top))
        got = g.add("gather", table, g.add("where", mine, local, zero), axis=0)
        mask = g.add("cast", mine, dtype=table.type.dtype)
        if table.type.rank > 1:
            r = ids.type.rank
            mask = g.add("unsqueeze", mask, axes=tuple(range(r, r + table.type.rank - 1)))
        return g.add("mul", got, mask)


@register_pass("shard")
def shard_pass(graph: Graph, tp: int = 1, dp: int = 1, rank: int = 0,
               strategy: str = "megatron") -> Graph:
    """`shard:tp=2:dp=1:rank=R`: rank R's local graph on a tp x dp mesh."""
    return shard(graph, Mesh(dp=dp, tp=tp), rank, strategy)
