"""The Program a lowering produces: planned buffers, strided views, and the steps
(generated kernels, library calls, index checks) a backend runs in order."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from tensorc.ops.collective import COLLECTIVES

from .. import kernel_ir as K


@dataclass(eq=False)
class Buf:
    """One planned buffer. kind: "arena" (planned), "input" (a graph input: planned in the
    arena too, where it is copied unless the runtime reads the caller's array in place:
    see `Program.written`) or "const" (the graph's weight array, `data`)."""
    nbytes: int
    dtype: str
    kind: str = "arena"
    data: np.ndarray | None = None
    name: str = ""
    offset: int = 0  # in the arena, set by the plan
    numel: int = 0



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
    # (source, destination) of a whole-buffer copy that a runtime skips when it placed
    # both buffers at one address: an output the caller aliased to its input (a cache)
    skip_if_same: tuple[Buf, Buf] | None = None

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
    reason: str = ""     # a fallback's: why no generated code runs it
    epilogue: dict = field(default_factory=dict)  # matmul: bias / activation / residual

    def reads(self):
        return [v.buf for v in self.inputs] + [v.buf for v in self.epilogue.values()
                                               if isinstance(v, View)]

    def writes(self):
        return [v.buf for v in self.outputs]


@dataclass(eq=False)
class IndexCheck:
    """Raise a clear error if an index tensor holds values outside [lo, hi): by default
    [-n, n), an axis of size n counted from either end."""
    view: View
    n: int
    where: str
    lo: int | None = None
    hi: int | None = None
    what: str = "an axis of size {n}"

    def problem(self, smallest: int, largest: int) -> str | None:
        """The error message for an index tensor with these extremes, or None."""
        lo = -self.n if self.lo is None else self.lo
        hi = self.n if self.hi is None else self.hi
        if lo <= smallest and largest < hi:
            return None
        bad = largest if largest >= hi else smallest
        return f"{self.where}: index {bad} is out of range for {self.what.format(n=self.n)}"

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
    # output index -> the input Buf the caller may pass as that output's `out` array:
    # the output is the input updated (a key/value cache), and its only copy is a
    # `skip_if_same` step
    aliases: dict[int, Buf] = field(default_factory=dict)
    # output index -> the input Bufs whose memory the caller may pass as that output's
    # `out` (the update then happens in place): the one step writing the output is a
    # kernel that reads each of them only at the element it writes (`in_place_reads`),
    # and no later step reads them (`find_in_place`; an optimizer's state and weights)
    in_place: dict[int, tuple[Buf, ...]] = field(default_factory=dict)
    _written: set | None = field(default=None, init=False, repr=False)

    def written(self) -> set[Buf]:
        """The buffers some step writes. The zero-copy rule: a graph input's buffer in
        this set is always a copy of the caller's array (a step may update its operand
        in place); a runtime may read the other inputs where the caller keeps them."""
        if self._written is None:   # steps are final once a Program is made
            self._written = {b for s in self.steps for b in s.writes()}
        return self._written

    def find_in_place(self) -> dict[int, tuple[Buf, ...]]:
        """`in_place`, worked out from the steps: per whole-buffer output written by one
        kernel step (that writes nothing else), the graph inputs of its dtype and size
        that the kernel reads only element for element (`in_place_reads`), that no
        step writes and that no later step reads."""
        writers: dict = {}
        for k, s in enumerate(self.steps):
            for b in s.writes():
                writers.setdefault(b, []).append(k)
        last_read: dict = {}
        for k, s in enumerate(self.steps):
            for b in s.reads():
                last_read[b] = k
        found = {}
        for i, v in enumerate(self.outputs):
            ks = writers.get(v.buf, [])
            if len(ks) != 1 or v.offset or v.buf.numel != int(np.prod(v.shape)):
                continue
            step = self.steps[ks[0]]
            if not isinstance(step, KernelStep) or step.skip_if_same is not None \
                    or len(set(step.writes())) != 1:
                continue
            ok = []
            for j in in_place_reads(step.kernel):
                b = step.args[j]
                if b.kind == "input" and b.dtype == v.buf.dtype and b.numel == v.buf.numel \
                        and b not in writers and last_read.get(b) == ks[0] and b not in ok:
                    ok.append(b)
            if ok:
                found[i] = tuple(ok)
        return found

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
                "collectives": sum(c.op in COLLECTIVES and not c.fallback for c in calls),
                "fallbacks": [{"node": c.where, "reason": c.reason}
                              for c in calls if c.fallback],
                "arena_bytes": self.arena_bytes, "live_peak_bytes": self.live_peak_bytes}


def in_place_reads(kernel: K.Kernel) -> list[int]:
    """The positions (in `kernel.buffers`) of the buffers the kernel reads only at the
    element it writes: it has one store, `out[i] = f(...)`, inside loops whose variables
    all appear in `i`, and every load of those buffers is at `i` and comes before the
    store. Writing `out` over such a buffer changes nothing the kernel reads. (The llvm
    kernels' pointers are `noalias`; what that lets LLVM assume stays true in effect:
    each element's store depends on its own loads, and no load follows the store.)"""
    stores: list = []
    loads: list = []   # (buffer, its index as text, after the store?)

    def expr(e):
        if isinstance(e, K.Load):
            loads.append((e.buf, K.format_expr(e.index), bool(stores)))
            expr(e.index)
        for child in ("x", "a", "b", "cond"):
            if isinstance(getattr(e, child, None), K.Expr):
                expr(getattr(e, child))

    def stmts(body, loops):
        for s in body:
            if isinstance(s, K.Loop):
                if not stmts(s.body, loops + [s]):
                    return False
            elif isinstance(s, K.Store):
                expr(s.index)
                expr(s.value)
                stores.append((s, loops))
            elif isinstance(s, K.Decl):
                expr(s.init)
            elif isinstance(s, K.Assign):
                expr(s.value)
            else:
                return False
        return True

    if not stmts(kernel.body, []) or len(stores) != 1:
        return []
    store, loops = stores[0]
    index = K.format_expr(store.index)
    names = set(re.findall(r"\w+", index))
    if any(loop.extent > 1 and loop.var.name not in names for loop in loops):
        return []
    bad = {id(b) for b, at, after in loads if at != index or after}
    return [j for j, b in enumerate(kernel.buffers)
            if b.readonly and b is not store.buf and id(b) not in bad
            and any(lb is b for lb, _, _ in loads)]


class NotLowerable(Exception):
    """Raised by a rule for inputs it does not handle; the node falls back."""

