"""The kernel builder: loop nests in the kernel IR that write a lazy value into a view
(`write_kernel`) or reduce over some axes (`Rows`)."""

from __future__ import annotations

import math

from .. import kernel_ir as K
from .program import Buf, KernelStep, View
from .views import Access, Lazy, leaves, map_leaves


def const(dtype: str, value) -> K.Const:
    return K.Const(value, dtype)


class KernelBuilder:
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


def merge_dims(shape, coef_lists, dims):
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


def outer_indices(kb: KernelBuilder, shape, groups, flat: K.Expr, idx: list):
    """Decompose the flat outer loop variable into per-dim indices (constant div/mod)."""
    extents = [math.prod(shape[d] for d in g) for g in groups]
    for j, g in enumerate(groups):
        below = math.prod(extents[j + 1:])
        e = flat if below == 1 else K.binary("floordiv", flat, K.const_index(below))
        if j:
            e = K.binary("mod", e, K.const_index(extents[j]))
        assign_group(shape, g, e, idx)


def assign_group(shape, g, e: K.Expr, idx: list):
    """Indices of a merged group's dims from its flat index `e`. Dims merge only where
    every access is linear across them, so the innermost dim can take the whole flat
    index (its coefficient times `e` is the group's address) and the others 0."""
    for d in g:
        idx[d] = K.const_index(0)
    idx[g[-1]] = e


def write_kernel(kind: str, lazy: Lazy, out: View) -> KernelStep:
    """A loop nest computing `lazy` into `out` (outer dims flattened and parallel)."""
    shape = lazy.shape
    kb = KernelBuilder(kind)
    kout = kb.buf(out.buf, readonly=False)
    coef_lists = [leaf.coefs for leaf in leaves(lazy.expr)] + [out.strides]
    groups = merge_dims(shape, coef_lists, range(len(shape)))
    idx: list[K.Expr] = [K.const_index(0)] * len(shape)

    def store():
        return [K.Store(kout, K.affine(out.offset, list(zip(idx, out.strides, strict=True))),
                        kb.at(lazy.expr, idx))]
    tile = _transpose_tile(shape, groups, lazy, out)
    if not groups:
        body = store()
    elif tile:
        body = _tiled(kb, shape, groups, idx, tile, store)
    elif len(groups) == 1:
        v = kb.var()
        assign_group(shape, groups[0], v, idx)
        body = [K.Loop(v, math.prod(shape[d] for d in groups[0]), store(), parallel=True)]
    else:
        flat, inner = kb.var(), kb.var()
        outer_indices(kb, shape, groups[:-1], flat, idx)
        assign_group(shape, groups[-1], inner, idx)
        body = [K.Loop(flat, math.prod(shape[d] for g in groups[:-1] for d in g),
                       [K.Loop(inner, math.prod(shape[d] for d in groups[-1]), store())],
                       parallel=True)]
    return kb.kernel(body, math.prod(shape))


class Rows:
    """A reduction kernel's frame: a parallel loop over the kept dims of `shape` and
    nested loops over the reduced `axes` (merged where every input allows)."""

    def __init__(self, kind: str, shape, axes, inputs: list[Lazy], outs: list[View]):
        self.kb, self.shape = KernelBuilder(kind), tuple(shape)
        self.axes = sorted(axes)
        kept = [d for d in range(len(shape)) if d not in self.axes]
        coef_lists = [leaf.coefs for x in inputs for leaf in leaves(x.expr)]
        coef_lists += [o.strides for o in outs if len(o.strides) == len(shape)]
        self.red_groups = merge_dims(shape, coef_lists, self.axes)
        self.kept_groups = [[d] for d in kept if shape[d] != 1]
        self.rows = math.prod(shape[d] for d in kept)
        self.n = math.prod(shape[d] for d in self.axes)
        self.flat = self.kb.var()
        self.idx: list[K.Expr] = [K.const_index(0)] * len(shape)
        if self.kept_groups:
            outer_indices(self.kb, shape, self.kept_groups, self.flat, self.idx)

    def over_reduced(self, body_fn) -> list[K.Stmt]:
        """Nested loops over the reduced dims; body_fn() builds the innermost body (it
        reads self.idx, which then holds the reduced dims' loop variables)."""
        loops = []
        for g in self.red_groups:
            v = self.kb.var()
            assign_group(self.shape, g, v, self.idx)
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



def _transpose_tile(shape, groups, lazy: Lazy, out: View) -> int:
    """The tile edge for a transposing write (0: none): the output's last loop is read
    with a large stride and the loop before it with unit stride (a weight gradient's
    x^T, attention's P^T). Row by row, every read would touch a new cache line."""
    if len(groups) < 2 or out.strides[groups[-1][-1]] != 1:
        return 0
    p, q = groups[-2][-1], groups[-1][-1]
    if not any(isinstance(leaf, Access) and leaf.coefs[p] == 1 and abs(leaf.coefs[q]) > 1
               for leaf in leaves(lazy.expr)):
        return 0
    rows, cols = (math.prod(shape[d] for d in g) for g in groups[-2:])
    if math.prod(shape) < 1 << 12:
        return 0
    return next((t for t in (32, 16) if rows % t == 0 and cols % t == 0), 0)


def _tiled(kb: KernelBuilder, shape, groups, idx: list, tile: int, store):
    """The loop nest of `write_kernel` over tile x tile blocks of the last two loops:
    parallel over (outer dims, row tiles), then column tiles, then within a tile."""
    rows, cols = (math.prod(shape[d] for d in g) for g in groups[-2:])
    outer = math.prod(shape[d] for g in groups[:-2] for d in g)
    flat, ct, ci, ri = kb.var(), kb.var(), kb.var(), kb.var()
    row_tiles = rows // tile
    if groups[:-2]:
        outer_indices(kb, shape, groups[:-2],
                      K.binary("floordiv", flat, K.const_index(row_tiles)), idx)
    rt = K.binary("mod", flat, K.const_index(row_tiles)) if groups[:-2] else flat
    assign_group(shape, groups[-2], K.binary(
        "add", K.binary("mul", rt, K.const_index(tile)), ri), idx)
    assign_group(shape, groups[-1], K.binary(
        "add", K.binary("mul", ct, K.const_index(tile)), ci), idx)
    inner = [K.Loop(ri, tile, [K.Loop(ci, tile, store())])]
    return [K.Loop(flat, outer * row_tiles, [K.Loop(ct, cols // tile, inner)], parallel=True)]
