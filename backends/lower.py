"""Lowering: Graph -> Program (kernels in the kernel IR, library calls, a buffer plan).

Lowering runs once per set of concrete input shapes. It walks the graph keeping
each value in one of two forms:

- *lazy*: an expression over the value's own multi-index whose leaves are
  strided reads of buffers (`Access`) or affine functions of the index
  (`Index`). Elementwise ops build such expressions; view ops (transpose,
  reshape, slice, expand, squeeze, unsqueeze) only rewrite the leaves' strides.
  So a chain like `where(mask, matmul * scale, -inf)` costs no memory and no
  kernel of its own: it is evaluated inside whichever kernel reads it.
- *materialised*: written to a buffer by a kernel (the lazy expression becomes
  a loop nest) or by a library call. That happens when an op needs memory
  (matmul, the graph outputs, a reference fallback), when a reduction runs
  (softmax, layer_norm, reduce_*: one kernel each, reading its lazy inputs), or
  when a value with arithmetic in it has several users (to avoid recomputing).

Library calls (`Call`): matmul (the target's GEMM), attention (flash attention),
conv2d (im2col kernel + GEMM). Two rewrites feed the GEMM bigger, fused work:
`+ bias`, gelu/relu and `+ residual` after a matmul become its epilogue, and
sibling matmuls by constant weights on one input (attention's q, k, v) become
one GEMM over the concatenated weights, each result a column slice.

Fused regions are lowered through their body graph (their elementwise ops then
fuse by laziness), attention for non-f32 through its `decompose`; an op with no
rule runs its registry reference as a `Call(fallback=True)`, so every graph
compiles and the fallbacks are listed in `Program.stats()` and `Program.notes`.

The Program is target-neutral: the LLVM backend renders its kernels with
`backends/llvm/codegen.py`, a CUDA renderer can do the same.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from tensorc.errors import TensorcError
from tensorc.ir import DTYPES, Graph, TensorType
from tensorc.ops import get_op
from tensorc.ops.registry import norm_axis

from . import kernel_ir as K
from .plan import pack_buffers

log = logging.getLogger(__name__)

# --- buffers, views, steps -------------------------------------------------------------


@dataclass(eq=False)
class Buf:
    """One planned buffer. kind: "arena" (planned), "input" (copied in at each call, also
    in the arena) or "const" (the graph's weight array, `data`)."""
    nbytes: int
    dtype: str
    kind: str = "arena"
    data: np.ndarray | None = None
    name: str = ""
    offset: int = 0  # in the arena, set by the plan
    numel: int = 0


@dataclass(frozen=True, eq=False)
class Access(K.Expr):
    """Lowering-time leaf: buf[offset + sum(i_d * coefs[d])] over a value's index."""
    buf: Buf
    offset: int
    coefs: tuple[int, ...]

    @property
    def dtype(self) -> str:
        return self.buf.dtype


@dataclass(frozen=True, eq=False)
class Index(K.Expr):
    """Lowering-time leaf: the integer offset + sum(i_d * coefs[d])."""
    offset: int
    coefs: tuple[int, ...]
    dtype: str = "i64"


@dataclass(frozen=True)
class View:
    """A strided window of a buffer (in elements), what library calls receive."""
    buf: Buf
    offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]


@dataclass(eq=False)
class KernelStep:
    kernel: K.Kernel
    args: list[Buf]          # one per kernel.buffers entry
    work: int = 0            # elements touched, for the threading decision

    def reads(self):
        return [b for b, kb in zip(self.args, self.kernel.buffers, strict=True) if kb.readonly]

    def writes(self):
        return [b for b, kb in zip(self.args, self.kernel.buffers, strict=True)
                if not kb.readonly]


@dataclass(eq=False)
class Call:
    """A library call (matmul, attention) or a reference fallback, on views."""
    op: str
    attrs: dict
    inputs: list[View]
    outputs: list[View]
    fallback: bool = False
    where: str = ""
    epilogue: dict = field(default_factory=dict)  # matmul: bias / activation / residual

    def reads(self):
        return [v.buf for v in self.inputs] + [v.buf for v in self.epilogue.values()
                                               if isinstance(v, View)]

    def writes(self):
        return [v.buf for v in self.outputs]


@dataclass(eq=False)
class IndexCheck:
    """Raise a clear error if an index tensor holds values outside [-n, n)."""
    view: View
    n: int
    where: str

    def reads(self):
        return [self.view.buf]

    def writes(self):
        return []


@dataclass(eq=False)
class Program:
    steps: list
    inputs: list[Buf]
    outputs: list[View]
    buffers: list[Buf]
    arena_bytes: int = 0
    live_peak_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def kernels(self) -> list[K.Kernel]:
        seen = {}
        for s in self.steps:
            if isinstance(s, KernelStep):
                seen.setdefault(s.kernel.name, s.kernel)
        return list(seen.values())

    def stats(self) -> dict:
        calls = [s for s in self.steps if isinstance(s, Call)]
        return {"kernel_launches": sum(isinstance(s, KernelStep) for s in self.steps),
                "unique_kernels": len(self.kernels),
                "library_calls": sum(not c.fallback for c in calls),
                "fallbacks": [c.where for c in calls if c.fallback],
                "arena_bytes": self.arena_bytes, "live_peak_bytes": self.live_peak_bytes}


class NotLowerable(Exception):
    """Raised by a rule for inputs it does not handle; the node falls back."""


# --- lazy values -------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Lazy:
    shape: tuple[int, ...]
    expr: K.Expr

    @property
    def dtype(self) -> str:
        return self.expr.dtype


def contiguous(shape) -> tuple[int, ...]:
    strides, acc = [], 1
    for d in reversed(shape):
        strides.append(acc)
        acc *= d
    return tuple(reversed(strides))


def is_contiguous(e: K.Expr, shape) -> bool:
    """Whether `e` is a plain row-major read of a whole buffer (size-1 dims ignored)."""
    return isinstance(e, Access) and e.offset == 0 and all(
        c == s for c, s, d in zip(e.coefs, contiguous(shape), shape, strict=True) if d != 1)


def map_leaves(e: K.Expr, fn) -> K.Expr:
    """Rebuild `e` with fn(leaf) for every Access/Index leaf."""
    if isinstance(e, (Access, Index)):
        return fn(e)
    if isinstance(e, (K.Const, K.Var)):
        return e
    if isinstance(e, K.Unary):
        return K.Unary(e.op, map_leaves(e.x, fn))
    if isinstance(e, K.Binary):
        return K.Binary(e.op, map_leaves(e.a, fn), map_leaves(e.b, fn))
    if isinstance(e, K.Select):
        return K.Select(map_leaves(e.cond, fn), map_leaves(e.a, fn), map_leaves(e.b, fn))
    if isinstance(e, K.Cast):
        return K.Cast(map_leaves(e.x, fn), e.dtype)
    raise TypeError(f"unexpected expression {e!r}")


