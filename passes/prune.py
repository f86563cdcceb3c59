"""Structured pruning of transformers: whole attention heads, feed-forward neurons and
whole layers (the `prune` pass; issue 15).

`prune:heads=R:ffn=R[:layers=N][:by=magnitude|activation|taylor]`

Every layer loses ``floor(R x its heads)`` heads (at least one head is kept) and
``floor(R x its neurons)`` feed-forward neurons, those of lowest importance; R is a
fraction per layer (uneven layers keep the same share). `layers=N` then removes the N
layers of lowest layer importance. `by=activation|taylor` needs calibration feeds:
``run_pipeline(g, "prune:heads=0.5:by=taylor", options={"prune": {"data": [feeds]}})``.

The pass must come before O2's merge-projections and fusion (``--passes
prune:heads=0.3,O2``); a graph with fused regions has them inlined first. It runs
``O1,fuse-patterns,fuse-attention`` on its private copy and finds the structure there:

* A layer is an `attention` node. Its heads axis (1) is followed backwards from q, k, v
  and forwards from the output through transposes, reshapes (``[.., t, h*d] <-> [.., t,
  h, d]``), splits (a fused QKV projection), elementwise ops (bias adds, rotary
  embeddings: their tables broadcast over heads) and slices or concats along other
  axes, until it meets matmuls by constants: the q/k/v projections (their columns) and
  the output projection (its rows). Whatever else it meets (a graph output, a
  normalisation over the heads, a weight that is an input) makes the layer unprunable
  with an error naming that node.
* A feed-forward block is a matmul by a constant whose output columns run, through
  elementwise ops only (bias, activation, a gated product with a second up projection),
  into the rows of another matmul by a constant, and whose result is added to a
  residual stream. It belongs to the attention layer before it.
* A layer's residual structure: the add after its output projection (the residual
  comes in as its other operand: the block's input) and the add after its
  feed-forward (then a layer norm in post-norm models: the block's output). Removing a
  layer makes the block's readers read its input.

Grouped-query attention (fewer key/value heads) is pruned by whole key/value groups:
the pass sums the importance of a group's query heads (a query head's magnitude then
counts its q columns and o rows, not the shared k/v); `prune_graph` refuses a head list
that splits a group. A single shared key/value head (multi-query attention, or GQA pruned
down to one group) is never followed: `Layer.qkv` then lists the q projection only.
Rotary embeddings need nothing: their tables broadcast over the heads axis, and the
rotate-half slices and concats act on the head dim.

Pruning removes, for each head, the q/k/v weight columns and bias entries and the output
projection's rows (for each neuron its up columns, bias entries and down row), fixes the
reshape and split attributes, and types the graph again: the result computes what the
original did with those heads' outputs and those neurons' activations set to zero.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from tensorc.errors import TensorcError
from tensorc.ir import Graph, Node, Value
from tensorc.ops import get_op

from .rewrite import copy_graph, dce, graph_pass, inline_regions, replace_uses

PREFIX = "O1,fuse-patterns,fuse-attention"
METHODS = ("magnitude", "activation", "taylor")
_LINEAR = {"add", "sub", "mul", "neg", "cast", "div"}   # not an FFN's activation alone


class PruneError(TensorcError):
    """The graph cannot be pruned this way (one line, naming the node)."""


@dataclasses.dataclass
class FFN:
    up: list[Node]              # matmuls whose output columns are the neurons
    down: list[Node]            # matmuls whose rows they are
    chain: list[Node]           # the ops in between (bias adds, activation, gating)
    width: int                  # neurons
    act: Value                  # what the first down matmul reads (the activations)
    residual_add: Node | None = None


@dataclasses.dataclass
class Layer:
    index: int
    attention: Node
    heads: int
    kv_heads: int
    head_dim: int
    qkv: list[Node]             # projection matmuls whose columns are heads (q, k, v)
    out: list[Node]             # the output projection(s): rows are heads
    chain: list[Node]           # reshapes, transposes, bias adds ... in between
    consts: dict[str, int]      # weight or bias name -> the axis sliced per head
    ffn: FFN | None = None
    residual_add: Node | None = None   # x + attention(...)
    block_in: Value | None = None
    block_out: Value | None = None
    post_norm: bool = False


# --- following an axis through the graph ----------------------------------------------

def _dims_equal(a, b) -> bool:
    return len(a) == len(b) and all(str(x) == str(y) for x, y in zip(a, b, strict=True))


def _norm(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


class _Flow:
    """Which indices along which axis of each value go: `sel[value] = (axis, set)`.
    Built by spreading seeds through every node that touches a selected value."""

    def __init__(self, g: Graph, users: dict | None = None):
        self.g = g
        self.users = g.users() if users is None else users
        self.outputs = set(g.outputs)
        self.sel: dict[Value, tuple[int, set]] = {}
        self.visited: set[Node] = set()
        self.boundary: dict[Node, str] = {}   # matmul -> "cols" (w columns) or "rows"
        self.fixed: set[Node] = set()          # attention nodes seeded from outside

    def add(self, v: Value, axis: int, idx, where: Node | None = None) -> None:
        axis = _norm(axis, v.type.rank)
        idx = set(idx)
        old = self.sel.get(v)
        if old is not None:
            if old[0] != axis:
                raise PruneError(f"prune: the head/neuron axis meets itself on another axis "
                                 f"at %{v.name}" + (f" ({where.where})" if where else ""))
            if idx <= old[1]:
                return
            idx |= old[1]
        elif v in self.outputs or (v.producer is None and not v.is_constant):
            kind = "output" if v in self.outputs else "input"
            raise PruneError(f"prune: %{v.name} (a graph {kind}) would change shape")
        self.sel[v] = (axis, idx)
        self.todo.append(v)

    def run(self, seeds) -> _Flow:
        self.todo: list[Value] = []
        for v, axis, idx in seeds:
            self.add(v, axis, idx)
        while self.todo:
            v = self.todo.pop()
            nodes = ([v.producer] if v.producer is not None else []) + self.users.get(v, [])
            for n in nodes:
                self.visited.add(n)
                self._through(n)
        return self

    # each rule reads the selections of the node's operands and adds the implied ones
    def _through(self, n: Node) -> None:
        if n in self.fixed:
            return
        op = n.op
        known = [(v, *self.sel[v]) for v in n.inputs + n.outputs if v in self.sel]
        if op == "matmul":
            return self._matmul(n)
        if op == "transpose":
            (x,), (y,) = n.inputs, n.outputs
            perm = list(n.attrs.get("perm") or range(x.type.rank)[::-1])
            if x in self.sel:
                ax, idx = self.sel[x]
                self.add(y, perm.index(ax), idx, n)
            if y in self.sel:
                ax, idx = self.sel[y]
                self.add(x, perm[ax], idx, n)
            return
        if op == "reshape":
            return self._reshape(n)
        if op == "split":
            return self._split(n)
        if op in ("slice", "concat") or get_op(op).kind == "elementwise" \
                or op in ("softmax", "log_softmax"):
            rank = n.outputs[0].type.rank
            for v, ax, idx in known:
                a = ax + rank - v.type.rank
                if op == "concat" and a == _norm(n.attrs["axis"], rank) or \
                        op == "slice" and a in [_norm(x, rank) for x in
                                                (n.attrs.get("axes") or range(rank))] or \
                        op in ("softmax", "log_softmax") and a == _norm(n.attrs["axis"], rank):
                    break
                full = n.outputs[0].type.shape[a]
                for u in n.inputs + n.outputs:
                    b = a - (rank - u.type.rank)
                    if b < 0 or (u.type.shape[b] == 1 and full != 1):
                        continue   # broadcast along that axis
                    self.add(u, b, idx, n)
            else:
                return
        raise PruneError(f"prune: cannot follow the heads/neurons axis through {n.where}")

    def _matmul(self, n: Node) -> None:
        x, w = n.inputs
        (y,) = n.outputs
        if x in self.sel and self.sel[x][0] == x.type.rank - 1:
            self.boundary[n] = "rows"
            self.add(w, w.type.rank - 2, self.sel[x][1], n)
        elif y in self.sel and self.sel[y][0] == y.type.rank - 1:
            self.boundary[n] = "cols"
            self.add(w, w.type.rank - 1, self.sel[y][1], n)
        elif w in self.sel and self.sel[w][0] == w.type.rank - 2:
            self.boundary[n] = "rows"
            self.add(x, x.type.rank - 1, self.sel[w][1], n)
        elif w in self.sel and self.sel[w][0] == w.type.rank - 1:
            self.boundary[n] = "cols"
            self.add(y, y.type.rank - 1, self.sel[w][1], n)
        else:
            raise PruneError(f"prune: cannot follow the heads/neurons axis through {n.where}")

    def _reshape(self, n: Node) -> None:
        if len(n.inputs) != 1:
            raise PruneError(f"prune: {n.where} takes its shape at run time")
        (x,), (y,) = n.inputs, n.outputs
        xs, ys = list(x.type.shape), list(y.type.shape)
        for src, dst, s_shape, d_shape in ((x, y, xs, ys), (y, x, ys, xs)):
            if src not in self.sel:
                continue
            ax, idx = self.sel[src]
            cands = _reshape_axes(s_shape, d_shape, ax)
            # a size-1 heads axis makes [.., t, 1, d] <-> [.., t, d] read two ways: keep
            # the way the other side is selected already
            have = self.sel.get(dst, (None,))[0]
            mapped = next((c for c in cands if c[0] == have), cands[0] if cands else None)
            if mapped is None:
                raise PruneError(f"prune: cannot follow the heads/neurons axis (dim {ax}) "
                                 f"through {n.where}")
            b, fn = mapped
            self.add(dst, b, fn(idx, n), n)

    def _split(self, n: Node) -> None:
        (x,) = n.inputs
        ax = _norm(n.attrs["axis"], x.type.rank)
        offs = np.concatenate([[0], np.cumsum(n.attrs["sizes"])])
        if x in self.sel:
            a, idx = self.sel[x]
            for i, y in enumerate(n.outputs):
                part = {j - offs[i] for j in idx if offs[i] <= j < offs[i + 1]} \
                    if a == ax else idx
                if a != ax or part or y in self.sel:
                    self.add(y, a, {int(j) for j in part}, n)
        for i, y in enumerate(n.outputs):
            if y in self.sel:
                a, idx = self.sel[y]
                self.add(x, a, {int(j + offs[i]) for j in idx} if a == ax else idx, n)


def _reshape_axes(src: list, dst: list, ax: int) -> list:
    """The ways axis `ax` of a reshape's `src` shape goes to `dst`: (axis, index map)."""
    out = []
    for b in range(len(dst)):   # the same dim with the same dims after it
        if str(src[ax]) == str(dst[b]) and _dims_equal(src[ax + 1:], dst[b + 1:]):
            out.append((b, lambda idx, n: idx))
    # [.., h, d] -> [.., h*d]: head i is columns i*d .. i*d+d-1
    if ax == len(src) - 2 and isinstance(src[-1], int) and isinstance(src[ax], int) \
            and dst and dst[-1] == src[ax] * src[-1]:
        d = src[-1]
        out.append((len(dst) - 1, lambda idx, n: {i * d + j for i in idx for j in range(d)}))
    # [.., h*d] -> [.., h, d]
    if ax == len(src) - 1 and len(dst) >= 2 and isinstance(dst[-1], int) \
            and isinstance(dst[-2], int) and src[ax] == dst[-2] * dst[-1]:
        d = dst[-1]

        def heads(idx, n):
            out = {i // d for i in idx}
            if {i * d + j for i in out for j in range(d)} != set(idx):
                raise PruneError(f"prune: {n.where} would split a head")
            return out
        out.append((len(dst) - 2, heads))
    return out


# --- finding the structure ------------------------------------------------------------

def prepare(graph: Graph) -> Graph:
    from .manager import run_pipeline
    g = inline_regions(graph) if any(n.op == "fused" for n in graph.nodes) else graph
    return run_pipeline(g, PREFIX)


def _attention_flow(g: Graph, att: Node, removed, users=None) -> _Flow:
    q, k, v = att.inputs[:3]
    h, hk = q.type.shape[1], k.type.shape[1]
    if not isinstance(h, int) or not isinstance(hk, int):
        raise PruneError(f"prune: {att.where} has a symbolic number of heads")
    group = h // hk
    removed = set(removed)
    kv = {j for j in range(hk) if all(j * group + i in removed for i in range(group))}
    if hk != h and {j * group + i for j in kv for i in range(group)} != removed:
        raise PruneError(f"prune: {att.where} has grouped-query attention ({h} query heads "
                         f"share {hk} key/value heads): prune whole groups of {group}")
    if len(att.inputs) > 3:
        m = att.inputs[3]
        if m.type.rank == 4 and m.type.shape[1] not in (1,):
            raise PruneError(f"prune: {att.where} has a mask per head (%{m.name})")
    f = _Flow(g, users)
    f.fixed.add(att)
    f.visited.add(att)
    # One shared key/value head (multi-query, or GQA pruned to one group) never shrinks;
    # not following it keeps size-1 broadcasts (rotary tables) out of the flow.
    seeds = [(q, removed), (att.outputs[0], removed)] + ([(k, kv), (v, kv)] if hk > 1 else [])
    f.run([(val, 1, idx) for val, idx in seeds])
    for val, want in seeds:
        if f.sel[val][1] != want:
            raise PruneError(f"prune: the heads of {att.where} reach each other through "
                             "other paths")
    return f


def _head_flow_ok(g: Graph, att: Node, users: dict) -> _Flow:
    f = _attention_flow(g, att, set(), users)
    outs = [n for n, kind in f.boundary.items() if kind == "rows"]
    if not outs or not any(kind == "cols" for kind in f.boundary.values()):
        raise PruneError(f"prune: {att.where} has no q/k/v or output projection by a weight")
    return f


def _residual(g: Graph, start: Value, users) -> tuple[Node | None, Value | None]:
    """The add that joins `start` (through bias adds and reshapes) to a residual stream,
    and the stream's value."""
    v = start
    for _ in range(8):
        us = users.get(v, [])
        if len(us) != 1 or v in g.outputs:
            return None, None
        (u,) = us
        other = [x for x in u.inputs if x is not v]
        if u.op == "add" and len(other) == 1 and not _is_const(other[0]) \
                and other[0].type == u.outputs[0].type:
            return u, other[0]
        if u.op in ("add", "reshape", "mul") and all(_is_const(x) for x in other):
            v = u.outputs[0]
            continue
        return None, None
    return None, None


def _is_const(v: Value) -> bool:
    return v.is_constant or (v.producer is not None and v.producer.op in ("dims", "full")
                             and not v.producer.inputs)


def _ffn_at(g: Graph, mm: Node, claimed: set, users: dict) -> FFN | None:
    y = mm.outputs[0]
    if not isinstance(y.type.shape[-1], int) or y.type.rank < 2:
        return None
    try:
        f = _Flow(g, users).run([(y, -1, set())])
    except PruneError:
        return None
    if any(n.op in ("attention", "fused") for n in f.visited):
        return None
    up = [n for n, k in f.boundary.items() if k == "cols"]
    down = [n for n, k in f.boundary.items() if k == "rows"]
    if not down or any(n in claimed for n in up + down):
        return None
    chain = [n for n in g.nodes if n in f.visited and n not in f.boundary]
    if all(n.op in _LINEAR or n.op in ("reshape", "transpose") for n in chain):
        return None   # two matmuls in a row, no activation between: not an FFN
    order = {n: i for i, n in enumerate(g.nodes)}
    first_down = min(down, key=order.__getitem__)
    return FFN(sorted(up, key=order.__getitem__), sorted(down, key=order.__getitem__),
               chain, int(y.type.shape[-1]), first_down.inputs[0])


def structures(graph: Graph) -> list[Layer]:
    """The transformer layers of `graph`, in order. Pass a graph that has been through
    `prepare` (``O1,fuse-patterns,fuse-attention``; a traced or imported graph has no
    `attention` nodes before); the nodes named are that graph's (of an inlined copy when
    it has fused regions). Raises PruneError when there is no attention or a layer's
    heads cannot be followed."""
    g = graph if not any(n.op == "fused" for n in graph.nodes) else inline_regions(graph)
    return _structures(g)


def _structures(g: Graph) -> list[Layer]:
    users = g.users()
    order = {n: i for i, n in enumerate(g.nodes)}
    atts = [n for n in g.nodes if n.op == "attention"]
    if not atts:
        raise PruneError(f"prune: graph {g.name} has no attention node (run fuse-attention; "
                         "ops: " + ", ".join(sorted(g.op_counts())) + ")")
    layers, claimed = [], set()
    for i, att in enumerate(atts):
        f = _head_flow_ok(g, att, users)
        q, k = att.inputs[:2]
        consts = {v.name: ax for v, (ax, _) in f.sel.items() if v.is_constant}
        bnd = sorted(f.boundary, key=order.__getitem__)
        lay = Layer(i, att, int(q.type.shape[1]), int(k.type.shape[1]), int(q.type.shape[3]),
                    [n for n in bnd if f.boundary[n] == "cols"],
                    [n for n in bnd if f.boundary[n] == "rows"],
                    [n for n in g.nodes if n in f.visited and n not in f.boundary
                     and n is not att], consts)
        claimed.update(f.boundary)
        lay.residual_add, lay.block_in = _residual(g, lay.out[-1].outputs[0], users)
        layers.append(lay)
    for n in g.nodes:
        if n.op != "matmul" or n in claimed:
            continue
        ffn = _ffn_at(g, n, claimed, users)
        if ffn is None:
            continue
        claimed.update(ffn.up + ffn.down)
        before = [lay for lay in layers if order[lay.attention] < order[n]]
        if not before or before[-1].ffn is not None:
            continue
        ffn.residual_add, _ = _residual(g, ffn.down[-1].outputs[0], users)
        if ffn.residual_add is None:
            continue
        before[-1].ffn = ffn
    for lay in layers:   # where each block ends: its last residual add, then a norm?
        last = lay.ffn.residual_add if lay.ffn is not None else lay.residual_add
        if last is None or lay.block_in is None:
            continue
        # post-norm: the attention's residual sum is read by a layer norm alone (pre-norm
        # reads it in the next residual add too); the block then ends in a norm as well
        r1 = lay.residual_add.outputs[0]
        lay.post_norm = [u.op for u in users.get(r1, [])] == ["layer_norm"]
        out = last.outputs[0]
        us = users.get(out, [])
        if lay.post_norm and len(us) == 1 and us[0].op == "layer_norm":
            out = us[0].outputs[0]
        lay.block_out = out
    return layers


# --- pruning --------------------------------------------------------------------------

def _check_indices(what: str, idx, size: int) -> list[int]:
    out = sorted({int(i) for i in idx})
    if any(i < 0 or i >= size for i in out):
        raise PruneError(f"prune: {what} indices {out} out of range 0..{size - 1}")
    return out


def prune_graph(graph: Graph, heads: dict | None = None, ffn: dict | None = None,
                layers=None, *, prepared: bool = False) -> Graph:
    """A copy of `graph` without the heads ``heads[layer] = [head indices]``, the
    feed-forward neurons ``ffn[layer] = [neuron indices]`` and the whole `layers` (layer
    indices as `structures` numbers them). `prepared`: the graph has been through
    ``O1,fuse-patterns,fuse-attention`` already."""
    g = copy_graph(graph) if prepared else prepare(graph)
    heads, ffn, layers = dict(heads or {}), dict(ffn or {}), sorted(set(layers or ()))
    if not heads and not ffn and not layers:
        return g
    found = _structures(g)
    n = len(found)
    for key in list(heads) + list(ffn) + list(layers):
        if not isinstance(key, (int, np.integer)) or not 0 <= key < n:
            raise PruneError(f"prune: no layer {key!r} (the graph has {n})")
    drop_consts: dict[Value, tuple[int, set]] = {}
    attrs: dict[Node, dict] = {}

    def take(flow: _Flow):
        for v, (ax, idx) in flow.sel.items():
            if not idx:
                continue
            if v.is_constant:
                old = drop_consts.get(v)
                if old is not None and old[0] != ax:
                    raise PruneError(f"prune: weight %{v.name} is shared along two axes")
                drop_consts[v] = (ax, idx | (old[1] if old else set()))
        for node in flow.visited:
            _new_attrs(node, flow.sel, attrs)

    for li, hs in heads.items():
        lay = found[li]
        hs = _check_indices(f"layer {li} head", hs, lay.heads)
        if len(hs) >= lay.heads:
            raise PruneError(f"prune: layer {li} would lose all its {lay.heads} heads "
                             "(keep at least one)")
        if hs:
            take(_attention_flow(g, lay.attention, hs))
    for li, ns in ffn.items():
        lay = found[li]
        if lay.ffn is None:
            raise PruneError(f"prune: layer {li} has no feed-forward block found")
        ns = _check_indices(f"layer {li} neuron", ns, lay.ffn.width)
        if len(ns) >= lay.ffn.width:
            raise PruneError(f"prune: layer {li} would lose all its {lay.ffn.width} neurons")
        if ns:
            take(_Flow(g).run([(lay.ffn.up[0].outputs[0], -1, set(ns))]))
    for v, (ax, idx) in drop_consts.items():
        v.data = np.delete(v.data, sorted(idx), axis=ax)
    for node, new in attrs.items():
        node.attrs.update(new)
    for li in reversed(layers):
        lay = found[li]
        if lay.block_in is None or lay.block_out is None:
            raise PruneError(f"prune: layer {li} ({lay.attention.where}) has no residual "
                             "connection found to route past it")
        if lay.block_out in g.outputs:
            raise PruneError(f"prune: layer {li}'s output is a graph output")
        replace_uses(g, lay.block_out, lay.block_in)
    dce(g)
    return copy_graph(g).verify()


def _new_attrs(node: Node, sel: dict, attrs: dict) -> None:
    """The shape-carrying attributes of `node` after its operands shrink."""
    if node.op == "reshape":
        (y,) = node.outputs
        if y not in sel or not sel[y][1]:
            return
        ax, idx = sel[y]
        shape = list(attrs.get(node, {}).get("shape", node.attrs["shape"]))
        if shape[ax] == -1:
            return
        if not isinstance(shape[ax], int):
            raise PruneError(f"prune: {node.where} has a symbolic dim where heads go")
        shape[ax] = int(y.type.shape[ax]) - len(idx)
        attrs.setdefault(node, {})["shape"] = tuple(shape)
    elif node.op == "split":
        ax = _norm(node.attrs["axis"], node.inputs[0].type.rank)
        sizes = list(node.attrs["sizes"])
        for i, y in enumerate(node.outputs):
            if y in sel and sel[y][0] == ax:
                sizes[i] = node.outputs[i].type.shape[ax] - len(sel[y][1])
        attrs.setdefault(node, {})["sizes"] = tuple(int(s) for s in sizes)
    elif node.op in ("slice",) and any(v in sel and sel[v][1] for v in node.inputs):
        pass   # slices along other axes keep their bounds


# --- masks (the reference for tests, and taylor's gradients) ---------------------------

def _insert_after(g: Graph, v: Value, op: str, other: Value) -> Value:
    """`op(v, other)` placed right after `v` is made; v's readers read it instead."""
    users = [n for n in g.nodes if v in n.inputs]
    out = g.add(op, v, other)
    node = g.nodes.pop()
    at = g.nodes.index(v.producer) + 1 if v.producer is not None else 0
    g.nodes.insert(at, node)
    for n in users:
        n.inputs = [out if x is v else x for x in n.inputs]
    if v in g.outputs:
        g.outputs = [out if x is v else x for x in g.outputs]
    return out


def with_masks(graph: Graph, heads: dict | None = None, ffn: dict | None = None,
               as_inputs: bool = False, prepared: bool = False):
    """`graph` (prepared) with each layer's attention output multiplied by a mask over
    its heads and each feed-forward activation by a mask over its neurons.
    `heads[layer]` / `ffn[layer]`: indices to zero. `as_inputs`: the masks are graph
    inputs ``prune.head_mask.L`` / ``prune.ffn_mask.L`` (all layers) instead of
    constants. Returns (graph, layers)."""
    g = copy_graph(graph) if prepared else prepare(graph)
    layers = _structures(g)
    heads, ffn = heads or {}, ffn or {}
    for lay in layers:
        for kind, n, v, shape, chosen in (
                ("head", lay.heads, lay.attention.outputs[0], (1, lay.heads, 1, 1),
                 heads.get(lay.index)),
                ("ffn", lay.ffn.width if lay.ffn else 0, lay.ffn.act if lay.ffn else None,
                 None, ffn.get(lay.index))):
            if v is None or (not as_inputs and not chosen):
                continue
            name = g.fresh_name(f"prune.{kind}_mask.{lay.index}")
            if as_inputs:
                from tensorc.ir import TensorType
                m = g.add_input(name, TensorType((n,), "f32"))
            else:
                data = np.ones(n, np.float32)
                data[list(chosen)] = 0
                m = g.add_constant(name, data)
            if shape is not None:
                r = g.add("reshape", m, shape=shape)
                g.nodes.insert(0, g.nodes.pop())
                m = r
            _insert_after(g, v, "mul", m)
    return g.verify(), layers


# --- importance -------------------------------------------------------------------------

def _run(g: Graph, feed: dict, wanted) -> dict:
    from .quantize import run_collect
    return run_collect(g, feed, set(wanted))


def _feeds(data, g: Graph, by: str) -> list[dict]:
    if data is None:
        raise PruneError(f"prune: by={by} needs calibration data: options={{'prune': "
                         "{'data': [feeds]}}} or data= in the Python API")
    from .quantize import load_feeds
    feeds = load_feeds(data)
    if not feeds:
        raise PruneError("prune: the calibration data has no batches")
    return feeds


def importance(graph: Graph, by: str = "magnitude", data=None, *,
               prepared: bool = False) -> dict:
    """Scores (higher = more important): ``{"heads": [array per layer], "ffn": [array per
    layer, empty without FFN], "layers": array}``.

    magnitude   a head: the L2 norm of all its q/k/v weight columns and output rows; a
                neuron: the product of the L2 norms of its up columns and its down row
    activation  mean |head output| (the attention output, per head) / mean |neuron
                activation| (what the down projection reads) over the feeds `data`
    taylor      |d loss / d mask| summed over the feeds (Michel et al. 2019), a mask of
                ones per head and per neuron; loss = cross entropy of the first output
                (logits over the last axis) against its own argmax
    A layer's score: the sum of its heads' and neurons' scores, each normalised by the
    total over all layers (heads and neurons weigh the same)."""
    if by not in METHODS:
        raise PruneError(f"prune: by={by!r} should be one of {', '.join(METHODS)}")
    g = copy_graph(graph) if prepared else prepare(graph)
    layers = _structures(g)
    if by == "magnitude":
        hs, fs = _magnitude(g, layers)
    elif by == "activation":
        hs, fs = _activation(g, layers, _feeds(data, g, by))
    else:
        hs, fs = _taylor(g, layers, _feeds(data, g, by))
    th = sum(float(h.sum()) for h in hs) or 1.0
    tf = sum(float(f.sum()) for f in fs) or 1.0
    lay = np.array([h.sum() / th + f.sum() / tf for h, f in zip(hs, fs, strict=True)])
    return {"heads": hs, "ffn": fs, "layers": lay}


def _weight_slices(flow: _Flow, consts: set) -> list[np.ndarray]:
    out = []
    for v, (ax, idx) in flow.sel.items():
        if v.is_constant and idx and v in consts:
            out.append(np.take(v.data, sorted(idx), axis=ax))
    return out


def _matmul_weights(flow: _Flow) -> set:
    """The weight constants of the boundary matmuls (through transposes)."""
    ws = set()
    for n in flow.boundary:
        w = n.inputs[1]
        while w.producer is not None and w.producer.op == "transpose":
            w = w.producer.inputs[0]
        ws.add(w)
    return ws


def _magnitude(g: Graph, layers: list[Layer]):
    users = g.users()
    hs, fs = [], []
    for lay in layers:
        group = lay.heads // lay.kv_heads
        s = []
        for h in range(lay.heads):
            if group > 1:   # a q head alone: its q columns and o rows
                flow = _Flow(g, users)
                flow.fixed.add(lay.attention)
                flow.run([(lay.attention.inputs[0], 1, {h}),
                          (lay.attention.outputs[0], 1, {h})])
            else:
                flow = _attention_flow(g, lay.attention, {h}, users)
            ws = _weight_slices(flow, _matmul_weights(flow))
            s.append(math.sqrt(sum(float(np.sum(w.astype(np.float64) ** 2)) for w in ws)))
        hs.append(np.array(s))
        if lay.ffn is None:
            fs.append(np.zeros(0))
            continue
        f = []
        for i in range(lay.ffn.width):
            flow = _Flow(g, users).run([(lay.ffn.up[0].outputs[0], -1, {i})])
            ws = _weight_slices(flow, _matmul_weights(flow))
            f.append(float(np.prod([np.linalg.norm(w.astype(np.float64)) for w in ws])))
        fs.append(np.array(f))
    return hs, fs


def _activation(g: Graph, layers: list[Layer], feeds: list[dict]):
    hsum = [np.zeros(lay.heads) for lay in layers]
    fsum = [np.zeros(lay.ffn.width if lay.ffn else 0) for lay in layers]
    for feed in feeds:
        wanted = [lay.attention.outputs[0] for lay in layers] + \
            [lay.ffn.act for lay in layers if lay.ffn]
        got = _run(g, feed, wanted)
        for i, lay in enumerate(layers):
            a = np.abs(got[lay.attention.outputs[0]].astype(np.float64))
            hsum[i] += a.mean(axis=tuple(j for j in range(a.ndim) if j != 1))
            if lay.ffn:
                a = np.abs(got[lay.ffn.act].astype(np.float64))
                fsum[i] += a.reshape(-1, a.shape[-1]).mean(axis=0)
    return [h / len(feeds) for h in hsum], [f / len(feeds) for f in fsum]


def pseudo_label_loss(g: Graph) -> Graph:
    """`g` with inputs ``prune.labels`` (one-hot, the first output's shape) and a scalar
    output ``prune.loss``: the mean cross entropy of the first output's last axis."""
    logits = g.outputs[0]
    if logits.type.dtype != "f32" or logits.type.rank < 1:
        raise PruneError(f"prune: by=taylor needs float logits as the first output; "
                         f"%{logits.name} is {logits.type}")
    onehot = g.add_input(g.fresh_name("prune.labels"), logits.type)
    ls = g.add("log_softmax", logits, axis=-1)
    picked = g.add("reduce_sum", g.add("mul", ls, onehot), axes=(-1,), keepdims=False)
    loss = g.add("neg", g.add("reduce_mean", picked, axes=None, keepdims=False))
    g.rename(loss, g.fresh_name("prune.loss"))
    g.outputs = [loss]
    return g


def pseudo_labels(g: Graph, feed: dict) -> np.ndarray:
    logits = _run(g, feed, [g.outputs[0]])[g.outputs[0]]
    return np.eye(logits.shape[-1], dtype=np.float32)[np.argmax(logits, axis=-1)]


def _taylor(g: Graph, layers: list[Layer], feeds: list[dict]):
    from .autodiff import grad
    masked, _ = with_masks(g, as_inputs=True, prepared=True)
    names = [v.name for v in masked.inputs if v.name.startswith("prune.")]
    lossg = pseudo_label_loss(masked)
    gg = grad(lossg, "prune.loss", names)
    hsum = [np.zeros(lay.heads) for lay in layers]
    fsum = [np.zeros(lay.ffn.width if lay.ffn else 0) for lay in layers]
    for feed in feeds:
        feed = dict(feed)
        feed[lossg.inputs[-1].name] = pseudo_labels(g, feed)
        for v in masked.inputs:
            if v.name in names:
                feed[v.name] = np.ones(v.type.shape, np.float32)
        outs = {v.name: a for v, a in _run(gg, feed, gg.outputs).items()}
        for i, lay in enumerate(layers):
            hsum[i] += np.abs(outs[f"grad.prune.head_mask.{i}"])
            if lay.ffn:
                fsum[i] += np.abs(outs[f"grad.prune.ffn_mask.{i}"])
    return hsum, fsum


def loss_on(graph: Graph, feeds: list[dict], labels: list[np.ndarray]) -> float:
    """The pseudo-label cross entropy of `graph` on `feeds` against one-hot `labels`."""
    lg = pseudo_label_loss(copy_graph(graph))
    total = 0.0
    for feed, lab in zip(feeds, labels, strict=True):
        feed = {**feed, lg.inputs[-1].name: lab}
        total += float(_run(lg, feed, lg.outputs)[lg.outputs[0]])
    return total


# --- the pass ---------------------------------------------------------------------------

def _ratio(name: str, r) -> float:
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r < 1:
        raise PruneError(f"prune: {name}={r!r} should be a fraction in [0, 1)")
    return float(r)


@graph_pass("prune")
def prune(g: Graph, heads: float = 0.0, ffn: float = 0.0, layers: int = 0,
          by: str = "magnitude", data=None):
    hr, fr = _ratio("heads", heads), _ratio("ffn", ffn)
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 0:
        raise PruneError(f"prune: layers={layers!r} should be a count of layers")
    if by not in METHODS:
        raise PruneError(f"prune: by={by!r} should be one of {', '.join(METHODS)}")
    if hr == 0 and fr == 0 and layers == 0:
        return g
    p = prepare(g)
    found = _structures(p)
    if layers >= len(found):
        raise PruneError(f"prune: layers={layers} would remove all {len(found)} layers")
    if by != "magnitude" and data is None:
        _feeds(data, p, by)
    scores = importance(p, by, data, prepared=True)
    hsel, fsel = {}, {}
    for lay, hs, fs in zip(found, scores["heads"], scores["ffn"], strict=True):
        group = lay.heads // lay.kv_heads
        ngroups = lay.heads // group
        k = min(int(math.floor(hr * ngroups)), ngroups - 1)
        if k:
            gs = hs.reshape(ngroups, group).sum(axis=1)
            drop = np.argsort(gs, kind="stable")[:k]
            hsel[lay.index] = [int(j * group + i) for j in drop for i in range(group)]
        if lay.ffn is not None:
            k = min(int(math.floor(fr * lay.ffn.width)), lay.ffn.width - 1)
            if k:
                fsel[lay.index] = [int(i) for i in np.argsort(fs, kind="stable")[:k]]
    drop_layers = [int(i) for i in np.argsort(scores["layers"], kind="stable")[:layers]]
    return prune_graph(p, hsel, fsel, drop_layers, prepared=True)
