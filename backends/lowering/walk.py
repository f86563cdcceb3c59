"""The lowering walk and the buffer plan."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

from tensorc.errors import FallbackError
from tensorc.ir import DTYPES, Graph, TensorType
from tensorc.ops import get_op
from tensorc.ops.collective import COLLECTIVES

from ..plan import pack_buffers
from .kernels import write_kernel
from .program import Buf, Call, IndexCheck, NotLowerable, Program, View
from .rules import RULES
from .views import Access, Lazy, compute_count, constant, contiguous, covers, is_contiguous, leaves

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Target:
    """What a backend's library takes, which the rules hand to it (a backend's
    `LOWERING` dict holds the fields it sets).

    gemm_epilogues: the GEMM applies a fuse-epilogues region's bias, activation and
        residual itself (llvm); without, they are a generated kernel after it (cupy:
        cuBLAS cannot).
    grad_kernels: a fused attention backward (llvm), else `attention_grad` runs its
        decomposition.
    int8_gemm: what the integer GEMM takes: "weights" (llvm: u8 rows times a constant i8
        weight, the dequantize as its epilogue), "batched" (cupy's `__dp4a` kernel: any
        u8/i8 operands, i32 out), or None: `matmul_integer` runs its decomposition.
    bf16_weights: the GEMM takes a bf16 weight as it is stored (llvm), else its widening
        cast is a kernel.
    sparse_attention: a kernel for `local_attention` and `block_sparse_attention`, else
        they run their decomposition (dense scores with the pattern as a mask).
    linear_attention: a kernel for `linear_attention`, else its decomposition."""
    gemm_epilogues: bool = True
    grad_kernels: bool = True
    int8_gemm: str | None = None
    bf16_weights: bool = True
    sparse_attention: bool = False
    linear_attention: bool = False


class Lowering:
    def __init__(self, graph: Graph, env: dict[str, int], region: bool = False,
                 target: Target = Target()):
        self.graph, self.env, self.target = graph, env, target
        self.region = region and target.gemm_epilogues
        self.steps: list = []
        self.buffers: list[Buf] = []
        self.notes: list[str] = []
        self.checked: set = set()   # index checks made (see check_indices)
        self.aliases: dict = {}     # Buf -> the input Buf it may share (Program.aliases)
        # Value -> the GEMM Call whose whole output it is (through views), with nothing else
        # reading that output yet: while so, the GEMM's epilogue can still grow.
        self.pending: dict = {}
        # node -> (its result, the library call that computes it, or None): a node an
        # earlier step computed ahead of its turn (an integer GEMM's dequantize; the
        # quantize whose scales a quant_params kernel makes)
        self.absorbed: dict = {}
        self.vals: dict = {}   # Value -> Lazy, as far as the walk has come
        self.users = graph.users()
        self.uses = {v: len(us) for v, us in self.users.items()}
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

    def check_indices(self, check: IndexCheck) -> None:
        """Add an index check, unless the same view was checked against the same bounds
        already (the cache writes of every layer share one `start`)."""
        key = (check.view, check.n, check.lo, check.hi)
        if key not in self.checked:
            self.checked.add(key)
            self.steps.append(check)

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
            vals[v] = constant(v.data, v.type.dtype, v.name)
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
        program = self.plan(inputs, outputs)
        program.aliases = {i: self.aliases[o.buf] for i, o in enumerate(outputs)
                           if o.buf in self.aliases and o.offset == 0
                           and o.buf.numel == math.prod(o.shape)}
        program.in_place = program.find_in_place()
        return program

    def lower_nodes(self, nodes, vals):
        self.vals = vals
        for node in nodes:
            if node in self.absorbed:
                lazy, call = self.absorbed.pop(node)
                if call is not None:
                    self.pending[node.outputs[0]] = call
                self.bind(node, [lazy], vals)
                continue
            ins = [vals[v] for v in node.inputs]
            opdef = get_op(node.op)
            attrs = opdef.resolve_attrs(node.attrs, self.env)
            outs, reason = None, "no lowering rule"
            if _bf16_math(node):   # kernels move bf16 and widen it; numpy does its math
                outs = self.fallback(node, ins, attrs, "bf16 arithmetic (numpy rounds per op)")
            elif node.op in RULES:
                try:
                    outs = RULES[node.op](self, node, ins, attrs)
                except NotLowerable as e:
                    reason = str(e)
                    self.notes.append(f"{node.where}: {e}")
                else:
                    self.follow_gemm(node, outs)
            if outs is None and opdef.decompose is not None:
                outs = self.lower_decomposed(node, ins, attrs)
            if outs is None:
                outs = self.fallback(node, ins, attrs, reason)
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
            if len(readers) == 1 and covers(outs[node.outputs.index(readers[0])], target):
                self.pending[readers[0]] = call

    def bind(self, node, outs, vals):
        for v, lazy in zip(node.outputs, outs, strict=True):
            if self.uses.get(v, 0) > 1 and compute_count(lazy.expr) > 0:
                lazy = self.materialize(lazy, "shared")
            vals[v] = lazy

    def lower_decomposed(self, node, ins, attrs):
        """Lower a composite op through its parts: a region's own `body` graph (symbols
        bound from the inputs' shapes), or else what `decompose` builds. Only inside a
        region may a GEMM take the ops after it as its epilogue: the `fuse-epilogues`
        pass decided which (`rules/matmul.py` carries it out)."""
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
        inner = Lowering(sub, env, region=isinstance(body, Graph), target=self.target)
        inner.steps, inner.buffers, inner.notes = self.steps, self.buffers, self.notes
        inner.checked, inner.aliases = self.checked, self.aliases
        vals = dict(zip(sub_ins, ins, strict=True))
        for v in sub.constants.values():
            vals[v] = constant(v.data, v.type.dtype, v.name)
        inner.lower_nodes(sub.nodes, vals)
        return [vals[v] for v in sub.outputs]

    def fallback(self, node, ins, attrs, reason: str):
        outs = [self.out_view(v.type.concrete(self.env)) for v in node.outputs]
        self.steps.append(Call(node.op, attrs, [self.view(x) for x in ins], outs,
                               fallback=True, where=node.where, reason=reason))
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


def lower(graph: Graph, env: dict[str, int] | None = None, **target) -> Program:
    """The Program for `graph` with its symbolic dims bound by `env`, for a target with
    the `Target` fields given (a backend's `LOWERING`). Reference fallbacks are a warning
    (logged once per Program), or an error in strict mode."""
    program = Lowering(graph, env or {}, target=Target(**target)).run()
    fallbacks = program.stats()["fallbacks"]
    if fallbacks:
        listed = "; ".join(f"{f['node']} ({f['reason']})" for f in fallbacks)
        if strict():
            raise FallbackError(f"strict mode: {len(fallbacks)} op(s) would run the numpy "
                                f"reference instead of generated code: {listed}")
        log.warning("%d op(s) run the numpy reference instead of generated code: %s",
                    len(fallbacks), listed)
    return program


def strict() -> bool:
    """TENSORC_STRICT=1 (the CLI's --strict sets it): reference fallbacks are errors."""
    return os.environ.get("TENSORC_STRICT", "") not in ("", "0")


def planned_memory(graph: Graph, env: dict[str, int] | None = None, **target) -> dict:
    """Arena size (planned, with buffer reuse) and the peak of live bytes, for inspect."""
    p = lower(graph, env, **target)
    return {"arena_bytes": p.arena_bytes, "live_peak_bytes": p.live_peak_bytes}


# ops whose kernels only move elements (or, cast, convert them), so bf16 needs no maths
_BF16_MOVES = {"cast", "reshape", "transpose", "slice", "expand", "squeeze", "unsqueeze",
               "concat", "split", "gather"}


def _bf16_math(node) -> bool:
    """Whether a node computes on bf16 values (an add of two bf16 tensors, a bf16 matmul):
    the generated kernels hold bf16 as its 16 bits, so such a node runs its reference.
    A matmul of f32 operands, one a widened bf16 weight, computes in f32 and is lowered.
    Collectives run their reference either way (`rules/collective.py`)."""
    return node.op not in _BF16_MOVES and node.op not in COLLECTIVES and any(
        v.type.dtype == "bf16" for v in (*node.inputs, *node.outputs))