def leaves(e: K.Expr) -> list:
    out = []
    map_leaves(e, lambda leaf: out.append(leaf) or leaf)
    return out


def compute_count(e: K.Expr) -> int:
    """Arithmetic nodes that read memory: what recomputing `e` would cost."""
    if isinstance(e, (Access, Index, K.Const)):
        return 0
    kids = [getattr(e, a) for a in ("x", "a", "b", "cond") if hasattr(e, a)]
    return sum(compute_count(k) for k in kids) + any(
        isinstance(leaf, Access) for k in kids for leaf in leaves(k))


def affine_map(lazy: Lazy, shape, rows) -> Lazy:
    """A view: index i_old[p] = base[p] + sum_s A[p][s] * i_new[s], rows[p] = (base, A_row)."""
    def fn(leaf):
        off = leaf.offset + sum(c * base for c, (base, _) in zip(leaf.coefs, rows, strict=True))
        coefs = tuple(sum(c * row[s] for c, (_, row) in zip(leaf.coefs, rows, strict=True))
                      for s in range(len(shape)))
        return type(leaf)(leaf.buf, off, coefs) if isinstance(leaf, Access) \
            else Index(off, coefs, leaf.dtype)
    return Lazy(tuple(shape), map_leaves(lazy.expr, fn))


def broadcast_to(lazy: Lazy, shape) -> Lazy:
    if lazy.shape == tuple(shape):
        return lazy
    pad = len(shape) - len(lazy.shape)
    rows = []
    for p, d in enumerate(lazy.shape):
        row = [0] * len(shape)
        if d != 1:
            row[p + pad] = 1
        rows.append((0, row))
    return affine_map(lazy, shape, rows)


def transpose(lazy: Lazy, perm) -> Lazy:
    shape = [lazy.shape[p] for p in perm]
    rows = [None] * len(perm)
    for s, p in enumerate(perm):
        rows[p] = (0, [int(s == t) for t in range(len(perm))])
    return affine_map(lazy, shape, rows)


def reshape(lazy: Lazy, shape) -> Lazy | None:
    """Reshape by rewriting strides, or None if some leaf is not linear over a merged
    group of dims (then the caller materialises first)."""
    old, new = list(lazy.shape), list(shape)
    if 0 in old:  # no element is ever read
        zeros = (0,) * len(new)
        return Lazy(tuple(new), map_leaves(lazy.expr, lambda leaf: Access(
            leaf.buf, leaf.offset, zeros) if isinstance(leaf, Access) else Index(
            leaf.offset, zeros, leaf.dtype)))
    groups, i, j = [], 0, 0   # (old dims, new dims) with equal products
    while i < len(old) or j < len(new):
        gi, gj, po, pn = [], [], 1, 1
        while True:
            if po <= pn and i < len(old) and (po < pn or not gi or old[i] == 1):
                po *= old[i]
                gi.append(i)
                i += 1
            elif j < len(new) and (pn < po or not gj or new[j] == 1):
                pn *= new[j]
                gj.append(j)
                j += 1
            else:
                break
            if po == pn and (i == len(old) or old[i] != 1) and (j == len(new) or new[j] != 1):
                break
        if po != pn:
            raise TensorcError(f"cannot reshape {old} to {new}")
        groups.append((gi, gj))

    def fn(leaf):
        coefs = [0] * len(new)
        for gi, gj in groups:
            live = [p for p in gi if old[p] != 1]
            for a, b in zip(live, live[1:], strict=False):
                if leaf.coefs[a] != leaf.coefs[b] * old[b]:
                    raise _NotLinear
            unit = leaf.coefs[live[-1]] if live else 0
            for q in reversed(gj):
                coefs[q] = unit if new[q] != 1 else 0
                unit *= new[q]
        if isinstance(leaf, Access):
            return Access(leaf.buf, leaf.offset, tuple(coefs))
        return Index(leaf.offset, tuple(coefs), leaf.dtype)
    try:
        return Lazy(tuple(new), map_leaves(lazy.expr, fn))
    except _NotLinear:
        return None


class _NotLinear(Exception):
    pass


# --- kernel building -------------------------------------------------------------------

class _KB:
    """Builds one kernel: names its buffers and variables, turns leaves into loads."""

    def __init__(self, kind: str):
        self.kind = kind
        self.args: list[Buf] = []
        self.kbufs: list[K.Buffer] = []
        self._nvar = 0

    def buf(self, b: Buf, readonly: bool = True) -> K.Buffer:
        for i, (a, kb) in enumerate(zip(self.args, self.kbufs, strict=True)):
            if a is b and kb.readonly == readonly:
                return self.kbufs[i]
        kb = K.Buffer(f"b{len(self.kbufs)}", b.dtype, readonly)
        self.args.append(b)
        self.kbufs.append(kb)
        return kb

    def var(self, dtype: str = "i64") -> K.Var:
        self._nvar += 1
        return K.Var(("i" if dtype == "i64" else "s") + str(self._nvar), dtype)

    def at(self, expr: K.Expr, idx: list[K.Expr]) -> K.Expr:
        """`expr` evaluated at the multi-index `idx`."""
        def fn(leaf):
            address = K.affine(leaf.offset, list(zip(idx, leaf.coefs, strict=True)))
            return K.Load(self.buf(leaf.buf), address) if isinstance(leaf, Access) \
                else (address if leaf.dtype == "i64" else K.Cast(address, leaf.dtype))
        return map_leaves(expr, fn)

    def kernel(self, body, work: int) -> KernelStep:
        return KernelStep(K.Kernel(self.kbufs, body, kind=self.kind), self.args, work)


def _merge_dims(shape, coef_lists, dims):
    """Merge neighbouring dims in `dims` where every coefficient list is linear;
    returns groups (lists of dims), each iterated as one loop."""
    groups: list[list[int]] = []
    for d in dims:
        if shape[d] == 1:
            continue
        if groups and groups[-1][-1] == d - 1 and all(
                c[d - 1] == c[d] * shape[d] for c in coef_lists):
            groups[-1].append(d)
        else:
            groups.append([d])
    return groups


def _outer_indices(kb: _KB, shape, groups, flat: K.Expr, idx: list):
    """Decompose the flat outer loop variable into per-dim indices (constant div/mod)."""
    extents = [math.prod(shape[d] for d in g) for g in groups]
    for j, g in enumerate(groups):
        below = math.prod(extents[j + 1:])
        e = flat if below == 1 else K.binary("floordiv", flat, K.const_index(below))
        if j:
            e = K.binary("mod", e, K.const_index(extents[j]))
        _assign_group(shape, g, e, idx)


def _assign_group(shape, g, e: K.Expr, idx: list):
    """Indices of a merged group's dims from its flat index `e`. Dims merge only where
    every access is linear across them, so the innermost dim can take the whole flat
    index (its coefficient times `e` is the group's address) and the others 0."""
    for d in g:
        idx[d] = K.const_index(0)
    idx[g[-1]] = e


