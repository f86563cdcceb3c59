"""The Program a lowering produces: planned buffers, strided views, and the steps
(generated kernels, library calls, index checks) a backend runs in order."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

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
    _written: set | None = field(default=None, init=False, repr=False)

    def written(self) -> set[Buf]:
        """The buffers some step writes. The zero-copy rule: a graph input's buffer in
        this set is always a copy of the caller's array (a step may update its operand
        in place); a runtime may read the other inputs where the caller keeps them."""
        if self._written is None:   # steps are final once a Program is made
            self._written = {b for s in self.steps for b in s.writes()}
        return self._written

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
                "fallbacks": [{"node": c.where, "reason": c.reason}
                              for c in calls if c.fallback],
                "arena_bytes": self.arena_bytes, "live_peak_bytes": self.live_peak_bytes}


class NotLowerable(Exception):
    """Raised by a rule for inputs it does not handle; the node falls back."""