def write_kernel(kind: str, lazy: Lazy, out: View) -> KernelStep:
    """A loop nest computing `lazy` into `out` (outer dims flattened and parallel)."""
    shape = lazy.shape
    kb = _KB(kind)
    kout = kb.buf(out.buf, readonly=False)
    coef_lists = [leaf.coefs for leaf in leaves(lazy.expr)] + [out.strides]
    groups = _merge_dims(shape, coef_lists, range(len(shape)))
    idx: list[K.Expr] = [K.const_index(0)] * len(shape)

    def store():
        return [K.Store(kout, K.affine(out.offset, list(zip(idx, out.strides, strict=True))),
                        kb.at(lazy.expr, idx))]
    if not groups:
        body = store()
    elif len(groups) == 1:
        v = kb.var()
        _assign_group(shape, groups[0], v, idx)
        body = [K.Loop(v, math.prod(shape[d] for d in groups[0]), store(), parallel=True)]
    else:
        flat, inner = kb.var(), kb.var()
        _outer_indices(kb, shape, groups[:-1], flat, idx)
        _assign_group(shape, groups[-1], inner, idx)
        body = [K.Loop(flat, math.prod(shape[d] for g in groups[:-1] for d in g),
                       [K.Loop(inner, math.prod(shape[d] for d in groups[-1]), store())],
                       parallel=True)]
    return kb.kernel(body, math.prod(shape))


class _Rows:
    """A reduction kernel's frame: a parallel loop over the kept dims of `shape` and
    nested loops over the reduced `axes` (merged where every input allows)."""

    def __init__(self, kind: str, shape, axes, inputs: list[Lazy], outs: list[View]):
        self.kb, self.shape = _KB(kind), tuple(shape)
        self.axes = sorted(axes)
        kept = [d for d in range(len(shape)) if d not in self.axes]
        coef_lists = [leaf.coefs for x in inputs for leaf in leaves(x.expr)]
        coef_lists += [o.strides for o in outs if len(o.strides) == len(shape)]
        self.red_groups = _merge_dims(shape, coef_lists, self.axes)
        self.kept_groups = [[d] for d in kept if shape[d] != 1]
        self.rows = math.prod(shape[d] for d in kept)
        self.n = math.prod(shape[d] for d in self.axes)
        self.flat = self.kb.var()
        self.idx: list[K.Expr] = [K.const_index(0)] * len(shape)
        if self.kept_groups:
            _outer_indices(self.kb, shape, self.kept_groups, self.flat, self.idx)

    def over_reduced(self, body_fn) -> list[K.Stmt]:
        """Nested loops over the reduced dims; body_fn() builds the innermost body (it
        reads self.idx, which then holds the reduced dims' loop variables)."""
        loops = []
        for g in self.red_groups:
            v = self.kb.var()
            _assign_group(self.shape, g, v, self.idx)
            loops.append((v, math.prod(self.shape[d] for d in g)))
        body = body_fn()
        for v, ext in reversed(loops):
            body = [K.Loop(v, ext, body)]
        return body

    def at(self, lazy: Lazy) -> K.Expr:
        return self.kb.at(lazy.expr, self.idx)

    def store(self, out: View, value: K.Expr, reduced: bool) -> K.Store:
        """Store at the current index; a reduced output is indexed by the kept dims."""
        kout = self.kb.buf(out.buf, readonly=False)
        if reduced:
            return K.Store(kout, K.binary("add", K.const_index(out.offset), self.flat), value)
        return K.Store(kout, K.affine(out.offset, list(zip(self.idx, out.strides,
                                                           strict=True))), value)

    def kernel(self, body, passes: int) -> KernelStep:
        return self.kb.kernel([K.Loop(self.flat, self.rows, body, parallel=True)],
                              self.rows * self.n * passes)


# --- the lowering walk -----------------------------------------------------------------

RULES: dict = {}  # op name -> rule(lowering, node, inputs, attrs) -> list of outputs


def rule(*names):
    def deco(fn):
        for n in names:
            RULES[n] = fn
        return fn
    return deco


class Lowering:
    def __init__(self, graph: Graph, env: dict[str, int]):
        self.graph, self.env = graph, env
        self.steps: list = []
        self.buffers: list[Buf] = []
        self.notes: list[str] = []
        # Value -> the GEMM Call whose whole output it is (through views), with nothing else
        # reading that output yet: while so, the GEMM's epilogue can still grow.
        self.pending: dict = {}
        self.uses = {v: len(us) for v, us in graph.users().items()}
        for v in graph.outputs:
            self.uses[v] = self.uses.get(v, 0) + 1

    # -- buffers --
    def new_buf(self, shape, dtype, kind="arena", name="") -> Buf:
        size = DTYPES[dtype].itemsize
        b = Buf(max(math.prod(shape), 1) * size, dtype, kind, name=name, numel=math.prod(shape))
        self.buffers.append(b)
        return b

    def materialize(self, lazy: Lazy, kind: str = "copy") -> Lazy:
        """The value written to a fresh contiguous buffer (no-op for a plain buffer)."""
        if is_contiguous(lazy.expr, lazy.shape):
            return lazy
        buf = self.new_buf(lazy.shape, lazy.dtype)
        out = View(buf, 0, lazy.shape, contiguous(lazy.shape))
        self.steps.append(write_kernel(kind, lazy, out))
        return Lazy(lazy.shape, Access(buf, 0, out.strides))

    def view(self, lazy: Lazy) -> View:
        """A strided view for a library call, materialising computed values."""
        if not isinstance(lazy.expr, Access):
            lazy = self.materialize(lazy)
        leaf = lazy.expr
        return View(leaf.buf, leaf.offset, lazy.shape, leaf.coefs)

    def out_view(self, t: TensorType, name="") -> View:
        shape = tuple(t.shape)
        return View(self.new_buf(shape, t.dtype, name=name), 0, shape, contiguous(shape))

    @staticmethod
    def of_view(v: View) -> Lazy:
        return Lazy(v.shape, Access(v.buf, v.offset, v.strides))

    # -- the walk --
    def run(self) -> Program:
        g, vals = self.graph, {}
        inputs = []
        for v in g.inputs:
            t = v.type.concrete(self.env)
            b = self.new_buf(t.shape, t.dtype, "input", v.name)
            inputs.append(b)
            vals[v] = Lazy(tuple(t.shape), Access(b, 0, contiguous(t.shape)))
        for v in g.constants.values():
            vals[v] = _constant(v)
        self.lower_nodes(g.nodes, vals)
        outputs = []
        for v in g.outputs:
            lazy = vals[v]
            if is_contiguous(lazy.expr, lazy.shape) and lazy.expr.buf.kind == "arena" \
                    and all(o.buf is not lazy.expr.buf for o in outputs):
                outputs.append(View(lazy.expr.buf, 0, lazy.shape, contiguous(lazy.shape)))
                continue  # already in a buffer of its own
            buf = self.new_buf(lazy.shape, lazy.dtype, name=v.name)
            out = View(buf, 0, lazy.shape, contiguous(lazy.shape))
            self.steps.append(write_kernel("output", lazy, out))
            outputs.append(out)
        return self.plan(inputs, outputs)

    def lower_nodes(self, nodes, vals):
        merged = _sibling_matmuls(nodes)   # node -> its group of weight matmuls on one input
        parts: dict = {}                   # node -> (its columns of the merged GEMM, consumed)
        for node in nodes:
            ins = [vals[v] for v in node.inputs]
            if node in merged:
                if node not in parts:
                    parts.update(self.merged_matmul(merged[node], vals))
                self.bind(node, self.merged_part(node, ins, *parts[node]), vals)
                continue
            opdef = get_op(node.op)
            attrs = opdef.resolve_attrs(node.attrs, self.env)
            outs = None
            if node.op in RULES:
                try:
                    outs = RULES[node.op](self, node, ins, attrs)
                except NotLowerable as e:
                    self.notes.append(f"{node.where}: {e}")
                else:
                    self.follow_gemm(node, outs)
            if outs is None and opdef.decompose is not None:
                outs = self.lower_decomposed(node, ins, attrs)
            if outs is None:
                outs = self.fallback(node, ins, attrs)
            self.bind(node, outs, vals)

    def follow_gemm(self, node, outs):
        """A rule's output that is all of a pending GEMM's output (a reshape, or the GEMM
        with a grown epilogue), made from its only reader, is pending too."""
        for v in node.inputs:
            call = self.pending.get(v)
            if call is None or self.uses.get(v) != 1:
                continue
            target = call.outputs[0]
            readers = [o for o, lazy in zip(node.outputs, outs, strict=True)
                       if any(getattr(leaf, "buf", None) is target.buf
                              for leaf in leaves(lazy.expr))]
            if len(readers) == 1 and _covers(outs[node.outputs.index(readers[0])], target):
                self.pending[readers[0]] = call

    def bind(self, node, outs, vals):
        for v, lazy in zip(node.outputs, outs, strict=True):
            if self.uses.get(v, 0) > 1 and compute_count(lazy.expr) > 0:
                lazy = self.materialize(lazy, "shared")
            vals[v] = lazy

    def merged_matmul(self, group, vals):
        """x @ W1 (+ b1), x @ W2 (+ b2), ...: one GEMM with [W1 W2 ...] and [b1 b2 ...] (zeros
        where a member has no bias) whose output columns are the members' results. A bigger
        N keeps the GEMM efficient and packs x once (attention's q, k, v projections)."""
        x = vals[group[0][1]]
        w = np.ascontiguousarray(np.concatenate([m[2].data for m in group], axis=1))
        n = w.shape[1]
        out = self.out_view(TensorType(tuple(x.shape[:-1]) + (n,), "f32"))
        call = Call("matmul", {}, [self.view(x), View(Buf(w.nbytes, "f32", "const", w),
                                                      0, w.shape, (n, 1))],
                    [out], where=" + ".join(m[0].where for m in group))
        if any(m[3] is not None for m in group):
            b = np.concatenate([m[3].data if m[3] is not None else
                                np.zeros(m[2].type.shape[1], np.float32) for m in group])
            call.epilogue["bias"] = View(Buf(b.nbytes, "f32", "const", b), 0, (n,), (1,))
        self.steps.append(call)
        parts, start = {}, 0
        for node, _, wv, _, consumed in group:
            width = wv.type.shape[1]
            parts[node] = (Lazy(tuple(x.shape[:-1]) + (width,),
                                Access(out.buf, start, out.strides[:-1] + (1,))), consumed)
            start += width
        return parts

    def merged_part(self, node, ins, part: Lazy, consumed: int) -> list[Lazy]:
        """A member's outputs from its columns of the merged GEMM: a matmul's are the
        columns; a fused region lowers the rest of its body on them."""
        if node.op == "matmul":
            return [part]
        body = node.attrs["body"]
        return self.lower_decomposed(node, ins, node.attrs, start=consumed,
                                     preset={body.nodes[consumed - 1].outputs[0]: part})

    def lower_decomposed(self, node, ins, attrs, preset=None, start=0):
        """Lower a composite op through its parts: a region's own `body` graph (symbols
        bound from the inputs' shapes), or else what `decompose` builds. `preset` gives
        values already computed, `start` the first body node still to lower."""
        body = attrs.get("body")
        if isinstance(body, Graph):
            sub, sub_ins, env = body, body.inputs, dict(self.env)
            for v, x in zip(body.inputs, ins, strict=True):
                env.update((d, n) for d, n in zip(v.type.shape, x.shape, strict=True)
                           if isinstance(d, str) and "*" not in d)
        else:
            sub, env = Graph(node.op), {}
            sub_ins = [sub.add_input(f"x{i}", TensorType(x.shape, x.dtype))
                       for i, x in enumerate(ins)]
            sub.outputs = list(get_op(node.op).decompose(sub, sub_ins, **attrs))
        inner = Lowering(sub, env)
        inner.steps, inner.buffers, inner.notes = self.steps, self.buffers, self.notes
        inner.pending = self.pending
        for v, outer in zip(sub_ins, node.inputs, strict=True):   # a pending GEMM output
            if outer in self.pending and self.uses.get(outer) == 1:  # stays pending inside
                self.pending[v] = self.pending[outer]
        vals = dict(zip(sub_ins, ins, strict=True))
        for v in sub.constants.values():
            vals[v] = _constant(v)
        vals.update(preset or {})
        inner.lower_nodes(sub.nodes[start:], vals)
        for v, outer in zip(sub.outputs, node.outputs, strict=True):  # and comes back out
            if v in self.pending and inner.uses.get(v) == 1:
                self.pending[outer] = self.pending[v]
        return [vals[v] for v in sub.outputs]

    def fallback(self, node, ins, attrs):
        log.info("no lowering for %s: running its numpy reference", node.where)
        outs = [self.out_view(v.type.concrete(self.env)) for v in node.outputs]
        self.steps.append(Call(node.op, attrs, [self.view(x) for x in ins], outs,
                               fallback=True, where=node.where))
        return [self.of_view(o) for o in outs]

    # -- buffer plan --
    def plan(self, inputs, outputs) -> Program:
        first, last = {}, {}
        for b in inputs:
            first[b] = -1
        for i, s in enumerate(self.steps):
            for b in s.writes():
                first.setdefault(b, i)
                last[b] = max(last.get(b, i), i)
            for b in s.reads():
                last[b] = i
        end = len(self.steps)
        for o in outputs:
            last[o.buf] = end
        planned = [b for b in self.buffers if b.kind != "const" and b in first]
        offsets, total = pack_buffers([(b.nbytes, first[b], last.get(b, first[b]))
                                       for b in planned])
        for b, off in zip(planned, offsets, strict=True):
            b.offset = off
        live = peak = 0
        events = sorted([(first[b], b.nbytes) for b in planned]
                        + [(last.get(b, first[b]) + 0.5, -b.nbytes) for b in planned])
        for _, delta in events:
            live += delta
            peak = max(peak, live)
        return Program(self.steps, inputs, outputs, planned, total, peak, self.notes)


def _constant(v) -> Lazy:
    """A graph constant as a lazy read of its data. np.require keeps a 0-d array 0-d
    (np.ascontiguousarray would make it 1-d and change the value's rank)."""
    data = np.require(v.data, requirements="C")
    b = Buf(data.nbytes, v.type.dtype, "const", data, v.name)
    return Lazy(data.shape, Access(b, 0, contiguous(data.shape)))


def _weight_matmul(node):
    """(input, weight, bias or None, body nodes consumed) when `node` computes x @ W with a
    constant 2-D f32 W: a matmul (nothing consumed), or a fused region whose body starts
    with the matmul, optionally followed by `+ b` with a constant b; else None."""
    def const(v, rank):
        return v is not None and v.is_constant and v.type.dtype == "f32" \
            and v.type.rank == rank
    if node.op == "matmul":
        if const(node.inputs[1], 2) and node.inputs[0].type.rank >= 2:
            return node.inputs[0], node.inputs[1], None, 0
        return None
    body = node.attrs.get("body") if node.op == "fused" else None
    if body is None or not body.nodes or body.nodes[0].op != "matmul":
        return None
    outer = dict(zip(body.inputs, node.inputs, strict=True))

    def resolve(v):
        return outer.get(v, v if v.is_constant else None)
    mm = body.nodes[0]
    x, w = outer.get(mm.inputs[0]), resolve(mm.inputs[1])
    if x is None or x.type.rank < 2 or not const(w, 2):
        return None
    prod = mm.outputs[0]
    users = [n for n in body.nodes if prod in n.inputs]
    if len(body.nodes) > 1 and body.nodes[1].op == "add" and users == [body.nodes[1]] \
            and prod not in body.outputs:
        add = body.nodes[1]
        b = resolve(add.inputs[1] if add.inputs[0] is prod else add.inputs[0])
        if const(b, 1) and b.type.shape == (w.type.shape[1],):
            return x, w, b, 2
    return x, w, None, 1


def _sibling_matmuls(nodes) -> dict:
    """Groups (two or more) of weight matmuls reading the same input:
    node -> [(node, input, weight, bias or None, body nodes consumed), ...]."""
    groups: dict = {}
    for node in nodes:
        m = _weight_matmul(node)
        if m is not None:
            groups.setdefault((m[0], m[1].type.shape[0]), []).append((node, *m))
    return {node: g for g in groups.values() if len(g) > 1 for node, *_ in g}


def lower(graph: Graph, env: dict[str, int] | None = None) -> Program:
    """The Program for `graph` with its symbolic dims bound by `env`."""
    return Lowering(graph, env or {}).run()


def planned_memory(graph: Graph, env: dict[str, int] | None = None) -> dict:
    """Arena size (planned, with buffer reuse) and the peak of live bytes, for inspect."""
    p = lower(graph, env)
    return {"arena_bytes": p.arena_bytes, "live_peak_bytes": p.live_peak_bytes}


# --- rules: elementwise ----------------------------------------------------------------

def _f(dtype: str, v) -> K.Const:
    return K.Const(v, dtype)


# Numerical Recipes' erfc(z) = t * exp(-z^2 + P(t)), t = 1 / (1 + z/2), z >= 0, with a
# fractional error below 1.2e-7: P's coefficients, lowest power first.
_ERFC = (-1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806, 0.27886807,
         -1.13520398, 1.48851587, -0.82215223, 0.17087277)


def _estrin(x: K.Expr, coefs: list[K.Expr]) -> K.Expr:
    """sum(coefs[i] * x^i) by Estrin's scheme: independent pairs, so short dependency
    chains (Horner's serial chain left a degree-9 polynomial latency-bound)."""
    while len(coefs) > 1:
        pairs = [K.binary("add", a, K.binary("mul", b, x))
                 for a, b in zip(coefs[::2], coefs[1::2], strict=False)]
        coefs = pairs + coefs[len(pairs) * 2:]
        x = K.binary("mul", x, x)
    return coefs[0]


def _gelu(x: K.Expr, approximate="none") -> K.Expr:
    """x * Phi(x). In float32, 1 + erf(x/sqrt2) and 1 + tanh(u) cancel for negative x and
    leave few correct digits below x = -3, so: 2 Phi(x) = erfc(-x/sqrt2), with erfc
    written out above, and (1 + tanh(u)) / 2 = sigmoid(2u). float64 keeps libm's erf."""
    t = x.dtype
    if approximate == "tanh":  # u = sqrt(2/pi) (x + 0.044715 x^3)
        two_u = K.binary("mul", K.binary("mul", _f(t, 2 * math.sqrt(2 / math.pi)), x),
                         K.binary("add", _f(t, 1.0), K.binary(
                             "mul", _f(t, 0.044715), K.binary("mul", x, x))))
        return K.binary("mul", x, K.Unary("sigmoid", two_u))
    half = K.binary("mul", _f(t, 0.5), x)
    if t == "f64":
        erf = K.Unary("erf", K.binary("mul", x, _f(t, 1 / math.sqrt(2))))
        return K.binary("mul", half, K.binary("add", _f(t, 1.0), erf))
    z = K.binary("mul", K.Unary("abs", x), _f(t, 1 / math.sqrt(2)))
    s = K.binary("div", _f(t, 1.0), K.binary("add", _f(t, 1.0), K.binary("mul", _f(t, 0.5), z)))
    poly = _estrin(s, [_f(t, c) for c in _ERFC])
    tail = K.binary("mul", s, K.Unary("exp", K.binary("sub", poly, K.binary("mul", z, z))))
    twice_phi = K.Select(K.binary("lt", x, _f(t, 0.0)), tail, K.binary("sub", _f(t, 2.0), tail))
    return K.binary("mul", half, twice_phi)


def _clip(x, min=None, max=None):
    if min is not None:
        x = K.binary("max", x, _f(x.dtype, min))
    if max is not None:
        x = K.binary("min", x, _f(x.dtype, max))
    return x


def _int_safe(op):
    """Integer division by zero traps on x86: divide by 1 there (the reference gives 0)."""
    def fn(a, b):
        if a.dtype in ("f16", "f32", "f64"):
            return K.Binary(op, a, b)
        zero = K.binary("eq", b, _f(b.dtype, 0))
        q = K.Binary(op, a, K.Select(zero, _f(b.dtype, 1), b))
        return K.Select(zero, _f(a.dtype, 0), q)
    return fn


_UNARY = {name: (lambda op: lambda x: K.Unary(op, x))(name) for name in
          ("neg", "abs", "exp", "log", "sqrt", "rsqrt", "reciprocal", "tanh", "erf", "sigmoid",
           "relu", "sin", "cos", "floor")}
_UNARY["logical_not"] = lambda x: K.Unary("not", x)
_BINARY_NAMES = {"add": "add", "sub": "sub", "mul": "mul", "maximum": "max",
                 "minimum": "min", "pow": "pow", "equal": "eq", "less": "lt",
                 "less_equal": "le", "greater": "gt", "greater_equal": "ge",
                 "logical_and": "and", "logical_or": "or"}
_BINARY = {name: (lambda op: lambda a, b: K.Binary(op, a, b))(kop)
           for name, kop in _BINARY_NAMES.items()}
_BINARY["div"] = _int_safe("div")
_FLOAT_ONLY = {"exp", "log", "sqrt", "rsqrt", "reciprocal", "tanh", "erf", "sigmoid", "sin",
               "cos", "floor", "pow", "gelu"}
ELEMENTWISE = {**_UNARY, **_BINARY, "gelu": _gelu, "clip": _clip,
               "where": lambda c, a, b: K.Select(c, a, b),
               "cast": lambda x, dtype: K.Cast(x, dtype) if x.dtype != dtype else x}


@rule(*ELEMENTWISE)
def _elementwise(lw: Lowering, node, ins, attrs):
    t = node.outputs[0].type.concrete(lw.env)
    if node.op in _FLOAT_ONLY and ins[0].dtype not in ("f32", "f64", "f16"):
        raise NotLowerable(f"{node.op} on {ins[0].dtype}")
    if ins and ins[0].dtype == "f16" or t.dtype == "f16":
        raise NotLowerable("f16 elementwise math (numpy rounds per op)")
    fused = _into_gemm_epilogue(lw, node, ins, attrs)
    if fused is not None:
        return [fused]
    args = [broadcast_to(x, t.shape).expr for x in ins]
    return [Lazy(tuple(t.shape), ELEMENTWISE[node.op](*args, **attrs))]


def _into_gemm_epilogue(lw: Lowering, node, ins, attrs) -> Lazy | None:
    """Fold `+ bias`, gelu/relu and `+ residual` into the matmul that produced an input:
    the GEMM applies act(a @ b + bias) + residual to its accumulators, saving a pass.
    The input must be the GEMM's whole output (perhaps reshaped) read by this node alone,
    and the node's result must have that input's shape (no broadcasting it bigger)."""
    shape = tuple(node.outputs[0].type.concrete(lw.env).shape)
    for v, mm in zip(node.inputs, ins, strict=True):
        call = lw.pending.get(v)
        if call is not None and lw.uses.get(v) == 1 and mm.shape == shape \
                and mm.dtype == "f32" and _grow_epilogue(lw, node, ins, attrs, mm, call):
            return mm
    return None


def _grow_epilogue(lw: Lowering, node, ins, attrs, mm: Lazy, call: Call) -> bool:
    epi, out = call.epilogue, call.outputs[0]
    if node.op in ("gelu", "relu") and not ({"activation", "residual"} & set(epi)):
        epi["activation"] = "relu" if node.op == "relu" else \
            ("gelu_tanh" if attrs["approximate"] == "tanh" else "gelu")
        return True
    if node.op != "add" or "residual" in epi or len(ins) != 2:
        return False
    other = ins[1] if ins[0] is mm else ins[0]
    # The addend in the GEMM's own frame: `mm` may be a reshape of the GEMM's output.
    framed = reshape(broadcast_to(other, mm.shape), out.shape)
    e = framed.expr if framed is not None else None
    if not isinstance(e, Access) or e.buf is out.buf or _written_after(lw, e.buf, call):
        return False
    n = out.shape[-1]
    if n > 1 and e.coefs[-1] == 1 and not any(e.coefs[:-1]) and not epi:
        epi["bias"] = View(e.buf, e.offset, (n,), (1,))
        return True
    if other.shape == mm.shape and e.coefs[-1] in (1, 0):
        epi["residual"] = View(e.buf, e.offset, out.shape, e.coefs)
        return True
    return False


def _covers(lazy: Lazy, view: View) -> bool:
    """Whether `lazy` is all of `view`'s (contiguous) buffer, in order."""
    return _plain(lazy) and lazy.expr.buf is view.buf and \
        math.prod(lazy.shape) == math.prod(view.shape)


def _plain(lazy: Lazy) -> bool:
    return is_contiguous(lazy.expr, lazy.shape)


def _written_after(lw: Lowering, buf: Buf, call: Call) -> bool:
    """Whether a step after `call` writes `buf` (then it is not ready when the GEMM runs)."""
    after = lw.steps[lw.steps.index(call) + 1:]
    return any(buf in s.writes() for s in after)


# --- rules: views and data movement -----------------------------------------------------

@rule("transpose")
def _transpose(lw, node, ins, attrs):
    perm = attrs["perm"] or tuple(reversed(range(len(ins[0].shape))))
    return [transpose(ins[0], perm)]


@rule("reshape", "squeeze", "unsqueeze")
def _reshape(lw, node, ins, attrs):
    shape = tuple(node.outputs[0].type.concrete(lw.env).shape)
    out = reshape(ins[0], shape)
    return [out if out is not None else reshape(lw.materialize(ins[0]), shape)]


@rule("expand")
def _expand(lw, node, ins, attrs):
    return [broadcast_to(ins[0], node.outputs[0].type.concrete(lw.env).shape)]


@rule("slice")
def _slice(lw, node, ins, attrs):
    x = ins[0]
    rank = len(x.shape)
    starts, ends = attrs["starts"], attrs["ends"]
    axes = attrs["axes"] if attrs["axes"] is not None else range(len(starts))
    steps = attrs["steps"] if attrs["steps"] is not None else (1,) * len(starts)
    rows = [(0, [int(p == s) for s in range(rank)]) for p in range(rank)]
    shape = list(x.shape)
    for s, e, a, st in zip(starts, ends, axes, steps, strict=True):
        a = norm_axis(a, rank)
        r = range(*slice(s, e, st).indices(x.shape[a]))
        shape[a] = len(r)
        rows[a] = (r.start if len(r) else 0, [st * int(a == q) for q in range(rank)])
    return [affine_map(x, shape, rows)]


@rule("split")
def _split(lw, node, ins, attrs):
    x, rank = ins[0], len(ins[0].shape)
    ax = norm_axis(attrs["axis"], rank)
    outs, start = [], 0
    for size in attrs["sizes"]:
        shape = list(x.shape)
        shape[ax] = size
        rows = [((start if p == ax else 0), [int(p == q) for q in range(rank)])
                for p in range(rank)]
        outs.append(affine_map(x, shape, rows))
        start += size
    return outs


@rule("concat")
def _concat(lw, node, ins, attrs):
    t = node.outputs[0].type.concrete(lw.env)
    out = lw.out_view(t)
    ax = norm_axis(attrs["axis"], len(t.shape))
    start = 0
    for x in ins:
        if x.shape[ax]:
            part = View(out.buf, start * out.strides[ax], x.shape, out.strides)
            lw.steps.append(write_kernel("concat", x, part))
        start += x.shape[ax]
    return [lw.of_view(out)]


@rule("full")
def _full(lw, node, ins, attrs):
    t = node.outputs[0].type.concrete(lw.env)
    value = attrs["value"]
    if t.dtype in ("f16", "f32", "f64"):
        value = float(value)
    elif t.dtype == "bool":
        value = bool(value)
    else:
        value = int(value)
    return [Lazy(tuple(t.shape), K.Const(value, t.dtype))]


@rule("range")
def _range(lw, node, ins, attrs):
    t = node.outputs[0].type.concrete(lw.env)
    if t.dtype not in ("i64", "i32"):
        raise NotLowerable(f"range of {t.dtype}")
    return [Lazy(tuple(t.shape), Index(int(attrs["start"][0]), (attrs["delta"],), t.dtype))]


@rule("trilu")
def _trilu(lw, node, ins, attrs):
    x = ins[0]
    rank = len(x.shape)
    row = Index(0, tuple(int(d == rank - 2) for d in range(rank)))
    col = Index(-attrs["k"], tuple(int(d == rank - 1) for d in range(rank)))
    keep = K.Binary("ge" if attrs["upper"] else "le", col, row)  # col - k vs row
    zero = K.Const(False if x.dtype == "bool" else 0, x.dtype)
    if x.dtype in ("f16", "f32", "f64"):
        zero = K.Const(0.0, x.dtype)
    return [Lazy(x.shape, K.Select(keep, x.expr, zero))]


@rule("gather")
def _gather(lw, node, ins, attrs):
    data, idx = ins
    ax = norm_axis(attrs["axis"], len(data.shape))
    t = node.outputs[0].type.concrete(lw.env)
    dview, iview = lw.view(data), lw.view(idx)
    n = data.shape[ax]
    lw.steps.append(IndexCheck(iview, n, node.where))
    out = lw.out_view(t)
    kb = _KB("gather")
    kout, kdata = kb.buf(out.buf, readonly=False), kb.buf(dview.buf)
    ishape = idx.shape
    pre = data.shape[:ax]
    loop_vars = [kb.var() for _ in t.shape]
    ivars = loop_vars[len(pre):len(pre) + len(ishape)]
    index = kb.at(Access(iview.buf, iview.offset, iview.strides), ivars)
    index = index if index.dtype == "i64" else K.Cast(index, "i64")
    wrapped = K.Select(K.binary("lt", index, K.const_index(0)),
                       K.binary("add", index, K.const_index(n)), index)
    dvars = loop_vars[:len(pre)] + [wrapped] + loop_vars[len(pre) + len(ishape):]
    src = K.Load(kdata, K.affine(dview.offset, list(zip(dvars, dview.strides, strict=True))))
    body = [K.Store(kout, K.affine(0, list(zip(loop_vars, out.strides, strict=True))), src)]
    for v, ext in reversed(list(zip(loop_vars, t.shape, strict=True))):
        body = [K.Loop(v, ext, body)]
    if body and isinstance(body[0], K.Loop):
        body[0].parallel = True
    lw.steps.append(kb.kernel(body, math.prod(t.shape)))
    return [lw.of_view(out)]


# --- rules: reductions and normalisations ------------------------------------------------

_NEG_INF = -math.inf


def _float_input(node, x: Lazy):
    if x.dtype not in ("f32", "f64"):
        raise NotLowerable(f"{node.op} on {x.dtype}")


@rule("softmax", "log_softmax")
def _softmax(lw, node, ins, attrs):
    x = ins[0]
    _float_input(node, x)
    ax = norm_axis(attrs["axis"], len(x.shape))
    out = lw.out_view(TensorType(x.shape, x.dtype))
    r = _Rows(node.op, x.shape, [ax], [x], [out])
    kb, t = r.kb, x.dtype
    m, s = kb.var(t), kb.var(t)
    body = [K.Decl(m, _f(t, _NEG_INF))]
    body += r.over_reduced(lambda: [K.Assign(m, K.binary("max", m, r.at(x)))])
    # A row of only -inf gives NaN (-inf - -inf), as in the reference.
    body.append(K.Decl(s, _f(t, 0.0)))
    if node.op == "softmax":
        def second():
            e = K.Unary("exp", K.binary("sub", r.at(x), m))
            return [r.store(out, e, False), K.Assign(s, K.binary("add", s, e))]
        body += r.over_reduced(second)
        inv = kb.var(t)
        body.append(K.Decl(inv, K.binary("div", _f(t, 1.0), s)))
        kout = kb.buf(out.buf, readonly=False)

        def third():
            st = r.store(out, _f(t, 0.0), False)
            return [K.Store(kout, st.index, K.binary("mul", K.Load(kout, st.index), inv))]
        body += r.over_reduced(third)
    else:
        body += r.over_reduced(lambda: [K.Assign(s, K.binary("add", s, K.Unary(
            "exp", K.binary("sub", r.at(x), m))))])
        lse = kb.var(t)
        body.append(K.Decl(lse, K.binary("add", m, K.Unary("log", s))))
        body += r.over_reduced(lambda: [r.store(out, K.binary("sub", r.at(x), lse), False)])
    lw.steps.append(r.kernel(body, 3))
    return [lw.of_view(out)]


@rule("layer_norm")
def _layer_norm(lw, node, ins, attrs):
    x, *params = ins
    _float_input(node, x)
    rank = len(x.shape)
    ax = norm_axis(attrs["axis"], rank)
    params = [broadcast_to(p, x.shape) for p in params]
    out = lw.out_view(TensorType(x.shape, x.dtype))
    r = _Rows("layer_norm", x.shape, range(ax, rank), [x, *params], [out])
    kb, t = r.kb, x.dtype
    acc, mean, var, rstd = kb.var(t), kb.var(t), kb.var(t), kb.var(t)
    inv_n = _f(t, 1.0 / max(r.n, 1))
    body = [K.Decl(acc, _f(t, 0.0))]
    body += r.over_reduced(lambda: [K.Assign(acc, K.binary("add", acc, r.at(x)))])
    body.append(K.Decl(mean, K.binary("mul", acc, inv_n)))
    body.append(K.Decl(var, _f(t, 0.0)))

    def centred():
        d = K.binary("sub", r.at(x), mean)
        return [K.Assign(var, K.binary("add", var, K.binary("mul", d, d)))]
    body += r.over_reduced(centred)
    body.append(K.Decl(rstd, K.Unary("rsqrt", K.binary(
        "add", K.binary("mul", var, inv_n), _f(t, attrs["eps"])))))

    def normalise():
        y = K.binary("mul", K.binary("sub", r.at(x), mean), rstd)
        if len(params) > 0:
            y = K.binary("mul", y, r.at(params[0]))
        if len(params) > 1:
            y = K.binary("add", y, r.at(params[1]))
        return [r.store(out, y, False)]
    body += r.over_reduced(normalise)
    lw.steps.append(r.kernel(body, 3))
    return [lw.of_view(out)]


_REDUCE = {"reduce_sum": ("add", 0.0), "reduce_mean": ("add", 0.0),
           "reduce_max": ("max", _NEG_INF), "reduce_min": ("min", math.inf)}


@rule(*_REDUCE)
def _reduce(lw, node, ins, attrs):
    x = ins[0]
    t = node.outputs[0].type.concrete(lw.env)
    if x.dtype not in ("f32", "f64") or not x.shape:
        raise NotLowerable(f"{node.op} on {x.dtype}{list(x.shape)}")
    axes = range(len(x.shape)) if attrs["axes"] is None else \
        [norm_axis(a, len(x.shape)) for a in attrs["axes"]]
    op, init = _REDUCE[node.op]
    out = lw.out_view(t)
    r = _Rows(node.op, x.shape, axes, [x], [])
    acc = r.kb.var(x.dtype)
    body = [K.Decl(acc, _f(x.dtype, init))]
    body += r.over_reduced(lambda: [K.Assign(acc, K.binary(op, acc, r.at(x)))])
    result = K.binary("mul", acc, _f(x.dtype, 1.0 / max(r.n, 1))) \
        if node.op == "reduce_mean" else acc
    body.append(r.store(out, result, True))
    lw.steps.append(r.kernel(body, 1))
    return [lw.of_view(out)]


@rule("argmax")
def _argmax(lw, node, ins, attrs):
    x = ins[0]
    if x.dtype not in ("f32", "f64") or not x.shape:
        raise NotLowerable(f"argmax on {x.dtype}{list(x.shape)}")
    ax = norm_axis(attrs["axis"], len(x.shape))
    out = lw.out_view(node.outputs[0].type.concrete(lw.env))
    r = _Rows("argmax", x.shape, [ax], [x], [])
    best, arg = r.kb.var(x.dtype), r.kb.var("i64")
    body = [K.Decl(best, _f(x.dtype, _NEG_INF)), K.Decl(arg, K.const_index(0))]

    def step():
        v = r.at(x)
        # Strict, so the first maximum wins; the first NaN beats everything: numpy's rules.
        first_nan = K.binary("and", K.Unary("not", K.binary("eq", v, v)),
                             K.binary("eq", best, best))
        better = K.binary("or", K.binary("gt", v, best), first_nan)
        return [K.Assign(arg, K.Select(better, r.idx[ax], arg)),
                K.Assign(best, K.Select(better, v, best))]
    body += r.over_reduced(step)
    body.append(r.store(out, arg, True))
    lw.steps.append(r.kernel(body, 1))
    return [lw.of_view(out)]


# --- rules: library calls ---------------------------------------------------------------

@rule("matmul")
def _matmul(lw, node, ins, attrs):
    """GEMMs take matrices: a vector operand is a [1, k] or [k, 1] view, as in np.matmul,
    and the result drops that dim again."""
    t = node.outputs[0].type.concrete(lw.env)
    a, b = ins
    a = a if len(a.shape) > 1 else reshape(a, (1,) + a.shape)
    b = b if len(b.shape) > 1 else reshape(b, b.shape + (1,))
    batch = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    out = lw.out_view(TensorType(batch + (a.shape[-2], b.shape[-1]), t.dtype))
    call = Call("matmul", attrs, [lw.view(a), lw.view(b)], [out], where=node.where)
    lw.steps.append(call)
    lw.pending[node.outputs[0]] = call
    return [reshape(lw.of_view(out), t.shape)]


@rule("attention")
def _attention(lw, node, ins, attrs):
    if any(x.dtype != "f32" for x in ins[:3]):
        raise NotLowerable("flash attention is float32 only")
    out = lw.out_view(node.outputs[0].type.concrete(lw.env))
    lw.steps.append(Call("attention", attrs, [lw.view(x) for x in ins], [out],
                         where=node.where))
    return [lw.of_view(out)]


@rule("conv2d")
def _conv2d(lw, node, ins, attrs):
    """im2col + GEMM: pad into a zeroed buffer, read the windows as one strided view,
    copy them into rows (the im2col kernel), multiply by the weight as [C*KH*KW, O]."""
    x, w, *bias = ins
    if attrs["group"] != 1 or x.dtype != "f32":
        raise NotLowerable("conv2d with groups or non-f32 data")
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    pt, pl, pb, pr = attrs["pads"]
    (s0, s1), (d0, d1) = attrs["strides"], attrs["dilations"]
    _, _, oh, ow = node.outputs[0].type.concrete(lw.env).shape
    hp, wp = h + pt + pb, wd + pl + pr
    if any(attrs["pads"]):
        padded = lw.new_buf((n, c, hp, wp), x.dtype)
        full = View(padded, 0, (n, c, hp, wp), contiguous((n, c, hp, wp)))
        lw.steps.append(write_kernel("pad", Lazy(full.shape, K.Const(0.0, x.dtype)), full))
        lw.steps.append(write_kernel("pad", x, View(padded, pt * wp + pl, x.shape,
                                                    full.strides)))
        x = lw.of_view(full)
    rows = [(0, [1, 0, 0, 0, 0, 0]), (0, [0, 0, 0, 1, 0, 0]),
            (0, [0, s0, 0, 0, d0, 0]), (0, [0, 0, s1, 0, 0, d1])]
    cols = affine_map(x, (n, oh, ow, c, kh, kw), rows)
    shape2 = (n * oh * ow, c * kh * kw)
    a = reshape(cols, shape2) or reshape(lw.materialize(cols, "im2col"), shape2)
    wt = transpose(reshape(lw.materialize(w), (o, c * kh * kw)), (1, 0))
    out = lw.out_view(TensorType((n * oh * ow, o), x.dtype))
    call = Call("matmul", {}, [lw.view(a), lw.view(wt)], [out], where=node.where)
    lw.steps.append(call)
    y = lw.of_view(out)
    if bias:
        b = bias[0].expr
        if isinstance(b, Access) and b.coefs == (1,) and o > 1:
            call.epilogue["bias"] = View(b.buf, b.offset, (o,), (1,))
        else:
            y = Lazy(y.shape, K.binary("add", y.expr, broadcast_to(bias[0], y.shape).expr))
    return [transpose(reshape(y, (n, oh, ow, o)), (0, 3, 1, 2))]
